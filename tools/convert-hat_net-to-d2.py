#!/usr/bin/env python
"""Convert an authors' HAT-Net ImageNet checkpoint (github.com/yun-liu/HAT-Net, ``HAT_Net_*``) for Detectron2.

    python tools/convert-hat_net-to-d2.py HAT-Net-Small.pth hat_net_small.pkl

The output is a Detectron2 model-zoo file ({"model": {"backbone.<name>": array}, "__author__": ...,
"matching_heuristics": False}) that ``MODEL.WEIGHTS`` loads by exact names into
``MODEL.BACKBONE.NAME: build_hat_net_backbone`` with the matching ``MODEL.HATNET.PRESET``. Names stay
the authors'; the ImageNet classifier and the unused ``attn.proj_norm`` tensors are dropped (listed on
stdout). A ``.pth`` output is written with torch.save instead of pickle.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hierseg_d2.modeling.backbone.convert import converter_parser, load_state_dict, naming_file  # noqa: E402
from hierseg_d2.modeling.backbone.convert import save_d2_checkpoint  # noqa: E402
from hierseg_d2.modeling.backbone.hat_net import convert_hat_net_state_dict  # noqa: E402


def convert_file(src: str, dst: str, trusted: bool = False) -> dict:
    """Convert ``src`` to ``dst`` and return what was written."""
    state_dict = load_state_dict(src, trusted=trusted)
    with naming_file(src):
        converted, dropped = convert_hat_net_state_dict(state_dict)
    for name in dropped:
        print(f"dropped {name} (ImageNet head or attn.proj_norm, unused by the authors' forward)")
    return save_d2_checkpoint(converted, dst, "HAT-Net (Liu et al.), converted by hierseg_d2")


def main(argv=None) -> None:
    args = converter_parser(__doc__, "authors' HAT-Net checkpoint (.pth)").parse_args(argv)
    convert_file(args.source, args.output, trusted=args.trusted)


if __name__ == "__main__":
    main()
