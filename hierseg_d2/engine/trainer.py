"""Detectron2 ``DefaultTrainer`` for hierseg_d2 (Mask2Former's train_net.py Trainer, in the package).

Data: the MaskFormer-family mapper chosen by ``INPUT.DATASET_MAPPER_NAME`` (``hierseg_d2.data``);
evaluation: the evaluator of the dataset's ``evaluator_type`` (``hierseg_d2.evaluation``), plus the
clustering-quality evaluator when ``MODEL.HCFORMER.CLUSTERING_EVAL`` is on; optimisation:
:mod:`hierseg_d2.solver`.
"""
import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.engine import default_setup, hooks
from detectron2.evaluation import CityscapesSemSegEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils.env import seed_all_rng
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .. import solver
from ..checkpoint import HierSegCheckpointer
from ..config import add_hierseg_config
from ..data.dataset_mappers import build_mapper
from ..evaluation.build import build_evaluator
from . import reliability

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
        # losses checked before the backward pass (+ optional divergence guard), see engine/reliability.py
        self.loss_guard = reliability.LossGuard(cfg.SOLVER.DIVERGENCE_FACTOR, cfg.SOLVER.DIVERGENCE_WINDOW)
        model.register_forward_hook(self.loss_guard)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = HierSegCheckpointer.from_config(cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model with the finite checks on the backbone input and the head outputs."""
        return reliability.install_finite_checks(super().build_model(cfg))

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's training data (same dataset dicts, index stream and aspect-ratio grouping) through a
        resumable batch sampler and per-sample seeded augmentations, for an exact resume (see
        :mod:`hierseg_d2.engine.reliability`); skipped samples are recorded for the end-of-run summary."""
        from detectron2.data.build import _train_loader_from_config, worker_init_reset_seed
        from detectron2.data.common import DatasetFromList, ToIterableDataset

        mapper = build_mapper(cfg, True)
        mapper.record_dir = cls.skipped_record_dir(cfg)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":  # e.g. repeat-factor sampling: Detectron2's
            logging.getLogger(__name__).warning(
                f"DATALOADER.SAMPLER_TRAIN = {cfg.DATALOADER.SAMPLER_TRAIN}: Detectron2's loader, --resume restarts "
                "the data stream (exact resume needs TrainingSampler)")
            from detectron2.data import build_detection_train_loader

            return build_detection_train_loader(cfg, mapper=mapper)
        kw = _train_loader_from_config(cfg, mapper=mapper, sampler=None)
        dicts = kw["dataset"]
        world = comm.get_world_size()
        if kw["total_batch_size"] % world:
            raise ValueError(f"SOLVER.IMS_PER_BATCH = {kw['total_batch_size']} is not divisible by the {world} processes")
        landscape = None
        if kw["aspect_ratio_grouping"] and all("width" in d and "height" in d for d in dicts):
            landscape = [d["width"] > d["height"] for d in dicts]
        sampler = reliability.ResumableTrainingSampler(len(dicts), kw["total_batch_size"] // world, landscape)
        dataset = reliability.PositionSeededMapDataset(DatasetFromList(dicts, copy=False), mapper, sampler.seed)
        # one item = one batch; the workers take whole batches in turn, so the order is the sampler's
        loader = torch.utils.data.DataLoader(
            ToIterableDataset(dataset, sampler, shard_chunk_size=1), batch_size=None,
            num_workers=kw["num_workers"], collate_fn=reliability.unbatched, worker_init_fn=worker_init_reset_seed)
        loader.resumable_sampler, loader.positioned_dataset = sampler, dataset  # for (load_)state_dict
        return loader

    @staticmethod
    def skipped_record_dir(cfg):
        return os.path.join(cfg.OUTPUT_DIR, "skipped_samples", f"rank{comm.get_rank()}") if cfg.OUTPUT_DIR else None

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

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Semantic segmentation with test-time augmentation (``TEST.AUG.*``, see
        :mod:`hierseg_d2.test_time_augmentation`) on ``DATASETS.TEST``; results under "<task>_TTA", predictions
        in ``OUTPUT_DIR/inference_TTA/<dataset>``. Only semantic outputs are augmented, so only the mIoU
        evaluator runs (as in Mask2Former)."""
        from ..test_time_augmentation import SemanticSegmentorWithTTA

        logging.getLogger("detectron2.trainer").info("Running inference with test-time augmentation ...")
        sem_cfg = cfg.clone()
        sem_cfg.defrost()
        sem_cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
        sem_cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
        sem_cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
        sem_cfg.MODEL.HCFORMER.CLUSTERING_EVAL = False
        sem_cfg.freeze()
        evaluators = []
        for name in cfg.DATASETS.TEST:
            evaluator = cls.build_evaluator(sem_cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
            parts = evaluator._evaluators if isinstance(evaluator, DatasetEvaluators) else [evaluator]
            if not all(isinstance(e, (SemSegEvaluator, CityscapesSemSegEvaluator)) for e in parts):
                raise ValueError(f"TEST.AUG.ENABLED: test-time augmentation is for semantic segmentation; dataset "
                                 f"{name!r} is evaluated with {[type(e).__name__ for e in parts]} (use a sem_seg "
                                 "or *_panoptic_with_sem_seg dataset)")
            evaluators.append(evaluator)
        res = cls.test(cfg, SemanticSegmentorWithTTA(cfg, model), evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())

    # ---------------- reliability (engine/reliability.py) ----------------
    def build_hooks(self):
        """Detectron2's hooks, with the buffer synchronisation of the ranks before the checkpointer."""
        ret = super().build_hooks()
        at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer)), len(ret))
        ret.insert(at, reliability.SyncBuffers([self.cfg.SOLVER.CHECKPOINT_PERIOD, self.cfg.TEST.EVAL_PERIOD]))
        return ret

    def run_step(self):
        # the main process's RNGs (point sampling, dropout) seeded from the iteration: exact resume
        if self.cfg.SEED >= 0:
            self._trainer._data_loader_iter  # created first: its seed draw must not shift this iteration's
            seed_all_rng(reliability.iteration_seed(self.cfg.SEED, self.iter, comm.get_rank()))
        self.loss_guard.iteration = self.iter
        try:
            super().run_step()
        except FloatingPointError as e:
            msg = str(e)
            raise FloatingPointError(msg if msg.startswith("iteration") else f"iteration {self.iter}: {msg}") from None

    def _sampler(self):
        return getattr(self._trainer.data_loader, "resumable_sampler", None)

    def state_dict(self):
        ret = super().state_dict()
        sampler = self._sampler()
        if sampler is not None:  # where the data stream is, for an exact resume
            ret["data_stream"] = {"seed": sampler.seed}
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        sampler, stream = self._sampler(), state_dict.get("data_stream")
        if sampler is not None and stream is not None:
            sampler.set_state(stream["seed"], self.iter + 1)  # one batch per finished iteration
            self._trainer.data_loader.positioned_dataset.seed = stream["seed"]
            logging.getLogger(__name__).info(f"data stream resumes after {self.iter + 1} batches (seed {stream['seed']})")

    def train(self):
        record = self.skipped_record_dir(self.cfg)
        if record and os.path.isdir(record):  # count this run's skips only
            for f in os.listdir(record):
                os.remove(os.path.join(record, f))
        try:
            ret = super().train()
        except Exception:
            # collective summary only when alone: a crashed rank must exit, not wait for the others
            if record and comm.get_world_size() == 1:
                self.skipped_summary = reliability.summarize_skipped(record)
            raise
        if record:
            comm.synchronize()
            self.skipped_summary = reliability.summarize_skipped(record)
        return ret


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
