"""The contract through which a backbone hands HCFormer the feature maps around its downsampling layers.

HCFormer (Sec. 2.2, Fig. II) clusters the pixels of the map *before* a downsampling layer, F^(i) at stride
2^i, with the pixels of the map *right after* that layer, F_d^(i) at stride 2^(i+1), as prototypes.
A backbone opts in by implementing ``clustering_pairs()``:

    def clustering_pairs(self) -> Dict[int, Tuple[str, str]]:
        return {2: ("res2", "ds3"), 3: ("res3", "ds4"), 4: ("res4", "ds5")}

Level ``i`` maps to the names of (before, after) in the dict returned by ``forward()``; both names must
also appear in ``output_shape()`` (channels and stride 2^i / 2^(i+1)). By convention the map right after
the downsampling layer into stage k is called ``ds{k}`` (see :func:`downsampled_name`). Returning extra
keys from ``forward()`` is harmless for Detectron2 heads, which select their ``in_features``, and it does
not change the backbone's feed-forward path.

Spatial sizes: every backbone in this project returns res_k (and ds_k) of size ceil(H / 2^k) x
ceil(W / 2^k) for an H x W input, the size a chain of stride-2 convolutions with padding gives. The
clustering module accepts an "after" map of ceil(n / 2) or floor(n / 2) for a "before" map of n.

Fallback: a Detectron2 backbone without ``clustering_pairs()`` that outputs res2..res5 is paired stage
by stage, (res2, res3), (res3, res4), (res4, res5): the stage output after the downsampling stage
stands in for the map right after the downsampling layer.
"""
import logging
from typing import Dict, Tuple

from detectron2.modeling import Backbone

__all__ = ["FALLBACK_PAIRS", "downsampled_name", "get_clustering_pairs"]

logger = logging.getLogger(__name__)

FALLBACK_PAIRS: Dict[int, Tuple[str, str]] = {2: ("res2", "res3"), 3: ("res3", "res4"), 4: ("res4", "res5")}


def downsampled_name(stage: int) -> str:
    """Name of the map right after the downsampling layer that opens stage ``stage`` (stride 2^stage)."""
    return f"ds{stage}"


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
