#!/usr/bin/env python
"""Convert an official Swin Transformer ImageNet checkpoint (microsoft/Swin-Transformer layout, e.g.
swin_tiny_patch4_window7_224.pth, swin_base_patch4_window12_384_22k.pth) for D2SwinTransformer.

    python tools/convert-pretrained-swin-model-to-d2.py swin_small_patch4_window7_224.pth swin_small.pkl
    python tools/convert-pretrained-swin-model-to-d2.py swin_small_patch4_window7_224.pth swin_small.pkl \
        --config-file configs/coco/panoptic-segmentation/swin/hcformer_swin_small_bs16_50ep.yaml

Set the output as MODEL.WEIGHTS (with INPUT.FORMAT "RGB" and the ImageNet PIXEL_MEAN / PIXEL_STD, as the Swin
configs have). D2SwinTransformer (hierseg_d2/modeling/backbone/swin.py) keeps the official parameter names,
so the backbone tensors keep their names under the "backbone." prefix and load by exact names
("matching_heuristics": False) and strictly. Dropped and listed: the ImageNet head ``head.*``, the shifted
blocks' ``attn_mask`` buffers (D2SwinTransformer recomputes them for every input size) and the
classification norm ``norm.*`` on the last stage. The release (Mask2Former's tool + Detectron2's name
matching) leaves that last one unused too, so the per-stage output norms ``norm0``..``norm3`` stay at their
LayerNorm initialisation (weight 1, bias 0) and are listed as "kept at initialisation";
``--final-norm-to-norm3`` puts ``norm.*`` into ``norm3`` instead (the same place in the network: the
output of the last stage).

The result is checked against D2SwinTransformer built from ``--config-file`` (+ ``--opts``) or, without
it, with the architecture read off the checkpoint (embedding width, depths, heads and window size, printed
as the MODEL.SWIN keys to use): a name the model lacks or a shape it does not expect (e.g. a window-12
checkpoint into a window-7 config) is an error naming the tensor. The source is read
safely (tensors only; --trusted for full pickle); the output is a .pkl of numpy arrays (Detectron2's model-zoo format) or,
with any other suffix, a torch.save of tensors.
"""
import math
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hierseg_d2.modeling.backbone.convert import add_prefix, check_against_model, naming_file  # noqa: E402
from hierseg_d2.modeling.backbone.convert import converter_parser, print_kept_at_initialisation  # noqa: E402
from hierseg_d2.modeling.backbone.convert import load_state_dict, save_d2_checkpoint  # noqa: E402

_KEEP = ("patch_embed.", "layers.", "absolute_pos_embed")
_TABLE = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")


def convert_swin_state_dict(state_dict, final_norm_to_norm3: bool = False
                            ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(D2SwinTransformer tensors without the "backbone." prefix, source names dropped on purpose)."""
    converted, dropped = {}, []
    num_stages = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("layers.")), default=-1)
    for name, tensor in state_dict.items():
        key = name[len("module."):] if name.startswith("module.") else name
        if key.startswith("head.") or key.endswith(".attn_mask"):
            dropped.append(name)
        elif key.startswith("norm."):
            if final_norm_to_norm3:
                converted[f"norm{num_stages - 1}." + key[len("norm."):]] = tensor
            else:
                dropped.append(name)
        elif key.startswith(_KEEP):
            converted[key] = tensor
        else:
            raise KeyError(f"tensor {name!r} is not part of the official Swin layout "
                           f"(names starting with {_KEEP + ('norm.', 'head.')})")
    if not any(k.startswith("layers.") for k in converted):
        raise KeyError("holds no Swin stage tensors (layers.*)")
    return converted, dropped


def swin_architecture(converted: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """MODEL.SWIN values read off the checkpoint: EMBED_DIM, PATCH_SIZE, DEPTHS, NUM_HEADS, WINDOW_SIZE, APE."""
    if "patch_embed.proj.weight" not in converted:
        raise KeyError("holds no patch_embed.proj.weight: not a Swin checkpoint")
    proj = converted["patch_embed.proj.weight"]
    depths, heads, windows = {}, {}, set()
    for name, t in converted.items():
        m = _TABLE.match(name)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
            heads[stage] = t.shape[1]
            windows.add((math.isqrt(t.shape[0]) + 1) // 2)  # table has (2 Wh - 1) * (2 Ww - 1) rows
    if not depths or sorted(depths) != list(range(len(depths))) or len(windows) != 1:
        raise KeyError("cannot read the Swin depths / heads / window size off the relative_position_bias_table "
                       "tensors")
    n = len(depths)
    return {"EMBED_DIM": proj.shape[0], "PATCH_SIZE": proj.shape[-1], "DEPTHS": [depths[i] for i in range(n)],
            "NUM_HEADS": [heads[i] for i in range(n)], "WINDOW_SIZE": windows.pop(),
            "APE": "absolute_pos_embed" in converted}


def model_backbone_state_dict(config_file: str = "", opts=(), arch=None) -> Dict[str, torch.Tensor]:
    """"backbone."-prefixed state dict of D2SwinTransformer from ``config_file`` (+ opts) or from ``arch``."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from hierseg_d2.config import add_hierseg_config, load_config

    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file!r} does not exist")
        cfg = load_config(config_file, list(opts) + ["MODEL.DEVICE", "cpu"])
    else:
        cfg = get_cfg()
        add_hierseg_config(cfg)
        cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
        for key, value in arch.items():
            setattr(cfg.MODEL.SWIN, key, value)
        cfg.merge_from_list(list(opts))
    if cfg.MODEL.BACKBONE.NAME != "D2SwinTransformer":
        raise ValueError(f"{config_file}: MODEL.BACKBONE.NAME is {cfg.MODEL.BACKBONE.NAME!r}, "
                         "not D2SwinTransformer")
    return add_prefix(build_backbone(cfg).state_dict())


def main(argv=None):
    parser = converter_parser(__doc__, "official Swin checkpoint (.pth, {'model': state dict})",
                              "check the result against this config's D2SwinTransformer (default: the "
                              "architecture read off the checkpoint)")
    parser.add_argument("--final-norm-to-norm3", action="store_true",
                        help="load the classification norm (norm.*) into the last stage's output norm")
    args = parser.parse_args(argv)

    with naming_file(args.source):
        converted, dropped = convert_swin_state_dict(load_state_dict(args.source, trusted=args.trusted), args.final_norm_to_norm3)
        arch = swin_architecture(converted)
    print("architecture: " + ", ".join(f"MODEL.SWIN.{k} {v}" for k, v in arch.items()))
    converted = add_prefix(converted)
    expected = model_backbone_state_dict(args.config_file, args.opts, arch)
    with naming_file(args.source):
        new = check_against_model(converted, expected, f"Swin checkpoint vs D2SwinTransformer "
                                  f"({args.config_file or 'architecture of the checkpoint'})", allow_missing=True)
        # the official checkpoint has every patch-embedding and stage tensor: one missing would stay random;
        # the rest (per-stage output norms, anything the project adds) is new and listed
        other = [n for n in new if n.startswith(("backbone.patch_embed.", "backbone.layers."))]
        if other:
            raise KeyError(f"the checkpoint lacks tensors of the Swin backbone: {other[:10]}")
    save_d2_checkpoint(converted, args.output, "Swin Transformer (microsoft), converted by hierseg_d2")
    print(f"dropped {len(dropped)} tensors not used by the backbone: {', '.join(dropped)}")
    print_kept_at_initialisation(new, "not in ImageNet Swin: per-stage output norms (LayerNorm init)")
    return converted, dropped, new


if __name__ == "__main__":
    main()
