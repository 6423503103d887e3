"""Optimizer and LR schedule of HCFormer (App. D; Mask2Former's recipe).

* AdamW (``SOLVER.OPTIMIZER: ADAMW``; ``SGD`` also accepted) at ``SOLVER.BASE_LR`` with weight decay
  ``SOLVER.WEIGHT_DECAY``, except normalisation parameters (``SOLVER.WEIGHT_DECAY_NORM``) and embeddings —
  ``nn.Embedding`` weights (queries), Swin's relative position bias tables and absolute position
  embeddings (``SOLVER.WEIGHT_DECAY_EMBED``);
* backbone parameters at ``BASE_LR * SOLVER.BACKBONE_MULTIPLIER``;
* gradient clipping: ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: full_model`` clips the norm of all gradients
  together (DETR / Mask2Former); "value" and "norm" are Detectron2's per-parameter clipping;
* schedules: Detectron2's (``WarmupMultiStepLR`` for COCO) or ``WarmupPolyLR`` for ADE20K / Cityscapes,
  both through ``detectron2.projects.deeplab.build_lr_scheduler``.
"""
import itertools
import logging
from typing import Any, Dict, List, Type

import torch
from detectron2.config import CfgNode
from detectron2.projects.deeplab import build_lr_scheduler as _build_deeplab_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups

__all__ = ["get_optimizer_params", "maybe_add_full_model_gradient_clipping", "build_optimizer",
           "build_lr_scheduler"]

logger = logging.getLogger(__name__)

_NORM_TYPES = (
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm, torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)
# parameters that are embeddings although their module is not an nn.Embedding
_EMBED_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def get_optimizer_params(model: torch.nn.Module, *, base_lr: float, weight_decay: float, weight_decay_norm: float,
                         weight_decay_embed: float, backbone_multiplier: float,
                         backbone_prefix: str = "backbone.") -> List[Dict[str, Any]]:
    """Parameter groups with per-parameter lr / weight decay (merged by Detectron2's reduce_param_groups)."""
    params: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in seen:
                continue
            seen.add(value)
            full_name = f"{module_name}.{name}" if module_name else name
            lr, wd = base_lr, weight_decay
            if full_name.startswith(backbone_prefix) or f".{backbone_prefix}" in full_name:
                lr = base_lr * backbone_multiplier
            # Detectron2's FrozenBatchNorm2d holds buffers only, so it never shows up here
            if isinstance(module, _NORM_TYPES):
                wd = weight_decay_norm
            if isinstance(module, torch.nn.Embedding) or name in _EMBED_PARAM_NAMES:
                wd = weight_decay_embed
            params.append({"params": [value], "lr": lr, "weight_decay": wd})
    return reduce_param_groups(params)


def maybe_add_full_model_gradient_clipping(cfg: CfgNode, optim_cls: Type[torch.optim.Optimizer]):
    """``optim_cls`` with ``step`` clipping the global gradient norm when ``SOLVER.CLIP_GRADIENTS`` is enabled
    with ``CLIP_TYPE: full_model``; unchanged otherwise (per-parameter types are Detectron2's, added later)."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
        return optim_cls
    max_norm, norm_type = clip.CLIP_VALUE, clip.NORM_TYPE

    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            all_params = itertools.chain(*[group["params"] for group in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, max_norm, norm_type)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = f"{optim_cls.__name__}WithFullModelGradientClip"
    return FullModelGradientClippingOptimizer


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``SOLVER.OPTIMIZER`` over :func:`get_optimizer_params`, with gradient clipping."""
    s = cfg.SOLVER
    if s.CLIP_GRADIENTS.ENABLED and s.CLIP_GRADIENTS.CLIP_TYPE not in ("full_model", "value", "norm"):
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE = {s.CLIP_GRADIENTS.CLIP_TYPE!r}: "
                         "use 'full_model', 'value' or 'norm'")
    params = get_optimizer_params(
        model, base_lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY, weight_decay_norm=s.WEIGHT_DECAY_NORM,
        weight_decay_embed=s.WEIGHT_DECAY_EMBED, backbone_multiplier=s.BACKBONE_MULTIPLIER)
    name = s.OPTIMIZER.upper()
    if name == "ADAMW":
        cls, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        cls, kwargs = torch.optim.SGD, {"momentum": s.MOMENTUM, "nesterov": s.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER = {s.OPTIMIZER!r}: use 'ADAMW' or 'SGD'")
    optimizer = maybe_add_full_model_gradient_clipping(cfg, cls)(params, lr=s.BASE_LR, **kwargs)
    if s.CLIP_GRADIENTS.CLIP_TYPE != "full_model":
        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer):
    """``SOLVER.LR_SCHEDULER_NAME``: ``WarmupPolyLR`` (ADE20K / Cityscapes) or any Detectron2 schedule."""
    return _build_deeplab_lr_scheduler(cfg, optimizer)
