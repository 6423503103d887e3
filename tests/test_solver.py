"""hierseg_d2.solver: parameter groups (backbone multiplier, no decay on norms / embeddings), full-model
gradient clipping, and the step / poly schedules."""
import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from hierseg_d2.config import add_hierseg_config
from hierseg_d2.solver import build_lr_scheduler, build_optimizer


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.backbone.relative_position_bias_table = nn.Parameter(torch.zeros(5, 2))
        self.query_embed = nn.Embedding(3, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)


def _cfg(**solver):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def _hyper(optimizer, param):
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    return group["lr"], group["weight_decay"]


def test_parameter_groups():
    model = _Toy()
    opt = build_optimizer(_cfg(), model)
    assert isinstance(opt, torch.optim.AdamW)
    assert _hyper(opt, model.backbone[0].weight) == pytest.approx((1e-5, 0.05))
    assert _hyper(opt, model.backbone[1].weight) == pytest.approx((1e-5, 0.0))  # norm in the backbone
    assert _hyper(opt, model.backbone.relative_position_bias_table) == pytest.approx((1e-5, 0.0))
    assert _hyper(opt, model.query_embed.weight) == pytest.approx((1e-4, 0.0))
    assert _hyper(opt, model.norm.bias) == pytest.approx((1e-4, 0.0))
    assert _hyper(opt, model.proj.weight) == pytest.approx((1e-4, 0.05))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_full_model_clipping_limits_the_global_norm():
    """SGD with lr 1: the update is the clipped gradient, whose norm over all parameters is CLIP_VALUE."""
    model = _Toy()
    cfg = _cfg(OPTIMIZER="SGD", MOMENTUM=0.0, BASE_LR=1.0, BACKBONE_MULTIPLIER=1.0, WEIGHT_DECAY=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    opt = build_optimizer(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    opt.step()
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert update.norm().item() == pytest.approx(0.01, rel=1e-4)
    # every entry scaled by the same factor: a global, not a per-parameter, clip
    assert torch.allclose(update, update[0].expand_as(update), rtol=1e-3)


def test_bad_optimizer_name_is_named():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(_cfg(OPTIMIZER="LAMB"), _Toy())


def test_step_and_poly_schedules():
    def lrs(cfg, n):
        opt = build_optimizer(cfg, nn.Linear(2, 2))
        sched = build_lr_scheduler(cfg, opt)
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    step = _cfg(MAX_ITER=100, STEPS=(90, 95), WARMUP_ITERS=0, LR_SCHEDULER_NAME="WarmupMultiStepLR")
    got = lrs(step, 100)
    assert got[89] == pytest.approx(1e-4) and got[90] == pytest.approx(1e-5) and got[95] == pytest.approx(1e-6)
    poly = _cfg(MAX_ITER=100, WARMUP_ITERS=0, LR_SCHEDULER_NAME="WarmupPolyLR", POLY_LR_POWER=0.9)
    got = lrs(poly, 100)
    for it in (0, 10, 50, 99):
        assert got[it] == pytest.approx(1e-4 * (1 - it / 100) ** 0.9, rel=1e-6)
