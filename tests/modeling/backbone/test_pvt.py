"""PVT v1 / v2: presets vs the authors' layouts and parameter counts, shapes at odd sizes, position
embedding resizing, config, converter (strict load through DetectionCheckpointer)."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from hierseg_d2.modeling.backbone.pvt import PVT_PRESETS, PyramidVisionTransformer, convert_pvt_state_dict
from hierseg_d2.modeling.backbone.pvt import infer_pvt_preset, strip_prefixes
from tests.modeling.backbone.utils import assert_trains_on_shapes, backbone_cfg, check_hierarchical_outputs
from tests.modeling.backbone.utils import count_params, load_into_backbone, load_tool, random_state_dict, read_layout

# backbone parameters of the authors' models, /work/shared/reference/README.md
REFERENCE_PARAMS_M = {"pvt_tiny": 12.72, "pvt_small": 23.97, "pvt_v2_b1": 13.50, "pvt_v2_b2": 24.85}


@pytest.mark.parametrize("preset", sorted(PVT_PRESETS))
def test_preset_matches_authors_layout_and_parameter_count(preset):
    model = PyramidVisionTransformer(**PVT_PRESETS[preset])
    layout = read_layout(preset)
    # the reference figure counts the authors' ImageNet backbone (their layout): v1 with its final norm and
    # the class-token slot of pos_embed4, which the dense backbone does not have
    layout_params = sum(math.prod(shape) for shape in layout.values())
    assert round(layout_params / 1e6, 2) == REFERENCE_PARAMS_M[preset]
    if PVT_PRESETS[preset]["version"] == "v1":
        layout_params -= 2 * 512 + 512  # norm.weight/bias (512 channels) and the class-token slot
    assert count_params(model) == layout_params
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # same names and shapes, except v1's class-token slot in pos_embed4 and v1's final norm, which only
    # the ImageNet model has (the release's dense PVT v1 ignores both; our converter drops them)
    imagenet_only = {"norm.weight", "norm.bias"} if PVT_PRESETS[preset]["version"] == "v1" else set()
    assert imagenet_only <= set(layout)
    assert set(ours) == set(layout) - imagenet_only
    for name, shape in ours.items():
        expected = (1, layout[name][1] - 1, layout[name][2]) if name == "pos_embed4" else layout[name]
        assert shape == expected, name


@pytest.mark.parametrize("preset", ["pvt_tiny", "pvt_v2_b1"])
def test_odd_input_sizes_shapes_and_clustering_pairs(preset):
    model = PyramidVisionTransformer(**PVT_PRESETS[preset]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 75, 101))
    check_hierarchical_outputs(model, out, 75, 101)


def test_ds_maps_are_the_patch_embedding_outputs():
    model = PyramidVisionTransformer(**PVT_PRESETS["pvt_v2_b1"]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
        tokens, H, W = model.patch_embed3(out["res3"])
    torch.testing.assert_close(out["ds4"], tokens.transpose(1, 2).reshape(1, -1, H, W))


def test_v1_position_embedding_is_resized_bilinearly_in_row_major_order():
    model = PyramidVisionTransformer(**PVT_PRESETS["pvt_tiny"])
    grid = 56
    rows = torch.arange(grid, dtype=torch.float32).repeat_interleave(grid)  # value = row index
    with torch.no_grad():
        model.pos_embed1.copy_(rows.view(1, -1, 1).expand(1, -1, 64))
    assert model.position_embedding(1, grid, grid) is model.pos_embed1  # pre-training grid: unchanged
    pos = model.position_embedding(1, 28, 80).view(28, 80, 64)
    # every row constant along x (a transposed reshape would mix rows), rows increasing,
    # and equal to 1-D bilinear resizing of the row ramp
    assert torch.allclose(pos, pos[:, :1, :].expand_as(pos))
    expected = F.interpolate(torch.arange(grid, dtype=torch.float32).view(1, 1, grid), size=28,
                             mode="linear", align_corners=False).view(28)
    torch.testing.assert_close(pos[:, 0, 0], expected)


def test_config_builds_preset_with_overrides_and_rejects_bad_values():
    cfg = backbone_cfg("build_pvt_backbone", "PVT", PRESET="pvt_small", DEPTHS=[1, 1, 1, 1])
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(backbone, PyramidVisionTransformer) and backbone.version == "v1"
    assert [len(backbone.block1), len(backbone.block4)] == [1, 1]
    cfg.MODEL.PVT.PRESET = "pvt_medium"
    with pytest.raises(KeyError, match="MODEL.PVT.PRESET"):
        build_backbone(cfg, ShapeSpec(channels=3))
    with pytest.raises(ValueError, match="version"):
        PyramidVisionTransformer(version="v3")


@pytest.mark.parametrize("preset", ["pvt_tiny", "pvt_v2_b1"])
def test_converter_loads_authors_layout_strictly(tmp_path, preset):
    authors = random_state_dict(read_layout(preset))
    head = {"head.weight": torch.randn(1000, 512), "head.bias": torch.randn(1000)}
    if preset == "pvt_tiny":
        head["cls_token"] = torch.randn(1, 1, 512)
    torch.save({"model": {**authors, **head}}, tmp_path / f"{preset}.pth")

    load_tool("convert-pvt-to-d2").main([str(tmp_path / f"{preset}.pth"), str(tmp_path / f"{preset}.pkl")])
    model, incompatible = load_into_backbone(PyramidVisionTransformer(**PVT_PRESETS[preset]),
                                             tmp_path / f"{preset}.pkl")
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    for name, value in model.backbone.state_dict().items():
        expected = authors[name][:, 1:] if name == "pos_embed4" else authors[name]  # class-token slot dropped
        torch.testing.assert_close(value, expected)

    with pytest.raises(KeyError, match="relative_pos"):
        convert_pvt_state_dict({**authors, "relative_pos": torch.zeros(1)})


def test_trains_a_few_iterations_on_shapes(shapes_root):
    assert_trains_on_shapes("configs/shapes/hafa/hcformer_pvt_v2_b1_shapes.yaml")


@pytest.mark.parametrize("preset", sorted(PVT_PRESETS))
def test_converter_recognises_every_authors_layout(preset):
    layout = {k: torch.empty(shape) for k, shape in read_layout(preset).items()}
    assert infer_pvt_preset({strip_prefixes(f"module.{k}"): v for k, v in layout.items()}) == preset
