"""MaskFormer post-processing (HCFormer App. E) from one image's class logits and decoded mask logits.

Each pixel goes to the query maximising p_i(c_i) * m_i(pixel) among queries whose most likely class
c_i is not "no object", i.e. the clustering problem of eq. (2) with the queries as prototypes.
"""
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Boxes, Instances

__all__ = ["semantic_inference", "panoptic_inference", "instance_inference", "postprocess_image"]


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
    return _panoptic_from_probs(scores[keep], labels[keep], mask_pred[keep].sigmoid(), thing_ids,
                                overlap_threshold, tuple(mask_pred.shape[-2:]), mask_pred.device)


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


def _resize(logits: torch.Tensor, padded_size: Tuple[int, int], image_size: Tuple[int, int],
            out_size: Tuple[int, int]) -> torch.Tensor:
    """(N, h, w) decoded logits -> (N, H, W) at the output size: the upsampling to the padded size, the crop
    and the resize of Detectron2's sem_seg_postprocess, the last skipped when it is the identity (bilinear
    with align_corners=False at scale 1 copies its input)."""
    x = F.interpolate(logits[None], size=padded_size, mode="bilinear", align_corners=False)
    x = x[:, :, :image_size[0], :image_size[1]]
    if tuple(x.shape[-2:]) != tuple(out_size):
        x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)
    return x[0]


def _panoptic_from_probs(cur_scores: torch.Tensor, cur_classes: torch.Tensor, cur_masks: torch.Tensor,
                         thing_ids: Optional[Set[int]], overlap_threshold: float, size: Tuple[int, int],
                         device) -> Tuple[torch.Tensor, List[Dict]]:
    panoptic_seg = torch.zeros(size, dtype=torch.int32, device=device)
    segments_info: List[Dict] = []
    if cur_masks.shape[0] == 0:
        return panoptic_seg, segments_info
    winner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_segment = {}
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k])
        isthing = thing_ids is None or pred_class in thing_ids
        own = cur_masks[k] >= 0.5
        won = winner == k
        mask = won & own
        mask_area, original_area = int(won.sum()), int(own.sum())
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


def postprocess_image(mask_cls: torch.Tensor, mask_logits: torch.Tensor, padded_size: Tuple[int, int],
                      image_size: Tuple[int, int], out_size: Tuple[int, int], *, semantic_on: bool,
                      panoptic_on: bool, instance_on: bool, thing_ids: Optional[Set[int]] = None,
                      object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8, topk: int = 100,
                      chunk: int = 16) -> Dict:
    """The three outputs of one image from its (Q, K+1) class logits and (Q, h, w) decoded mask logits, equal
    to resizing every mask to ``out_size`` (upsample to ``padded_size``, crop to ``image_size``, resize) and
    calling :func:`semantic_inference`, :func:`panoptic_inference`, :func:`instance_inference`, but cheaper:

    - each query's mask is resized and passed through the sigmoid once, ``chunk`` queries at a time, into
      one (Q, H, W) probability buffer when the semantic output is on (its sum over queries is one matrix
      product, as in :func:`semantic_inference`: accumulating it per chunk measured 2-3x slower) and into a
      buffer of the used queries only otherwise; no full-resolution logits of all queries exist;
    - panoptic and instance outputs keep the full-resolution masks of the queries they use only (those
      above the object threshold, and those of the top-k (query, class) pairs); the instance masks, boxes
      and scores are computed once per query, then gathered per pair.
    """
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[-1] - 1
    mask_cls = mask_cls.to(mask_logits)
    probs = F.softmax(mask_cls, dim=-1)
    device = mask_logits.device
    needed = []
    if panoptic_on:
        scores, labels = probs.max(-1)
        keep = labels.ne(num_classes) & (scores > object_mask_threshold)
        needed.append(keep.nonzero()[:, 0])
    if instance_on:
        class_scores = probs[:, :-1]
        pair_labels = torch.arange(num_classes, device=device).repeat(num_queries)
        pair_scores, topk_indices = class_scores.flatten().topk(min(topk, class_scores.numel()), sorted=False)
        pair_labels = pair_labels[topk_indices]
        pair_queries = topk_indices // num_classes
        if thing_ids is not None:
            is_thing = torch.tensor([int(c) in thing_ids for c in pair_labels], dtype=torch.bool, device=device)
            pair_scores, pair_labels, pair_queries = pair_scores[is_thing], pair_labels[is_thing], pair_queries[is_thing]
        needed.append(pair_queries)
    needed = torch.unique(torch.cat(needed)) if needed else torch.zeros(0, dtype=torch.long, device=device)
    # the semantic scores sum over every query: then all probabilities are kept (one buffer, filled chunk by
    # chunk, then one product as in semantic_inference); otherwise only those of the queries used
    order = torch.arange(num_queries, device=device) if semantic_on else needed
    slot = torch.full((num_queries,), -1, dtype=torch.long, device=device)  # row of a query in kept_probs
    slot[order] = torch.arange(order.numel(), device=device)
    height, width = out_size
    kept_probs = mask_logits.new_empty((order.numel(), height, width))
    if instance_on:  # logits > 0 (not probabilities > 0.5: the sigmoid rounds to 0.5 near 0)
        positive = torch.empty((needed.numel(), height, width), dtype=torch.bool, device=device)
        needed_row = torch.full((num_queries,), -1, dtype=torch.long, device=device)
        needed_row[needed] = torch.arange(needed.numel(), device=device)
    for start in range(0, order.numel(), chunk):
        queries = order[start:start + chunk]
        logits = _resize(mask_logits[queries], padded_size, image_size, out_size)
        torch.sigmoid(logits, out=kept_probs[start:start + queries.numel()])
        if instance_on:
            rows = needed_row[queries]
            sel = rows >= 0
            positive[rows[sel]] = logits[sel] > 0
    result = {}
    if semantic_on:
        result["sem_seg"] = torch.einsum("qc,qhw->chw", probs[:, :-1], kept_probs)
    if panoptic_on:
        result["panoptic_seg"] = _panoptic_from_probs(scores[keep], labels[keep], kept_probs[slot[keep]], thing_ids,
                                                      overlap_threshold, (height, width), device)
    if instance_on:
        masks = positive.float()
        boxes = BitMasks(positive).get_bounding_boxes().tensor
        area = masks.flatten(1).sum(1)
        # one query at a time: no (N, H, W) product temporary
        inside = [(kept_probs[slot[q]] * masks[i]).sum() for i, q in enumerate(needed.tolist())]
        mask_scores = (torch.stack(inside) if inside else area.new_zeros(0)) / (area + 1e-6)
        rows = needed_row[pair_queries]
        inst = Instances((height, width))
        inst.pred_masks = masks[rows]
        inst.pred_boxes = Boxes(boxes[rows])
        inst.scores = pair_scores * mask_scores[rows]
        inst.pred_classes = pair_labels
        result["instances"] = inst
    return result
