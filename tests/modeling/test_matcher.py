"""HungarianMatcher against a brute-force search over all query->target assignments."""
import itertools

import torch
import torch.nn.functional as F

from hierseg_d2.modeling.matcher import HungarianMatcher


def dense_cost(logits, masks, labels, tgt, w_class, w_mask, w_dice):
    """Cost of one (query, target) pair over all pixels, written out directly."""
    p = masks.sigmoid()
    bce = F.binary_cross_entropy(p, tgt)
    dice = 1 - (2 * (p * tgt).sum() + 1) / (p.sum() + tgt.sum() + 1)
    return -w_class * logits.softmax(-1)[labels] + w_mask * bce + w_dice * dice


def brute_force(cost_fn, num_queries, num_targets):
    best = None
    for perm in itertools.permutations(range(num_queries), num_targets):
        total = sum(float(cost_fn(q, t)) for t, q in enumerate(perm))
        best = min(best, (total, perm)) if best else (total, perm)
    return best


def _toy(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_targets, k = 5, 3, 4
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centers = torch.rand(num_targets, 2, generator=g) * 16
    tgt = torch.stack([((ys - cy) ** 2 + (xs - cx) ** 2 < 20).float() for cy, cx in centers])
    # predictions: smooth blobs (bilinear sampling of them is close to the pixel values)
    pc = torch.rand(num_queries, 2, generator=g) * 16
    masks = torch.stack([4 - ((ys - cy) ** 2 + (xs - cx) ** 2) / 8 for cy, cx in pc])
    logits = torch.randn(num_queries, k + 1, generator=g)
    labels = torch.randint(0, k, (num_targets,), generator=g)
    return logits, masks, labels, tgt


def _outputs(logits, masks):
    return {"pred_logits": logits[None], "pred_masks": masks[None]}


def test_matches_brute_force_class_only_exactly():
    logits, masks, labels, tgt = _toy(0)
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=0.0, cost_dice=0.0, num_points=16)
    (rows, cols), = matcher(_outputs(logits, masks), [{"labels": labels, "masks": tgt}])
    _, perm = brute_force(lambda q, t: -logits.softmax(-1)[q, labels[t]], 5, 3)
    assert dict(zip(cols.tolist(), rows.tolist())) == dict(enumerate(perm))


def test_matches_brute_force_with_mask_costs():
    torch.manual_seed(0)
    # seed 2: the optimum beats the runner-up by ~10% of the dense cost and differs from a greedy
    # per-target choice, so sampling noise cannot flip it but a non-optimal assignment is caught
    logits, masks, labels, tgt = _toy(2)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=112 * 112)
    (rows, cols), = matcher(_outputs(logits, masks), [{"labels": labels, "masks": tgt}])
    cost = lambda q, t: dense_cost(logits[q], masks[q], labels[t], tgt[t], 2.0, 5.0, 5.0)
    _, perm = brute_force(cost, 5, 3)
    greedy = tuple(min(range(5), key=lambda q: float(cost(q, t))) for t in range(3))
    assert greedy != perm
    assert dict(zip(cols.tolist(), rows.tolist())) == dict(enumerate(perm))


def test_no_targets():
    matcher = HungarianMatcher(1, 1, 1, num_points=8)
    (rows, cols), = matcher({"pred_logits": torch.randn(1, 3, 3), "pred_masks": torch.randn(1, 3, 4, 4)},
                            [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 4, 4)}])
    assert rows.numel() == 0 and cols.numel() == 0
