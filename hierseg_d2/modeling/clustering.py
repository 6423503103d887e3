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

Both functions compute what the release's ``Clustering`` / ``cluster_based_upsampling`` compute (9 x 4
similarities, or a 9 -> 4 mixing, per 2x2 window) without gathering the candidates: the after map is laid
out channels last, zero-padded and flattened (:func:`_flat_after_map`), so the 3 candidates of one row of
a window are consecutive pixels and one strided view per candidate row serves every window; three batched
matmuls per image then do the work. The ``F.unfold`` + per-window matmul form (9 copies of the after map,
one copy of every small matrix inside ``bmm``) took 2-6x longer (docs/performance.md) but is what a trace
needs: ``torch.jit.trace`` (ONNX / TorchScript export, fvcore's FLOP count) would record the strided form's
sizes, strides and loops over the batch, so while tracing every function here runs the ``F.unfold`` form
(:func:`_unfold_local_clustering`, :func:`_unfold_decode`), whose graph holds for any input size.

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


def _to_windows(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, gh, gw, 4, C) contiguous: each after-map pixel's 2x2 window, channels last, in
    the order (0,0) (0,1) (1,0) (1,1); zero-padded at the bottom/right to 2 * grid."""
    b, c, height, width = x.shape
    gh, gw = grid
    if (height, width) != (2 * gh, 2 * gw):
        x = F.pad(x, (0, 2 * gw - width, 0, 2 * gh - height))
    return x.view(b, c, gh, 2, gw, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, gh, gw, 4, c)


def _from_windows(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_to_windows`: (B, gh, gw, 4, C) -> (B, C, H, W), cropping the padding."""
    b, gh, gw, _, c = x.shape
    x = x.view(b, gh, gw, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, 2 * gh, 2 * gw)
    return x[:, :, :size[0], :size[1]]


def _flat_after_map(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, h, w, C) channels last -> (B, (gh + 2) * gw + 2, C): zero-padded to gh + 2 rows (one above) and gw
    columns, flattened row-major, with one zero pixel at each end (see :func:`_candidates`)."""
    b, h, w, c = x.shape
    flat, inside = _empty_flat(x, b, h, c, grid)
    inside[:, :, :w] = x  # one copy (any strides); autograd sees a slice assignment
    return flat


def _empty_flat(like: torch.Tensor, b: int, h: int, c: int, grid: Tuple[int, int]):
    """A zero flat after map (see :func:`_flat_after_map`) and the (B, h, gw, C) view of its h map rows."""
    gh, gw = grid
    flat = like.new_zeros(b, (gh + 2) * gw + 2, c)
    return flat, flat[:, 1 + gw:1 + gw + h * gw].view(b, h, gw, c)


def _flat_from_windows(win: torch.Tensor, size: Tuple[int, int], grid: Tuple[int, int]) -> torch.Tensor:
    """Windows (B, gh, gw, 4, C) of an (H, W) map -> that map as the flat after map of the next finer level
    (grid ``grid``), in one copy: between decoding levels the masks never go back to (B, Q, H, W)."""
    b, gh, gw, _, c = win.shape
    height, width = size
    flat, inside = _empty_flat(win, b, height, c, grid)
    src = win.view(b, gh, gw, 2, 2, c).permute(0, 1, 3, 2, 4, 5)  # (B, gh, 2, gw, 2, C)
    if (height, width) == (2 * gh, 2 * gw):
        inside[:, :, :width].view(b, gh, 2, gw, 2, c).copy_(src)
    else:
        inside[:, :, :width] = src.reshape(b, 2 * gh, 2 * gw, c)[:, :height, :width]
    return flat


def _candidates(flat: torch.Tensor, b: int, dy: int, grid: Tuple[int, int]) -> torch.Tensor:
    """(gh * gw, 3, C) view of image b's candidates in row dy (0, 1, 2 for -1, 0, +1) of every window.

    In the flat map, candidate (dy, dx) of window n = i * gw + j is pixel n + dy * gw + dx, so the 3
    candidates of a row are consecutive and the next window starts one pixel later: a strided view, no
    copy. Without padding columns, dx = 0 at j = 0 and dx = 2 at j = gw - 1 read the neighbouring row's
    pixel instead of a zero: those entries are zeroed by :func:`_zero_wrapped`.
    """
    gh, gw = grid
    c = flat.shape[-1]
    return flat.as_strided((gh * gw, 3, c), (c, c, 1), flat.storage_offset() + (b * flat.shape[1] + dy * gw) * c)


def _zero_wrapped(t: torch.Tensor) -> torch.Tensor:
    """In place on (B, gh, gw, 4, 9): zero the entries of the candidates that wrap around a row."""
    t[:, :, 0, :, 0::3] = 0
    t[:, :, -1, :, 2::3] = 0
    return t


def _scatter_candidates(grad_flat: torch.Tensor, b: int, dy: int, grid: Tuple[int, int], g: torch.Tensor):
    """Adjoint of :func:`_candidates`: add g (gh * gw, 3, C) into image b's rows of grad_flat."""
    n = grid[0] * grid[1]
    for dx in range(3):
        start = dy * grid[1] + dx
        grad_flat[b, start:start + n] += g[:, dx]


def _window_similarity(win: torch.Tensor, flat: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw, 4, C) windows, flat after map -> (B, gh, gw, 4, 9) dot products with the 9 candidates:
    three batched matmuls (4 x C) @ (C x 3) per image, one per candidate row, reading the candidates in place."""
    b, gh, gw, _, c = win.shape
    rows = win.reshape(b, gh * gw, 4, c)
    out = torch.stack([torch.cat([torch.bmm(rows[n], _candidates(flat, n, dy, grid).transpose(1, 2))
                                  for dy in range(3)], dim=-1) for n in range(b)])
    return _zero_wrapped(out.view(b, gh, gw, 4, 9))


def _window_mix(assign: torch.Tensor, flat: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw, 4, 9) window assignments, flat after map (B, L, Q) -> (B, gh, gw, 4, Q): each window pixel's
    mix of its 9 candidates' values, three batched (4 x 3) @ (3 x Q) matmuls per image."""
    b, gh, gw = assign.shape[:3]
    rows = _zero_wrapped(assign.clone()).view(b, gh * gw, 4, 9)  # a wrapped candidate is not a parent
    out = []
    for n in range(b):
        acc = torch.bmm(rows[n, :, :, 0:3], _candidates(flat, n, 0, grid))
        for dy in (1, 2):
            acc.baddbmm_(rows[n, :, :, 3 * dy:3 * dy + 3], _candidates(flat, n, dy, grid))
        out.append(acc)
    out = out[0][None] if b == 1 else torch.stack(out)
    return out.view(b, gh, gw, 4, -1)


def _apply(function, pure, *tensors, grid):
    """``function`` (an autograd Function) when a gradient is needed, else its forward ``pure`` alone."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return function.apply(*tensors, grid)
    return pure(*tensors, grid)


class _WindowSimilarity(torch.autograd.Function):
    """:func:`_window_similarity` with its backward written out: autograd through the overlapping strided
    views of the candidates would be slow."""

    @staticmethod
    def forward(ctx, win, flat, grid):
        ctx.save_for_backward(win, flat)
        ctx.grid = grid
        return _window_similarity(win, flat, grid)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        win, flat = ctx.saved_tensors
        grid = ctx.grid
        b, gh, gw, _, c = win.shape
        grad = _zero_wrapped(grad.clone()).view(b, gh * gw, 4, 9)
        rows = win.view(b, gh * gw, 4, c)
        grad_win = torch.zeros_like(rows) if ctx.needs_input_grad[0] else None
        grad_flat = torch.zeros_like(flat) if ctx.needs_input_grad[1] else None
        for n in range(b):
            for dy in range(3):
                g = grad[n, :, :, 3 * dy:3 * dy + 3]  # (L, 4, 3)
                if grad_win is not None:
                    grad_win[n].baddbmm_(g, _candidates(flat, n, dy, grid))
                if grad_flat is not None:
                    _scatter_candidates(grad_flat, n, dy, grid, torch.bmm(g.transpose(1, 2), rows[n]))
        return None if grad_win is None else grad_win.view_as(win), grad_flat, None


class _WindowMix(torch.autograd.Function):
    """:func:`_window_mix` with its backward written out (see :class:`_WindowSimilarity`)."""

    @staticmethod
    def forward(ctx, assign, flat, grid):
        ctx.save_for_backward(_zero_wrapped(assign.clone()), flat)
        ctx.grid = grid
        return _window_mix(assign, flat, grid)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        assign, flat = ctx.saved_tensors
        grid = ctx.grid
        b, gh, gw = assign.shape[:3]
        q = flat.shape[-1]
        grad = grad.contiguous().view(b, gh * gw, 4, q)
        rows = assign.view(b, gh * gw, 4, 9)
        grad_assign = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_flat = torch.zeros_like(flat) if ctx.needs_input_grad[1] else None
        for n in range(b):
            for dy in range(3):
                cand = _candidates(flat, n, dy, grid)
                if grad_assign is not None:
                    grad_assign[n, :, :, 3 * dy:3 * dy + 3] = torch.bmm(grad[n], cand.transpose(1, 2))
                if grad_flat is not None:
                    a = rows[n, :, :, 3 * dy:3 * dy + 3]
                    _scatter_candidates(grad_flat, n, dy, grid, torch.bmm(a.transpose(1, 2), grad[n]))
        if grad_assign is not None:
            grad_assign = _zero_wrapped(grad_assign.view(b, gh, gw, 4, 9))
        return grad_assign, grad_flat, None


def _assign_windows(sims: torch.Tensor, scale: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Window similarities (B, gh, gw, 4, 9) -> assignment (B, 9, H, W): the release's masking and softmax."""
    # zero-padded (and wrapped, zeroed) candidates have a similarity of exactly 0: masked as the release does
    logits = sims / (TEMPERATURE_EPS + scale.abs()) + PADDING_MASK * (sims == 0).to(sims.dtype)
    return _from_windows(logits.softmax(dim=-1), size)


# ------------------------------------------------------------------------------------------ traced form
# Shape-generic ops only (every size is derived from a tensor's shape, no Python branch on sizes), so that a
# trace holds for any input size; equal to the strided form to float rounding (tests/modeling/test_clustering.py).
def _unfold_windows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, gh * gw, C, 4): the 2x2 windows, zero-padded to even sizes."""
    b, c, height, width = x.shape
    x = F.pad(x, (0, width % 2, 0, height % 2))
    gh, gw = x.shape[-2] // 2, x.shape[-1] // 2
    return x.reshape(b, c, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, 4)


def _unfold_unwindow(x: torch.Tensor, height, width) -> torch.Tensor:
    """(B, gh * gw, C, 4) -> (B, C, H, W): inverse of :func:`_unfold_windows`, the padding cropped."""
    b, _, c, _ = x.shape
    gh, gw = (height + 1) // 2, (width + 1) // 2
    x = x.reshape(b, gh, gw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * gh, 2 * gw)
    return x[:, :, :height, :width]


def _unfold_candidates(x: torch.Tensor, height, width) -> torch.Tensor:
    """After map (B, C, h, w) -> (B, gh * gw, C, 9): the 9 values around each window of an (H, W) before map
    (zeros outside; a floor-sized after map is padded to the grid)."""
    b, c, h, w = x.shape
    gh, gw = (height + 1) // 2, (width + 1) // 2
    x = F.pad(x, (0, gw - w, 0, gh - h))
    return F.unfold(x, kernel_size=3, padding=1).reshape(b, c, 9, gh * gw).permute(0, 3, 1, 2)


def _unfold_local_clustering(feat: torch.Tensor, down_feat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`local_clustering` as (B, L, 4, C) @ (B, L, C, 9) on gathered candidates."""
    height, width = feat.shape[-2:]
    sims = torch.matmul(_unfold_windows(feat).transpose(2, 3), _unfold_candidates(down_feat, height, width))
    logits = sims / (TEMPERATURE_EPS + scale.abs()) + PADDING_MASK * (sims == 0).to(sims.dtype)
    return _unfold_unwindow(logits.softmax(dim=-1).transpose(2, 3), height, width)


def _unfold_decode(x: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """:func:`decode` as (B, L, Q, 9) @ (B, L, 9, 4) on gathered candidates."""
    height, width = assign.shape[-2:]
    out = torch.matmul(_unfold_candidates(x, height, width), _unfold_windows(assign))
    return _unfold_unwindow(out, height, width)


def _unfold_embed(x: torch.Tensor, norm: nn.LayerNorm, proj: nn.Conv2d) -> torch.Tensor:
    """:meth:`ClusteringModule._embed` on an NCHW map (LayerNorm over channels, 1x1 conv, L2 normalisation)."""
    x = F.conv2d(norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), proj.weight)
    # F.normalize written out: torch 2.3's ONNX exporter writes its ReduceL2 wrongly at opset >= 18
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)


# ------------------------------------------------------------------------------------------- public API
def local_clustering(feat: torch.Tensor, down_feat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Soft assignment of eq. (3) restricted to the 9 local parent candidates.

    Args:
        feat: (B, C, H, W) features of the map before downsampling (already normalised as wanted).
        down_feat: (B, C, h, w) features of the map after downsampling, h in {floor, ceil}(H / 2).
        scale: scalar tensor s; the softmax temperature is 1e-8 + |s|.

    Returns:
        (B, 9, H, W) assignment probabilities in the layout described in the module docstring.
    """
    if torch.jit.is_tracing():
        return _unfold_local_clustering(feat, down_feat, scale)
    height, width = feat.shape[-2:]
    grid = _check_sizes((height, width), down_feat.shape[-2:])
    sims = _apply(_WindowSimilarity, _window_similarity, _to_windows(feat, grid),
                  _flat_after_map(down_feat.permute(0, 2, 3, 1), grid), grid=grid)
    return _assign_windows(sims, scale, (height, width))


def decode(x: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """One decoding step of eq. (5), M^(i) = A^(i) M^(i+1), with the local structure.

    Args:
        x: (B, Q, h, w) values on the after map (masks M^(i+1) or any per-cluster quantity).
        assign: (B, 9, H, W) assignment from :func:`local_clustering`.

    Returns:
        (B, Q, H, W): each pixel's probability-weighted mix of its 9 parents' values.
    """
    if torch.jit.is_tracing():
        return _unfold_decode(x, assign)
    height, width = assign.shape[-2:]
    grid = _check_sizes((height, width), x.shape[-2:])
    out = _apply(_WindowMix, _window_mix, _to_windows(assign, grid), _flat_after_map(x.permute(0, 2, 3, 1), grid),
                 grid=grid)
    return _from_windows(out, (height, width))


def decode_hierarchy(masks: torch.Tensor, assignments: Sequence[torch.Tensor]) -> torch.Tensor:
    """Decode masks through every level: ``A(first) ... A(last) M``; ``assignments`` finest first.

    Equal to :func:`decode` level by level; the intermediate masks stay in the channels-last layout.
    """
    assignments = list(assignments)
    if not assignments or torch.jit.is_tracing():
        for assign in reversed(assignments):
            masks = decode(masks, assign)
        return masks
    flat, size = None, tuple(masks.shape[-2:])
    for assign in reversed(assignments):
        height, width = assign.shape[-2:]
        grid = _check_sizes((height, width), size)
        flat = _flat_after_map(masks.permute(0, 2, 3, 1), grid) if flat is None else \
            _flat_from_windows(out, size, grid)
        out = _apply(_WindowMix, _window_mix, _to_windows(assign, grid), flat, grid=grid)
        size = (height, width)
    return _from_windows(out, size)


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
        """Channels-last (..., C) -> (..., C_F): LayerNorm, the 1x1 conv as a matmul, L2 normalisation."""
        return F.normalize(F.linear(norm(x), proj.weight.flatten(1)), dim=-1)

    def forward(self, feat: torch.Tensor, down_feat: torch.Tensor) -> torch.Tensor:
        """(B, C_b, H, W), (B, C_a, h, w) -> assignment (B, 9, H, W)."""
        if torch.jit.is_tracing():
            return _unfold_local_clustering(_unfold_embed(feat, self.norm, self.proj),
                                            _unfold_embed(down_feat, self.down_norm, self.down_proj), self.scale)
        height, width = feat.shape[-2:]
        grid = _check_sizes((height, width), down_feat.shape[-2:])
        # the before map goes straight to the window layout (one copy, which the LayerNorm needs anyway);
        # pixels padded for odd sizes get an embedding but are cropped from the result
        win = self._embed(_to_windows(feat, grid), self.norm, self.proj)
        down = self._embed(down_feat.permute(0, 2, 3, 1), self.down_norm, self.down_proj)
        sims = _apply(_WindowSimilarity, _window_similarity, win, _flat_after_map(down, grid), grid=grid)
        return _assign_windows(sims, self.scale, (height, width))
