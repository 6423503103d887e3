"""The converter of the HCFormer release's checkpoints: on the release's exact key lists and shapes (its COCO
panoptic R50, R50+ and Swin-L+ models, hcformer_head_keys fixture), every head tensor maps and our head
loads the result strictly; the backbone's tensors go to the backbone family's mapping."""
from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec

from hierseg_d2.config import load_config
from hierseg_d2.modeling.heads import HCFormerHead
from hierseg_d2.modeling.heads.release_convert import (
    convert_hcformer_release_state_dict,
    convert_head_state_dict,
    release_backbone_family,
)
from tests.golden import load_fixture
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[3]
KEYS = load_fixture("hcformer_head_keys")["models"]
PAIRS = {2: ("res2", "ds3"), 3: ("res3", "ds4"), 4: ("res4", "ds5")}
# our config of the same model, and the backbone's widths res2..res5 (the release's after maps have the
# width of the next stage), and options (the release's Swin-L+ has 200 queries)
CASES = {
    "r50": ("configs/coco/panoptic-segmentation/hcformer_R50_bs16_50ep.yaml", (256, 512, 1024, 2048), []),
    "r50_plus": ("configs/coco/panoptic-segmentation/hcformer_plus_R50_bs16_100ep.yaml", (256, 512, 1024, 2048), []),
    "swin_large_plus": ("configs/coco/panoptic-segmentation/swin/hcformer_plus_swin_small_bs16_100ep.yaml",
                        (192, 384, 768, 1536), ["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "200"]),
}


def _release_state(name, seed=0, backbone_values=False):
    """A random checkpoint with the release's names and shapes; backbone tensors stay on the meta device
    unless ``backbone_values``."""
    g = torch.Generator().manual_seed(seed)
    entry = KEYS[name]
    state = {}
    for key, shape, dtype in zip(entry["names"], entry["shapes"], entry["dtypes"]):
        dtype = getattr(torch, dtype)
        head_part = not key.startswith("backbone.") or ".clustering" in key or key.startswith("backbone.aux.")
        if not head_part and not backbone_values:
            state[key] = torch.empty(shape, dtype=dtype, device="meta")
        elif dtype.is_floating_point:
            state[key] = torch.randn(shape, generator=g).to(dtype)
        else:
            state[key] = torch.zeros(shape, dtype=dtype)
    return state


def _our_head(name):
    config, widths, opts = CASES[name]
    cfg = load_config(str(REPO / config), opts)
    shape = {f"res{k}": ShapeSpec(channels=c, stride=2 ** k) for k, c in zip((2, 3, 4, 5), widths)}
    shape.update({f"ds{k}": ShapeSpec(channels=shape[f"res{k}"].channels, stride=2 ** k) for k in (3, 4, 5)})
    return HCFormerHead(cfg, shape, clustering_pairs=PAIRS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_head_tensor_of_the_release_maps_and_loads_strictly(name):
    state = _release_state(name)
    converted, backbone = convert_head_state_dict(state)
    head = _our_head(name)
    ours = {"sem_seg_head." + k: v for k, v in head.state_dict().items()}
    ours["criterion.empty_weight"] = torch.ones(head.num_classes + 1)
    assert set(converted) == set(ours), (sorted(set(ours) - set(converted)), sorted(set(converted) - set(ours)))
    for k, v in converted.items():
        assert tuple(v.shape) == tuple(ours[k].shape), k
    head.load_state_dict({k[len("sem_seg_head."):]: v for k, v in converted.items() if k.startswith("sem_seg_head.")},
                         strict=True)
    # values travel unchanged (s goes from (1,) to a scalar)
    assert torch.equal(head.clustering["4"].scale.reshape(1), state["backbone.clustering_layers.0.temp"]
                       if name.startswith("r50") else state["backbone.layers.2.clustering.temp"])
    assert torch.equal(head.mask_features.weight, state["sem_seg_head.predictor.mask_proj.weight"])
    # nothing of the head is left for the backbone, and nothing is lost
    assert not any("clustering" in k or k.startswith("aux.") for k in backbone)
    assert len(converted) + len(backbone) == len(state)
    assert release_backbone_family(state) == ("swin" if name.startswith("swin") else "resnet")


def test_unknown_tensors_are_named():
    state = _release_state("r50")
    state["sem_seg_head.pixel_decoder.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="pixel_decoder"):
        convert_head_state_dict(state)
    state = _release_state("r50")
    state["backbone.clustering_layers.0.bias"] = torch.zeros(1)
    with pytest.raises(KeyError, match="clustering_layers.0.bias"):
        convert_head_state_dict(state)


def test_backbone_part_goes_to_the_given_mapping():
    state = _release_state("r50")
    seen = []

    def key_map(name):
        seen.append(name)
        return None if name.endswith("num_batches_tracked") else "renamed." + name

    converted, dropped = convert_hcformer_release_state_dict(state, key_map)
    assert "stem.0.weight" in seen and "layer4.0.conv2.deform.weight" in seen
    assert not any("clustering" in k or k.startswith("aux.") for k in seen)
    assert "backbone.renamed.stem.0.weight" in converted and len(converted) + len(dropped) == len(state)
    assert dropped and all(k.endswith(".num_batches_tracked") for k in dropped)
    # a backbone tensor without counterpart is an error, not a silent drop
    with pytest.raises(KeyError, match="layer1.0.conv1.weight"):
        convert_hcformer_release_state_dict(state, lambda n: None if n == "layer1.0.conv1.weight" else n)


# our configs of the release's models for the whole-model check
FULL_CASES = {
    "r50": CASES["r50"][0],
    "r50_plus": CASES["r50_plus"][0],
    "swin_large_plus": "configs/coco/panoptic-segmentation/swin/hcformer_plus_swin_large_IN21k_384_bs16_200ep.yaml",
}


@pytest.mark.parametrize("name", sorted(FULL_CASES))
def test_full_release_checkpoint_loads_strictly_into_our_model(name, monkeypatch):
    from detectron2.modeling import build_model

    cfg = load_config(str(REPO / FULL_CASES[name]))
    # shapes and names are all that is checked: build on the meta device (Swin-L+ has 218M values)
    cfg.MODEL.DEVICE = "meta"
    # Swin's drop-path schedule reads numbers from torch.linspace: keep that one on the CPU
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **dict(k, device="cpu")))
    with torch.device("meta"):
        model = build_model(cfg)
    converted, dropped = convert_hcformer_release_state_dict(_release_state(name))
    assert all(k.endswith(".num_batches_tracked") for k in dropped)
    ours = model.state_dict()
    assert set(converted) == set(ours), (sorted(set(ours) - set(converted))[:10], sorted(set(converted) - set(ours))[:10])
    model.load_state_dict(converted, strict=True)  # checks every shape


def test_tool_converts_a_release_checkpoint(tmp_path):
    tool = load_script("tools/convert-hcformer-to-d2.py")
    # a release checkpoint as Detectron2 saves it ({"model": ..., "iteration": ...}); --head-only drops the backbone
    state = dict(load_fixture("hcformer_head")["heads"]["plus"]["state_dict"])  # small: the golden head
    state["backbone.stem.0.weight"] = torch.zeros(2, 3, 1, 1)
    src = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 10}, src)
    out = tool.main([str(src), str(tmp_path / "out.pth"), "--head-only"])
    assert set(out) == set(convert_head_state_dict(state)[0])
    written = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    assert torch.equal(written["sem_seg_head.mask_features.weight"], state["sem_seg_head.predictor.mask_proj.weight"])
