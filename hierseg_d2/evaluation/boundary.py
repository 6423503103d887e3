"""Boundary IoU and Boundary AP for instance masks (Cheng et al. 2021, "Boundary IoU: Improving Object-Centric
Image Segmentation Evaluation"), as the boundary-iou-api the HCFormer / Mask2Former releases call.

* The boundary region of a mask G is the set of pixels of G within distance d of its contour, d being
  ``dilation_ratio`` (0.02 by default) of the image diagonal, rounded, at least 1 pixel. Distance is the
  chessboard distance of d iterations of a 3 x 3 erosion; pixels outside the image count as background,
  so a mask cut by the image border has a boundary there too (:func:`mask_to_boundary`).
* Boundary IoU of G and P = |G_d & P_d| / |G_d | P_d| over those regions.
* Boundary AP is COCO's mask AP with the IoU of every detection / non-crowd ground-truth pair replaced by
  min(mask IoU, boundary IoU) (crowd regions keep COCO's mask rule); areas, ranges, matching and the
  101-point precision are COCO's (:class:`BoundaryCOCOeval`, :func:`evaluate_boundary_ap`).
"""
import contextlib
import copy
import io
import logging
from typing import Dict

import cv2
import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["mask_to_boundary", "boundary_iou", "BoundaryCOCOeval", "evaluate_boundary_ap", "BOUNDARY_AP_METRICS"]

logger = logging.getLogger(__name__)

BOUNDARY_AP_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """d in pixels: ``dilation_ratio`` of the image diagonal, rounded, at least 1."""
    return max(1, int(round(dilation_ratio * np.sqrt(height ** 2 + width ** 2))))


def mask_to_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """The inner boundary region (uint8 0/1, same shape) of a binary HxW mask: mask pixels within d of a
    background pixel, the outside of the image being background."""
    if mask.ndim != 2:
        raise ValueError(f"mask_to_boundary takes an HxW mask, got shape {mask.shape}")
    mask = (mask > 0).astype(np.uint8)
    h, w = mask.shape
    d = boundary_dilation(h, w, dilation_ratio)
    # one background ring around the image: erosion then also eats the pixels near the image border
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:h + 1, 1:w + 1]
    return mask - eroded


def boundary_iou(gt: np.ndarray, pred: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU of two binary masks of the same size (1.0 if both boundaries are empty)."""
    g, p = mask_to_boundary(gt, dilation_ratio) > 0, mask_to_boundary(pred, dilation_ratio) > 0
    union = np.count_nonzero(g | p)
    return 1.0 if union == 0 else np.count_nonzero(g & p) / union


class BoundaryCOCOeval(COCOeval):
    """pycocotools' COCOeval for masks (iouType "segm") whose IoU is min(mask IoU, boundary IoU) for
    non-crowd ground truth. Boundaries are computed once per annotation (ground truth and detections)."""

    def __init__(self, coco_gt: COCO, coco_dt: COCO, dilation_ratio: float = 0.02):
        super().__init__(coco_gt, coco_dt, iouType="segm")
        self.dilation_ratio = dilation_ratio
        self._boundaries: Dict = {}

    def _boundary_rle(self, ann: dict, which: str):
        key = (which, ann["id"])
        if key not in self._boundaries:
            mask = mask_util.decode(ann["segmentation"])  # RLE after _prepare
            b = mask_to_boundary(mask, self.dilation_ratio)
            self._boundaries[key] = mask_util.encode(np.asfortranarray(b))
        return self._boundaries[key]

    def computeIoU(self, imgId, catId):
        mask_ious = super().computeIoU(imgId, catId)
        if len(mask_ious) == 0:
            return mask_ious
        p = self.params
        gt = self._gts[imgId, catId] if p.useCats else [g for c in p.catIds for g in self._gts[imgId, c]]
        dt = self._dts[imgId, catId] if p.useCats else [d for c in p.catIds for d in self._dts[imgId, c]]
        # the same detection order and cut as COCOeval.computeIoU
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][:p.maxDets[-1]]
        iscrowd = np.array([int(g["iscrowd"]) for g in gt], dtype=bool)
        b_ious = np.asarray(mask_util.iou([self._boundary_rle(d, "dt") for d in dt],
                                          [self._boundary_rle(g, "gt") for g in gt], [0] * len(gt)))
        ious = np.array(mask_ious, copy=True)
        ious[:, ~iscrowd] = np.minimum(ious[:, ~iscrowd], b_ious.reshape(ious.shape)[:, ~iscrowd])
        return ious


def evaluate_boundary_ap(coco_gt: COCO, predictions, dilation_ratio: float = 0.02, verbose: bool = True,
                         iou_type: str = "boundary", img_ids=None) -> Dict[str, float]:
    """Boundary AP (x100: AP, AP50, AP75, APs, APm, APl, and per-category "AP-<name>") of COCO-format
    instance ``predictions`` (list of {"image_id", "category_id", "segmentation": RLE, "score"}) against
    ``coco_gt``. Boxes in the predictions are ignored (the masks are what is evaluated). ``iou_type``
    "segm" gives COCO's plain mask AP through the same path, for comparison; ``img_ids`` restricts the
    evaluation to those images (default: every ground-truth image)."""
    if iou_type not in ("boundary", "segm"):
        raise ValueError(f"iou_type must be 'boundary' or 'segm', got {iou_type!r}")
    predictions = [{k: v for k, v in copy.copy(p).items() if k != "bbox"} for p in predictions]
    if not predictions:
        logger.warning("no instance predictions: Boundary AP is 0")
        return {m: 0.0 for m in BOUNDARY_AP_METRICS}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes(predictions)
        ev = BoundaryCOCOeval(coco_gt, coco_dt, dilation_ratio) if iou_type == "boundary" else \
            COCOeval(coco_gt, coco_dt, iouType="segm")
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        text = out.getvalue()
        if iou_type == "boundary":
            text = text.replace("Average Precision  (AP)", "Boundary AP")
            text = text.replace("Average Recall     (AR)", "Boundary AR")
        print(text)
    res = {m: float(100 * ev.stats[i]) if ev.stats[i] >= 0 else float("nan") for i, m in enumerate(BOUNDARY_AP_METRICS)}
    precisions = ev.eval["precision"]  # T x R x K x A x M
    for k, cat_id in enumerate(ev.params.catIds):
        p = precisions[:, :, k, 0, -1]
        p = p[p > -1]
        res["AP-" + coco_gt.loadCats(int(cat_id))[0]["name"]] = float(100 * p.mean()) if p.size else float("nan")
    return res
