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


def _dcn_keys(stages):
    """Tensors the DCN downsampling adds to Detectron2's ResNet: the biases of the two deformable layers and
    their offset/modulation predictors."""
    return {f"res{s}.0.{layer}{suffix}" for s in stages for layer in ("conv2", "shortcut")
            for suffix in (".bias", "_offset.weight", "_offset.bias")}


@pytest.mark.parametrize("levels,stages", [(3, (3, 4, 5)), (2, (4, 5)), (1, (5,)), (0, ())])
def test_checkpoint_names_are_detectron2_resnet_plus_dcn_tensors(levels, stages):
    cfg = _cfg(levels=levels)
    ours = set(build_backbone(cfg).state_dict())
    d2 = set(build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict())
    assert dcn_stages_for_levels(levels) == tuple(sorted(stages, reverse=True))
    assert ours == d2 | _dcn_keys(stages)


def test_dcn_off_builds_plain_resnet():
    model = build_backbone(_cfg(dcn=False))
    assert not any(isinstance(m, ModulatedDeformConv) for m in model.modules())
    assert set(model.state_dict()) == set(build_resnet_backbone(_cfg(), ShapeSpec(channels=3)).state_dict())


def _d2_and_ours(modulation):
    torch.manual_seed(0)
    cfg = _cfg(DCN_MODULATION=modulation)
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    ours = build_backbone(cfg).eval()
    incompatible = ours.load_state_dict(d2.state_dict(), strict=False)
    assert set(incompatible.missing_keys) == _dcn_keys((3, 4, 5))
    assert not incompatible.unexpected_keys
    return d2, ours


def _block_outputs(d2, x):
    """Detectron2's res2..res5 plus the output of the first block of res3..res5, read by forward hooks."""
    captured = {}
    for k in (3, 4, 5):
        getattr(d2, f"res{k}")[0].register_forward_hook(
            lambda mod, inp, out, k=k: captured.__setitem__(f"ds{k}", out))
    with torch.no_grad():
        ref = d2(x)
    ref.update(captured)
    return ref


def test_2sigmoid_equals_detectron2_resnet_at_init_and_ds_is_the_first_block_output():
    """With MODEL.RESNETS.DCN_MODULATION 2sigmoid, zero offsets and zero DCN biases (the init), R-50 weights
    give Detectron2's ResNet outputs; ds_k is the output of the whole first block of res_k (the release's
    ``layer2[0](x1)``), 512 / 1024 / 2048 channels."""
    d2, ours = _d2_and_ours("2sigmoid")
    x = torch.randn(2, 3, 64, 96)
    ref = _block_outputs(d2, x)
    with torch.no_grad():
        out = ours(x)
    for name in STAGES + ["ds3", "ds4", "ds5"]:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-4)
    assert {n: s.channels for n, s in ours.output_shape().items() if n.startswith("ds")} == {
        "ds3": 512, "ds4": 1024, "ds5": 2048}


def test_sigmoid_modulation_halves_both_stride2_layers_at_init():
    """The release's plain sigmoid is 0.5 at init: with FrozenBN after each conv, the block equals Detectron2's
    with the weights of conv2 AND of the shortcut halved (so both layers are deformable)."""
    d2, ours = _d2_and_ours("sigmoid")
    with torch.no_grad():
        for k in (3, 4, 5):
            block = getattr(d2, f"res{k}")[0]
            block.conv2.weight.mul_(0.5)
            block.shortcut.weight.mul_(0.5)
    x = torch.randn(1, 3, 64, 64)
    ref = _block_outputs(d2, x)
    with torch.no_grad():
        out = ours(x)
    for name in STAGES + ["ds3", "ds4", "ds5"]:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-4)


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


def _naive_modulated_dcn(x, offset, mask, weight, bias, stride, padding):
    """DCNv2 one output pixel and tap at a time, indexed as Detectron2's CUDA kernel
    (modulated_deformable_im2col_gpu_kernel): offset channel 2t = dy and 2t + 1 = dx of tap t = i * k + j,
    mask channel t; a sample at (h, w) is read if -1 < h < H and -1 < w < W, corners outside read zero."""
    B, C, H, W = x.shape
    O, _, k, _ = weight.shape
    Ho, Wo = offset.shape[-2:]
    xp = F.pad(x, (1, 1, 1, 1))  # one ring of zeros: bilinear corners just outside read 0
    out = torch.zeros(B, O, Ho, Wo, dtype=torch.float64)
    for ho in range(Ho):
        for wo in range(Wo):
            cols = []
            for t in range(k * k):
                i, j = divmod(t, k)
                h = ho * stride - padding + i + offset[0, 2 * t, ho, wo].item()
                w = wo * stride - padding + j + offset[0, 2 * t + 1, ho, wo].item()
                v = torch.zeros(C, dtype=torch.float64)
                if -1 < h < H and -1 < w < W:
                    h0, w0 = math.floor(h), math.floor(w)
                    lh, lw = h - h0, w - w0
                    for dh, dw, wt in ((0, 0, (1 - lh) * (1 - lw)), (0, 1, (1 - lh) * lw), (1, 0, lh * (1 - lw)),
                                       (1, 1, lh * lw)):
                        v = v + wt * xp[0, :, h0 + dh + 1, w0 + dw + 1].double()
                cols.append(v * mask[0, t, ho, wo].item())
            out[0, :, ho, wo] = (weight.double().reshape(O, C, k * k) * torch.stack(cols, 1)).sum((1, 2)) + bias
    return out


@pytest.mark.parametrize("k,padding", [(3, 1), (1, 0)])
def test_deformable_conv_equals_detectron2_kernel_indexing(k, padding):
    """Random offsets (crossing the border), masks and bias against the naive loop above: the offset layout
    our predictor output is split into is the one the release's Detectron2 kernel reads."""
    torch.manual_seed(0)
    conv = ModulatedDeformConv(3, 4, k, stride=2, padding=padding)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(1, 3, 7, 9)
    ho, wo = (7 + 2 * padding - k) // 2 + 1, (9 + 2 * padding - k) // 2 + 1
    offset, mask = 2.5 * torch.randn(1, 2 * k * k, ho, wo), torch.rand(1, k * k, ho, wo)
    with torch.no_grad():
        ours = conv(x, offset, mask)
    ref = _naive_modulated_dcn(x, offset, mask, conv.weight.detach(), conv.bias.detach().double(), 2, padding)
    assert (ours.double() - ref).abs().max() < 1e-5


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
        for layer in ("conv2", "shortcut"):
            g = getattr(getattr(model, f"res{k}")[0], f"{layer}_offset").weight.grad
            assert g is not None and g.abs().sum() > 0, f"res{k} {layer}"


def test_narrow_resnet18_with_basic_blocks():
    """The CPU-sized variant of the shapes configs: BasicBlocks, DCN on their stride-2 conv1 and shortcut."""
    cfg = _cfg(depth=18, STEM_OUT_CHANNELS=32, RES2_OUT_CHANNELS=32)
    model = build_backbone(cfg).eval()
    for k in (3, 4, 5):
        block = getattr(model, f"res{k}")[0]
        assert isinstance(block.conv1, ModulatedDeformConv) and isinstance(block.shortcut, ModulatedDeformConv)
        assert not isinstance(block.conv2, ModulatedDeformConv)
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
    with pytest.raises(ValueError, match="DCN_MODULATION"):
        build_backbone(_cfg(DCN_MODULATION="tanh"))


def _shapes_cfg(path, *opts):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(["DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SEED", "0",
                         "MODEL.MASK_FORMER.DEC_LAYERS", "1", *opts])
    return cfg


def every_parameter_gets_a_gradient(cfg):
    """One training step of the whole model on a shapes batch; the names of parameters without gradient."""
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from hierseg_d2.data.dataset_mappers import build_mapper

    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = next(iter(build_detection_train_loader(cfg, mapper=build_mapper(cfg, True))))
    with EventStorage(0):
        sum(model(batch).values()).backward()
    return model, [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_demo_config_does_not_build_res5_and_every_parameter_gets_a_gradient(shapes_root):
    """configs/shapes/hcformer_R18_s16_shapes.yaml reads res4: res5 is not built (Detectron2's ResNet stops at
    the last out feature), DCN sits where its two clustering levels are (res3, res4), and one step gives
    every parameter a gradient, so DDP needs no find_unused_parameters."""
    cfg = _shapes_cfg("configs/shapes/hcformer_R18_s16_shapes.yaml")
    model, missing = every_parameter_gets_a_gradient(cfg)
    assert not missing, missing
    names = [n for n, _ in model.backbone.named_parameters()]
    assert not [n for n in names if n.startswith("res5")] and any(n.startswith("res4") for n in names)
    assert {n.split(".")[0] for n in names if "_offset" in n} == {"res3", "res4"}
    assert set(model.backbone.output_shape()) == {"res2", "res3", "res4", "ds3", "ds4"}


def test_head_on_res4_drops_res5_even_when_listed():
    cfg = _cfg(levels=2)
    cfg.MODEL.META_ARCHITECTURE = "HCFormer"
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res4"
    model = build_backbone(cfg)
    assert model.stage_names == ("res2", "res3", "res4")
    assert dcn_stages_for_levels(2, 4) == (4, 3)
    assert isinstance(model.res3[0].conv2, ModulatedDeformConv) and isinstance(model.res4[0].conv2, ModulatedDeformConv)
    cfg.MODEL.HCFORMER.LEVELS = 3
    with pytest.raises(ValueError, match="LEVELS must be in 0..2 with the head on res4"):
        build_backbone(cfg)
