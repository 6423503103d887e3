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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hierseg_d2.modeling.backbone.convert import converter_parser, load_state_dict, naming_file  # noqa: E402
from hierseg_d2.modeling.backbone.convert import save_d2_checkpoint  # noqa: E402
from hierseg_d2.modeling.backbone.hrvit import PRESETS, HRViT, convert_authors_state_dict  # noqa: E402


def convert_file(src: str, dst: str, preset: str = "", trusted: bool = False) -> dict:
    """Convert ``src`` to ``dst`` (checked against ``preset`` if given) and return what was written."""
    if preset and preset not in PRESETS:
        raise KeyError(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
    reference = HRViT(**PRESETS[preset]).state_dict() if preset else None
    state_dict = load_state_dict(src, trusted=trusted)
    with naming_file(src):
        converted = convert_authors_state_dict(state_dict, reference)
    return save_d2_checkpoint(converted, dst, "HRViT (Gu et al.), converted by hierseg_d2")


def main(argv=None) -> None:
    parser = converter_parser(__doc__, "authors' HRViT checkpoint (.pth)")
    parser.add_argument("--preset", default="", choices=[""] + sorted(PRESETS),
                        help="check names and shapes against this MODEL.HRVIT.PRESET")
    args = parser.parse_args(argv)
    convert_file(args.source, args.output, args.preset, trusted=args.trusted)


if __name__ == "__main__":
    main()
