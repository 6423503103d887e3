#!/usr/bin/env python
"""Convert an authors' PVT / PVTv2 ImageNet checkpoint (``pvt_tiny``, ``pvt_small``, ``pvt_v2_b1``,
``pvt_v2_b2``; github.com/whai362/PVT) for Detectron2, into the plain or the HAFA backbone.

    python tools/convert-pvt-to-d2.py pvt_v2_b1.pth pvt_v2_b1.pkl          # build_pvt_backbone
    python tools/convert-pvt-to-d2.py pvt_v2_b1.pth pvt_v2_b1_hafa.pkl --hafa   # build_hafa_backbone

The output is a Detectron2 model-zoo file ({"model": {"backbone.<name>": array}, "__author__": ...,
"matching_heuristics": False}) that ``MODEL.WEIGHTS`` loads by exact names into the backbone with the
matching ``MODEL.PVT.PRESET`` / ``MODEL.HAFA.PRESET`` (the preset is inferred from the checkpoint and
printed). Names stay the authors'. Printed on stdout: what was dropped or changed (ImageNet head and class
token; the class-token slot of v1's ``pos_embed4``; with --hafa, v1's ``pos_embed4`` and the widening of
``patch_embed4`` to 3x3), and with --hafa the new HAFA parameters that stay at their initialisation.
A ``.pth`` output is written with torch.save instead of pickle.
"""
import argparse
import pickle
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hierseg_d2.modeling.backbone.hafa import convert_hafa_state_dict  # noqa: E402
from hierseg_d2.modeling.backbone.pvt import convert_pvt_state_dict, infer_pvt_preset, strip_prefixes  # noqa: E402


def load_authors_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The state dict inside ``path``: a bare state dict or one wrapped under "model"/"state_dict"."""
    ckpt = torch.load(path, map_location="cpu")
    for wrapper in ("model", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(wrapper), dict):
            return ckpt[wrapper]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), possibly under 'model' or "
                         f"'state_dict'; got {type(ckpt).__name__}")
    return ckpt


def convert_file(src: str, dst: str, hafa: bool = False) -> dict:
    """Convert ``src`` to ``dst`` (.pkl: Detectron2 model-zoo pickle of numpy arrays; else torch.save).

    Returns the written dict plus "kept_at_init": the HAFA parameters not in the checkpoint ([] if plain).
    """
    state_dict = load_authors_checkpoint(src)
    preset = infer_pvt_preset({strip_prefixes(k): v for k, v in state_dict.items()})
    kept_at_init: List[str] = []
    if hafa:
        converted, notes, kept_at_init = convert_hafa_state_dict(state_dict)
    else:
        converted, notes = convert_pvt_state_dict(state_dict)
    for note in notes:
        print(note)
    for name in kept_at_init:
        print(f"kept at initialisation (new in HAFA): {name}")
    family = "HAFA" if hafa else "PVT"
    out = {"__author__": f"PVT (Wang et al.), converted by hierseg_d2 for {family} preset {preset}",
           "matching_heuristics": False}
    if dst.endswith(".pkl"):
        out["model"] = {k: v.detach().cpu().numpy() for k, v in converted.items()}
        with open(dst, "wb") as f:
            pickle.dump(out, f)
    else:
        out["model"] = converted
        torch.save(out, dst)
    print(f"wrote {len(converted)} tensors to {dst}: use MODEL.BACKBONE.NAME build_{family.lower()}_backbone, "
          f"MODEL.{family}.PRESET {preset}")
    return dict(out, kept_at_init=kept_at_init)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="authors' PVT / PVTv2 checkpoint (.pth)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pkl or .pth)")
    parser.add_argument("--hafa", action="store_true", help="convert for build_hafa_backbone (default: plain PVT)")
    args = parser.parse_args(argv)
    convert_file(args.source, args.output, hafa=args.hafa)


if __name__ == "__main__":
    main()
