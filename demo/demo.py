#!/usr/bin/env python
"""Draw hierseg_d2 predictions on images (Detectron2's demo/demo.py, for every model of the project).

    python demo/demo.py --config-file configs/coco/panoptic-segmentation/hcformer_R50_bs16_50ep.yaml \
        --input images/*.jpg --output out/ [--hierarchy] [--confidence-threshold 0.5] \
        --opts MODEL.WEIGHTS /path/to/model_final.pth

Writes ``<output>/<name>.png`` (panoptic, else semantic and/or instance predictions drawn with
Detectron2's Visualizer and the names/colours of ``DATASETS.TEST[0]``) and, with ``--hierarchy``,
``<output>/<name>_hierarchy.png``: HCFormer's hard cluster boundaries at every level and the prediction.
"""
import argparse
import glob
import logging
import os
import sys
import time

import cv2
import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # demo/predictor.py, as in Detectron2

from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from hierseg_d2.config import load_config  # noqa: E402
from hierseg_d2.data.datasets import add_register_argument  # noqa: E402
from predictor import VisualizationDemo  # noqa: E402


def setup_cfg(args):
    """Detectron2 + hierseg_d2 defaults, then the config file, then ``--opts``; frozen."""
    cfg = load_config(args.config_file, args.opts, register=args.register)
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description="hierseg_d2 demo: draw predictions on images")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, or a single glob pattern such as 'directory/*.jpg'")
    parser.add_argument("--output", default="output/demo",
                        help="a file or directory to save the drawings in; a directory when there are "
                             "several inputs (default: output/demo)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score for instance predictions to be shown")
    parser.add_argument("--hierarchy", action="store_true",
                        help="also write <name>_hierarchy.png: the hierarchical clustering strip (HCFormer)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="modify config options using the command-line 'KEY VALUE' pairs")
    return add_register_argument(parser)


def output_paths(path: str, output: str, many: bool):
    """(prediction PNG, hierarchy strip PNG) of one input image."""
    if many or os.path.isdir(output) or output.endswith(os.sep) or not os.path.splitext(output)[1]:
        name = os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(output, name + ".png")
    else:
        out = output
    return out, os.path.splitext(out)[0] + "_hierarchy.png"


def empty_prediction_message(predictions, cfg, confidence_threshold: float):
    """Why nothing is drawn, or "" when something is: a panoptic output with no segment (every query
    below MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD or "no object"), or instances all below
    --confidence-threshold while no semantic map is drawn."""
    if "panoptic_seg" in predictions:
        if not predictions["panoptic_seg"][1]:
            return ("no panoptic segment above MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = "
                    f"{cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD} (the picture shows the bare image)")
        return ""
    if "instances" in predictions and "sem_seg" not in predictions:
        scores = predictions["instances"].scores
        if not bool((scores >= confidence_threshold).any()):
            best = f"{float(scores.max()):.3f}" if len(scores) else "none"
            return (f"no instance scores >= --confidence-threshold {confidence_threshold} (best: {best}; the "
                    "picture shows the bare image)")
    return ""


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    logger = setup_logger()
    logger.info("Arguments: " + str(args))
    cfg = setup_cfg(args)

    inputs = args.input
    if len(inputs) == 1:
        inputs = sorted(glob.glob(os.path.expanduser(inputs[0])))
        if not inputs:
            raise FileNotFoundError(f"--input {args.input[0]!r} matches no file")
    demo = VisualizationDemo(cfg, hierarchy=args.hierarchy, confidence_threshold=args.confidence_threshold)
    many = len(inputs) > 1
    written = []
    for path in tqdm.tqdm(inputs, disable=len(inputs) < 2):
        img = read_image(path, format="BGR")
        start = time.time()
        predictions, vis, strip = demo.run_on_image(img)
        shown = [k for k in ("panoptic_seg", "sem_seg", "instances") if k in predictions]
        logger.info(f"{path}: {', '.join(shown)} in {time.time() - start:.2f}s")
        empty = empty_prediction_message(predictions, cfg, args.confidence_threshold)
        if empty:
            logger.warning(f"{path}: {empty}")
        out, strip_out = output_paths(path, args.output, many)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        if not cv2.imwrite(out, vis[:, :, ::-1]):
            raise OSError(f"could not write {out}")
        written.append(out)
        if strip is not None:
            cv2.imwrite(strip_out, strip[:, :, ::-1])
            written.append(strip_out)
    logging.getLogger("detectron2").info(f"wrote {len(written)} PNGs under {os.path.dirname(written[0]) or '.'}")
    return written


if __name__ == "__main__":
    main()
