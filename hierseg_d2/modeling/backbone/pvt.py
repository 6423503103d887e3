"""Pyramid Vision Transformer v1 (Tiny/Small) and v2 (B1/B2) as Detectron2 backbones.

One class, :class:`PyramidVisionTransformer`, with four presets (``pvt_tiny``, ``pvt_small``,
``pvt_v2_b1``, ``pvt_v2_b2``); ``version`` selects the generation:

* v1 (Wang et al., ICCV 2021): non-overlapping patch embedding (kernel = stride: 4, 2, 2, 2), a learned
  position embedding per stage (``pos_embed{i}``, bilinearly interpolated from the 224 x 224 pre-training
  grid 56/28/14/7 to the actual token grid, so any input size works), blocks of spatial-reduction attention
  with a plain MLP, and one final LayerNorm (``norm``) after stage 4. Stage outputs 1-3 are not normed.
* v2 (Wang et al., CVMJ 2022): overlapping patch embedding (kernel 7 stride 4, then kernel 3 stride 2), no
  position embedding, the convolutional FFN (= :class:`~.layers.MixFFN`) and a LayerNorm closing every
  stage (``norm1..4``) whose output feeds the next stage. (Structurally this is SegFormer's MiT with MLP
  ratios 8/8/4/4; it is kept here so that PVT's names, presets and converter live in one place.)

Module names are the authors' (``patch_embed{i}``, ``block{i}.{j}``, ``pos_embed{i}``, ``norm``/``norm{i}``)
so their ImageNet checkpoints load after ``tools/convert-pvt-to-d2.py`` (see :func:`convert_pvt_state_dict`;
the v1 ``pos_embed4`` of the checkpoint carries a class-token slot that the converter drops).

Outputs: ``res{i+1}`` = output of stage i (stride 2^(i+1)); ``ds{i+1}`` = output of ``patch_embed{i}``
(i >= 2) as a map, i.e. the map right after the downsampling layer, for HCFormer's clustering pairs.
For an H x W input every map is ceil(H / 2^k) x ceil(W / 2^k).
"""
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from timm.layers import trunc_normal_
from torch import nn

from .hierarchy import downsampled_name
from .layers import PatchEmbed, SRABlock, init_transformer_weights, tokens_to_map
from .presets import resolve_preset

__all__ = ["PVT_PRESETS", "PyramidVisionTransformer", "add_pvt_config", "build_pvt_backbone",
           "convert_pvt_state_dict", "infer_pvt_preset", "strip_prefixes"]

logger = logging.getLogger(__name__)

_COMMON = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
               sr_ratios=(8, 4, 2, 1), drop_path_rate=0.1, pretrain_img_size=224)
# PVT Table 1 / PVTv2 Table 1: Tiny = B1 depths, Small = B2 depths; the rest is shared.
PVT_PRESETS = {
    "pvt_tiny": dict(version="v1", depths=(2, 2, 2, 2), **_COMMON),
    "pvt_small": dict(version="v1", depths=(3, 4, 6, 3), **_COMMON),
    "pvt_v2_b1": dict(version="v2", depths=(2, 2, 2, 2), **_COMMON),
    "pvt_v2_b2": dict(version="v2", depths=(3, 4, 6, 3), **_COMMON),
}
ALL_OUTPUTS = ("res2", "res3", "res4", "res5", "ds3", "ds4", "ds5")
# (kernel, stride) of the four patch embeddings
_PATCH = {"v1": ((4, 4), (2, 2), (2, 2), (2, 2)), "v2": ((7, 4), (3, 2), (3, 2), (3, 2))}


class PyramidVisionTransformer(Backbone):
    """PVT v1 / v2 encoder returning res2..res5 and ds3..ds5 (patch-embedding outputs as maps).

    Subclasses (HAFA) change the downsampling layers through :meth:`make_patch_embed` /
    :meth:`make_pos_embed` and reuse the per-stage interface :meth:`embed`, :meth:`run_stage`,
    :meth:`out_norm`.
    """

    def __init__(self, version: str = "v2", embed_dims: Sequence[int] = (64, 128, 320, 512),
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 drop_path_rate: float = 0.1, pretrain_img_size: int = 224, qkv_bias: bool = True,
                 in_chans: int = 3, out_features: Optional[Sequence[str]] = None):
        super().__init__()
        if version not in _PATCH:
            raise ValueError(f"PVT version (MODEL.PVT.VERSION) must be 'v1' or 'v2', got {version!r}")
        for name, values in (("embed_dims", embed_dims), ("depths", depths), ("num_heads", num_heads),
                             ("mlp_ratios", mlp_ratios), ("sr_ratios", sr_ratios)):
            if len(values) != 4:
                raise ValueError(f"PVT {name} (MODEL.PVT.{name.upper()}) needs 4 entries, got {list(values)}")
        self.version = version
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.pretrain_img_size = pretrain_img_size
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stride = 1
        for i in range(1, 5):
            kernel, s = _PATCH[version][i - 1]
            stride *= s
            in_dim = in_chans if i == 1 else embed_dims[i - 2]
            self.add_module(f"patch_embed{i}", self.make_patch_embed(i, kernel, s, in_dim, embed_dims[i - 1]))
            pos = self.make_pos_embed(i, pretrain_img_size // stride, embed_dims[i - 1])
            if pos is not None:
                self.register_parameter(f"pos_embed{i}", pos)
            first = sum(depths[:i - 1])
            self.add_module(f"block{i}", nn.ModuleList(
                SRABlock(embed_dims[i - 1], num_heads[i - 1], mlp_ratios[i - 1], qkv_bias=qkv_bias,
                         drop_path=dpr[first + j], sr_ratio=sr_ratios[i - 1],
                         ffn="mix" if version == "v2" else "mlp")
                for j in range(depths[i - 1])))
            if version == "v2":
                self.add_module(f"norm{i}", nn.LayerNorm(embed_dims[i - 1]))
        if version == "v1":
            self.norm = nn.LayerNorm(embed_dims[3])
        self.apply(init_transformer_weights)
        for name, p in self.named_parameters(recurse=False):
            if name.startswith("pos_embed"):
                trunc_normal_(p, std=0.02)

        shapes = {}
        for i in range(4):
            shapes[f"res{i + 2}"] = ShapeSpec(channels=embed_dims[i], stride=2 ** (i + 2))
            if i > 0:
                shapes[downsampled_name(i + 2)] = ShapeSpec(channels=embed_dims[i], stride=2 ** (i + 2))
        out_features = list(out_features) if out_features else list(ALL_OUTPUTS)
        unknown = [f for f in out_features if f not in shapes]
        if unknown:
            raise ValueError(f"PVT out_features {unknown} unknown; choose from {list(shapes)}")
        self._out_features = out_features
        self._out_feature_channels = {k: shapes[k].channels for k in out_features}
        self._out_feature_strides = {k: shapes[k].stride for k in out_features}

    # ---- construction hooks (overridden by HAFA) ----
    def make_patch_embed(self, stage: int, kernel: int, stride: int, in_dim: int, dim: int) -> nn.Module:
        """The downsampling layer opening ``stage``: v1 non-overlapping, v2 overlapping."""
        return PatchEmbed(kernel, stride, in_dim, dim, overlap=self.version == "v2")

    def make_pos_embed(self, stage: int, grid: int, dim: int) -> Optional[nn.Parameter]:
        """v1's learned position embedding of ``stage`` on the pre-training grid (grid x grid tokens)."""
        if self.version != "v1":
            return None
        return nn.Parameter(torch.zeros(1, grid * grid, dim))

    # ---- per-stage interface (stages numbered 1..4 as in the papers) ----
    def position_embedding(self, stage: int, H: int, W: int) -> Optional[torch.Tensor]:
        """``pos_embed{stage}`` resized bilinearly to an H x W token grid, as (1, H*W, C); None if absent."""
        pos = getattr(self, f"pos_embed{stage}", None)
        if pos is None:
            return None
        grid = math.isqrt(pos.shape[1])
        if (grid, grid) == (H, W):
            return pos
        pos = pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(H, W), mode="bilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def embed(self, stage: int, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """Tokens of the downsampling layer opening ``stage``, from the previous map (or the image)."""
        return getattr(self, f"patch_embed{stage}")(x)

    def add_position(self, stage: int, tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """v1 adds its (resized) position embedding to the patch tokens; v2 has none."""
        pos = self.position_embedding(stage, H, W)
        return tokens if pos is None else tokens + pos

    def run_stage(self, stage: int, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        for block in getattr(self, f"block{stage}"):
            x = block(x, H, W)
        return x

    def out_norm(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """v2 norms every stage output; v1 only the last one (``norm``)."""
        if self.version == "v2":
            return getattr(self, f"norm{stage}")(x)
        return self.norm(x) if stage == 4 else x

    # ---- Detectron2 backbone ----
    @property
    def size_divisibility(self) -> int:
        # any size works (ceil sizes); 32 keeps every stage of a padded batch an exact halving
        return 32

    def clustering_pairs(self) -> Dict[int, Tuple[str, str]]:
        """Stage output before each patch embedding and that embedding's output (as a map)."""
        return {k: (f"res{k}", downsampled_name(k + 1)) for k in (2, 3, 4)}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"PVT takes (N, C, H, W) images, got shape {tuple(x.shape)}")
        outputs = {}
        for stage in range(1, 5):
            tokens, H, W = self.embed(stage, x)
            if stage > 1:
                outputs[downsampled_name(stage + 1)] = tokens_to_map(tokens, H, W)
            tokens = self.run_stage(stage, self.add_position(stage, tokens, H, W), H, W)
            x = tokens_to_map(self.out_norm(stage, tokens), H, W)
            outputs[f"res{stage + 1}"] = x
        return {k: v for k, v in outputs.items() if k in self._out_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {k: ShapeSpec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in self._out_features}


def add_pvt_config(cfg: CN) -> None:
    """Add ``MODEL.PVT``: PRESET (pvt_tiny | pvt_small | pvt_v2_b1 | pvt_v2_b2) plus per-field overrides
    ("unset" values [] / -1 / "" take the preset's)."""
    cfg.MODEL.PVT = CN()
    node = cfg.MODEL.PVT
    node.PRESET = "pvt_v2_b1"
    node.VERSION = ""
    node.EMBED_DIMS = []
    node.DEPTHS = []
    node.NUM_HEADS = []
    node.MLP_RATIOS = []
    node.SR_RATIOS = []
    node.DROP_PATH_RATE = -1.0
    node.PRETRAIN_IMG_SIZE = -1
    node.OUT_FEATURES = list(ALL_OUTPUTS)


@BACKBONE_REGISTRY.register()
def build_pvt_backbone(cfg: CN, input_shape: ShapeSpec) -> PyramidVisionTransformer:
    """PVT v1/v2 from ``MODEL.PVT`` (preset + overrides)."""
    kwargs = resolve_preset(cfg.MODEL.PVT, PVT_PRESETS, "MODEL.PVT")
    return PyramidVisionTransformer(in_chans=input_shape.channels, **kwargs)


_DROPPED_PREFIXES = ("head.", "cls_token")
_BACKBONE_PREFIXES = ("patch_embed", "pos_embed", "block", "norm")


def infer_pvt_preset(state_dict: Dict[str, torch.Tensor]) -> str:
    """Name of the preset whose layout ``state_dict`` (authors' names, no prefix) has, from the first
    patch-embedding kernel (4: v1, 7: v2) and the number of blocks per stage."""
    if "patch_embed1.proj.weight" not in state_dict:
        raise KeyError("not a PVT checkpoint: 'patch_embed1.proj.weight' is missing")
    version = "v1" if state_dict["patch_embed1.proj.weight"].shape[-1] == 4 else "v2"
    depths = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"block{i}.")}) for i in range(1, 5))
    for name, preset in PVT_PRESETS.items():
        if preset["version"] == version and preset["depths"] == depths:
            return name
    raise ValueError(f"PVT checkpoint with version {version} and depths {depths} matches no preset "
                     f"of {sorted(PVT_PRESETS)}")


def strip_prefixes(name: str) -> str:
    """``name`` without a leading ``module.`` (DataParallel) or ``backbone.`` (mmseg/mmdet) prefix."""
    for p in ("module.", "backbone."):
        name = name[len(p):] if name.startswith(p) else name
    return name


def convert_pvt_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str = "backbone."
                           ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map an authors' PVT / PVTv2 state dict (``pvt_tiny/small``, ``pvt_v2_b1/b2``) onto
    :class:`PyramidVisionTransformer` inside a Detectron2 model.

    Returns (converted, notes): tensors under ``prefix`` with the authors' names, and one note per tensor
    dropped or changed on purpose: the ImageNet ``head``/``cls_token`` are dropped, and v1's
    ``pos_embed4`` of (1, 7*7 + 1, C) loses its first slot, the class token's position (PVT v1 prepends
    the class token in stage 4 only; the detection/segmentation backbone has no class token).
    A ``module.``/``backbone.`` prefix is removed first; any other name raises ``KeyError`` naming it.
    """
    converted, notes = {}, []
    for name, tensor in state_dict.items():
        key = strip_prefixes(name)
        if key.startswith(_DROPPED_PREFIXES):
            notes.append(f"dropped {name} (ImageNet classification only)")
            continue
        if not key.startswith(_BACKBONE_PREFIXES):
            raise KeyError(f"PVT checkpoint tensor {name!r} is not part of the pvt / pvt_v2 layout "
                           f"(expected names starting with {_BACKBONE_PREFIXES + _DROPPED_PREFIXES})")
        if key.startswith("pos_embed"):
            n = tensor.shape[1]
            if math.isqrt(n) ** 2 != n:
                if math.isqrt(n - 1) ** 2 != n - 1:
                    raise ValueError(f"PVT checkpoint tensor {name!r} of shape {tuple(tensor.shape)} is "
                                     f"neither a square grid nor a square grid plus a class-token slot")
                tensor = tensor[:, 1:]
                notes.append(f"{name}: dropped the class-token slot 0, kept {n - 1} grid positions")
        converted[prefix + key] = tensor
    return converted, notes
