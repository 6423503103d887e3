"""Golden fixture of HRViT (github.com/facebookresearch/HRViT) for tests/modeling/backbone/test_golden_backbones.py.

    HRVIT_RELEASE=/path/to/HRViT .venv/bin/python tools/golden_fixtures/hrvit.py

Builds the release's dense-prediction backbone (``segmentation/mmseg/models/backbones/hrvit.py``, class
``HRViT``) with the module layout of ``hrvit_b1`` (6 modules with 1, 2, 3, 3, 4, 4 branches, window sizes
1/2/7/7) but narrow branches (8/16/32/48 channels, MixCFN ratio 2, stem 16, head dim 8) and fewer blocks,
fixed random weights (seed 0; every tensor randomised, including the zero-initialised ``attn_bn``
weights), the BatchNorms as in the release's configs (SyncBN; eval mode = plain BatchNorm) and runs it in
eval mode at 96 x 96 and 64 x 128 (multiples of 32, as its fusion layers need; the 7-wide stripes do not
divide the 6 x 6 / 4 x 8 / 2 x 4 maps, so the padding masks are exercised).

The release imports mmcv/mmseg (registry, norm builder, logger, checkpoint loading) and einops; they are
stubbed in ``sys.modules`` (``build_norm_layer`` returns ``nn.SyncBatchNorm`` as mmcv does for SyncBN; the
two ``rearrange`` patterns the file uses are written out with reshape/permute). Weights and inputs hold
float16-representable values and are stored in float16 (exactly; the tests cast them back to float32).
"""
import os
import sys

import timm.models.layers  # noqa: F401  (before the einops stub: torch._dynamo inspects einops on import)
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: common.py is beside it
from common import release_checkout, release_commit, save_fixture  # noqa: E402
from release_stubs import Registry, half, load_file, randomise, stage_outputs, stub_modules  # noqa: E402

CONFIG = dict(
    channels=16,
    channel_list=((8,), (8, 16), (8, 16, 32), (8, 16, 32), (8, 16, 32, 48), (8, 16, 32, 48)),
    block_list=((1,), (1, 1), (1, 1, 2), (1, 1, 2), (1, 1, 2, 1), (1, 1, 1, 1)),
    dim_head=8, ws_list=(1, 2, 7, 7), mlp_ratio_list=(2, 2, 2, 2), drop_path_rate=0.1,
)
SIZES = {"square": (96, 96), "nonsquare": (64, 128)}


def build_norm_layer(cfg, num_features):
    # mmcv.cnn.build_norm_layer for the release's SyncBN configs: ("bn", SyncBatchNorm)
    assert cfg["type"] == "SyncBN", cfg
    return "bn", nn.SyncBatchNorm(num_features)


def rearrange(x, pattern, b):
    # the two patterns of HRViTAttention._cross_shaped_attention
    if pattern == "B H h (b W) d -> B (H b) W (h d)":
        B, n, h, bw, d = x.shape
        return x.reshape(B, n, h, b, bw // b, d).permute(0, 1, 3, 4, 2, 5).reshape(B, n * b, bw // b, h * d)
    if pattern == "B W h (b H) d -> B H (W b) (h d)":
        B, n, h, bh, d = x.shape
        return x.reshape(B, n, h, b, bh // b, d).permute(0, 4, 1, 3, 2, 5).reshape(B, bh // b, n * b, h * d)
    raise NotImplementedError(pattern)


def main():
    path = release_checkout("HRVIT_RELEASE", "facebookresearch/HRViT")
    stub_modules({"mmseg.models.builder": {"BACKBONES": Registry()},
                  "mmseg.models.backbones": {},
                  "mmseg.utils": {"get_root_logger": lambda *a, **k: None},
                  "mmcv_custom": {"load_checkpoint": lambda *a, **k: None},
                  "mmcv.cnn.bricks.norm": {"build_norm_layer": build_norm_layer},
                  "einops": {"rearrange": rearrange}})
    for name in ("mmseg", "mmseg.models", "mmseg.models.backbones"):
        sys.modules[name].__path__ = []  # packages, so that the file's relative import resolves
    hrvit = load_file(os.path.join(path, "segmentation", "mmseg", "models", "backbones", "hrvit.py"),
                      "mmseg.models.backbones.hrvit")
    torch.manual_seed(0)
    model = hrvit.HRViT(**CONFIG).eval()
    randomise(model, 0)
    content = {"config": {k: [list(v) if isinstance(v, tuple) else v for v in val] if isinstance(val, tuple)
                          else val for k, val in CONFIG.items()},
               "state_dict": half(model.state_dict())}
    content.update(stage_outputs(model, SIZES))
    save_fixture("hrvit", content, "facebookresearch/HRViT", release_commit(path))


if __name__ == "__main__":
    main()
