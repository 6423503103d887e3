"""A few training iterations on the CPU: the "it trains" check every backbone's tests share."""
import logging
from typing import List

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from ..data.dataset_mappers import build_mapper
from ..engine.reliability import install_finite_checks
from ..solver import build_optimizer

__all__ = ["train_iterations"]

logger = logging.getLogger(__name__)


def train_iterations(cfg: CfgNode, num_iters: int) -> List[float]:
    """Build the model, the configured training mapper/loader and the package's optimizer from ``cfg`` and
    run ``num_iters`` steps on the CPU (constant ``SOLVER.BASE_LR``, no schedule); return the total loss of
    every step. Seeded by ``cfg.SEED`` when it is >= 0."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    if cfg.SEED >= 0:  # numpy too: the sampler and the augmentations draw from it
        seed_all_rng(cfg.SEED)
    model = install_finite_checks(build_model(cfg))  # NaN inputs/outputs: FloatingPointError, not a segfault
    model.train()
    optimizer = build_optimizer(cfg, model)
    loader = build_detection_train_loader(cfg, mapper=build_mapper(cfg, True))
    losses: List[float] = []
    with EventStorage(0) as storage:
        for step, batch in zip(range(num_iters), loader):
            storage.iter = step
            loss_dict = model(batch)
            total = sum(loss_dict.values())
            if not torch.isfinite(total):
                raise FloatingPointError(f"loss became {total.item()} at step {step}: "
                                         f"{ {k: float(v) for k, v in loss_dict.items()} }")
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            losses.append(float(total))
    logger.info(f"train_iterations: {num_iters} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return losses
