"""Predictor and visualisation helpers of demo/demo.py (Detectron2's demo/predictor.py layout)."""
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine.defaults import DefaultPredictor
from detectron2.modeling import build_model

from hierseg_d2.checkpoint import HierSegCheckpointer
from hierseg_d2.engine.reliability import install_finite_checks
from hierseg_d2.utils.hierarchy_vis import display_scale, draw_predictions, hierarchy_strip

__all__ = ["HierarchyPredictor", "VisualizationDemo"]


class HierarchyPredictor(DefaultPredictor):
    """Detectron2's DefaultPredictor (weights from MODEL.WEIGHTS, INPUT.FORMAT conversion, test-time
    ResizeShortestEdge, one BGR image in, one output dict out) that can also ask HCFormer for its
    ``"hierarchy"`` output.

    Args:
        cfg: a frozen config.
        return_assignments: add ``"hierarchy"`` (soft assignments, image/padded sizes) to the output;
            needs a model with a ``return_assignments`` attribute (HCFormer).
    """

    def __init__(self, cfg, return_assignments: bool = False):
        self._build(cfg)
        if hasattr(self.model, "return_assignments"):
            self.model.return_assignments = return_assignments
        elif return_assignments:
            raise ValueError(f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r} has no hierarchical clustering "
                             "to show; the hierarchy strips need HCFormer")

    def _build(self, cfg):
        """DefaultPredictor.__init__ with hierseg_d2's safe checkpoint loading (tensors only, match check)
        and the finite check before the backbone."""
        self.cfg = cfg.clone()
        self.model = install_finite_checks(build_model(self.cfg))
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        HierSegCheckpointer.from_config(cfg, self.model).load(cfg.MODEL.WEIGHTS)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT = {self.input_format!r}: the predictor takes 'RGB' or 'BGR'")


class VisualizationDemo:
    """Run the predictor on an image and draw its output (and, optionally, the clustering strip).

    Args:
        cfg: a frozen config; names and colours come from the metadata of ``DATASETS.TEST[0]``.
        hierarchy: also produce the hierarchical clustering strip of every image.
        confidence_threshold: minimum score of the instances drawn.
    """

    def __init__(self, cfg, hierarchy: bool = False, confidence_threshold: float = 0.5):
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")
        self.hierarchy = hierarchy
        self.confidence_threshold = confidence_threshold
        self.predictor = HierarchyPredictor(cfg, return_assignments=hierarchy)

    def run_on_image(self, image_bgr: np.ndarray) -> Tuple[Dict, np.ndarray, Optional[np.ndarray]]:
        """BGR uint8 image -> (predictions, drawn predictions RGB, hierarchy strip RGB or None)."""
        predictions = self.predictor(image_bgr)
        image_rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
        # small images (e.g. shapes) are drawn enlarged so that labels stay readable
        scale = display_scale(*image_rgb.shape[:2])
        vis = draw_predictions(image_rgb, predictions, self.metadata, self.confidence_threshold, scale=scale)
        strip = None
        if self.hierarchy:
            strip, _ = hierarchy_strip(image_rgb, predictions, self.metadata, None, self.confidence_threshold)
        return predictions, vis, strip

    def run_on_video(self, video, max_frames: int = 0) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """Frames of an opened ``cv2.VideoCapture`` -> (drawn frame BGR, hierarchy strip BGR or None), one
        pair per frame, until the video ends (or after ``max_frames`` frames if > 0)."""
        count = 0
        while video.isOpened() and (max_frames <= 0 or count < max_frames):
            ok, frame = video.read()
            if not ok:
                break
            count += 1
            _, vis, strip = self.run_on_image(frame)
            yield (np.ascontiguousarray(vis[:, :, ::-1]),
                   None if strip is None else np.ascontiguousarray(strip[:, :, ::-1]))
