"""Test-time augmentation for semantic segmentation (Mask2Former's ``SemanticSegmentorWithTTA``).

``TEST.AUG.ENABLED`` makes ``train_net.py --eval-only`` evaluate a second time with TTA
(:meth:`hierseg_d2.engine.Trainer.test_with_TTA`, results under ``sem_seg_TTA``): every image is resized
so that its shorter side is each of ``TEST.AUG.MIN_SIZES`` (longer side <= ``TEST.AUG.MAX_SIZE``) and, with
``TEST.AUG.FLIP``, also flipped left-right (Detectron2's ``DatasetMapperTTA``); the model's ``sem_seg``
output of every version — per-class scores already at the original image size — is flipped back where
needed and the scores are averaged, as the release does (a plain mean of the scores, not of logits).
"""
import copy
from contextlib import contextmanager
from typing import Dict, List

import numpy as np
import torch
from detectron2.data.detection_utils import read_image
from detectron2.modeling import DatasetMapperTTA
from fvcore.transforms import HFlipTransform
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["SemanticSegmentorWithTTA"]

# HCFormer outputs that TTA does not average; switched off during TTA inference to save their cost
_OTHER_OUTPUTS = ("panoptic_on", "instance_on", "return_assignments")


class SemanticSegmentorWithTTA(nn.Module):
    """Wraps a model whose inference returns ``{"sem_seg": (C, H, W) scores}`` per image; same call
    interface as the model's inference, returns ``[{"sem_seg": averaged scores}]``.

    Args:
        cfg: config with ``TEST.AUG.MIN_SIZES``, ``TEST.AUG.MAX_SIZE``, ``TEST.AUG.FLIP``.
        model: the model (DistributedDataParallel is unwrapped).
        tta_mapper: dataset dict -> list of augmented dicts (each with "image" and "transforms");
            default ``DatasetMapperTTA(cfg)``.
    """

    def __init__(self, cfg, model: nn.Module, tta_mapper=None):
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not len(cfg.TEST.AUG.MIN_SIZES):
            raise ValueError("TEST.AUG.MIN_SIZES is empty: test-time augmentation needs at least one scale")
        self.model = model
        self.tta_mapper = DatasetMapperTTA(cfg) if tta_mapper is None else tta_mapper
        self.input_format = getattr(model, "input_format", cfg.INPUT.FORMAT)

    def _with_image(self, dataset_dict: Dict) -> Dict:
        """``dataset_dict`` with "image" (CHW uint8 tensor) and "height" / "width" filled in if absent."""
        ret = copy.copy(dataset_dict)
        if "image" not in ret:
            image = read_image(ret.pop("file_name"), self.input_format)
            ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if "height" not in ret or "width" not in ret:
            ret["height"], ret["width"] = ret["image"].shape[1:]
        return ret

    @contextmanager
    def _semantic_only(self):
        saved = {k: getattr(self.model, k) for k in _OTHER_OUTPUTS if hasattr(self.model, k)}
        for k in saved:
            setattr(self.model, k, False)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(self.model, k, v)

    def augmented_predictions(self, dataset_dict: Dict) -> List[torch.Tensor]:
        """The ``sem_seg`` scores of every augmented version of one image, in the original orientation and at
        the original size, in the order of the TTA mapper (per scale: as is, then flipped)."""
        inputs = self.tta_mapper(self._with_image(dataset_dict))
        predictions = []
        with torch.no_grad(), self._semantic_only():
            for aug in inputs:
                tfm = aug.pop("transforms")
                if "sem_seg" in aug:  # ground truth resized by the mapper is not an input
                    aug.pop("sem_seg")
                scores = self.model([aug])[0]
                if "sem_seg" not in scores:
                    raise KeyError(f"{type(self.model).__name__} returned {sorted(scores)}: test-time augmentation "
                                   "averages 'sem_seg' (set MODEL.MASK_FORMER.TEST.SEMANTIC_ON True)")
                scores = scores["sem_seg"]
                if any(isinstance(t, HFlipTransform) for t in tfm.transforms):
                    scores = scores.flip(dims=[2])  # (C, H, W): back to the original left-right order
                predictions.append(scores)
        return predictions

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        results = []
        for dataset_dict in batched_inputs:
            predictions = self.augmented_predictions(dataset_dict)
            results.append({"sem_seg": torch.stack(predictions).mean(dim=0)})
        return results
