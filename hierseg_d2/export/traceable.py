"""Clustering (eq. 3) and decoding (eq. 5) in a form that traces to a size-independent graph.

The model's own implementation (:mod:`hierseg_d2.modeling.clustering`) is free to use whatever is fastest
in PyTorch (custom autograd functions, strided views, loops over the batch); a trace of such code records
the sizes and strides of the sample it saw. For export, :func:`traceable_hierarchy` computes the clustering
modules and the decoding with the same math written only with shape-generic ops (``F.unfold`` gathers the
9 parent candidates of each 2x2 window, one batched matmul per window), so one exported graph serves every
image size. Equal to the model's implementation up to float rounding (tests/export/test_traceable.py).
"""
import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..modeling import clustering
from ..modeling.meta_arch import hcformer

__all__ = ["local_clustering", "decode", "decode_hierarchy", "clustering_module_forward", "traceable_hierarchy"]


def _windows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, gh * gw, C, 4): the 2x2 window of each after-map pixel, zero-padded to even sizes."""
    b, c, height, width = x.shape
    x = F.pad(x, (0, width % 2, 0, height % 2))
    gh, gw = x.shape[-2] // 2, x.shape[-1] // 2
    return x.reshape(b, c, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, 4)


def _unwindow(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, gh, gw, C, 4) -> (B, C, H, W): inverse of :func:`_windows`, the padding cropped."""
    b, gh, gw, c = x.shape[:4]
    x = x.reshape(b, gh, gw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * gh, 2 * gw)
    return x[:, :, :height, :width]


def _candidates(x: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """After map (B, C, h, w) -> (B, gh * gw, C, 9): the 9 values around each window of ``before``'s grid
    (zeros outside; h may be floor(H / 2), then padded to the grid)."""
    b, c, h, w = x.shape
    gh, gw = (before.shape[-2] + 1) // 2, (before.shape[-1] + 1) // 2
    x = F.pad(x, (0, gw - w, 0, gh - h))
    return F.unfold(x, kernel_size=3, padding=1).reshape(b, c, 9, gh * gw).permute(0, 3, 1, 2)


def local_clustering(feat: torch.Tensor, down_feat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`hierseg_d2.modeling.clustering.local_clustering`."""
    height, width = feat.shape[-2:]
    sims = torch.matmul(_windows(feat).transpose(2, 3), _candidates(down_feat, feat))  # (B, L, 4, 9)
    logits = sims / (clustering.TEMPERATURE_EPS + scale.abs()) + clustering.PADDING_MASK * (sims == 0).to(sims.dtype)
    b, gh, gw = feat.shape[0], (height + 1) // 2, (width + 1) // 2
    return _unwindow(logits.softmax(dim=-1).transpose(2, 3).reshape(b, gh, gw, 9, 4), height, width)


def decode(x: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`hierseg_d2.modeling.clustering.decode`."""
    height, width = assign.shape[-2:]
    out = torch.matmul(_candidates(x, assign), _windows(assign))  # (B, L, Q, 4)
    b, q, gh, gw = x.shape[0], x.shape[1], (height + 1) // 2, (width + 1) // 2
    return _unwindow(out.reshape(b, gh, gw, q, 4), height, width)


def decode_hierarchy(masks: torch.Tensor, assignments: Sequence[torch.Tensor]) -> torch.Tensor:
    for assign in reversed(list(assignments)):
        masks = decode(masks, assign)
    return masks


def _embed(x: torch.Tensor, norm: torch.nn.LayerNorm, proj: torch.nn.Conv2d) -> torch.Tensor:
    x = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels, then the 1x1 conv
    x = F.conv2d(x, proj.weight)
    # F.normalize(x, dim=1) written out: its ReduceL2 is exported wrongly by torch 2.3 at opset >= 18
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)


def clustering_module_forward(self: clustering.ClusteringModule, feat: torch.Tensor,
                              down_feat: torch.Tensor) -> torch.Tensor:
    """:meth:`ClusteringModule.forward` with this module's formulation (same parameters)."""
    return local_clustering(_embed(feat, self.norm, self.proj), _embed(down_feat, self.down_norm, self.down_proj),
                            self.scale)


@contextlib.contextmanager
def traceable_hierarchy() -> Iterator[None]:
    """Within the block, every ClusteringModule and HCFormer's decoding use this module's functions."""
    saved = clustering.ClusteringModule.forward, hcformer.decode_hierarchy
    try:
        clustering.ClusteringModule.forward = clustering_module_forward
        hcformer.decode_hierarchy = decode_hierarchy
        yield
    finally:
        clustering.ClusteringModule.forward, hcformer.decode_hierarchy = saved
