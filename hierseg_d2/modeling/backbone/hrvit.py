"""HRViT: multi-scale high-resolution vision transformer (Gu et al., HRViT paper Sec. 2).

Layout (paper Sec. 2.1, module table in ``../shared/reference/README.md``):

* ``stem``: two stride-2 conv-BN-ReLU (stride 4, ``stem_channels``);
* ``features``: alternating :class:`HRViTFusion` (even indices) and :class:`HRViTModule` (odd indices),
  6 modules in 4 stages (1, 1, 2, 2 modules) with 1, 2, 3, 3, 4, 4 parallel branches at strides 4..32.
  A fusion layer whose output has one branch more than its input creates that branch;
* each module: efficient patch embedding per branch (eq. 5), then per branch a stack of
  :class:`HRViTBlock` (HRViTAttn + DES shortcut, MixCFN), then a LayerNorm per branch.

Module and parameter names follow the authors' release (``stem.conv1``, ``features.3.branches.1.0.attn.
to_qkv``, ``features.4.blocks.2.0.0``, ...), so their ImageNet checkpoints load after adding the Detectron2
``backbone.`` prefix (:func:`convert_authors_state_dict`, ``tools/convert-hrvit-to-d2.py``).

Where the authors' release (``segmentation/mmseg/models/backbones/hrvit.py``, the same computation as
``models/hrvit.py``) and the paper disagree, the release is the default (``activations="release"``): the
DES non-linearity is GELU (paper eq. 4: Hardswish), the Hardswish of the attention acts on the sum of the
stripe attention and the parallel conv *before* the output projection W^O (``BN(W^O Hardswish(y))``; paper
eq. 2: ``BN(Hardswish(W^O y))``) and the attention BatchNorm's weight starts at zero (the attention branch is
off at initialisation). ``activations="paper"`` (``MODEL.HRVIT.ACTIVATIONS``) gives the paper's reading
(Hardswish DES, Hardswish after W^O, identity BatchNorm); parameter shapes are identical either way, so
the release's weights load into both, but only "release" computes the features they were trained for.
Things the paper leaves open follow the release too: GELU after each fusion sum and inside MixCFN, the DES
output is added to the attention branch inside the drop-path, and stochastic depth grows along the deep
third branch with the other branches of a module taking the rate of the same block index (paper Sec. 3).
Golden fixture: tests/modeling/backbone/test_golden_backbones.py; docs/hrvit.md "Release vs paper".

Outputs: ``res2``..``res5`` are the four branch outputs of the last module (strides 4..32); ``ds3``..``ds5``
are the maps HCFormer clusters against (see :meth:`HRViT.clustering_pairs`): the output of the stride-2
fusion path that creates branch k from the previous lowest-resolution branch (``features.{2,4,8}.
blocks.{k-2}.{k-3}``), before it is summed with the other paths into the new branch. An H x W input gives
res_k / ds_k of ceil(H / 2^k) x ceil(W / 2^k); any size works: stripes that do not divide the map are
zero-padded and the padded keys masked out (Fig. 2b), and up-sampled fusion paths are cropped.
"""
import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from timm.layers import DropPath
from torch import nn

from .convert import add_prefix, check_against_model, split_state_dict, unwrap_state_dict
from .hierarchy import HierarchicalBackbone, downsampled_name
from .layers import init_transformer_weights, map_to_tokens, tokens_to_map
from .presets import resolve_preset

__all__ = [
    "PRESETS",
    "stripe_attention",
    "HRViTStem",
    "EfficientPatchEmbed",
    "HRViTAttn",
    "DES",
    "MixCFN",
    "HRViTBlock",
    "HRViTFusion",
    "HRViTModule",
    "HRViT",
    "add_hrvit_config",
    "build_hrvit_backbone",
    "convert_authors_state_dict",
]

logger = logging.getLogger(__name__)

# Blocks per module and per branch, channels per branch etc. from the reference README (authors' release);
# drop-path rates are the paper's ADE20K values (App. A.2).
PRESETS: Dict[str, Dict] = {
    "b1": dict(
        channels=(32, 64, 128, 256),
        blocks=((1,), (1, 1), (1, 1, 6), (1, 1, 6), (1, 1, 6, 2), (1, 1, 2, 2)),
        head_dim=32, window_sizes=(1, 2, 7, 7), mlp_ratios=(4, 4, 4, 4), stem_channels=64,
        drop_path_rate=0.1,
    ),
    "b2": dict(
        channels=(48, 96, 240, 384),
        blocks=((1,), (1, 1), (1, 1, 6), (1, 1, 6), (1, 1, 6, 2), (1, 1, 6, 2)),
        head_dim=24, window_sizes=(1, 2, 7, 7), mlp_ratios=(2, 3, 3, 3), stem_channels=64,
        drop_path_rate=0.1,
    ),
    "b3": dict(
        channels=(64, 128, 256, 512),
        blocks=((1,), (1, 1), (1, 1, 6), (1, 1, 6), (1, 1, 6, 3), (1, 1, 6, 3)),
        head_dim=32, window_sizes=(1, 2, 7, 7), mlp_ratios=(2, 2, 2, 2), stem_channels=64,
        drop_path_rate=0.25,
    ),
}


_ACTIVATIONS = ("release", "paper")


def _check_activations(value: str, where: str = "activations") -> str:
    if value not in _ACTIVATIONS:
        raise ValueError(f"HRViT {where} must be one of {_ACTIVATIONS}, got {value!r}")
    return value


def stripe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stripe: int,
                     num_heads: int) -> torch.Tensor:
    """Multi-head attention within horizontal stripes of ``stripe`` rows (the H-Attn of eq. 2).

    ``q``, ``k``, ``v``: (B, C, H, W) maps, C split into ``num_heads`` heads of C / num_heads channels.
    Every token attends to the tokens of its stripe (s x W). When ``stripe`` does not divide H the maps are
    zero-padded at the bottom and the padded keys are masked out of the softmax (Fig. 2b), so the last
    stripe attends to its real rows only. Vertical stripes (V-Attn) are this on transposed maps.
    """
    B, C, H, W = q.shape
    n = math.ceil(H / stripe)
    pad = n * stripe - H
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    d = C // num_heads

    def windows(t: torch.Tensor) -> torch.Tensor:  # (B, C, n*s, W) -> (B*n, heads, s*W, d)
        return t.reshape(B, num_heads, d, n, stripe, W).permute(0, 3, 1, 4, 5, 2).reshape(
            B * n, num_heads, stripe * W, d)

    mask = None
    if pad:  # 4-D (B*n, 1, 1, s*W) so that the fused SDPA kernels accept it
        real_row = torch.arange(n * stripe, device=q.device) < H
        mask = real_row.view(1, n, stripe, 1).expand(B, n, stripe, W).reshape(B * n, 1, 1, stripe * W)
    out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), attn_mask=mask)
    out = out.reshape(B, n, num_heads, stripe, W, d).permute(0, 2, 5, 1, 3, 4).reshape(B, C, n * stripe, W)
    return out[:, :, :H]


class HRViTStem(nn.Module):
    """Two stride-2 3x3 conv-BN-ReLU (HRNet's stem, paper Sec. 2.3 "Downsampling stem")."""

    def __init__(self, in_chans: int, out_channels: int, norm: str = "BN"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_channels // 2, 3, stride=2, padding=1)
        self.bn1 = get_norm(norm, out_channels // 2)
        self.conv2 = nn.Conv2d(out_channels // 2, out_channels, 3, stride=2, padding=1)
        self.bn2 = get_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class EfficientPatchEmbed(nn.Module):
    """EffPatchEmbed(x) = LN(DWConv(PWConv(x))) (eq. 5): 1x1 conv, 3x3 depth-wise conv, LayerNorm."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.Conv2d(dim, dim, 3, padding=1, groups=dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(map_to_tokens(x)), H, W


class HRViTAttn(nn.Module):
    """Augmented cross-shaped local self-attention (eq. 2-3, Fig. 2a).

    One linear ``to_qkv`` gives the query and the value; the key *is* the value (eq. 3). The first half of
    the channels attends within horizontal stripes (s x W), the second half within vertical ones (H x s),
    each half in heads of ``min(head_dim, C / 2)`` channels. A parallel path Hardswish + 3x3 depth-wise conv
    runs on the whole value map (no windows) and is added to the attention output; then, as the release,
    ``attn_bn(to_out(Hardswish(.)))`` with the BatchNorm's weight starting at zero; with
    ``activations="paper"`` ``attn_bn(Hardswish(to_out(.)))`` (eq. 2) with an identity BatchNorm.
    """

    def __init__(self, dim: int, head_dim: int, window_size: int, proj_drop: float = 0.0,
                 activations: str = "release"):
        super().__init__()
        if dim % 2:
            raise ValueError(f"HRViTAttn splits channels in half for the two stripe directions; got dim {dim}")
        half = dim // 2
        self.head_dim = min(head_dim, half)  # the narrow first branch has fewer channels than one head
        if half % self.head_dim:
            raise ValueError(f"HRViTAttn: half of dim {dim} is not a multiple of head_dim {self.head_dim}")
        self.num_heads = half // self.head_dim  # per direction
        self.window_size = window_size
        self.activations = _check_activations(activations)
        self.to_qkv = nn.Linear(dim, 2 * dim)
        self.parallel_conv = nn.Sequential(nn.Hardswish(), nn.Conv2d(dim, dim, 3, padding=1, groups=dim))
        # the release's attn_act; no parameters, so its place does not change the checkpoint layout
        self.attn_act = nn.Hardswish()
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(proj_drop))
        self.attn_bn = nn.BatchNorm1d(dim)
        if activations == "release":
            nn.init.zeros_(self.attn_bn.weight)  # the release starts with the attention branch switched off

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        q, v = self.to_qkv(x).chunk(2, dim=-1)
        q, v = tokens_to_map(q, H, W), tokens_to_map(v, H, W)
        half = q.shape[1] // 2
        s, heads = self.window_size, self.num_heads
        z_h = stripe_attention(q[:, :half], v[:, :half], v[:, :half], s, heads)
        qv, vv = q[:, half:].transpose(-1, -2), v[:, half:].transpose(-1, -2)
        z_v = stripe_attention(qv, vv, vv, s, heads).transpose(-1, -2)
        y = map_to_tokens(torch.cat([z_h, z_v], dim=1) + self.parallel_conv(v))
        if self.activations == "release":
            out = self.to_out(self.attn_act(y))
        else:
            out = self.attn_act(self.to_out(y))
        return self.attn_bn(out.transpose(1, 2)).transpose(1, 2)

    def extra_repr(self) -> str:
        return (f"window_size={self.window_size}, heads_per_direction={self.num_heads}, head_dim={self.head_dim}, "
                f"activations={self.activations}")


class DES(nn.Module):
    """Diversity-enhanced shortcut (eq. 4): the C x C projector factorised as A (left) kron B (right).

    Channels fold into a left x right matrix X (C = left * right, ``right`` the power of two nearest
    sqrt(C), ties upwards, as in the authors' layouts); DES(x) = A act(X B^T), biases included, with act
    GELU as in the release (``activations="release"``) or Hardswish as in the paper's eq. 4 ("paper").
    """

    def __init__(self, dim: int, activations: str = "release"):
        super().__init__()
        self.right = 2 ** (int(math.log2(dim)) - int(math.log2(dim)) // 2)
        if dim % self.right:
            raise ValueError(f"DES cannot fold {dim} channels into a matrix with {self.right} columns")
        self.left = dim // self.right
        self.proj_right = nn.Linear(self.right, self.right)
        self.act = nn.GELU() if _check_activations(activations) == "release" else nn.Hardswish()
        self.proj_left = nn.Linear(self.left, self.left)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.proj_right(x.unflatten(-1, (self.left, self.right))))
        return self.proj_left(x.transpose(-1, -2)).transpose(-1, -2).flatten(-2)


class MixedScaleDWConv(nn.Module):
    """Half of the channels through a 3x3 depth-wise conv, the other half through a 5x5 one (Fig. 3)."""

    def __init__(self, channels: int):
        super().__init__()
        self.split = channels // 2
        self.conv_3 = nn.Conv2d(self.split, self.split, 3, padding=1, groups=self.split)
        rest = channels - self.split
        self.conv_5 = nn.Conv2d(rest, rest, 5, padding=2, groups=rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv_3(x[:, :self.split]), self.conv_5(x[:, self.split:])], dim=1)


class MixCFN(nn.Module):
    """Mixed-scale convolutional FFN: fc1 (expansion r), 3x3 | 5x5 depth-wise convs, GELU, fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.conv = MixedScaleDWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.act(self.conv(tokens_to_map(self.fc1(x), H, W)))
        return self.drop(self.fc2(map_to_tokens(x)))


class HRViTBlock(nn.Module):
    """x + DropPath(HRViTAttn(LN(x)) + DES(x)), then x + DropPath(MixCFN(LN(x)))."""

    def __init__(self, dim: int, head_dim: int, window_size: int, mlp_ratio: float, drop_path: float = 0.0,
                 drop: float = 0.0, activations: str = "release"):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = HRViTAttn(dim, head_dim, window_size, drop, activations)
        self.des = DES(dim, activations)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = MixCFN(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.attn_norm(x), H, W) + self.des(x))
        return x + self.drop_path(self.ffn(self.ffn_norm(x), H, W))


def _upsample_nearest(x: torch.Tensor, factor: int, size: Sequence[int]) -> torch.Tensor:
    """Nearest up-sampling by ``factor`` cropped to ``size``: pixel (y, x) reads (y // factor, x // factor)."""
    return F.interpolate(x, scale_factor=factor, mode="nearest")[..., :size[0], :size[1]]


class HRViTFusion(nn.Module):
    """Dense cross-resolution fusion (Sec. 2.3, Fig. 4) at the start of every module.

    Output branch i sums a path from every input branch j, then GELU: j == i identity; j < i (down) a
    depth-wise separable conv: depth-wise conv with kernel 2^(i-j)+1 and stride 2^(i-j), BN, point-wise
    conv, BN; j > i (up) point-wise conv, BN, nearest up-sampling by 2^(j-i). ``blocks[i][j]``
    is that path. With one output more than inputs, the last output is a new branch at half the
    resolution of the lowest input branch.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], norm: str = "BN"):
        super().__init__()
        if not len(in_channels) <= len(out_channels) <= len(in_channels) + 1:
            raise ValueError(f"HRViTFusion maps {len(in_channels)} branches to {len(in_channels)} or "
                             f"{len(in_channels) + 1}, not {len(out_channels)}")
        self.num_inputs = len(in_channels)
        self.blocks = nn.ModuleList()
        for i, outc in enumerate(out_channels):
            paths = nn.ModuleList()
            for j, inc in enumerate(in_channels):
                if j == i:
                    paths.append(nn.Identity())
                elif j < i:
                    f = 2 ** (i - j)
                    paths.append(nn.Sequential(
                        nn.Conv2d(inc, inc, f + 1, stride=f, padding=f // 2, groups=inc, bias=False),
                        get_norm(norm, inc),
                        nn.Conv2d(inc, outc, 1),
                        get_norm(norm, outc),
                    ))
                else:
                    paths.append(nn.Sequential(nn.Conv2d(inc, outc, 1), get_norm(norm, outc)))
            self.blocks.append(paths)
        self.act = nn.GELU()

    def forward(self, xs: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """Fused maps, and the output of the stride-2 path creating the new branch (None if no new branch)."""
        assert len(xs) == self.num_inputs, f"HRViTFusion expects {self.num_inputs} branches, got {len(xs)}"
        outs, new_branch_ds = [], None
        for i, paths in enumerate(self.blocks):
            total = None
            for j, (path, x) in enumerate(zip(paths, xs)):
                y = path(x)
                if j > i:
                    y = _upsample_nearest(y, 2 ** (j - i), xs[i].shape[-2:])
                elif i == self.num_inputs and j == i - 1:
                    new_branch_ds = y
                total = y if total is None else total + y
            outs.append(self.act(total))
        return outs, new_branch_ds


class HRViTModule(nn.Module):
    """One HRViT module after its fusion layer: per branch patch embedding, HRViT blocks, LayerNorm."""

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int], blocks: Sequence[int], head_dim: int,
                 window_sizes: Sequence[int], mlp_ratios: Sequence[float], drop_path_rates: Sequence[float],
                 drop: float = 0.0, activations: str = "release"):
        super().__init__()
        self.patch_embed = nn.ModuleList(EfficientPatchEmbed(i, c) for i, c in zip(in_channels, channels))
        self.branches = nn.ModuleList(
            nn.ModuleList(HRViTBlock(c, head_dim, window_sizes[b], mlp_ratios[b], drop_path_rates[k], drop, activations)
                          for k in range(n))
            for b, (c, n) in enumerate(zip(channels, blocks))
        )
        self.norm = nn.ModuleList(nn.LayerNorm(c) for c in channels)

    def forward(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        outs = []
        for x, embed, branch, norm in zip(xs, self.patch_embed, self.branches, self.norm):
            x, H, W = embed(x)
            for block in branch:
                x = block(x, H, W)
            outs.append(tokens_to_map(norm(x), H, W))
        return outs


class HRViT(HierarchicalBackbone):
    """HRViT backbone: res2..res5 from its four parallel branches, plus ds3..ds5 for HCFormer's clustering.

    Args:
        channels: channels of the branches at strides 4, 8, 16, 32.
        blocks: per module, the number of HRViT blocks of each of its branches (the number of entries is
            the module's branch count; it starts at 1 and grows by at most one per module).
        head_dim: attention head width (capped at half of a branch's channels).
        window_sizes: stripe width s per branch.
        mlp_ratios: MixCFN expansion r per branch.
        stem_channels: output channels of the conv stem.
        drop_path_rate: largest stochastic-depth rate.
        in_chans: input channels.
        norm: Detectron2 norm name of the stem and fusion BatchNorms ("BN", "SyncBN", "FrozenBN", ...).
        activations: "release" (default: GELU in DES, Hardswish before W^O, zero-initialised attention
            BatchNorm weight, as the authors' code and weights) or "paper" (eq. 2 and 4 as printed).
    """

    family = "HRViT"
    config_node = "MODEL.HRVIT"

    @configurable
    def __init__(self, *, channels: Sequence[int], blocks: Sequence[Sequence[int]], head_dim: int,
                 window_sizes: Sequence[int], mlp_ratios: Sequence[float], stem_channels: int = 64,
                 drop_path_rate: float = 0.0, in_chans: int = 3, norm: str = "BN", activations: str = "release"):
        super().__init__()
        blocks = tuple(tuple(int(n) for n in m) for m in blocks)
        self._check_layout(channels, blocks, head_dim, window_sizes, mlp_ratios)
        _check_activations(activations, "MODEL.HRVIT.ACTIVATIONS")
        num_branches = [len(m) for m in blocks]

        # Stochastic depth (paper Sec. 3): rates grow along the deepest (third) branch; block k of every
        # branch of a module takes the rate of block k of that module's deepest branch.
        depths = [max(m) for m in blocks]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:m]) for m in range(len(blocks))]

        self.stem = HRViTStem(in_chans, stem_channels, norm)
        features, prev = [], [stem_channels]
        for m, (nb, module_blocks) in enumerate(zip(num_branches, blocks)):
            fused = prev if nb == len(prev) else prev + [channels[nb - 1]]
            features.append(HRViTFusion(prev, fused, norm))
            features.append(HRViTModule(fused, channels[:nb], module_blocks, head_dim, window_sizes, mlp_ratios,
                                        rates[starts[m]:starts[m] + depths[m]], activations=activations))
            prev = list(channels[:nb])
        self.features = nn.ModuleList(features)
        # one stage per branch of the last module; clustering pairs {i: (res_i, ds_{i+1})}: branch i's
        # output and the stride-2 path that created branch i+1
        self.init_outputs(channels[:num_branches[-1]])
        self.apply(init_transformer_weights)

    @staticmethod
    def _check_layout(channels, blocks, head_dim, window_sizes, mlp_ratios) -> None:
        if head_dim < 1 or any(s < 1 for s in window_sizes):
            raise ValueError(f"MODEL.HRVIT.HEAD_DIM = {head_dim} and MODEL.HRVIT.WINDOW_SIZES = "
                             f"{tuple(window_sizes)} must be positive")
        counts = [len(m) for m in blocks]
        if not counts or counts[0] != 1 or any(b - a not in (0, 1) for a, b in zip(counts, counts[1:])):
            raise ValueError(f"MODEL.HRVIT.BLOCKS = {blocks}: the first module must have 1 branch and each "
                             f"next module the same number of branches or one more")
        for name, values in (("CHANNELS", channels), ("WINDOW_SIZES", window_sizes), ("MLP_RATIOS", mlp_ratios)):
            if len(values) < counts[-1]:
                raise ValueError(f"MODEL.HRVIT.{name} = {tuple(values)} has fewer entries than the "
                                 f"{counts[-1]} branches of MODEL.HRVIT.BLOCKS")

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        kwargs = resolve_preset(cfg.MODEL.HRVIT, PRESETS, "MODEL.HRVIT")
        kwargs["in_chans"] = input_shape.channels
        return kwargs

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """res2..res5 (branch outputs of the last module) and ds3..ds5 (see the module docstring)."""
        self.check_input(x)
        outputs = {}
        xs = [self.stem(x)]
        for fusion, module in zip(self.features[0::2], self.features[1::2]):
            xs, new_branch_ds = fusion(xs)
            if new_branch_ds is not None:
                outputs[downsampled_name(len(xs) + 1)] = new_branch_ds
            xs = module(xs)
        for b, y in enumerate(xs):
            outputs[f"res{b + 2}"] = y
        return outputs


def add_hrvit_config(cfg: CN) -> None:
    """``MODEL.HRVIT``: PRESET (b1 | b2 | b3) and per-field overrides (unset = the preset's value)."""
    cfg.MODEL.HRVIT = CN()
    node = cfg.MODEL.HRVIT
    node.PRESET = "b1"
    node.CHANNELS = []  # per branch (strides 4, 8, 16, 32)
    node.BLOCKS = []  # per module, blocks per branch, e.g. [[1], [1, 1], [1, 1, 6], ...]
    node.HEAD_DIM = -1
    node.WINDOW_SIZES = []  # stripe width s per branch
    node.MLP_RATIOS = []  # MixCFN expansion r per branch
    node.STEM_CHANNELS = -1
    node.DROP_PATH_RATE = -1.0
    node.NORM = "BN"  # stem and fusion BatchNorms; "SyncBN" for small per-GPU batches
    # "release" (the authors' code: GELU in DES, Hardswish before W^O) or "paper" (eq. 2 and 4 as printed)
    node.ACTIVATIONS = "release"


@BACKBONE_REGISTRY.register()
def build_hrvit_backbone(cfg, input_shape: ShapeSpec) -> HRViT:
    """HRViT from ``MODEL.HRVIT`` (preset + overrides)."""
    return HRViT(cfg, input_shape)


def convert_authors_state_dict(state_dict: Mapping[str, torch.Tensor],
                               reference: Optional[Mapping[str, torch.Tensor]] = None,
                               prefix: str = "backbone.") -> Dict[str, torch.Tensor]:
    """Map an authors' HRViT checkpoint (``stem.*``, ``features.*``) onto Detectron2 names.

    The module names are the same, so the conversion unwraps "model"/"state_dict", strips a ``module.``/
    ``backbone.`` prefix, drops the ImageNet classification head (``head.*``, logged) and prepends
    ``prefix``. With ``reference`` (our backbone's state dict), names and shapes are checked and every
    difference raises an error naming the keys.
    """
    out, dropped = split_state_dict(unwrap_state_dict(state_dict), keep=("stem.", "features."), drop=("head.",),
                                    layout="an HRViT")
    if dropped:
        logger.info(f"Dropped {len(dropped)} classification-head tensors (head.*)")
    if reference is not None:
        check_against_model(out, reference, "HRViT checkpoint for the chosen preset")
    return add_prefix(out, prefix)
