#!/usr/bin/env python
"""Convert a checkpoint of the HILA release (github.com/fidler-lab/hila) for Detectron2.

    python tools/convert-hila-to-d2.py pretrained/hila/B1_S234.pth hila_mit_b1_s234.pkl --preset mit_b1_s234
    python tools/convert-hila-to-d2.py hila_swin_t_ade.pth hila_swin_t_s234.pkl --preset swin_t_s234

Takes the release's ImageNet-pretrained HILA backbones (``pretrained/hila/*.pth``) or its trained mmseg
segmentation checkpoints (``state_dict`` with ``backbone.*``; the decode heads are dropped) for
``MODEL.BACKBONE.NAME build_hila_backbone`` with ``MODEL.HILA.PRESET`` = ``--preset``. Every tensor is
mapped (kv split into k / v, the two relative-position tables summed, norm1..6 renamed, prevblock /
bottom_sa -> top_down_block, prevnorm / bottom_norm -> prevnorm) or listed as dropped (head, decode heads,
the release's re-initialisation flag); an unknown name raises an error naming it, and the result is checked
strictly against the preset's model. The output is a Detectron2 model-zoo pickle {"model": numpy state dict
with "backbone." names, "__author__", "matching_heuristics": False} for MODEL.WEIGHTS.

For SegFormer's plain ImageNet MiT weights (no HILA parts) use tools/convert-mit-to-d2.py --hila-preset.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hierseg_d2.modeling.backbone.convert import converter_parser, load_state_dict, naming_file  # noqa: E402
from hierseg_d2.modeling.backbone.convert import save_d2_checkpoint  # noqa: E402
from hierseg_d2.modeling.backbone.hila import HILA_PRESETS, convert_hila_state_dict  # noqa: E402


def main(argv=None):
    parser = converter_parser(__doc__, "HILA release checkpoint (.pth)")
    parser.add_argument("--preset", required=True, choices=sorted(HILA_PRESETS),
                        help="MODEL.HILA.PRESET the checkpoint was trained as (e.g. mit_b1_s234)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        parser.error(f"output {args.output!r} must end with .pkl (Detectron2's model-zoo format)")

    state_dict = load_state_dict(args.source, trusted=args.trusted)
    with naming_file(args.source):
        converted, dropped = convert_hila_state_dict(state_dict, args.preset)
    save_d2_checkpoint(converted, args.output, "HILA (fidler-lab), converted by hierseg_d2")
    if dropped:
        print(f"dropped {len(dropped)} tensors not used by the backbone: {', '.join(dropped)}")
    return converted, dropped


if __name__ == "__main__":
    main()
