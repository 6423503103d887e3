"""HCFormer's clustering module (eq. 3) and decoding (eq. 5) with the local 3x3 attention of Sec. 2.4.

Layout of an assignment tensor ``A`` (shared with the interpretability evaluator): for a "before" map of
``H x W`` and an "after" map of ``h x w``, ``A`` has shape ``(B, 9, H, W)``; channel ``k = 3 * (dy + 1) +
(dx + 1)`` with ``dy, dx`` in ``{-1, 0, 1}`` is the probability that pixel ``(y, x)`` belongs to the
after-map pixel ``(y // 2 + dy, x // 2 + dx)`` (the ``F.unfold(kernel_size=3, padding=1)`` order).
Candidates outside the after map get exactly zero probability: their similarity is set to ``-inf``
before the softmax (zero-padding the features instead would give them a cosine similarity of 0 and
thus a positive probability).

Odd sizes: the after map may have ``ceil(H / 2)`` or ``floor(H / 2)`` rows (likewise columns). The
before map is zero-padded at the bottom/right to ``2 * ceil(H / 2)`` so that it splits into 2x2
windows, window ``(i, j)`` is centred on after-map pixel ``(i, j)``, and the padded row/column is
cropped from the result. With ``floor``, the last odd row's own parent ``(H // 2)`` does not exist, so
it is assigned among the existing candidates above it (``dy = -1``) only.
"""
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OFFSETS",
    "ClusteringModule",
    "local_clustering",
    "decode",
    "decode_hierarchy",
    "hard_parents",
    "compose_hard_assignments",
]

# (dy, dx) of the 9 parent candidates in F.unfold(kernel_size=3, padding=1) order
OFFSETS: Tuple[Tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _check_sizes(before_hw: Sequence[int], after_hw: Sequence[int]) -> Tuple[int, int]:
    """Return the window grid (ceil(H/2), ceil(W/2)) after checking the after map fits the before map."""
    grid = []
    for n, m, axis in zip(before_hw, after_hw, ("height", "width")):
        if m < 1 or m not in (n // 2, (n + 1) // 2):
            raise ValueError(f"clustering: an after map of {axis} {m} does not match a before map of {axis} "
                             f"{n}; expected floor or ceil of {n}/2 (and at least 1)")
        grid.append((n + 1) // 2)
    return grid[0], grid[1]


def _candidate_validity(after_hw: Tuple[int, int], grid: Tuple[int, int], device) -> torch.Tensor:
    """(9, gh, gw) bool: whether candidate k of window (i, j) lies inside the after map."""
    h, w = after_hw
    i = torch.arange(grid[0], device=device).view(-1, 1)
    j = torch.arange(grid[1], device=device).view(1, -1)
    return torch.stack([((i + dy >= 0) & (i + dy < h) & (j + dx >= 0) & (j + dx < w)) for dy, dx in OFFSETS])


def _shifted_candidates(x: torch.Tensor, grid: Tuple[int, int]):
    """Yield, for each of the 9 offsets, the after-map values at (i + dy, j + dx) on the window grid.

    Out-of-map positions read zeros; callers either mask them (clustering) or multiply them by a zero
    probability (decoding). Slices of one padded tensor: no 9x copy of ``x``.
    """
    gh, gw = grid
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1 + gw - w, 1, 1 + gh - h))
    for dy, dx in OFFSETS:
        yield padded[..., 1 + dy:1 + dy + gh, 1 + dx:1 + dx + gw]


def local_clustering(feat: torch.Tensor, down_feat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Soft assignment of eq. (3) restricted to the 9 local parent candidates.

    Args:
        feat: (B, C, H, W) features of the map before downsampling (already normalised as wanted).
        down_feat: (B, C, h, w) features of the map after downsampling, h in {floor, ceil}(H / 2).
        scale: scalar tensor s; the softmax temperature is |s|.

    Returns:
        (B, 9, H, W) assignment probabilities in the layout described in the module docstring.
    """
    b, c, height, width = feat.shape
    grid = _check_sizes((height, width), down_feat.shape[-2:])
    gh, gw = grid
    feat = F.pad(feat, (0, 2 * gw - width, 0, 2 * gh - height))
    windows = feat.reshape(b, c, gh, 2, gw, 2)
    sims = torch.stack([torch.einsum("bciyjx,bcij->biyjx", windows, cand)
                        for cand in _shifted_candidates(down_feat, grid)], dim=1)  # (B, 9, gh, 2, gw, 2)
    valid = _candidate_validity(tuple(down_feat.shape[-2:]), grid, feat.device)
    # divide before masking: -inf / |s| would give a NaN gradient for s
    logits = (sims / scale.abs()).masked_fill(~valid.view(1, 9, gh, 1, gw, 1), float("-inf"))
    assign = logits.softmax(dim=1)
    return assign.reshape(b, 9, 2 * gh, 2 * gw)[:, :, :height, :width]


def decode(x: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """One decoding step of eq. (5), M^(i) = A^(i) M^(i+1), with the local structure.

    Args:
        x: (B, Q, h, w) values on the after map (masks M^(i+1) or any per-cluster quantity).
        assign: (B, 9, H, W) assignment from :func:`local_clustering`.

    Returns:
        (B, Q, H, W): each pixel's probability-weighted mix of its 9 parents' values.
    """
    b, _, height, width = assign.shape
    grid = _check_sizes((height, width), x.shape[-2:])
    gh, gw = grid
    assign = F.pad(assign, (0, 2 * gw - width, 0, 2 * gh - height)).reshape(b, 9, gh, 2, gw, 2)
    out = 0
    for k, cand in enumerate(_shifted_candidates(x, grid)):
        out = out + assign[:, None, k] * cand[:, :, :, None, :, None]
    return out.reshape(b, x.shape[1], 2 * gh, 2 * gw)[:, :, :height, :width]


def decode_hierarchy(masks: torch.Tensor, assignments: Sequence[torch.Tensor]) -> torch.Tensor:
    """Decode masks through every level: ``A(first) ... A(last) M``; ``assignments`` finest first."""
    for assign in reversed(list(assignments)):
        masks = decode(masks, assign)
    return masks


def hard_parents(assign: torch.Tensor, after_hw: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W) long: flat index ``y' * w + x'`` of each pixel's most likely parent in the after map."""
    height, width = assign.shape[-2:]
    h, w = after_hw
    _check_sizes((height, width), (h, w))
    k = assign.argmax(dim=1)
    offsets = torch.tensor(OFFSETS, device=assign.device)
    dy, dx = offsets[k, 0], offsets[k, 1]
    ys = torch.arange(height, device=assign.device).view(-1, 1) // 2 + dy
    xs = torch.arange(width, device=assign.device).view(1, -1) // 2 + dx
    # argmax never picks a masked candidate, so the clamp only guards against all-NaN inputs
    return ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)


def compose_hard_assignments(assignments: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Hard hierarchical clustering: per-level integer cluster ids at the finest resolution.

    Args:
        assignments: soft assignments, finest first, each (B, 9, H_i, W_i) or unbatched (9, H_i, W_i);
            the after map of level i must be the before map of level i + 1 (H_{i+1} x W_{i+1}).
            The after map of the last level is taken to be ceil(H_last / 2) x ceil(W_last / 2).

    Returns:
        One long tensor per level, (B, H_0, W_0) (or (H_0, W_0) if unbatched): entry ``[l][y, x]`` is the
        flat index (row-major on level l's after map) of the cluster that finest pixel (y, x) ends up in
        after taking the argmax at levels 0..l (the hard clustering of eq. 2 composed down).
    """
    if len(assignments) == 0:
        return []
    unbatched = assignments[0].dim() == 3
    assignments = [a[None] if unbatched else a for a in assignments]
    sizes = [tuple(a.shape[-2:]) for a in assignments]
    after = sizes[1:] + [tuple(math.ceil(n / 2) for n in sizes[-1])]
    ids, out = None, []
    for assign, after_hw in zip(assignments, after):
        parents = hard_parents(assign, after_hw).flatten(1)  # (B, H_l * W_l)
        ids = parents.view_as(assign[:, 0]) if ids is None else torch.gather(parents, 1, ids.flatten(1)).view_as(ids)
        out.append(ids[0] if unbatched else ids)
    return out


class ClusteringModule(nn.Module):
    """Eq. (3): LayerNorm + 1x1 conv to C_F on both maps, L2 normalisation, local softmax with |s|.

    Args:
        before_channels: channels of F^(i), the map before the downsampling layer.
        after_channels: channels of F_d^(i), the map right after it.
        cluster_dim: C_F (128 in the paper).
        scale_init: initial value of the trainable scale s^(i) (0.1 in the paper).
    """

    def __init__(self, before_channels: int, after_channels: int, cluster_dim: int = 128, scale_init: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(before_channels)
        self.proj = nn.Conv2d(before_channels, cluster_dim, kernel_size=1)
        self.down_norm = nn.LayerNorm(after_channels)
        self.down_proj = nn.Conv2d(after_channels, cluster_dim, kernel_size=1)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    @staticmethod
    def _embed(x: torch.Tensor, norm: nn.LayerNorm, proj: nn.Conv2d) -> torch.Tensor:
        x = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels
        return F.normalize(proj(x), dim=1)

    def forward(self, feat: torch.Tensor, down_feat: torch.Tensor) -> torch.Tensor:
        """(B, C_b, H, W), (B, C_a, h, w) -> assignment (B, 9, H, W)."""
        return local_clustering(self._embed(feat, self.norm, self.proj),
                                self._embed(down_feat, self.down_norm, self.down_proj), self.scale)
