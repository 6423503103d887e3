"""D2SwinTransformer: Detectron2's Swin with Mask2Former's config keys and HCFormer pairs at patch merging."""
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.swin import SwinTransformer

from hierseg_d2.config import add_hierseg_config, load_config
from hierseg_d2.modeling.backbone import get_clustering_pairs

STAGES = ["res2", "res3", "res4", "res5"]
PRENORM = ["res2_prenorm", "res3_prenorm", "res4_prenorm"]
PAIRS = {2: ("res2_prenorm", "ds3"), 3: ("res3_prenorm", "ds4"), 4: ("res4_prenorm", "ds5")}


def _cfg(**swin):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    # a small Swin for speed (Mask2Former's keys)
    cfg.MODEL.SWIN.EMBED_DIM = 32
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 2, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [1, 2, 4, 8]
    for k, v in swin.items():
        setattr(cfg.MODEL.SWIN, k, v)
    return cfg


@pytest.mark.parametrize("size", [(64, 96), (75, 101)])
def test_outputs_strides_and_odd_sizes(size):
    model = build_backbone(_cfg()).eval()
    H, W = size
    with torch.no_grad():
        out = model(torch.randn(1, 3, H, W))
    shapes = model.output_shape()
    assert set(out) == set(shapes) == set(STAGES) | {"ds3", "ds4", "ds5"} | set(PRENORM)
    assert {n: s.stride for n, s in shapes.items()} == {
        "res2": 4, "res3": 8, "res4": 16, "res5": 32, "ds3": 8, "ds4": 16, "ds5": 32, "res2_prenorm": 4,
        "res3_prenorm": 8, "res4_prenorm": 16}
    for name, spec in shapes.items():
        assert out[name].shape[1:] == (spec.channels, math.ceil(H / spec.stride), math.ceil(W / spec.stride)), name
    assert model.size_divisibility == 32
    assert get_clustering_pairs(model) == PAIRS


def test_feed_forward_unchanged_and_pairs_are_prenorm_stage_and_patch_merging_outputs():
    """res2..res5 equal Detectron2's SwinTransformer.forward; ds3..ds5 equal the PatchMerging outputs and
    res{k}_prenorm the stage outputs before the output norm (the release's pair), read by forward hooks."""
    torch.manual_seed(0)
    model = build_backbone(_cfg(APE=True)).eval()
    merged = {}
    for i in range(3):
        model.layers[i].downsample.register_forward_hook(
            lambda mod, inp, out, i=i: merged.__setitem__(f"ds{i + 3}", out))
        model.layers[i].register_forward_hook(
            lambda mod, inp, out, i=i: merged.__setitem__(f"res{i + 2}_prenorm", out[0]))
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        ref = SwinTransformer.forward(model, x)
        out = model(x)
    for i, name in enumerate(STAGES):
        torch.testing.assert_close(out[name], ref[f"p{i}"], rtol=0, atol=0)
    for name, tokens in merged.items():
        B, C, h, w = out[name].shape
        torch.testing.assert_close(out[name], tokens.transpose(1, 2).reshape(B, C, h, w), rtol=0, atol=0)


def test_swin_small_parameter_count_and_mask2former_names():
    """Swin-S (Mask2Former's swin-small config): 49.6M in the Swin paper incl. the 768x1000 ImageNet head;
    without it and with the four output norms that leaves ~48.84M. HCFormer's Swin-S config builds norm3
    only (the release's out_indices=(3,)): 2 * (96 + 192 + 384) parameters fewer."""
    cfg = _cfg(EMBED_DIM=96, DEPTHS=[2, 2, 18, 2], NUM_HEADS=[3, 6, 12, 24], WINDOW_SIZE=7)
    model = build_backbone(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - (49.61 - 0.769)) < 0.05, n
    keys = set(model.state_dict())
    assert {"patch_embed.proj.weight", "layers.2.blocks.17.attn.relative_position_bias_table",
            "layers.2.downsample.reduction.weight", "norm3.weight"} <= keys
    hc = build_backbone(load_config("configs/coco/panoptic-segmentation/swin/hcformer_swin_small_bs16_50ep.yaml"))
    assert sum(p.numel() for p in hc.parameters()) == n - 2 * (96 + 192 + 384)
    assert not [k for k in hc.state_dict() if k.startswith(("norm0", "norm1", "norm2"))]


def test_bad_out_feature_is_named():
    with pytest.raises(ValueError, match="MODEL.SWIN.OUT_FEATURES"):
        build_backbone(_cfg(OUT_FEATURES=["res2", "res6"]))


def test_hcformer_head_on_res4_removes_stage5():
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "HCFormer"
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res4"
    torch.manual_seed(0)
    model = build_backbone(cfg).eval()
    assert len(model.layers) == 3 and model.layers[2].downsample is None
    assert [k for k in model.state_dict() if k.startswith("norm")] == ["norm2.weight", "norm2.bias"]
    assert get_clustering_pairs(model) == {2: PAIRS[2], 3: PAIRS[3]}
    assert set(model.output_shape()) == {"res4", "res2_prenorm", "res3_prenorm", "ds3", "ds4"}
    # the first three stages are those of the full network, initialisation included
    torch.manual_seed(0)
    full = build_backbone(_cfg()).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k
    # outside HCFormer: Detectron2's rule, stages up to the last out feature
    assert len(build_backbone(_cfg(OUT_FEATURES=["res4"])).layers) == 3


@pytest.mark.parametrize("opts", [[], ["MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "res4", "MODEL.HCFORMER.LEVELS", "2"]])
def test_every_parameter_gets_a_gradient_on_shapes(shapes_root, opts):
    """No parameter without gradient (DDP without find_unused_parameters): no unused output norms, no stage
    after the head's input."""
    from tests.modeling.backbone.test_resnet_dcn import _shapes_cfg, every_parameter_gets_a_gradient

    _, missing = every_parameter_gets_a_gradient(_shapes_cfg("configs/shapes/swin/hcformer_swin_shapes.yaml", *opts))
    assert not missing, missing


def test_trains_a_few_iterations_on_shapes(shapes_root):
    from hierseg_d2.utils.smoke import train_iterations

    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file("configs/shapes/swin/hcformer_swin_shapes.yaml")
    cfg.merge_from_list(["DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SEED", "0",
                         "MODEL.MASK_FORMER.DEC_LAYERS", "1"])
    losses = train_iterations(cfg, 3)
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)


# The release's Swin-L (ImageNet-22K, 384) configs (DensoITLab/HCFormer configs/*/swin/*swin_large*), in our keys:
# (task folder, our file) -> (encoder layers, queries, MAX_ITER, STEPS or None, crop size or None)
SWIN_L = {
    ("coco/panoptic-segmentation", "hcformer_swin_large_IN21k_384_bs16_100ep"): (0, 200, 737500, (655556, 710184), None),
    ("coco/panoptic-segmentation", "hcformer_plus_swin_large_IN21k_384_bs16_200ep"):
        (6, 200, 1475000, (1311112, 1420368), None),
    ("coco/instance-segmentation", "hcformer_swin_large_IN21k_384_bs16_100ep"): (0, 200, 737500, (655556, 710184), None),
    ("coco/instance-segmentation", "hcformer_plus_swin_large_IN21k_384_bs16_200ep"):
        (6, 200, 1475000, (1311112, 1420368), None),
    ("ade20k/semantic-segmentation", "hcformer_swin_large_IN21k_384_bs16_160k_res640"): (0, 100, 160000, None, (640, 640)),
    ("ade20k/semantic-segmentation", "hcformer_plus_swin_large_IN21k_384_bs16_320k_res640"):
        (6, 100, 320000, None, (640, 640)),
    ("cityscapes/semantic-segmentation", "hcformer_swin_large_IN21k_384_bs16_90k"): (0, 100, 90000, None, (512, 1024)),
    ("cityscapes/semantic-segmentation", "hcformer_plus_swin_large_IN21k_384_bs16_180k"):
        (6, 100, 180000, None, (512, 1024)),
}


@pytest.mark.parametrize("task,name", sorted(SWIN_L))
def test_swin_large_configs_copy_the_release(task, name):
    enc, queries, max_iter, steps, crop = SWIN_L[(task, name)]
    cfg = load_config(f"configs/{task}/swin/{name}.yaml")
    s = cfg.MODEL.SWIN
    assert (s.EMBED_DIM, list(s.DEPTHS), list(s.NUM_HEADS), s.WINDOW_SIZE, s.PRETRAIN_IMG_SIZE, s.DROP_PATH_RATE) == \
        (192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384, 0.3)
    assert list(s.OUT_FEATURES) == ["res5"] and cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer"
    assert cfg.MODEL.WEIGHTS == "swin_large_patch4_window12_384_22k.pkl"
    mf = cfg.MODEL.MASK_FORMER
    assert (mf.ENC_LAYERS, mf.NUM_OBJECT_QUERIES, cfg.SOLVER.MAX_ITER) == (enc, queries, max_iter)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_MULTIPLIER) == (16, 1e-4, 0.1)
    if steps:
        assert tuple(cfg.SOLVER.STEPS) == steps
    if crop:
        assert tuple(cfg.INPUT.CROP.SIZE) == crop
    if "ade20k" in task:
        assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.SIZE_DIVISIBILITY) == (640, 2560, 640)
        assert list(cfg.INPUT.MIN_SIZE_TRAIN) == [64 * x for x in range(5, 21)]
