"""Detectron2 ``DefaultTrainer`` for hierseg_d2 (Mask2Former's train_net.py Trainer, in the package).

Data: the MaskFormer-family mapper chosen by ``INPUT.DATASET_MAPPER_NAME`` (``hierseg_d2.data``);
evaluation: the evaluator of the dataset's ``evaluator_type`` (``hierseg_d2.evaluation``), plus the
clustering-quality evaluator when ``MODEL.HCFORMER.CLUSTERING_EVAL`` is on; optimisation:
:mod:`hierseg_d2.solver`.
"""
import logging
import os
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .. import solver
from ..config import add_hierseg_config
from ..data.dataset_mappers import build_mapper
from ..evaluation.build import build_evaluator

__all__ = ["Trainer", "setup_cfg"]


class Trainer(DefaultTrainer):
    """DefaultTrainer with the MaskFormer-family data pipeline, per-dataset evaluators, AdamW with backbone
    multiplier / no decay on norms and embeddings / full-model clipping, and step or poly schedules."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, except for the DDP wrapper: Detectron2 passes device_ids=[local_rank],
        # which DistributedDataParallel rejects for CPU modules; CPU runs (gloo) must pass None.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):  # setup_logger is not called for d2
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        on_cpu = next(model.parameters()).device.type == "cpu"
        model = create_ddp_model(model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {}))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_mapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """Detectron2's evaluator(s) for the dataset's ``evaluator_type`` (+ clustering quality if enabled)."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return solver.build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return solver.build_lr_scheduler(cfg, optimizer)


def _setup_datasets(cfg, args):
    """Import ``--register`` / DATASETS.REGISTER (in every process: Detectron2's launch spawns workers that
    run this setup again) and check NUM_CLASSES against the datasets."""
    from ..data.datasets import setup_datasets

    setup_datasets(cfg, getattr(args, "register", None) or ())


def setup_cfg(args):
    """Config from ``args.config_file`` + ``args.opts`` on top of Detectron2's and hierseg_d2's defaults,
    frozen, with Detectron2's default_setup (output dir, logging, seeding)."""
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    _setup_datasets(cfg, args)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE != "cpu":
        logging.getLogger(__name__).warning(f"MODEL.DEVICE = {cfg.MODEL.DEVICE!r} but no GPU is available: using cpu")
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        # Detectron2's AMPTrainer is CUDA-only
        logging.getLogger(__name__).warning("SOLVER.AMP.ENABLED needs a GPU: training in fp32 on the cpu")
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="hierseg_d2")
    return cfg
