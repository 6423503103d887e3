"""HAT-Net: H-MHSA against an explicit computation, shapes, presets, G1/G2 switching, converter."""
import math

import pytest
import torch
from detectron2.modeling import build_backbone

from hierseg_d2.modeling.backbone.hat_net import (
    GRID_SETTINGS,
    HATNET_PRESETS,
    MHSA,
    HMHSA,
    HATNet,
    convert_hat_net_state_dict,
)
from tests.modeling.backbone.utils import assert_trains_on_shapes, backbone_cfg, check_hierarchical_outputs
from tests.modeling.backbone.utils import count_params, load_into_backbone, load_tool, random_state_dict, read_layout

# backbone parameters of the authors' models, /work/shared/reference/README.md
REFERENCE_PARAMS_M = {"tiny": 12.27, "small": 25.24, "medium": 42.43, "large": 62.49}


def randomize_(module, seed=0):
    """Random values in every parameter (norm affines too), so that no term of the equations is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))
    return module


def heads_attention(q, k, v, num_heads):
    """Dense per-head softmax(q k^T / sqrt(d)) v for q (B, C, N), k and v (B, C, M); returns (B, C, N)."""
    d = q.shape[1] // num_heads
    out = []
    for h in range(num_heads):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[:, sl].transpose(1, 2) @ k[:, sl] / math.sqrt(d), dim=-1)  # (B, N, M)
        out.append((w @ v[:, sl].transpose(1, 2)).transpose(1, 2))
    return torch.cat(out, dim=1)


def conv1x1(conv, x):
    """A 1x1 convolution as a matrix product on (B, C, N) tokens."""
    return conv.weight[:, :, 0, 0] @ x + conv.bias[:, None]


def naive_hmhsa(attn, x):
    """Eq. 6-14 with explicit loops: every G1 x G1 grid on its real positions only, then a dense attention
    of all tokens against the explicitly averaged real positions of every G2 x G2 window."""
    B, C, H, W = x.shape
    G1, G2, nh = attn.grid_size, attn.ds_ratio, attn.num_heads
    qkv = conv1x1(attn.qkv, attn.norm(x).flatten(2)).reshape(B, 3 * C, H, W)
    q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
    local = torch.zeros_like(x)
    for y0 in range(0, H, G1):
        for x0 in range(0, W, G1):
            y1, x1 = min(H, y0 + G1), min(W, x0 + G1)
            tok = [t[:, :, y0:y1, x0:x1].flatten(2) for t in (q, k, v)]
            local[:, :, y0:y1, x0:x1] = heads_attention(*tok, nh).reshape(B, C, y1 - y0, x1 - x0)
    a1 = attn.grid_norm(x + local)
    pooled = torch.stack([a1[:, :, y0:y0 + G2, x0:x0 + G2].mean(dim=(-2, -1))
                          for y0 in range(0, H, G2) for x0 in range(0, W, G2)], dim=-1)  # (B, C, M)
    pooled = attn.ds_norm(pooled.unsqueeze(-1)).squeeze(-1)
    kv = conv1x1(attn.kv, pooled)
    a2 = heads_attention(conv1x1(attn.q, a1.flatten(2)), kv[:, :C], kv[:, C:], nh).reshape(B, C, H, W)
    return attn.proj(a1 + a2)


@pytest.mark.parametrize("H,W,G1,G2", [(11, 13, 4, 3), (3, 5, 4, 8), (8, 12, 4, 4), (9, 7, 3, 5), (6, 10, 8, 4)])
def test_hmhsa_matches_explicit_loops(H, W, G1, G2):
    torch.manual_seed(0)
    attn = randomize_(HMHSA(dim=8, head_dim=4, grid_size=G1, ds_ratio=G2)).eval()
    x = torch.randn(2, 8, H, W)
    with torch.no_grad():
        out = attn(x)
        expected = naive_hmhsa(attn, x)
        n_keys = attn.pool(x).shape[-2:]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # one key per G2 x G2 window that holds a real position, none made of padding only
    assert tuple(n_keys) == (math.ceil(H / G2), math.ceil(W / G2))


def test_last_stage_mhsa_is_dense_global_attention():
    torch.manual_seed(1)
    attn = randomize_(MHSA(dim=8, head_dim=4)).eval()
    x = torch.randn(2, 8, 5, 3)
    with torch.no_grad():
        qkv = conv1x1(attn.qkv, attn.norm(x).flatten(2))
        expected = conv1x1(attn.proj, heads_attention(qkv[:, :8], qkv[:, 8:16], qkv[:, 16:], 2))
        torch.testing.assert_close(attn(x), expected.reshape(2, 8, 5, 3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", sorted(HATNET_PRESETS))
def test_preset_matches_authors_layout_and_parameter_count(preset):
    model = HATNet(**HATNET_PRESETS[preset])
    count = count_params(model)
    assert abs(count / 1e6 - REFERENCE_PARAMS_M[preset]) / REFERENCE_PARAMS_M[preset] < 0.005
    # every tensor of the release keeps its name and shape, except the never-used attn.proj_norm
    layout = {k: s for k, s in read_layout(f"hat_net_{preset}").items() if ".attn.proj_norm." not in k}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout


def test_odd_input_sizes_shapes_pairs_and_gradients():
    model = HATNet(**HATNET_PRESETS["tiny"])
    x = torch.randn(1, 3, 75, 101)
    out = model(x)
    check_hierarchical_outputs(model, out, 75, 101)
    # every parameter takes part in the forward (DistributedDataParallel needs no unused parameters)
    sum(t.mean() for t in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def hat_net_cfg(**overrides):
    return backbone_cfg("build_hat_net_backbone", "HATNET", **overrides)


def test_config_builds_preset_with_overrides_and_rejects_bad_values():
    backbone = build_backbone(hat_net_cfg(PRESET="small", DEPTHS=[1, 1, 2, 1]))
    assert isinstance(backbone, HATNet)
    assert [len(stage) for stage in backbone.blocks] == [1, 1, 2, 1]
    assert backbone.output_shape()["res5"].channels == 512
    assert backbone.blocks[0][0].attn.num_heads == 1 and backbone.blocks[3][0].attn.num_heads == 8
    assert [backbone.blocks[s][0].attn.grid_size for s in range(3)] == [8, 8, 8]
    assert [backbone.blocks[s][0].attn.ds_ratio for s in range(3)] == [16, 8, 4]
    with pytest.raises(KeyError, match="MODEL.HATNET.PRESET"):
        build_backbone(hat_net_cfg(PRESET="huge"))
    with pytest.raises(ValueError, match="MODEL.HATNET.G1"):
        build_backbone(hat_net_cfg(G1=[8, 8]))


def test_same_weights_under_dense_and_imagenet_grid_settings():
    torch.manual_seed(0)
    dense = build_backbone(hat_net_cfg(DEPTHS=[1, 1, 1, 1])).eval()
    imagenet = build_backbone(hat_net_cfg(DEPTHS=[1, 1, 1, 1], G1=[8, 7, 7], G2=[8, 4, 2])).eval()
    imagenet.load_state_dict(dense.state_dict(), strict=True)  # G1, G2 hold no parameters
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        out_dense, out_imagenet = dense(x), imagenet(x)
        assert not torch.allclose(out_dense["res2"], out_imagenet["res2"], atol=1e-4)  # G2 = 16 vs 8
        dense.set_grid(**GRID_SETTINGS["imagenet"])
        for name, t in dense(x).items():
            torch.testing.assert_close(t, out_imagenet[name])


def test_converter_loads_authors_layout_strictly(tmp_path):
    layout = read_layout("hat_net_tiny")
    authors = random_state_dict(layout)
    head = {"classifier.1.weight": torch.randn(1000, 384), "classifier.1.bias": torch.randn(1000)}
    torch.save({"model": {**authors, **head}}, tmp_path / "hat_net_tiny.pth")

    _, dropped = convert_hat_net_state_dict({**authors, **head})
    assert set(dropped) == set(head) | {k for k in layout if ".attn.proj_norm." in k}

    load_tool("convert-hat_net-to-d2").main([str(tmp_path / "hat_net_tiny.pth"), str(tmp_path / "hat_net_tiny.pkl")])
    model, incompatible = load_into_backbone(HATNet(**HATNET_PRESETS["tiny"]), tmp_path / "hat_net_tiny.pkl")
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    for name, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, authors[name])

    with pytest.raises(KeyError, match="pos_embed"):
        convert_hat_net_state_dict({**authors, "pos_embed": torch.zeros(1)})


def test_trains_a_few_iterations_on_shapes(shapes_root):
    assert_trains_on_shapes("configs/shapes/hat_net/hcformer_hat_net_tiny_shapes.yaml")
