"""DCNv2 (``torchvision.ops.deform_conv2d``) for export.

Two ways to put a modulated deformable conv into an ONNX graph:

* ``"deformconv"``: the ONNX ``DeformConv`` op (opset 19), via a symbolic registered for
  ``torchvision::deform_conv2d``. It is the op's natural form, but onnxruntime has no kernel for it
  (checked with onnxruntime 1.23.2 on CPU: ``NOT_IMPLEMENTED ... DeformConv(19)``), so such a model runs
  only in runtimes that implement the op.
* ``"grid_sample"``: the same computation from standard ops, :func:`deform_conv2d_grid_sample` (bilinear
  sampling of every kernel tap with ``grid_sample``, modulation, one matmul with the weight). Exact up to
  float rounding of the sampling coordinates (tested against torchvision), and runs in onnxruntime.

:func:`dcn_implementation` swaps the implementation inside hierseg_d2's backbones for the duration of an
export, without touching the model code.
"""
import contextlib
import io
import sys
import warnings
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch.nn.modules.utils import _pair

__all__ = ["DCN_MODES", "deform_conv2d_grid_sample", "dcn_implementation", "register_deformconv_symbolic",
           "uses_deform_conv", "onnxruntime_supports_deformconv", "DEFORMCONV_OPSET"]

DCN_MODES = ("auto", "grid_sample", "deformconv")
DEFORMCONV_OPSET = 19  # ONNX DeformConv exists from opset 19


def deform_conv2d_grid_sample(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor] = None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` (same arguments and offset/mask layout) from standard ops.

    Tap (i, j) of output pixel (y, x) samples the input at ``(y * stride - pad + i * dilation + dy,
    x * stride - pad + j * dilation + dx)`` bilinearly, corners outside the image reading 0 (torchvision's
    rule, which is ``grid_sample``'s zero padding), times its modulation; the conv is then one matmul of the
    (C * taps) sampled columns with the weight. Offset groups are supported, weight groups are not (no
    hierseg_d2 layer uses them).
    """
    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dil_h, dil_w = _pair(dilation)
    n, channels, height, width = input.shape
    out_channels, channels_per_group, kh, kw = weight.shape
    if channels_per_group != channels:
        raise ValueError(f"deform_conv2d_grid_sample: weight groups are not supported (weight {tuple(weight.shape)}, "
                         f"input channels {channels})")
    taps = kh * kw
    offset_groups = offset.shape[1] // (2 * taps)
    ho, wo = offset.shape[-2:]
    dtype, device = offset.dtype, offset.device
    # sampling positions without offsets, (1, 1, taps, ho, 1) / (1, 1, taps, 1, wo)
    tap_y = (torch.arange(kh, dtype=dtype, device=device) * dil_h).repeat_interleave(kw)
    tap_x = (torch.arange(kw, dtype=dtype, device=device) * dil_w).repeat(kh)
    base_y = tap_y.view(1, 1, taps, 1, 1) + (torch.arange(ho, dtype=dtype, device=device) * stride_h - pad_h
                                             ).view(1, 1, 1, -1, 1)
    base_x = tap_x.view(1, 1, taps, 1, 1) + (torch.arange(wo, dtype=dtype, device=device) * stride_w - pad_w
                                             ).view(1, 1, 1, 1, -1)
    offset = offset.view(n, offset_groups, taps, 2, ho, wo)
    pos_y = base_y + offset[:, :, :, 0]  # (n, groups, taps, ho, wo), pixel coordinates
    pos_x = base_x + offset[:, :, :, 1]
    # grid_sample with align_corners=False maps pixel p to (2p + 1) / size - 1 (no division by size - 1,
    # so 1-pixel-wide maps work)
    grid = torch.stack(((2 * pos_x + 1) / width - 1, (2 * pos_y + 1) / height - 1), dim=-1)
    grid = grid.reshape(n * offset_groups, taps * ho, wo, 2)
    sampled = F.grid_sample(input.reshape(n * offset_groups, channels // offset_groups, height, width), grid,
                            mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.view(n, offset_groups, channels // offset_groups, taps, ho, wo)
    if mask is not None:
        sampled = sampled * mask.view(n, offset_groups, 1, taps, ho, wo)
    columns = sampled.reshape(n, channels * taps, ho * wo)
    out = torch.matmul(weight.reshape(out_channels, channels * taps), columns).view(n, out_channels, ho, wo)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _hierseg_modules_using_torchvision_dcn():
    original = torchvision.ops.deform_conv2d
    return [m for name, m in list(sys.modules.items())
            if name.startswith("hierseg_d2.") and getattr(m, "deform_conv2d", None) is original]


@contextlib.contextmanager
def dcn_implementation(mode: str) -> Iterator[None]:
    """Within the block, hierseg_d2's modules that call ``torchvision.ops.deform_conv2d`` call
    :func:`deform_conv2d_grid_sample` instead (``mode="grid_sample"``); ``"deformconv"`` keeps torchvision's
    op (exported through :func:`register_deformconv_symbolic`)."""
    if mode not in ("grid_sample", "deformconv"):
        raise ValueError(f"DCN implementation must be 'grid_sample' or 'deformconv', got {mode!r}")
    modules = _hierseg_modules_using_torchvision_dcn() if mode == "grid_sample" else []
    saved = [m.deform_conv2d for m in modules]
    try:
        for m in modules:
            m.deform_conv2d = deform_conv2d_grid_sample
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.deform_conv2d = fn


def _deformconv_symbolic(g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                         n_weight_groups, n_offset_groups, use_mask):
    from torch.onnx import symbolic_helper as sh

    args = [input, weight, offset, bias] + ([mask] if sh._maybe_get_const(use_mask, "b") else [])
    ints = [sh._get_const(v, "i", name) for v, name in
            zip((stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, n_weight_groups, n_offset_groups),
                ("stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "groups", "offset_groups"))]
    return g.op("DeformConv", *args, strides_i=ints[0:2], pads_i=[ints[2], ints[3], ints[2], ints[3]],
                dilations_i=ints[4:6], group_i=ints[6], offset_group_i=ints[7])


def register_deformconv_symbolic() -> None:
    """Map ``torchvision::deform_conv2d`` to ONNX ``DeformConv`` (opset 19) in ``torch.onnx.export``."""
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic("torchvision::deform_conv2d", _deformconv_symbolic, DEFORMCONV_OPSET)


def uses_deform_conv(model: torch.nn.Module, sample: torch.Tensor) -> bool:
    """Whether the model calls ``torchvision.ops.deform_conv2d`` on ``sample`` (one forward, counted)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return torchvision.ops.deform_conv2d(*args, **kwargs)

    modules = _hierseg_modules_using_torchvision_dcn()
    saved = [m.deform_conv2d for m in modules]
    try:
        for m in modules:
            m.deform_conv2d = counting
        with torch.no_grad():
            model(sample)
    finally:
        for m, fn in zip(modules, saved):
            m.deform_conv2d = fn
    return bool(calls)


class _TinyDCN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1, 1, 1, 1))

    def forward(self, x):
        offset = torch.zeros_like(x).repeat(1, 2, 1, 1)
        return torchvision.ops.deform_conv2d(x, offset, self.weight, mask=torch.ones_like(x))


_ORT_DEFORMCONV: Optional[Tuple[bool, str]] = None


def onnxruntime_supports_deformconv() -> Tuple[bool, str]:
    """(supported, reason): whether the installed onnxruntime runs ONNX DeformConv on the CPU, found by
    exporting a 1x1 DeformConv and opening it (cached)."""
    global _ORT_DEFORMCONV
    if _ORT_DEFORMCONV is None:
        import onnxruntime

        register_deformconv_symbolic()
        buf = io.BytesIO()
        with warnings.catch_warnings():  # "opset 19 is not supported": DeformConv is the only op here
            warnings.simplefilter("ignore")
            torch.onnx.export(_TinyDCN(), (torch.zeros(1, 1, 2, 2),), buf, opset_version=DEFORMCONV_OPSET)
        try:
            onnxruntime.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
            _ORT_DEFORMCONV = (True, f"onnxruntime {onnxruntime.__version__} implements DeformConv")
        except Exception as e:  # NOT_IMPLEMENTED from onnxruntime's session initialisation
            _ORT_DEFORMCONV = (False, f"onnxruntime {onnxruntime.__version__} has no CPU kernel for ONNX "
                                      f"DeformConv ({str(e).splitlines()[0]})")
    return _ORT_DEFORMCONV
