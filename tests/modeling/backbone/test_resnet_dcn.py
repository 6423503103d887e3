"""ResNet with DCNv2 downsampling (HCFormer Sec. 2.5, App. F.2)."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from hierseg_d2.config import add_hierseg_config
from hierseg_d2.modeling.backbone import get_clustering_pairs
from hierseg_d2.modeling.backbone.resnet_dcn import ModulatedDeformConv, dcn_stages_for_levels

STAGES = ["res2", "res3", "res4", "res5"]


def _cfg(depth=50, levels=3, dcn=True, **resnets):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_hcformer_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = STAGES
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.HCFORMER.LEVELS = levels
    cfg.MODEL.HCFORMER.DCN_DOWNSAMPLING = dcn
    for k, v in resnets.items():
        setattr(cfg.MODEL.RESNETS, k, v)
    return cfg


def _offset_keys(stages):
    return {f"res{s}.0.conv2_offset.{p}" for s in stages for p in ("weight", "bias")}


@pytest.mark.parametrize("levels,stages", [(3, (3, 4, 5)), (2, (4, 5)), (1, (5,)), (0, ())])
def test_checkpoint_names_are_detectron2_resnet_plus_offsets(levels, stages):
    cfg = _cfg(levels=levels)
    ours = set(build_backbone(cfg).state_dict())
    d2 = set(build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict())
    assert dcn_stages_for_levels(levels) == tuple(sorted(stages, reverse=True))
    assert ours == d2 | _offset_keys(stages)


def test_dcn_off_builds_plain_resnet():
    model = build_backbone(_cfg(dcn=False))
    assert not any(isinstance(m, ModulatedDeformConv) for m in model.modules())
    assert set(model.state_dict()) == set(build_resnet_backbone(_cfg(), ShapeSpec(channels=3)).state_dict())


def test_equals_detectron2_resnet_at_init_and_exposes_maps_after_downsampling():
    """R-50 weights loaded into the DCN ResNet give Detectron2's ResNet outputs (zero offsets, unit
    modulation), and ds_k is the first block's stride-2 conv output after norm + ReLU (read by a hook on
    Detectron2's own ResNet)."""
    torch.manual_seed(0)
    cfg = _cfg()
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    ours = build_backbone(cfg).eval()
    incompatible = ours.load_state_dict(d2.state_dict(), strict=False)
    assert set(incompatible.missing_keys) == _offset_keys((3, 4, 5))
    assert not incompatible.unexpected_keys

    captured = {}
    for k in (3, 4, 5):
        getattr(d2, f"res{k}")[0].conv2.register_forward_hook(
            lambda mod, inp, out, k=k: captured.__setitem__(f"ds{k}", F.relu(out)))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref, out = d2(x), ours(x)
    for name in STAGES:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-4)
    for name in ("ds3", "ds4", "ds5"):
        torch.testing.assert_close(out[name], captured[name], rtol=1e-4, atol=1e-4)


def test_odd_size_strides_and_pairs():
    model = build_backbone(_cfg()).eval()
    H, W = 75, 101
    with torch.no_grad():
        out = model(torch.randn(1, 3, H, W))
    shapes = model.output_shape()
    assert set(out) == set(shapes) == set(STAGES) | {"ds3", "ds4", "ds5"}
    for name, spec in shapes.items():
        s = spec.stride
        assert out[name].shape[1:] == (spec.channels, math.ceil(H / s), math.ceil(W / s)), name
    assert {n: shapes[n].stride for n in ("ds3", "ds4", "ds5")} == {"ds3": 8, "ds4": 16, "ds5": 32}
    assert get_clustering_pairs(model) == {2: ("res2", "ds3"), 3: ("res3", "ds4"), 4: ("res4", "ds5")}


def test_deformable_conv_samples_at_offsets_and_modulates():
    """Against plain conv2d: a constant offset (dy, dx) = (0, +1) equals convolving the input shifted left by
    one pixel; a modulation m scales the output by m."""
    torch.manual_seed(0)
    conv = ModulatedDeformConv(4, 6, 3, stride=2, padding=1)
    x = torch.randn(1, 4, 11, 14)
    ho, wo = 6, 7
    offset = torch.zeros(1, 18, ho, wo)
    offset[:, 1::2] = 1.0  # torchvision order: (dy, dx) per tap
    ones = torch.ones(1, 9, ho, wo)
    # zero-pad as the conv does, then read one column further right (zeros beyond the border)
    shifted = F.pad(F.pad(x, (1, 1, 1, 1))[..., 1:], (0, 1))
    expected = F.conv2d(shifted, conv.weight, stride=2)
    torch.testing.assert_close(conv(x, offset, ones), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv(x, torch.zeros_like(offset), 0.25 * ones),
                               0.25 * F.conv2d(x, conv.weight, stride=2, padding=1), rtol=1e-5, atol=1e-5)


def test_gradients_reach_offset_predictors():
    model = build_backbone(_cfg(levels=3))
    out = model(torch.randn(1, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    for k in (3, 4, 5):
        g = getattr(model, f"res{k}")[0].conv2_offset.weight.grad
        assert g is not None and g.abs().sum() > 0, f"res{k}"


def test_narrow_resnet18_with_basic_blocks():
    """The CPU-sized variant of the shapes configs: BasicBlocks, DCN on their stride-2 conv1."""
    cfg = _cfg(depth=18, STEM_OUT_CHANNELS=32, RES2_OUT_CHANNELS=32)
    model = build_backbone(cfg).eval()
    assert isinstance(model.res3[0].conv1, ModulatedDeformConv)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 75, 101))
    channels = {n: s.channels for n, s in model.output_shape().items()}
    assert channels == {"res2": 32, "res3": 64, "res4": 128, "res5": 256, "ds3": 64, "ds4": 128, "ds5": 256}
    assert out["ds5"].shape == (1, 256, 3, 4)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="STRIDE_IN_1X1"):
        build_backbone(_cfg(STRIDE_IN_1X1=True))
    with pytest.raises(ValueError, match="RES5_DILATION"):
        build_backbone(_cfg(RES5_DILATION=2))
    with pytest.raises(ValueError, match="LEVELS"):
        build_backbone(_cfg(levels=4))
