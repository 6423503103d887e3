#!/usr/bin/env python
"""How much can a config's *backbone* learn in a given number of iterations? A learnability yardstick.

Trains the backbone of ``--config-file`` with a plain per-pixel classifier instead of HCFormer's head
(3x3 conv + ReLU + 1x1 conv to the classes on ``--feature``, upsampled bilinearly, cross-entropy on
the semantic labels the configured mapper produces), with the same data, crops, batch, optimizer
(``hierseg_d2.solver``) and schedule, then evaluates mIoU with Detectron2's SemSegEvaluator on
``DATASETS.TEST`` (and on the training split with ``--eval-train``).

Why: when a short from-scratch run of HCFormer classifies badly, this separates "the set-prediction
head learns slowly" from "this backbone cannot tell the classes apart yet in this budget" (the second
caps the first: a per-pixel head is the easiest way to read classes off the features).

    python tools/per_pixel_baseline.py --config-file configs/shapes/hcformer_R18_s16_shapes.yaml \
        --iters 2000 --eval-train [KEY VALUE ...]
"""
import argparse
import logging
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PerPixelBaseline", "train_and_evaluate", "main"]

logger = logging.getLogger("hierseg_d2.per_pixel_baseline")


class PerPixelBaseline(nn.Module):
    """Backbone + per-pixel classifier on one feature map, in Detectron2's model interface
    (list of dicts in; losses in training, ``[{"sem_seg": (K, H, W) scores}]`` at inference)."""

    def __init__(self, cfg, feature: str):
        super().__init__()
        from detectron2.modeling import build_backbone

        self.backbone = build_backbone(cfg)
        shapes = self.backbone.output_shape()
        if feature not in shapes:
            raise KeyError(f"--feature {feature!r} is not an output of {cfg.MODEL.BACKBONE.NAME}: {sorted(shapes)}")
        self.feature = feature
        self.ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.size_divisibility = max(self.backbone.size_divisibility, cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY, 1)
        self.predictor = nn.Sequential(nn.Conv2d(shapes[feature].channels, 128, 3, padding=1), nn.ReLU(inplace=True),
                                       nn.Conv2d(128, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 1))
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    def forward(self, batched_inputs):
        from detectron2.modeling.postprocessing import sem_seg_postprocess
        from detectron2.structures import ImageList

        device = self.pixel_mean.device
        images = ImageList.from_tensors([(x["image"].to(device).float() - self.pixel_mean) / self.pixel_std
                                         for x in batched_inputs], self.size_divisibility)
        logits = self.predictor(self.backbone(images.tensor)[self.feature])
        logits = F.interpolate(logits, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        if self.training:
            targets = ImageList.from_tensors([x["sem_seg"].to(device) for x in batched_inputs], self.size_divisibility,
                                             pad_value=self.ignore_value).tensor
            return {"loss_sem_seg": F.cross_entropy(logits, targets, ignore_index=self.ignore_value)}
        return [{"sem_seg": sem_seg_postprocess(score, size, x.get("height", size[0]), x.get("width", size[1]))}
                for score, size, x in zip(logits, images.image_sizes, batched_inputs)]


def _evaluate(cfg, model, dataset_name: str):
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import SemSegEvaluator, inference_on_dataset

    from hierseg_d2.data.dataset_mappers import build_mapper

    loader = build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))
    return inference_on_dataset(model, loader, SemSegEvaluator(dataset_name, distributed=False))["sem_seg"]


def train_and_evaluate(cfg, feature: str, iters: int, eval_train: bool = False):
    """Train ``iters`` steps on DATASETS.TRAIN[0], evaluate; returns {split name: SemSegEvaluator results}."""
    from detectron2.data import build_detection_train_loader
    from detectron2.utils.events import EventStorage

    from hierseg_d2.data.dataset_mappers import build_mapper
    from hierseg_d2.solver import build_lr_scheduler, build_optimizer

    model = PerPixelBaseline(cfg, feature).to(cfg.MODEL.DEVICE)
    model.train()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    loader = build_detection_train_loader(cfg, mapper=build_mapper(cfg, True))
    start = time.perf_counter()
    with EventStorage(0) as storage:
        for step, batch in zip(range(iters), loader):
            storage.iter = step
            loss = model(batch)["loss_sem_seg"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % 100 == 0 or step == iters - 1:
                logger.info(f"iter {step}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s")
    model.eval()
    names = list(cfg.DATASETS.TEST)
    if eval_train:
        train = cfg.DATASETS.TRAIN[0]
        # a panoptic training set is evaluated through its "_with_sem_seg" twin (Mask2Former's naming)
        if train.endswith("_panoptic"):
            train += "_with_sem_seg"
        names = [train] + names
    with torch.no_grad():
        return {name: _evaluate(cfg, model, name) for name in names}


def _class_table(results, metadata) -> str:
    from tabulate import tabulate

    classes = metadata.stuff_classes
    things = set(getattr(metadata, "thing_dataset_id_to_contiguous_id", {}).values())
    rows = []
    for name, res in results.items():
        ious = [res.get(f"IoU-{c}", float("nan")) for c in classes]
        th = [v for i, v in enumerate(ious) if i in things]
        st = [v for i, v in enumerate(ious) if i not in things]
        mean = (lambda v: sum(v) / len(v) if v else float("nan"))
        rows.append([name, res["mIoU"], mean(th), mean(st), res["pACC"]])
    return tabulate(rows, headers=["split", "mIoU", "mIoU things", "mIoU stuff", "pACC"], tablefmt="pipe",
                    floatfmt=".1f")


def main(argv=None):
    from hierseg_d2.data.datasets import add_register_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--feature", default=None, help="backbone output read by the classifier "
                        "(default: MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE)")
    parser.add_argument("--iters", type=int, default=None, help="training steps (default: SOLVER.MAX_ITER)")
    parser.add_argument("--eval-train", action="store_true", help="also evaluate on the training split")
    add_register_argument(parser)
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    from detectron2.data import MetadataCatalog
    from detectron2.utils.logger import setup_logger

    from hierseg_d2.config import load_config

    setup_logger(name="hierseg_d2")
    cfg = load_config(args.config_file, args.opts, register=args.register)
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu" if not torch.cuda.is_available() else cfg.MODEL.DEVICE
    if args.iters is not None:
        cfg.SOLVER.MAX_ITER = args.iters
    cfg.freeze()
    feature = args.feature or cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
    start = time.perf_counter()
    results = train_and_evaluate(cfg, feature, cfg.SOLVER.MAX_ITER, args.eval_train)
    print(f"per-pixel baseline: {cfg.MODEL.BACKBONE.NAME} on {feature}, {cfg.SOLVER.MAX_ITER} iterations, "
          f"{time.perf_counter() - start:.0f} s")
    print(_class_table(results, MetadataCatalog.get(cfg.DATASETS.TEST[0])))
    return results


if __name__ == "__main__":
    main()
