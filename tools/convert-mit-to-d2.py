#!/usr/bin/env python
"""Convert an authors' SegFormer MiT checkpoint (mit_b0.pth, mit_b1.pth, mit_b2.pth) for Detectron2.

    python tools/convert-mit-to-d2.py mit_b1.pth mit_b1.pkl                         # MODEL.BACKBONE.NAME build_mit_backbone
    python tools/convert-mit-to-d2.py mit_b1.pth hila_mit_b1_s234.pkl --hila-preset mit_b1_s234   # build_hila_backbone

The output is a Detectron2 model-zoo pickle {"model": numpy state dict with "backbone." names,
"__author__": ..., "matching_heuristics": False} that DetectionCheckpointer loads by exact names; set it as
MODEL.WEIGHTS. With --hila-preset the MiT tensors go under "backbone.base.", every top-down
self-attention block starts as a copy of the last block of the stage below (HILA Sec. 4.2, "Pretraining")
and the inter-level attentions / FFNs, listed as "kept at initialisation", keep their random init.
--hila-preset mit_b2_s234 takes mit_b2.pth: its base is MiT-B2 on HILA Table 5's depths 2, 2, 6, 2, so
the checkpoint's blocks block1.2, block2.2, block2.3 and block4.2 (all their tensors, norms included) are
dropped and listed, like the ImageNet head; the per-stage norms norm1..norm4 are kept.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hierseg_d2.modeling.backbone.convert import converter_parser, load_state_dict, naming_file  # noqa: E402
from hierseg_d2.modeling.backbone.convert import print_kept_at_initialisation, save_d2_checkpoint  # noqa: E402
from hierseg_d2.modeling.backbone.hila import convert_mit_state_dict_for_hila  # noqa: E402
from hierseg_d2.modeling.backbone.mit import convert_mit_state_dict  # noqa: E402


def convert(state_dict, hila_preset: str = ""):
    """(converted, dropped, kept_at_initialisation) for a plain MiT or, with ``hila_preset``, HILA."""
    if hila_preset:
        return convert_mit_state_dict_for_hila(state_dict, hila_preset)
    converted, dropped = convert_mit_state_dict(state_dict)
    return converted, dropped, []


def main(argv=None):
    parser = converter_parser(__doc__, "SegFormer mit_b*.pth (ImageNet) checkpoint")
    parser.add_argument("--hila-preset", default="",
                        help="convert for build_hila_backbone with this MODEL.HILA.PRESET (e.g. mit_b1_s234)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        parser.error(f"output {args.output!r} must end with .pkl (Detectron2's model-zoo format)")

    state_dict = load_state_dict(args.source, trusted=args.trusted)
    with naming_file(args.source):
        converted, dropped, kept = convert(state_dict, args.hila_preset)
    save_d2_checkpoint(converted, args.output, "SegFormer (NVlabs), converted by hierseg_d2")
    if dropped:
        print(f"dropped {len(dropped)} tensors not used by the backbone: {', '.join(dropped)}")
    print_kept_at_initialisation(kept, "HILA tensors, not in the MiT checkpoint")
    return converted, dropped, kept


if __name__ == "__main__":
    main()
