"""HILA vs the authors' release (fidler-lab/hila): golden fixtures made by tools/golden_fixtures/hila.py
from the release's own classes, converted with our converter, loaded strictly, compared on res2..res5."""
import pytest
import torch

from hierseg_d2.modeling.backbone.hila import HILA_PRESETS, HILABackbone, convert_hila_state_dict
from tests.golden import load_fixture, max_abs_diff
from tests.modeling.backbone.utils import count_params, load_tool

SETTINGS = ("hila_mit_s3", "hila_mit_s234", "hila_swin_s234")


def preset_and_overrides(cfg):
    """Our preset + constructor overrides for a fixture's release configuration."""
    if cfg["family"] == "mit":
        preset = "mit_b0_s3"
        over = dict(stages=tuple(top for _, top in cfg["hila_attn"]), ffn_ratios=tuple(cfg["hila_mlp_ratios"]),
                    base_overrides=dict(embed_dims=tuple(cfg["embed_dims"]), num_heads=tuple(cfg["num_heads"]),
                                        depths=tuple(cfg["depths"]), sr_ratios=tuple(cfg["sr_ratios"])))
    else:
        preset = "swin_t_s234"
        over = dict(stages=tuple(i + 1 for i in cfg["hila_attn"]), ffn_ratios=tuple(cfg["hila_mlp_ratios"]),
                    base_overrides=dict(embed_dim=cfg["embed_dim"], num_heads=tuple(cfg["num_heads"]),
                                        depths=tuple(cfg["depths"]), window_size=cfg["window_size"]))
    over.update(strides=tuple(cfg["hila_stride"]), alpha=cfg["info_weights"][0], beta=cfg["info_weights"][1],
                drop_path_rate=cfg["drop_path_rate"])
    return preset, over


@pytest.fixture(scope="module", params=SETTINGS)
def golden(request):
    fixture = load_fixture(request.param)
    preset, over = preset_and_overrides(fixture["config"])
    converted, dropped = convert_hila_state_dict(fixture["state_dict"], preset, prefix="", **over)
    model = HILABackbone(**{**HILA_PRESETS[preset], **over}).eval()
    model.load_state_dict(converted, strict=True)
    return request.param, fixture, model, dropped


@pytest.mark.parametrize("size", ["square", "nonsquare"])
def test_matches_the_release(golden, size):
    name, fixture, model, dropped = golden
    assert dropped == ["reuse_bottomsa_pretraining_flag"]  # the release's bookkeeping buffer, no weights
    with torch.no_grad():
        out = model(fixture["inputs"][size])
    expected = fixture["outputs"][size]
    assert sorted(expected) == ["res2", "res3", "res4", "res5"]
    diffs = {k: max_abs_diff(out[k], v) for k, v in expected.items()}
    assert max(diffs.values()) < 1e-4, (name, size, diffs)


@pytest.mark.parametrize("option", [dict(scale="attn"), dict(mask_padding=True)])
def test_paper_options_differ_from_the_release(golden, option):
    """The fixtures see each release behaviour we follow: the paper's readings move the outputs."""
    name, fixture, model, _ = golden
    preset, over = preset_and_overrides(fixture["config"])
    other = HILABackbone(**{**HILA_PRESETS[preset], **over, **option}).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = other(fixture["inputs"]["nonsquare"])
    assert max(max_abs_diff(out[k], v) for k, v in fixture["outputs"]["nonsquare"].items()) > 1e-3


def test_paper_schedule_differs_only_for_stride_3():
    """Stride 1 and 2 give the same top-down placement in both readings; B2's stride 3 does not."""
    fixture = load_fixture("hila_mit_s234")
    preset, over = preset_and_overrides(fixture["config"])
    converted, _ = convert_hila_state_dict(fixture["state_dict"], preset, prefix="", **over)
    model = HILABackbone(**{**HILA_PRESETS[preset], **over, "schedule": "paper"}).eval()
    model.load_state_dict(converted)
    with torch.no_grad():
        out = model(fixture["inputs"]["square"])
    expected = fixture["outputs"]["square"]
    assert max_abs_diff(out["res2"], expected["res2"]) < 1e-4  # stage 2 has stride 1
    assert max_abs_diff(out["res3"], expected["res3"]) > 1e-2  # stage 3's stride 3 moves its top-down update


# ---- the converter on the release's full-size layouts (random tensors of the real shapes) ----
LAYOUTS = load_fixture("hila_release_layouts")


def _random_release_checkpoint(preset, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Swin's relative_position_index buffers hold integers (a float would be cast on loading)
    return {k: torch.randint(0, 169, shape, generator=g) if k.endswith("relative_position_index")
            else torch.randn(shape, generator=g) for k, shape in LAYOUTS["layouts"][preset].items()}


@pytest.mark.parametrize("preset", sorted(HILA_PRESETS))
def test_every_release_tensor_maps_and_loads_strictly(preset):
    authors = _random_release_checkpoint(preset)
    # an mmseg segmentation checkpoint: backbone. prefix and a decode head that is dropped
    wrapped = {f"backbone.{k}": v for k, v in authors.items()}
    wrapped["decode_head.conv_seg.weight"] = torch.zeros(150, 256, 1, 1)
    model = HILABackbone(**HILA_PRESETS[preset])
    converted, dropped = convert_hila_state_dict(wrapped, preset, model=model)
    assert sorted(dropped) == ["backbone.reuse_bottomsa_pretraining_flag", "decode_head.conv_seg.weight"]
    model.load_state_dict({k[len("backbone."):]: v for k, v in converted.items()}, strict=True)

    def fingerprint(t):
        return tuple(t.shape), round(t.double().sum().item(), 3)
    ours = {fingerprint(v) for v in model.state_dict().values()}
    # every release tensor is used: the kv halves, the two summed position tables, the rest as they are
    for key, value in authors.items():
        if key == "reuse_bottomsa_pretraining_flag":
            continue
        if "_attn.kv." in key:  # inter-level attentions only (the base blocks keep kv)
            for half in value.chunk(2, dim=0):
                assert fingerprint(half) in ours, key
        elif key.endswith("relative_position_init"):
            table = authors[key.replace("relative_position_init", "relative_position_bias_table")]
            assert fingerprint(value + table) in ours, key
        elif not key.endswith("_attn.relative_position_bias_table"):
            assert fingerprint(value) in ours, key
    # the number of parameters is the release's, less one 16-entry table per inter-level attention
    n_attn = sum(k.endswith("relative_position_init") for k in authors)
    assert count_params(model) == LAYOUTS["parameters"][preset] - 16 * n_attn


def test_kv_split_and_tables_land_where_they_belong():
    authors = _random_release_checkpoint("mit_b1_s3")
    converted, _ = convert_hila_state_dict(authors, "mit_b1_s3", prefix="")
    kv = authors["bottomup.23.0.bottomup_attn.kv.weight"]
    torch.testing.assert_close(converted["hila.3.bottom_up.0.attn.k.weight"], kv[:kv.shape[0] // 2])
    torch.testing.assert_close(converted["hila.3.bottom_up.0.attn.v.weight"], kv[kv.shape[0] // 2:])
    torch.testing.assert_close(converted["hila.3.top_down.0.attn.norm_q.weight"],
                               authors["topdown.23.0.norm1.weight"])  # top-down query = the lower level
    torch.testing.assert_close(converted["hila.3.bottom_up.0.attn.norm_kv.bias"], authors["bottomup.23.0.norm5.bias"])
    torch.testing.assert_close(converted["hila.3.top_down_block.0.attn.sr.weight"],
                               authors["prevblock.23.0.attn.sr.weight"])
    torch.testing.assert_close(converted["hila.3.prevnorm.weight"], authors["prevnorm.23.weight"])
    torch.testing.assert_close(converted["base.block2.1.mlp.fc1.weight"], authors["block2.1.mlp.fc1.weight"])


def test_unknown_or_incomplete_release_tensors_raise_naming_them():
    authors = _random_release_checkpoint("mit_b0_s3")
    with pytest.raises(KeyError, match="extra_layer.weight"):
        convert_hila_state_dict({**authors, "extra_layer.weight": torch.zeros(1)}, "mit_b0_s3")
    with pytest.raises(KeyError, match="bottomup.23.0.bottomup_attn.foo"):
        convert_hila_state_dict({**authors, "bottomup.23.0.bottomup_attn.foo": torch.zeros(1)}, "mit_b0_s3")
    with pytest.raises(KeyError, match="'13'"):
        convert_hila_state_dict({**authors, "prevnorm.13.weight": torch.zeros(1)}, "mit_b0_s3")
    incomplete = dict(authors)
    del incomplete["topdown.23.0.topdown_attn.relative_position_init"]
    with pytest.raises(KeyError, match="relative_position_init"):
        convert_hila_state_dict(incomplete, "mit_b0_s3")
    missing = dict(authors)
    del missing["prevnorm.23.bias"]
    with pytest.raises(KeyError, match="prevnorm.bias"):
        convert_hila_state_dict(missing, "mit_b0_s3")
    with pytest.raises(KeyError, match="unexpected"):  # an S(3) checkpoint is not an S(2,3,4) one
        convert_hila_state_dict(authors, "mit_b1_s234")


def test_conversion_tool_writes_a_strict_d2_checkpoint(tmp_path):
    authors = _random_release_checkpoint("mit_b0_s3")
    src, dst = tmp_path / "B0_S3.pth", tmp_path / "hila_b0_s3.pkl"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in authors.items()}}, src)
    converted, dropped = load_tool("convert-hila-to-d2").main([str(src), str(dst), "--preset", "mit_b0_s3"])
    assert dropped == ["backbone.reuse_bottomsa_pretraining_flag"]
    import pickle
    with open(dst, "rb") as f:
        written = pickle.load(f)
    assert written["matching_heuristics"] is False
    assert sorted(written["model"]) == sorted(converted)
    model = HILABackbone(**HILA_PRESETS["mit_b0_s3"])
    model.load_state_dict({k[len("backbone."):]: torch.as_tensor(v) for k, v in written["model"].items()},
                          strict=True)
