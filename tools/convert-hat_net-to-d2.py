#!/usr/bin/env python
"""Convert an authors' HAT-Net ImageNet checkpoint (github.com/yun-liu/HAT-Net, ``HAT_Net_*``) for Detectron2.

    python tools/convert-hat_net-to-d2.py HAT-Net-Small.pth hat_net_small.pkl

The output is a Detectron2 model-zoo file ({"model": {"backbone.<name>": array}, "__author__": ...,
"matching_heuristics": False}) that ``MODEL.WEIGHTS`` loads by exact names into
``MODEL.BACKBONE.NAME: build_hat_net_backbone`` with the matching ``MODEL.HATNET.PRESET``. Names stay
the authors'; the ImageNet classifier and the unused ``attn.proj_norm`` tensors are dropped (listed on
stdout). A ``.pth`` output is written with torch.save instead of pickle.
"""
import argparse
import pickle
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hierseg_d2.modeling.backbone.hat_net import convert_hat_net_state_dict  # noqa: E402


def load_authors_checkpoint(path: str) -> dict:
    """The state dict inside ``path``: a bare state dict or one wrapped under "model"/"state_dict"."""
    ckpt = torch.load(path, map_location="cpu")
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(wrapper), dict):
            return ckpt[wrapper]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), possibly under 'model' or "
                         f"'state_dict'; got {type(ckpt).__name__}")
    return ckpt


def convert_file(src: str, dst: str) -> dict:
    """Convert ``src`` to ``dst`` (.pkl: Detectron2 model-zoo pickle of numpy arrays; else torch.save)."""
    converted, dropped = convert_hat_net_state_dict(load_authors_checkpoint(src))
    for name in dropped:
        print(f"dropped {name} (ImageNet head or attn.proj_norm, unused by the authors' forward)")
    out = {"__author__": "HAT-Net (Liu et al.), converted by hierseg_d2", "matching_heuristics": False}
    if dst.endswith(".pkl"):
        out["model"] = {k: v.detach().cpu().numpy() for k, v in converted.items()}
        with open(dst, "wb") as f:
            pickle.dump(out, f)
    else:
        out["model"] = converted
        torch.save(out, dst)
    print(f"wrote {len(converted)} tensors to {dst}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="authors' HAT-Net checkpoint (.pth)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pkl or .pth)")
    args = parser.parse_args(argv)
    convert_file(args.source, args.output)


if __name__ == "__main__":
    main()
