"""HAFA: LAA against a naive bilinear-sampling loop and against the plain patch embedding, DPC-KNN against a
plain numpy implementation of eqs. 2-4, merging (eq. 5) and the token <-> map dictionary against loops,
shapes/pairs at odd sizes, parameter counts vs the paper, config, converter (strict load), training on shapes.
The cluster-map tool is tested in tests/tools/test_visualize_sia_clusters.py."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn

from hierseg_d2.config import add_hierseg_config
from hierseg_d2.modeling.backbone.hafa import (
    HAFA,
    HAFA_PRESETS,
    LocalAdaptiveAggregation,
    TokenMapDictionary,
    convert_hafa_state_dict,
    dpc_knn,
    merge_tokens,
)
from hierseg_d2.modeling.backbone.layers import PatchEmbed
from hierseg_d2.modeling.backbone.pvt import PVT_PRESETS, PyramidVisionTransformer, convert_pvt_state_dict
from tests.modeling.backbone.utils import REPO, assert_trains_on_shapes, backbone_cfg, check_hierarchical_outputs
from tests.modeling.backbone.utils import count_params, load_into_backbone, load_tool, random_state_dict, read_layout

# HAFA Tables 1 and 6: #Param(HAFA) - #Param(base); PVT-Small: 25.8 - 24.5
PAPER_ADDITION_M = {"pvt_tiny": 1.4, "pvt_small": 1.3, "pvt_v2_b1": 0.6, "pvt_v2_b2": 0.6}


# ---------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", sorted(HAFA_PRESETS))
def test_parameter_additions_match_the_paper(preset):
    added = (count_params(HAFA(**HAFA_PRESETS[preset]))
             - count_params(PyramidVisionTransformer(**PVT_PRESETS[preset]))) / 1e6
    assert abs(added - PAPER_ADDITION_M[preset]) <= 0.4, added


# ---------------------------------------------------------------------------------------------- LAA
def naive_deformable_patch_embedding(x, offset, weight, bias, stride, padding):
    """Eq. 1 with explicit loops: output (b, o, i, j) = bias + sum over taps (ky, kx) of weight . x sampled
    bilinearly (zero outside) at (i*s - p + ky + dy, j*s - p + kx + dx), offsets in (dy, dx) tap order."""
    B, C, H, W = x.shape
    O, _, k, _ = weight.shape
    Ho, Wo = offset.shape[-2:]
    out = bias.view(1, O, 1, 1).repeat(B, 1, Ho, Wo)

    def sample(b, y, xx):
        y0, x0 = math.floor(y), math.floor(xx)
        val = torch.zeros(C, dtype=x.dtype)
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xc, wx in ((x0, 1 - (xx - x0)), (x0 + 1, xx - x0)):
                if 0 <= yy < H and 0 <= xc < W:
                    val += wy * wx * x[b, :, yy, xc]
        return val

    for b in range(B):
        for i in range(Ho):
            for j in range(Wo):
                for ky in range(k):
                    for kx in range(k):
                        t = ky * k + kx
                        y = i * stride - padding + ky + offset[b, 2 * t, i, j].item()
                        xx = j * stride - padding + kx + offset[b, 2 * t + 1, i, j].item()
                        out[b, :, i, j] += weight[:, :, ky, kx] @ sample(b, y, xx)
    return out


@pytest.mark.parametrize("patch,stride,overlap", [(3, 2, True), (2, 2, False)])
def test_laa_samples_grid_plus_offsets_bilinearly(patch, stride, overlap):
    torch.manual_seed(0)
    laa = LocalAdaptiveAggregation(patch, stride, 3, 4, overlap=overlap).double()
    with torch.no_grad():  # offsets of a few pixels, so that samples fall between pixels and off the border
        laa.offset.weight.normal_(0, 0.6)
        laa.offset.bias.normal_(0, 1.0)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    tokens, H, W = laa(x)
    xp = F.pad(x, (0, (-7) % stride, 0, (-5) % stride)) if not overlap else x
    offset = laa.offset(xp)
    assert offset.abs().max() > 1.0
    expected = naive_deformable_patch_embedding(xp, offset.detach(), laa.proj.weight.detach(),
                                                laa.proj.bias.detach(), stride, laa.proj.padding[0])
    assert (H, W) == (3, 4)
    expected = laa.norm(expected.flatten(2).transpose(1, 2))
    torch.testing.assert_close(tokens, expected)


@pytest.mark.parametrize("patch,stride,overlap", [(3, 2, True), (2, 2, False)])
def test_untrained_laa_equals_the_plain_patch_embedding(patch, stride, overlap):
    torch.manual_seed(0)
    laa = LocalAdaptiveAggregation(patch, stride, 8, 16, overlap=overlap)
    plain = PatchEmbed(patch, stride, 8, 16, overlap=overlap)
    plain.load_state_dict({k: v for k, v in laa.state_dict().items() if not k.startswith("offset.")})
    x = torch.randn(2, 8, 9, 11)
    (a, Ha, Wa), (b, Hb, Wb) = laa(x), plain(x)
    assert (Ha, Wa) == (Hb, Wb) == (5, 6)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # ... and it learns: the zero-initialised offset conv gets a gradient
    a.square().sum().backward()
    assert laa.offset.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- DPC-KNN
def dpc_knn_numpy(x, num_clusters, k):
    """Eqs. 2-4 written out literally for one image. Ties: equal density -> lower index ranks higher;
    equal score -> lower index is the earlier centre; equal distance -> earlier centre."""
    N = len(x)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))  # eq. 2
    k = min(k, N - 1)
    rho = np.empty(N)
    for i in range(N):
        others = sorted(d[i, j] for j in range(N) if j != i)[:k]
        rho[i] = np.exp(-sum(v ** 2 for v in others) / k)  # eq. 3
    delta = np.empty(N)
    for i in range(N):
        higher = [j for j in range(N) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta[i] = min(d[i, j] for j in higher) if higher else d.max()  # eq. 4
    score = rho * delta
    centres = sorted(range(N), key=lambda i: (-score[i], i))[:num_clusters]
    idx = np.empty(N, dtype=np.int64)
    for i in range(N):
        if i in centres:
            idx[i] = centres.index(i)
        else:
            best = 0
            for c in range(1, num_clusters):
                if d[i, centres[c]] < d[i, centres[best]]:
                    best = c
            idx[i] = best
    return idx, np.array(centres)


@pytest.mark.parametrize("N,C,M,k", [(12, 3, 3, 5), (30, 4, 8, 5), (20, 2, 5, 3), (6, 3, 6, 5)])
def test_dpc_knn_matches_numpy_reference(N, C, M, k):
    g = torch.Generator().manual_seed(N * 100 + M)
    x = torch.randn(3, N, C, generator=g, dtype=torch.float64) * 0.5
    idx, centres = dpc_knn(x, M, k)
    assert idx.shape == (3, N) and centres.shape == (3, M)
    for b in range(3):
        ref_idx, ref_centres = dpc_knn_numpy(x[b].numpy(), M, k)
        np.testing.assert_array_equal(centres[b].numpy(), ref_centres)
        np.testing.assert_array_equal(idx[b].numpy(), ref_idx)


def test_dpc_knn_breaks_ties_deterministically():
    # duplicated points on a coarse lattice: exact ties in density, score (delta = 0) and distance
    base = torch.tensor([[0, 0], [0, 0], [1, 0], [1, 0], [0, 1], [3, 3], [3, 3], [3, 3], [2, 3], [1, 1],
                         [1, 1], [0, 2]], dtype=torch.float64) * 0.25
    x = torch.stack([base, base.flip(0)])
    for M in (2, 4, 7):
        idx, centres = dpc_knn(x, M, 3)
        again, _ = dpc_knn(x, M, 3)
        torch.testing.assert_close(idx, again)
        for b in range(2):
            ref_idx, ref_centres = dpc_knn_numpy(x[b].numpy(), M, 3)
            np.testing.assert_array_equal(centres[b].numpy(), ref_centres)
            np.testing.assert_array_equal(idx[b].numpy(), ref_idx)
            assert torch.bincount(idx[b], minlength=M).min() >= 1  # no empty cluster


def test_merge_tokens_is_importance_weighted_mean_per_cluster():
    torch.manual_seed(0)
    x, score = torch.randn(2, 10, 4), torch.randn(2, 10) * 3
    idx = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 0, 1, 2], [2, 2, 2, 2, 0, 1, 1, 0, 2, 2]])
    merged = merge_tokens(x, score, idx, 3)
    for b in range(2):
        for c in range(3):
            members = [j for j in range(10) if idx[b, j] == c]
            p = torch.stack([score[b, j].exp() for j in members])
            expected = sum(p[n] * x[b, j] for n, j in enumerate(members)) / p.sum()  # eq. 5
            torch.testing.assert_close(merged[b, c], expected)


# ---------------------------------------------------------------------------------------------- dictionary
def test_dictionary_maps_tokens_to_the_stride32_grid_and_back():
    torch.manual_seed(0)
    H, W, M, C = 5, 7, 6, 3  # odd grid: the last row/column of cells holds partial 2x2 windows
    idx = torch.randint(0, M, (2, H * W))
    idx[:, :M] = torch.arange(M)
    dictionary = TokenMapDictionary(idx, M, H, W)
    tokens = torch.randn(2, M, C)
    fmap = dictionary.to_map(tokens)
    assert fmap.shape == (2, C, 3, 4) and dictionary.map_size == (3, 4)
    back = dictionary.to_tokens(fmap)
    for b in range(2):
        for i in range(3):
            for j in range(4):  # a cell = mean of its valid stride-16 members' cluster features
                members = [(y, x) for y in (2 * i, 2 * i + 1) for x in (2 * j, 2 * j + 1) if y < H and x < W]
                expected = sum(tokens[b, idx[b, y * W + x]] for y, x in members) / len(members)
                torch.testing.assert_close(fmap[b, :, i, j], expected)
        for c in range(M):  # a cluster = mean over its positions of the cell containing each
            positions = [n for n in range(H * W) if idx[b, n] == c]
            expected = sum(fmap[b, :, (n // W) // 2, (n % W) // 2] for n in positions) / len(positions)
            torch.testing.assert_close(back[b, c], expected)
    assert dictionary.cluster_map().shape == (2, H, W)


def test_dictionary_round_trip_is_exact_for_cell_aligned_clusters():
    # clusters = 2x2 cells: tokens -> map -> tokens is the identity, map -> tokens -> map too
    H, W = 4, 6
    idx = torch.tensor([(y // 2) * 3 + x // 2 for y in range(H) for x in range(W)]).unsqueeze(0)
    dictionary = TokenMapDictionary(idx, 6, H, W)
    tokens = torch.randn(1, 6, 5)
    torch.testing.assert_close(dictionary.to_tokens(dictionary.to_map(tokens)), tokens)
    torch.testing.assert_close(dictionary.to_map(tokens).flatten(2).transpose(1, 2), tokens)


# ---------------------------------------------------------------------------------------------- backbone
@pytest.mark.parametrize("preset,variant", [("pvt_v2_b1", "q"), ("pvt_tiny", "qkv")])
def test_odd_input_sizes_shapes_pairs_and_gradients(preset, variant):
    torch.manual_seed(0)
    model = HAFA(**dict(HAFA_PRESETS[preset], sia_clustering=variant))
    assert hasattr(model, "kv_pos") == (variant == "q")
    out = model(torch.randn(2, 3, 75, 101))
    check_hierarchical_outputs(model, out, 75, 101)
    assert all(t.shape[0] == 2 for t in out.values())
    # every parameter is used (DDP without find_unused_parameters), LAA offsets and SIA included
    sum(t.mean() for t in out.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # M = N / 4 clusters over the 5 x 7 stride-16 grid
    with torch.no_grad():
        ids = model.cluster_map(torch.randn(1, 3, 75, 101))
    assert ids.shape == (1, 5, 7) and 1 < len(ids.unique()) <= math.ceil(35 / 4)


def test_res5_and_ds5_are_cluster_tokens_through_the_dictionary():
    torch.manual_seed(0)
    model = HAFA(**dict(HAFA_PRESETS["pvt_v2_b1"], depths=(1, 1, 1, 1))).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        maps, clusters, dictionary = model.encode_to_sia(x)
        torch.testing.assert_close(out["ds5"], dictionary.to_map(clusters))
        final = model.run_cluster_block(0, clusters, dictionary)
        torch.testing.assert_close(out["res5"], dictionary.to_map(model.norm4(final)))
        # the clustering groups the stage-3 (res4) tokens
        idx, _ = dpc_knn(out["res4"].flatten(2).transpose(1, 2), dictionary.num_clusters, 5)
        torch.testing.assert_close(dictionary.idx, idx)
    assert dictionary.num_clusters == 4 * 6 // 4


@pytest.mark.parametrize("variant", ["q", "qkv"])
def test_stage4_attention_queries_clusters_against_grid_or_cluster_keys(variant):
    torch.manual_seed(0)
    model = HAFA(**dict(HAFA_PRESETS["pvt_tiny"], depths=(1, 1, 1, 1), cluster_ratio=0.5,
                        sia_clustering=variant)).eval()
    with torch.no_grad():
        for p in [*model.block4.parameters(), *getattr(model, "kv_pos", nn.Module()).parameters()]:
            p.normal_(0, 0.2)
    H, W, M = 5, 7, 18  # 18 cluster tokens as queries; "q": 3 x 4 = 12 grid tokens as keys/values
    idx = torch.arange(H * W) % M
    dictionary = TokenMapDictionary(idx[None], M, H, W)
    x = torch.randn(1, M, 512)
    with torch.no_grad():
        out = model.run_cluster_block(0, x, dictionary)
        block = model.block4[0]
        h = block.norm1(x)
        if variant == "q":
            grid = dictionary.to_map(h)
            grid = grid + F.conv2d(grid, model.kv_pos[0].weight, model.kv_pos[0].bias, padding=1, groups=512)
            kv_in = grid.flatten(2).transpose(1, 2)
            assert kv_in.shape[1] == 12
        else:
            kv_in = h
        q, (k, v) = block.attn.q(h), block.attn.kv(kv_in).chunk(2, dim=-1)
        heads = []
        for i in range(8):  # per-head softmax(q k^T / sqrt(64)) v (eq. 6)
            sl = slice(64 * i, 64 * (i + 1))
            heads.append(torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 8.0, dim=-1) @ v[..., sl])
        y = x + block.attn.proj(torch.cat(heads, dim=-1))
        expected = y + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(y))))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_config_builds_preset_with_overrides_and_rejects_bad_values():
    cfg = backbone_cfg("build_hafa_backbone", "HAFA", PRESET="pvt_v2_b2", DEPTHS=[1, 1, 1, 1], CLUSTER_RATIO=0.5,
                       SIA_CLUSTERING="qkv")
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(backbone, HAFA) and backbone.sia_clustering == "qkv"
    assert backbone.sia.num_clusters(35) == 18 and len(backbone.block2) == 1
    cfg.MODEL.HAFA.SIA_CLUSTERING = "kv"
    with pytest.raises(ValueError, match="SIA_CLUSTERING"):
        build_backbone(cfg, ShapeSpec(channels=3))
    with pytest.raises(ValueError, match="CLUSTER_RATIO"):
        HAFA(**dict(HAFA_PRESETS["pvt_v2_b1"], cluster_ratio=1.5))


# ---------------------------------------------------------------------------------------------- converter
# HAFA's new parameters (same names for v1 and v2), which the converter must report as kept at initialisation
NEW_PARAMS = ["patch_embed2.offset.weight", "patch_embed2.offset.bias", "patch_embed3.offset.weight",
          "patch_embed3.offset.bias", "sia.skip.weight", "sia.norm.weight", "sia.norm.bias",
          "sia.predictor.in_proj.0.weight", "sia.predictor.in_proj.0.bias", "sia.predictor.in_proj.1.weight",
          "sia.predictor.in_proj.1.bias", "sia.predictor.out_proj.0.weight", "sia.predictor.out_proj.0.bias",
          "sia.predictor.out_proj.2.weight", "sia.predictor.out_proj.2.bias", "sia.predictor.out_proj.4.weight",
          "sia.predictor.out_proj.4.bias", "kv_pos.0.weight", "kv_pos.0.bias", "kv_pos.1.weight",
          "kv_pos.1.bias"]


@pytest.mark.parametrize("preset", ["pvt_tiny", "pvt_v2_b1"])
def test_converter_loads_pvt_weights_into_hafa(tmp_path, preset):
    authors = random_state_dict(read_layout(preset), scale=0.1)
    torch.save(authors, tmp_path / f"{preset}.pth")
    out = load_tool("convert-pvt-to-d2").convert_file(str(tmp_path / f"{preset}.pth"), str(tmp_path / "hafa.pkl"),
                                                       hafa=True)
    assert sorted(out["kept_at_init"]) == sorted(NEW_PARAMS)  # listed explicitly: the only new parameters

    model, incompatible = load_into_backbone(HAFA(**HAFA_PRESETS[preset]), tmp_path / "hafa.pkl")
    assert sorted(k[len("backbone."):] for k in incompatible.missing_keys) == sorted(NEW_PARAMS)
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes

    # with PVT's weights and untrained LAA/SIA, HAFA computes exactly PVT's stages 1-3 and downsamplings
    plain = PyramidVisionTransformer(**PVT_PRESETS[preset]).eval()
    plain_sd, _ = convert_pvt_state_dict(authors, prefix="")
    plain.load_state_dict(plain_sd, strict=True)
    hafa = model.backbone.eval()
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        ours, ref = hafa(x), plain(x)
        for name in ("res2", "ds3", "res3", "ds4", "res4"):
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-4)
        # the stage-4 downsampling (v1: 2x2 kernel widened to 3x3) gives PVT's map
        down, h, w = hafa.embed(4, ref["res4"])
        torch.testing.assert_close(down.transpose(1, 2).reshape(1, -1, h, w), ref["ds5"], rtol=1e-4, atol=1e-4)

    with pytest.raises(KeyError, match="patch_embed1"):
        convert_hafa_state_dict({"block1.0.norm1.weight": torch.zeros(64)})


# ---------------------------------------------------------------------------------------------- configs, tools
def hafa_config_files():
    return sorted([*(REPO / "configs").glob("*/*/hafa/*.yaml"), *(REPO / "configs").glob("shapes/hafa/*.yaml")])


def test_configs_resolve_their_backbone_preset():
    from detectron2.modeling import BACKBONE_REGISTRY
    from hierseg_d2.modeling.backbone.presets import resolve_preset

    files = hafa_config_files()
    assert len(files) == 18
    for path in files:
        cfg = get_cfg()
        add_hierseg_config(cfg)
        cfg.merge_from_file(str(path))
        name = cfg.MODEL.BACKBONE.NAME
        assert name in ("build_hafa_backbone", "build_pvt_backbone") and BACKBONE_REGISTRY.get(name)
        node, presets = (cfg.MODEL.HAFA, HAFA_PRESETS) if "hafa" in name else (cfg.MODEL.PVT, PVT_PRESETS)
        kwargs = resolve_preset(node, presets, str(path))
        assert (name == "build_hafa_backbone") == path.name.startswith("hcformer_hafa_")
        assert node.PRESET in path.name and cfg.INPUT.FORMAT == "RGB"
        # PVT's segmentation drop-path rate; the from-scratch shapes models use none
        assert kwargs["drop_path_rate"] == (0.0 if "shapes" in path.name else 0.1)


def test_trains_a_few_iterations_on_shapes(shapes_root):
    assert_trains_on_shapes("configs/shapes/hafa/hcformer_hafa_pvt_v2_b1_shapes.yaml")
