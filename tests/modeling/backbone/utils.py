"""Helpers shared by the backbone families' tests: the authors' state-dict layouts, the converter tools,
strict loading through DetectionCheckpointer, the output contract (hierarchy.py) and shapes training."""
import ast
import math
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from torch import nn

from hierseg_d2.config import add_hierseg_config
from hierseg_d2.modeling.backbone import get_clustering_pairs
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[3]
# CI runs on a fresh clone with ../shared beside it
LAYOUTS = REPO / ".." / "shared" / "reference" / "state-dict-keys"
OUTPUTS = {"res2", "res3", "res4", "res5", "ds3", "ds4", "ds5"}
PAIRS = {2: ("res2", "ds3"), 3: ("res3", "ds4"), 4: ("res4", "ds5")}


def read_layout(name: str) -> Dict[str, Tuple[int, ...]]:
    """{tensor name: shape} of an authors' release, from the ``name<TAB>shape`` lines of ``<name>.txt``."""
    layout = {}
    for line in (LAYOUTS / f"{name}.txt").read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            layout[key] = tuple(ast.literal_eval(shape))
    return layout


def random_state_dict(layout: Dict[str, Tuple[int, ...]], seed: int = 0, scale: float = 1.0,
                      prefix: str = "") -> Dict[str, torch.Tensor]:
    """A fake checkpoint with exactly the names and shapes of ``layout`` (random values; 0-d tensors such
    as BatchNorm's ``num_batches_tracked`` get an integer)."""
    g = torch.Generator().manual_seed(seed)
    return {prefix + k: torch.randn(shape, generator=g) * scale if shape else torch.tensor(3)
            for k, shape in layout.items()}


def load_tool(name: str):
    """The module of ``tools/<name>.py`` (tool file names are not importable names)."""
    return load_script(f"tools/{name}.py")


def load_into_backbone(backbone: nn.Module, path) -> Tuple[nn.Module, object]:
    """Load ``path`` as ``MODEL.WEIGHTS`` would into a model whose ``backbone`` is ``backbone``; returns the
    model and DetectionCheckpointer's incompatible keys."""
    model = nn.Module()
    model.backbone = backbone
    checkpointer = DetectionCheckpointer(model)
    return model, checkpointer._load_model(checkpointer._load_file(str(path)))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backbone_cfg(name: str, node: str = "", **overrides):
    """A hierseg config with ``MODEL.BACKBONE.NAME = name`` and ``MODEL.<node>.<key> = value`` overrides."""
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.MODEL.BACKBONE.NAME = name
    for key, value in overrides.items():
        setattr(cfg.MODEL[node], key, value)
    return cfg


def check_hierarchical_outputs(model, out: Dict[str, torch.Tensor], H: int, W: int) -> None:
    """The contract of hierarchy.py for an H x W input: res2..res5 and ds3..ds5, all listed by
    output_shape() with stride 2^k and sized ceil(H / 2^k) x ceil(W / 2^k), finite, paired (res_k, ds_k+1)."""
    shapes = model.output_shape()
    assert set(out) == set(shapes) == OUTPUTS
    for name, t in out.items():
        stride = shapes[name].stride
        assert stride == 2 ** int(name[-1]), name
        assert t.shape[1:] == (shapes[name].channels, math.ceil(H / stride), math.ceil(W / stride)), name
        assert torch.isfinite(t).all(), name
    assert get_clustering_pairs(model) == PAIRS
    assert model.size_divisibility == 32


def assert_trains_on_shapes(config_file: str, num_iters: int = 16):
    """HCFormer with the backbone of ``config_file`` (relative to the repo) trains ``num_iters`` iterations
    on the shapes dataset on the CPU: every loss finite and the last four below the first four. Returns
    the config."""
    from hierseg_d2.utils.smoke import train_iterations

    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(str(REPO / config_file))
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 0  # train_iterations seeds torch, numpy and random from it
    losses = train_iterations(cfg, num_iters)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    return cfg
