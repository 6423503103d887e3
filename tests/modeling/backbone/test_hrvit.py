import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn

from hierseg_d2.modeling.backbone.hierarchy import get_clustering_pairs
from hierseg_d2.modeling.backbone.hrvit import DES, PRESETS, HRViT, HRViTAttn, HRViTFusion, stripe_attention
from tests.modeling.backbone.utils import PAIRS, REPO, assert_trains_on_shapes, backbone_cfg
from tests.modeling.backbone.utils import check_hierarchical_outputs, count_params, load_into_backbone, load_tool
from tests.modeling.backbone.utils import random_state_dict, read_layout

REFERENCE_MPARAMS = {"b1": 7.76, "b2": 20.31, "b3": 25.51}  # ../shared/reference/README.md


def hrvit_cfg(**overrides):
    return backbone_cfg("build_hrvit_backbone", "HRVIT", **overrides)


def randomize_norms(module):
    """Non-trivial BatchNorm statistics and affine parameters, so that eval-mode BN is not the identity."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def bn_eval(bn, x, dim=1):
    shape = [1] * x.dim()
    shape[dim] = -1
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)


def stripe_mask(H, W, s, horizontal):
    """Explicit N x N mask, built token by token: key (y', x') is visible to query (y, x) iff it lies in the
    query's stripe. Only real tokens exist here, so padded positions can never take part."""
    N = H * W
    mask = torch.zeros(N, N, dtype=torch.bool)
    for y in range(H):
        for x in range(W):
            for y2 in range(H):
                for x2 in range(W):
                    same = (y // s == y2 // s) if horizontal else (x // s == x2 // s)
                    mask[y * W + x, y2 * W + x2] = same
    return mask


def dense_masked_attention(q, k, v, mask, num_heads):
    """(B, N, C) tokens; per head softmax(q k^T / sqrt(d) restricted to ``mask``) v."""
    B, N, C = q.shape
    d = C // num_heads
    out = []
    for h in range(num_heads):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        out.append(torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1) @ v[..., sl])
    return torch.cat(out, dim=-1)


def to_tokens(m):
    return m.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("preset", ["b1", "b2", "b3"])
def test_presets_match_reference_parameter_counts_and_authors_layout(preset):
    model = HRViT(**PRESETS[preset])
    assert count_params(model) / 1e6 == pytest.approx(REFERENCE_MPARAMS[preset], rel=0.01)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_layout(f"hrvit_{preset}")  # same names and shapes as the authors' release: identity conversion


@pytest.mark.parametrize("H,W,s", [(5, 3, 2), (6, 4, 3), (4, 5, 1), (3, 4, 7)])
def test_stripe_attention_equals_dense_attention_masked_to_the_stripe(H, W, s):
    torch.manual_seed(0)
    B, C, heads = 2, 6, 3
    q, k, v = (torch.randn(B, C, H, W) for _ in range(3))
    out = stripe_attention(q, k, v, s, heads)
    expected = dense_masked_attention(to_tokens(q), to_tokens(k), to_tokens(v), stripe_mask(H, W, s, True), heads)
    torch.testing.assert_close(to_tokens(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activations", ["release", "paper"])
def test_hrvit_attn_equals_equations_2_and_3_with_padded_windows(activations):
    torch.manual_seed(0)
    dim, H, W, s = 8, 5, 6, 4  # 4 divides neither side: the last stripe of both directions is padded
    attn = HRViTAttn(dim, head_dim=2, window_size=s, activations=activations)
    randomize_norms(attn)
    attn.eval()
    assert attn.num_heads == 2  # per direction: 4 channels in heads of 2
    x = torch.randn(2, H * W, dim)

    q, v = F.linear(x, attn.to_qkv.weight, attn.to_qkv.bias).chunk(2, dim=-1)  # key == value (eq. 3)
    z_h = dense_masked_attention(q[..., :4], v[..., :4], v[..., :4], stripe_mask(H, W, s, True), 2)
    z_v = dense_masked_attention(q[..., 4:], v[..., 4:], v[..., 4:], stripe_mask(H, W, s, False), 2)
    v_map = v.transpose(1, 2).reshape(2, dim, H, W)
    conv = attn.parallel_conv[1]
    parallel = F.conv2d(F.hardswish(v_map), conv.weight, conv.bias, padding=1, groups=dim)
    y = torch.cat([z_h, z_v], dim=-1) + to_tokens(parallel)
    w, b = attn.to_out[0].weight, attn.to_out[0].bias
    if activations == "release":  # the release: Hardswish of the sum, then W^O
        projected = F.linear(F.hardswish(y), w, b)
    else:  # eq. 2: BN(Hardswish(W^O y))
        projected = F.hardswish(F.linear(y, w, b))
    expected = bn_eval(attn.attn_bn, projected, dim=-1)
    torch.testing.assert_close(attn(x, H, W), expected, rtol=1e-5, atol=1e-5)


def test_attention_batchnorm_starts_at_zero_as_the_release_or_as_identity_for_the_paper():
    x = torch.randn(3, 8, 5)
    bn = HRViTAttn(8, head_dim=4, window_size=2).attn_bn.eval()
    assert torch.count_nonzero(bn(x)) == 0  # the release zero-initialises the weight: attention branch off
    bn = HRViTAttn(8, head_dim=4, window_size=2, activations="paper").attn_bn.eval()
    torch.testing.assert_close(bn(x), x, rtol=1e-4, atol=1e-4)  # up to BN's eps
    with pytest.raises(ValueError, match="activations"):
        HRViTAttn(8, head_dim=4, window_size=2, activations="Hardswish")


@pytest.mark.parametrize("activations,act", [("release", F.gelu), ("paper", F.hardswish)])
def test_des_is_a_kronecker_factorised_projector_with_the_release_gelu_or_the_paper_hardswish(activations, act):
    torch.manual_seed(0)
    des = DES(32, activations)
    assert (des.left, des.right) == (4, 8)  # the authors' proj_left (4, 4) / proj_right (8, 8) for 32 channels
    x = torch.randn(3, 7, 32)
    A, B = des.proj_left.weight, des.proj_right.weight
    X = x.reshape(3, 7, 4, 8)
    expected = A @ act(X @ B.T + des.proj_right.bias) + des.proj_left.bias[:, None]  # eq. 4 / the release
    torch.testing.assert_close(des(x), expected.reshape(3, 7, 32), rtol=1e-5, atol=1e-5)
    # without the non-linearity and biases it is the full C x C projector A kron B
    des.act = nn.Identity()
    nn.init.zeros_(des.proj_left.bias)
    nn.init.zeros_(des.proj_right.bias)
    torch.testing.assert_close(des(x), x @ torch.kron(A, B).T, rtol=1e-5, atol=1e-5)


def test_fusion_matches_direct_computation_on_odd_sizes():
    torch.manual_seed(0)
    in_ch, out_ch = (2, 3, 4), (2, 3, 4, 5)  # three branches in, a fourth created
    fusion = HRViTFusion(in_ch, out_ch)
    randomize_norms(fusion)
    fusion.eval()
    sizes = [(7, 9), (4, 5), (2, 3)]  # ceil halving of an odd map
    xs = [torch.randn(2, c, *hw) for c, hw in zip(in_ch, sizes)]
    outs, ds = fusion(xs)
    sizes.append((1, 2))
    for i, out in enumerate(outs):
        total = 0
        for j, x in enumerate(xs):
            path = fusion.blocks[i][j]
            if j == i:
                y = x
            elif j < i:  # depth-wise (kernel f+1, stride f) -> BN -> point-wise -> BN
                f = 2 ** (i - j)
                y = F.conv2d(x, path[0].weight, stride=f, padding=f // 2, groups=x.shape[1])
                y = bn_eval(path[1], y)
                y = torch.einsum("oc,bchw->bohw", path[2].weight[:, :, 0, 0], y) + path[2].bias.view(1, -1, 1, 1)
                y = bn_eval(path[3], y)
                if i == 3 and j == 2:
                    torch.testing.assert_close(ds, y)  # ds = the stride-2 path from the lowest input branch
            else:  # point-wise -> BN -> nearest up-sampling: pixel (y, x) reads (y // f, x // f)
                f = 2 ** (j - i)
                y = torch.einsum("oc,bchw->bohw", path[0].weight[:, :, 0, 0], x) + path[0].bias.view(1, -1, 1, 1)
                y = bn_eval(path[1], y)
                rows, cols = torch.arange(sizes[i][0]) // f, torch.arange(sizes[i][1]) // f
                y = y[:, :, rows][:, :, :, cols]
            total = total + y
        assert out.shape[-2:] == sizes[i]
        torch.testing.assert_close(out, F.gelu(total), rtol=1e-5, atol=1e-5)


def test_backbone_any_size_ceil_shapes_and_clustering_pairs():
    cfg = hrvit_cfg(PRESET="b1")
    backbone = build_backbone(cfg).eval()
    assert isinstance(backbone, HRViT)
    captured = {}
    for stage, (fusion_idx, new, prev) in {3: (2, 1, 0), 4: (4, 2, 1), 5: (8, 3, 2)}.items():
        backbone.features[fusion_idx].blocks[new][prev].register_forward_hook(
            lambda m, i, o, stage=stage: captured.__setitem__(f"ds{stage}", o))
    H, W = 75, 101
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, H, W))
    check_hierarchical_outputs(backbone, out, H, W)
    shapes = backbone.output_shape()
    assert [shapes[f"res{k}"].channels for k in range(2, 6)] == [32, 64, 128, 256]
    for name, feat in captured.items():  # ds_k is the output of the layer that creates branch k
        assert torch.equal(out[name], feat)


def test_drop_path_grows_along_the_third_branch_and_is_shared_within_a_module():
    model = HRViT(**{**PRESETS["b1"], "drop_path_rate": 0.3})
    module5 = model.features[5]  # stage 3, first module: blocks (1, 1, 6)
    rates = [b.drop_path.drop_prob for b in module5.branches[2]]
    assert rates == sorted(rates) and rates[0] > 0
    assert module5.branches[0][0].drop_path.drop_prob == rates[0]
    assert model.features[11].branches[3][1].drop_path.drop_prob == pytest.approx(0.3)


def test_config_overrides_and_errors(tmp_path):
    yaml = tmp_path / "hrvit.yaml"
    yaml.write_text("MODEL:\n  HRVIT:\n    PRESET: b1\n    BLOCKS: [[1], [1, 1], [1, 1, 2], [1, 1, 2, 1]]\n"
                    "    WINDOW_SIZES: [1, 2, 3, 3]\n")
    cfg = hrvit_cfg()
    cfg.merge_from_file(str(yaml))
    backbone = build_backbone(cfg)
    assert len(backbone.features) == 8 and len(backbone.features[7].branches[3]) == 1
    assert backbone.features[5].branches[2][0].attn.window_size == 3
    with pytest.raises(KeyError, match="MODEL.HRVIT.PRESET"):
        build_backbone(hrvit_cfg(PRESET="b9"))
    with pytest.raises(ValueError, match="MODEL.HRVIT.BLOCKS"):
        build_backbone(hrvit_cfg(BLOCKS=[[1], [1, 1, 1]]))


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in REPO.glob("configs/*/*/hrvit/*.yaml")))
def test_coco_and_ade20k_configs_build_the_preset_they_name(path):
    cfg = hrvit_cfg()
    cfg.merge_from_file(str(REPO / path))
    preset = cfg.MODEL.HRVIT.PRESET
    assert f"hrvit_{preset}" in path and cfg.MODEL.WEIGHTS == f"hrvit_{preset}.pkl"
    assert cfg.MODEL.BACKBONE.NAME == "build_hrvit_backbone"
    kwargs = HRViT.from_config(cfg, ShapeSpec(channels=3))
    assert kwargs["channels"] == PRESETS[preset]["channels"] and kwargs["norm"] == "SyncBN"
    if preset == "b1":  # building is the same code for every preset; once is enough
        backbone = build_backbone(cfg)
        assert get_clustering_pairs(backbone) == PAIRS


def test_converter_loads_authors_layout_strictly(tmp_path):
    authors = random_state_dict(read_layout("hrvit_b1"), prefix="module.")
    authors["module.head.classifier.weight"] = torch.randn(1000, 2048)  # ImageNet head: dropped
    src, dst = tmp_path / "hrvit_b1.pth", tmp_path / "hrvit_b1.pkl"
    torch.save({"model": authors}, src)
    load_tool("convert-hrvit-to-d2").convert_file(str(src), str(dst), preset="b1")
    with open(dst, "rb") as f:
        converted = pickle.load(f)
    assert converted["matching_heuristics"] is False
    assert all(k.startswith("backbone.") for k in converted["model"])

    model, incompatible = load_into_backbone(build_backbone(hrvit_cfg(PRESET="b1")), dst)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    name = "features.5.branches.2.3.des.proj_left.weight"
    assert torch.equal(model.backbone.state_dict()[name], authors["module." + name])

    del authors["module." + name]
    torch.save(authors, src)
    with pytest.raises(KeyError, match="des.proj_left.weight"):
        load_tool("convert-hrvit-to-d2").convert_file(str(src), str(dst), preset="b1")


def test_hcformer_with_hrvit_trains_a_few_iterations_on_shapes(shapes_root):
    cfg = assert_trains_on_shapes("configs/shapes/hrvit/hcformer_hrvit_b1_shapes.yaml")
    assert cfg.MODEL.BACKBONE.NAME == "build_hrvit_backbone"
