"""Golden fixture of HAT-Net (github.com/yun-liu/HAT-Net) for tests/modeling/backbone/test_golden_backbones.py.

    HATNET_RELEASE=/path/to/HAT-Net .venv/bin/python tools/golden_fixtures/hat_net.py

Builds the release's ``HAT_Net`` (HAT_Net.py) with the structure of ``HAT_Net_tiny`` (MLP expansions
8/8/4/4, H-MHSA in the first three stages, plain MHSA in the last) but narrow stages (16/32/32/48
channels, head dim 16, 1/2/2/1 blocks), the medium variant's DW-conv kernels 5/3/5/3 (so both kernel
sizes are covered), a 10-class head, and grid sizes G1 = 4/4/4, G2 = 8/4/2 (the release's H-MHSA needs every
map to be a multiple of G1 and G2; these small grids let 64 x 64 and 64 x 128 inputs qualify, the code path
is the one of the dense 8/8/8, 16/8/4 setting). Fixed random weights (seed 0, every tensor randomised,
float16-representable so that they are stored exactly in float16), eval mode. The release's forward ends
in the classifier, so the stages are run here in its own order: ``patch_embed``, ``blocks[0]``, ``ds2``,
``blocks[1]``, ``ds3``, ``blocks[2]``, ``ds4``, ``blocks[3]``; saved: the state dict (release names,
including the classifier and the unused ``attn.proj_norm``), the inputs, every stage output and the
outputs of ``ds2``..``ds4``.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script: common.py is beside it
from common import release_checkout, release_commit, save_fixture  # noqa: E402
from release_stubs import half, load_file, randomise, random_input  # noqa: E402

CONFIG = dict(dims=[16, 32, 32, 48], head_dim=16, expansions=[8, 8, 4, 4], grid_sizes=[4, 4, 4, 1],
              ds_ratios=[8, 4, 2, 1], depths=[1, 2, 2, 1], kernel_sizes=[5, 3, 5, 3], drop_path_rate=0.1,
              num_classes=10)
SIZES = {"square": (64, 64), "nonsquare": (64, 128)}


def main():
    path = release_checkout("HATNET_RELEASE", "yun-liu/HAT-Net")
    hat = load_file(os.path.join(path, "HAT_Net.py"), "release_hat_net")
    torch.manual_seed(0)
    model = hat.HAT_Net(**CONFIG).eval()
    randomise(model, 0)
    content = {"config": dict(CONFIG), "state_dict": half(model.state_dict())}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, (H, W) in SIZES.items():
            x = random_input((1, 3, H, W), g)
            outs = {"input": half(x)}
            y = model.patch_embed(x)
            for s, down in enumerate((None, model.ds2, model.ds3, model.ds4)):
                if down is not None:
                    y = down(y)
                    outs[f"ds{s + 2}"] = y  # our name of the release's ds{s + 1} output (HCFormer's "after" map)
                for block in model.blocks[s]:
                    y = block(y)
                outs[f"res{s + 2}"] = y
            content[key] = outs
    save_fixture("hat_net", content, "yun-liu/HAT-Net", release_commit(path))


if __name__ == "__main__":
    main()
