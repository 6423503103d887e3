"""COCOEvaluator for mask-only predictions."""

import torch

from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BitMasks

__all__ = ["MaskOnlyCOCOEvaluator", "add_boxes_from_masks"]


def add_boxes_from_masks(instances):
    """Give ``instances`` the tight boxes of their ``pred_masks`` when they have no ``pred_boxes``.

    Detectron2's ``instances_to_coco_json`` reads ``pred_boxes`` for every result even when only
    "segm" is evaluated; mask-classification models (MaskFormer, HCFormer) predict masks only. The
    boxes do not influence segm AP (it matches masks), they only make the json complete.
    """
    if instances.has("pred_masks") and not instances.has("pred_boxes"):
        masks = instances.pred_masks
        if not isinstance(masks, torch.Tensor):  # e.g. BitMasks
            masks = masks.tensor
        instances.pred_boxes = BitMasks(masks > 0.5 if masks.is_floating_point() else masks).get_bounding_boxes()
    return instances


class MaskOnlyCOCOEvaluator(COCOEvaluator):
    """:class:`COCOEvaluator` that accepts ``instances`` without ``pred_boxes`` (see
    :func:`add_boxes_from_masks`); use it with ``tasks=("segm",)``."""

    def process(self, inputs, outputs):
        outputs = [
            dict(o, instances=add_boxes_from_masks(o["instances"].to(self._cpu_device))) if "instances" in o else o
            for o in outputs
        ]
        super().process(inputs, outputs)
