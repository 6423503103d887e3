"""HILA: inter-level attentions against explicit loops, the HILA block schedule, parameter counts, odd
sizes, HCFormer pairs, the converter, the hierarchical attention (eq. 14-15) and its tool."""
import functools
import logging
import math

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_backbone
from torch import nn

from hierseg_d2.modeling.backbone.hila import (
    BASE_MODELS,
    HILA_PRESETS,
    TRUNCATED_BASES,
    BottomUpAttention,
    HILABackbone,
    PatchGeometry,
    SwinBase,
    TopDownAttention,
    compose_top_down_attention,
    convert_mit_state_dict_for_hila,
    hila_schedule,
)
from hierseg_d2.modeling.backbone.mit import MIT_PRESETS, MixVisionTransformer
from tests.modeling.backbone.utils import assert_trains_on_shapes, backbone_cfg, check_hierarchical_outputs
from tests.modeling.backbone.utils import count_params, load_into_backbone, load_tool, random_state_dict, read_layout

P = 4  # patch size


def _cfg(preset="mit_b0_s3", **hila):
    return backbone_cfg("build_hila_backbone", "HILA", PRESET=preset, **hila)


def _covering(y, x, Hh, Wh):
    """[(higher index, position in its patch)] of the higher features whose 4x4 patch covers (y, x)."""
    found = []
    for h in range(Hh):
        for w in range(Wh):
            dy, dx = y - (2 * h - 1), x - (2 * w - 1)
            if 0 <= dy < P and 0 <= dx < P:
                found.append((h * Wh + w, dy * P + dx))
    return found


def naive_top_down(attn: TopDownAttention, x_low, Hl, Wl, x_high, Hh, Wh):
    """Per lower pixel: softmax over exactly the higher features covering it, then f(sum a v)."""
    q = attn.q(attn.norm_q(x_low))
    k, v = attn.k(attn.norm_kv(x_high)), attn.v(attn.norm_kv(x_high))
    out = torch.zeros_like(q)
    counts = set()
    for y in range(Hl):
        for x in range(Wl):
            cover = _covering(y, x, Hh, Wh)
            counts.add(len(cover))
            logits = torch.stack([(q[:, y * Wl + x] * k[:, j]).sum(-1) / math.sqrt(q.shape[-1])
                                  + attn.relative_position_bias_table[pos] for j, pos in cover], dim=-1)
            a = logits.softmax(dim=-1)
            out[:, y * Wl + x] = sum(a[:, n, None] * v[:, j] for n, (j, _) in enumerate(cover))
    return attn.proj(out), counts


def naive_bottom_up(attn: BottomUpAttention, x_high, Hh, Wh, x_low, Hl, Wl, mask_padding):
    """Per higher feature: softmax over its 4x4 window, logits scaled by 1/sqrt(d_high) as the release.
    A window position outside the lower map is the release's zero-padded (normed) feature, whose key and
    value are the biases of k and v; with ``mask_padding`` it is left out."""
    q = attn.q(attn.norm_q(x_high))
    k, v = attn.k(attn.norm_kv(x_low)), attn.v(attn.norm_kv(x_low))
    scale = 1 / math.sqrt(x_high.shape[-1])
    out = torch.zeros_like(q)
    for h in range(Hh):
        for w in range(Wh):
            logits, values = [], []
            for i in range(P):
                for j in range(P):
                    y, x = 2 * h - 1 + i, 2 * w - 1 + j
                    inside = 0 <= y < Hl and 0 <= x < Wl
                    if not inside and mask_padding:
                        continue
                    key = k[:, y * Wl + x] if inside else attn.k.bias.expand(q.shape[0], -1)
                    bias = attn.relative_position_bias_table[i * P + j]
                    logits.append((q[:, h * Wh + w] * key).sum(-1) * scale + bias)
                    values.append(v[:, y * Wl + x] if inside else attn.v.bias.expand(q.shape[0], -1))
            a = torch.stack(logits, -1).softmax(-1)
            out[:, h * Wh + w] = sum(a[:, n, None] * values[n] for n in range(len(values)))
    return attn.proj(out)


@pytest.mark.parametrize("Hl,Wl", [(8, 10), (7, 9)])
def test_top_down_equals_per_pixel_softmax_over_covering_features(Hl, Wl):
    torch.manual_seed(0)
    Hh, Wh = (Hl + 1) // 2, (Wl + 1) // 2
    attn = TopDownAttention(dim_high=12, dim_low=8).double()
    nn.init.normal_(attn.relative_position_bias_table, std=1.0)  # make the bias matter
    x_low = torch.randn(2, Hl * Wl, 8, dtype=torch.float64) * 3
    x_high = torch.randn(2, Hh * Wh, 12, dtype=torch.float64) * 3
    ref, counts = naive_top_down(attn, x_low, Hl, Wl, x_high, Hh, Wh)
    assert counts == {1, 2, 4}  # corners, borders (incl. the odd last row / column) and the interior
    torch.testing.assert_close(attn(x_low, Hl, Wl, x_high, Hh, Wh), ref)


@pytest.mark.parametrize("mask_padding", [False, True])
@pytest.mark.parametrize("Hl,Wl", [(8, 10), (7, 9)])
def test_bottom_up_equals_per_window_attention(Hl, Wl, mask_padding):
    torch.manual_seed(1)
    Hh, Wh = (Hl + 1) // 2, (Wl + 1) // 2
    attn = BottomUpAttention(dim_high=12, dim_low=8, mask_padding=mask_padding).double()
    nn.init.normal_(attn.relative_position_bias_table, std=1.0)
    for lin in (attn.k, attn.v):
        nn.init.normal_(lin.bias, std=1.0)  # make the padded positions' keys / values matter
    x_high = torch.randn(2, Hh * Wh, 12, dtype=torch.float64) * 3
    x_low = torch.randn(2, Hl * Wl, 8, dtype=torch.float64) * 3
    ref = naive_bottom_up(attn, x_high, Hh, Wh, x_low, Hl, Wl, mask_padding)
    torch.testing.assert_close(attn(x_high, Hh, Wh, x_low, Hl, Wl), ref)


def test_top_down_softmax_is_stable_and_differentiable():
    torch.manual_seed(2)
    attn = TopDownAttention(dim_high=8, dim_low=8)
    x_low = (torch.randn(1, 6 * 6, 8) * 1e3).requires_grad_()  # logits far beyond exp's range
    out = attn(x_low, 6, 6, torch.randn(1, 9, 8) * 1e3, 3, 3)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x_low.grad).all()


def test_geometry_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="ceil"):
        PatchGeometry(8, 8, 3, 4, P)


def _record_schedule(model, stage, x):
    part = model.hila[str(stage)]
    calls = []
    part.bottom_up[0].register_forward_hook(lambda *a: calls.append("bu"))
    part.top_down[0].register_forward_hook(lambda *a: calls.append("td"))
    part.top_down_block[0].register_forward_hook(lambda *a: calls.append("td_block"))
    part.prevnorm.register_forward_hook(lambda *a: calls.append("prevnorm"))
    for j, blk in enumerate(model.base.stage_blocks(stage)):
        blk.register_forward_hook(lambda *a, j=j: calls.append(f"block{j}"))
    with torch.no_grad():
        model(x)
    return calls


def test_hila_block_schedule_with_stride():
    """B2 + S(2,3,4), s3 = 3, as the release's apply_hila runs it: bottom-up before blocks 0 and 3, top-down
    (attention + FFN, then the new block) after every block j != last with (j - 1) % 3 == 0, i.e. after
    blocks 1 and 4; prevnorm once at the end. The paper's reading puts the top-down update before block 3."""
    x = torch.randn(1, 3, 64, 64)
    model = HILABackbone(**HILA_PRESETS["mit_b2_s234"]).eval()
    assert _record_schedule(model, 3, x) == ["bu", "block0", "block1", "td", "td_block", "block2", "bu", "block3",
                                             "block4", "td", "td_block", "block5", "prevnorm"]
    paper = HILABackbone(**HILA_PRESETS["mit_b2_s234"], schedule="paper").eval()
    assert _record_schedule(paper, 3, x) == ["bu", "block0", "block1", "block2", "td", "td_block", "bu", "block3",
                                             "block4", "block5", "prevnorm"]


def test_swin_schedule_norms_the_lower_level_after_every_block_without_top_down():
    """The release's Swin BasicLayer (stride 2, six blocks): after each block, a top-down update if
    j != last and (j - 1) % 2 == 0, else bottom_norm on the lower level, so twice at the very end."""
    model = HILABackbone(**HILA_PRESETS["swin_t_s234"]).eval()
    calls = _record_schedule(model, 3, torch.randn(1, 3, 64, 64))
    assert calls == ["bu", "block0", "prevnorm", "block1", "td", "td_block", "bu", "block2", "prevnorm", "block3",
                     "td", "td_block", "bu", "block4", "prevnorm", "block5", "prevnorm"]
    assert hila_schedule(6, 2) == ([0, 2, 4], [2, 4]) and hila_schedule(6, 3) == ([0, 3], [2, 5])
    assert hila_schedule(6, 3, "paper") == ([0, 3], [3]) and hila_schedule(2, 1) == ([0, 1], [1])


def test_final_top_down_features_are_handed_on():
    """S(3) with the same MiT weights as a plain MiT: stage 1 (res2) and the patch embedding into stage 3
    (ds4, read before stage 3's top-down updates) are unchanged; res3 is the top-down updated stage 2."""
    torch.manual_seed(0)
    hila = HILABackbone(**HILA_PRESETS["mit_b0_s3"]).eval()
    plain = MixVisionTransformer(**MIT_PRESETS["b0"]).eval()
    plain.load_state_dict(hila.base.state_dict())
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        a, b = hila(x), plain(x)
    for name in ("res2", "ds3", "ds4"):
        torch.testing.assert_close(a[name], b[name])
    for name in ("res3", "res4", "res5", "ds5"):
        assert not torch.allclose(a[name], b[name]), name


@pytest.mark.parametrize("preset,stages", [("mit_b0_s3", None), ("mit_b0_s3", [2, 3, 4]), ("swin_t_s234", None)])
def test_outputs_follow_ceil_sizes_and_pairs(preset, stages):
    cfg = _cfg(preset) if stages is None else _cfg(preset, STAGES=stages)
    model = build_backbone(cfg).eval()
    H, W = 75, 101
    with torch.no_grad():
        out = model(torch.randn(1, 3, H, W))
    check_hierarchical_outputs(model, out, H, W)


def _lin(i, o):
    return i * o + o


def _ffn(d, e):  # LN + fc1 + 3x3 depth-wise conv + fc2
    h = int(d * e)
    return 2 * d + _lin(d, h) + 10 * h + _lin(h, d)


def _inter_level_attention(d_q, d_kv, d):  # 2 LN, q, k, v, f, 16 biases
    return 2 * d_q + 2 * d_kv + _lin(d_q, d) + 2 * _lin(d_kv, d) + _lin(d, d_q) + P * P


def expected_hila_params(preset):
    """The paper's HILA parts counted by hand, once per stage (weights shared across iterations)."""
    cfg = HILA_PRESETS[preset]
    if cfg["base"].startswith("mit"):
        dims = BASE_MODELS[cfg["base"]][1]["embed_dims"]
        sr = (8, 4, 2, 1)

        def block(s):  # MiT block of stage s: 2 LN, q, kv, proj, (sr conv + LN), Mix-FFN(4)
            d = dims[s - 1]
            red = d * d * sr[s - 1] ** 2 + d + 2 * d if sr[s - 1] > 1 else 0
            return 4 * d + _lin(d, d) + _lin(d, 2 * d) + _lin(d, d) + red + _lin(d, 4 * d) + 40 * d + _lin(4 * d, d)
    else:
        dims, heads = (96, 192, 384, 768), (3, 6, 12, 24)

        def block(s):  # Swin block: 2 LN, qkv, proj, 13x13 bias table per head, MLP(4)
            d = dims[s - 1]
            return 4 * d + _lin(d, 3 * d) + _lin(d, d) + 169 * heads[s - 1] + _lin(d, 4 * d) + _lin(4 * d, d)
    total = 0
    for s in cfg["stages"]:
        dh, dl, e = dims[s - 1], dims[s - 2], cfg["ffn_ratios"][s - 1]
        total += _inter_level_attention(dh, dl, min(dh, dl)) + _ffn(dh, e)  # bottom-up
        total += _inter_level_attention(dl, dh, min(dh, dl)) + _ffn(dl, e) + block(s - 1)  # top-down
        total += 2 * dl  # the release's prevnorm closing the lower level
    return total


@functools.lru_cache(maxsize=None)
def plain_params(base):
    """Parameters of a base model on its own (MiT as build_mit_backbone builds it, Detectron2's Swin)."""
    family, kwargs = BASE_MODELS[base]
    return count_params(MixVisionTransformer(**kwargs) if family == "mit" else SwinBase(**kwargs))


@functools.lru_cache(maxsize=None)
def hila_addition(preset, share_weights=True):
    """HILA backbone total minus the plain backbone of Table 1's baseline row (for B2 + S(2,3,4), whose
    base is MiT-B2 on depths 2, 2, 6, 2, the standard MiT-B2 it is converted from)."""
    model = HILABackbone(**{**HILA_PRESETS[preset], "share_weights": share_weights})
    base = HILA_PRESETS[preset]["base"]
    return count_params(model) - plain_params(TRUNCATED_BASES.get(base, base))


# Totals (M) of the segmentation model without / with HILA as the paper prints them; the decode head is the
# same in both, so their difference is what HILA adds to the backbone (each total rounded to 0.1M).
PAPER_TOTALS = {
    ("mit_b0_s3", True): (3.7, 4.2),  # Table 1 (and Table 7b, "Weight Sharing" ✓)
    ("mit_b0_s3", False): (3.7, 4.4),  # Table 7b, "Weight Sharing" ✗ (B0 baseline from Table 1)
    ("mit_b1_s3", False): (13.7, 16.3),  # Table 1: only unshared weights give it (see the test below)
    ("mit_b1_s234", True): (13.7, 21.6),  # Table 1
    ("mit_b2_s234", True): (27.4, 30.8),  # Table 1 and Table 7c
    ("swin_t_s234", True): (59.8, 68.5),  # Table 1 (UperNet)
}


@pytest.mark.parametrize("preset,share_weights", sorted(PAPER_TOTALS))
def test_hila_additions_within_15_percent_of_the_paper(preset, share_weights):
    without, with_hila = PAPER_TOTALS[(preset, share_weights)]
    assert hila_addition(preset, share_weights) / 1e6 == pytest.approx(with_hila - without, rel=0.15)


@pytest.mark.parametrize("share_weights", [True, False])
def test_b0_and_b1_s3_rows_of_table1_cannot_both_match(share_weights):
    """B1's widths are twice B0's at every stage and both S(3) presets have the same HILA hyper-parameters,
    so every added tensor of B1 has at most 4x the entries of B0's (weights 4x, biases / norms / depth-wise
    convolutions 2x, position biases 1x) and B1's addition is < 4x B0's whatever the reading. Table 1's
    rounded totals need at least (16.3 - 13.7 - 0.1) / (4.2 - 3.7 + 0.1) = 2.5 / 0.6 > 4x."""
    b0, b1 = HILA_PRESETS["mit_b0_s3"], HILA_PRESETS["mit_b1_s3"]
    assert {k: v for k, v in b0.items() if k != "base"} == {k: v for k, v in b1.items() if k != "base"}
    dims0, dims1 = BASE_MODELS[b0["base"]][1]["embed_dims"], BASE_MODELS[b1["base"]][1]["embed_dims"]
    assert tuple(dims1) == tuple(2 * d for d in dims0)
    added0 = dict(HILABackbone(**b0, share_weights=share_weights).hila.named_parameters())
    added1 = dict(HILABackbone(**b1, share_weights=share_weights).hila.named_parameters())
    assert added0.keys() == added1.keys()
    assert all(added1[k].numel() <= 4 * added0[k].numel() for k in added0)
    ratio = hila_addition("mit_b1_s3", share_weights) / hila_addition("mit_b0_s3", share_weights)
    needed = (16.3 - 13.7 - 0.1) / (4.2 - 3.7 + 0.1)
    assert 3.9 < ratio < 4 < needed


@pytest.mark.parametrize("preset", sorted(HILA_PRESETS))
def test_hila_parts_counted_by_hand(preset):
    model = HILABackbone(**HILA_PRESETS[preset])
    assert count_params(model) - count_params(model.base) == expected_hila_params(preset)
    base = HILA_PRESETS[preset]["base"]
    if base.startswith("mit"):  # the plain MiT of the reference (for B2 + S(2,3,4): the one it starts from)
        ref = {"mit_b0": 3.32, "mit_b1": 13.15, "mit_b2": 24.20}[TRUNCATED_BASES.get(base, base)]
        assert plain_params(TRUNCATED_BASES.get(base, base)) / 1e6 == pytest.approx(ref, rel=0.01)


def test_b2_base_is_mit_b2_without_four_blocks():
    """Table 5: B2 + HILA has N = 2, 2, 6, 2 blocks; the base is MiT-B2 minus block1.2, 2.2, 2.3 and 4.2."""
    base = HILABackbone(**HILA_PRESETS["mit_b2_s234"]).base
    assert tuple(base.depths) == (2, 2, 6, 2)
    full = MixVisionTransformer(**MIT_PRESETS["b2"]).state_dict()
    ours = base.state_dict()
    assert set(ours) <= set(full)
    assert {".".join(k.split(".")[:2]) for k in set(full) - set(ours)} == {"block1.2", "block2.2", "block2.3",
                                                                           "block4.2"}
    assert all(ours[k].shape == full[k].shape for k in ours)


def test_weight_sharing_and_stride_as_in_table7():
    def count(**kw):
        return count_params(HILABackbone(**{**HILA_PRESETS["mit_b0_s3"], **kw}))
    # Table 7b: B0 + S(3) 4.2M shared, 4.4M unshared: the second iteration's bottom-up update is new
    assert 0.1e6 <= count(share_weights=False) - count() <= 0.3e6
    # Table 7c: the stride changes FLOPs, not parameters
    b2 = {s: count_params(HILABackbone(**{**HILA_PRESETS["mit_b2_s234"], "strides": (1, 1, s, 1)}).hila)
          for s in (1, 3)}
    assert b2[1] == b2[3]


def _new_hila_tensors(stage):
    parts = ("norm_q", "norm_kv", "q", "k", "v", "proj")
    new = [f"backbone.hila.{stage}.{d}.0.attn.relative_position_bias_table" for d in ("bottom_up", "top_down")]
    new += [f"backbone.hila.{stage}.{d}.0.{m}.{w}" for d in ("bottom_up", "top_down")
            for m in [f"attn.{p}" for p in parts] + ["norm", "mlp.fc1", "mlp.dwconv.dwconv", "mlp.fc2"]
            for w in ("weight", "bias")]
    return new + [f"backbone.hila.{stage}.prevnorm.{w}" for w in ("weight", "bias")]


def test_converted_mit_checkpoint_loads_into_hila(tmp_path):
    authors = random_state_dict(read_layout("mit_b0"))
    src, dst = tmp_path / "mit_b0.pth", tmp_path / "hila_mit_b0_s3.pkl"
    torch.save(authors, src)
    _, dropped, kept = load_tool("convert-mit-to-d2").main([str(src), str(dst), "--hila-preset", "mit_b0_s3"])

    new = _new_hila_tensors(3)
    assert dropped == [] and sorted(kept) == sorted(new)

    model, incompatible = load_into_backbone(build_backbone(_cfg("mit_b0_s3")), dst)
    assert sorted(incompatible.missing_keys) == sorted(new)
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    state = model.state_dict()
    torch.testing.assert_close(state["backbone.base.block3.1.attn.q.weight"], authors["block3.1.attn.q.weight"])
    # the top-down block of stage 3 starts as the last block of stage 2 (HILA Sec. 4.2)
    torch.testing.assert_close(state["backbone.hila.3.top_down_block.0.attn.sr.weight"],
                               authors["block2.1.attn.sr.weight"])


def test_mit_b2_checkpoint_converts_for_b2_s234_dropping_the_extra_blocks(tmp_path, caplog):
    """B2 + S(2,3,4) is MiT-B2 on depths 2, 2, 6, 2: the converter drops block1.2, block2.2, block2.3 and
    block4.2 of mit_b2.pth, logs every dropped name, and the rest loads strictly."""
    layout = read_layout("mit_b2")
    authors = random_state_dict(layout)
    src, dst = tmp_path / "mit_b2.pth", tmp_path / "hila_mit_b2_s234.pkl"
    torch.save(authors, src)
    with caplog.at_level(logging.WARNING, logger="hierseg_d2.modeling.backbone.hila"):
        _, dropped, kept = load_tool("convert-mit-to-d2").main([str(src), str(dst), "--hila-preset", "mit_b2_s234"])

    extra = [k for k in layout if k.startswith(("block1.2.", "block2.2.", "block2.3.", "block4.2."))]
    assert len(extra) == 3 * 20 + 16  # 20 tensors per block, stage 4's without the reduction conv + norm
    assert sorted(dropped) == sorted(extra)
    assert "block1.2, block2.2, block2.3, block4.2" in caplog.text
    assert all(k in caplog.text for k in extra)
    assert sorted(kept) == sorted(n for s in (2, 3, 4) for n in _new_hila_tensors(s))

    model, incompatible = load_into_backbone(build_backbone(_cfg("mit_b2_s234")), dst)
    assert sorted(incompatible.missing_keys) == sorted(kept)  # only the inter-level parts, no MiT tensor
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    state = model.state_dict()
    for k in set(layout) - set(extra):
        torch.testing.assert_close(state["backbone.base." + k], authors[k])
    # top-down blocks start as the last block the base keeps of the stage below
    torch.testing.assert_close(state["backbone.hila.2.top_down_block.0.attn.sr.weight"],
                               authors["block1.1.attn.sr.weight"])
    torch.testing.assert_close(state["backbone.hila.3.top_down_block.0.attn.sr.weight"],
                               authors["block2.1.attn.sr.weight"])
    torch.testing.assert_close(state["backbone.hila.4.top_down_block.0.mlp.fc1.weight"],
                               authors["block3.5.mlp.fc1.weight"])
    # only a mit_b2 checkpoint is cut: a mit_b1 one (same widths, 2 blocks in stage 3) still fails
    with pytest.raises(KeyError, match="missing"):
        convert_mit_state_dict_for_hila(random_state_dict(read_layout("mit_b1")), "mit_b2_s234")


def naive_composition(attentions, sizes, location):
    """Eq. 14-15 with explicit sums over the stage-l features and their patch positions."""
    top = max(attentions)
    weights = {location: 1.0}
    maps = []
    for stage in range(top, top - len(attentions), -1):
        (Hh, Wh), (Hl, Wl) = sizes[stage], sizes[stage - 1]
        lower = torch.zeros(Hl, Wl, dtype=torch.float64)
        for (h, w), wt in weights.items():
            for i in range(P):
                for j in range(P):
                    y, x = 2 * h - 1 + i, 2 * w - 1 + j
                    if 0 <= y < Hl and 0 <= x < Wl:
                        lower[y, x] += wt * attentions[stage][h * Wh + w, i * P + j]
        lower /= lower.sum()
        maps.append(lower)
        weights = {(y, x): lower[y, x].item() for y in range(Hl) for x in range(Wl)}
    return maps


def test_composition_equals_eq_14_15():
    torch.manual_seed(3)
    sizes = {1: (13, 15), 2: (7, 8), 3: (4, 4), 4: (2, 2)}
    attentions = {s: torch.rand(sizes[s][0] * sizes[s][1], P * P, dtype=torch.float64) for s in (2, 3, 4)}
    for location in [(0, 0), (1, 1)]:
        maps = compose_top_down_attention(attentions, sizes, location)
        ref = naive_composition(attentions, sizes, location)
        assert [m.shape for m in maps] == [(4, 4), (7, 8), (13, 15)]
        for m, r in zip(maps, ref):
            torch.testing.assert_close(m, r)
            assert m.sum().item() == pytest.approx(1.0)


def test_visualization_tool_writes_png(tmp_path):
    image = (np.random.RandomState(0).rand(70, 90, 3) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "in.png"), image)
    config = tmp_path / "hila.yaml"
    config.write_text('MODEL:\n  BACKBONE:\n    NAME: "build_hila_backbone"\n  HILA:\n    PRESET: "mit_b0_s3"\n'
                      "    STAGES: [2, 3, 4]\n")
    tool = load_tool("visualize_hila_attention")
    out = tmp_path / "attention.png"
    maps = tool.main(["--config-file", str(config), "--input", str(tmp_path / "in.png"), "--location", "1", "2",
                      "--output", str(out), "--all-levels"])
    assert [tuple(m.shape) for m in maps] == [(5, 6), (9, 12), (18, 23)]  # stages 3, 2, 1 of a 70x90 image
    written = cv2.imread(str(out))
    assert written.shape == (70, 3 * 90, 3)
    # S(3) only: there is no stage-4 attention to start from
    with pytest.raises(ValueError, match="stage 4"):
        tool.main(["--config-file", str(config), "--input", str(tmp_path / "in.png"), "--output", str(out),
                   "MODEL.HILA.STAGES", "[3]"])


def test_every_parameter_gets_a_gradient():
    """No unused parameter (DistributedDataParallel would fail) and gradients flow through both directions."""
    model = build_backbone(_cfg("mit_b0_s3", STAGES=[2, 3, 4]))
    out = model(torch.randn(1, 3, 64, 64))
    sum(v.square().mean() for k, v in out.items() if k.startswith("res")).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_trains_a_few_iterations_on_shapes(shapes_root):
    assert_trains_on_shapes("configs/shapes/hila/hcformer_hila_mit_b0_s3_shapes.yaml")
