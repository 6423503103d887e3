#!/usr/bin/env python
"""Convert an authors' SegFormer MiT checkpoint (mit_b0.pth, mit_b1.pth, mit_b2.pth) for Detectron2.

    python tools/convert-mit-to-d2.py mit_b1.pth mit_b1.pkl                         # MODEL.BACKBONE.NAME build_mit_backbone
    python tools/convert-mit-to-d2.py mit_b1.pth hila_mit_b1_s234.pkl --hila-preset mit_b1_s234   # build_hila_backbone

The output is a Detectron2 model-zoo pickle {"model": numpy state dict with "backbone." names,
"__author__": ..., "matching_heuristics": False} that DetectionCheckpointer loads by exact names; set it as
MODEL.WEIGHTS. With --hila-preset the MiT tensors go under "backbone.base.", every top-down
self-attention block starts as a copy of the last block of the stage below (HILA Sec. 4.2, "Pretraining")
and the inter-level attentions / FFNs, listed as "kept at initialisation", keep their random init.
"""
import argparse
import pickle
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hierseg_d2.modeling.backbone.hila import convert_mit_state_dict_for_hila  # noqa: E402
from hierseg_d2.modeling.backbone.mit import convert_mit_state_dict  # noqa: E402


def load_state_dict(path: str):
    """The tensors of a .pth/.pkl checkpoint, unwrapping a "state_dict" or "model" entry."""
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    else:
        obj = torch.load(path, map_location="cpu")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds no state dict (a dict of tensors, possibly under 'state_dict' or 'model')")
    return obj


def convert(state_dict, hila_preset: str = ""):
    """(converted, dropped, kept_at_initialisation) for a plain MiT or, with ``hila_preset``, HILA."""
    if hila_preset:
        return convert_mit_state_dict_for_hila(state_dict, hila_preset)
    converted, dropped = convert_mit_state_dict(state_dict)
    return converted, dropped, []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="SegFormer mit_b*.pth (ImageNet) checkpoint")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pkl)")
    parser.add_argument("--hila-preset", default="",
                        help="convert for build_hila_backbone with this MODEL.HILA.PRESET (e.g. mit_b1_s234)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        parser.error(f"output {args.output!r} must end with .pkl (Detectron2's model-zoo format)")

    converted, dropped, kept = convert(load_state_dict(args.input), args.hila_preset)
    model = {k: v.detach().cpu().numpy() for k, v in converted.items()}
    with open(args.output, "wb") as f:
        pickle.dump({"model": model, "__author__": "SegFormer (NVlabs), converted by hierseg_d2",
                     "matching_heuristics": False}, f)
    print(f"wrote {len(model)} tensors to {args.output}")
    if dropped:
        print(f"dropped {len(dropped)} tensors not used by the backbone: {', '.join(dropped)}")
    if kept:
        print(f"kept at initialisation ({len(kept)} HILA tensors, not in the MiT checkpoint):")
        for name in kept:
            print(f"  {name}")
    return converted, dropped, kept


if __name__ == "__main__":
    main()
