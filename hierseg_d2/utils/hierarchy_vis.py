"""Hierarchical clustering maps of HCFormer (the paper's Fig. 5) and a small report over a dataset split.

A *strip* shows, left to right, one panel per clustering level (fine to coarse: the clusters after
A(2), A(3), A(4), i.e. prototypes at stride 8, 16, 32) with the hard cluster boundaries as white
lines over the dimmed image, then the ground truth. With ground truth, a second row shows per level
the leaking pixels in red (pixels outside the majority ground-truth segment of their cluster; their
share of the labelled pixels is 100 - ASA) under thin white ground-truth boundaries, unlabelled pixels
washed out, and the predicted mask. Without ground truth the strip is one row: levels, then the
prediction. Images with a shorter side under 256 px are enlarged by an integer factor first.
"""
import math
import os
from typing import Dict, List, Mapping, Optional, Tuple

import cv2
import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..evaluation.clustering_evaluator import (
    IGNORE,
    ClusteringEvaluator,
    cluster_maps_from_hierarchy,
    clustering_scores,
    leaking_pixels,
    load_gt_segments,
)

__all__ = [
    "cluster_boundaries",
    "display_scale",
    "class_list_metadata",
    "draw_predictions",
    "draw_ground_truth",
    "draw_hierarchy_strip",
    "hierarchy_strip",
    "write_hierarchy_report",
    "format_clustering_table",
]


BOUNDARY_COLOR = (255, 255, 255)  # white lines over the image dimmed to DIM: readable on any content
LEAK_COLOR = (230, 20, 20)
DIM = 0.5
HEADER_H = 22
GAP = 4
MIN_PANEL_SIDE = 256  # small images (shapes: ~96-192 px) are enlarged so that a person can read them


def cluster_boundaries(ids: np.ndarray) -> np.ndarray:
    """Bool map of pixels whose right or lower neighbour is in another cluster (1-px boundaries)."""
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def display_scale(h: int, w: int) -> int:
    """Integer enlargement of an h x w image for drawings: small images get a shorter side >= 256 px."""
    return max(1, math.ceil(MIN_PANEL_SIDE / max(1, min(h, w))))


def _enlarge_labels(labels: np.ndarray, k: int) -> np.ndarray:
    return np.repeat(np.repeat(labels, k, axis=0), k, axis=1)


def _enlarge_image(image: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return image
    return cv2.resize(image, (image.shape[1] * k, image.shape[0] * k), interpolation=cv2.INTER_LINEAR)


def _thicken(mask: np.ndarray, k: int) -> np.ndarray:
    """Boundaries of an image enlarged k times: about k/2 px wide so they stay visible."""
    t = max(1, k // 2)
    return mask if t == 1 else cv2.dilate(mask.astype(np.uint8), np.ones((t, t), np.uint8)).astype(bool)


def _paint(image: np.ndarray, mask: np.ndarray, color, alpha: float = 1.0) -> np.ndarray:
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, dtype=np.float32)
    return out.astype(np.uint8)


def _with_header(panel: np.ndarray, text: str) -> np.ndarray:
    header = np.full((HEADER_H, panel.shape[1], 3), 255, dtype=np.uint8)
    scale = 0.45
    # shrink the text until it fits the panel width
    while scale > 0.25 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > panel.shape[1] - 6:
        scale -= 0.05
    cv2.putText(header, text, (3, HEADER_H - 7), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, panel], axis=0)


def _fit(panel: np.ndarray, h: int, w: int) -> np.ndarray:
    if panel.shape[:2] != (h, w):
        panel = cv2.resize(panel, (w, h), interpolation=cv2.INTER_LINEAR)
    return panel


def _grid(rows: List[List[np.ndarray]]) -> np.ndarray:
    """Concatenate equally sized panels into rows/columns separated by white gaps."""
    ph, pw = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * ph + (len(rows) - 1) * GAP, ncol * pw + (ncol - 1) * GAP, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            out[i * (ph + GAP):i * (ph + GAP) + ph, j * (pw + GAP):j * (pw + GAP) + pw] = panel
    return out


def _level_name(stride: int) -> str:
    # the clusters whose prototypes live at stride s come from A(i) with s = 2^(i+1)
    return f"A({int(math.log2(stride)) - 1}) stride {stride}"


def class_list_metadata(metadata, num_classes: int = 0):
    """A copy of ``metadata`` whose ``thing_classes`` / ``thing_colors`` are the full class list.

    Model outputs carry contiguous ids over *all* classes (Mask2Former convention: ``stuff_classes[i]``
    names id ``i``), while Detectron2's Visualizer names instances and thing segments with
    ``thing_classes[i]``: instance predictions of stuff classes (or thing lists not placed first) would
    raise IndexError or get the wrong name. Lists shorter than ``num_classes`` are padded ("class 17").
    """
    from detectron2.data.catalog import Metadata

    d = {k: v for k, v in metadata.as_dict().items() if k != "name"} if metadata is not None else {}
    names = list(d.get("stuff_classes") or d.get("thing_classes") or [])
    colors = list(d.get("stuff_colors") or d.get("thing_colors") or [])
    n = max(num_classes, len(names))
    names += [f"class {i}" for i in range(len(names), n)]
    if colors and len(colors) < n:
        colors += [colors[i % len(colors)] for i in range(len(colors), n)]
    d.update(thing_classes=names, stuff_classes=names)
    if colors:
        d.update(thing_colors=colors, stuff_colors=colors)
    return Metadata(name=getattr(metadata, "name", "N/A"), **d)


def _num_predicted_classes(predictions: Mapping) -> int:
    """1 + the largest class id the predictions can name (so that every id has a name to draw)."""
    n = predictions["sem_seg"].shape[0] if "sem_seg" in predictions else 0
    if "instances" in predictions and len(predictions["instances"]):
        n = max(n, int(predictions["instances"].pred_classes.max()) + 1)
    if "panoptic_seg" in predictions:
        n = max([n] + [int(s["category_id"]) + 1 for s in predictions["panoptic_seg"][1]])
    return n


def draw_predictions(image_rgb: np.ndarray, predictions: Mapping, metadata, confidence_threshold: float = 0.5,
                     scale: float = 1.0) -> np.ndarray:
    """Draw a model's per-image output with Detectron2's Visualizer (RGB uint8 result).

    Panoptic output wins over instances and semantic (as in Detectron2's demo); otherwise semantic and
    instances (score >= ``confidence_threshold``) are both drawn.
    """
    num_classes = _num_predicted_classes(predictions)
    vis = Visualizer(image_rgb, class_list_metadata(metadata, num_classes), scale=scale, instance_mode=ColorMode.IMAGE)
    if "panoptic_seg" in predictions:
        panoptic_seg, segments_info = predictions["panoptic_seg"]
        return vis.draw_panoptic_seg(panoptic_seg.to("cpu"), segments_info).get_image()
    out = None
    if "sem_seg" in predictions:
        out = vis.draw_sem_seg(predictions["sem_seg"].argmax(dim=0).to("cpu"))
    if "instances" in predictions:
        instances = predictions["instances"].to("cpu")
        out = vis.draw_instance_predictions(instances[instances.scores >= confidence_threshold])
    if out is None:
        raise KeyError(f"no 'panoptic_seg', 'sem_seg' or 'instances' in the predictions (keys: {sorted(predictions)})")
    return out.get_image()


def draw_ground_truth(image_rgb: np.ndarray, record: Mapping, metadata, scale: float = 1.0) -> np.ndarray:
    """Draw one dataset record's ground truth (panoptic if present, else semantic, else instances)."""
    if "pan_seg_file_name" in record:
        keys = ("pan_seg_file_name", "segments_info")
    elif "sem_seg_file_name" in record:
        keys = ("sem_seg_file_name",)
    else:
        keys = ("annotations",)
    shown = {k: record[k] for k in keys if k in record}
    return Visualizer(image_rgb, metadata, scale=scale).draw_dataset_dict(shown).get_image()


def draw_hierarchy_strip(image_rgb: np.ndarray, cluster_maps: Mapping[int, np.ndarray], prediction_vis: np.ndarray,
                         gt_segments: Optional[np.ndarray] = None, gt_vis: Optional[np.ndarray] = None) -> np.ndarray:
    """Compose the Fig.-5-style strip from per-level cluster maps (see the module docstring).

    Args:
        image_rgb: (H, W, 3) uint8 original image.
        cluster_maps: ``{stride: (H, W) cluster ids}``, one panel each, as from
            :func:`~hierseg_d2.evaluation.clustering_evaluator.cluster_maps_from_hierarchy` with
            ``include_grid=False``.
        prediction_vis: drawn prediction (any size; resized to the panel size).
        gt_segments: optional (H, W) ground-truth segment ids (``IGNORE`` = unlabelled): adds the
            second row with the leaking pixels and per-level UE / ASA in the headers.
        gt_vis: optional drawn ground truth for the last panel of the first row.

    Returns:
        RGB uint8 image.
    """
    h, w = image_rgb.shape[:2]
    strides = sorted(cluster_maps)
    k = display_scale(h, w)
    big = _enlarge_image(image_rgb, k)
    dimmed = (DIM * big).astype(np.uint8)
    top, bottom = [], []
    if gt_segments is not None:
        seg_big = _enlarge_labels(gt_segments, k)
        # unlabelled pixels are washed out (they do not count), labelled ones dimmed under the red
        leak_base = np.where((seg_big == IGNORE)[..., None], (0.5 * big + 127).astype(np.uint8), dimmed)
        gt_edges = _thicken(cluster_boundaries(seg_big), k)
    for s in strides:
        ids = cluster_maps[s]
        edges = _thicken(cluster_boundaries(_enlarge_labels(ids, k)), k)
        n = len(np.unique(ids))
        top.append(_with_header(_paint(dimmed, edges, BOUNDARY_COLOR), f"{_level_name(s)}: {n} clusters"))
        if gt_segments is not None:
            sc = clustering_scores(ids, gt_segments)
            panel = _paint(leak_base, _enlarge_labels(leaking_pixels(ids, gt_segments), k), LEAK_COLOR, alpha=0.85)
            panel = _paint(panel, gt_edges, (255, 255, 255), alpha=0.6)
            bottom.append(_with_header(panel, f"leak {_level_name(s)}: UE {sc['UE']:.1f}% ASA {sc['ASA']:.1f}%"))
    pred = _with_header(_fit(prediction_vis, *big.shape[:2]), "prediction")
    if gt_segments is None:
        return _grid([top + [pred]])
    gt_panel = gt_vis if gt_vis is not None else _paint(dimmed, gt_edges, BOUNDARY_COLOR)
    top.append(_with_header(_fit(gt_panel, *big.shape[:2]), "ground truth"))
    return _grid([top, bottom + [pred]])


def hierarchy_strip(image_rgb: np.ndarray, predictions: Mapping, metadata, record: Optional[Mapping] = None,
                    confidence_threshold: float = 0.5) -> Tuple[np.ndarray, Dict[str, float]]:
    """Strip of one image from the model's output (needs its ``"hierarchy"``) and per-level scores.

    Args:
        image_rgb: the original image, RGB uint8.
        predictions: the model's output dict for this image, with ``"hierarchy"``.
        metadata: dataset metadata (class names / colours).
        record: the dataset record with ground truth, or None (then one row and no scores).

    Returns:
        (strip RGB uint8, {"UE@stride8": ..., "ASA@stride8": ..., ...} or {} without ground truth).
    """
    if "hierarchy" not in predictions:
        raise KeyError("the predictions have no 'hierarchy': set model.return_assignments = True "
                       "(MODEL.HCFORMER.CLUSTERING_EVAL) before running the model")
    h, w = image_rgb.shape[:2]
    maps = cluster_maps_from_hierarchy(predictions["hierarchy"], h, w, include_grid=False)
    k = display_scale(h, w)  # Visualizer draws at k x the image size, matching the enlarged strip panels
    pred_vis = draw_predictions(image_rgb, predictions, metadata, confidence_threshold, scale=k)
    if record is None:
        return draw_hierarchy_strip(image_rgb, maps, pred_vis), {}
    segments, _ = load_gt_segments(record, getattr(metadata, "ignore_label", 255))
    if segments.shape != (h, w):
        raise ValueError(f"ground truth of {record.get('file_name')} is {segments.shape}, the image is {(h, w)}")
    gt_vis = draw_ground_truth(image_rgb, record, metadata, scale=k)
    scores = {}
    for s, ids in maps.items():
        for name, value in clustering_scores(ids, segments).items():
            scores[f"{name}@stride{s}"] = value
    return draw_hierarchy_strip(image_rgb, maps, pred_vis, segments, gt_vis), scores


def format_clustering_table(results: Mapping[str, float]) -> str:
    """Per-level table (rows = strides, columns = UE / ASA / clusters) of ClusteringEvaluator results."""
    from tabulate import tabulate

    levels = sorted({int(k.split("@stride")[1]) for k in results})
    rows = []
    for s in levels:
        # the evaluator's finest entry is the un-clustered grid of the finest map
        name = f"stride {s} grid (no clustering)" if s == levels[0] else _level_name(s)
        rows.append([name] + [results.get(f"{m}@stride{s}", float("nan")) for m in ("UE", "ASA", "clusters")])
    return tabulate(rows, headers=["level", "UE %", "ASA %", "#clusters"], tablefmt="pipe", floatfmt=".2f")


def write_hierarchy_report(cfg, model, dataset_name: str, output_dir: str, num_images: int = 3,
                           num_eval_images: Optional[int] = None) -> Dict[str, float]:
    """Write hierarchy strips of a few images of a split and return its per-level UE / ASA.

    Runs ``model`` (an HCFormer; its ``return_assignments`` and train/eval mode are restored afterwards)
    over ``dataset_name`` with the evaluation loader of train_net.py, writes ``<output_dir>/<image
    name>_hierarchy.png`` for the first ``num_images`` images and evaluates the hard clusters of the
    first ``num_eval_images`` images (all if None) with :class:`ClusteringEvaluator`.

    Returns:
        ``{"UE@stride8": ..., "ASA@stride8": ..., "clusters@stride8": ..., ...}`` (percent, mean over
        the evaluated images; the finest stride is the un-clustered grid), also printed as a table.
    """
    from detectron2.data import build_detection_test_loader
    from detectron2.data.detection_utils import read_image

    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if not hasattr(model, "return_assignments"):
        raise AttributeError(f"{type(model).__name__} has no 'return_assignments': the hierarchy report needs HCFormer")
    os.makedirs(output_dir, exist_ok=True)
    metadata = MetadataCatalog.get(dataset_name)
    records = {r["file_name"]: r for r in DatasetCatalog.get(dataset_name)}
    evaluator = ClusteringEvaluator(dataset_name, distributed=False)
    evaluator.reset()
    from ..data.dataset_mappers import build_mapper  # the evaluation mapper of train_net.py

    loader = build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))
    limit = len(loader) if num_eval_images is None else min(num_eval_images, len(loader))
    limit = max(limit, min(num_images, len(loader)))
    was_training, previous = model.training, model.return_assignments
    model.eval()
    model.return_assignments = True
    written, seen = [], 0
    try:
        with torch.no_grad():
            for inputs in loader:
                outputs = model(inputs)
                evaluator.process(inputs, outputs)
                for inp, out in zip(inputs, outputs):
                    if len(written) < num_images:
                        image = read_image(inp["file_name"], format="RGB")
                        strip, _ = hierarchy_strip(image, out, metadata, records.get(inp["file_name"]))
                        name = os.path.splitext(os.path.basename(inp["file_name"]))[0]
                        path = os.path.join(output_dir, f"{name}_hierarchy.png")
                        cv2.imwrite(path, strip[:, :, ::-1])
                        written.append(path)
                seen += len(inputs)
                if seen >= limit:
                    break
    finally:
        model.return_assignments = previous
        model.train(was_training)
    results = evaluator.evaluate().get("clustering", {})
    # printed, not only logged: `make demo` ends with this table whatever the logging setup
    print(f"Hierarchy strips: {', '.join(written)}")
    print(f"Clustering quality of the hard clusters on {dataset_name} ({seen} images):\n"
          + format_clustering_table(results))
    return dict(results)
