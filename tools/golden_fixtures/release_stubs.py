"""Helpers of the backbone fixture scripts (segformer.py, pvt.py, hrvit.py, hat_net.py): import a release's
model file by path, stub the framework modules it imports only for registration, logging and checkpoint
loading (mmseg, mmdet, mmcv, einops' rearrange), and give every tensor of a model random values."""
import importlib.util
import sys
import types
from typing import Callable, Dict

import torch
from torch import nn

__all__ = ["Registry", "half", "load_file", "randomise", "random_input", "stage_outputs", "stub_modules"]


class Registry:
    """Stand-in for mmcv's Registry: ``@BACKBONES.register_module()`` returns the class unchanged."""

    def register_module(self, *args, **kwargs) -> Callable:
        return args[0] if args and isinstance(args[0], type) else (lambda cls: cls)


def stub_modules(names_to_attrs: Dict[str, Dict[str, object]]) -> None:
    """Create (only if absent) the modules ``names_to_attrs`` names, with the given attributes."""
    for name, attrs in names_to_attrs.items():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in sys.modules:
                sys.modules[sub] = types.ModuleType(sub)
                if i > 1:
                    setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[sub])
        for key, value in attrs.items():
            setattr(sys.modules[name], key, value)


def load_file(path: str, name: str) -> types.ModuleType:
    """Execute the release file ``path`` as module ``name`` (without importing its package's __init__)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def randomise(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Random values for every float tensor: weights and biases ~ N(0, scale^2), norm weights ~ 1 + N(0,
    scale^2), BatchNorm running statistics away from (0, 1). A zero-initialised tensor (e.g. HRViT's
    attn_bn weight) would hide a wrong operation behind it; random values do not."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if t is None or not t.is_floating_point():
                    continue
                if isinstance(module, _NORMS) and name == "weight":
                    t.copy_(1 + scale * torch.randn(t.shape, generator=g))
                elif name == "running_var":
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                else:
                    t.copy_(scale * torch.randn(t.shape, generator=g))
                # float16-representable values: the fixture stores them in half the space, exactly
                t.copy_(t.half().float())


def random_input(shape, generator: torch.Generator) -> torch.Tensor:
    """A float32 input with float16-representable values (stored exactly by :func:`half`)."""
    return torch.randn(shape, generator=generator).half().float()


def half(tensors):
    """Float tensors of a state dict / input as float16 for saving (exact for values made by
    :func:`randomise` / :func:`random_input`); the tests cast them back to float32."""
    if isinstance(tensors, dict):
        return {k: half(v) for k, v in tensors.items()}
    if isinstance(tensors, torch.Tensor) and tensors.is_floating_point():
        assert torch.equal(tensors.half().float(), tensors), "value not representable in float16"
        return tensors.half()
    return tensors


def stage_outputs(model: nn.Module, sizes: Dict[str, tuple], seed: int = 1) -> Dict[str, dict]:
    """``{size name: {"input": x (float16), "res2".."res5": stage outputs}}`` of a release backbone that
    returns its four stage maps as a sequence, on one seeded random input per (H, W) of ``sizes``."""
    g = torch.Generator().manual_seed(seed)
    content = {}
    with torch.no_grad():
        for key, (H, W) in sizes.items():
            x = random_input((1, 3, H, W), g)
            content[key] = {"input": half(x), **{f"res{i + 2}": o for i, o in enumerate(model(x))}}
    return content
