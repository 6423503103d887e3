"""tools/convert-pretrained-swin-model-to-d2.py: a Swin in the official checkpoint layout (built with timm,
renamed to microsoft/Swin-Transformer's names) becomes a D2SwinTransformer computing the same features."""
import os
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer

from hierseg_d2.modeling.backbone.swin import D2SwinTransformer
from tests.scripts import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# small Swin; window 2 so that every stage of a 128 x 128 input keeps its shifted windows (the official and
# timm models stop shifting when a map is no larger than the window, Detectron2's detection Swin does not)
ARCH = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=2)


def load_tool():
    return load_script("tools/convert-pretrained-swin-model-to-d2.py")


def timm_swin(img_size=(128, 128)):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size, num_classes=10,
                              **ARCH).eval()
    with torch.no_grad():  # non-trivial norms and bias tables (their defaults would hide a swapped tensor)
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or "relative_position_bias_table" in name:
                p.uniform_(-0.2, 0.2)
    return model


def official_state_dict(model):
    """timm's Swin under the official names: PatchMerging at the end of stage i (timm: start of i + 1),
    head.fc -> head, and the official's persistent buffers (relative_position_index, attn_mask)."""
    out = {}
    tensors = dict(model.state_dict())
    tensors.update(dict(model.named_buffers()))
    for name, t in tensors.items():
        m = re.match(r"^layers\.(\d+)\.downsample\.(.+)$", name)
        if m:
            name = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[name.replace("head.fc.", "head.")] = t.clone()
    return {"model": out}


def timm_stage_outputs(model, x):
    """Stage outputs (before any output norm) as NCHW maps."""
    x = model.patch_embed(x)  # NHWC
    outs = []
    for layer in model.layers:
        x = layer(x)
        outs.append(x)
    return outs


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swin")
    model = timm_swin()
    path = tmp / "swin_official.pth"
    torch.save(official_state_dict(model), path)
    return model, path, tmp


@pytest.mark.parametrize("final_norm", [False, True])
def test_features_equal_the_source_model(source, final_norm):
    model, path, tmp = source
    out = tmp / f"d2_{final_norm}.pth"
    converted, dropped, new = load_tool().main([str(path), str(out)] + (["--final-norm-to-norm3"] * final_norm))
    official = official_state_dict(model)["model"]
    assert len(converted) + len(dropped) == len(official)  # every tensor converted or dropped on purpose
    assert {"head.weight", "head.bias"} <= set(dropped)
    assert all(n.endswith("attn_mask") or n.startswith(("head.", "norm.")) for n in dropped)
    assert sorted(new) == sorted(f"backbone.norm{i}.{p}" for i in range(4 - final_norm) for p in ("weight", "bias"))

    backbone = D2SwinTransformer(depths=ARCH["depths"], num_heads=ARCH["num_heads"], embed_dim=ARCH["embed_dim"],
                                 window_size=ARCH["window_size"], drop_path_rate=0.0).eval()
    holder = torch.nn.Module()
    holder.backbone = backbone
    DetectionCheckpointer(holder).load(str(out))  # as MODEL.WEIGHTS is loaded
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ours, stages = backbone(x), timm_stage_outputs(model, x)
    for i, stage in enumerate(stages):
        if final_norm and i == 3:
            ref = model.norm(stage)  # the classification norm moved to norm3
        else:
            n = getattr(backbone, f"norm{i}")
            assert torch.equal(n.weight, torch.ones_like(n.weight)) and torch.equal(n.bias, torch.zeros_like(n.bias))
            ref = F.layer_norm(stage, stage.shape[-1:])  # new output norm at its LayerNorm init
        ref = ref.permute(0, 3, 1, 2)
        got = ours[f"res{i + 2}"]
        assert got.shape == ref.shape
        diff = (got - ref).abs().max().item()
        assert diff < 1e-4, f"res{i + 2} differs by {diff}"
    for i in range(1, 4):  # PatchMerging outputs (HCFormer's ds maps) = the first block's input of timm's stage
        with torch.no_grad():
            merged = model.layers[i].downsample(stages[i - 1])
        diff = (ours[f"ds{i + 2}"] - merged.permute(0, 3, 1, 2)).abs().max().item()
        assert diff < 1e-4, f"ds{i + 2} differs by {diff}"


def test_strict_against_a_config_and_bad_input(source, tmp_path):
    model, path, _ = source
    tool = load_tool()
    shapes = os.path.join(REPO, "configs/shapes/swin/hcformer_swin_shapes.yaml")
    # the shapes Swin has window 7 and 8 heads in stage 4: the tensor that does not fit is named
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        tool.main([str(path), str(tmp_path / "o.pkl"), "--config-file", shapes])
    converted, _, _ = tool.main([str(path), str(tmp_path / "o.pkl"), "--config-file", shapes, "--opts",
                                 "MODEL.SWIN.WINDOW_SIZE", "2", "MODEL.SWIN.NUM_HEADS", "[1, 2, 2, 4]"])
    assert "backbone.layers.2.downsample.reduction.weight" in converted
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tool.main([str(tmp_path / "nope.pth"), str(tmp_path / "o.pkl")])
    sd = official_state_dict(model)
    sd["model"]["classifier.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "foreign.pth")
    with pytest.raises(KeyError, match="classifier.weight"):
        tool.main([str(tmp_path / "foreign.pth"), str(tmp_path / "o.pkl")])
    sd = official_state_dict(model)
    del sd["model"]["layers.1.blocks.0.mlp.fc1.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match="layers.1.blocks.0.mlp.fc1.weight"):
        tool.main([str(tmp_path / "partial.pth"), str(tmp_path / "o.pkl")])
