#!/usr/bin/env python
"""Train / evaluate hierseg_d2 models (HCFormer, ...) with Detectron2 — as Mask2Former's train_net.py.

    python train_net.py --config-file configs/coco/panoptic-segmentation/hcformer_R50_bs16_50ep.yaml \
        --num-gpus 8 [OPTS ...]
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS /path/to/model_final.pth
    python train_net.py --config-file <cfg> --resume          # continue from OUTPUT_DIR/last_checkpoint
    python train_net.py --register my_datasets.py --config-file <cfg> DATASETS.TRAIN '("mydata_train_panoptic",)'

``--register FILE_OR_MODULE`` (or the config key DATASETS.REGISTER) imports your dataset registrations
first, in every process (docs/custom_datasets.md).

The Trainer (data mappers, evaluators, AdamW + full-model clipping, step/poly schedules) lives in
``hierseg_d2.engine``. Without GPUs, ``--num-gpus N`` starts N CPU processes that train with gloo.
Checkpoints are read safely (tensors only; ``MODEL.WEIGHTS_TRUSTED True`` for trusted pickles) and must
match the model: docs/training.md, "Safety and reliability".
"""
import torch
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from hierseg_d2.checkpoint import HierSegCheckpointer
from hierseg_d2.data.datasets import add_register_argument
from hierseg_d2.engine import Trainer, setup_cfg


def main(args):
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # safe loading + match check (hierseg_d2/checkpoint.py)
        HierSegCheckpointer.from_config(cfg, model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:  # semantic segmentation with test-time augmentation, as Mask2Former
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run(args):
    """``main`` in each launched process, then an orderly shutdown of the process group: every rank waits
    for the others before closing its connections, so that no rank exits while a peer still uses them."""
    result = main(args)
    if comm.get_world_size() > 1:
        comm.synchronize()
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    args = add_register_argument(default_argument_parser()).parse_args()
    print("Command Line Args:", args)
    launch(
        run,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
