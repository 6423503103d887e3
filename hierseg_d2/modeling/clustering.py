"""HCFormer's clustering module (eq. 3) and decoding (eq. 5) with the local 3x3 attention of Sec. 2.4.

Layout of an assignment tensor ``A`` (shared with the interpretability evaluator): for a "before" map of
``H x W`` and an "after" map of ``h x w``, ``A`` has shape ``(B, 9, H, W)``; channel ``k = 3 * (dy + 1) +
(dx + 1)`` with ``dy, dx`` in ``{-1, 0, 1}`` is the probability that pixel ``(y, x)`` belongs to the
after-map pixel ``(y // 2 + dy, x // 2 + dx)`` (the ``F.unfold(kernel_size=3, padding=1)`` order).
Candidates outside the after map get zero probability as in the authors' release: the after map is
zero-padded, so an outside candidate has a similarity of exactly 0, and every similarity that is exactly
0 gets -1e12 added to its logit before the softmax (its weight underflows to 0; a finite constant,
unlike -inf, keeps the gradient of s finite). A valid candidate whose similarity is exactly 0 is masked
too, as in the release. The temperature is ``1e-8 + |s|`` (release), so s = 0 gives one-hot
assignments instead of NaN.

Both functions run in batched form, as the release's ``Clustering`` / ``cluster_based_upsampling``: the
9 candidates of every 2x2 window are gathered with ``F.unfold(kernel_size=3, padding=1)`` and one
batched matmul per window does the 9 x 4 similarities (clustering) or the 9 -> 4 mixing (decoding).

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


# the release's temperature floor and the additive mask of zero-padded candidates
TEMPERATURE_EPS = 1e-8
PADDING_MASK = -1e12


def _pad_to_grid(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Zero-pad x (B, C, h, w) at the bottom/right to grid (gh, gw) (a no-op for the release's even sizes)."""
    gh, gw = grid
    return F.pad(x, (0, gw - x.shape[-1], 0, gh - x.shape[-2]))


def _candidates(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, gh * gw, C, 9): the 9 after-map values around each window (zeros outside)."""
    b, c = x.shape[:2]
    cand = F.unfold(_pad_to_grid(x, grid), kernel_size=3, padding=1)  # (B, C * 9, L), channel-major
    return cand.view(b, c, 9, -1).permute(0, 3, 1, 2)


def _windows(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, gh * gw, C, 4): the 2x2 window of each after-map pixel, (0,0) (0,1) (1,0) (1,1)."""
    b, c, height, width = x.shape
    gh, gw = grid
    x = F.pad(x, (0, 2 * gw - width, 0, 2 * gh - height))
    return x.view(b, c, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, 4)


def _unwindow(x: torch.Tensor, grid: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_windows`: (B, gh * gw, C, 4) -> (B, C, H, W), cropping the padding."""
    b, _, c, _ = x.shape
    gh, gw = grid
    x = x.view(b, gh, gw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * gh, 2 * gw)
    return x[:, :, :size[0], :size[1]]


def local_clustering(feat: torch.Tensor, down_feat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Soft assignment of eq. (3) restricted to the 9 local parent candidates.

    Args:
        feat: (B, C, H, W) features of the map before downsampling (already normalised as wanted).
        down_feat: (B, C, h, w) features of the map after downsampling, h in {floor, ceil}(H / 2).
        scale: scalar tensor s; the softmax temperature is 1e-8 + |s|.

    Returns:
        (B, 9, H, W) assignment probabilities in the layout described in the module docstring.
    """
    height, width = feat.shape[-2:]
    grid = _check_sizes((height, width), down_feat.shape[-2:])
    # (B, L, 4, C) @ (B, L, C, 9): similarity of each window pixel with its 9 candidates
    sims = torch.matmul(_windows(feat, grid).transpose(2, 3), _candidates(down_feat, grid))
    # zero-padded candidates have a similarity of exactly 0: masked as the release does
    logits = sims / (TEMPERATURE_EPS + scale.abs()) + PADDING_MASK * (sims == 0).to(sims.dtype)
    assign = logits.softmax(dim=-1)  # (B, L, 4, 9)
    return _unwindow(assign.transpose(2, 3), grid, (height, width))


def decode(x: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """One decoding step of eq. (5), M^(i) = A^(i) M^(i+1), with the local structure.

    Args:
        x: (B, Q, h, w) values on the after map (masks M^(i+1) or any per-cluster quantity).
        assign: (B, 9, H, W) assignment from :func:`local_clustering`.

    Returns:
        (B, Q, H, W): each pixel's probability-weighted mix of its 9 parents' values.
    """
    height, width = assign.shape[-2:]
    grid = _check_sizes((height, width), x.shape[-2:])
    # (B, L, Q, 9) @ (B, L, 9, 4): each window pixel mixes its 9 parents' values
    out = torch.matmul(_candidates(x, grid), _windows(assign, grid))
    return _unwindow(out, grid, (height, width))


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
    """Eq. (3): pre-LayerNorm + bias-free 1x1 conv to C_F on both maps, L2 normalisation, local softmax
    with temperature 1e-8 + |s| (the release's ``Clustering``: same layers, xavier-normal conv init).

    Args:
        before_channels: channels of F^(i), the map before the downsampling layer.
        after_channels: channels of F_d^(i), the map right after it.
        cluster_dim: C_F (128 in the paper).
        scale_init: initial value of the trainable scale s^(i) (0.1 in the paper and the release's configs).
    """

    def __init__(self, before_channels: int, after_channels: int, cluster_dim: int = 128, scale_init: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(before_channels)
        self.proj = nn.Conv2d(before_channels, cluster_dim, kernel_size=1, bias=False)
        self.down_norm = nn.LayerNorm(after_channels)
        self.down_proj = nn.Conv2d(after_channels, cluster_dim, kernel_size=1, bias=False)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        nn.init.xavier_normal_(self.proj.weight)
        nn.init.xavier_normal_(self.down_proj.weight)

    @staticmethod
    def _embed(x: torch.Tensor, norm: nn.LayerNorm, proj: nn.Conv2d) -> torch.Tensor:
        x = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels
        return F.normalize(proj(x), dim=1)

    def forward(self, feat: torch.Tensor, down_feat: torch.Tensor) -> torch.Tensor:
        """(B, C_b, H, W), (B, C_a, h, w) -> assignment (B, 9, H, W)."""
        return local_clustering(self._embed(feat, self.norm, self.proj),
                                self._embed(down_feat, self.down_norm, self.down_proj), self.scale)
