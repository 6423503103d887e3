"""Transformer layers of the masked-attention decoder and of HCFormer+'s encoder (sequence-first tensors).

Each layer adds its positional embeddings to queries/keys, runs one sub-block with a residual and a
LayerNorm (post-norm by default, pre-norm when ``normalize_before``), as in Mask2Former.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SelfAttentionLayer", "CrossAttentionLayer", "FFNLayer", "MLP", "TransformerEncoder"]


def _with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class _Residual(nn.Module):
    """Shared post-/pre-norm residual wiring of the three layer types."""

    def __init__(self, d_model: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def residual(self, x: torch.Tensor, block) -> torch.Tensor:
        if self.normalize_before:
            return x + self.dropout(block(self.norm(x)))
        return self.norm(x + self.dropout(block(x)))


class SelfAttentionLayer(_Residual):
    """Multi-head self-attention over the queries (or the encoder tokens)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__(d_model, dropout, normalize_before)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        _xavier_init(self)

    def forward(self, tgt, query_pos=None, attn_mask=None, key_padding_mask=None):
        def block(x):
            q = k = _with_pos(x, query_pos)
            return self.self_attn(q, k, value=x, attn_mask=attn_mask, key_padding_mask=key_padding_mask)[0]

        return self.residual(tgt, block)


class CrossAttentionLayer(_Residual):
    """Multi-head attention from the queries to the memory, optionally masked (masked attention)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__(d_model, dropout, normalize_before)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        _xavier_init(self)

    def forward(self, tgt, memory, memory_mask=None, pos=None, query_pos=None):
        def block(x):
            return self.multihead_attn(_with_pos(x, query_pos), _with_pos(memory, pos), value=memory,
                                       attn_mask=memory_mask)[0]

        return self.residual(tgt, block)


class FFNLayer(_Residual):
    """Position-wise feed-forward block (Linear - ReLU - Linear)."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0,
                 normalize_before: bool = False):
        super().__init__(d_model, dropout, normalize_before)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.inner_dropout = nn.Dropout(dropout)
        _xavier_init(self)

    def forward(self, tgt):
        return self.residual(tgt, lambda x: self.linear2(self.inner_dropout(F.relu(self.linear1(x)))))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (the mask-embedding head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TransformerEncoder(nn.Module):
    """Stack of (self-attention, FFN) layers on a flattened feature map: HCFormer+'s encoder (Sec. 2.5)."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, dim_feedforward: int = 2048,
                 dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.self_attn_layers = nn.ModuleList(
            SelfAttentionLayer(d_model, nhead, dropout, normalize_before) for _ in range(num_layers))
        self.ffn_layers = nn.ModuleList(
            FFNLayer(d_model, dim_feedforward, dropout, normalize_before) for _ in range(num_layers))
        # pre-norm stacks need a final norm; post-norm layers already end with one
        self.norm = nn.LayerNorm(d_model) if normalize_before else nn.Identity()

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """src, pos: (HW, B, C) -> (HW, B, C)."""
        for attn, ffn in zip(self.self_attn_layers, self.ffn_layers):
            src = ffn(attn(src, query_pos=pos))
        return self.norm(src)
