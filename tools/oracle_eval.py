#!/usr/bin/env python
"""Print the oracle evaluation tables of a dataset (by default the shapes dataset, generated if needed).

Ground truth of ``--dataset`` (default ``shapes_val_panoptic_with_sem_seg``) is fed as predictions (Detectron2's output
format) through :func:`hierseg_d2.evaluation.build_evaluator`, i.e. Detectron2's COCOPanopticEvaluator,
COCOEvaluator (segm) and SemSegEvaluator: PQ, mask AP and mIoU must be 100. A corrupted copy (every
prediction shifted by 3 px) shows the evaluators do measure something.

Usage:
    python tools/oracle_eval.py [--root $DETECTRON2_DATASETS] [--dataset shapes_val_panoptic_with_sem_seg]
    python tools/oracle_eval.py --register my_datasets.py --dataset mydata_val_panoptic_with_sem_seg

On your own dataset (docs/custom_datasets.md) PQ = mask AP = mIoU = 100 checks the registration: ids,
category order and file pairing.
"""

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

__all__ = ["oracle_eval", "main"]


def _summary_table(rows):
    from tabulate import tabulate

    headers = ["predictions", "PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mask AP", "AP50", "mIoU", "pACC"]
    data = []
    for name, res in rows:
        pan, segm, sem = res.get("panoptic_seg", {}), res.get("segm", {}), res.get("sem_seg", {})
        data.append(
            [name]
            + [pan.get(k, float("nan")) for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")]
            + [segm.get("AP", float("nan")), segm.get("AP50", float("nan"))]
            + [sem.get("mIoU", float("nan")), sem.get("pACC", float("nan"))]
        )
    return tabulate(data, headers=headers, tablefmt="pipe", floatfmt=".2f")


def oracle_eval(root=None, dataset_name: str = "shapes_val_panoptic_with_sem_seg", corrupted: bool = True,
                register=()):
    """Evaluate the oracle (and a corrupted oracle) on ``dataset_name``, print the tables and return
    ``{"ground truth": results, ...}``. ``root`` (default $DETECTRON2_DATASETS) is where the built-in
    datasets are (shapes is generated there on first use); ``register``: files / modules registering
    datasets (``--register``)."""
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog
    from detectron2.utils.logger import setup_logger

    from hierseg_d2 import add_hierseg_config
    from hierseg_d2.data.datasets import datasets_root, import_registrations, register_all_shapes
    from hierseg_d2.evaluation.oracle import run_oracle_evaluation

    setup_logger(name="hierseg_d2")
    logger = setup_logger(name="detectron2", abbrev_name="d2")
    # SemSegEvaluator logs every per-class number in one long line; the summary table below has mIoU
    logging.getLogger("detectron2.evaluation.sem_seg_evaluation").setLevel(logging.WARNING)
    root = root or datasets_root()
    start = time.perf_counter()
    register_all_shapes(root)  # (re-)register for this root; generation happens on first use
    import_registrations(register)
    if dataset_name not in MetadataCatalog.list():
        raise KeyError(f"dataset {dataset_name!r} is not registered (give the file registering it with --register)")

    cfg = get_cfg()
    add_hierseg_config(cfg)
    t = cfg.MODEL.MASK_FORMER.TEST
    t.PANOPTIC_ON, t.INSTANCE_ON, t.SEMANTIC_ON = True, True, True

    rows = []
    for name, corrupt in [("ground truth", False)] + ([("shifted by 3 px", True)] if corrupted else []):
        logger.info(f"Oracle evaluation on {dataset_name}: {name}")
        rows.append((name, run_oracle_evaluation(cfg, dataset_name, corrupt=corrupt)))
    where = MetadataCatalog.get(dataset_name).get("image_root", None) or root
    print(f"\nOracle evaluation on {dataset_name} ({time.perf_counter() - start:.1f} s, images in {where}):")
    print(_summary_table(rows))
    return dict(rows)


def main(argv=None):
    from hierseg_d2.data.datasets import add_register_argument

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)")
    parser.add_argument("--dataset", default="shapes_val_panoptic_with_sem_seg")
    parser.add_argument("--no-corrupted", action="store_true", help="skip the corrupted-oracle row")
    add_register_argument(parser)
    args = parser.parse_args(argv)
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    return oracle_eval(args.root, args.dataset, corrupted=not args.no_corrupted, register=args.register)


if __name__ == "__main__":
    main()
