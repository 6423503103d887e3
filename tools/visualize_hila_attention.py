#!/usr/bin/env python
"""Hierarchical attention of a HILA backbone (HILA App. A.3, eq. 14-15, Fig. 7) as a PNG over the image.

    python tools/visualize_hila_attention.py \
        --config-file configs/ade20k/semantic-segmentation/hila/hcformer_hila_mit_b1_s234_bs16_160k.yaml \
        --weights output/model_final.pth --input image.jpg --location 5 7 --output attention.png

The top-down attention of the last HILA iteration of stage 4 (to stage 3) is composed down through every
lower HILA stage (stage 3 -> 2, stage 2 -> 1 for S(2,3,4)) for the stage-4 feature at --location (row,
column of the stride-32 grid; default: the centre), normalised at every level, upsampled to the image and
blended over it. The red box is the image area of that stage-4 feature. With --all-levels the PNG holds one
panel per composed level (4->3, 4->2, 4->1), as the rows of Fig. 7. The backbone needs HILA on stage 4.
"""
import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hierseg_d2.checkpoint import HierSegCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402
from torch import nn  # noqa: E402

from hierseg_d2.config import add_hierseg_config  # noqa: E402
from hierseg_d2.modeling.backbone.hila import HILABackbone, compose_top_down_attention  # noqa: E402

logger = logging.getLogger("visualize_hila_attention")


def setup_cfg(args):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def load_backbone(cfg, weights: str = "") -> HILABackbone:
    """The config's backbone, with the ``backbone.*`` tensors of ``weights`` (a full-model checkpoint)."""
    holder = nn.Module()
    holder.backbone = build_backbone(cfg)
    if not isinstance(holder.backbone, HILABackbone):
        raise ValueError(f"MODEL.BACKBONE.NAME = {cfg.MODEL.BACKBONE.NAME!r} is not a HILA backbone "
                         f"(use build_hila_backbone)")
    if weights:
        HierSegCheckpointer.from_config(cfg, holder).load(weights)  # safe loading
    else:
        logger.warning("no --weights given: the attention of a randomly initialised HILA is shown")
    return holder.backbone.eval()


def read_image(path: str, cfg) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"--input {path!r} cannot be read as an image")
    return image if cfg.INPUT.FORMAT == "BGR" else image[:, :, ::-1]


def hierarchical_attention(backbone: HILABackbone, image: np.ndarray, cfg, location=None):
    """(maps, location): composed attention maps (top-down, each summing to 1) for one stage-4 feature."""
    if 4 not in backbone.stages:
        raise ValueError(f"hierarchical attention starts at stage 4, but HILA runs on stages {backbone.stages} "
                         f"(MODEL.HILA.STAGES)")
    x = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1)
    backbone.record_attention(True)
    with torch.no_grad():
        out = backbone(((x - mean) / std)[None])
    backbone.record_attention(False)
    attentions = backbone.top_down_attentions()
    chain, stage = {}, 4
    while stage in attentions:  # consecutive HILA stages from the top
        chain[stage] = attentions[stage][0]
        stage -= 1
    if not chain:
        raise ValueError("stage 4 ran no top-down update (it needs at least two HILA iterations)")
    sizes = {s: tuple(out[f"res{s + 1}"].shape[-2:]) for s in range(min(chain) - 1, 5)}
    if location is None:
        location = (sizes[4][0] // 2, sizes[4][1] // 2)
    return compose_top_down_attention(chain, sizes, tuple(location), backbone.hila["4"].patch_size), location


def overlay(image_bgr: np.ndarray, attention: torch.Tensor, stride: int, box) -> np.ndarray:
    """Blend a heat map of ``attention`` (a map at ``stride``) over the image, with the box in red."""
    H, W = image_bgr.shape[:2]
    up = F.interpolate(attention[None, None], scale_factor=stride, mode="nearest")[0, 0, :H, :W]
    up = (up / up.max().clamp_min(1e-12)).numpy()
    heat = cv2.applyColorMap((up * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(image_bgr, 0.5, heat, 0.5, 0)
    (y0, x0), (y1, x1) = box
    cv2.rectangle(blended, (x0, y0), (min(x1, W) - 1, min(y1, H) - 1), (0, 0, 255), 2)
    return blended


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", default="", help="checkpoint with backbone.* tensors (default: random init)")
    parser.add_argument("--input", required=True, help="image file")
    parser.add_argument("--location", type=int, nargs=2, metavar=("ROW", "COL"), default=None,
                        help="stage-4 feature (stride-32 grid); default: the centre")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--all-levels", action="store_true", help="one panel per composed level")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    cfg = setup_cfg(args)
    backbone = load_backbone(cfg, args.weights)
    image = read_image(args.input, cfg)
    maps, (r, c) = hierarchical_attention(backbone, image, cfg, args.location)
    image_bgr = image if cfg.INPUT.FORMAT == "BGR" else image[:, :, ::-1]
    image_bgr = np.ascontiguousarray(image_bgr)
    box = ((r * 32, c * 32), ((r + 1) * 32, (c + 1) * 32))
    # maps[i] lies on paper stage 3 - i, at stride 2 ** (stage + 1)
    levels = list(enumerate(maps))[-1:] if not args.all_levels else list(enumerate(maps))
    panels = [overlay(image_bgr, m, 2 ** (4 - i), box) for i, m in levels]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(args.output, np.concatenate(panels, axis=1)):
        raise OSError(f"could not write --output {args.output!r}")
    print(f"wrote {args.output}: stage-4 feature ({r}, {c}), composed down to stage {4 - len(maps)}")
    return maps


if __name__ == "__main__":
    main()
