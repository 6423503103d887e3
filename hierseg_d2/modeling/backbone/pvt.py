"""Pyramid Vision Transformer v1 (Tiny/Small) and v2 (B1/B2) as Detectron2 backbones.

One class, :class:`PyramidVisionTransformer`, with four presets (``pvt_tiny``, ``pvt_small``,
``pvt_v2_b1``, ``pvt_v2_b2``); ``version`` selects the generation:

* v1 (Wang et al., ICCV 2021): non-overlapping patch embedding (kernel = stride: 4, 2, 2, 2), a learned
  position embedding per stage (``pos_embed{i}``, bilinearly interpolated from the 224 x 224 pre-training
  grid 56/28/14/7 to the actual token grid, so any input size works) and blocks of spatial-reduction
  attention with a plain MLP. No stage output is normed: the release's detection/segmentation PVT
  (``detection/pvt.py``, ``segmentation/pvt.py``) has no final LayerNorm, so res5 is stage 4's raw output;
  the ImageNet model's ``norm`` (before its classifier) is dropped by the converter as the release's
  ``load_checkpoint(strict=False)`` ignores it.
* v2 (Wang et al., CVMJ 2022): overlapping patch embedding (kernel 7 stride 4, then kernel 3 stride 2), no
  position embedding, the convolutional FFN (= :class:`~.layers.MixFFN`) and a LayerNorm closing every
  stage (``norm1..4``) whose output feeds the next stage. SegFormer's MiT is the same network with other
  hyper-parameters (MLP ratio 4, configurable patch sizes/strides): :mod:`.mit` holds its presets and a
  thin subclass of this class.

Module names are the authors' (``patch_embed{i}``, ``block{i}.{j}``, ``pos_embed{i}``, ``norm``/``norm{i}``)
so their ImageNet checkpoints load after ``tools/convert-pvt-to-d2.py`` (see :func:`convert_pvt_state_dict`;
the v1 ``pos_embed4`` of the checkpoint carries a class-token slot that the converter drops, as the release's
dense backbone skips it). Block and stage-closing norms are LayerNorm(eps=1e-6), patch-embedding and
spatial-reduction norms LayerNorm(eps=1e-5), as in the releases. docs/hafa.md "Release vs paper" lists what
differs from the PVT papers and where we extend the release (inputs that are not multiples of 32).

Outputs: ``res{i+1}`` = output of stage i (stride 2^(i+1)); ``ds{i+1}`` = output of ``patch_embed{i}``
(i >= 2) as a map, i.e. the map right after the downsampling layer, for HCFormer's clustering pairs.
For an H x W input every map is ceil(H / 2^k) x ceil(W / 2^k). The per-stage interface (:meth:`embed`,
:meth:`stage_blocks`, :meth:`run_block`, :meth:`out_norm`, :meth:`make_block`) is what HAFA and HILA build on.
"""
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from timm.layers import trunc_normal_
from torch import nn

from .convert import add_prefix, split_state_dict, strip_prefixes
from .hierarchy import ALL_OUTPUTS, HierarchicalBackbone, downsampled_name
from .layers import PatchEmbed, SRABlock, TransformerLayerNorm, init_transformer_weights, tokens_to_map
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
# (kernels, strides) of the four patch embeddings
_PATCH = {"v1": ((4, 2, 2, 2), (4, 2, 2, 2)), "v2": ((7, 3, 3, 3), (4, 2, 2, 2))}


class PyramidVisionTransformer(HierarchicalBackbone):
    """PVT v1 / v2 encoder returning res2..res5 and ds3..ds5 (patch-embedding outputs as maps).

    ``patch_sizes`` / ``strides`` default to the version's (v1: 4, 2, 2, 2 non-overlapping; v2: kernels
    7, 3, 3, 3 with strides 4, 2, 2, 2). Subclasses change the downsampling layers through
    :meth:`make_patch_embed` / :meth:`make_pos_embed` (HAFA) or only the presets (MiT).
    """

    family = "PVT"
    config_node = "MODEL.PVT"

    def __init__(self, version: str = "v2", embed_dims: Sequence[int] = (64, 128, 320, 512),
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 drop_path_rate: float = 0.1, pretrain_img_size: int = 224, qkv_bias: bool = True,
                 patch_sizes: Optional[Sequence[int]] = None, strides: Optional[Sequence[int]] = None,
                 in_chans: int = 3, out_features: Optional[Sequence[str]] = None):
        super().__init__()
        if version not in _PATCH:
            raise ValueError(f"{self.family} version ({self.config_node}.VERSION) must be 'v1' or 'v2', "
                             f"got {version!r}")
        patch_sizes = _PATCH[version][0] if patch_sizes is None else patch_sizes
        strides = _PATCH[version][1] if strides is None else strides
        for name, values in (("embed_dims", embed_dims), ("depths", depths), ("num_heads", num_heads),
                             ("mlp_ratios", mlp_ratios), ("sr_ratios", sr_ratios),
                             ("patch_sizes", patch_sizes), ("strides", strides)):
            if len(values) != 4:
                raise ValueError(f"{self.family} {name} ({self.config_node}.{name.upper()}) needs 4 entries, "
                                 f"got {list(values)}")
        if tuple(strides[1:]) != (2, 2, 2):
            raise ValueError(f"{self.family} strides ({self.config_node}.STRIDES) must be [s, 2, 2, 2], "
                             f"got {list(strides)}")
        self.version = version
        self.embed_dims = self.dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.mlp_ratios = tuple(mlp_ratios)
        self.sr_ratios = tuple(sr_ratios)
        self.qkv_bias = qkv_bias
        self.drop_path_rate = drop_path_rate
        self.pretrain_img_size = pretrain_img_size
        self._dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stride = 1
        for i in range(1, 5):
            stride *= strides[i - 1]
            in_dim = in_chans if i == 1 else embed_dims[i - 2]
            self.add_module(f"patch_embed{i}", self.make_patch_embed(i, patch_sizes[i - 1], strides[i - 1], in_dim,
                                                                     embed_dims[i - 1]))
            pos = self.make_pos_embed(i, pretrain_img_size // stride, embed_dims[i - 1])
            if pos is not None:
                self.register_parameter(f"pos_embed{i}", pos)
            first = sum(depths[:i - 1])
            self.add_module(f"block{i}", nn.ModuleList(self._block(i, self._dpr[first + j])
                                                       for j in range(depths[i - 1])))
            if version == "v2":
                self.add_module(f"norm{i}", TransformerLayerNorm(embed_dims[i - 1]))
        self.apply(init_transformer_weights)
        for name, p in self.named_parameters(recurse=False):
            if name.startswith("pos_embed"):
                trunc_normal_(p, std=0.02)
        self.init_outputs(self.embed_dims, out_features, first_stride=strides[0])

    # ---- construction hooks (overridden by HAFA) ----
    def make_patch_embed(self, stage: int, kernel: int, stride: int, in_dim: int, dim: int) -> nn.Module:
        """The downsampling layer opening ``stage``: v1 non-overlapping, v2 overlapping."""
        return PatchEmbed(kernel, stride, in_dim, dim, overlap=self.version == "v2")

    def make_pos_embed(self, stage: int, grid: int, dim: int) -> Optional[nn.Parameter]:
        """v1's learned position embedding of ``stage`` on the pre-training grid (grid x grid tokens)."""
        if self.version != "v1":
            return None
        return nn.Parameter(torch.zeros(1, grid * grid, dim))

    def _block(self, stage: int, drop_path: float) -> SRABlock:
        s = stage - 1
        return SRABlock(self.embed_dims[s], self.num_heads[s], self.mlp_ratios[s], qkv_bias=self.qkv_bias,
                        drop_path=drop_path, sr_ratio=self.sr_ratios[s], ffn="mix" if self.version == "v2" else "mlp")

    # ---- per-stage interface (stages numbered 1..4 as in the papers; HAFA and HILA build on it) ----
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

    def embed(self, stage: int, x: torch.Tensor, H: int = 0, W: int = 0) -> Tuple[torch.Tensor, int, int]:
        """Tokens of the downsampling layer opening ``stage`` and their grid size. ``x`` is the image
        (stage 1), the previous stage's output map, or (as HILA passes it) the previous stage's residual
        stream of (B, H*W, C) tokens, which gets that stage's :meth:`out_norm` first as in SegFormer."""
        if x.dim() == 3:
            x = tokens_to_map(self.out_norm(stage - 1, x), H, W)
        return getattr(self, f"patch_embed{stage}")(x)

    def add_position(self, stage: int, tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """v1 adds its (resized) position embedding to the patch tokens; v2 has none."""
        pos = self.position_embedding(stage, H, W)
        return tokens if pos is None else tokens + pos

    def stage_blocks(self, stage: int) -> nn.ModuleList:
        return getattr(self, f"block{stage}")

    def run_block(self, block: nn.Module, stage: int, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return block(x, H, W)

    def run_stage(self, stage: int, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        for block in self.stage_blocks(stage):
            x = block(x, H, W)
        return x

    def out_norm(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """v2 norms every stage output (``norm{stage}``); v1 none (the release's dense PVT v1 has no norm)."""
        if self.version == "v2":
            return getattr(self, f"norm{stage}")(x)
        return x

    def make_block(self, stage: int) -> nn.Module:
        """A new block with the design of ``stage``'s blocks (HILA's top-down self-attention layer)."""
        block = self._block(stage, self._dpr[sum(self.depths[:stage]) - 1])
        block.apply(init_transformer_weights)
        return block

    def forward_stages(self, x: torch.Tensor, stages: Sequence[int]) -> Dict[str, torch.Tensor]:
        """res_{k+1} and ds_{k+1} (k > 1) maps of ``stages`` (consecutive, from 1) run on the image ``x``."""
        outputs = {}
        for stage in stages:
            tokens, H, W = self.embed(stage, x)
            if stage > 1:
                outputs[downsampled_name(stage + 1)] = tokens_to_map(tokens, H, W)
            tokens = self.run_stage(stage, self.add_position(stage, tokens, H, W), H, W)
            x = tokens_to_map(self.out_norm(stage, tokens), H, W)
            outputs[f"res{stage + 1}"] = x
        return outputs

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        self.check_input(x)
        return self.select_outputs(self.forward_stages(x, range(1, 5)))


def add_pvt_config(cfg: CN) -> None:
    """Add ``MODEL.PVT``: PRESET (pvt_tiny | pvt_small | pvt_v2_b1 | pvt_v2_b2) plus per-field overrides
    ("unset" values [] / -1 / "" take the preset's)."""
    cfg.MODEL.PVT = CN()
    add_pvt_fields(cfg.MODEL.PVT, "pvt_v2_b1", version=True)


def add_pvt_fields(node: CN, preset: str, version: bool = False) -> None:
    """PRESET and the override keys ("unset" by default) of :class:`PyramidVisionTransformer`'s arguments
    for ``node`` (``MODEL.PVT``, ``MODEL.HAFA``, ``MODEL.MIT``); ``version`` adds VERSION and
    PRETRAIN_IMG_SIZE, which MiT (always v2, no position embedding) does not have."""
    node.PRESET = preset
    if version:
        node.VERSION = ""
        node.PRETRAIN_IMG_SIZE = -1
    for key in ("EMBED_DIMS", "DEPTHS", "NUM_HEADS", "MLP_RATIOS", "SR_RATIOS"):
        node[key] = []
    node.DROP_PATH_RATE = -1.0
    node.OUT_FEATURES = list(ALL_OUTPUTS)


@BACKBONE_REGISTRY.register()
def build_pvt_backbone(cfg: CN, input_shape: ShapeSpec) -> PyramidVisionTransformer:
    """PVT v1/v2 from ``MODEL.PVT`` (preset + overrides)."""
    kwargs = resolve_preset(cfg.MODEL.PVT, PVT_PRESETS, "MODEL.PVT")
    return PyramidVisionTransformer(in_chans=input_shape.channels, **kwargs)


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


def convert_pvt_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str = "backbone."
                           ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map an authors' PVT / PVTv2 state dict (``pvt_tiny/small``, ``pvt_v2_b1/b2``) onto
    :class:`PyramidVisionTransformer` inside a Detectron2 model.

    Returns (converted, notes): tensors under ``prefix`` with the authors' names, and one note per tensor
    dropped or changed on purpose, as the release's detection/segmentation backbones load these weights
    (``load_checkpoint(strict=False)``): the ImageNet ``head``/``cls_token`` and v1's final ``norm`` (it
    feeds only the classifier; the dense PVT v1 has none) are dropped, and v1's ``pos_embed4`` of
    (1, 7*7 + 1, C) loses its first slot, the class token's position (the dense backbone uses
    ``pos_embed4[:, 1:]``). A ``module.``/``backbone.`` prefix is removed first; any other name raises
    ``KeyError`` naming it.
    """
    kept, dropped = split_state_dict(state_dict, keep=("patch_embed", "pos_embed", "block", "norm"),
                                     drop=("head.", "cls_token", "norm."), layout="the pvt / pvt_v2")
    notes = [f"dropped {name} (ImageNet classification only"
             + (": the dense PVT v1 has no final norm)" if strip_prefixes(name).startswith("norm.") else ")")
             for name in dropped]
    for key, tensor in kept.items():
        n = tensor.shape[1] if key.startswith("pos_embed") else 0
        if n and math.isqrt(n) ** 2 != n:
            if math.isqrt(n - 1) ** 2 != n - 1:
                raise ValueError(f"PVT checkpoint tensor {key!r} of shape {tuple(tensor.shape)} is "
                                 f"neither a square grid nor a square grid plus a class-token slot")
            kept[key] = tensor[:, 1:]
            notes.append(f"{key}: dropped the class-token slot 0, kept {n - 1} grid positions")
    return add_prefix(kept, prefix), notes
