#!/usr/bin/env python
"""Convert a torchvision ImageNet ResNet (resnet18/34/50/101/152 .pth) into the Detectron2 R-50.pkl layout.

    python tools/convert-torchvision-to-d2.py resnet50-0676ba61.pth R-50.pkl
    python tools/convert-torchvision-to-d2.py resnet50-0676ba61.pth R-50.pth   # pickle-free output
    python tools/convert-torchvision-to-d2.py r50.pth R-50.pkl \
        --config-file configs/ade20k/semantic-segmentation/hcformer_R50_bs16_160k.yaml

Set the output as MODEL.WEIGHTS of the R50 configs (they already use torchvision's PIXEL_MEAN / PIXEL_STD,
INPUT.FORMAT "RGB" and MODEL.RESNETS.STRIDE_IN_1X1 False, the torchvision layout). Names map as in the
release's tool (``conv1`` / ``bn1`` -> ``stem.conv1`` / ``stem.conv1.norm``, ``layer{k}`` -> ``res{k+1}``,
``bn{j}`` -> ``conv{j}.norm``, ``downsample.0`` / ``.1`` -> ``shortcut`` / ``shortcut.norm``), with the
"backbone." prefix, so the file loads by exact names ("matching_heuristics": False) and strictly.

Every tensor is accounted for: BN ``num_batches_tracked`` counters (not used by FrozenBN) and the ImageNet
head ``fc.*`` are dropped and listed; any other name is an error. The result is checked against the
backbone built from ``--config-file`` (default: the COCO panoptic HCFormer R50 config with
MODEL.RESNETS.DEPTH taken from the checkpoint): a name the model lacks or a wrong shape is an error, and
the model tensors the checkpoint does not provide — the DCNv2 offset/modulation predictors of the
downsampling layers (zero-initialised, so each DCN starts as the plain pretrained conv, see
hierseg_d2/modeling/backbone/resnet_dcn.py) — are listed as "kept at initialisation".

Output: .pkl = Detectron2 model-zoo pickle of numpy arrays; any other suffix = torch.save of tensors
(loadable with torch.load(weights_only=True)). The source is read safely (tensors only; --trusted for full pickle).
"""
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs/coco/panoptic-segmentation/hcformer_R50_bs16_50ep.yaml"
# blocks in layer3 -> depth; layer3 tells all torchvision ResNets apart once basic/bottleneck is known
_DEPTH = {(False, 2): 18, (False, 6): 34, (True, 6): 50, (True, 23): 101, (True, 36): 152}

_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")


def rename(name: str) -> str:
    """torchvision ResNet name -> Detectron2 ResNet name (without the "backbone." prefix)."""
    if name.startswith(("conv1.", "bn1.")):
        return "stem." + name.replace("bn1.", "conv1.norm.")
    m = _BLOCK.match(name)
    if m is None:
        raise KeyError(f"tensor {name!r} is not part of torchvision's ResNet layout "
                       "(conv1, bn1, layer1..layer4, fc)")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn([1-3])\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{stage}.{block}.{rest}"


def convert_torchvision_state_dict(state_dict) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(Detectron2-named backbone tensors, source names dropped on purpose)."""
    converted, dropped = {}, []
    for name, tensor in state_dict.items():
        key = name[len("module."):] if name.startswith("module.") else name
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            dropped.append(name)
            continue
        converted[rename(key)] = tensor
    if not converted:
        raise KeyError("holds no torchvision ResNet tensors")
    return converted, dropped


def resnet_depth(converted: Dict[str, torch.Tensor]) -> int:
    """ResNet depth from the converted names (bottleneck blocks have conv3; layer3 = res4 block count)."""
    bottleneck = "res2.0.conv3.weight" in converted
    blocks = len({k.split(".")[1] for k in converted if k.startswith("res4.")})
    if (bottleneck, blocks) not in _DEPTH:
        raise KeyError(f"not a torchvision ResNet-18/34/50/101/152: {'bottleneck' if bottleneck else 'basic'} "
                       f"blocks with {blocks} blocks in layer3")
    return _DEPTH[bottleneck, blocks]


def model_backbone_state_dict(config_file: str, opts=()) -> Dict[str, torch.Tensor]:
    """The "backbone."-prefixed state dict of the backbone ``config_file`` (+ ``opts``) builds, on the cpu."""
    from detectron2.modeling import build_backbone

    from hierseg_d2.config import load_config

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file!r} does not exist")
    cfg = load_config(config_file, list(opts) + ["MODEL.DEVICE", "cpu"])
    return add_prefix(build_backbone(cfg).state_dict())


def main(argv=None):
    parser = converter_parser(__doc__, "torchvision ResNet checkpoint (.pth state dict)",
                              "check the result against this config's backbone (default: the COCO panoptic "
                              "HCFormer R50 config, MODEL.RESNETS.DEPTH from the checkpoint)")
    args = parser.parse_args(argv)

    with naming_file(args.source):
        converted, dropped = convert_torchvision_state_dict(load_state_dict(args.source, trusted=args.trusted))
        depth = resnet_depth(converted)
    converted = add_prefix(converted)
    config = args.config_file or str(DEFAULT_CONFIG)
    opts = list(args.opts)
    if not args.config_file:
        opts += ["MODEL.RESNETS.DEPTH", str(depth)] + (["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"] if depth < 50 else [])
    expected = model_backbone_state_dict(config, opts)
    with naming_file(args.source):
        new = check_against_model(converted, expected, f"ResNet-{depth} checkpoint vs the backbone of {config}",
                                  allow_missing=True)
    # only the DCN additions may be missing: every tensor of the same backbone without DCN must be provided
    # (compared with that model, not by name patterns, so renamed DCN tensors are still recognised)
    plain = model_backbone_state_dict(config, opts + ["MODEL.HCFORMER.DCN_DOWNSAMPLING", "False"])
    not_dcn = sorted(n for n in set(plain) - set(converted) if not n.endswith("num_batches_tracked"))
    if not_dcn:
        raise KeyError(f"{args.source}: the checkpoint lacks tensors of the plain ResNet-{depth}: {not_dcn[:10]}")
    save_d2_checkpoint(converted, args.output, "torchvision, converted by hierseg_d2")
    print(f"dropped {len(dropped)} tensors not used by the backbone: "
          f"{', '.join(d for d in dropped if not d.endswith('num_batches_tracked'))} and "
          f"{sum(d.endswith('num_batches_tracked') for d in dropped)} BN num_batches_tracked counters")
    print_kept_at_initialisation(new, "new in HCFormer's ResNet (DCNv2 offset/modulation predictors, zero init)")
    return converted, dropped, new


if __name__ == "__main__":
    main()
