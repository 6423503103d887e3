#!/usr/bin/env python
"""PQ / SQ / RQ (and PQ-stuff) of semantic segmentation predictions, as the papers report for ADE20K.

    python tools/evaluate_pq_for_semantic_segmentation.py --dataset-name ade20k_sem_seg_val \
        --json-file OUTPUT_DIR/inference/sem_seg_predictions.json

Reads the ``sem_seg_predictions.json`` a SemSegEvaluator run writes (``train_net.py --eval-only``; one entry
per image and predicted class: {"file_name", "category_id", "segmentation": RLE}) and the ground-truth label
PNGs of ``--dataset-name`` (any registered dataset whose records have ``sem_seg_file_name``; images are
matched by their ``file_name``). As in the release's tool, every class present in an image is one segment,
both in the ground truth and in the prediction, and PQ is computed as COCO panoptic PQ (panopticapi's
rules): a predicted and a ground-truth segment of the same class match when IoU > 0.5, where the IoU
leaves out the predicted pixels on ignored ground truth (``ignore_label``); an unmatched predicted segment
lying more than half on ignored pixels is not a false positive. Every class is a "stuff" class, so PQ-stuff
equals PQ (the release prints both rows). Categories are averaged over the classes that appear in the
ground truth or the predictions of the evaluated images. The mIoU of the same predictions is printed too.

Release vs this tool: the release initialises the prediction map with class 0, so pixels no RLE covers
count as class 0; here they are "no prediction" (in no predicted segment). SemSegEvaluator's json covers
every pixel, so both give the same numbers on its output. The release hard-codes three datasets and their
folders; here any registered semantic dataset works (names are checked against the DatasetCatalog).
"""
import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

__all__ = ["segment_stats", "pq_from_stats", "evaluate", "main"]


def segment_stats(gt: np.ndarray, pred: np.ndarray, ignore_label: int, stats: Optional[Dict] = None) -> Dict:
    """Add one image's per-class counts to ``stats`` {class: [tp, fp, fn, sum of matched IoU]}.

    ``gt``: HxW class ids, ``ignore_label`` = void; ``pred``: HxW class ids, negative = no prediction.
    """
    stats = defaultdict(lambda: [0, 0, 0, 0.0]) if stats is None else stats
    void = gt == ignore_label
    gt_classes = [int(c) for c in np.unique(gt[~void])]
    pred_classes = [int(c) for c in np.unique(pred[pred >= 0])]
    matched_pred = set()
    for c in gt_classes:
        g = gt == c
        if c in pred_classes:
            p = pred == c
            inter = int(np.count_nonzero(g & p))
            union = int(np.count_nonzero(p)) + int(np.count_nonzero(g)) - inter - int(np.count_nonzero(p & void))
            iou = inter / union
            if iou > 0.5:
                stats[c][0] += 1
                stats[c][3] += iou
                matched_pred.add(c)
                continue
        stats[c][2] += 1  # false negative
    for c in pred_classes:
        if c in matched_pred:
            continue
        p = pred == c
        if np.count_nonzero(p & void) / np.count_nonzero(p) > 0.5:  # mostly on ignored pixels: not counted
            continue
        stats[c][1] += 1  # false positive
    return stats


def pq_from_stats(stats: Dict, classes: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """PQ, SQ, RQ (x100) averaged over ``classes`` (default: all) with tp + fp + fn > 0, and their number."""
    pq = sq = rq = 0.0
    n = 0
    for c in (stats if classes is None else classes):
        tp, fp, fn, iou = stats.get(c, (0, 0, 0, 0.0))
        if tp + fp + fn == 0:
            continue
        n += 1
        if tp:
            pq += iou / (tp + 0.5 * fp + 0.5 * fn)
            sq += iou / tp
            rq += tp / (tp + 0.5 * fp + 0.5 * fn)
    if n == 0:
        return {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "N": 0}
    return {"PQ": 100 * pq / n, "SQ": 100 * sq / n, "RQ": 100 * rq / n, "N": n}


def _load_predictions(json_file: str) -> Dict[str, List[dict]]:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"--json-file {json_file!r} does not exist (it is written by a SemSegEvaluator run "
                                "as OUTPUT_DIR/inference/<dataset>/sem_seg_predictions.json)")
    try:
        with open(json_file) as f:
            predictions = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file}: not a json file ({e})") from None
    if not isinstance(predictions, list):
        raise ValueError(f"{json_file}: expected a list of sem_seg predictions, got {type(predictions).__name__}")
    per_image = defaultdict(list)
    for i, p in enumerate(predictions):
        if not isinstance(p, dict) or not {"file_name", "category_id", "segmentation"} <= set(p):
            raise ValueError(f"{json_file}: entry {i} is not a sem_seg prediction (needs file_name, category_id and "
                             f"segmentation): {str(p)[:120]}")
        per_image[p["file_name"]].append(p)
    return per_image


def evaluate(dataset_name: str, json_file: str, verbose: bool = True) -> Dict:
    """{"All": {PQ, SQ, RQ, N}, "Stuff": ..., "mIoU": ..., "per_class": {name: {PQ, SQ, RQ}}, "num_images"}."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image
    from pycocotools import mask as mask_util

    import hierseg_d2  # noqa: F401  (registers the project's datasets)

    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"--dataset-name {dataset_name!r} is not a registered dataset; semantic ones: "
                       f"{sorted(n for n in DatasetCatalog.list() if 'sem_seg' in n)}")
    meta = MetadataCatalog.get(dataset_name)
    if not meta.get("stuff_classes", None):
        raise KeyError(f"dataset {dataset_name!r} has no stuff_classes: not a semantic segmentation dataset")
    records = DatasetCatalog.get(dataset_name)
    gt_files = {r["file_name"]: r.get("sem_seg_file_name") for r in records}
    if not any(gt_files.values()):
        raise KeyError(f"dataset {dataset_name!r} has no sem_seg_file_name in its records")
    by_basename = {os.path.basename(k): k for k in gt_files}
    names = list(meta.stuff_classes)
    num_classes = len(names)
    ignore = meta.get("ignore_label", 255)
    to_contiguous = meta.get("stuff_dataset_id_to_contiguous_id", None)

    predictions = _load_predictions(json_file)
    stats = defaultdict(lambda: [0, 0, 0, 0.0])
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    unknown = [f for f in predictions if f not in gt_files and os.path.basename(f) not in by_basename]
    if unknown:
        raise KeyError(f"{json_file}: {len(unknown)} predicted images are not in dataset {dataset_name!r}, "
                       f"e.g. {unknown[0]!r}")
    for file_name, anns in predictions.items():
        key = file_name if file_name in gt_files else by_basename[os.path.basename(file_name)]
        gt_file = gt_files[key]
        if not gt_file or not os.path.isfile(gt_file):
            raise FileNotFoundError(f"ground truth {gt_file!r} of {key!r} does not exist")
        gt = np.array(Image.open(gt_file), dtype=np.int64)
        pred = np.full(gt.shape, -1, dtype=np.int64)
        for ann in anns:
            cat = ann["category_id"]
            c = to_contiguous.get(cat) if to_contiguous is not None else cat
            if c is None or not 0 <= c < num_classes:
                raise KeyError(f"{json_file}: {file_name!r} has category_id {cat!r}, not a class of {dataset_name!r}")
            mask = mask_util.decode(ann["segmentation"])
            if mask.shape != gt.shape:
                raise ValueError(f"{json_file}: the mask of {file_name!r} is {mask.shape}, its ground truth "
                                 f"{gt_file} is {gt.shape}")
            pred[mask > 0] = c
        segment_stats(gt, pred, ignore, stats)
        g = np.where(gt == ignore, num_classes, gt)
        p = np.where(pred < 0, num_classes, pred)
        conf += np.bincount((num_classes + 1) * p[gt != ignore] + g[gt != ignore],
                            minlength=conf.size).reshape(conf.shape)
    missing = len(gt_files) - len(predictions)
    results = {"All": pq_from_stats(stats), "num_images": len(predictions)}
    results["Stuff"] = dict(results["All"])  # every class of a semantic dataset is stuff
    tp = np.diag(conf)[:-1].astype(np.float64)
    pos_gt = conf[:, :-1].sum(axis=0).astype(np.float64)  # rows: prediction, columns: ground truth
    pos_pred = conf[:-1, :].sum(axis=1).astype(np.float64)
    present, seen = pos_gt > 0, pos_gt + pos_pred > 0
    union = pos_gt + pos_pred - tp
    # SemSegEvaluator's mean: classes predicted but absent from the ground truth count as IoU 0
    results["mIoU"] = float(100 * np.sum(tp[present] / union[present]) / seen.sum()) if seen.any() else float("nan")
    results["per_class"] = {names[c]: pq_from_stats(stats, [c]) for c in sorted(stats)}
    if verbose:
        if missing > 0:
            print(f"warning: {missing} images of {dataset_name} have no prediction in {json_file} (not evaluated)")
        print(f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}")
        print("-" * 38)
        for row in ("All", "Stuff"):
            r = results[row]
            print(f"{row:10s}| {r['PQ']:5.1f}  {r['SQ']:5.1f}  {r['RQ']:5.1f} {r['N']:5d}")
        print(f"\nmIoU: {results['mIoU']:.2f} ({len(predictions)} images)")
    return results


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-name", default="ade20k_sem_seg_val",
                        help="registered semantic segmentation dataset the predictions are of")
    parser.add_argument("--json-file", required=True, help="sem_seg_predictions.json of a SemSegEvaluator run")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    return evaluate(args.dataset_name, args.json_file)


if __name__ == "__main__":
    main()
