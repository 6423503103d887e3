"""HAFA: Hierarchy Aware Feature Aggregation (Chen et al., ICCV 2023) on PVT v1 / PVTv2.

HAFA keeps the PVT stages (:mod:`.pvt`) and replaces how hierarchical features are aggregated (Sec. 3.1):

* **LAA** (Sec. 3.2, :class:`LocalAdaptiveAggregation`) at the first two downsamplings
  (``patch_embed2``, ``patch_embed3``): each output token aggregates n x n points sampled bilinearly at the
  regular patch grid plus learned offsets, P_E = P_I + O_f (eq. 1). The offsets are predicted from the
  input map by ``patch_embed{i}.offset`` (a conv with the patch's kernel and stride); the aggregation
  weights are the patch embedding's own ``proj``, applied with ``torchvision.ops.deform_conv2d``. The
  offset conv starts at zero, so an untrained LAA *is* the plain patch embedding (and PVT weights load).
* **SIA** (Sec. 3.3, :class:`SemanticInformationAggregation`) before stage 4: DPC-KNN (:func:`dpc_knn`,
  eqs. 2-4) groups the N stride-16 stage-3 tokens into M = ceil(N * ``cluster_ratio``) (default N / 4)
  clusters; each stride-16 token is lifted to the stage-4 width (``skip`` of the stage-3 token plus the
  stride-32 cell of the stage-4 downsampling conv ``patch_embed4`` that contains it, then ``norm``, as in
  TCFormer's token-merging module) and the tokens of a cluster are merged with learned importance weights
  (eq. 5, :func:`merge_tokens`, ``predictor`` = a DynamicViT-style local/global MLP, p = exp(score)).
* **Stage 4 on cluster tokens.** Its blocks (``block4.*``, PVT's own weights) take the M cluster tokens as
  queries. ``sia_clustering="q"`` (default, Table 5 "Q"): keys/values are the *unclustered* stride-32 grid
  tokens, i.e. the block input written back onto the map through the dictionary, with an implicit
  positional encoding (``kv_pos.{j}``, a residual 3x3 depth-wise conv on that map, CvT-style [42]; starts
  at zero). ``"qkv"`` (Table 5 "QKV"): keys/values are the cluster tokens themselves. No explicit position
  embedding is used after SIA (Sec. 3.1), so v1's ``pos_embed4`` does not exist here. PVTv2's
  convolutional FFN runs its depth-wise conv on the dictionary map as well.

Token <-> feature-map dictionary (Fig. 3, :class:`TokenMapDictionary`): it records, for every stride-16
position, the cluster its token was merged into. Tokens -> map: every stride-16 position takes its
cluster's feature, then 2x2 average pooling (ceil mode, partial windows averaged over their valid cells)
gives the stride-32 map of ceil(H/32) x ceil(W/32). Map -> tokens (the reverse): every stride-16 position
reads the stride-32 cell containing it, and a cluster averages over its positions. ``res5`` = the normed
stage-4 cluster tokens as a map; ``ds5`` (HCFormer's "after" map of level 4) = the SIA output (the merged
cluster tokens entering stage 4) as a map; ``ds3``/``ds4`` are the LAA outputs.

Parameters added to PVT (measured, see the README table): LAA offsets, SIA ``skip``/``norm``/
``predictor``, ``kv_pos``; for v1 the stage-4 downsampling becomes an overlapping 3x3 stride-2 conv (as in
PVTv2 and TCFormer) which the converter initialises exactly from v1's 2x2 kernel (taps [1:, 1:]).
"""
import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from torch import nn
from torchvision.ops import deform_conv2d

from .convert import check_against_model, strip_prefixes
from .hierarchy import downsampled_name
from .layers import PatchEmbed, init_transformer_weights, map_to_tokens, pad_to_multiple, tokens_to_map
from .presets import resolve_preset
from .pvt import PVT_PRESETS, PyramidVisionTransformer, add_pvt_fields, convert_pvt_state_dict, infer_pvt_preset

__all__ = ["HAFA_PRESETS", "HAFA", "LocalAdaptiveAggregation", "SemanticInformationAggregation",
           "TokenMapDictionary", "ImportancePredictor", "dpc_knn", "merge_tokens", "add_hafa_config",
           "build_hafa_backbone", "convert_hafa_state_dict"]

logger = logging.getLogger(__name__)

# HAFA versions of the PVT presets; Table 6: "HAFA defaults to 0.25 (standard feature pyramid ratio)".
HAFA_PRESETS = {name: dict(preset, cluster_ratio=0.25, cluster_k=5, sia_clustering="q")
                for name, preset in PVT_PRESETS.items()}


# ------------------------------------------------------------------------------------------------------
# LAA
# ------------------------------------------------------------------------------------------------------
class LocalAdaptiveAggregation(PatchEmbed):
    """Patch embedding whose n x n sampling points are the regular grid plus learned offsets (eq. 1).

    Same ``proj``/``norm`` as :class:`~.layers.PatchEmbed` (so PVT weights load) plus ``offset``, a conv
    with the patch's kernel/stride predicting (dy, dx) per sampling point and output position, in the
    ``deform_conv2d`` layout (2 * n * n channels: dy, dx of point 0, of point 1, ... row-major). Points
    are sampled bilinearly (zero outside the map) and aggregated with ``proj``'s weights.
    """

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int, overlap: bool = True):
        super().__init__(patch_size, stride, in_chans, embed_dim, overlap)
        self.offset = nn.Conv2d(in_chans, 2 * patch_size * patch_size, kernel_size=patch_size, stride=stride,
                                padding=self.proj.padding)
        self.reset_offsets()

    def reset_offsets(self) -> None:
        """Zero offsets: sampling starts on the regular grid, i.e. as the plain patch embedding."""
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        if not self.overlap:
            x = pad_to_multiple(x, self.stride)
        offset = self.offset(x)
        x = deform_conv2d(x, offset, self.proj.weight, self.proj.bias, stride=self.proj.stride,
                          padding=self.proj.padding)
        H, W = x.shape[-2:]
        return self.norm(map_to_tokens(x)), H, W


# ------------------------------------------------------------------------------------------------------
# SIA: clustering, dictionary, merging
# ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def dpc_knn(x: torch.Tensor, num_clusters: int, k: int = 5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours (HAFA eqs. 2-4), batched.

    Args:
        x: (B, N, C) token features.
        num_clusters: M, number of centres per image (1 <= M <= N).
        k: neighbours in the local density (capped at N - 1).
    Returns:
        idx: (B, N) cluster id of every token, in [0, M); cluster c is the centre ranked c-th.
        centres: (B, M) token index of every cluster's centre.

    d_ij = ||x_i - x_j||_2 (eq. 2); rho_i = exp(-1/k sum_{j in kNN(i)} d_ij^2) over the k nearest *other*
    tokens (eq. 3); delta_i = min d_ij over tokens of higher density (eq. 4), and for the densest token the
    largest distance of the image; centres = the M largest rho * delta; every other token joins its
    nearest centre. rho * delta is ranked as log(rho) + log(delta) (same order, no underflow of exp).
    Ties are broken deterministically: among equal densities / scores / distances the lower token index
    (for the assignment, the lower cluster id) wins.
    """
    B, N, _ = x.shape
    if not 1 <= num_clusters <= N:
        raise ValueError(f"dpc_knn: num_clusters must be in [1, {N}] for {N} tokens, got {num_clusters}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    d = torch.cdist(x, x).clamp_min_(0)
    d.diagonal(dim1=1, dim2=2).zero_()  # cdist's matrix-product path leaves rounding noise on the diagonal
    k = min(k, N - 1)
    if k > 0:
        # the k + 1 smallest distances of a row are 0 (itself) and its k nearest other tokens
        nearest = d.topk(k + 1, dim=-1, largest=False).values
        log_rho = -(nearest ** 2).sum(-1) / k
    else:
        log_rho = x.new_zeros(B, N)
    ar = torch.arange(N, device=x.device).expand(B, N)
    order = torch.sort(log_rho, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, ar)  # 0 = densest; equal densities: lower index first
    higher = rank.unsqueeze(1) < rank.unsqueeze(2)  # [b, i, j]: token j ranks above token i
    delta = d.masked_fill(~higher, float("inf")).amin(-1)
    delta = torch.where(rank == 0, d.flatten(1).amax(-1, keepdim=True), delta)
    score = log_rho + torch.log(delta)
    centres = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :num_clusters]
    to_centre = d.gather(2, centres.unsqueeze(1).expand(B, N, num_clusters))
    idx = to_centre.argmin(-1)  # first minimum: lower cluster id on ties
    idx.scatter_(1, centres, torch.arange(num_clusters, device=x.device).expand(B, num_clusters))
    return idx, centres


def merge_tokens(x: torch.Tensor, score: torch.Tensor, idx: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Importance-weighted merging (eq. 5): y_c = sum_{j in C_c} p_j x_j / sum_{j in C_c} p_j, p = exp(score).

    x: (B, N, C), score: (B, N) log-importance, idx: (B, N) cluster ids -> (B, M, C).
    """
    B, N, C = x.shape
    # p_j / sum p is unchanged by a per-image shift of the scores; the shift keeps exp() finite
    p = torch.exp(score - score.amax(dim=1, keepdim=True).detach()).unsqueeze(-1)
    num = x.new_zeros(B, num_clusters, C).scatter_add_(1, idx.unsqueeze(-1).expand(B, N, C), p * x)
    den = x.new_zeros(B, num_clusters, 1).scatter_add_(1, idx.unsqueeze(-1), p)
    return num / den


class TokenMapDictionary:
    """Fig. 3's dictionary between cluster tokens and the stride-32 feature map.

    Records only the cluster id of every stride-16 position (``idx``, (B, H*W)); no features.
    :meth:`to_map`: tokens -> each stride-16 position takes its cluster's feature -> 2x2 average pooling
    (ceil mode) -> (B, C, ceil(H/2), ceil(W/2)). :meth:`to_tokens`: the reverse, every stride-16 position
    reads the stride-32 cell containing it and each cluster averages its positions -> (B, M, C).
    """

    def __init__(self, idx: torch.Tensor, num_clusters: int, H: int, W: int):
        if idx.shape[1] != H * W:
            raise ValueError(f"dictionary of {idx.shape[1]} positions cannot cover a {H}x{W} grid")
        self.idx = idx
        self.num_clusters = num_clusters
        self.grid_size = (H, W)
        self.map_size = (math.ceil(H / 2), math.ceil(W / 2))
        self.counts = torch.zeros(idx.shape[0], num_clusters, 1, device=idx.device).scatter_add_(
            1, idx.unsqueeze(-1), torch.ones(idx.shape[0], idx.shape[1], 1, device=idx.device))

    def cluster_map(self) -> torch.Tensor:
        """(B, H, W) cluster id of every stride-16 position."""
        return self.idx.view(-1, *self.grid_size)

    def scatter(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, M, C) cluster tokens -> (B, C, H, W) stride-16 map, each position holding its cluster's feature."""
        B, _, C = tokens.shape
        per_position = tokens.gather(1, self.idx.unsqueeze(-1).expand(B, self.idx.shape[1], C))
        return tokens_to_map(per_position, *self.grid_size)

    def to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, M, C) cluster tokens -> (B, C, ceil(H/2), ceil(W/2)) stride-32 map."""
        return F.avg_pool2d(self.scatter(tokens), kernel_size=2, stride=2, ceil_mode=True)

    def to_tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, C, ceil(H/2), ceil(W/2)) stride-32 map -> (B, M, C) cluster tokens."""
        H, W = self.grid_size
        up = fmap.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[:, :, :H, :W]
        per_position = map_to_tokens(up)
        B, N, C = per_position.shape
        sums = per_position.new_zeros(B, self.num_clusters, C).scatter_add_(
            1, self.idx.unsqueeze(-1).expand(B, N, C), per_position)
        return sums / self.counts.to(sums.dtype)


class ImportancePredictor(nn.Module):
    """Log-importance s_j of every token (p_j = exp(s_j) in eq. 5), a DynamicViT-style predictor [29]:
    LayerNorm + Linear + GELU, half the channels replaced by their image mean (global context), then an
    MLP C -> C/2 -> C/4 -> 1."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_proj = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4),
                                      nn.GELU(), nn.Linear(dim // 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local, glob = self.in_proj(x).chunk(2, dim=-1)
        glob = glob.mean(dim=1, keepdim=True).expand_as(glob)
        return self.out_proj(torch.cat([local, glob], dim=-1)).squeeze(-1)


class SemanticInformationAggregation(nn.Module):
    """SIA (Sec. 3.3): DPC-KNN over the stride-16 stage-3 tokens, then importance-weighted merging of the
    lifted tokens into M = ceil(N * cluster_ratio) cluster tokens of the stage-4 width.

    ``skip`` starts at zero, so with PVT weights the merged tokens start as cluster means (weighted by the
    predictor) of the plain stage-4 input cells, re-normed by ``norm``.
    """

    def __init__(self, in_dim: int, dim: int, cluster_ratio: float = 0.25, k: int = 5):
        super().__init__()
        if not 0.0 < cluster_ratio <= 1.0:
            raise ValueError(f"HAFA cluster_ratio (MODEL.HAFA.CLUSTER_RATIO) must be in (0, 1], "
                             f"got {cluster_ratio}")
        if k < 1:
            raise ValueError(f"HAFA cluster_k (MODEL.HAFA.CLUSTER_K) must be >= 1, got {k}")
        self.cluster_ratio = cluster_ratio
        self.k = k
        self.skip = nn.Linear(in_dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.predictor = ImportancePredictor(dim)

    def reset_parameters(self) -> None:
        self.apply(init_transformer_weights)
        nn.init.zeros_(self.skip.weight)

    def num_clusters(self, num_tokens: int) -> int:
        return max(1, math.ceil(num_tokens * self.cluster_ratio))

    def cluster(self, tokens: torch.Tensor, H: int, W: int) -> TokenMapDictionary:
        """DPC-KNN over (B, H*W, C) stage-3 tokens -> the dictionary (no gradient: clustering is not learned)."""
        M = self.num_clusters(H * W)
        idx, _ = dpc_knn(tokens.detach(), M, self.k)
        return TokenMapDictionary(idx, M, H, W)

    def forward(self, tokens: torch.Tensor, H: int, W: int, down: torch.Tensor
                ) -> Tuple[torch.Tensor, TokenMapDictionary]:
        """tokens: (B, H*W, C3) stage-3 output; down: (B, C4, ceil(H/2), ceil(W/2)) stage-4 downsampling.
        Returns the (B, M, C4) cluster tokens and the dictionary."""
        dictionary = self.cluster(tokens, H, W)
        up = down.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[:, :, :H, :W]
        x = self.norm(self.skip(tokens) + map_to_tokens(up))
        return merge_tokens(x, self.predictor(x), dictionary.idx, dictionary.num_clusters), dictionary


# ------------------------------------------------------------------------------------------------------
# The backbone
# ------------------------------------------------------------------------------------------------------
class HAFA(PyramidVisionTransformer):
    """PVT v1/v2 with LAA at ``patch_embed2``/``patch_embed3`` and SIA before stage 4 (see module doc).

    Args (beyond :class:`~.pvt.PyramidVisionTransformer`'s):
        cluster_ratio: M / N of SIA (0.25 = the paper's default).
        cluster_k: k of DPC-KNN.
        sia_clustering: "q" (cluster Q only, K/V = grid tokens with implicit positional encoding; default)
            or "qkv" (cluster Q, K and V), Table 5.
    """

    family = "HAFA"
    config_node = "MODEL.HAFA"

    def __init__(self, cluster_ratio: float = 0.25, cluster_k: int = 5, sia_clustering: str = "q", **kwargs):
        if sia_clustering not in ("q", "qkv"):
            raise ValueError(f"HAFA sia_clustering (MODEL.HAFA.SIA_CLUSTERING) must be 'q' or 'qkv', "
                             f"got {sia_clustering!r}")
        super().__init__(**kwargs)
        if sia_clustering == "qkv" and self.block4[0].attn.sr_ratio != 1:
            raise ValueError("HAFA sia_clustering='qkv' attends among cluster tokens, which have no grid to "
                             "reduce spatially: stage-4 sr_ratio (MODEL.HAFA.SR_RATIOS[3]) must be 1")
        self.sia_clustering = sia_clustering
        dim = self.embed_dims[3]
        self.sia = SemanticInformationAggregation(self.embed_dims[2], dim, cluster_ratio, cluster_k)
        self.sia.reset_parameters()
        if sia_clustering == "q":
            self.kv_pos = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
                                        for _ in range(self.depths[3]))
            for conv in self.kv_pos:  # zero: keys/values start as the plain grid tokens
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        for stage in (2, 3):
            getattr(self, f"patch_embed{stage}").reset_offsets()

    def make_patch_embed(self, stage: int, kernel: int, stride: int, in_dim: int, dim: int) -> nn.Module:
        if stage in (2, 3):
            return LocalAdaptiveAggregation(kernel, stride, in_dim, dim, overlap=self.version == "v2")
        if stage == 4 and self.version == "v1":
            # overlapping 3x3 stride-2 downsampling feeding SIA (v1's 2x2 kernel maps onto taps [1:, 1:])
            return PatchEmbed(3, 2, in_dim, dim, overlap=True)
        return super().make_patch_embed(stage, kernel, stride, in_dim, dim)

    def make_pos_embed(self, stage: int, grid: int, dim: int) -> Optional[nn.Parameter]:
        # Sec. 3.1: no explicit positional encoding after SIA
        return None if stage == 4 else super().make_pos_embed(stage, grid, dim)

    def clustering_pairs(self) -> Dict[int, Tuple[str, str]]:
        """(res2, ds3) and (res3, ds4) around the LAA layers; (res4, ds5) around SIA, where ds5 is the SIA
        output (the merged cluster tokens entering stage 4) written onto the stride-32 map by the dictionary."""
        return super().clustering_pairs()

    # ---- stage 4 on cluster tokens ----
    def run_cluster_block(self, j: int, x: torch.Tensor, dictionary: TokenMapDictionary) -> torch.Tensor:
        """Block ``block4.{j}`` with the (B, M, C) cluster tokens ``x`` as queries."""
        block = self.block4[j]
        h = block.norm1(x)
        if self.sia_clustering == "q":
            grid = dictionary.to_map(h)
            grid = grid + self.kv_pos[j](grid)  # implicit positional encoding of the keys/values
            kv = block.attn.reduce(map_to_tokens(grid), *dictionary.map_size)
        else:
            kv = h
        x = x + block.drop_path(block.attn.attend(h, kv))
        h = block.norm2(x)
        if block.ffn == "mix":
            # PVTv2's convolutional FFN: its depth-wise conv runs on the dictionary's stride-32 map
            mlp = block.mlp
            hidden = dictionary.to_tokens(mlp.dwconv.dwconv(dictionary.to_map(mlp.fc1(h))))
            out = mlp.drop(mlp.fc2(mlp.drop(mlp.act(hidden))))
        else:
            out = block.mlp(h)
        return x + block.drop_path(out)

    def encode_to_sia(self, x: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, TokenMapDictionary]:
        """Stages 1-3 (with LAA) and SIA: (maps res2..res4, ds3, ds4; cluster tokens; dictionary)."""
        self.check_input(x)
        outputs = self.forward_stages(x, range(1, 4))
        x = outputs["res4"]
        down, h, w = self.embed(4, x)
        clusters, dictionary = self.sia(map_to_tokens(x), *x.shape[-2:], tokens_to_map(down, h, w))
        return outputs, clusters, dictionary

    @torch.no_grad()
    def cluster_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ceil(H/16), ceil(W/16)) SIA cluster id of every stride-16 position (Fig. 4, 2nd column)."""
        return self.encode_to_sia(x)[2].cluster_map()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs, clusters, dictionary = self.encode_to_sia(x)
        outputs[downsampled_name(5)] = dictionary.to_map(clusters)
        for j in range(len(self.block4)):
            clusters = self.run_cluster_block(j, clusters, dictionary)
        outputs["res5"] = dictionary.to_map(self.out_norm(4, clusters))
        return self.select_outputs(outputs)


def add_hafa_config(cfg: CN) -> None:
    """Add ``MODEL.HAFA``: PRESET (pvt_tiny | pvt_small | pvt_v2_b1 | pvt_v2_b2, each with HAFA) plus
    per-field overrides ("unset" values [] / -1 / "" take the preset's)."""
    cfg.MODEL.HAFA = CN()
    node = cfg.MODEL.HAFA
    add_pvt_fields(node, "pvt_v2_b1", version=True)
    node.CLUSTER_RATIO = -1.0  # M / N of SIA; preset 0.25
    node.CLUSTER_K = -1  # k of DPC-KNN; preset 5
    node.SIA_CLUSTERING = ""  # "q" (preset, Table 5 default) or "qkv"


@BACKBONE_REGISTRY.register()
def build_hafa_backbone(cfg: CN, input_shape: ShapeSpec) -> HAFA:
    """PVT/PVTv2 with HAFA from ``MODEL.HAFA`` (preset + overrides)."""
    kwargs = resolve_preset(cfg.MODEL.HAFA, HAFA_PRESETS, "MODEL.HAFA")
    return HAFA(in_chans=input_shape.channels, **kwargs)


def convert_hafa_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str = "backbone."
                            ) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """Map an authors' PVT / PVTv2 state dict onto :class:`HAFA` of the same preset.

    Returns (converted, notes, kept_at_init): the converted tensors under ``prefix``; notes on tensors
    dropped or changed (those of :func:`~.pvt.convert_pvt_state_dict`, plus for v1: ``pos_embed4`` dropped
    because HAFA has no explicit position embedding after SIA, and ``patch_embed4.proj.weight`` widened
    from 2x2 to the 3x3 SIA downsampling with the 2x2 kernel in taps [1:, 1:], which computes the same map);
    and the names of HAFA's new parameters, which stay at their initialisation (LAA offsets, SIA, kv_pos).
    """
    preset = infer_pvt_preset({strip_prefixes(k): v for k, v in state_dict.items()})
    converted, notes = convert_pvt_state_dict(state_dict, prefix)
    if HAFA_PRESETS[preset]["version"] == "v1":
        converted.pop(prefix + "pos_embed4", None)
        notes.append("dropped pos_embed4: HAFA uses no explicit position embedding after SIA (Sec. 3.1)")
        w = converted[prefix + "patch_embed4.proj.weight"]
        if w.shape[-2:] == (2, 2):
            wide = w.new_zeros(*w.shape[:2], 3, 3)
            wide[:, :, 1:, 1:] = w
            converted[prefix + "patch_embed4.proj.weight"] = wide
            notes.append("patch_embed4.proj.weight: 2x2 kernel placed in taps [1:, 1:] of the 3x3 stride-2 "
                         "SIA downsampling (same output; the other taps start at zero)")
    expected = {prefix + k: v for k, v in HAFA(**HAFA_PRESETS[preset]).state_dict().items()}
    kept_at_init = check_against_model(converted, expected, f"PVT checkpoint ({preset} layout) for HAFA",
                                       allow_missing=True)
    return converted, notes, [k[len(prefix):] for k in kept_at_init]
