"""SegFormer MiT backbone: parameter counts, odd sizes, HCFormer pairs, the SegFormer forward, the converter."""
import pytest
import torch
from detectron2.modeling import build_backbone

from hierseg_d2.modeling.backbone.mit import MIT_PRESETS, MixVisionTransformer, convert_mit_state_dict
from tests.modeling.backbone.utils import backbone_cfg, check_hierarchical_outputs, count_params, load_into_backbone
from tests.modeling.backbone.utils import load_tool, random_state_dict, read_layout

# backbone-only counts from the authors' model definitions (reference README), in millions
REFERENCE_PARAMS = {"b0": 3.32, "b1": 13.15, "b2": 24.20}


def _cfg(preset="b0"):
    return backbone_cfg("build_mit_backbone", "MIT", PRESET=preset)


@pytest.mark.parametrize("preset", sorted(MIT_PRESETS))
def test_parameter_count_matches_reference(preset):
    count = count_params(build_backbone(_cfg(preset))) / 1e6
    assert count == pytest.approx(REFERENCE_PARAMS[preset], rel=0.01)


def test_preset_fields_can_be_overridden():
    cfg = _cfg("b1")
    cfg.MODEL.MIT.DEPTHS = [1, 1, 1, 1]
    model = build_backbone(cfg)
    assert [len(model.stage_blocks(s)) for s in range(1, 5)] == [1, 1, 1, 1]
    assert model.embed_dims == (64, 128, 320, 512)
    cfg.MODEL.MIT.PRESET = "b7"
    with pytest.raises(KeyError, match="MODEL.MIT.PRESET"):
        build_backbone(cfg)


@pytest.mark.parametrize("size", [(64, 64), (75, 101)])
def test_outputs_follow_ceil_sizes_and_pairs(size):
    model = build_backbone(_cfg()).eval()
    H, W = size
    with torch.no_grad():
        out = model(torch.randn(1, 3, H, W))
    check_hierarchical_outputs(model, out, H, W)


def test_forward_is_segformer_and_ds_is_patch_embedding_output():
    """res_k = norm_k(blocks(patch_embed_k(map of norm_{k-1}(...)))) written out step by step, and ds_k the
    patch-embedding output read with a forward hook."""
    torch.manual_seed(0)
    model = MixVisionTransformer(**MIT_PRESETS["b0"]).eval()
    seen = {}
    for k in (2, 3, 4):
        getattr(model, f"patch_embed{k}").register_forward_hook(
            lambda mod, inp, out, k=k: seen.__setitem__(f"ds{k + 1}", out))
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        out = model(x)
        feat = x
        for k in range(1, 5):
            tokens, H, W = getattr(model, f"patch_embed{k}")(feat)
            for blk in getattr(model, f"block{k}"):
                tokens = blk(tokens, H, W)
            feat = getattr(model, f"norm{k}")(tokens).transpose(1, 2).reshape(2, -1, H, W)
            torch.testing.assert_close(out[f"res{k + 1}"], feat)
    for name, (tokens, H, W) in seen.items():
        torch.testing.assert_close(out[name], tokens.transpose(1, 2).reshape(2, -1, H, W))


@pytest.mark.parametrize("preset", ["b0", "b2"])
def test_converted_authors_checkpoint_loads_strictly(preset, tmp_path):
    layout = read_layout(f"mit_{preset}")
    authors = random_state_dict(layout)
    authors["head.weight"] = torch.randn(1000, layout["norm4.weight"][0])  # ImageNet head: dropped
    src = tmp_path / f"mit_{preset}.pth"
    torch.save({"state_dict": authors}, src)
    dst = tmp_path / f"mit_{preset}.pkl"
    converted, dropped, kept = load_tool("convert-mit-to-d2").main([str(src), str(dst)])
    assert dropped == ["head.weight"] and kept == []

    model, incompatible = load_into_backbone(build_backbone(_cfg(preset)), dst)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    state = model.state_dict()
    assert set(state) == {f"backbone.{k}" for k in layout}
    for key in ("patch_embed1.proj.weight", "block3.1.attn.sr.weight", "norm4.bias"):
        torch.testing.assert_close(state[f"backbone.{key}"], authors[key])


def test_converter_names_foreign_tensors():
    with pytest.raises(KeyError, match="decode_head.conv_seg.weight"):
        convert_mit_state_dict({"patch_embed1.proj.weight": torch.zeros(1), "decode_head.conv_seg.weight":
                                torch.zeros(1)})
