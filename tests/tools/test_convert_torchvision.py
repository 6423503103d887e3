"""tools/convert-torchvision-to-d2.py: a torchvision ResNet becomes the R-50.pkl layout our R50 configs load,
and the converted backbone computes torchvision's features."""
import os

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_backbone

from hierseg_d2.config import load_config
from tests.scripts import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs/coco/panoptic-segmentation/hcformer_R50_bs16_50ep.yaml")


def load_tool():
    return load_script("tools/convert-torchvision-to-d2.py")


def random_resnet(arch="resnet50"):
    """torchvision ResNet with random BN statistics and affine terms (defaults 0/1 would hide a swapped BN)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def torchvision_features(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for k in range(1, 5):
        x = getattr(model, f"layer{k}")(x)
        out[f"res{k + 1}"] = x
    return out


@pytest.fixture(scope="module")
def converted_r50(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tv")
    model = random_resnet()
    src = tmp / "resnet50.pth"
    torch.save(model.state_dict(), src)
    out = tmp / "R-50.pth"
    converted, dropped, new = load_tool().main([str(src), str(out)])
    return model, out, converted, dropped, new


def test_every_tensor_maps_and_features_match(converted_r50):
    model, out, converted, dropped, new = converted_r50
    # 320 tensors in torchvision's R50: 53 BN counters + fc.weight/bias dropped, the rest converted
    source = model.state_dict()
    assert len(converted) + len(dropped) == len(source)
    assert sorted(d for d in dropped if not d.endswith("num_batches_tracked")) == ["fc.bias", "fc.weight"]
    assert all(k.startswith("backbone.") for k in converted)
    assert "backbone.res2.0.shortcut.norm.running_var" in converted and "backbone.stem.conv1.norm.weight" in converted

    saved = torch.load(out, weights_only=True)  # pickle-free output
    assert saved["matching_heuristics"] is False and set(saved["model"]) == set(converted)

    # DCN downsampling off: the plain Detectron2 ResNet-50 (FrozenBN) loads strictly and computes torchvision's maps
    cfg = load_config(CONFIG, ["MODEL.HCFORMER.DCN_DOWNSAMPLING", "False", "MODEL.DEVICE", "cpu"])
    backbone = build_backbone(cfg).eval()
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in saved["model"].items()}, strict=True)
    for shape in ((1, 3, 64, 64), (1, 3, 96, 64)):
        x = torch.randn(*shape)
        with torch.no_grad():
            ours, ref = backbone(x), torchvision_features(model, x)
        for name in ("res2", "res3", "res4", "res5"):
            assert ours[name].shape == ref[name].shape
            diff = (ours[name] - ref[name]).abs().max().item()
            assert diff < 1e-4, f"{name} differs by {diff} at input {shape}"


def test_dcn_tensors_listed_as_new_and_initialised_as_documented(converted_r50):
    _, out, converted, _, new = converted_r50
    cfg = load_config(CONFIG, ["MODEL.DEVICE", "cpu"])  # the user-facing config: DCN downsampling on
    backbone = build_backbone(cfg)
    expected = {"backbone." + k for k in backbone.state_dict()}
    plain = {"backbone." + k for k in build_backbone(
        load_config(CONFIG, ["MODEL.HCFORMER.DCN_DOWNSAMPLING", "False", "MODEL.DEVICE", "cpu"])).state_dict()}
    assert new and set(new) == expected - plain  # exactly the DCN additions, found by comparing the models
    assert set(converted) == plain
    # Detectron2's checkpointer (what MODEL.WEIGHTS goes through) loads the file by exact names
    initial = {k: v.clone() for k, v in backbone.state_dict().items()}
    holder = torch.nn.Module()
    holder.backbone = backbone
    DetectionCheckpointer(holder).load(str(out))
    state = backbone.state_dict()
    for name in new:  # the DCN predictors keep their initialisation
        assert torch.equal(state[name[len("backbone."):]], initial[name[len("backbone."):]]), name
    for name, value in converted.items():
        assert torch.equal(state[name[len("backbone."):]], value), name
    # as documented in docs/training.md: with the release's sigmoid modulation the deformable layers start
    # at half the pretrained response; MODEL.RESNETS.DCN_MODULATION "2sigmoid" starts exactly as the
    # pretrained ResNet (up to deform_conv2d's float error, measured 2e-4 at res5)
    model = converted_r50[0]
    x = torch.randn(1, 3, 64, 64)
    exact = build_backbone(load_config(CONFIG, ["MODEL.RESNETS.DCN_MODULATION", "2sigmoid", "MODEL.DEVICE", "cpu"]))
    holder.backbone = exact
    DetectionCheckpointer(holder).load(str(out))
    with torch.no_grad():
        ours, halved, ref = exact.eval()(x), backbone.eval()(x), torchvision_features(model, x)
    for name in ("res2", "res3", "res4", "res5"):
        assert (ours[name] - ref[name]).abs().max().item() < 2e-3, name
    assert torch.allclose(halved["res2"], ref["res2"], atol=1e-5)  # no DCN before res3
    assert (halved["res3"] - ref["res3"]).abs().max().item() > 0.1  # sigmoid(0) = 0.5 on both DCN layers


def test_resnet18_depth_from_checkpoint(tmp_path):
    src = tmp_path / "r18.pth"
    torch.save(random_resnet("resnet18").state_dict(), src)
    converted, _, new = load_tool().main([str(src), str(tmp_path / "R-18.pkl")])
    assert "backbone.res5.1.conv2.weight" in converted and "backbone.res2.0.conv3.weight" not in converted
    assert new and os.path.getsize(tmp_path / "R-18.pkl") > 0


def test_bad_input(tmp_path):
    tool = load_tool()
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tool.main([str(tmp_path / "missing.pth"), str(tmp_path / "o.pkl")])
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth"):
        tool.main([str(bad), str(tmp_path / "o.pkl")])
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(KeyError, match="blocks.0.attn.qkv.weight"):
        tool.main([str(foreign), str(tmp_path / "o.pkl")])
    # a ResNet-50 with a missing tensor is refused rather than loaded half random
    sd = random_resnet().state_dict()
    del sd["layer2.0.conv2.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match="res3.0.conv2.weight"):
        tool.main([str(tmp_path / "partial.pth"), str(tmp_path / "o.pkl")])
