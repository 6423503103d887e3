#!/usr/bin/env python
"""Draw HAFA's SIA cluster map over images (HAFA Fig. 4, second column).

    python tools/visualize_sia_clusters.py \
        --config-file configs/ade20k/semantic-segmentation/hafa/hcformer_hafa_pvt_v2_b1_bs16_160k.yaml \
        --input img1.jpg img2.jpg --output vis/ [--alpha 0.6] [--opts MODEL.WEIGHTS model_final.pth]

Builds only the backbone of the config (``MODEL.BACKBONE.NAME: build_hafa_backbone``), loads the
``backbone.*`` tensors of ``MODEL.WEIGHTS`` (a trained HCFormer or a converted PVT checkpoint), resizes each
image as at test time (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``), runs stages 1-3 and SIA's DPC-KNN, and
colours every stride-16 position by its cluster (one colour per cluster, cluster borders in white),
blended over the original image. Writes ``<output>/<image name>_sia.png``.
"""
import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

import cv2
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hierseg_d2.checkpoint import HierSegCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402

from hierseg_d2.config import add_hierseg_config  # noqa: E402
from hierseg_d2.modeling.backbone.hafa import HAFA  # noqa: E402

logger = logging.getLogger("visualize_sia_clusters")


def cluster_palette(num_clusters: int, seed: int = 0) -> np.ndarray:
    """(num_clusters, 3) uint8 RGB colours, fixed by ``seed``."""
    return np.random.default_rng(seed).integers(40, 256, size=(max(num_clusters, 1), 3), dtype=np.uint8)


def render_cluster_map(image: np.ndarray, ids: np.ndarray, network_size, stride: int = 16,
                       alpha: float = 0.6) -> np.ndarray:
    """Blend a cluster map over ``image``.

    image: (H, W, 3) uint8 RGB original image; ids: (h, w) cluster id per stride-``stride`` position of
    the network input of size ``network_size`` = (Hn, Wn) (the resized image). Every original pixel takes
    the cluster of the stride-``stride`` cell its resized position falls in. Returns (H, W, 3) uint8 RGB.
    """
    H, W = image.shape[:2]
    Hn, Wn = network_size
    rows = np.minimum(((np.arange(H) + 0.5) * Hn / H).astype(int) // stride, ids.shape[0] - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * Wn / W).astype(int) // stride, ids.shape[1] - 1)
    per_pixel = ids[rows[:, None], cols[None, :]]
    colours = cluster_palette(int(ids.max()) + 1)[per_pixel]
    out = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    border = np.zeros((H, W), dtype=bool)
    border[1:, :] |= per_pixel[1:, :] != per_pixel[:-1, :]
    border[:, 1:] |= per_pixel[:, 1:] != per_pixel[:, :-1]
    out[border] = 255
    return out.round().clip(0, 255).astype(np.uint8)


def setup_cfg(args):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def load_backbone(cfg) -> HAFA:
    """The config's backbone with the ``backbone.*`` tensors of ``MODEL.WEIGHTS`` (if set)."""
    model = nn.Module()
    model.backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
    if not isinstance(model.backbone, HAFA):
        raise ValueError(f"MODEL.BACKBONE.NAME = {cfg.MODEL.BACKBONE.NAME!r} builds "
                         f"{type(model.backbone).__name__}; the SIA cluster map needs build_hafa_backbone")
    if cfg.MODEL.WEIGHTS:
        HierSegCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)  # safe loading
    else:
        logger.warning("MODEL.WEIGHTS is empty: clusters of an untrained backbone")
    return model.backbone.eval()


def visualize(cfg, inputs: List[str], output: str, alpha: float = 0.6) -> List[str]:
    """Write one cluster-map PNG per input image; returns the written paths."""
    backbone = load_backbone(cfg)
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1)
    os.makedirs(output, exist_ok=True)
    written = []
    for path in inputs:
        image = read_image(path, format=cfg.INPUT.FORMAT)
        resized = resize.get_transform(image).apply_image(image)
        x = (torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)) - mean) / std
        ids = backbone.cluster_map(x[None])[0].numpy()
        rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image
        vis = render_cluster_map(np.ascontiguousarray(rgb), ids, resized.shape[:2], alpha=alpha)
        dst = os.path.join(output, Path(path).stem + "_sia.png")
        cv2.imwrite(dst, vis[:, :, ::-1])
        logger.info(f"{path}: {len(np.unique(ids))} clusters on a {ids.shape[0]}x{ids.shape[1]} grid -> {dst}")
        written.append(dst)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="an HCFormer config with build_hafa_backbone")
    parser.add_argument("--input", nargs="+", required=True, help="image files")
    parser.add_argument("--output", required=True, help="directory for the PNGs")
    parser.add_argument("--alpha", type=float, default=0.6, help="opacity of the cluster colours")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    visualize(setup_cfg(args), args.input, args.output, args.alpha)


if __name__ == "__main__":
    main()
