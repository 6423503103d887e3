"""SegFormer's Mix Transformer (MiT-B0/B1/B2) as a Detectron2 backbone.

Xie et al., "SegFormer" (NeurIPS 2021), as summarised in HILA (Sec. 3.1, Table 5): four stages, each an
overlapping patch embedding (kernel 7 stride 4, then kernel 3 stride 2) followed by blocks of efficient
self-attention (keys/values spatially reduced by R) and Mix-FFN, and a LayerNorm closing each stage. That is
exactly PVTv2's network (:class:`~.pvt.PyramidVisionTransformer`, version "v2") with SegFormer's
hyper-parameters, so this module holds only MiT's presets, config node, builder and converter, and
:class:`MixVisionTransformer`, a thin subclass with MiT's defaults.

Module names are the authors' (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``), so their ImageNet
checkpoints load once :func:`convert_mit_state_dict` has added the ``backbone.`` prefix. Stage i of the
paper (1..4) produces ``res{i+1}`` (stride 2^(i+1)); the output of ``patch_embed{i}`` (i >= 2) is the
HCFormer "after" map ``ds{i+1}``. As in SegFormer, the next patch embedding reads the *normed* stage output.
HILA (``hila.py``) wraps the blocks through the per-stage interface of the PVT class. Any input size
works: sizes follow ceil(H / 2^k), as in the release. Equivalence with the release's
``mmseg/models/backbones/mix_transformer.py`` (LayerNorm eps 1e-6 in blocks and stage norms, 1e-5 in patch
embeddings and spatial reduction) is tested with a golden fixture (tests/modeling/backbone/test_golden_backbones.py).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from .convert import add_prefix, split_state_dict
from .presets import resolve_preset
from .pvt import PyramidVisionTransformer, add_pvt_fields

__all__ = ["MIT_PRESETS", "MixVisionTransformer", "add_mit_config", "build_mit_backbone",
           "convert_mit_state_dict"]

_COMMON = dict(num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1),
               patch_sizes=(7, 3, 3, 3), strides=(4, 2, 2, 2), drop_path_rate=0.1)
# SegFormer Table 6 / HILA Table 5: channels d_i and blocks N_i per stage; the rest is shared.
MIT_PRESETS = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), **_COMMON),
    "b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), **_COMMON),
    "b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), **_COMMON),
}


class MixVisionTransformer(PyramidVisionTransformer):
    """MiT encoder = PVTv2 with SegFormer's defaults; returns res2..res5 (normed stage outputs) and ds3..ds5
    (patch-embedding outputs)."""

    family = "MiT"
    config_node = "MODEL.MIT"

    def __init__(self, embed_dims: Sequence[int] = (32, 64, 160, 256), depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), patch_sizes: Sequence[int] = (7, 3, 3, 3),
                 strides: Sequence[int] = (4, 2, 2, 2), drop_path_rate: float = 0.1, in_chans: int = 3,
                 out_features: Optional[Sequence[str]] = None):
        super().__init__(version="v2", embed_dims=embed_dims, depths=depths, num_heads=num_heads,
                         mlp_ratios=mlp_ratios, sr_ratios=sr_ratios, drop_path_rate=drop_path_rate,
                         patch_sizes=patch_sizes, strides=strides, in_chans=in_chans, out_features=out_features)


def add_mit_config(cfg: CN) -> None:
    """Add ``MODEL.MIT``: PRESET (b0 | b1 | b2) plus per-field overrides ("unset" values take the preset's)."""
    cfg.MODEL.MIT = CN()
    add_pvt_fields(cfg.MODEL.MIT, "b0")
    cfg.MODEL.MIT.PATCH_SIZES = []
    cfg.MODEL.MIT.STRIDES = []


@BACKBONE_REGISTRY.register()
def build_mit_backbone(cfg: CN, input_shape: ShapeSpec) -> MixVisionTransformer:
    """SegFormer MiT from ``MODEL.MIT`` (preset + overrides)."""
    kwargs = resolve_preset(cfg.MODEL.MIT, MIT_PRESETS, "MODEL.MIT")
    return MixVisionTransformer(in_chans=input_shape.channels, **kwargs)


def convert_mit_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str = "backbone."
                           ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map an authors' MiT (``mit_b*``) state dict onto :class:`MixVisionTransformer` in a Detectron2 model.

    Returns (converted, dropped): backbone tensors under ``prefix`` with the authors' names otherwise
    unchanged, and the names dropped on purpose (the ImageNet ``head``). A ``module.`` or ``backbone.``
    prefix (DataParallel, mmseg) is removed first. Any other name raises ``KeyError`` naming it.
    """
    kept, dropped = split_state_dict(state_dict, keep=("patch_embed", "block", "norm"), drop=("head.",),
                                     layout="the SegFormer mit_b*")
    return add_prefix(kept, prefix), dropped
