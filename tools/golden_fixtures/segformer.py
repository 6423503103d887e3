"""Golden fixture of SegFormer's Mix Transformer (github.com/NVlabs/SegFormer) for tests/modeling/backbone/
test_golden_backbones.py.

    SEGFORMER_RELEASE=/path/to/SegFormer .venv/bin/python tools/golden_fixtures/segformer.py

Builds the release's own ``MixVisionTransformer`` (mmseg/models/backbones/mix_transformer.py) with the
hyper-parameters of ``mit_b0`` (qkv bias, LayerNorm eps 1e-6, sr ratios 8/4/2/1, MLP ratio 4, heads
1/2/5/8) but narrower stages (8/16/20/32 channels, two blocks each) so the fixture stays small, fixed
random weights (seed 0; LayerNorm and bias values randomised too, so that every tensor matters) and runs
it in eval mode on a 64 x 64 and a 72 x 100 input (the release accepts any size). Saved: the state dict
under the release's names, the inputs and the four stage outputs. The release's module imports mmseg and
mmcv only to register the class and load checkpoints; those imports are stubbed here (``sys.modules``),
nothing is installed. Weights and inputs
hold float16-representable values and are stored in float16 (exactly; the tests cast them back to float32).
"""
import os
import sys
from functools import partial

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: common.py is beside it
from common import release_checkout, release_commit, save_fixture  # noqa: E402
from release_stubs import Registry, half, load_file, randomise, stage_outputs, stub_modules  # noqa: E402

CONFIG = dict(embed_dims=[8, 16, 20, 32], num_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4], qkv_bias=True,
              depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], drop_rate=0.0, drop_path_rate=0.1)
SIZES = {"square": (64, 64), "nonsquare": (72, 100)}


def main():
    path = release_checkout("SEGFORMER_RELEASE", "NVlabs/SegFormer")
    stub_modules({"mmseg.models.builder": {"BACKBONES": Registry()},
                  "mmseg.utils": {"get_root_logger": lambda *a, **k: None},
                  "mmcv.runner": {"load_checkpoint": lambda *a, **k: None}})
    mit = load_file(os.path.join(path, "mmseg", "models", "backbones", "mix_transformer.py"), "release_mit")
    torch.manual_seed(0)
    model = mit.MixVisionTransformer(norm_layer=partial(nn.LayerNorm, eps=1e-6), **CONFIG).eval()
    randomise(model, 0)
    content = {"config": {k: v for k, v in CONFIG.items()}, "state_dict": half(model.state_dict())}
    content.update(stage_outputs(model, SIZES))
    save_fixture("segformer_mit", content, "NVlabs/SegFormer", release_commit(path))


if __name__ == "__main__":
    main()
