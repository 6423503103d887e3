#!/usr/bin/env python
"""Convert an authors' PVT / PVTv2 ImageNet checkpoint (``pvt_tiny``, ``pvt_small``, ``pvt_v2_b1``,
``pvt_v2_b2``; github.com/whai362/PVT) for Detectron2, into the plain or the HAFA backbone.

    python tools/convert-pvt-to-d2.py pvt_v2_b1.pth pvt_v2_b1.pkl          # build_pvt_backbone
    python tools/convert-pvt-to-d2.py pvt_v2_b1.pth pvt_v2_b1_hafa.pkl --hafa   # build_hafa_backbone

The output is a Detectron2 model-zoo file ({"model": {"backbone.<name>": array}, "__author__": ...,
"matching_heuristics": False}) that ``MODEL.WEIGHTS`` loads by exact names into the backbone with the
matching ``MODEL.PVT.PRESET`` / ``MODEL.HAFA.PRESET`` (the preset is inferred from the checkpoint and
printed). Names stay the authors'. Printed on stdout: what was dropped or changed (ImageNet head and class
token; v1's final ``norm``, which the release's dense PVT v1 does not have; the class-token slot of v1's
``pos_embed4``; with --hafa, v1's ``pos_embed4`` and the widening of
``patch_embed4`` to 3x3), and with --hafa the new HAFA parameters that stay at their initialisation.
A ``.pth`` output is written with torch.save instead of pickle.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hierseg_d2.modeling.backbone.convert import converter_parser, load_state_dict, naming_file  # noqa: E402
from hierseg_d2.modeling.backbone.convert import print_kept_at_initialisation, save_d2_checkpoint  # noqa: E402
from hierseg_d2.modeling.backbone.convert import strip_prefixes  # noqa: E402
from hierseg_d2.modeling.backbone.hafa import convert_hafa_state_dict  # noqa: E402
from hierseg_d2.modeling.backbone.pvt import convert_pvt_state_dict, infer_pvt_preset  # noqa: E402


def convert_file(src: str, dst: str, hafa: bool = False, trusted: bool = False) -> dict:
    """Convert ``src`` to ``dst`` and return what was written plus "kept_at_init": the HAFA parameters not
    in the checkpoint ([] for plain PVT)."""
    state_dict = load_state_dict(src, trusted=trusted)
    kept_at_init = []
    with naming_file(src):
        preset = infer_pvt_preset({strip_prefixes(k): v for k, v in state_dict.items()})
        if hafa:
            converted, notes, kept_at_init = convert_hafa_state_dict(state_dict)
        else:
            converted, notes = convert_pvt_state_dict(state_dict)
    for note in notes:
        print(note)
    print_kept_at_initialisation(kept_at_init, "new in HAFA")
    family = "HAFA" if hafa else "PVT"
    out = save_d2_checkpoint(converted, dst, f"PVT (Wang et al.), converted by hierseg_d2 for {family} preset {preset}")
    print(f"use MODEL.BACKBONE.NAME build_{family.lower()}_backbone, MODEL.{family}.PRESET {preset}")
    return dict(out, kept_at_init=kept_at_init)


def main(argv=None) -> None:
    parser = converter_parser(__doc__, "authors' PVT / PVTv2 checkpoint (.pth)")
    parser.add_argument("--hafa", action="store_true", help="convert for build_hafa_backbone (default: plain PVT)")
    args = parser.parse_args(argv)
    convert_file(args.source, args.output, hafa=args.hafa, trusted=args.trusted)


if __name__ == "__main__":
    main()
