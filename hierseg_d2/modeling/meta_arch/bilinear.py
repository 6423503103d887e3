"""Bilinear upsampling by a power-of-two factor, band of rows by band of rows, bit-identical to PyTorch's CPU
``F.interpolate(..., mode="bilinear", align_corners=False)`` of the whole stack, ~4x faster.

PyTorch's channels-first CPU kernel computes every output element on its own (~6.5 ns each here): along the
width ``t = x[j0] * l0 + (x[j1] * l1)`` and along the height ``out = t(i0) * h0 + (t(i1) * h1)``, each a fused
multiply-add, with the source indices and weights of ``area_pixel_compute_source_index`` (found by testing;
every other order of rounding differs on 17-53% of the elements). At a ratio r = 2^k these weights repeat with
period r along both axes and are exact in float, so the same arithmetic runs as whole-tensor operations per
phase (output coordinate mod r): a multiply, then ``addcmul_``, which PyTorch's vectorised CPU loop evaluates
as the same fused multiply-add. Whether the two really round alike depends on how PyTorch was built for the
CPU, so :func:`exact_upsampling_available` checks it once against ``F.interpolate`` and callers fall back to
``F.interpolate`` when it does not hold.
"""
import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["is_power_of_two", "upsample_rows", "exact_upsampling_available"]

logger = logging.getLogger(__name__)


def is_power_of_two(ratio: int) -> bool:
    return ratio >= 2 and ratio & (ratio - 1) == 0


def _phase(p: int, ratio: int):
    """Output coordinate r * i + p reads source coordinate i + f with f = (2p + 1 - r) / 2r: the offset of the
    first source index from i (-1 or 0) and the weight l1 of the second (l0 = 1 - l1), exact in float."""
    f = (2 * p + 1 - ratio) / (2 * ratio)
    return (-1, 1.0 + f) if f < 0 else (0, f)


def _combine(first: torch.Tensor, second: torch.Tensor, l0: float, l1: float, out: torch.Tensor):
    """out = first * l0 + (second * l1), the second product rounded, the sum fused (PyTorch's kernel)."""
    torch.mul(second, l1, out=out)
    out.addcmul_(first, torch.tensor(l0, dtype=out.dtype, device=out.device))


def _along_width(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """(N, m, w) -> (N, m, r * w): the width pass of every row."""
    n, m, w = x.shape
    # xp[..., k] = x[..., clamp(k - 1, 0, w - 1)]: the right pad is PyTorch's clamped second index; the left
    # pad is only read by the outputs left of the first source centre, recomputed below
    xp = torch.cat([x[..., :1], x, x[..., -1:]], -1)
    out = x.new_empty((n, m, ratio * w))
    for p in range(ratio):
        shift, l1 = _phase(p, ratio)
        _combine(xp[..., 1 + shift:1 + shift + w], xp[..., 2 + shift:2 + shift + w], 1.0 - l1, l1, out[..., p::ratio])
    # left of the first centre PyTorch clamps the source coordinate to 0: indices 0 and 1, weights 1 and 0
    for p in range(ratio // 2):
        _combine(x[..., 0], x[..., min(1, w - 1)], 1.0, 0.0, out[..., p])
    return out


def upsample_rows(x: torch.Tensor, ratio: int, y0: int, y1: int, width: int,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows ``y0:y1`` and columns ``:width`` of the ``ratio`` x bilinear upsampling (align_corners=False) of the
    (N, h, w) maps ``x``, as a (N, y1 - y0, width) tensor (written into ``out`` if given). Equal, bit for bit,
    to the same part of ``F.interpolate(x[None], scale_factor=ratio, mode="bilinear")[0]`` where
    :func:`exact_upsampling_available` says so (and PyTorch's kernel is the channels-first one: not for an
    output with H + W <= 128, nor for a stack of 3 maps on one thread)."""
    n, h, w = x.shape
    if not is_power_of_two(ratio) or not 0 <= y0 < y1 <= ratio * h or not 0 < width <= ratio * w:
        raise ValueError(f"upsample_rows: rows {y0}:{y1}, width {width} of a x{ratio} upsampling of {h}x{w} maps")
    if out is None:
        out = x.new_empty((n, y1 - y0, width))
    first, last = y0 // ratio, (y1 - 1) // ratio  # source rows i of the output rows, before the offset
    lo, hi = max(first - 1, 0), min(last + 2, h)  # the decoded rows read
    t = _along_width(x[:, lo:hi], ratio)[..., :width]
    # tp[:, k] = t at decoded row clamp(first - 1 + k): rows first - 1 .. last + 1, clamped as PyTorch does
    pad_top, pad_bottom = int(first == 0), int(last + 2 > h)
    if pad_top or pad_bottom:
        t = torch.cat([t[:, :1]] * pad_top + [t] + [t[:, -1:]] * pad_bottom, 1)
    for p in range(ratio):
        start = y0 + (p - y0) % ratio  # first output row of phase p
        if start >= y1:
            continue
        count = len(range(start, y1, ratio))
        shift, l1 = _phase(p, ratio)
        k = start // ratio - first + 1 + shift  # row of tp holding the first source row
        _combine(t[:, k:k + count], t[:, k + 1:k + 1 + count], 1.0 - l1, l1, out[:, start - y0::ratio])
    for y in range(y0, min(y1, ratio // 2)):  # above the first centre: rows 0 and 1, weights 1 and 0
        _combine(t[:, 1], t[:, 2], 1.0, 0.0, out[:, y - y0])  # t[:, 2] is row min(1, h - 1)
    return out


@functools.lru_cache(maxsize=None)
def exact_upsampling_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether :func:`upsample_rows` equals ``F.interpolate`` bit for bit with this PyTorch on this CPU (checked
    once on random maps at ratios 2, 4 and 8, whole and in odd bands). Not on GPUs, whose kernel differs."""
    if device_type != "cpu":
        return False
    x = torch.randn(5, 20, 60, generator=torch.Generator().manual_seed(0), dtype=dtype) * 8
    for ratio in (2, 4, 8):
        whole = F.interpolate(x[None], scale_factor=ratio, mode="bilinear", align_corners=False)[0]
        height, width = whole.shape[-2:]
        for bands in ((0, height), (0, 5, 6, 17, height - 1, height)):
            for y0, y1 in zip(bands[:-1], bands[1:]):
                if not torch.equal(upsample_rows(x, ratio, y0, y1, width - 3), whole[:, y0:y1, :width - 3]):
                    logger.info("Bilinear upsampling: the separable form does not round as this PyTorch's kernel "
                                "(x%d, %s); post-processing uses F.interpolate (slower, same results)", ratio, dtype)
                    return False
    return True
