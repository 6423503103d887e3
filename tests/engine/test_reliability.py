"""Training reliability: exact resume after a kill (with a damaged newest checkpoint), non-finite inputs /
outputs / losses, the divergence guard, the skipped-sample summary; on the tiniest shapes HCFormer."""
import json
import math
import os

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from hierseg_d2.config import load_config
from hierseg_d2.engine import Trainer
from hierseg_d2.engine.reliability import LossGuard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = os.path.join(ROOT, "configs/shapes/hcformer_R18_shapes.yaml")
# the shapes model at test size: 64 px crops, one decoder layer, 5 queries, 256 points
TINY = ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
        "MODEL.MASK_FORMER.DEC_LAYERS", "1", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "5",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "INPUT.MIN_SIZE_TRAIN", "(64, 80, 96)",
        "INPUT.CROP.SIZE", "(64, 64)", "SOLVER.WARMUP_ITERS", "2", "SEED", "3"]


def tiny_cfg(out_dir, *opts):
    cfg = load_config(SHAPES, TINY + ["OUTPUT_DIR", str(out_dir), *opts])
    cfg.freeze()
    return cfg


class RecordLosses(HookBase):
    """Every iteration's total loss (and, with ``stop_after``, a simulated kill after that iteration)."""

    def __init__(self, losses, stop_after=None):
        self.losses, self.stop_after = losses, stop_after

    def after_step(self):
        self.losses[self.trainer.iter] = self.trainer.storage.history("total_loss").latest()
        if self.stop_after is not None and self.trainer.iter == self.stop_after:
            raise KeyboardInterrupt("simulated kill")


def run(cfg, losses, resume=False, stop_after=None):
    seed_all_rng(cfg.SEED)  # as default_setup in train_net.py: initialisation and sampler seed from SEED
    trainer = Trainer(cfg)
    trainer.register_hooks([RecordLosses(losses, stop_after)])
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_a_kill_and_a_damaged_checkpoint_repeats_the_uninterrupted_losses(shapes_root, tmp_path, caplog,
                                                                                       workers):
    """6 iterations straight vs: killed after iteration 4 (checkpoints after iterations 1 and 3), the newest
    checkpoint truncated and a 0-byte one planted as the tagged last checkpoint (what a kill during a
    non-atomic write leaves), then --resume: it warns about both, resumes from model_0000001 and iterations
    2-5 have exactly the losses of the uninterrupted run (data stream, augmentations, point sampling)."""
    opts = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", str(workers)]
    straight = {}
    run(tiny_cfg(tmp_path / "a", *opts), straight)
    assert sorted(straight) == list(range(6))

    out = tmp_path / "b"
    cfg = tiny_cfg(out, *opts)
    first = {}
    run(cfg, first, stop_after=4)  # saved model_0000001 and model_0000003, killed after iteration 4
    assert first == {i: straight[i] for i in range(5)}
    damaged = out / "model_0000005.pth"
    damaged.write_bytes(b"")
    (out / "last_checkpoint").write_text("model_0000005.pth")
    truncated = out / "model_0000003.pth"
    truncated.write_bytes(truncated.read_bytes()[:1000])  # and the previous one truncated

    resumed = {}
    with caplog.at_level("WARNING", logger="fvcore.common.checkpoint"):
        trainer = run(cfg, resumed, resume=True)
    assert trainer.start_iter == 2  # from model_0000001, the newest readable checkpoint
    assert sorted(resumed) == [2, 3, 4, 5]
    for i in resumed:
        assert resumed[i] == straight[i], (i, resumed, straight)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(damaged) in warned and str(truncated) in warned


def test_without_the_stream_state_a_resume_would_differ(shapes_root, tmp_path):
    """The check above is sensitive: restarting the stream from its first sample (the old behaviour)
    changes the losses after the resume."""
    straight = {}
    run(tiny_cfg(tmp_path / "a", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"), straight)
    cfg = tiny_cfg(tmp_path / "b", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2")
    run(cfg, {}, stop_after=1)
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    resumed = {}
    trainer.register_hooks([RecordLosses(resumed)])
    trainer.resume_or_load(resume=True)
    trainer._trainer.data_loader.resumable_sampler.start = 0  # forget the position
    trainer.train()
    assert resumed[2] != straight[2]


def test_nan_loss_raises_with_the_iteration_and_keeps_the_last_checkpoint(shapes_root, tmp_path):
    class PoisonedTrainer(Trainer):
        @classmethod
        def build_model(cls, cfg):
            model = super().build_model(cfg)
            forward = model.criterion.forward
            calls = {"n": 0}

            def poisoned(outputs, targets):
                losses = forward(outputs, targets)
                calls["n"] += 1
                if calls["n"] == 4:  # iteration 3
                    losses["loss_dice"] = losses["loss_dice"] * float("nan")
                return losses

            model.criterion.forward = poisoned
            return model

    out = tmp_path / "nan"
    trainer = PoisonedTrainer(tiny_cfg(out, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2"))
    trainer.resume_or_load(resume=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"iteration 3: non-finite loss\(es\) \{'loss_dice': nan\}"):
        trainer.train()
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    ckpt = torch.load(out / "model_0000001.pth", weights_only=True)
    assert ckpt["iteration"] == 1
    assert any(not torch.equal(before[k], v) for k, v in ckpt["model"].items())  # trained weights, readable


def _batch(cfg, n=2, size=64):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 255, (3, size, size), generator=g).to(torch.uint8), "height": size,
             "width": size, "file_name": f"img{i}.png"} for i in range(n)]


@pytest.mark.parametrize("how", ["nan_pixel", "zero_pixel_std"])
def test_non_finite_backbone_input_raises_before_the_dcn_backbone(tmp_path, how):
    """torchvision's CPU deform_conv2d segfaults on NaN input: the check before the backbone must raise a
    FloatingPointError naming the image instead (in training and inference)."""
    opts = ["MODEL.PIXEL_STD", "[0.0, 57.12, 57.375]"] if how == "zero_pixel_std" else []
    cfg = tiny_cfg(tmp_path, *opts)
    assert cfg.MODEL.HCFORMER.DCN_DOWNSAMPLING
    model = Trainer.build_model(cfg)
    batch = _batch(cfg)
    if how == "nan_pixel":
        batch[1]["image"] = batch[1]["image"].float()
        batch[1]["image"][0, 5, 5] = float("nan")
    model.eval()
    with torch.no_grad(), pytest.raises(FloatingPointError, match="backbone input of image.*img1.png"):
        model(batch)


def test_the_matcher_never_sees_non_finite_outputs(shapes_root, tmp_path):
    from detectron2.data import build_detection_train_loader

    from hierseg_d2.data.dataset_mappers import build_mapper

    cfg = tiny_cfg(tmp_path)
    model = Trainer.build_model(cfg)
    model.train()
    batch = next(iter(build_detection_train_loader(cfg, mapper=build_mapper(cfg, True))))
    seen = []
    model.criterion.matcher.forward = lambda *a, **k: seen.append(1)

    def poison(module, args, output):
        output["pred_masks"] = output["pred_masks"] * float("nan")
        return output

    model.sem_seg_head.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match="model output 'pred_masks'.*before the matcher"):
        model(batch)
    assert not seen


def test_divergence_guard_stops_on_a_finite_but_exploding_loss():
    guard = LossGuard(factor=100.0, window=5)
    guard.iteration = 0
    module = torch.nn.Module()
    for i, v in enumerate([3.0, 2.9, 3.1, 2.8, 3.0, 2.7]):
        guard.iteration = i
        guard(module, (), {"loss_ce": torch.tensor(v)})
    guard.iteration = 6
    with pytest.raises(FloatingPointError, match=r"iteration 6: the loss diverged: total loss 2e\+09 .*"
                                                  r"DIVERGENCE_FACTOR = 100 x its running median 2.9"):
        guard(module, (), {"loss_ce": torch.tensor(2e9)})
    off = LossGuard(factor=0.0)
    for v in [3.0] * 30 + [2e9]:
        off(module, (), {"loss_ce": torch.tensor(v)})  # off by default: finite values pass


def test_divergence_guard_is_wired_from_the_config(shapes_root, tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "SOLVER.DIVERGENCE_FACTOR", "50.0", "SOLVER.DIVERGENCE_WINDOW", "7",
                               "SOLVER.MAX_ITER", "1"))
    assert (trainer.loss_guard.factor, trainer.loss_guard.history.maxlen) == (50.0, 7)


def test_skipped_samples_summary_counts_every_worker(shapes_root, tmp_path):
    """Two data-loader workers, 3 of the 16 training images broken: one summary line at the end with the
    count over both workers and the broken files."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    records = DatasetCatalog.get("shapes_train_panoptic")
    broken = []
    for i, r in enumerate(records[:3]):
        path = tmp_path / f"broken{i}.png"
        path.write_bytes(b"not a png")
        r["file_name"] = str(path)
        broken.append(str(path))
    name = "shapes_train_some_broken"
    DatasetCatalog.remove(name) if name in DatasetCatalog.list() else None
    DatasetCatalog.register(name, lambda: [dict(r) for r in records])
    MetadataCatalog.get(name).set(**{k: v for k, v in MetadataCatalog.get("shapes_train_panoptic").as_dict().items()
                                     if k != "name"})
    cfg = tiny_cfg(tmp_path / "out", "DATASETS.TRAIN", f"('{name}',)", "DATALOADER.NUM_WORKERS", "2",
                   "SOLVER.MAX_ITER", "12", "SOLVER.IMS_PER_BATCH", "4")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    msg = trainer.skipped_summary
    n = int(msg.split("skipped training samples: ")[1].split(" ")[0])
    assert n >= 3 and all(b in msg for b in broken), msg  # 48 samples drawn: every file at least once
    per_process = os.listdir(tmp_path / "out" / "skipped_samples" / "rank0")
    assert len(per_process) >= 2, per_process  # skips recorded by both workers
