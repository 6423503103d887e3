#!/usr/bin/env python
"""`make demo`: train a small HCFormer on the embedded shapes dataset on the CPU, evaluate and visualise.

    python demo/run_demo.py                       # ~10-15 min on 2 CPU cores
    python demo/run_demo.py --max-iter 100        # a quick trial
    python demo/run_demo.py --retrain OPTS ...    # ignore a finished run in the output directory

1. generates the shapes dataset under $DETECTRON2_DATASETS (default ./datasets) if it is missing;
2. trains ``configs/shapes/hcformer_R18_s16_shapes.yaml`` with train_net.py's Trainer (Detectron2's
   DefaultTrainer: ETA and losses logged every 20 iterations), from scratch;
3. evaluates on ``shapes_val_panoptic_with_sem_seg`` with Detectron2's COCOPanopticEvaluator (PQ),
   COCOEvaluator (mask AP) and SemSegEvaluator (mIoU);
4. writes ``<output>/vis/<image>.png`` (image | ground truth | prediction, Detectron2's Visualizer) and
   ``<output>/hierarchy/<image>_hierarchy.png`` (HCFormer's clusters per level), and prints where they are.

A second run finds the finished checkpoint in the output directory and only evaluates and visualises.
"""
import argparse
import logging
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "shapes", "hcformer_R18_s16_shapes.yaml")
DEFAULT_OUTPUT = os.path.join(ROOT, "output", "demo")
DATASET = "shapes_val_panoptic_with_sem_seg"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="output directory (checkpoints, logs, images)")
    parser.add_argument("--max-iter", type=int, default=None, help="override SOLVER.MAX_ITER")
    parser.add_argument("--num-vis", type=int, default=8, help="validation images to visualise")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--retrain", action="store_true", help="train even if the output has a finished run")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def build_cfg(args):
    from detectron2.config import get_cfg

    from hierseg_d2.config import add_hierseg_config

    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if args.max_iter is not None:
        cfg.SOLVER.MAX_ITER = args.max_iter
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.AMP.ENABLED = False
    cfg.OUTPUT_DIR = args.output
    cfg.DATASETS.TEST = (DATASET,)
    cfg.freeze()
    return cfg


def summary_table(results) -> str:
    from tabulate import tabulate

    pan, segm, sem = results.get("panoptic_seg", {}), results.get("segm", {}), results.get("sem_seg", {})
    row = [pan.get(k, float("nan")) for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")]
    row += [segm.get("AP", float("nan")), segm.get("AP50", float("nan")), sem.get("mIoU", float("nan"))]
    headers = ["PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mask AP", "AP50", "mIoU"]
    return tabulate([row], headers=headers, tablefmt="pipe", floatfmt=".2f")


def _with_title(panel, title: str):
    """The panel under a white band with ``title``."""
    import cv2
    import numpy as np

    band = np.full((24, panel.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(band, title, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, panel], axis=0)


def write_visualizations(cfg, model, output_dir: str, num_images: int):
    """image | ground truth | prediction for the first ``num_images`` validation images."""
    import cv2
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
    from detectron2.data.detection_utils import read_image

    from hierseg_d2.data.dataset_mappers import build_mapper
    from hierseg_d2.utils.hierarchy_vis import draw_ground_truth, draw_predictions, display_scale

    os.makedirs(output_dir, exist_ok=True)
    metadata = MetadataCatalog.get(DATASET)
    records = {r["file_name"]: r for r in DatasetCatalog.get(DATASET)}
    loader = build_detection_test_loader(cfg, DATASET, mapper=build_mapper(cfg, False))
    written = []
    model.eval()
    with torch.no_grad():
        for inputs in loader:
            for inp, out in zip(inputs, model(inputs)):
                image = read_image(inp["file_name"], format="RGB")
                scale = display_scale(*image.shape[:2])  # shapes images are small: enlarge for reading
                panels = [cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST),
                          draw_ground_truth(image, records[inp["file_name"]], metadata, scale=scale),
                          draw_predictions(image, out, metadata, scale=scale)]
                h = min(p.shape[0] for p in panels)
                panels = [_with_title(p[:h], t) for p, t in zip(panels, ("image", "ground truth", "prediction"))]
                gap = np.full((panels[0].shape[0], 6, 3), 255, dtype=np.uint8)
                row = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
                name = os.path.splitext(os.path.basename(inp["file_name"]))[0]
                path = os.path.join(output_dir, f"{name}.png")
                cv2.imwrite(path, row[:, :, ::-1])
                written.append(path)
            if len(written) >= num_images:
                break
    return written


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    import torch
    from detectron2.utils.logger import setup_logger

    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logger(output=args.output, name="detectron2")
    setup_logger(output=args.output, name="hierseg_d2")
    logger = logging.getLogger("hierseg_d2.demo")

    from hierseg_d2.data.datasets import datasets_root, ensure_shapes_dataset

    root = datasets_root()
    print(f"[demo] shapes dataset under {root} (generated on first use)")
    ensure_shapes_dataset(root)

    from hierseg_d2.checkpoint import HierSegCheckpointer
    from hierseg_d2.engine import Trainer

    cfg = build_cfg(args)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)  # as default_setup: init and data order follow cfg.SEED
    config_path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    final_path = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    previous = open(config_path).read() if os.path.exists(config_path) else None
    # a finished run counts only if it was trained with exactly this config
    finished = os.path.exists(final_path) and previous == cfg.dump()
    if os.path.exists(final_path) and not finished:
        print(f"[demo] {final_path} was trained with another config: training again")
    with open(config_path, "w") as f:
        f.write(cfg.dump())
    if finished and not args.retrain:
        print(f"[demo] found {cfg.OUTPUT_DIR}/model_final.pth: evaluating it (use --retrain to train again)")
        model = Trainer.build_model(cfg)
        HierSegCheckpointer.from_config(cfg, model, save_dir=cfg.OUTPUT_DIR).load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
        results = Trainer.test(cfg, model)
        train_time = 0.0
    else:
        print(f"[demo] training {os.path.relpath(args.config_file, ROOT)} for {cfg.SOLVER.MAX_ITER} iterations "
              f"on the CPU ({torch.get_num_threads()} threads); Detectron2 logs the ETA every 20 iterations")
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        t0 = time.time()
        trainer.train()  # evaluates DATASETS.TEST at the end (EvalHook)
        train_time = time.time() - t0
        model = trainer.model
        results = trainer._last_eval_results

    vis = write_visualizations(cfg, model, os.path.join(cfg.OUTPUT_DIR, "vis"), args.num_vis)
    from hierseg_d2.utils.hierarchy_vis import write_hierarchy_report

    write_hierarchy_report(cfg, model, DATASET, os.path.join(cfg.OUTPUT_DIR, "hierarchy"), num_images=3)

    total = time.time() - start
    print(f"\n[demo] {DATASET}: HCFormer ({os.path.basename(args.config_file)}) after {cfg.SOLVER.MAX_ITER} "
          f"iterations\n" + summary_table(results))
    print(f"[demo] training {train_time / 60:.1f} min, total {total / 60:.1f} min")
    print(f"[demo] predictions next to ground truth: {os.path.dirname(vis[0]) if vis else '(none)'}/ "
          f"({len(vis)} images: image | ground truth | prediction)")
    print(f"[demo] hierarchy strips: {os.path.join(cfg.OUTPUT_DIR, 'hierarchy')}/ ; log: "
          f"{os.path.join(cfg.OUTPUT_DIR, 'log.txt')}")
    logger.info(f"demo results: {results}")
    return results


if __name__ == "__main__":
    main()
