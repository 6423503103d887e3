"""MaskFormer post-processing (HCFormer App. E) from one image's class logits and decoded mask logits.

Each pixel goes to the query maximising p_i(c_i) * m_i(pixel) among queries whose most likely class
c_i is not "no object", i.e. the clustering problem of eq. (2) with the queries as prototypes.
"""
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Instances

__all__ = ["semantic_inference", "panoptic_inference", "instance_inference"]


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """(Q, K+1) logits, (Q, H, W) mask logits -> (K, H, W) per-class scores sum_i p_i(c) m_i."""
    return torch.einsum("qc,qhw->chw", F.softmax(mask_cls, dim=-1)[..., :-1], mask_pred.sigmoid())


def panoptic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, thing_ids: Optional[Set[int]],
                       object_mask_threshold: float, overlap_threshold: float
                       ) -> Tuple[torch.Tensor, List[Dict]]:
    """Panoptic segmentation in Detectron2's format: (H, W) int32 segment ids (0 = void) and segments_info.

    Queries scoring below ``object_mask_threshold`` or predicting "no object" are dropped; a query keeps
    the pixels it wins (and where its mask is >= 0.5) only if they are at least ``overlap_threshold`` of
    its own mask; stuff queries of the same class are merged into one segment. ``thing_ids`` are the
    contiguous ids of thing classes (None: every class is a thing).
    """
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep].sigmoid()
    height, width = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=mask_pred.device)
    segments_info: List[Dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info
    winner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_segment = {}
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k])
        isthing = thing_ids is None or pred_class in thing_ids
        own = cur_masks[k] >= 0.5
        mask = (winner == k) & own
        mask_area, original_area = int((winner == k).sum()), int(own.sum())
        if mask_area == 0 or original_area == 0 or int(mask.sum()) == 0:
            continue
        if mask_area / original_area < overlap_threshold:
            continue
        if not isthing and pred_class in stuff_segment:
            panoptic_seg[mask] = stuff_segment[pred_class]
            continue
        segment_id = len(segments_info) + 1
        if not isthing:
            stuff_segment[pred_class] = segment_id
        panoptic_seg[mask] = segment_id
        segments_info.append({"id": segment_id, "isthing": bool(isthing), "category_id": pred_class})
    return panoptic_seg, segments_info


def instance_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, topk: int,
                       thing_ids: Optional[Set[int]] = None) -> Instances:
    """Top-k (query, class) pairs as Detectron2 Instances with pred_masks, pred_boxes, scores, pred_classes.

    The score is the class probability times the mean mask probability inside the binary mask;
    ``thing_ids`` (panoptic datasets) drops stuff classes.
    """
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[-1] - 1
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]
    labels = torch.arange(num_classes, device=mask_cls.device).repeat(num_queries)
    scores_per_image, topk_indices = scores.flatten().topk(min(topk, scores.numel()), sorted=False)
    labels_per_image = labels[topk_indices]
    mask_pred = mask_pred[topk_indices // num_classes]
    if thing_ids is not None:
        keep = torch.tensor([int(c) in thing_ids for c in labels_per_image], dtype=torch.bool,
                            device=mask_cls.device)
        scores_per_image, labels_per_image = scores_per_image[keep], labels_per_image[keep]
        mask_pred = mask_pred[keep]
    result = Instances(tuple(mask_pred.shape[-2:]))
    binary = mask_pred > 0
    result.pred_masks = binary.float()
    result.pred_boxes = BitMasks(binary).get_bounding_boxes()
    area = result.pred_masks.flatten(1).sum(1)
    mask_scores = (mask_pred.sigmoid() * result.pred_masks).flatten(1).sum(1) / (area + 1e-6)
    result.scores = scores_per_image * mask_scores
    result.pred_classes = labels_per_image
    return result
