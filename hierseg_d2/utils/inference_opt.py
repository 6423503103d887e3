"""Inference-only rewrites of a built (and loaded) model, equal to float rounding; see docs/performance.md.

- :func:`fold_frozen_bn`: a FrozenBatchNorm2d that normalises a convolution's output (Detectron2's
  ``Conv2d(norm=...)``, the DCNv2 convs of resnet_dcn) is an affine map per channel, so it folds into the
  convolution's weight and bias: ``(W x + b - mean) * s + beta = (s W) x + (b - mean) * s + beta`` with
  ``s = gamma / sqrt(var + eps)``. Irreversible: call it after loading the weights, on a model used for
  inference only (the folded conv trains differently: its weight's gradient is scaled).
- :func:`channels_last_backbone`: the backbone's parameters and input in channels_last memory format
  (NHWC), its output features back to the default (contiguous) format for the head.
"""
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

__all__ = ["fold_frozen_bn", "channels_last_backbone"]


@torch.no_grad()
def fold_frozen_bn(model: nn.Module) -> int:
    """Fold every ``<conv>.norm`` FrozenBatchNorm2d into ``<conv>``; returns how many were folded."""
    folded = 0
    for module in model.modules():
        norm = getattr(module, "norm", None)
        weight = getattr(module, "weight", None)
        if not isinstance(norm, FrozenBatchNorm2d) or not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            continue
        if weight.shape[0] != norm.weight.shape[0]:
            raise ValueError(f"fold_frozen_bn: {type(module).__name__} has {weight.shape[0]} output channels "
                             f"but its norm has {norm.weight.shape[0]}")
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        bias = module.bias if module.bias is not None else torch.zeros_like(norm.bias)
        module.weight.mul_(scale.view(-1, 1, 1, 1))
        new_bias = (bias - norm.running_mean) * scale + norm.bias
        if module.bias is None:
            module.bias = nn.Parameter(new_bias, requires_grad=False)
        else:
            module.bias.copy_(new_bias)
        module.norm = None
        folded += 1
    return folded


def _to_channels_last(module, inputs):
    return tuple(x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.dim() == 4
                 else x for x in inputs)


def _to_contiguous(module, inputs, output):
    return {k: v.contiguous() for k, v in output.items()} if isinstance(output, dict) else output


def channels_last_backbone(model: nn.Module) -> nn.Module:
    """Run ``model.backbone`` in channels_last (parameters, input); its features are returned contiguous."""
    model.backbone.to(memory_format=torch.channels_last)
    model.backbone.register_forward_pre_hook(_to_channels_last)
    model.backbone.register_forward_hook(_to_contiguous)
    return model
