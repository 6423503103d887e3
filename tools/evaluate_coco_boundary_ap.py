#!/usr/bin/env python
"""Boundary AP of instance segmentation predictions (Cheng et al. 2021, "Boundary IoU"), as the release's
tools/evaluate_coco_boundary_ap.py, without the boundary-iou-api package.

    python tools/evaluate_coco_boundary_ap.py --gt-json-file datasets/coco/annotations/instances_val2017.json \
        --dt-json-file OUTPUT_DIR/inference/coco_instances_results.json
    python tools/evaluate_coco_boundary_ap.py --dataset-name coco_2017_val \
        --dt-json-file OUTPUT_DIR/inference/coco_instances_results.json

``--dt-json-file`` is the coco_instances_results.json a COCOEvaluator run writes (``train_net.py
--eval-only`` on an instance or panoptic dataset with MODEL.MASK_FORMER.TEST.INSTANCE_ON); ground truth is
a COCO instances json, given directly or as the ``json_file`` of a registered dataset. The IoU of each
detection / ground-truth pair is min(mask IoU, boundary IoU), the boundary region being the mask pixels
within ``--dilation-ratio`` (default 0.02) x image diagonal of the contour (hierseg_d2/evaluation/boundary.py);
``--iou-type segm`` gives plain mask AP with the same code for comparison.
"""
import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gt = parser.add_mutually_exclusive_group(required=True)
    gt.add_argument("--gt-json-file", help="COCO instances ground truth json")
    gt.add_argument("--dataset-name", help="registered dataset whose metadata json_file is the ground truth")
    parser.add_argument("--dt-json-file", required=True, help="COCO results json (coco_instances_results.json)")
    parser.add_argument("--iou-type", default="boundary", choices=["boundary", "segm"])
    parser.add_argument("--dilation-ratio", default=0.02, type=float,
                        help="boundary width as a fraction of the image diagonal (Cheng et al.: 0.02)")
    return parser


def gt_json_of(dataset_name: str) -> str:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import hierseg_d2  # noqa: F401  (registers the project's datasets)

    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"--dataset-name {dataset_name!r} is not a registered dataset; instance ones: "
                       f"{sorted(n for n in DatasetCatalog.list() if 'instance' in n or n.startswith('coco_2017'))}")
    json_file = MetadataCatalog.get(dataset_name).get("json_file", None)
    if not json_file:
        raise KeyError(f"dataset {dataset_name!r} has no COCO instances json_file in its metadata")
    if not os.path.isfile(json_file):
        DatasetCatalog.get(dataset_name)  # generated datasets (shapes) are written on first load
    return json_file


def load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a json file ({e})") from None


def main(argv=None):
    args = get_parser().parse_args(argv)
    if not 0 < args.dilation_ratio < 1:
        raise ValueError(f"--dilation-ratio must be in (0, 1), got {args.dilation_ratio}")
    from pycocotools.coco import COCO

    from hierseg_d2.evaluation.boundary import BOUNDARY_AP_METRICS, evaluate_boundary_ap

    gt_file = args.gt_json_file or gt_json_of(args.dataset_name)
    gt = load_json(gt_file, "ground truth json")
    if not isinstance(gt, dict) or not {"images", "annotations", "categories"} <= set(gt):
        raise ValueError(f"{gt_file}: not a COCO instances json (needs images, annotations and categories)")
    dt = load_json(args.dt_json_file, "--dt-json-file")
    if not isinstance(dt, list) or not all(isinstance(d, dict) and {"image_id", "category_id", "segmentation",
                                                                    "score"} <= set(d) for d in dt):
        raise ValueError(f"{args.dt_json_file}: expected a list of COCO results with image_id, category_id, "
                         "segmentation and score (coco_instances_results.json)")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
    unknown_img = sorted({d["image_id"] for d in dt} - set(coco_gt.getImgIds()))
    unknown_cat = sorted({d["category_id"] for d in dt} - set(coco_gt.getCatIds()))
    if unknown_img or unknown_cat:
        raise KeyError(f"{args.dt_json_file} does not match {gt_file}: "
                       + (f"image ids {unknown_img[:5]} " if unknown_img else "")
                       + (f"category ids {unknown_cat[:5]} " if unknown_cat else "") + "are not in the ground truth")
    if any(not isinstance(d["segmentation"], dict) for d in dt):
        raise ValueError(f"{args.dt_json_file}: segmentations must be RLEs (as COCOEvaluator writes them)")
    res = evaluate_boundary_ap(coco_gt, dt, args.dilation_ratio, iou_type=args.iou_type)
    print(" | ".join(f"{m} {res[m]:.2f}" for m in BOUNDARY_AP_METRICS))
    return res


if __name__ == "__main__":
    main()
