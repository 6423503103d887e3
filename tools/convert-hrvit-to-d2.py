#!/usr/bin/env python
"""Convert an authors' HRViT ImageNet checkpoint (github.com/facebookresearch/HRViT, ``hrvit_b1/b2/b3``)
for Detectron2.

    python tools/convert-hrvit-to-d2.py hrvit_b1.pth hrvit_b1.pkl --preset b1

The output is a Detectron2 model-zoo file ({"model": {"backbone.<name>": array}, "__author__": ...,
"matching_heuristics": False}) that ``MODEL.WEIGHTS`` loads by exact names into
``MODEL.BACKBONE.NAME: build_hrvit_backbone`` with the same ``MODEL.HRVIT.PRESET``. Our module names are
the authors', so only the ``backbone.`` prefix is added and the ImageNet head (``head.*``) is dropped.
``--preset`` checks every name and shape against that preset before writing. A ``.pth`` output is
written with torch.save instead of pickle.
"""
import argparse
import pickle
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hierseg_d2.modeling.backbone.hrvit import PRESETS, HRViT, convert_authors_state_dict  # noqa: E402


def convert_file(src: str, dst: str, preset: str = "") -> dict:
    """Convert ``src`` to ``dst`` (.pkl: Detectron2 model-zoo pickle of numpy arrays; else torch.save)."""
    ckpt = torch.load(src, map_location="cpu")
    if not isinstance(ckpt, dict):
        raise ValueError(f"{src}: expected a state dict (name -> tensor), got {type(ckpt).__name__}")
    reference = None
    if preset:
        if preset not in PRESETS:
            raise KeyError(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
        reference = HRViT(**PRESETS[preset]).state_dict()
    try:
        converted = convert_authors_state_dict(ckpt, reference)
    except (KeyError, ValueError) as e:
        raise type(e)(f"{src}: {e}") from None
    out = {"__author__": "HRViT (Gu et al.), converted by hierseg_d2", "matching_heuristics": False}
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
    parser.add_argument("source", help="authors' HRViT checkpoint (.pth)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pkl or .pth)")
    parser.add_argument("--preset", default="", choices=[""] + sorted(PRESETS),
                        help="check names and shapes against this MODEL.HRVIT.PRESET")
    args = parser.parse_args(argv)
    convert_file(args.source, args.output, args.preset)


if __name__ == "__main__":
    main()
