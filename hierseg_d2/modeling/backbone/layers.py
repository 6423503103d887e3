"""Building blocks shared by the transformer backbones (MiT/SegFormer, PVT/PVTv2, HILA, HAFA, ...).

Parameter names follow the authors' releases (``q``, ``kv``, ``sr``, ``fc1``, ``dwconv.dwconv``, ...) so
that converters map checkpoints with few renames. Token tensors are (B, N, C) with N = H * W in row-major
order; helpers convert between tokens and (B, C, H, W) maps.
"""
from functools import partial
from typing import Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

__all__ = [
    "tokens_to_map",
    "map_to_tokens",
    "pad_to_multiple",
    "init_transformer_weights",
    "PatchEmbed",
    "DWConv",
    "MixFFN",
    "SpatialReductionAttention",
    "SRABlock",
    "TransformerLayerNorm",
]

# The releases of SegFormer (MiT) and PVT v1/v2 build their blocks and stage-closing norms with
# LayerNorm(eps=1e-6); patch embeddings and the spatial reduction keep PyTorch's 1e-5.
TransformerLayerNorm = partial(nn.LayerNorm, eps=1e-6)


def tokens_to_map(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    B, N, C = x.shape
    assert N == H * W, f"{N} tokens cannot form a {H}x{W} map"
    return x.transpose(1, 2).reshape(B, C, H, W)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    """Pad a (B, C, H, W) map at the bottom/right so that H and W are multiples of ``multiple``."""
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=value)
    return x


def init_transformer_weights(m: nn.Module) -> None:
    """The usual ViT initialisation: truncated normal linears, unit LayerNorms, fan-out convolutions."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    """Strided convolution + LayerNorm turning a map into tokens at 1/stride resolution.

    ``overlap=True`` is the overlapping patch embedding of SegFormer/PVTv2 (kernel > stride, padding
    kernel // 2); ``overlap=False`` is PVT v1's non-overlapping one (kernel = stride), for which the input
    is padded to a multiple of the stride. Either way an H x W input gives ceil(H/stride) x ceil(W/stride).
    """

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int, overlap: bool = True):
        super().__init__()
        self.stride = stride
        self.overlap = overlap
        padding = patch_size // 2 if overlap else 0
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        if not self.overlap:
            x = pad_to_multiple(x, self.stride)
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(map_to_tokens(x)), H, W


class DWConv(nn.Module):
    """3x3 depth-wise convolution on tokens (the ``dwconv.dwconv`` of SegFormer/PVTv2 checkpoints)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return map_to_tokens(self.dwconv(tokens_to_map(x, H, W)))


class MixFFN(nn.Module):
    """SegFormer's Mix-FFN = PVTv2's convolutional FFN: fc1, 3x3 depth-wise conv, GELU, fc2."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.act(self.dwconv(self.fc1(x), H, W))
        return self.drop(self.fc2(self.drop(x)))


class SpatialReductionAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from the map shrunk by ``sr_ratio``.

    PVT's spatial-reduction attention and SegFormer's efficient self-attention (reduction ratio R) are
    the same module. A map smaller than ``sr_ratio`` is padded up to it so that one key always exists.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sr_ratio: int = 1):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def reduce(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Tokens used as keys/values: the input itself, or its spatially reduced map."""
        if self.sr_ratio == 1:
            return x
        m = tokens_to_map(x, H, W)
        ph, pw = max(0, self.sr_ratio - H), max(0, self.sr_ratio - W)
        if ph or pw:
            m = F.pad(m, (0, pw, 0, ph))
        return self.norm(map_to_tokens(self.sr(m)))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def attend(self, q_tokens: torch.Tensor, kv_tokens: torch.Tensor) -> torch.Tensor:
        """Attention of ``q_tokens`` (B, N, C) over ``kv_tokens`` (B, M, C), both before projection."""
        B, N, C = q_tokens.shape
        q = self.split_heads(self.q(q_tokens))
        k, v = self.kv(kv_tokens).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, self.split_heads(k), self.split_heads(v),
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.attend(x, self.reduce(x, H, W))


class SRABlock(nn.Module):
    """Pre-norm transformer block with spatial-reduction attention (PVT v1/v2, SegFormer MiT).

    ``ffn="mix"`` uses Mix-FFN (SegFormer, PVTv2); ``ffn="mlp"`` the plain MLP of PVT v1.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, sr_ratio: int = 1,
                 ffn: str = "mix", norm_layer=TransformerLayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SpatialReductionAttention(dim, num_heads, qkv_bias, attn_drop, drop, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        if ffn == "mix":
            self.mlp = MixFFN(dim, hidden, drop)
        elif ffn == "mlp":
            self.mlp = Mlp(dim, hidden, drop=drop)
        else:
            raise ValueError(f"SRABlock ffn must be 'mix' or 'mlp', got {ffn!r}")
        self.ffn = ffn

    def ffn_forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.mlp(x, H, W) if self.ffn == "mix" else self.mlp(x)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.ffn_forward(self.norm2(x), H, W))
