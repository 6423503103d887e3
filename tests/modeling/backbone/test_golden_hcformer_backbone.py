"""HCFormer's backbones against the release's own classes (tests/fixtures/golden/hcformer_backbone.pt, made by
tools/golden_fixtures/hcformer_backbone.py from DensoITLab/HCFormer): the release's weights converted with
``release_backbone_key_map`` load strictly, and the stage outputs and the (before, after) maps handed to the
clustering modules agree to < 1e-4 at a square and a non-square input."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from hierseg_d2.config import add_hierseg_config
from hierseg_d2.modeling.backbone import get_clustering_pairs
from hierseg_d2.modeling.backbone import resnet_dcn, swin
from hierseg_d2.modeling.backbone.resnet_dcn import DownsamplingBottleneckBlock, ModulatedDeformConv
from tests.golden import load_fixture, max_abs_diff

TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    return load_fixture("hcformer_backbone")


def convert(weights, key_map, head_prefix):
    """Release tensors -> ours; the ones the map leaves out must be the head's (clustering modules) or
    FrozenBN's ``num_batches_tracked`` (Detectron2's convert_frozen_batchnorm keeps torchvision's counter;
    a FrozenBN built directly has none)."""
    ours, left = {}, []
    for k, v in weights.items():
        new = key_map(k)
        if new is None:
            left.append(k)
        else:
            assert new not in ours, f"{k} and another release tensor both map to {new}"
            ours[new] = v
    assert left and all(head_prefix(k) or k.endswith(".num_batches_tracked") for k in left), left
    return ours


def compare_runs(model, fixture):
    pairs = get_clustering_pairs(model)
    for name, run in fixture["runs"].items():
        with torch.no_grad():
            out = model(run["input"])
        for feat, ref in run["outputs"].items():
            assert max_abs_diff(out[feat], ref) < TOL, (name, feat, max_abs_diff(out[feat], ref))
        assert len(run["pairs"]) == 3
        for level, ref in zip(sorted(pairs), run["pairs"]):
            before, after = pairs[level]
            for ours, theirs in ((before, ref["before"]), (after, ref["after"])):
                assert max_abs_diff(out[ours], theirs) < TOL, (name, level, ours, max_abs_diff(out[ours], theirs))


def test_dcn_shim_of_the_fixture_computed_detectron2s_kernel(golden):
    # the release ran on torchvision's kernel standing in for Detectron2's CUDA DCN, checked against a
    # naive loop of Detectron2's im2col kernel when the fixture was made
    assert golden["dcn_layout_check"] < 1e-5


def test_dcn_bottleneck_block(golden):
    fx = golden["block"]
    c = fx["config"]
    block = DownsamplingBottleneckBlock(c["in_channels"], c["out_channels"], bottleneck_channels=c["bottleneck_channels"],
                                        stride=c["stride"], norm="FrozenBN", deform=True).eval()
    assert isinstance(block.conv2, ModulatedDeformConv) and isinstance(block.shortcut, ModulatedDeformConv)
    weights = {}
    for k, v in fx["weights"].items():
        new = resnet_dcn.release_backbone_key_map("layer2.0." + k)
        if k.endswith(".num_batches_tracked"):
            assert new is None
            continue
        assert new is not None and new.startswith("res3.0."), k
        weights[new[len("res3.0."):]] = v
    block.load_state_dict(weights, strict=True)
    for name, run in fx["runs"].items():
        with torch.no_grad():
            out = block(run["input"])
        assert max_abs_diff(out, run["output"]) < TOL, name
    # the fixture's predictors are not zero: with zero offsets the outputs would differ
    with torch.no_grad():
        block.conv2_offset.weight.zero_()
        block.conv2_offset.bias.zero_()
        assert max_abs_diff(block(fx["runs"]["square"]["input"]), fx["runs"]["square"]["output"]) > 1e-2


def _resnet_cfg(c, dcn):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_hcformer_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.NORM, r.STRIDE_IN_1X1 = c["depth"], "FrozenBN", False
    r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS = c["stem_out_channels"], c["res2_out_channels"]
    r.WIDTH_PER_GROUP = c["width_per_group"]
    r.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.HCFORMER.LEVELS = c["levels"]
    cfg.MODEL.HCFORMER.DCN_DOWNSAMPLING = dcn
    return cfg


@pytest.mark.parametrize("variant,dcn", [("r50", True), ("r18", False)])
def test_hcresnet_stages_and_clustering_inputs(golden, variant, dcn):
    fx = golden[variant]
    assert fx["config"]["downsampling"] == ("deform" if dcn else "conv")
    model = build_backbone(_resnet_cfg(fx["config"], dcn)).eval()
    weights = convert(fx["weights"], resnet_dcn.release_backbone_key_map,
                      lambda k: k.startswith("clustering_layers."))
    model.load_state_dict(weights, strict=True)
    compare_runs(model, fx)


def test_hcswin_stages_and_clustering_inputs(golden):
    fx = golden["swin"]
    c = fx["config"]
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    for k, v in c.items():
        setattr(cfg.MODEL.SWIN, k, v)
    model = build_backbone(cfg).eval()
    weights = convert(fx["weights"], swin.release_backbone_key_map,
                      lambda k: k.split(".")[0] == "layers" and k.split(".")[2] == "clustering")
    model.load_state_dict(weights, strict=True)
    compare_runs(model, fx)


def test_key_maps_leave_out_only_head_tensors_and_reject_unknown_names():
    assert resnet_dcn.release_backbone_key_map("aux.input_proj.0.weight") is None
    assert resnet_dcn.release_backbone_key_map("layer1.0.bn1.num_batches_tracked") is None
    assert resnet_dcn.release_backbone_key_map("layer4.0.downsample.0.offset.bias") == "res5.0.shortcut_offset.bias"
    assert swin.release_backbone_key_map("aux.encoder.layers.0.linear1.weight") is None
    with pytest.raises(KeyError, match="fc.weight"):
        resnet_dcn.release_backbone_key_map("fc.weight")
    with pytest.raises(KeyError, match="head.weight"):
        swin.release_backbone_key_map("head.weight")


def test_state_dict_form_for_the_checkpoint_converter(golden):
    """tools/convert-hcformer-to-d2.py hands the release's backbone tensors (head tensors taken out) as a dict."""
    for variant, module, is_head in (("r50", resnet_dcn, lambda k: k.startswith("clustering_layers.")),
                                     ("swin", swin, lambda k: ".clustering." in k)):
        weights = golden[variant]["weights"]
        backbone_only = {k: v for k, v in weights.items() if not is_head(k)}
        converted = module.release_backbone_key_map(backbone_only)
        assert converted.keys() == convert(weights, module.release_backbone_key_map, is_head).keys()
        head_key = next(k for k in weights if is_head(k))
        with pytest.raises(KeyError, match=head_key.replace(".", r"\.")):
            module.release_backbone_key_map({head_key: weights[head_key]})
