#!/usr/bin/env python
"""Convert an HCFormer release checkpoint (github.com/DensoITLab/HCFormer, its Detectron2 ``model_final.pth``)
into hierseg_d2's names.

    python tools/convert-hcformer-to-d2.py model_final.pth hcformer_plus_swin_large_coco.pth

The release keeps the clustering modules and HCFormer+'s encoder in its backbone and uses torchvision
ResNet / its own Swin names; ours keeps them in the head and uses Detectron2's ResNet names. Every tensor
is mapped (hierseg_d2/modeling/heads/release_convert.py for the head, the backbone family's
``release_backbone_key_map`` for the backbone); an unknown tensor stops the conversion, named. The output
{"model": ..., "__author__": ..., "matching_heuristics": False} loads with MODEL.WEIGHTS into the matching
config (the release's MODEL.MASK_FORMER.DEC_LAYERS: 9 is ours 8: see docs/hcformer.md).

The checkpoint is read safely (tensors and plain containers only, no code; ``--trusted`` for full pickle).
``--head-only`` converts the head and drops (lists) the backbone tensors.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hierseg_d2.modeling.backbone.convert import converter_parser, load_state_dict, save_d2_checkpoint  # noqa: E402
from hierseg_d2.modeling.heads.release_convert import (  # noqa: E402
    convert_hcformer_release_state_dict,
    convert_head_state_dict,
)


def main(argv=None):
    parser = converter_parser(__doc__, "the release's model_final.pth")
    parser.add_argument("--head-only", action="store_true", help="convert the head only, drop the backbone")
    args = parser.parse_args(argv)
    state = load_state_dict(args.source, trusted=args.trusted)
    try:
        if args.head_only:
            converted, backbone = convert_head_state_dict(state)
            if backbone:
                print(f"dropped {len(backbone)} backbone tensors (--head-only)")
        else:
            converted, dropped = convert_hcformer_release_state_dict(state)
            if dropped:
                print(f"dropped {len(dropped)} BatchNorm num_batches_tracked counters (FrozenBN has none)")
    except (KeyError, ValueError, NotImplementedError) as e:
        raise SystemExit(f"{args.source}: {e}")
    save_d2_checkpoint(converted, args.output, "HCFormer release (DensoITLab), converted by hierseg_d2")
    return converted


if __name__ == "__main__":
    main()
