import math

import pytest
import torch

from hierseg_d2.modeling.backbone.layers import PatchEmbed, SpatialReductionAttention, tokens_to_map


@pytest.mark.parametrize("overlap,patch,stride", [(True, 7, 4), (True, 3, 2), (False, 4, 4), (False, 2, 2)])
def test_patch_embed_gives_ceil_sizes(overlap, patch, stride):
    embed = PatchEmbed(patch, stride, 3, 8, overlap=overlap)
    tokens, H, W = embed(torch.randn(1, 3, 75, 101))
    assert (H, W) == (math.ceil(75 / stride), math.ceil(101 / stride))
    assert tokens.shape == (1, H * W, 8)


def test_spatial_reduction_attention_matches_dense_formula():
    torch.manual_seed(0)
    attn = SpatialReductionAttention(dim=8, num_heads=2, sr_ratio=2).eval()
    H, W = 5, 6
    x = torch.randn(2, H * W, 8)
    out = attn(x, H, W)
    # independent computation: reduce with the same conv, then per-head softmax(q k^T / sqrt(d)) v
    reduced = attn.sr(tokens_to_map(x, H, W)).flatten(2).transpose(1, 2)
    reduced = attn.norm(reduced)
    q = attn.q(x)
    k, v = attn.kv(reduced).chunk(2, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)
        heads.append(w @ v[..., sl])
    expected = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_spatial_reduction_attention_on_map_smaller_than_ratio():
    attn = SpatialReductionAttention(dim=8, num_heads=2, sr_ratio=8)
    out = attn(torch.randn(1, 6, 8), 2, 3)
    assert out.shape == (1, 6, 8) and torch.isfinite(out).all()
