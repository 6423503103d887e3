"""Hungarian matching of predicted (decoded) masks to ground-truth segments, Mask2Former's costs.

The cost of assigning query i to target j is ``cost_class * (-p_i(c_j)) + cost_mask * BCE(m_i, t_j)
+ cost_dice * dice(m_i, t_j)``, the two mask terms evaluated on the same ``num_points`` random points
for every pair (a cheap, unbiased stand-in for the full masks).
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import nn

__all__ = ["HungarianMatcher", "pairwise_sigmoid_ce", "pairwise_dice"]


def pairwise_sigmoid_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, P) logits, (M, P) binary targets -> (N, M) mean sigmoid BCE of every pair."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, P) logits, (M, P) binary targets -> (N, M) dice loss of every pair."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising class + mask BCE + dice costs.

    Args:
        cost_class, cost_mask, cost_dice: weights of the three costs (2, 5, 5 in the paper).
        num_points: points sampled uniformly per image for the mask costs.
    """

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
                 num_points: int = 112 * 112):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, labels: torch.Tensor,
                    masks: torch.Tensor) -> torch.Tensor:
        """(Q, K+1) class logits, (Q, h, w) mask logits, (T,) labels, (T, H, W) masks -> (Q, T) costs."""
        cost_class = -pred_logits.softmax(-1)[:, labels]
        coords = torch.rand(1, self.num_points, 2, device=pred_masks.device)
        tgt = point_sample(masks[:, None].to(pred_masks.dtype), coords.expand(masks.shape[0], -1, -1),
                           align_corners=False)[:, 0]
        out = point_sample(pred_masks[:, None], coords.expand(pred_masks.shape[0], -1, -1), align_corners=False)[:, 0]
        with torch.autocast(device_type=out.device.type, enabled=False):
            out, tgt = out.float(), tgt.float()
            cost = self.cost_mask * pairwise_sigmoid_ce(out, tgt) + self.cost_dice * pairwise_dice(out, tgt)
        return cost + self.cost_class * cost_class

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
                ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K+1) and "pred_masks" (B, Q, h, w) mask logits.
            targets: per image, "labels" (T,) and "masks" (T, H, W).

        Returns:
            per image (query indices, target indices), int64, of length min(Q, T).
        """
        indices = []
        for b, target in enumerate(targets):
            if len(target["labels"]) == 0:
                # draw the points anyway: the random stream then stays the release's
                torch.rand(1, self.num_points, 2, device=outputs["pred_masks"].device)
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = self.cost_matrix(outputs["pred_logits"][b], outputs["pred_masks"][b], target["labels"],
                                    target["masks"])
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def __repr__(self):
        return (f"{type(self).__name__}(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
                f"cost_dice={self.cost_dice}, num_points={self.num_points})")
