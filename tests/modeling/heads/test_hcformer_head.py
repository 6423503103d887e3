"""HCFormerHead: level selection, decoded stride per LEVELS, odd sizes, fallback pairs, HCFormer+."""
import math

import pytest
import torch
from detectron2.modeling import build_backbone

from hierseg_d2.modeling.backbone.hierarchy import get_clustering_pairs
from hierseg_d2.modeling.clustering import decode_hierarchy
from hierseg_d2.modeling.heads import HCFormerHead
from hierseg_d2.modeling.heads.hcformer_head import select_levels
from tests.modeling.fake_backbones import tiny_cfg


def _head(cfg):
    backbone = build_backbone(cfg)
    return backbone, HCFormerHead(cfg, backbone.output_shape(), clustering_pairs=get_clustering_pairs(backbone))


@pytest.mark.parametrize("backbone", ["build_tiny_pairs_backbone", "build_tiny_plain_backbone"])
@pytest.mark.parametrize("levels,stride", [(0, 32), (1, 16), (2, 8), (3, 4)])
def test_levels_and_odd_sizes_decode_to_the_right_shape(backbone, levels, stride):
    torch.manual_seed(0)
    backbone, head = _head(tiny_cfg(backbone, levels))
    height, width = 75, 61  # odd at every stride: 75 -> 38 -> 19 -> 10 -> 5 -> 3
    features = backbone(torch.randn(1, 3, height, width))
    out = head(features)
    expected_levels = [2, 3, 4][3 - levels:]
    assert head.levels == expected_levels
    assert len(out["assignments"]) == levels and len(out["cluster_scales"]) == levels
    for level, assign in zip(expected_levels, out["assignments"]):
        assert assign.shape == (1, 9, math.ceil(height / 2 ** level), math.ceil(width / 2 ** level))
    assert out["pred_masks"].shape == (1, 10, math.ceil(height / 32), math.ceil(width / 32))
    decoded = decode_hierarchy(out["pred_masks"], out["assignments"])
    assert decoded.shape == (1, 10, math.ceil(height / stride), math.ceil(width / stride))


def test_fallback_pairs_use_stage_outputs():
    backbone, head = _head(tiny_cfg("build_tiny_plain_backbone"))
    assert head.pairs == {2: ("res2", "res3"), 3: ("res3", "res4"), 4: ("res4", "res5")}
    # channels of the after-map projection follow the paired feature
    assert head.clustering["2"].down_proj.in_channels == backbone.output_shape()["res3"].channels


def test_bad_levels_and_in_feature_are_reported():
    backbone = build_backbone(tiny_cfg())
    pairs = get_clustering_pairs(backbone)
    with pytest.raises(ValueError, match="LEVELS=4"):
        select_levels(pairs, 4, "res5", backbone.output_shape())
    # a stride-16 memory leaves only the two finer levels to decode through
    with pytest.raises(ValueError, match="LEVELS=3: below 'res4'"):
        select_levels(pairs, 3, "res4", backbone.output_shape())
    assert select_levels(pairs, 2, "res4", backbone.output_shape()) == [2, 3]
    assert select_levels(pairs, 3, "res5", backbone.output_shape()) == [2, 3, 4]
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "p5"
    with pytest.raises(KeyError, match="'p5'"):
        HCFormerHead(cfg, backbone.output_shape(), clustering_pairs=pairs)


def test_hcformer_plus_encoder_runs_and_adds_layers():
    cfg = tiny_cfg()
    backbone, plain = _head(cfg)
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = 2
    _, plus = _head(cfg)
    assert plus.encoder is not None and len(plus.encoder.self_attn_layers) == 2
    # encoder layers: self-attention (4 d^2 + 4 d) + 2 LayerNorms + FFN (2 d f + d + f), plus the input projection
    d, f, c = 32, 64, backbone.output_shape()["res5"].channels
    per_layer = 4 * d * d + 4 * d + 4 * d + 2 * d * f + d + f
    extra = 2 * per_layer + (c * d + d) + 2 * d  # input projection conv + its GroupNorm(32)
    # the decoder and the mask projection now read d channels instead of c
    extra -= (c * d + d) + (c * 32 + 32) - (d * 32 + 32)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(plus) - count(plain) == extra
    out = plus(backbone(torch.randn(2, 3, 64, 96)))
    assert out["pred_masks"].shape == (2, 10, 2, 3)
