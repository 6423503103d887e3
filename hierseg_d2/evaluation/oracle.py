"""Oracle predictions: ground truth turned into Detectron2's model output format.

Feeding them through the real evaluators must give PQ = mask AP = mIoU = 100, which proves the
registration -> loader -> evaluator path end to end; a corrupted oracle must score strictly less.
"""

from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import Instances

__all__ = ["OracleModel", "oracle_outputs", "run_oracle_evaluation"]

_SHIFT = 3  # pixels every corrupted prediction is shifted by


def _panoptic_gt(record):
    from panopticapi.utils import rgb2id

    ids = rgb2id(read_image(record["pan_seg_file_name"], "RGB")).astype(np.int64)
    return ids, record["segments_info"]


def _instance_gt(record, h, w):
    from pycocotools import mask as mask_util

    classes, masks = [], []
    for a in record.get("annotations", []):
        if a.get("iscrowd", 0):
            continue
        seg = a["segmentation"]
        if isinstance(seg, list):
            seg = mask_util.merge(mask_util.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):
            seg = mask_util.frPyObjects(seg, h, w)
        masks.append(mask_util.decode(seg).astype(bool))
        classes.append(a["category_id"])
    return classes, masks


def oracle_outputs(record: Dict, num_classes: int, corrupt: bool = False) -> Dict:
    """Model outputs (Detectron2 format) equal to the ground truth of one dataset record.

    * ``panoptic_seg``: (int32 HxW segment-id tensor, segments_info with contiguous category_id and
      isthing) from ``pan_seg_file_name``;
    * ``instances``: ``pred_masks`` (N, H, W bool), ``scores`` (1.0), ``pred_classes``, from the
      panoptic thing segments or from ``annotations`` -- no ``pred_boxes`` (mask-only, like MaskFormer);
    * ``sem_seg``: (C, H, W) one-hot scores from ``sem_seg_file_name`` (ignore pixels get class 0,
      they are not evaluated).

    ``corrupt=True`` shifts every map/mask right by a few pixels (so every IoU drops below 1).
    """
    h, w = int(record["height"]), int(record["width"])

    def shift(a):
        return np.roll(a, _SHIFT, axis=1) if corrupt else a

    out = {}
    thing_classes, thing_masks = [], []
    if "pan_seg_file_name" in record:
        ids, segments = _panoptic_gt(record)
        ids = shift(ids)
        seg_info = [{"id": s["id"], "category_id": s["category_id"], "isthing": bool(s["isthing"])} for s in segments]
        known = np.isin(ids, [s["id"] for s in seg_info])
        out["panoptic_seg"] = (torch.as_tensor(np.where(known, ids, 0).astype(np.int32)), seg_info)
        for s in segments:
            if s["isthing"] and not s.get("iscrowd", 0):
                thing_classes.append(s["category_id"])
                thing_masks.append(ids == s["id"])
    elif "annotations" in record:
        thing_classes, thing_masks = _instance_gt(record, h, w)
        thing_masks = [shift(m) for m in thing_masks]
    if "pan_seg_file_name" in record or "annotations" in record:
        inst = Instances((h, w))
        inst.pred_masks = (
            torch.as_tensor(np.stack(thing_masks)) if thing_masks else torch.zeros((0, h, w), dtype=torch.bool)
        )
        inst.scores = torch.ones(len(thing_classes))
        inst.pred_classes = torch.as_tensor(thing_classes, dtype=torch.int64)
        out["instances"] = inst
    if "sem_seg_file_name" in record:
        sem = shift(read_image(record["sem_seg_file_name"]).astype(np.int64))
        sem = np.where(sem < num_classes, sem, 0)
        scores = torch.zeros((num_classes, h, w))
        scores.scatter_(0, torch.as_tensor(sem)[None], 1.0)
        out["sem_seg"] = scores
    return out


class OracleModel(nn.Module):
    """A stand-in "model" whose forward returns :func:`oracle_outputs` for each input record."""

    def __init__(self, dataset_name: str, corrupt: bool = False):
        super().__init__()
        meta = MetadataCatalog.get(dataset_name)
        self.num_classes = len(meta.get("stuff_classes", None) or meta.thing_classes)
        self.corrupt = corrupt

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        return [oracle_outputs(x, self.num_classes, self.corrupt) for x in batched_inputs]


def _with_size(record):
    if "height" not in record or "width" not in record:
        from PIL import Image

        with Image.open(record["file_name"]) as im:
            record = dict(record, width=im.width, height=im.height)
    return record


def run_oracle_evaluation(cfg, dataset_name: str, corrupt: bool = False, output_folder: Optional[str] = None):
    """Evaluate :class:`OracleModel` on ``dataset_name`` with :func:`build_evaluator` through
    Detectron2's ``inference_on_dataset``; returns its results dict."""
    from detectron2.data import DatasetCatalog, build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset

    from .build import build_evaluator

    evaluator = build_evaluator(cfg, dataset_name, output_folder)
    records = [_with_size(r) for r in DatasetCatalog.get(dataset_name)]
    # the oracle reads ground truth itself, so the loader passes records through unchanged
    loader = build_detection_test_loader(records, mapper=lambda r: r, num_workers=0)
    return inference_on_dataset(OracleModel(dataset_name, corrupt), loader, evaluator)
