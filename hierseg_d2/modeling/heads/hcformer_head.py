"""HCFormer's segmentation head: no pixel decoder (Sec. 2.2, 2.5, Fig. 4).

The coarsest backbone map (``MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE``, default ``res5``) goes
(through HCFormer+'s optional transformer encoder, ``MODEL.MASK_FORMER.ENC_LAYERS``) to the
masked-attention transformer decoder; a 1x1 convolution of the same map gives the mask features
E_feature of eq. (4). The head also holds one :class:`ClusteringModule` per hierarchy level in use
(``MODEL.HCFORMER.LEVELS``, the coarsest levels of the backbone's clustering pairs) and returns their
soft assignments, finest first, for decoding (eq. 5) by the meta-architecture.
"""
import logging
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from fvcore.nn import weight_init
from torch import nn

from ..backbone.hierarchy import FALLBACK_PAIRS
from ..clustering import ClusteringModule
from ..transformer_decoder import PositionEmbeddingSine, TransformerEncoder, build_transformer_decoder

__all__ = ["HCFormerHead", "select_levels"]

logger = logging.getLogger(__name__)


def select_levels(pairs: Dict[int, Tuple[str, str]], levels: int, in_feature: str,
                  input_shape: Dict[str, ShapeSpec]) -> List[int]:
    """The ``levels`` coarsest clustering levels, finest first, checked to chain up to ``in_feature``.

    LEVELS=3 with pairs {2, 3, 4} gives [2, 3, 4] (masks at stride 4), LEVELS=1 gives [4] (stride 16),
    LEVELS=0 gives [] (masks stay at the stride of ``in_feature``).
    """
    # only levels whose "after" map is no coarser than the memory can decode its masks
    in_stride = input_shape[in_feature].stride
    available = [i for i in sorted(pairs) if 2 ** (i + 1) <= in_stride]
    if not 0 <= levels <= len(available):
        raise ValueError(f"MODEL.HCFORMER.LEVELS={levels}: below {in_feature!r} (stride {in_stride}) the backbone "
                         f"offers {len(available)} clustering levels {available}")
    chosen = available[len(available) - levels:]
    if chosen and chosen != list(range(chosen[0], chosen[0] + len(chosen))):
        raise ValueError(f"MODEL.HCFORMER.LEVELS={levels}: clustering levels {chosen} are not consecutive")
    if chosen and in_stride != 2 ** (chosen[-1] + 1):
        raise ValueError(f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={in_feature!r} has stride "
                         f"{in_stride}, but clustering level {chosen[-1]} decodes from "
                         f"stride {2 ** (chosen[-1] + 1)}")
    return chosen


@SEM_SEG_HEADS_REGISTRY.register()
class HCFormerHead(nn.Module):
    """Mask features (eq. 4), transformer decoder, and the clustering modules (eq. 3).

    Args:
        input_shape: the backbone's output_shape().
        num_classes: K (exposed as ``num_classes`` like Mask2Former's head).
        clustering_pairs: {level: (before, after)} from ``get_clustering_pairs(backbone)``.
        levels: number of hierarchy levels decoded (0-3).
        transformer_in_feature: name of the coarsest map.
        mask_dim: C_m, channels of the mask features / embeddings.
        cluster_dim, scale_init: ClusteringModule arguments (C_F, s init).
        transformer_predictor: the transformer decoder (built for the encoder's or the map's channels).
        encoder: HCFormer+'s transformer encoder, or None.
        encoder_input_proj: 1x1 projection (+ GroupNorm(32)) of the map to the encoder width, or None.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, num_classes: int,
                 clustering_pairs: Dict[int, Tuple[str, str]], levels: int, transformer_in_feature: str, mask_dim: int, cluster_dim: int, scale_init: float,
                 transformer_predictor: nn.Module, encoder: Optional[nn.Module] = None,
                 encoder_input_proj: Optional[nn.Module] = None):
        super().__init__()
        self.num_classes = num_classes
        if transformer_in_feature not in input_shape:
            raise KeyError(f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={transformer_in_feature!r} is not a "
                           f"backbone output; available: {sorted(input_shape)}")
        self.in_feature = transformer_in_feature
        self.levels = select_levels(clustering_pairs, levels, transformer_in_feature, input_shape)
        self.pairs = {level: clustering_pairs[level] for level in self.levels}
        self.clustering = nn.ModuleDict({
            str(level): ClusteringModule(input_shape[before].channels, input_shape[after].channels, cluster_dim,
                                         scale_init)
            for level, (before, after) in self.pairs.items()})
        self.encoder = encoder
        self.encoder_input_proj = encoder_input_proj
        if encoder is not None:
            feat_channels = encoder_input_proj.out_channels
            self.pe_layer = PositionEmbeddingSine(feat_channels // 2, normalize=True)
        else:
            feat_channels = input_shape[self.in_feature].channels
            self.pe_layer = None
        self.mask_features = Conv2d(feat_channels, mask_dim, kernel_size=1)  # the linear layer of eq. (4)
        weight_init.c2_xavier_fill(self.mask_features)
        self.predictor = transformer_predictor
        logger.info(f"HCFormerHead: clustering levels {self.levels} with (before, after) pairs {self.pairs}, "
                    f"masks from {self.in_feature!r}")

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec], clustering_pairs=None):
        mf = cfg.MODEL.MASK_FORMER
        in_feature = mf.TRANSFORMER_IN_FEATURE
        if in_feature not in input_shape:
            raise KeyError(f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={in_feature!r} is not a backbone output; "
                           f"available: {sorted(input_shape)}")
        if clustering_pairs is None:
            # built without a backbone at hand (build_sem_seg_head): only the documented fallback applies
            clustering_pairs = dict(FALLBACK_PAIRS)
        encoder = encoder_input_proj = None
        in_channels = input_shape[in_feature].channels
        if mf.ENC_LAYERS > 0:  # HCFormer+: the release's TransformerEnc (input projection 1x1 conv + GN(32))
            encoder_input_proj = Conv2d(in_channels, mf.HIDDEN_DIM, kernel_size=1,
                                        norm=nn.GroupNorm(32, mf.HIDDEN_DIM))
            nn.init.xavier_uniform_(encoder_input_proj.weight)  # the release inits every matrix xavier-uniform
            encoder = TransformerEncoder(mf.HIDDEN_DIM, mf.NHEADS, mf.ENC_LAYERS, mf.DIM_FEEDFORWARD,
                                         cfg.MODEL.HCFORMER.ENC_DROPOUT, mf.PRE_NORM)
            in_channels = mf.HIDDEN_DIM
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "clustering_pairs": clustering_pairs,
            "levels": cfg.MODEL.HCFORMER.LEVELS,
            "transformer_in_feature": in_feature,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "cluster_dim": cfg.MODEL.HCFORMER.CLUSTER_DIM,
            "scale_init": cfg.MODEL.HCFORMER.SCALE_INIT,
            "transformer_predictor": build_transformer_decoder(cfg, in_channels, mask_classification=True),
            "encoder": encoder,
            "encoder_input_proj": encoder_input_proj,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict:
        """Backbone features -> decoder predictions (mask logits at the coarsest stride) plus
        "assignments" (list of (B, 9, H_i, W_i), finest first) and "cluster_scales" (the s^(i))."""
        x = features[self.in_feature]
        if self.encoder is not None:
            x = self.encoder_input_proj(x)
            b, c, h, w = x.shape
            pos = self.pe_layer(x).flatten(2).permute(2, 0, 1)
            x = self.encoder(x.flatten(2).permute(2, 0, 1), pos).permute(1, 2, 0).reshape(b, c, h, w)
        outputs = self.predictor(x, self.mask_features(x))
        outputs["assignments"] = self.cluster(features)
        outputs["cluster_scales"] = [self.clustering[str(level)].scale for level in self.levels]
        return outputs

    def cluster(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """Soft assignments A^(i) for the levels in use, finest first."""
        assignments = []
        for n, level in enumerate(self.levels):
            before, after = self.pairs[level]
            # the decoding chain needs each after map to be the next level's before map (or the head's map)
            coarser = self.pairs[self.levels[n + 1]][0] if n + 1 < len(self.levels) else self.in_feature
            if features[after].shape[-2:] != features[coarser].shape[-2:]:
                raise ValueError(f"clustering level {level}: after map {after!r} is "
                                 f"{tuple(features[after].shape[-2:])} but {coarser!r} is "
                                 f"{tuple(features[coarser].shape[-2:])}; they must match to decode")
            assignments.append(self.clustering[str(level)](features[before], features[after]))
        return assignments
