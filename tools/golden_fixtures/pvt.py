"""Golden fixtures of PVT v1 and PVTv2 (github.com/whai362/PVT) for
tests/modeling/backbone/test_golden_backbones.py.

    PVT_RELEASE=/path/to/PVT .venv/bin/python tools/golden_fixtures/pvt.py

For each generation the release's own classes are built with the hyper-parameters of ``pvt_tiny`` /
``pvt_v2_b1`` (qkv bias, LayerNorm eps 1e-6, MLP ratios 8/8/4/4, sr ratios 8/4/2/1, heads 1/2/5/8, two
blocks per stage, the 224 x 224 pre-training grid of the v1 position embeddings) but narrow stages
(8/16/20/32 channels) and a 10-class head, so the fixtures stay small:

1. the ImageNet model (``classification/pvt.py`` / ``pvt_v2.py``) with fixed random weights (seed 0; every
   tensor randomised) gives the checkpoint, in the layout of the released ImageNet weights (v1 with its
   final ``norm``, ``cls_token`` and the class-token slot of ``pos_embed4``; both with ``head``);
2. the dense-prediction backbone (``segmentation/pvt.py`` for v1, ``detection/pvt_v2.py`` for v2) loads it
   as the release does (``load_checkpoint(..., strict=False)``: the ImageNet-only tensors are ignored; the
   names ignored are saved too) and runs in eval mode on a square and a non-square input. v1 at 64 x 64 and
   64 x 96 (its non-overlapping patch embedding drops rows/columns that are not a multiple of the stride,
   so only multiples of 32 are compared; the position embeddings are resized from 56/28/14/7 either way);
   v2 at 64 x 64 and 72 x 100.

mmseg/mmdet/mmcv imports (registry, logger, checkpoint loading) are stubbed in ``sys.modules``. Weights and
inputs hold float16-representable values and are stored in float16 (exactly; the tests cast them back to
float32).
"""
import os
import sys
from functools import partial

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: common.py is beside it
from common import release_checkout, release_commit, save_fixture  # noqa: E402
from release_stubs import Registry, half, load_file, randomise, stage_outputs, stub_modules  # noqa: E402

CONFIG = dict(patch_size=4, embed_dims=[8, 16, 20, 32], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
              qkv_bias=True, depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], drop_rate=0.0, drop_path_rate=0.1)
SIZES = {"v1": {"square": (64, 64), "nonsquare": (64, 96)}, "v2": {"square": (64, 64), "nonsquare": (72, 100)}}


def run(imagenet_cls, dense_cls, version, commit, dense_kwargs):
    torch.manual_seed(0)
    norm = partial(nn.LayerNorm, eps=1e-6)
    imagenet = imagenet_cls(num_classes=10, norm_layer=norm, **CONFIG)
    randomise(imagenet, 0)
    checkpoint = imagenet.state_dict()
    dense = dense_cls(norm_layer=norm, **CONFIG, **dense_kwargs).eval()
    # what mmcv's load_checkpoint(strict=False) does with the ImageNet checkpoint
    incompatible = dense.load_state_dict(checkpoint, strict=False)
    assert not incompatible.missing_keys, incompatible.missing_keys
    print(f"{version}: the release's dense backbone ignores {sorted(incompatible.unexpected_keys)}")
    content = {"config": dict(CONFIG, num_classes=10), "state_dict": half(checkpoint),
               "ignored_by_release": sorted(incompatible.unexpected_keys)}
    content.update(stage_outputs(dense, SIZES[version]))
    name = "pvt_v1" if version == "v1" else "pvt_v2"
    save_fixture(name, content, "whai362/PVT", commit)


def main():
    path = release_checkout("PVT_RELEASE", "whai362/PVT")
    commit = release_commit(path)
    stub_modules({"mmseg.models.builder": {"BACKBONES": Registry()},
                  "mmseg.utils": {"get_root_logger": lambda *a, **k: None},
                  "mmdet.models.builder": {"BACKBONES": Registry()},
                  "mmdet.utils": {"get_root_logger": lambda *a, **k: None},
                  "mmcv.runner": {"load_checkpoint": lambda *a, **k: None}})
    cls_v1 = load_file(os.path.join(path, "classification", "pvt.py"), "release_pvt_cls")
    seg_v1 = load_file(os.path.join(path, "segmentation", "pvt.py"), "release_pvt_seg")
    run(cls_v1.PyramidVisionTransformer, seg_v1.PyramidVisionTransformer, "v1", commit, {})
    cls_v2 = load_file(os.path.join(path, "classification", "pvt_v2.py"), "release_pvt_v2_cls")
    det_v2 = load_file(os.path.join(path, "detection", "pvt_v2.py"), "release_pvt_v2_det")
    run(cls_v2.PyramidVisionTransformerV2, det_v2.PyramidVisionTransformerV2, "v2", commit, {"pretrained": None})


if __name__ == "__main__":
    main()
