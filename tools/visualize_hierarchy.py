#!/usr/bin/env python
"""Hierarchical clustering strips and per-level clustering quality of an HCFormer on a dataset split.

    python tools/visualize_hierarchy.py --config-file configs/shapes/hcformer_R18_s16_shapes.yaml \
        --dataset shapes_val_panoptic --output output/hierarchy --num-images 3 \
        --opts MODEL.WEIGHTS output/demo/model_final.pth    # the model `make demo` trains

``--register my_datasets.py`` makes your own datasets available (docs/custom_datasets.md).

Writes ``<output>/<image>_hierarchy.png`` for the first ``--num-images`` images of the split (cluster
boundaries per level, ground truth, leaking pixels in red, prediction) and prints the undersegmentation
error / achievable segmentation accuracy of the hard clusters per level over ``--num-eval-images``
images (default: the whole split). The same numbers come out of ``train_net.py --eval-only`` with
``MODEL.HCFORMER.CLUSTERING_EVAL True``.
"""
import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from hierseg_d2.checkpoint import HierSegCheckpointer
from hierseg_d2.config import load_config
from hierseg_d2.data.datasets import add_register_argument
from hierseg_d2.utils.hierarchy_vis import write_hierarchy_report


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", default=None, help="registered dataset name (default: DATASETS.TEST[0])")
    parser.add_argument("--output", default="output/hierarchy", help="directory for the PNG strips")
    parser.add_argument("--num-images", type=int, default=3, help="how many strips to write")
    parser.add_argument("--num-eval-images", type=int, default=None, help="images to evaluate (default: all)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return add_register_argument(parser)


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="hierseg_d2")
    cfg = load_config(args.config_file, args.opts, register=args.register)
    cfg.freeze()
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None)
    if dataset is None:
        raise ValueError("no --dataset given and DATASETS.TEST is empty")
    model = build_model(cfg)
    HierSegCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)  # safe loading
    results = write_hierarchy_report(cfg, model, dataset, args.output, args.num_images, args.num_eval_images)
    with open(os.path.join(args.output, "clustering_quality.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
