"""HCFormer's training loss (Sec. 4.1): Mask2Former's set criterion on the decoded masks, plus the
regulariser on the clustering scales s^(i) that pushes the clustering towards hard assignments: by default
the release's ``|sum_i s^(i)|`` (its ``loss_l1``), optionally the paper's ``sum_i |s^(i)|`` (Sec. 4.1).

Losses: "labels" (cross-entropy, no-object class down-weighted), "masks" (sigmoid BCE and dice on
importance-sampled points, Mask2Former/PointRend style) and "scale" (key "loss_scale"). With deep supervision the first two are repeated on every "aux_outputs" entry with the
suffix "_<i>". Each loss is returned unweighted; ``weight_dict`` holds the weights the meta-arch applies.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils.comm import get_world_size
from torch import nn

__all__ = ["SetCriterion", "sigmoid_ce_loss", "dice_loss", "calculate_uncertainty"]


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """(N, P) logits and targets -> mean BCE per mask, summed over masks and divided by ``num_masks``."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """(N, P) logits and targets -> dice loss (+1 smoothing) summed over masks, divided by ``num_masks``."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of (N, 1, ...) mask logits: -|logit|, highest at the decision boundary."""
    return -logits.abs()


class SetCriterion(nn.Module):
    """Hungarian-matched set loss on decoded masks, with point sampling and deep supervision.

    Args:
        num_classes: K (the no-object class is index K).
        matcher: a :class:`HungarianMatcher`.
        weight_dict: loss name -> weight (used by the meta-arch; kept here like Mask2Former).
        eos_coef: cross-entropy weight of the no-object class (0.1).
        losses: which of "labels", "masks", "scale" to compute.
        num_points, oversample_ratio, importance_sample_ratio: point sampling (112*112, 3, 0.75).
        scale_loss: "release" (|sum_i s^(i)|) or "paper" (sum_i |s^(i)|).
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float], eos_coef: float,
                 losses: Sequence[str], num_points: int, oversample_ratio: float, importance_sample_ratio: float,
                 scale_loss: str = "release"):
        super().__init__()
        if scale_loss not in ("release", "paper"):
            raise ValueError(f"SetCriterion: MODEL.HCFORMER.SCALE_LOSS={scale_loss!r}; expected 'release' or 'paper'")
        self.scale_loss = scale_loss
        unknown = set(losses) - {"labels", "masks", "scale"}
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, targets, indices, num_masks):
        logits = outputs["pred_logits"].float()
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        batch_idx, src_idx = self._src_permutation(indices)
        target_classes[batch_idx, src_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}

    def loss_masks(self, outputs, targets, indices, num_masks):
        batch_idx, src_idx = self._src_permutation(indices)
        src_masks = outputs["pred_masks"][batch_idx, src_idx][:, None]  # (N, 1, h, w)
        tgt_masks = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)])[:, None].to(src_masks)
        if src_masks.shape[0] == 0:
            zero = outputs["pred_masks"].sum() * 0.0  # keeps the graph connected
            return {"loss_mask": zero, "loss_dice": zero}
        with torch.no_grad():
            # oversample, keep the most uncertain points plus random ones (importance sampling)
            coords = get_uncertain_point_coords_with_randomness(
                src_masks.float(), calculate_uncertainty, self.num_points, self.oversample_ratio,
                self.importance_sample_ratio)
            point_labels = point_sample(tgt_masks.float(), coords, align_corners=False)[:, 0]
        point_logits = point_sample(src_masks.float(), coords, align_corners=False)[:, 0]
        return {"loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
                "loss_dice": dice_loss(point_logits, point_labels, num_masks)}

    def loss_scale(self, outputs) -> Dict[str, torch.Tensor]:
        scales = outputs.get("cluster_scales", [])
        if len(scales) == 0:
            return {"loss_scale": outputs["pred_logits"].sum() * 0.0}
        if self.scale_loss == "release":  # the release sums the s^(i) first, then takes |.|
            return {"loss_scale": sum(s.sum() for s in scales).abs()}
        return {"loss_scale": sum(s.abs().sum() for s in scales)}

    @staticmethod
    def _src_permutation(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def _num_masks(self, targets, device) -> float:
        num = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if get_world_size() > 1:  # average over workers so every rank normalises alike
            torch.distributed.all_reduce(num)
        return max(num.item() / get_world_size(), 1.0)

    def _set_losses(self, outputs, targets, num_masks) -> Dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        losses = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(outputs, targets, indices, num_masks))
        if "masks" in self.losses:
            losses.update(self.loss_masks(outputs, targets, indices, num_masks))
        return losses

    def forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: "pred_logits", "pred_masks" (decoded mask logits), optional "aux_outputs" and
                "cluster_scales" (the s^(i) parameters).
            targets: per image "labels" (T,) and "masks" (T, H, W) on the padded image.
        """
        num_masks = self._num_masks(targets, outputs["pred_logits"].device)
        losses = self._set_losses(outputs, targets, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self._set_losses(aux, targets, num_masks).items()})
        if "scale" in self.losses:
            losses.update(self.loss_scale(outputs))
        return losses

    def __repr__(self):
        return (f"{type(self).__name__}(num_classes={self.num_classes}, losses={self.losses}, "
                f"eos_coef={self.eos_coef}, num_points={self.num_points}, matcher={self.matcher!r})")
