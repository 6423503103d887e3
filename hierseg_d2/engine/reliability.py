"""What the Trainer adds for safe, exact and robust training (docs/training.md, "Safety and reliability").

* :class:`ResumableTrainingSampler` + :class:`PositionSeededMapDataset`: Detectron2's infinite seeded
  index stream, able to start at a given position, and a map dataset that seeds the augmentations of
  every sample from its position in that stream. A resumed run thus maps exactly the samples (with the
  same random crops / flips) that the uninterrupted run would have, whichever worker maps them.
* :func:`install_finite_checks`: non-finite backbone inputs (a NaN image, ``MODEL.PIXEL_STD`` 0) and
  non-finite head outputs (before the matcher) raise ``FloatingPointError`` naming what and which
  images, instead of a segfault in torchvision's CPU ``deform_conv2d`` or scipy's "invalid numeric
  entries"; :class:`LossGuard` checks every loss before the backward pass and, optionally, divergence.
* :class:`SyncBuffers`: averages floating buffers (BatchNorm running statistics) over the ranks before
  every checkpoint, evaluation and at the end, so that all ranks hold the same model.
* :func:`summarize_skipped`: one line with the training samples skipped by all workers of all ranks.
"""
import contextlib
import glob
import itertools
import logging
import os
import random
import statistics
from collections import deque
from typing import List, Optional

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

__all__ = ["ResumableTrainingSampler", "PositionSeededMapDataset", "install_finite_checks", "LossGuard",
           "SyncBuffers", "summarize_skipped", "iteration_seed"]

logger = logging.getLogger(__name__)


def _mix(*values: int) -> int:
    """A 31-bit seed from integers (stable across processes, unlike hash() of tuples of str)."""
    s = 0x9E3779B1
    for v in values:
        s = (s * 1000003 + int(v) + 0x7F4A7C15) % (2 ** 61 - 1)
    return s % (2 ** 31)


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """The seed of the main process's RNGs at ``iteration`` (point sampling, dropout): a function of the
    iteration only, so a resumed run draws what the uninterrupted run drew."""
    return _mix(seed, iteration, rank)


@contextlib.contextmanager
def _seeded_rngs(seed: int):
    """Seed python / numpy / torch RNGs for the block and restore their states afterwards (the main
    process's streams are not disturbed when mapping happens in it, NUM_WORKERS 0)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class ResumableTrainingSampler(TrainingSampler):
    """Detectron2's ``TrainingSampler`` stream (same seed, same rank slicing) grouped into batches of
    ``(position, index)`` keys, with Detectron2's aspect-ratio grouping (landscape / portrait buckets, from
    the dataset dicts' width and height) done here on indices instead of on mapped samples. Every batch is
    thus a function of the seed and its number only, and ``set_state(seed, batches_done)`` makes the stream
    continue exactly where it was, whatever the number of data-loader workers."""

    def __init__(self, size: int, batch_size: int, landscape: Optional[List[bool]] = None, shuffle: bool = True,
                 seed: Optional[int] = None):
        super().__init__(size, shuffle, seed)
        self.batch_size = int(batch_size)
        self.landscape = landscape  # None: no aspect-ratio grouping
        self.start = 0  # batches of this rank already consumed

    @property
    def seed(self) -> int:
        return self._seed

    def set_state(self, seed: int, batches_done: int) -> None:
        self._seed, self.start = int(seed), int(batches_done)

    def __iter__(self):
        stream = itertools.islice(zip(itertools.count(), self._infinite_indices()), self._rank, None, self._world_size)
        buckets = ([], [])
        done = 0
        for key in stream:
            bucket = buckets[0 if self.landscape is None or self.landscape[key[1]] else 1]
            bucket.append(key)
            if len(bucket) == self.batch_size:
                if done >= self.start:
                    yield list(bucket)
                done += 1
                bucket.clear()


class PositionSeededMapDataset(torch.utils.data.Dataset):
    """``[mapper(dataset[index]) for (position, index) in keys]`` for a batch of keys, with the RNGs seeded
    from ``(seed, position)`` for every sample. A sample the mapper skips (None) is replaced by another
    index drawn from the same seed, as Detectron2's MapDataset does with its own RNG."""

    def __init__(self, dataset, mapper, seed: int):
        self.dataset, self.mapper, self.seed = dataset, mapper, int(seed)

    def __len__(self):
        return len(self.dataset)

    def map_one(self, position: int, index: int):
        for attempt in itertools.count():
            with _seeded_rngs(_mix(self.seed, position, attempt)):
                out = self.mapper(self.dataset[index])
            if out is not None:
                return out
            index = random.Random(_mix(self.seed, position, attempt, 1)).randrange(len(self.dataset))

    def __getitem__(self, keys):
        return [self.map_one(position, index) for position, index in keys]


def unbatched(batch):
    """collate_fn of the loader: batches are built by the sampler already."""
    return batch


# ---------------- finite checks ----------------
def _bad_rows(x: torch.Tensor) -> List[int]:
    return (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()


class _BatchNames:
    """The file names of the batch being processed (for the messages of the checks)."""

    def __init__(self):
        self.names: List[str] = []

    def __call__(self, module, args):
        batch = args[0] if args else None
        if isinstance(batch, (list, tuple)):
            self.names = [x.get("file_name", f"#{i}") if isinstance(x, dict) else f"#{i}" for i, x in enumerate(batch)]

    def of(self, rows: List[int]) -> str:
        return ", ".join(self.names[r] if r < len(self.names) else f"#{r}" for r in rows[:5])


def install_finite_checks(model: nn.Module) -> nn.Module:
    """Forward pre-hooks: the backbone's input and the criterion's inputs (the head outputs the matcher
    sees) must be finite, else ``FloatingPointError`` naming the tensor and the images. One reduction per
    tensor: cheap next to the forward pass. Returns ``model``."""
    inner = getattr(model, "module", model)
    names = _BatchNames()
    inner.register_forward_pre_hook(names)

    def check_backbone(module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            rows = _bad_rows(x) if x.dim() > 1 else []
            raise FloatingPointError(
                f"non-finite values (NaN/Inf) in the backbone input of image(s) {names.of(rows)}: a NaN/Inf "
                f"pixel or a zero in MODEL.PIXEL_STD (stopped before the backbone)")

    def check_outputs(module, args):
        outputs = args[0] if args else None
        if not isinstance(outputs, dict):
            return
        layers = [("", outputs)] + [(f"aux_outputs[{i}].", o) for i, o in enumerate(outputs.get("aux_outputs", []))]
        for prefix, out in layers:
            for key in ("pred_logits", "pred_masks"):
                v = out.get(key)
                if isinstance(v, torch.Tensor) and not bool(torch.isfinite(v).all()):
                    raise FloatingPointError(
                        f"non-finite values (NaN/Inf) in the model output '{prefix}{key}' of image(s) "
                        f"{names.of(_bad_rows(v))} (stopped before the matcher)")

    backbone = getattr(inner, "backbone", None)
    if isinstance(backbone, nn.Module):
        backbone.register_forward_pre_hook(check_backbone)
    criterion = getattr(inner, "criterion", None)
    if isinstance(criterion, nn.Module):
        criterion.register_forward_pre_hook(check_outputs)
    return model


class LossGuard:
    """Forward hook on the training model: every loss must be finite (checked before the backward pass,
    so neither the weights nor the last checkpoint are touched) and, if ``factor`` > 0, the total loss must
    stay below ``factor`` x its running median over the last ``window`` iterations."""

    def __init__(self, factor: float = 0.0, window: int = 20):
        self.factor, self.window = float(factor), int(window)
        self.history = deque(maxlen=max(self.window, 1))
        self.iteration: Optional[int] = None

    def __call__(self, module, args, output):
        if not module.training or not isinstance(output, dict):
            return
        where = f"iteration {self.iteration}" if self.iteration is not None else "training"
        values = [v for v in output.values() if isinstance(v, torch.Tensor)]
        if values and not bool(torch.isfinite(torch.stack([v.detach().float().sum() for v in values])).all()):
            bad = {k: float(v.detach().sum()) for k, v in output.items()
                   if isinstance(v, torch.Tensor) and not bool(torch.isfinite(v).all())}
            raise FloatingPointError(f"{where}: non-finite loss(es) {bad}")
        if self.factor > 0 and values:
            total = float(sum(v.detach().float().sum() for v in values))
            if len(self.history) == self.history.maxlen:
                median = statistics.median(self.history)
                if total > self.factor * median:
                    raise FloatingPointError(
                        f"{where}: the loss diverged: total loss {total:.4g} is above SOLVER.DIVERGENCE_FACTOR = "
                        f"{self.factor:g} x its running median {median:.4g} over the last {len(self.history)} "
                        f"iterations; lower SOLVER.BASE_LR or enable gradient clipping")
            self.history.append(total)


# ---------------- distributed buffers ----------------
def sync_buffers(model: nn.Module) -> int:
    """Average the floating buffers over the ranks (integer ones, e.g. num_batches_tracked, are equal
    already); returns how many buffers were synchronised."""
    if comm.get_world_size() == 1:
        return 0
    inner = getattr(model, "module", model)
    buffers = [b for b in inner.buffers() if b.is_floating_point()]
    for b in buffers:
        torch.distributed.all_reduce(b.data)
        b.data /= comm.get_world_size()
    for b in inner.buffers():
        if not b.is_floating_point():
            torch.distributed.broadcast(b.data, 0)
    return len(buffers)


class SyncBuffers(HookBase):
    """Before every checkpoint / evaluation and at the last iteration, average the buffers (BatchNorm
    running statistics) over the ranks: gradients are all-reduced by DDP, buffers are not (we build DDP
    with broadcast_buffers=False, which would otherwise keep rank 0's statistics only)."""

    def __init__(self, periods: List[int]):
        self.periods = [p for p in periods if p and p > 0]

    def after_step(self):
        nxt = self.trainer.iter + 1
        if nxt >= self.trainer.max_iter or any(nxt % p == 0 for p in self.periods):
            sync_buffers(self.trainer.model)


# ---------------- skipped samples ----------------
def summarize_skipped(record_dir: str, max_files: int = 5) -> Optional[str]:
    """One line: how many training samples were skipped by every worker of every rank and the first few
    files (each process of a rank appends to ``record_dir``/<pid>.txt). Collective: call on all ranks."""
    lines: List[str] = []
    for f in sorted(glob.glob(os.path.join(record_dir, "*.txt"))):
        with open(f) as fh:
            lines += [ln.rstrip("\n") for ln in fh if ln.strip()]
    everything = [ln for part in comm.all_gather(lines) for ln in part]
    if not comm.is_main_process():
        return None
    if not everything:
        msg = "skipped training samples: none"
    else:
        files = list(dict.fromkeys(ln.split("\t")[0] for ln in everything))
        msg = (f"skipped training samples: {len(everything)} ({len(files)} distinct files) across all workers "
               f"and ranks; first: {', '.join(files[:max_files])}")
    logging.getLogger("hierseg_d2").info(msg)
    return msg


