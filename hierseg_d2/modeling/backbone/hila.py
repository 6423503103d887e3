"""HILA: Hierarchical Inter-Level Attention around the blocks of a hierarchical ViT (MiT or Swin).

Leung et al., "Improving Semantic Segmentation in Transformers using Hierarchical Inter-Level Attention"
(Sec. 3, App. A.1-A.3, Table 5), computed as the authors' release (github.com/fidler-lab/hila) does;
docs/hila.md, "Release vs paper", lists every difference and the options keeping the paper's reading.
For every HILA stage l (numbered 1..4 as in the paper; stage l gives ``res{l+1}``), the "higher level" is
stage l and the "lower level" is stage l-1. Around the blocks j of stage l:

* bottom-up update before blocks 0, s, 2s, ...: every higher-level feature attends to the 16 lower-level
  features of its 4x4 patch (stride 2, padding 1; eq. 1-2), alpha/beta-weighted Mix-FFN (eq. 3), then the
  base model's own block j (eq. 4);
* top-down update after every block j != last with (j - 1) % s == 0 (the release's schedule;
  ``schedule="paper"``: before the bottom-up updates of blocks s, 2s, ...): every lower-level feature
  attends to the 1-4 higher-level features whose patches cover it, softmax across exactly those (eq. 5),
  alpha/beta-weighted Mix-FFN (eq. 6), then a *new* self-attention block of the lower stage's design (eq. 7).

Both attentions are single-head with width d = min(d_l, d_{l-1}), pre-LayerNorm on both inputs, logits
scaled by (query width)^-0.5 as the release (``scale="attn"``: the paper's 1/sqrt(d)), a learned
relative-position bias per position in the patch and an output projection back to the updated level's
width (App. A.1). The bottom-up patch of a border feature reaches outside the lower map: as the release
(an unfold with zero padding of the normed features) those positions are zero features taking part in the
softmax (``mask_padding=True`` leaves them out). The added weights of a stage are shared across its
iterations (Sec. 3.5; ``share_weights=False`` gives the Table 7b ablation).

What is updated is, as in the release, the lower level in the form it is handed on: for MiT the normed
stage output (``norm{l-1}``, also what the patch embedding into stage l reads, before the updates), for
Swin the stage's residual stream; the updated level is closed by the release's extra LayerNorm
(``prevnorm``; MiT once after the stage, Swin after every block no top-down update follows) and that is
``res{l}``. HILA's own norms are ``nn.LayerNorm`` (eps 1e-5) as in the release.

Reading of the parts the paper leaves open (documented in docs/hila.md): the top-down FFN uses the
stage's HILA expansion E_l; B2 + S(2,3,4) is MiT-B2 on Table 5's depths 2, 2, 6, 2 (``mit_b2_d2262``) with
E_l = 4 throughout (both as the release's config). Sizes: an odd lower map of n gives a higher map of
ceil(n / 2) (overlapping patch embedding or Swin's padded PatchMerging), and the last patch then reaches
one row further into the padding (the release runs even maps only).

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

from .convert import add_prefix, check_against_model, strip_prefixes
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
    "convert_hila_state_dict",
    "hila_schedule",
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
    position bias per patch position, output projection ``proj`` (the paper's f) back to ``query_dim``.

    ``scale="query"`` scales the logits by query_dim^-0.5 as the release (its InterLevelAttention takes
    the head width of the *query* level, which for bottom-up is d_l, not the attention width
    min(d_l, d_{l-1})); ``scale="attn"`` is the paper's 1/sqrt(d) with d the attention width. The release's
    two zero-initialised tables (``relative_position_init`` + ``relative_position_bias_table``) are always
    added together, so one table holds their sum (the converter adds them)."""

    def __init__(self, query_dim: int, key_dim: int, dim: int, patch_size: int = 4, scale: str = "query"):
        super().__init__()
        if scale not in ("query", "attn"):
            raise ValueError(f"HILA bottom-up scale (MODEL.HILA.BOTTOM_UP_SCALE) must be 'query' or 'attn', "
                             f"got {scale!r}")
        self.patch_size = patch_size
        self.scale = (query_dim if scale == "query" else dim) ** -0.5
        self.norm_q = nn.LayerNorm(query_dim)
        self.norm_kv = nn.LayerNorm(key_dim)
        self.q = nn.Linear(query_dim, dim)
        self.k = nn.Linear(key_dim, dim)
        self.v = nn.Linear(key_dim, dim)
        self.proj = nn.Linear(dim, query_dim)
        # B of eq. 1: the relative offset of a lower feature to a higher one is its position in the patch
        self.relative_position_bias_table = nn.Parameter(torch.zeros(patch_size * patch_size))
        self.record_attention = False
        self.last_attention: Optional[torch.Tensor] = None


class BottomUpAttention(_InterLevelAttention):
    """attn(X_l, X_{l-1,P}) of eq. 1: each higher-level feature attends to the p x p lower-level patch.

    Patch positions outside the lower map: the release unfolds the *normed* lower features with zero
    padding, so such a position is a zero feature whose key / value are the biases of k / v and which takes
    part in the softmax (default); ``mask_padding=True`` leaves them out (our reading of the paper)."""

    def __init__(self, dim_high: int, dim_low: int, patch_size: int = 4, scale: str = "query",
                 mask_padding: bool = False):
        super().__init__(dim_high, dim_low, min(dim_high, dim_low), patch_size, scale)
        self.mask_padding = mask_padding

    def _patches(self, linear: nn.Linear, x: torch.Tensor, Hl: int, Wl: int, geo: PatchGeometry) -> torch.Tensor:
        if self.mask_padding:
            return geo.unfold(tokens_to_map(linear(x), Hl, Wl))
        # linear(0) = bias at the zero-padded positions, exactly as a linear after a zero-padded unfold
        return geo.unfold(tokens_to_map(linear(x) - linear.bias, Hl, Wl)) + linear.bias

    def forward(self, x_high: torch.Tensor, Hh: int, Wh: int, x_low: torch.Tensor, Hl: int, Wl: int,
                geometry: Optional[PatchGeometry] = None) -> torch.Tensor:
        geo = geometry or PatchGeometry(Hl, Wl, Hh, Wh, self.patch_size, x_low.device)
        q = self.q(self.norm_q(x_high))  # (B, L, d)
        kv = self.norm_kv(x_low)
        k = self._patches(self.k, kv, Hl, Wl, geo)  # (B, L, P, d)
        v = self._patches(self.v, kv, Hl, Wl, geo)
        logits = torch.einsum("bld,blpd->blp", q, k) * self.scale + self.relative_position_bias_table
        if self.mask_padding:
            logits = logits.masked_fill(~geo.valid, float("-inf"))
        attn = logits.softmax(dim=-1)
        if self.record_attention:
            self.last_attention = attn.detach()
        return self.proj(torch.einsum("blp,blpd->bld", attn, v))


class TopDownAttention(_InterLevelAttention):
    """attn(X_{l-1}, X_{l,P^}) of eq. 5: each lower-level feature attends to the higher-level features
    whose patches cover it, softmax across exactly those (App. A.2's fold trick, numerically stabilised).
    Padded patch positions only ever land on padding, which the fold crops: the release and the paper agree."""

    def __init__(self, dim_high: int, dim_low: int, patch_size: int = 4, scale: str = "query"):
        super().__init__(dim_low, dim_high, min(dim_high, dim_low), patch_size, scale)

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


def hila_schedule(depth: int, stride: int, schedule: str = "release") -> Tuple[List[int], List[int]]:
    """(blocks j preceded by a bottom-up update, blocks j preceded by a top-down update) of a stage.

    Bottom-up precedes blocks 0, s, 2s, ... in both readings. The release runs a top-down update (with the
    new block) right after every block j != last with (j - 1) % s == 0, i.e. before block j + 1 (for s = 1, 2
    that is before blocks s, 2s, ...; for s = 3 before blocks 2, 5, ...). The paper (Fig. 2b) puts it before
    every bottom-up update but the first: blocks s, 2s, ... A top-down update always comes before the
    bottom-up update of the same block."""
    if schedule not in ("release", "paper"):
        raise ValueError(f"HILA schedule (MODEL.HILA.SCHEDULE) must be 'release' or 'paper', got {schedule!r}")
    bottom_up = list(range(0, depth, stride))
    if schedule == "release":
        top_down = [j + 1 for j in range(depth - 1) if (j - 1) % stride == 0]
    else:
        top_down = bottom_up[1:]
    return bottom_up, top_down


class HILAStage(nn.Module):
    """The added (red) parts of Fig. 2b for one stage and the loop that interleaves them with its blocks.

    ``bottom_up`` / ``top_down`` are :class:`InterLevelUpdate` s, ``top_down_block`` the new self-attention
    block of the lower stage; each is a ModuleList of one shared module (default) or one per iteration.
    ``prevnorm`` is the release's extra LayerNorm of the lower level (``prevnorm`` / Swin's ``bottom_norm``):
    ``prevnorm="end"`` (MiT) applies it once after the stage, ``"idle"`` (Swin) after every block of the
    stage that no top-down update follows, as the release's Swin does (so twice after the last block when
    the one before it had no top-down update either).
    """

    def __init__(self, base, stage: int, stride: int, ffn_ratio: float, alpha: float, beta: float,
                 patch_size: int, share_weights: bool = True, schedule: str = "release", scale: str = "query",
                 mask_padding: bool = False, prevnorm: str = "end"):
        super().__init__()
        if not 2 <= stage <= 4:
            raise ValueError(f"HILA stages (MODEL.HILA.STAGES) must be in 2..4, got {stage}")
        if stride < 1:
            raise ValueError(f"HILA stride for stage {stage} (MODEL.HILA.STRIDES) must be >= 1, got {stride}")
        self.stage, self.stride, self.patch_size = stage, stride, patch_size
        self.prevnorm_mode = prevnorm
        d_high, d_low = base.dims[stage - 1], base.dims[stage - 2]
        depth = len(base.stage_blocks(stage))
        self.bottom_up_at, self.top_down_at = hila_schedule(depth, stride, schedule)
        n_bu = 1 if share_weights else len(self.bottom_up_at)
        n_td = min(1, len(self.top_down_at)) if share_weights else len(self.top_down_at)
        self.bottom_up = nn.ModuleList(
            InterLevelUpdate(BottomUpAttention(d_high, d_low, patch_size, scale, mask_padding), d_high, ffn_ratio,
                             alpha, beta)
            for _ in range(n_bu))
        self.top_down = nn.ModuleList(
            InterLevelUpdate(TopDownAttention(d_high, d_low, patch_size, scale), d_low, ffn_ratio, alpha, beta)
            for _ in range(n_td))
        for m in (self.bottom_up, self.top_down):
            m.apply(init_transformer_weights)
        self.top_down_block = nn.ModuleList(_make_top_down_block(base, stage - 1) for _ in range(n_td))
        self.prevnorm = nn.LayerNorm(d_low)  # the release's nn.LayerNorm (eps 1e-5)
        self.last_top_down_attention: Optional[torch.Tensor] = None

    @staticmethod
    def _pick(modules: nn.ModuleList, i: int) -> nn.Module:
        return modules[min(i, len(modules) - 1)]

    def forward(self, base, high: torch.Tensor, Hh: int, Wh: int, low: torch.Tensor, Hl: int, Wl: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run stage ``self.stage`` of ``base`` on ``high`` with HILA; returns (high, top-down updated low,
        closed by ``prevnorm``)."""
        geo = PatchGeometry(Hl, Wl, Hh, Wh, self.patch_size, high.device)
        n_bu = n_td = 0
        idle = self.prevnorm_mode == "idle"
        run_td_block = getattr(base, "run_top_down_block", None)
        for j, block in enumerate(base.stage_blocks(self.stage)):
            if j in self.top_down_at:
                td = self._pick(self.top_down, n_td)
                low = td(low, Hl, Wl, high, Hh, Wh, geo)
                td_block = self._pick(self.top_down_block, n_td)
                if run_td_block is not None:
                    low = run_td_block(td_block, self.stage - 1, low, Hl, Wl, n_td)
                else:
                    low = base.run_block(td_block, self.stage - 1, low, Hl, Wl)
                if td.attn.record_attention:
                    self.last_top_down_attention = td.attn.last_attention
                n_td += 1
            elif idle and j > 0:
                low = self.prevnorm(low)
            if j in self.bottom_up_at:
                high = self._pick(self.bottom_up, n_bu)(high, Hh, Wh, low, Hl, Wl, geo)
                n_bu += 1
            high = base.run_block(block, self.stage, high, Hh, Wh)
        return high, self.prevnorm(low)


def _make_top_down_block(base, stage: int) -> nn.Module:
    """The new self-attention block of ``stage`` (the lower level). The release builds HILA's blocks with
    ``nn.LayerNorm`` (eps 1e-5), not the base blocks' LayerNorm(eps=1e-6)."""
    block = base.make_block(stage)
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-5
    return block


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

    def run_top_down_block(self, block: nn.Module, stage: int, x: torch.Tensor, H: int, W: int,
                           call: int) -> torch.Tensor:
        """The release's Swin top-down block flips its shift after every call, starting (as the copy of the
        stage's last, shifted block that its config makes) with window // 2: calls 0, 2, ... are shifted,
        1, 3, ... not. (The release keeps that state across forward passes; we start every forward anew.)"""
        block.shift_size = block.window_size // 2 if call % 2 == 0 else 0
        return self.run_block(block, stage, x, H, W)

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


def _build_base(name: str, drop_path_rate: float, in_chans: int, overrides: Optional[dict] = None):
    if name not in BASE_MODELS:
        raise KeyError(f"MODEL.HILA.BASE = {name!r} is not a known base model; choose one of {sorted(BASE_MODELS)}")
    family, kwargs = BASE_MODELS[name]
    kwargs = dict(kwargs, **(overrides or {}))
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

    As the release, the inter-level updates of stage l read and update stage l-1 in the form the release
    hands on: for MiT the *normed* stage output (what the next patch embedding reads), for Swin the stage's
    residual stream (PatchMerging reads it and norms inside); either way the updated lower level is closed
    by the stage's ``prevnorm`` and that is ``res{l}``.

    Args:
        base: base model name (``BASE_MODELS``: mit_b0 / mit_b1 / mit_b2 / mit_b2_d2262 / swin_t).
        stages: paper stages (2..4) carrying HILA, e.g. (3,) or (2, 3, 4).
        strides: s_l per paper stage 1..4: bottom-up updates precede blocks 0, s, 2s, ... of stage l.
        ffn_ratios: E_l per paper stage 1..4, expansion of the HILA FFNs of stage l.
        alpha, beta: information propagation constants (eq. 3 / 6).
        patch_size: p_l, side of the local patch (4 in the paper).
        share_weights: share the added weights across the iterations of a stage (paper default).
        schedule: "release" (default) or "paper": where the top-down updates go (:func:`hila_schedule`).
        scale: "query" (release: query width^-0.5) or "attn" (paper: attention width^-0.5).
        mask_padding: leave patch positions outside the lower map out of the bottom-up softmax (paper
            reading); the release lets them in as zero features (default False).
        drop_path_rate: overrides the base model's stochastic depth when >= 0.
        base_overrides: constructor arguments of the base model replacing the preset's (e.g. smaller widths).
    """

    family = "HILA"
    config_node = "MODEL.HILA"

    def __init__(self, base: str = "mit_b1", stages: Sequence[int] = (2, 3, 4),
                 strides: Sequence[int] = (1, 1, 1, 1), ffn_ratios: Sequence[float] = (4, 4, 4, 4),
                 alpha: float = 0.5, beta: float = 0.5, patch_size: int = 4, share_weights: bool = True,
                 schedule: str = "release", scale: str = "query", mask_padding: bool = False,
                 drop_path_rate: float = -1.0, in_chans: int = 3, out_features: Optional[Sequence[str]] = None,
                 base_overrides: Optional[dict] = None):
        super().__init__()
        for name, values in (("strides", strides), ("ffn_ratios", ffn_ratios)):
            if len(values) != 4:
                raise ValueError(f"HILA {name} (MODEL.HILA.{name.upper()}) needs 4 entries (stages 1..4), "
                                 f"got {list(values)}")
        stages = sorted(set(int(s) for s in stages))
        self.base = _build_base(base, drop_path_rate, in_chans, base_overrides)
        self.base_family = BASE_MODELS[base][0]
        self.stages = tuple(stages)
        prevnorm = "end" if self.base_family == "mit" else "idle"
        self.hila = nn.ModuleDict({
            str(s): HILAStage(self.base, s, strides[s - 1], ffn_ratios[s - 1], alpha, beta, patch_size,
                              share_weights, schedule, scale, mask_padding, prevnorm)
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
        normed_stream = self.base_family == "mit"
        outputs, streams = {}, {}
        H = W = 0
        for stage in range(1, 5):
            # the downsampling layer reads stage-1 before this stage's top-down updates (Fig. 2b)
            if stage == 1:
                x, H, W = base.embed(1, x)
            else:
                low, Hl, Wl = streams[stage - 1]
                x, H, W = base.embed(stage, tokens_to_map(low, Hl, Wl) if normed_stream else low, Hl, Wl)
                outputs[downsampled_name(stage + 1)] = tokens_to_map(x, H, W)
            if str(stage) in self.hila:
                low, Hl, Wl = streams[stage - 1]
                x, low = self.hila[str(stage)](base, x, H, W, low, Hl, Wl)
                outputs[f"res{stage}"] = tokens_to_map(low, Hl, Wl)
            else:
                for block in base.stage_blocks(stage):
                    x = base.run_block(block, stage, x, H, W)
            normed = base.out_norm(stage, x)
            outputs[f"res{stage + 1}"] = tokens_to_map(normed, H, W)  # replaced if stage + 1 has HILA
            streams[stage] = (normed if normed_stream else x, H, W)
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
    # Release vs paper (docs/hila.md): the release is the default, the paper's reading an option
    node.SCHEDULE = "release"  # "release": top-down after blocks j with (j - 1) % s == 0; "paper": before s, 2s..
    node.SCALE = "query"  # "query": logits * query width^-0.5 (release); "attn": attention width^-0.5 (paper)
    node.MASK_PADDING = False  # True: bottom-up ignores patch positions outside the lower map (paper reading)
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
    (inter-level attentions and FFNs, ``prevnorm``) are listed in the third item and keep their
    initialisation. For the authors' HILA checkpoints use :func:`convert_hila_state_dict`.
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


# --------------------------------------------------------------------------------------------------
# Checkpoint conversion from the HILA release (fidler-lab/hila: HILASegformer / def_b*_hila, def_swin_t_hila)
# --------------------------------------------------------------------------------------------------
# Inside one inter-level update: release name -> ours. The release's TopDownAttn norms its query (the lower
# level) with norm1, the higher level with norm2 and the FFN input with norm3; BottomUpAttn uses norm4
# (query, higher), norm5 (lower), norm6 (FFN).
_RELEASE_UPDATE_PARTS = {
    "top_down": {"attn": "topdown_attn", "norm_q": "norm1", "norm_kv": "norm2", "norm": "norm3",
                 "mlp": "bottom_mlp"},
    "bottom_up": {"attn": "bottomup_attn", "norm_q": "norm4", "norm_kv": "norm5", "norm": "norm6",
                  "mlp": "top_mlp"},
}
# Names dropped on purpose: the ImageNet head, the mmseg decode heads of a segmentation checkpoint, and
# the release's flag buffer recording that the top-down blocks were re-initialised (no weights).
_RELEASE_DROPPED = ("head.", "decode_head.", "auxiliary_head.", "reuse_bottomsa_pretraining_flag")


def _convert_release_update(part: str, rest: str, source: Dict[str, torch.Tensor], name: str,
                            out: Dict[str, torch.Tensor], ours: str) -> List[str]:
    """Map one tensor ``rest`` of a release TopDownAttn / BottomUpAttn (``part``) onto ``ours`` + our name;
    returns the release names consumed. kv is split into k / v; the two position tables are summed."""
    names = _RELEASE_UPDATE_PARTS[part]
    attn = names["attn"] + "."
    if rest.startswith(attn):
        sub = rest[len(attn):]
        if sub in ("q.weight", "q.bias", "proj.weight", "proj.bias"):
            out[ours + "attn." + sub] = source[name]
            return [name]
        if sub in ("kv.weight", "kv.bias"):
            k, v = source[name].chunk(2, dim=0)  # the release reshapes kv's output as (2, heads, width)
            out[ours + "attn.k." + sub[3:]] = k.clone()
            out[ours + "attn.v." + sub[3:]] = v.clone()
            return [name]
        if sub in ("relative_position_init", "relative_position_bias_table"):
            prefix = name[:-len(sub)]
            pair = [prefix + "relative_position_init", prefix + "relative_position_bias_table"]
            missing = [n for n in pair if n not in source]
            if missing:
                raise KeyError(f"HILA release checkpoint has {name!r} but not {missing[0]!r} (both are added "
                               f"to the attention logits)")
            out[ours + "attn.relative_position_bias_table"] = source[pair[0]] + source[pair[1]]
            return pair
    for our_norm in ("norm_q", "norm_kv", "norm"):
        release_norm = names[our_norm] + "."
        if rest.startswith(release_norm) and rest[len(release_norm):] in ("weight", "bias"):
            target = ("attn." if our_norm != "norm" else "") + our_norm + "." + rest[len(release_norm):]
            out[ours + target] = source[name]
            return [name]
    mlp = names["mlp"] + "."
    if rest.startswith(mlp):
        out[ours + "mlp." + rest[len(mlp):]] = source[name]
        return [name]
    raise KeyError(f"HILA release checkpoint tensor {name!r} is not part of a {names['attn']} update")


def _release_hila_key(key: str) -> Optional[Tuple[int, str, int, str]]:
    """(paper stage, our part, index, rest) of a release HILA tensor name, or None for a base-model one."""
    parts = key.split(".")
    if parts[0] in ("topdown", "bottomup", "prevblock", "prevnorm"):  # MiT: <part>.<bottom><top>.<i>.<rest>
        tag = parts[1]
        if len(tag) != 2 or not tag.isdigit() or int(tag[1]) != int(tag[0]) + 1:
            raise KeyError(f"HILA release checkpoint tensor {key!r}: {tag!r} is not a pair of consecutive "
                           f"stages such as '23'")
        stage = int(tag[1])
        if parts[0] == "prevnorm":
            return stage, "prevnorm", 0, ".".join(parts[2:])
        ours = {"topdown": "top_down", "bottomup": "bottom_up", "prevblock": "top_down_block"}[parts[0]]
        return stage, ours, int(parts[2]), ".".join(parts[3:])
    if parts[0] == "layers" and len(parts) > 3 and parts[2] in ("top_down", "bottom_up", "bottom_sa",
                                                              "bottom_norm"):  # Swin: layers.<i>.<part>...
        stage = int(parts[1]) + 1
        if parts[2] == "bottom_norm":
            return stage, "prevnorm", 0, ".".join(parts[3:])
        if parts[2] == "bottom_sa":
            return stage, "top_down_block", int(parts[3]), ".".join(parts[4:])
        return stage, parts[2], 0, ".".join(parts[3:])
    return None


def convert_hila_state_dict(state_dict: Dict[str, torch.Tensor], preset: str = "mit_b1_s234",
                            prefix: str = "backbone.", model: Optional[nn.Module] = None, **overrides
                            ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map a checkpoint of the HILA release (its ImageNet-pretrained HILA backbones or a trained mmseg
    segmentation model; MiT or Swin) onto :class:`HILABackbone` built from ``preset`` (+ ``overrides``).

    Base-model tensors keep their names under ``{prefix}base.`` (MiT: ``patch_embed*``, ``block*``,
    ``norm*``; Swin: ``patch_embed``, ``layers.<i>.blocks`` / ``downsample``, ``norm<i>``). HILA tensors:
    ``topdown.<b><t>.<i>`` / ``layers.<t-1>.top_down`` -> ``hila.<t>.top_down.<i>``, ``bottomup`` /
    ``bottom_up`` -> ``bottom_up``, ``prevblock`` / ``bottom_sa`` -> ``top_down_block``, ``prevnorm`` /
    ``bottom_norm`` -> ``prevnorm``; inside an update the release's ``kv`` is split into ``k`` / ``v``,
    ``relative_position_init + relative_position_bias_table`` become our one table, and norm1..6 become
    norm_q / norm_kv / norm (see ``_RELEASE_UPDATE_PARTS``). Returns (converted, dropped); every tensor is
    either mapped or in ``dropped`` (ImageNet head, mmseg decode heads, the release's re-initialisation flag),
    anything else raises ``KeyError`` naming it, and the result must match the model exactly (strict):
    ``model`` if given (a :class:`HILABackbone` of that preset), else one built from the preset.
    """
    if preset not in HILA_PRESETS:
        raise KeyError(f"HILA preset {preset!r} is not known; choose one of {sorted(HILA_PRESETS)}")
    kept, dropped = {}, []
    for name, tensor in state_dict.items():
        key = strip_prefixes(name)
        if key.startswith(_RELEASE_DROPPED):
            dropped.append(name)
        else:
            kept[key] = tensor
    kwargs = dict(HILA_PRESETS[preset], **overrides)
    family = BASE_MODELS[kwargs["base"]][0]
    base_names = ("patch_embed", "block", "norm") if family == "mit" else ("patch_embed.", "layers.", "norm")
    converted, consumed = {}, set()
    for key in kept:
        if key in consumed:
            continue
        where = _release_hila_key(key)
        if where is None:
            if not key.startswith(base_names):
                raise KeyError(f"HILA release checkpoint tensor {key!r} is not part of the release's "
                               f"{family} HILA layout")
            converted[f"base.{key}"] = kept[key]
            consumed.add(key)
            continue
        stage, part, index, rest = where
        ours = f"hila.{stage}.{part}." + (f"{index}." if part != "prevnorm" else "")
        if part in ("top_down", "bottom_up"):
            used = _convert_release_update(part, rest, kept, key, converted, ours)
            consumed.update(used)
        else:
            converted[ours + rest] = kept[key]
            consumed.add(key)
    model = HILABackbone(**kwargs) if model is None else model
    check_against_model(converted, model.state_dict(), f"HILA release checkpoint for preset {preset!r}")
    return add_prefix(converted, prefix), dropped
