"""The contract through which a backbone hands HCFormer the feature maps around its downsampling layers.

HCFormer (Sec. 2.2, Fig. II) clusters the pixels of the map *before* a downsampling layer, F^(i) at stride
2^i, with the pixels of the map *right after* that layer, F_d^(i) at stride 2^(i+1), as prototypes.
A backbone opts in by implementing ``clustering_pairs()``:

    def clustering_pairs(self) -> Dict[int, Tuple[str, str]]:
        return {2: ("res2", "ds3"), 3: ("res3", "ds4"), 4: ("res4", "ds5")}

Level ``i`` maps to the names of (before, after) in the dict returned by ``forward()``; both names must
also appear in ``output_shape()`` (channels and stride 2^i / 2^(i+1)). By convention the map right after
the downsampling layer into stage k is called ``ds{k}`` (see :func:`downsampled_name`); for the ResNet it
is the output of the whole block that downsamples (the first block of stage k), as in the release
DensoITLab/HCFormer. Returning extra
keys from ``forward()`` is harmless for Detectron2 heads, which select their ``in_features``, and it does
not change the backbone's feed-forward path.

Spatial sizes: every backbone in this project returns res_k (and ds_k) of size ceil(H / 2^k) x
ceil(W / 2^k) for an H x W input, the size a chain of stride-2 convolutions with padding gives. The
clustering module accepts an "after" map of ceil(n / 2) or floor(n / 2) for a "before" map of n.

The project's own hierarchical backbones (MiT/PVT, HILA, HAFA, HAT-Net, HRViT) subclass
:class:`HierarchicalBackbone`, which keeps this bookkeeping (output shapes, pairs, output selection) in one
place.

The "before" map need not be the stage output the backbone returns as res_k: the Swin backbone pairs the
stage output before its output norm (``res{k}_prenorm``), as the release's HCSwinTransformer does.

Unused stages: HCFormer's head reads only ``MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE`` and the pairs
below it, so the builders pass their out features through :func:`hcformer_out_features`, which drops the
stages after the head's input; those stages are then not built (no parameters without gradients, so
distributed training needs no ``find_unused_parameters``).

Fallback: a Detectron2 backbone without ``clustering_pairs()`` that outputs res2..res5 is paired stage
by stage, (res2, res3), (res3, res4), (res4, res5): the stage output after the downsampling stage
stands in for the map right after the downsampling layer.
"""
import logging
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling import Backbone

__all__ = ["ALL_OUTPUTS", "FALLBACK_PAIRS", "HierarchicalBackbone", "downsampled_name", "get_clustering_pairs",
           "hcformer_out_features"]

logger = logging.getLogger(__name__)

FALLBACK_PAIRS: Dict[int, Tuple[str, str]] = {2: ("res2", "res3"), 3: ("res3", "res4"), 4: ("res4", "res5")}
# everything a four-stage hierarchical backbone of this project can return
ALL_OUTPUTS = ("res2", "res3", "res4", "res5", "ds3", "ds4", "ds5")


def downsampled_name(stage: int) -> str:
    """Name of the map right after the downsampling layer that opens stage ``stage`` (stride 2^stage)."""
    return f"ds{stage}"


def hcformer_out_features(cfg, out_features: Sequence[str], config_key: str) -> List[str]:
    """``out_features`` without the stages res_k after HCFormer's ``TRANSFORMER_IN_FEATURE`` and with that
    map itself (for ``MODEL.META_ARCHITECTURE: HCFormer``; unchanged otherwise). ``config_key`` names the list
    in the log."""
    out_features = list(out_features)
    if cfg.MODEL.META_ARCHITECTURE != "HCFormer" or "MASK_FORMER" not in cfg.MODEL:
        return out_features
    in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
    m = re.fullmatch(r"res(\d+)", in_feature)
    if m is None:
        return out_features
    last = int(m.group(1))
    dropped = [f for f in out_features if re.fullmatch(r"res\d+", f) and int(f[3:]) > last]
    if dropped:
        logger.info(f"{config_key}: {dropped} not built, the HCFormer head reads {in_feature!r} "
                    f"(MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE)")
    kept = [f for f in out_features if f not in dropped]
    if in_feature not in kept:  # the head's input is always an output (e.g. OUT_FEATURES [res5], head on res4)
        kept.append(in_feature)
    return kept


def get_clustering_pairs(backbone: Backbone) -> Dict[int, Tuple[str, str]]:
    """Return {level: (before, after)} for ``backbone``, checked against its ``output_shape()``."""
    shapes = backbone.output_shape()
    if hasattr(backbone, "clustering_pairs"):
        pairs = dict(backbone.clustering_pairs())
        source = f"{type(backbone).__name__}.clustering_pairs()"
    else:
        pairs = dict(FALLBACK_PAIRS)
        source = "the res2..res5 fallback"
        logger.info(f"{type(backbone).__name__} has no clustering_pairs(); HCFormer pairs stage outputs "
                    f"(res2, res3), (res3, res4), (res4, res5)")
    for level, (before, after) in pairs.items():
        for name, stride in ((before, 2 ** level), (after, 2 ** (level + 1))):
            if name not in shapes:
                raise KeyError(f"{source} names feature {name!r} for level {level}, but "
                               f"{type(backbone).__name__}.output_shape() has only {sorted(shapes)}")
            if shapes[name].stride != stride:
                raise ValueError(f"{source}: feature {name!r} for level {level} has stride "
                                 f"{shapes[name].stride}, expected {stride}")
    return pairs


class HierarchicalBackbone(Backbone):
    """A Detectron2 backbone implementing this contract: stages res2, res3, ... (strides 4, 8, ...) and the
    maps ds3, ds4, ... right after the downsampling layers between them.

    A family calls :meth:`init_outputs` once in ``__init__`` with its stage widths and returns
    ``self.select_outputs(outputs)`` from ``forward``; ``output_shape()`` (Detectron2's, from
    ``_out_features`` / ``_out_feature_channels`` / ``_out_feature_strides``), ``clustering_pairs()`` and
    ``size_divisibility`` then come from here. ``family`` and ``config_node`` name the backbone in errors.
    """

    family = "backbone"
    config_node = "MODEL"

    def init_outputs(self, channels: Sequence[int], out_features: Optional[Sequence[str]] = None,
                     always_return_ds: bool = False, first_stride: int = 4) -> None:
        """ShapeSpecs of res_k (``channels[k-2]``, stride ``first_stride * 2^(k-2)``) and of ds_k (k >= 3,
        same channels and stride as res_k), and which of them ``forward`` returns.

        ``out_features`` selects among all of them (default: all); with ``always_return_ds`` it selects
        among the res_k only and every ds_k is returned as well (HCFormer needs them).
        """
        self._num_stages = len(channels)
        self._out_feature_channels, self._out_feature_strides = {}, {}
        stages, downsampled = [], []
        for i, c in enumerate(channels):
            names = [f"res{i + 2}"] + ([downsampled_name(i + 2)] if i > 0 else [])
            for name in names:
                self._out_feature_channels[name] = c
                self._out_feature_strides[name] = first_stride * 2 ** i
            stages.append(names[0])
            downsampled += names[1:]
        choices = stages if always_return_ds else stages + downsampled
        out_features = list(out_features) if out_features else list(choices)
        unknown = [f for f in out_features if f not in choices]
        if unknown:
            note = f" ({', '.join(downsampled)} are always returned for HCFormer)" if always_return_ds else ""
            raise ValueError(f"{self.family} out_features ({self.config_node}.OUT_FEATURES) has unknown names "
                             f"{unknown}; choose from {choices}{note}")
        if always_return_ds:
            out_features += [d for d in downsampled if d not in out_features]
        self._out_features = out_features

    def select_outputs(self, outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The maps of ``outputs`` that ``output_shape()`` lists."""
        return {k: v for k, v in outputs.items() if k in self._out_features}

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{self.family} takes (N, C, H, W) images, got shape {tuple(x.shape)}")

    def clustering_pairs(self) -> Dict[int, Tuple[str, str]]:
        """Each stage output before a downsampling layer and that layer's output (res_k, ds_{k+1})."""
        return {k: (f"res{k}", downsampled_name(k + 1)) for k in range(2, self._num_stages + 1)}

    @property
    def size_divisibility(self) -> int:
        # any size works (ceil sizes, windows padded inside); 32 keeps every stage of a padded batch an
        # exact halving
        return 32
