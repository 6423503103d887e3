"""SegFormer's Mix Transformer (MiT-B0/B1/B2) as a Detectron2 backbone.

Xie et al., "SegFormer" (NeurIPS 2021), as summarised in HILA (Sec. 3.1, Table 5): four stages, each an
overlapping patch embedding (kernel 7 stride 4, then kernel 3 stride 2) followed by blocks of efficient
self-attention (keys/values spatially reduced by R) and Mix-FFN, and a LayerNorm closing each stage. The
blocks are the shared :class:`~hierseg_d2.modeling.backbone.layers.SRABlock` / ``PatchEmbed``.

Module names are the authors' (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``), so their ImageNet
checkpoints load once :func:`convert_mit_state_dict` has added the ``backbone.`` prefix. Stage i of the
paper (1..4) produces ``res{i+1}`` (stride 2^(i+1)); the output of ``patch_embed{i}`` (i >= 2) is the
HCFormer "after" map ``ds{i+1}``. As in SegFormer, the next patch embedding reads the *normed* stage output.

The class also exposes the small per-stage interface (:meth:`embed`, :meth:`stage_blocks`,
:meth:`run_block`, :meth:`out_norm`, :meth:`make_block`) through which HILA (``hila.py``) wraps its blocks
without changing them. Any input size works: sizes follow ceil(H / 2^k).
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from .hierarchy import downsampled_name
from .layers import PatchEmbed, SRABlock, init_transformer_weights, tokens_to_map
from .presets import resolve_preset

__all__ = ["MIT_PRESETS", "MixVisionTransformer", "add_mit_config", "build_mit_backbone",
           "convert_mit_state_dict"]

logger = logging.getLogger(__name__)

_COMMON = dict(num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1),
               patch_sizes=(7, 3, 3, 3), strides=(4, 2, 2, 2), drop_path_rate=0.1)
# SegFormer Table 6 / HILA Table 5: channels d_i and blocks N_i per stage; the rest is shared.
MIT_PRESETS = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), **_COMMON),
    "b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), **_COMMON),
    "b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), **_COMMON),
}
_ALL_OUTPUTS = ("res2", "res3", "res4", "res5", "ds3", "ds4", "ds5")


class MixVisionTransformer(Backbone):
    """MiT encoder returning res2..res5 (normed stage outputs) and ds3..ds5 (patch-embedding outputs)."""

    def __init__(self, embed_dims: Sequence[int] = (32, 64, 160, 256), depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), patch_sizes: Sequence[int] = (7, 3, 3, 3),
                 strides: Sequence[int] = (4, 2, 2, 2), drop_path_rate: float = 0.1, in_chans: int = 3,
                 out_features: Optional[Sequence[str]] = None):
        super().__init__()
        for name, values in (("embed_dims", embed_dims), ("depths", depths), ("num_heads", num_heads),
                             ("mlp_ratios", mlp_ratios), ("sr_ratios", sr_ratios),
                             ("patch_sizes", patch_sizes), ("strides", strides)):
            if len(values) != 4:
                raise ValueError(f"MiT {name} (MODEL.MIT.{name.upper()}) needs 4 entries, got {list(values)}")
        if tuple(strides[1:]) != (2, 2, 2):
            raise ValueError(f"MiT strides (MODEL.MIT.STRIDES) must be [s, 2, 2, 2], got {list(strides)}")
        self.embed_dims = self.dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.mlp_ratios = tuple(mlp_ratios)
        self.sr_ratios = tuple(sr_ratios)
        self.drop_path_rate = drop_path_rate
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self._dpr = dpr
        for i in range(4):
            in_dim = in_chans if i == 0 else embed_dims[i - 1]
            self.add_module(f"patch_embed{i + 1}",
                            PatchEmbed(patch_sizes[i], strides[i], in_dim, embed_dims[i], overlap=True))
            first = sum(depths[:i])
            self.add_module(f"block{i + 1}", nn.ModuleList(
                SRABlock(embed_dims[i], num_heads[i], mlp_ratios[i], drop_path=dpr[first + j],
                         sr_ratio=sr_ratios[i]) for j in range(depths[i])))
            self.add_module(f"norm{i + 1}", nn.LayerNorm(embed_dims[i]))
        self.apply(init_transformer_weights)

        strides_out = [strides[0] * 2 ** i for i in range(4)]
        shapes = {}
        for i in range(4):
            shapes[f"res{i + 2}"] = ShapeSpec(channels=embed_dims[i], stride=strides_out[i])
            if i > 0:
                shapes[downsampled_name(i + 2)] = ShapeSpec(channels=embed_dims[i], stride=strides_out[i])
        out_features = list(out_features) if out_features else list(_ALL_OUTPUTS)
        unknown = [f for f in out_features if f not in shapes]
        if unknown:
            raise ValueError(f"MiT out_features (MODEL.MIT.OUT_FEATURES) {unknown} unknown; "
                             f"choose from {list(shapes)}")
        self._out_features = out_features
        self._out_feature_channels = {k: shapes[k].channels for k in out_features}
        self._out_feature_strides = {k: shapes[k].stride for k in out_features}

    # ---- per-stage interface shared with HILA (stages numbered 1..4 as in the papers) ----
    def embed(self, stage: int, x: torch.Tensor, H: int = 0, W: int = 0) -> Tuple[torch.Tensor, int, int]:
        """Tokens opening ``stage``: from the image (stage 1) or from the previous stage's tokens
        (un-normed residual stream, H x W), which are normed with ``norm{stage-1}`` first as in SegFormer."""
        if stage > 1:
            x = tokens_to_map(self.out_norm(stage - 1, x), H, W)
        return getattr(self, f"patch_embed{stage}")(x)

    def stage_blocks(self, stage: int) -> nn.ModuleList:
        return getattr(self, f"block{stage}")

    def run_block(self, block: nn.Module, stage: int, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return block(x, H, W)

    def out_norm(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"norm{stage}")(x)

    def make_block(self, stage: int) -> nn.Module:
        """A new block with the design of ``stage``'s blocks (HILA's top-down self-attention layer)."""
        block = SRABlock(self.embed_dims[stage - 1], self.num_heads[stage - 1], self.mlp_ratios[stage - 1],
                         drop_path=self._dpr[sum(self.depths[:stage]) - 1], sr_ratio=self.sr_ratios[stage - 1])
        block.apply(init_transformer_weights)
        return block

    # ---- Detectron2 backbone ----
    @property
    def size_divisibility(self) -> int:
        # any size works (ceil sizes); 32 keeps every stage of a padded batch an exact halving
        return 32

    def clustering_pairs(self) -> Dict[int, Tuple[str, str]]:
        """Stage output before each overlapping patch embedding and that embedding's output."""
        return {k: (f"res{k}", downsampled_name(k + 1)) for k in (2, 3, 4)}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"MiT takes (N, C, H, W) images, got shape {tuple(x.shape)}")
        outputs = {}
        H = W = 0
        for stage in range(1, 5):
            x, H, W = self.embed(stage, x, H, W)
            if stage > 1:
                outputs[downsampled_name(stage + 1)] = tokens_to_map(x, H, W)
            for block in self.stage_blocks(stage):
                x = block(x, H, W)
            outputs[f"res{stage + 1}"] = tokens_to_map(self.out_norm(stage, x), H, W)
        return {k: v for k, v in outputs.items() if k in self._out_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {k: ShapeSpec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in self._out_features}


def add_mit_config(cfg: CN) -> None:
    """Add ``MODEL.MIT``: PRESET (b0 | b1 | b2) plus per-field overrides ("unset" values take the preset's)."""
    cfg.MODEL.MIT = CN()
    node = cfg.MODEL.MIT
    node.PRESET = "b0"
    node.EMBED_DIMS = []
    node.DEPTHS = []
    node.NUM_HEADS = []
    node.MLP_RATIOS = []
    node.SR_RATIOS = []
    node.PATCH_SIZES = []
    node.STRIDES = []
    node.DROP_PATH_RATE = -1.0
    node.OUT_FEATURES = list(_ALL_OUTPUTS)


@BACKBONE_REGISTRY.register()
def build_mit_backbone(cfg: CN, input_shape: ShapeSpec) -> MixVisionTransformer:
    """SegFormer MiT from ``MODEL.MIT`` (preset + overrides)."""
    kwargs = resolve_preset(cfg.MODEL.MIT, MIT_PRESETS, "MODEL.MIT")
    return MixVisionTransformer(in_chans=input_shape.channels, **kwargs)


_HEAD_PREFIXES = ("head.",)
_BACKBONE_PREFIXES = ("patch_embed", "block", "norm")


def convert_mit_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str = "backbone."
                           ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map an authors' MiT (``mit_b*``) state dict onto :class:`MixVisionTransformer` in a Detectron2 model.

    Returns (converted, dropped): backbone tensors under ``prefix`` with the authors' names otherwise
    unchanged, and the names dropped on purpose (the ImageNet ``head``). A ``module.`` or ``backbone.``
    prefix (DataParallel, mmseg) is removed first. Any other name raises ``KeyError`` naming it.
    """
    converted, dropped = {}, []
    for name, tensor in state_dict.items():
        key = name
        for p in ("module.", "backbone."):
            key = key[len(p):] if key.startswith(p) else key
        if key.startswith(_HEAD_PREFIXES):
            dropped.append(name)
        elif key.startswith(_BACKBONE_PREFIXES):
            converted[prefix + key] = tensor
        else:
            raise KeyError(f"MiT checkpoint tensor {name!r} is not part of the SegFormer mit_b* layout "
                           f"(expected names starting with {_BACKBONE_PREFIXES + _HEAD_PREFIXES})")
    return converted, dropped
