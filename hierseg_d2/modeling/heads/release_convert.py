"""Names of the HCFormer release's checkpoints (github.com/DensoITLab/HCFormer, model_final.pth) -> ours.

The release keeps the clustering modules and HCFormer+'s encoder inside its backbone
(``backbone.clustering_layers.<j>`` for ResNet, built for levels 2..4 and then reversed so that j = 0 is
level 4; ``backbone.layers.<i>.clustering`` for Swin, level i + 2; ``backbone.aux`` = TransformerEnc) and
the mask projection inside the decoder (``sem_seg_head.predictor.mask_proj``). Ours has them in the head:
``sem_seg_head.clustering.<level>``, ``sem_seg_head.encoder_input_proj`` / ``sem_seg_head.encoder`` and
``sem_seg_head.mask_features``. The decoder, ``criterion.empty_weight`` and the backbone's own layers keep
their roles; the backbone's names are translated by the backbone family's ``release_backbone_key_map``
(see :func:`backbone_key_map`).

Every tensor must map: anything left over raises, naming it. Only BatchNorm's ``num_batches_tracked``
counters are dropped (listed).
"""
import re
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

__all__ = ["convert_hcformer_release_state_dict", "convert_head_state_dict", "convert_backbone_state_dict",
           "backbone_key_map", "release_backbone_family"]

StateDict = Dict[str, torch.Tensor]

# release Clustering -> our ClusteringModule
_CLUSTERING = {"fine_emb.weight": "proj.weight", "coarse_emb.weight": "down_proj.weight",
               "fine_norm.weight": "norm.weight", "fine_norm.bias": "norm.bias",
               "coarse_norm.weight": "down_norm.weight", "coarse_norm.bias": "down_norm.bias",
               "temp": "scale"}
# release TransformerEnc (DETR's TransformerEncoderLayer) -> our TransformerEncoder
_ENCODER_LAYER = {"self_attn.": "self_attn_layers.{n}.self_attn.", "norm1.": "self_attn_layers.{n}.norm.",
                  "linear1.": "ffn_layers.{n}.linear1.", "linear2.": "ffn_layers.{n}.linear2.",
                  "norm2.": "ffn_layers.{n}.norm."}
_RESNET_CLUSTERING = re.compile(r"^backbone\.clustering_layers\.(\d+)\.(.+)$")
_SWIN_CLUSTERING = re.compile(r"^backbone\.layers\.(\d+)\.clustering\.(.+)$")
_ENCODER = re.compile(r"^backbone\.aux\.encoder\.layers\.(\d+)\.(.+)$")


def _clustering(level: int, rest: str, value: torch.Tensor, name: str) -> Tuple[str, torch.Tensor]:
    if rest not in _CLUSTERING:
        raise KeyError(f"HCFormer release checkpoint: unknown clustering tensor {name!r}")
    if rest == "temp":  # the release keeps s as a (1,) tensor, ours is a scalar
        if value.numel() != 1:
            raise ValueError(f"HCFormer release checkpoint: {name!r} has shape {tuple(value.shape)}, expected (1,)")
        value = value.reshape(())
    return f"sem_seg_head.clustering.{level}.{_CLUSTERING[rest]}", value


def convert_head_state_dict(state: Mapping[str, torch.Tensor], num_resnet_levels: Optional[int] = None
                            ) -> Tuple[StateDict, StateDict]:
    """(converted head tensors under our names, the release's remaining backbone tensors).

    ``num_resnet_levels``: how many ResNet clustering modules the release built (MODEL.HC.LEVEL); by
    default the number found. They are stored coarsest first (j = 0 is level 4).
    """
    converted: StateDict = {}
    backbone: StateDict = {}
    resnet = sorted({int(m.group(1)) for m in map(_RESNET_CLUSTERING.match, state) if m})
    if num_resnet_levels is None:
        num_resnet_levels = len(resnet)
    if resnet and resnet != list(range(num_resnet_levels)):
        raise KeyError(f"HCFormer release checkpoint: clustering_layers {resnet} are not 0..{num_resnet_levels - 1}")
    for name, value in state.items():
        m = _RESNET_CLUSTERING.match(name)
        if m:
            key, value = _clustering(4 - int(m.group(1)), m.group(2), value, name)
        elif _SWIN_CLUSTERING.match(name):
            m = _SWIN_CLUSTERING.match(name)
            key, value = _clustering(int(m.group(1)) + 2, m.group(2), value, name)
        elif name.startswith("backbone.aux."):
            key = _encoder_key(name)
        elif name.startswith("sem_seg_head.predictor.mask_proj."):
            key = "sem_seg_head.mask_features." + name[len("sem_seg_head.predictor.mask_proj."):]
        elif name.startswith("sem_seg_head.predictor.") or name == "criterion.empty_weight":
            key = name  # the decoder's names are Mask2Former's on both sides
        elif name.startswith("backbone."):
            backbone[name[len("backbone."):]] = value
            continue
        else:
            raise KeyError(f"HCFormer release checkpoint: tensor {name!r} belongs to no known part "
                           f"(backbone.*, sem_seg_head.predictor.*, criterion.empty_weight)")
        if key in converted:
            raise KeyError(f"HCFormer release checkpoint: {name!r} maps to {key!r} twice")
        converted[key] = value
    return converted, backbone


def _encoder_key(name: str) -> str:
    rest = name[len("backbone.aux."):]
    if rest.startswith("input_proj.0."):  # conv 1x1
        return "sem_seg_head.encoder_input_proj." + rest[len("input_proj.0."):]
    if rest.startswith("input_proj.1."):  # GroupNorm(32)
        return "sem_seg_head.encoder_input_proj.norm." + rest[len("input_proj.1."):]
    if rest.startswith("encoder.norm."):  # pre-norm encoders only
        return "sem_seg_head.encoder.norm." + rest[len("encoder.norm."):]
    m = _ENCODER.match(name)
    if m:
        layer, sub = int(m.group(1)), m.group(2)
        for old, new in _ENCODER_LAYER.items():
            if sub.startswith(old):
                return "sem_seg_head.encoder." + new.format(n=layer) + sub[len(old):]
    raise KeyError(f"HCFormer release checkpoint: unknown HCFormer+ encoder tensor {name!r}")


def backbone_key_map(family: str) -> Callable[[str], Optional[str]]:
    """The backbone family's ``release_backbone_key_map(name) -> our name or None`` (names without "backbone.").

    Written by the backbone side in hierseg_d2/modeling/backbone/resnet_dcn.py ("resnet") and swin.py ("swin");
    None marks a tensor that is not the backbone's (the clustering modules and HCFormer+'s encoder, taken by
    the head here) or BatchNorm bookkeeping (``num_batches_tracked``).
    """
    if family == "resnet":
        from ..backbone import resnet_dcn as module
    elif family == "swin":
        from ..backbone import swin as module
    else:
        raise ValueError(f"HCFormer release checkpoint: unknown backbone family {family!r}; 'resnet' or 'swin'")
    fn = getattr(module, "release_backbone_key_map", None)
    if fn is None:
        raise NotImplementedError(f"{module.__name__}.release_backbone_key_map is missing: the mapping of the "
                                  f"release's {family} backbone names is not available in this checkout")
    return fn


def convert_backbone_state_dict(backbone: Mapping[str, torch.Tensor], key_map: Callable[[str], Optional[str]]
                                ) -> Tuple[StateDict, list]:
    """(our backbone tensors, dropped names): only BatchNorm's ``num_batches_tracked`` may be dropped."""
    converted: StateDict = {}
    dropped = []
    for name, value in backbone.items():
        new = key_map(name)
        if new is None:
            if not name.endswith(".num_batches_tracked"):
                raise KeyError(f"HCFormer release checkpoint: backbone tensor {'backbone.' + name!r} has no "
                               f"counterpart in our backbone")
            dropped.append("backbone." + name)
            continue
        if new in converted:
            raise KeyError(f"HCFormer release checkpoint: two backbone tensors map to {new!r}")
        converted[new] = value
    return converted, dropped


def release_backbone_family(state: Mapping[str, torch.Tensor]) -> str:
    """'swin' or 'resnet' from the release's backbone names (HCSwinTransformer has patch_embed, HCResNet stem)."""
    if any(k.startswith("backbone.patch_embed.") for k in state):
        return "swin"
    if any(k.startswith("backbone.stem.") for k in state):
        return "resnet"
    raise KeyError("HCFormer release checkpoint: neither backbone.stem.* (HCResNet) nor backbone.patch_embed.* "
                   "(HCSwinTransformer) found")


def convert_hcformer_release_state_dict(state: Mapping[str, torch.Tensor],
                                        key_map: Optional[Callable[[str], Optional[str]]] = None
                                        ) -> Tuple[StateDict, list]:
    """A full release state dict (the "model" of model_final.pth) -> (ours, dropped names).

    Every tensor is mapped; only BatchNorm's ``num_batches_tracked`` counters (which Detectron2's FrozenBN
    does not keep) are dropped. ``key_map`` defaults to the backbone family's ``release_backbone_key_map``.
    """
    converted, backbone = convert_head_state_dict(state)
    dropped = []
    if backbone:
        if key_map is None:
            key_map = backbone_key_map(release_backbone_family(state))
        mapped, dropped = convert_backbone_state_dict(backbone, key_map)
        for name, value in mapped.items():
            key = "backbone." + name
            if key in converted:
                raise KeyError(f"HCFormer release checkpoint: backbone tensor {key!r} collides with a head tensor")
            converted[key] = value
    return converted, dropped
