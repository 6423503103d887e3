"""HILA: Hierarchical Inter-Level Attention around the blocks of a hierarchical ViT (MiT or Swin).

Leung et al., "Improving Semantic Segmentation in Transformers using Hierarchical Inter-Level Attention"
(Sec. 3, App. A.1-A.3, Table 5). For every HILA stage l (numbered 1..4 as in the paper; stage l gives
``res{l+1}``), the "higher level" is stage l and the "lower level" is stage l-1. Every ``s_l``-th block j of
stage l becomes a HILA block:

* top-down update (skipped in the first HILA block of a stage): every lower-level feature attends to the
  1-4 higher-level features whose 4x4 patches (stride 2, padding 1) cover it, softmax across exactly those
  (eq. 5), alpha/beta-weighted Mix-FFN (eq. 6), then a *new* self-attention block of the lower stage's
  design (eq. 7);
* bottom-up update: every higher-level feature attends to the 16 lower-level features of its patch
  (eq. 1-2), alpha/beta-weighted Mix-FFN (eq. 3), then the base model's own block j (eq. 4).

Both attentions are single-head with width d = min(d_l, d_{l-1}), pre-LayerNorm on both inputs, scale
1/sqrt(d), a learned relative-position bias per position in the patch and an output projection back to
the updated level's width (App. A.1). The added weights of a stage are shared across its iterations
(Sec. 3.5; ``share_weights=False`` gives the Table 7b ablation). Stage l-1's tokens keep being updated by
stage l's top-down updates and its final (top-down updated) features are what ``res{l}`` hands on; the
patch embedding into stage l reads stage l-1 before those updates, as in the paper (Fig. 2b).

Reading of the parts the paper leaves open (documented in docs/hila.md): all five added parts (bottom-up
attention + FFN, top-down attention + FFN, top-down self-attention block) are counted once per stage;
the top-down FFN uses the stage's HILA expansion E_l; B2 + S(2,3,4) is MiT-B2 on Table 5's depths 2, 2, 6, 2
(``mit_b2_d2262``) with E_l = 4 throughout; positions of a patch that fall outside the lower map
(the padding) are not attended to in either direction. Sizes: an odd lower map of n gives a higher map of
ceil(n / 2) (overlapping patch embedding or Swin's padded PatchMerging), and the last patch then reaches
one row further, which is padded and masked too.

The base model is used through a small per-stage interface (``embed``, ``stage_blocks``, ``run_block``,
``out_norm``, ``make_block``) that :class:`~hierseg_d2.modeling.backbone.mit.MixVisionTransformer` has and
:class:`SwinBase` (Detectron2's Swin via ``D2SwinTransformer``) adds; the base model itself is unchanged
and lives under ``base.`` in the state dict.
"""
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.swin import SwinTransformerBlock, window_partition
from timm.layers import DropPath, trunc_normal_
from torch import nn

from .convert import check_against_model
from .hierarchy import ALL_OUTPUTS, HierarchicalBackbone, downsampled_name
from .layers import MixFFN, init_transformer_weights, map_to_tokens, tokens_to_map
from .mit import MIT_PRESETS, MixVisionTransformer, convert_mit_state_dict
from .presets import resolve_preset
from .swin import D2SwinTransformer

__all__ = [
    "HILA_PRESETS",
    "BASE_MODELS",
    "TRUNCATED_BASES",
    "PatchGeometry",
    "BottomUpAttention",
    "TopDownAttention",
    "InterLevelUpdate",
    "HILAStage",
    "SwinBase",
    "HILABackbone",
    "add_hila_config",
    "build_hila_backbone",
    "compose_top_down_attention",
    "convert_mit_state_dict_for_hila",
]

logger = logging.getLogger(__name__)

# Base models (Table 5, left part): MiT presets and Swin-T (mmseg's UperNet Swin-T: drop path 0.3).
BASE_MODELS = {
    "mit_b0": ("mit", MIT_PRESETS["b0"]),
    "mit_b1": ("mit", MIT_PRESETS["b1"]),
    "mit_b2": ("mit", MIT_PRESETS["b2"]),
    # Table 5's B2 + HILA S(2,3,4) column lists N = 2, 2, 6, 2 blocks (MiT-B2 has 3, 4, 6, 3): HILA's B2 is
    # MiT-B2's widths on Swin-T's depths. It starts from a mit_b2 checkpoint minus the extra blocks.
    "mit_b2_d2262": ("mit", dict(MIT_PRESETS["b2"], depths=(2, 2, 6, 2))),
    "swin_t": ("swin", dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                            mlp_ratio=4.0, drop_path_rate=0.3)),
}

# Base models built on fewer blocks than the checkpoint they start from: {base: checkpoint's base}. The
# converter drops (and logs) that checkpoint's blocks beyond the base's depths; Table 1's HILA additions for
# these presets are counted against the checkpoint's base (the plain SegFormer of the same row).
TRUNCATED_BASES = {"mit_b2_d2262": "mit_b2"}

# Table 5, HILA part. Per-stage tuples are indexed by the paper's stage 1..4 (entry 0 is unused by HILA).
# The table's stage-2 HILA row did not survive; E_2 is taken equal to the same model's E_3. B2 + S(2,3,4)
# keeps E = 4 on every stage although Table 5 prints E_4 = 2: with E_4 = 2 the backbone would grow by 2.0M
# over MiT-B2, with E_4 = 4 by 3.47M, Table 1's +3.4M (docs/hila.md, "Parameter counts vs Table 1").
HILA_PRESETS = {
    "mit_b0_s3": dict(base="mit_b0", stages=(3,), strides=(1, 1, 1, 1), ffn_ratios=(4, 4, 4, 4)),
    "mit_b1_s3": dict(base="mit_b1", stages=(3,), strides=(1, 1, 1, 1), ffn_ratios=(4, 4, 4, 4)),
    "mit_b1_s234": dict(base="mit_b1", stages=(2, 3, 4), strides=(1, 1, 1, 1), ffn_ratios=(4, 4, 4, 4)),
    "mit_b2_s234": dict(base="mit_b2_d2262", stages=(2, 3, 4), strides=(1, 1, 3, 1), ffn_ratios=(4, 4, 4, 4)),
    "swin_t_s234": dict(base="swin_t", stages=(2, 3, 4), strides=(1, 1, 2, 1), ffn_ratios=(2, 2, 2, 2)),
}
for _p in HILA_PRESETS.values():
    _p.update(alpha=0.5, beta=0.5, patch_size=4)


# --------------------------------------------------------------------------------------------------
# Patch geometry between a lower map (Hl x Wl) and the higher map (Hh x Wh) one stride-2 step above
# --------------------------------------------------------------------------------------------------
class PatchGeometry:
    """Where the p x p patch (stride 2) of each higher-level feature lies in the lower-level map.

    Higher feature (h, w) covers lower rows 2h - pad .. 2h - pad + p - 1 (pad = p/2 - 1, i.e. padding 1 for
    p = 4) and likewise for columns. The lower map is padded to ``(Hp, Wp)`` so that F.unfold yields
    exactly Hh x Wh patches; ``valid`` (Hh*Wh, p*p) marks patch positions inside the real lower map and
    ``index`` their flat index in the padded map.
    """

    def __init__(self, Hl: int, Wl: int, Hh: int, Wh: int, patch_size: int, device=None):
        if patch_size < 2 or patch_size % 2:
            raise ValueError(f"HILA patch size (MODEL.HILA.PATCH_SIZE) must be even and >= 2, got {patch_size}")
        if (Hh, Wh) != ((Hl + 1) // 2, (Wl + 1) // 2):
            raise ValueError(f"HILA expects a higher-level map of ceil(n/2) for a lower map of n: got "
                             f"{Hh}x{Wh} above {Hl}x{Wl}")
        self.Hl, self.Wl, self.Hh, self.Wh, self.p = Hl, Wl, Hh, Wh, patch_size
        self.pad = patch_size // 2 - 1
        self.Hp, self.Wp = 2 * (Hh - 1) + patch_size, 2 * (Wh - 1) + patch_size
        pos = torch.arange(self.Hp * self.Wp, device=device, dtype=torch.float32).view(1, 1, self.Hp, self.Wp)
        self.index = self.unfold(pos, padded=True)[0, :, :, 0].long()  # (L, P)
        ys, xs = self.index // self.Wp - self.pad, self.index % self.Wp - self.pad
        self.valid = (ys >= 0) & (ys < Hl) & (xs >= 0) & (xs < Wl)  # (L, P)

    def pad_map(self, x: torch.Tensor) -> torch.Tensor:
        right, bottom = self.Wp - self.Wl - self.pad, self.Hp - self.Hl - self.pad
        return F.pad(x, (self.pad, right, self.pad, bottom))

    def unfold(self, x: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """(B, C, Hl, Wl) lower map -> (B, Hh*Wh, p*p, C) patches (row-major positions in each patch)."""
        if not padded:
            x = self.pad_map(x)
        B, C = x.shape[:2]
        cols = F.unfold(x, kernel_size=self.p, stride=2)  # (B, C*P, L)
        return cols.view(B, C, self.p * self.p, -1).permute(0, 3, 2, 1)

    def fold(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, Hh*Wh, p*p, C) -> (B, C, Hl, Wl), summing what overlapping patches put on the same pixel."""
        B, L, P, C = patches.shape
        cols = patches.permute(0, 3, 2, 1).reshape(B, C * P, L)
        out = F.fold(cols, output_size=(self.Hp, self.Wp), kernel_size=self.p, stride=2)
        return out[:, :, self.pad:self.pad + self.Hl, self.pad:self.pad + self.Wl]


# --------------------------------------------------------------------------------------------------
# Inter-level attention (App. A.1) in both directions
# --------------------------------------------------------------------------------------------------
class _InterLevelAttention(nn.Module):
    """Single-head attention between two levels: LN on both inputs, q / k / v to width ``dim``, relative
    position bias per patch position, output projection ``proj`` (the paper's f) back to ``query_dim``."""

    def __init__(self, query_dim: int, key_dim: int, dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.scale = dim ** -0.5
        self.norm_q = nn.LayerNorm(query_dim)
        self.norm_kv = nn.LayerNorm(key_dim)
        self.q = nn.Linear(query_dim, dim)
        self.k = nn.Linear(key_dim, dim)
        self.v = nn.Linear(key_dim, dim)
        self.proj = nn.Linear(dim, query_dim)
        # B of eq. 1: the relative offset of a lower feature to a higher one is its position in the patch
        self.relative_position_bias_table = nn.Parameter(torch.zeros(patch_size * patch_size))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.record_attention = False
        self.last_attention: Optional[torch.Tensor] = None


class BottomUpAttention(_InterLevelAttention):
    """attn(X_l, X_{l-1,P}) of eq. 1: each higher-level feature attends to the p x p lower-level patch."""

    def __init__(self, dim_high: int, dim_low: int, patch_size: int = 4):
        super().__init__(dim_high, dim_low, min(dim_high, dim_low), patch_size)

    def forward(self, x_high: torch.Tensor, Hh: int, Wh: int, x_low: torch.Tensor, Hl: int, Wl: int,
                geometry: Optional[PatchGeometry] = None) -> torch.Tensor:
        geo = geometry or PatchGeometry(Hl, Wl, Hh, Wh, self.patch_size, x_low.device)
        q = self.q(self.norm_q(x_high))  # (B, L, d)
        kv = self.norm_kv(x_low)
        k = geo.unfold(tokens_to_map(self.k(kv), Hl, Wl))  # (B, L, P, d)
        v = geo.unfold(tokens_to_map(self.v(kv), Hl, Wl))
        logits = torch.einsum("bld,blpd->blp", q, k) * self.scale + self.relative_position_bias_table
        attn = logits.masked_fill(~geo.valid, float("-inf")).softmax(dim=-1)
        if self.record_attention:
            self.last_attention = attn.detach()
        return self.proj(torch.einsum("blp,blpd->bld", attn, v))


class TopDownAttention(_InterLevelAttention):
    """attn(X_{l-1}, X_{l,P^}) of eq. 5: each lower-level feature attends to the higher-level features
    whose patches cover it, softmax across exactly those (App. A.2's fold trick, numerically stabilised)."""

    def __init__(self, dim_high: int, dim_low: int, patch_size: int = 4):
        super().__init__(dim_low, dim_high, min(dim_high, dim_low), patch_size)

    def forward(self, x_low: torch.Tensor, Hl: int, Wl: int, x_high: torch.Tensor, Hh: int, Wh: int,
                geometry: Optional[PatchGeometry] = None) -> torch.Tensor:
        geo = geometry or PatchGeometry(Hl, Wl, Hh, Wh, self.patch_size, x_low.device)
        q = geo.unfold(tokens_to_map(self.q(self.norm_q(x_low)), Hl, Wl))  # (B, L, P, d)
        kv = self.norm_kv(x_high)
        k, v = self.k(kv), self.v(kv)  # (B, L, d)
        logits = torch.einsum("blpd,bld->blp", q, k) * self.scale + self.relative_position_bias_table
        attn = _covering_softmax(logits, geo)
        if self.record_attention:
            self.last_attention = attn.detach()
        # sum over the covering features of each lower pixel, then project (f of eq. 11)
        out = geo.fold(attn.unsqueeze(-1) * v.unsqueeze(2))  # (B, d, Hl, Wl)
        return self.proj(map_to_tokens(out))


def _covering_softmax(logits: torch.Tensor, geo: PatchGeometry) -> torch.Tensor:
    """Softmax of (B, L, P) patch logits over all entries that land on the same lower-level pixel."""
    B = logits.shape[0]
    index = geo.index.reshape(1, -1).expand(B, -1)
    valid = geo.valid.reshape(1, -1)
    flat = logits.reshape(B, -1).masked_fill(~valid, float("-inf"))
    # the per-pixel maximum only stabilises exp(); the result does not depend on it
    per_pixel = torch.full((B, geo.Hp * geo.Wp), float("-inf"), device=logits.device, dtype=logits.dtype)
    peak = per_pixel.scatter_reduce(1, index, flat.detach(), reduce="amax").gather(1, index)
    e = torch.exp(flat - peak.masked_fill(~valid, 0.0)).masked_fill(~valid, 0.0)
    denom = torch.zeros_like(per_pixel).scatter_add(1, index, e).gather(1, index)
    return (e / denom.clamp_min(1e-12)).view_as(logits)


class InterLevelUpdate(nn.Module):
    """X' = X + attn(X, other) (eq. 2 / 5); X'' = alpha X' + beta FFN(X') (eq. 3 / 6) with SegFormer's FFN
    (LN, fc1, 3x3 depth-wise conv, GELU, fc2; eq. 12)."""

    def __init__(self, attn: _InterLevelAttention, dim: int, ffn_ratio: float, alpha: float, beta: float):
        super().__init__()
        self.attn = attn
        self.norm = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, int(dim * ffn_ratio))
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor, H: int, W: int, other: torch.Tensor, Ho: int, Wo: int,
                geometry: Optional[PatchGeometry] = None) -> torch.Tensor:
        x = x + self.attn(x, H, W, other, Ho, Wo, geometry)
        return self.alpha * x + self.beta * self.mlp(self.norm(x), H, W)


class HILAStage(nn.Module):
    """The added (red) parts of Fig. 2b for one stage and the loop that interleaves them with its blocks.

    ``bottom_up`` / ``top_down`` are :class:`InterLevelUpdate` s, ``top_down_block`` the new self-attention
    block of the lower stage; each is a ModuleList of one shared module (default) or one per iteration.
    """

    def __init__(self, base, stage: int, stride: int, ffn_ratio: float, alpha: float, beta: float,
                 patch_size: int, share_weights: bool = True):
        super().__init__()
        if not 2 <= stage <= 4:
            raise ValueError(f"HILA stages (MODEL.HILA.STAGES) must be in 2..4, got {stage}")
        if stride < 1:
            raise ValueError(f"HILA stride for stage {stage} (MODEL.HILA.STRIDES) must be >= 1, got {stride}")
        self.stage, self.stride, self.patch_size = stage, stride, patch_size
        d_high, d_low = base.dims[stage - 1], base.dims[stage - 2]
        self.num_iterations = math.ceil(len(base.stage_blocks(stage)) / stride)
        n_bu = 1 if share_weights else self.num_iterations
        n_td = min(n_bu, self.num_iterations - 1)  # the first HILA block has no top-down update
        self.bottom_up = nn.ModuleList(
            InterLevelUpdate(BottomUpAttention(d_high, d_low, patch_size), d_high, ffn_ratio, alpha, beta)
            for _ in range(n_bu))
        self.top_down = nn.ModuleList(
            InterLevelUpdate(TopDownAttention(d_high, d_low, patch_size), d_low, ffn_ratio, alpha, beta)
            for _ in range(n_td))
        for m in (self.bottom_up, self.top_down):
            m.apply(init_transformer_weights)
        self.top_down_block = nn.ModuleList(base.make_block(stage - 1) for _ in range(n_td))
        self.last_top_down_attention: Optional[torch.Tensor] = None

    @staticmethod
    def _pick(modules: nn.ModuleList, i: int) -> nn.Module:
        return modules[min(i, len(modules) - 1)]

    def forward(self, base, high: torch.Tensor, Hh: int, Wh: int, low: torch.Tensor, Hl: int, Wl: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run stage ``self.stage`` of ``base`` on ``high`` with HILA; returns (high, top-down updated low)."""
        geo = PatchGeometry(Hl, Wl, Hh, Wh, self.patch_size, high.device)
        n = 0
        for j, block in enumerate(base.stage_blocks(self.stage)):
            if j % self.stride == 0:
                if n > 0:
                    td = self._pick(self.top_down, n - 1)
                    low = td(low, Hl, Wl, high, Hh, Wh, geo)
                    low = base.run_block(self._pick(self.top_down_block, n - 1), self.stage - 1, low, Hl, Wl)
                    if td.attn.record_attention:
                        self.last_top_down_attention = td.attn.last_attention
                high = self._pick(self.bottom_up, n)(high, Hh, Wh, low, Hl, Wl, geo)
                n += 1
            high = base.run_block(block, self.stage, high, Hh, Wh)
        return high, low


# --------------------------------------------------------------------------------------------------
# Swin base: Detectron2's Swin with the per-stage interface
# --------------------------------------------------------------------------------------------------
def _shifted_window_mask(H: int, W: int, window: int, shift: int, device) -> torch.Tensor:
    """Swin's SW-MSA mask for an H x W map (Detectron2 builds it inline in BasicLayer.forward)."""
    Hp, Wp = math.ceil(H / window) * window, math.ceil(W / window) * window
    img_mask = torch.zeros((1, Hp, Wp, 1), device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for n, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        img_mask[:, h, w, :] = n
    windows = window_partition(img_mask, window).view(-1, window * window)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class SwinBase(D2SwinTransformer):
    """Detectron2's Swin (``D2SwinTransformer``, unchanged parameters) with HILA's per-stage interface."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.ape:
            raise ValueError("HILA's Swin base does not support absolute position embeddings (APE)")
        self.dims = tuple(self.num_features)

    def embed(self, stage: int, x: torch.Tensor, H: int = 0, W: int = 0) -> Tuple[torch.Tensor, int, int]:
        if stage == 1:
            x = self.patch_embed(x)
            H, W = x.shape[-2:]
            return self.pos_drop(map_to_tokens(x)), H, W
        return self.layers[stage - 2].downsample(x, H, W), (H + 1) // 2, (W + 1) // 2

    def stage_blocks(self, stage: int) -> nn.ModuleList:
        return self.layers[stage - 1].blocks

    def run_block(self, block: nn.Module, stage: int, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        block.H, block.W = H, W
        mask = None
        if block.shift_size > 0:
            mask = _shifted_window_mask(H, W, block.window_size, block.shift_size, x.device)
        return block(x, mask)

    def out_norm(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"norm{stage - 1}")(x)

    def make_block(self, stage: int) -> nn.Module:
        """A shifted-window block like the stage's last one (HILA initialises it from that block)."""
        last = self.layers[stage - 1].blocks[-1]
        drop_path = last.drop_path.drop_prob if isinstance(last.drop_path, DropPath) else 0.0
        block = SwinTransformerBlock(last.dim, last.num_heads, last.window_size, last.window_size // 2,
                                     last.mlp_ratio, qkv_bias=last.attn.qkv.bias is not None,
                                     drop_path=drop_path)
        block.apply(self._init_weights)
        return block


def _build_base(name: str, drop_path_rate: float, in_chans: int):
    if name not in BASE_MODELS:
        raise KeyError(f"MODEL.HILA.BASE = {name!r} is not a known base model; choose one of {sorted(BASE_MODELS)}")
    family, kwargs = BASE_MODELS[name]
    kwargs = dict(kwargs)
    if drop_path_rate >= 0:
        kwargs["drop_path_rate"] = drop_path_rate
    if family == "mit":
        return MixVisionTransformer(in_chans=in_chans, **kwargs)
    return SwinBase(in_chans=in_chans, **kwargs)


# --------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------
class HILABackbone(HierarchicalBackbone):
    """A hierarchical ViT (``base``) with HILA on ``stages``; returns res2..res5 (the final, top-down updated
    stage outputs) and ds3..ds5 (the outputs of the downsampling layers), paired for HCFormer.

    Args:
        base: base model name (``BASE_MODELS``: mit_b0 / mit_b1 / mit_b2 / mit_b2_d2262 / swin_t).
        stages: paper stages (2..4) carrying HILA, e.g. (3,) or (2, 3, 4).
        strides: s_l per paper stage 1..4: HILA wraps blocks 0, s, 2s, ... of stage l.
        ffn_ratios: E_l per paper stage 1..4, expansion of the HILA FFNs of stage l.
        alpha, beta: information propagation constants (eq. 3 / 6).
        patch_size: p_l, side of the local patch (4 in the paper).
        share_weights: share the added weights across the iterations of a stage (paper default).
        drop_path_rate: overrides the base model's stochastic depth when >= 0.
    """

    family = "HILA"
    config_node = "MODEL.HILA"

    def __init__(self, base: str = "mit_b1", stages: Sequence[int] = (2, 3, 4),
                 strides: Sequence[int] = (1, 1, 1, 1), ffn_ratios: Sequence[float] = (4, 4, 4, 4),
                 alpha: float = 0.5, beta: float = 0.5, patch_size: int = 4, share_weights: bool = True,
                 drop_path_rate: float = -1.0, in_chans: int = 3, out_features: Optional[Sequence[str]] = None):
        super().__init__()
        for name, values in (("strides", strides), ("ffn_ratios", ffn_ratios)):
            if len(values) != 4:
                raise ValueError(f"HILA {name} (MODEL.HILA.{name.upper()}) needs 4 entries (stages 1..4), "
                                 f"got {list(values)}")
        stages = sorted(set(int(s) for s in stages))
        self.base = _build_base(base, drop_path_rate, in_chans)
        self.stages = tuple(stages)
        self.hila = nn.ModuleDict({
            str(s): HILAStage(self.base, s, strides[s - 1], ffn_ratios[s - 1], alpha, beta, patch_size,
                              share_weights)
            for s in stages})
        self.init_outputs(self.base.dims, out_features)

    def record_attention(self, enabled: bool = True) -> None:
        """Keep the last top-down attention of every HILA stage (for :func:`compose_top_down_attention`);
        enabling clears what an earlier forward kept."""
        for stage in self.hila.values():
            for update in stage.top_down:
                update.attn.record_attention = enabled
                update.attn.last_attention = None
            if enabled:
                stage.last_top_down_attention = None

    def top_down_attentions(self) -> Dict[int, torch.Tensor]:
        """{stage l: (B, H_l*W_l, p*p) attention of the last top-down update from stage l to l-1}."""
        return {int(k): s.last_top_down_attention for k, s in self.hila.items()
                if s.last_top_down_attention is not None}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        self.check_input(x)
        base = self.base
        outputs, streams = {}, {}
        H = W = 0
        for stage in range(1, 5):
            # the patch embedding reads stage-1 features before this stage's top-down updates (Fig. 2b)
            x, H, W = base.embed(stage, x, H, W)
            if stage > 1:
                outputs[downsampled_name(stage + 1)] = tokens_to_map(x, H, W)
            if str(stage) in self.hila:
                low, Hl, Wl = streams[stage - 1]
                x, low = self.hila[str(stage)](base, x, H, W, low, Hl, Wl)
                streams[stage - 1] = (low, Hl, Wl)
            else:
                for block in base.stage_blocks(stage):
                    x = base.run_block(block, stage, x, H, W)
            streams[stage] = (x, H, W)
        for stage, (tokens, h, w) in streams.items():
            outputs[f"res{stage + 1}"] = tokens_to_map(base.out_norm(stage, tokens), h, w)
        return self.select_outputs(outputs)


def add_hila_config(cfg: CN) -> None:
    """Add ``MODEL.HILA``: PRESET plus per-field overrides ("unset" values take the preset's)."""
    cfg.MODEL.HILA = CN()
    node = cfg.MODEL.HILA
    node.PRESET = "mit_b1_s234"  # mit_b0_s3 | mit_b1_s3 | mit_b1_s234 | mit_b2_s234 | swin_t_s234
    node.BASE = ""  # mit_b0 | mit_b1 | mit_b2 | mit_b2_d2262 (MiT-B2 on depths 2,2,6,2) | swin_t
    node.STAGES = []  # paper stages 2..4 carrying HILA, e.g. [3] or [2, 3, 4]
    node.STRIDES = []  # s_l for stages 1..4
    node.FFN_RATIOS = []  # E_l of the HILA FFNs for stages 1..4
    node.ALPHA = -1.0
    node.BETA = -1.0
    node.PATCH_SIZE = -1
    node.DROP_PATH_RATE = -1.0  # base model's stochastic depth; unset keeps the base model's default
    node.SHARE_WEIGHTS = True  # share HILA weights across the iterations of a stage (Sec. 3.5)
    node.OUT_FEATURES = list(ALL_OUTPUTS)


@BACKBONE_REGISTRY.register()
def build_hila_backbone(cfg: CN, input_shape: ShapeSpec) -> HILABackbone:
    """HILA backbone from ``MODEL.HILA`` (preset + overrides)."""
    kwargs = resolve_preset(cfg.MODEL.HILA, HILA_PRESETS, "MODEL.HILA")
    return HILABackbone(in_chans=input_shape.channels, **kwargs)


# --------------------------------------------------------------------------------------------------
# Hierarchical attention (App. A.3, eq. 14-15)
# --------------------------------------------------------------------------------------------------
def compose_top_down_attention(attentions: Dict[int, torch.Tensor], sizes: Dict[int, Tuple[int, int]],
                               location: Tuple[int, int], patch_size: int = 4) -> List[torch.Tensor]:
    """Compose top-down attention from the top stage down (eq. 14-15) for one top-stage feature.

    Args:
        attentions: {stage l: (H_l*W_l, p*p) top-down attention from stage l to l-1 (one image)}; the
            stages must be consecutive and end with the top one.
        sizes: {stage: (H, W)} of every stage involved (the top one and every stage below an attention).
        location: (row, col) of the feature in the top stage.
    Returns:
        one (H, W) map per lower stage, top-down: M_{top->top-1} normalised to sum 1, then M_bar of eq. 14,
        eq. 15, ... each summing to 1.
    """
    stages = sorted(attentions, reverse=True)
    if stages != list(range(stages[0], stages[0] - len(stages), -1)):
        raise ValueError(f"top-down attentions must come from consecutive stages, got {sorted(stages)}")
    top = stages[0]
    Ht, Wt = sizes[top]
    r, c = location
    if not (0 <= r < Ht and 0 <= c < Wt):
        raise ValueError(f"location {location} is outside the stage-{top} map of {Ht}x{Wt}")
    weight = torch.zeros(Ht * Wt, dtype=attentions[top].dtype, device=attentions[top].device)
    weight[r * Wt + c] = 1.0
    maps = []
    for stage in stages:
        (Hh, Wh), (Hl, Wl) = sizes[stage], sizes[stage - 1]
        geo = PatchGeometry(Hl, Wl, Hh, Wh, patch_size, weight.device)
        m = attentions[stage].reshape(Hh * Wh, patch_size * patch_size) * geo.valid
        # sum over the higher-level features of weight * their attention on each lower feature, normalise
        lower = geo.fold((weight[:, None] * m)[None, :, :, None])[0, 0]
        lower = lower / lower.sum().clamp_min(1e-12)
        maps.append(lower)
        weight = lower.flatten()
    return maps


# --------------------------------------------------------------------------------------------------
# Checkpoint conversion for HILA on MiT
# --------------------------------------------------------------------------------------------------
def _drop_blocks_beyond(state_dict: Dict[str, torch.Tensor], depths: Sequence[int],
                        checkpoint_depths: Sequence[int]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(state_dict without the tensors of blocks ``blockS.J`` with J >= depths[S-1], their names).

    Only a checkpoint whose stages hold exactly ``checkpoint_depths`` blocks is cut; anything else is left
    alone (and fails the strict comparison with the model afterwards)."""
    found = [1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith(f"block{s}.")), default=-1)
             for s in range(1, 5)]
    if tuple(found) != tuple(checkpoint_depths):
        return state_dict, []
    kept, dropped = {}, []
    for key, value in state_dict.items():
        name, index = key.split(".")[:2]
        if name.startswith("block") and int(index) >= depths[int(name[len("block"):]) - 1]:
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped


def convert_mit_state_dict_for_hila(state_dict: Dict[str, torch.Tensor], preset: str = "mit_b1_s234",
                                    share_weights: bool = True, prefix: str = "backbone."
                                    ) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """Map an authors' MiT state dict onto :class:`HILABackbone` (``preset`` with a MiT base).

    The MiT tensors go under ``{prefix}base.``; as in the paper (Sec. 4.2, "Pretraining") each top-down
    self-attention block of stage l starts as a copy of the last block of stage l-1 in the base model.
    Returns (converted, dropped, kept_at_initialisation): ``dropped`` lists the checkpoint tensors not used
    (the ImageNet head and, for a base in :data:`TRUNCATED_BASES` such as B2 + S(2,3,4)'s MiT-B2 on depths
    2, 2, 6, 2, the blocks of the checkpoint's base beyond the base's depths, e.g. block1.2, block2.2,
    block2.3, block4.2 of mit_b2; those are also logged as a warning); the remaining HILA parameters
    (inter-level attentions and FFNs) are listed in the third item and keep their random initialisation.
    """
    if preset not in HILA_PRESETS or not HILA_PRESETS[preset]["base"].startswith("mit"):
        raise KeyError(f"HILA preset {preset!r} is not a MiT-based preset; choose one of "
                       f"{sorted(k for k, v in HILA_PRESETS.items() if v['base'].startswith('mit'))}")
    base_sd, dropped = convert_mit_state_dict(state_dict, prefix="")
    kwargs = dict(HILA_PRESETS[preset], share_weights=share_weights)
    model = HILABackbone(**kwargs)
    depths = model.base.depths
    source = TRUNCATED_BASES.get(kwargs["base"])
    if source is not None:
        base_sd, cut = _drop_blocks_beyond(base_sd, depths, BASE_MODELS[source][1]["depths"])
        if cut:
            blocks = sorted({".".join(k.split(".")[:2]) for k in cut})
            logger.warning("HILA preset %r builds its base %s on depths %s: dropping %d tensors of the %s "
                           "checkpoint's blocks %s: %s", preset, kwargs["base"], tuple(depths), len(cut),
                           source, ", ".join(blocks), ", ".join(cut))
            dropped = dropped + cut
    check_against_model(base_sd, model.base.state_dict(), f"MiT checkpoint for HILA preset {preset!r} "
                        f"(base {kwargs['base']}" + (f", from a {source} checkpoint)" if source else ")"))
    converted = {f"{prefix}base.{k}": v for k, v in base_sd.items()}
    kept = []
    for key in model.state_dict():
        if not key.startswith("hila."):
            continue
        _, stage, part, rest = key.split(".", 3)
        if part == "top_down_block":
            source_key = f"block{int(stage) - 1}.{depths[int(stage) - 2] - 1}.{rest.split('.', 1)[1]}"
            converted[prefix + key] = base_sd[source_key].clone()
        else:
            kept.append(prefix + key)
    return converted, dropped, kept
