"""Swin Transformer as Mask2Former users know it (``D2SwinTransformer``, ``MODEL.SWIN.*``), with HCFormer pairs.

The network is Detectron2's own :class:`detectron2.modeling.backbone.swin.SwinTransformer`; this subclass
only reads ``MODEL.SWIN.*`` (Mask2Former's keys and defaults), names the outputs res2..res5 and also returns
the maps the release's ``HCSwinTransformer`` (DensoITLab/HCFormer, hcformer/modeling/backbone/hcswin.py)
hands its clustering modules. For each patch merging between stage k and k + 1 the release pairs

* before: the stage-k output tokens BEFORE any output norm, returned here as ``res{k}_prenorm``, and
* after: the PatchMerging output (its LayerNorm + linear reduction), the first tokens of stage k + 1,
  returned as ``ds{k+1}``.

Only the stages in ``MODEL.SWIN.OUT_FEATURES`` get an output norm ``norm{i}`` (Detectron2's
``out_indices``); the release builds ``norm3`` alone (its ``out_indices=(3,)``) and its head reads res5
only, so the HCFormer Swin configs set ``OUT_FEATURES: ["res5"]`` and the checkpoint layouts agree
(:func:`release_backbone_key_map`). Subclassing keeps Mask2Former's parameter names
(``backbone.patch_embed.*``, ``backbone.layers.{i}.*``, ``backbone.norm{i}.*``), so converted Swin checkpoints
load unchanged. For HCFormer (``MODEL.META_ARCHITECTURE: HCFormer``) the stages after the head's
``TRANSFORMER_IN_FEATURE`` are removed (:func:`.hierarchy.hcformer_out_features`).

Detectron2's ``BasicLayer.forward`` already returns the PatchMerging output next to the stage output, so
:meth:`D2SwinTransformer.forward` repeats the parent's loop and keeps both tensors: no hook, same
computation. Any input size works: PatchEmbed pads to the patch size, windows are padded and cropped
inside each block and PatchMerging pads odd sizes, giving ceil(H / 2^k) x ceil(W / 2^k) at stride 2^k.
"""
import logging
import re
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.swin import SwinTransformer

from .hierarchy import downsampled_name, hcformer_out_features

__all__ = ["add_swin_config", "D2SwinTransformer", "prenorm_name", "release_backbone_key_map"]

logger = logging.getLogger(__name__)


def prenorm_name(stage: int) -> str:
    """Name of stage ``stage``'s output before its output norm (the "before" map of a clustering pair)."""
    return f"res{stage}_prenorm"


def add_swin_config(cfg: CN) -> None:
    """``MODEL.SWIN`` with Mask2Former's keys and defaults (Swin-T; variants are set in the config files)."""
    cfg.MODEL.SWIN = CN()
    s = cfg.MODEL.SWIN
    s.PRETRAIN_IMG_SIZE = 224
    s.PATCH_SIZE = 4
    s.EMBED_DIM = 96
    s.DEPTHS = [2, 2, 6, 2]
    s.NUM_HEADS = [3, 6, 12, 24]
    s.WINDOW_SIZE = 7
    s.MLP_RATIO = 4.0
    s.QKV_BIAS = True
    s.QK_SCALE = None
    s.DROP_RATE = 0.0
    s.ATTN_DROP_RATE = 0.0
    s.DROP_PATH_RATE = 0.3
    s.APE = False
    s.PATCH_NORM = True
    s.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    s.USE_CHECKPOINT = False


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(SwinTransformer):
    """Detectron2's SwinTransformer returning res2..res5 (``out_features``) plus ds3..ds5 for HCFormer.

    Built from a config as ``D2SwinTransformer(cfg, input_shape)`` (Mask2Former's signature, used by
    ``build_backbone``) or from keyword arguments (those of Detectron2's SwinTransformer + ``out_features``).
    """

    @configurable
    def __init__(self, *, out_features=("res2", "res3", "res4", "res5"), num_stages: Optional[int] = None,
                 **kwargs):
        """``num_stages`` (default: all of ``depths``) keeps only the first stages; the rest are built (so
        initialisation and stochastic-depth rates are those of the full network) and then removed."""
        total = len(kwargs.get("depths", (2, 2, 6, 2)))
        num_stages = total if num_stages is None else num_stages
        if not 1 <= num_stages <= total:
            raise ValueError(f"D2SwinTransformer: num_stages must be in 1..{total}, got {num_stages}")
        valid = [f"res{i + 2}" for i in range(num_stages)]
        unknown = [f for f in out_features if f not in valid]
        if unknown:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES has {unknown}; choose from {valid}")
        # an output norm (norm{i}) only for the stages that are returned, as Detectron2's out_indices
        super().__init__(out_indices=tuple(valid.index(f) for f in out_features), **kwargs)
        if num_stages < total:
            del self.layers[num_stages:]
            self.layers[-1].downsample = None
            self.num_layers = num_stages
            self.num_features = self.num_features[:num_stages]
        self._out_features = list(out_features)
        self._stage_names = valid
        self._out_feature_strides = {}
        self._out_feature_channels = {}
        for i, name in enumerate(valid):
            stride = self.patch_embed.patch_size[0] * 2 ** i
            if name in self._out_features:
                self._out_feature_strides[name], self._out_feature_channels[name] = stride, self.num_features[i]
            if i + 1 < num_stages:  # the stage output before the PatchMerging that opens stage i + 1
                pre = prenorm_name(i + 2)
                self._out_feature_strides[pre], self._out_feature_channels[pre] = stride, self.num_features[i]
            if i > 0:  # PatchMerging output opening stage i + 2
                ds = downsampled_name(i + 2)
                self._out_feature_strides[ds], self._out_feature_channels[ds] = stride, self.num_features[i]

    def clustering_pairs(self) -> Dict[int, Tuple[str, str]]:
        """{2: ("res2_prenorm", "ds3"), 3: ("res3_prenorm", "ds4"), 4: ("res4_prenorm", "ds5")}: the stage output
        before each PatchMerging (no output norm, as the release) and the PatchMerging output."""
        return {i + 2: (prenorm_name(i + 2), downsampled_name(i + 3)) for i in range(len(self._stage_names) - 1)}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """res_k (after the stage's output norm) for ``out_features``; every res_k_prenorm (stage output
        before a PatchMerging) and ds_k (PatchMerging output)."""
        assert x.dim() == 4, f"SwinTransformer takes an input of shape (N,C,H,W). Got {x.shape} instead!"
        x = self.patch_embed(x)
        Wh, Ww = x.size(2), x.size(3)
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=(Wh, Ww), mode="bicubic")
            x = x + pos
        x = self.pos_drop(x.flatten(2).transpose(1, 2))

        outputs = {}
        for i, layer in enumerate(self.layers):
            x_out, H, W, x, Wh, Ww = layer(x, Wh, Ww)
            name = self._stage_names[i]
            if layer.downsample is not None:  # x is the PatchMerging output, tokens of stage i + 1
                outputs[prenorm_name(i + 2)] = self._to_map(x_out, H, W, self.num_features[i])
                outputs[downsampled_name(i + 3)] = self._to_map(x, Wh, Ww, self.num_features[i + 1])
            if name in self._out_features:
                outputs[name] = self._to_map(getattr(self, f"norm{i}")(x_out), H, W, self.num_features[i])
        return outputs

    @staticmethod
    def _to_map(tokens: torch.Tensor, H: int, W: int, C: int) -> torch.Tensor:
        return tokens.view(-1, H, W, C).permute(0, 3, 1, 2).contiguous()

    def output_shape(self) -> Dict[str, ShapeSpec]:
        n = len(self._stage_names)
        names = (self._out_features + [prenorm_name(i + 2) for i in range(n - 1)]
                 + [downsampled_name(i + 3) for i in range(n - 1)])
        return {k: ShapeSpec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in names}

    @property
    def size_divisibility(self) -> int:
        return 32

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        s = cfg.MODEL.SWIN
        if len(s.DEPTHS) != len(s.NUM_HEADS):
            raise ValueError(f"MODEL.SWIN.DEPTHS {s.DEPTHS} and MODEL.SWIN.NUM_HEADS {s.NUM_HEADS} differ in length")
        out_features = hcformer_out_features(cfg, s.OUT_FEATURES, "MODEL.SWIN.OUT_FEATURES")
        in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE if "MASK_FORMER" in cfg.MODEL else None
        if cfg.MODEL.META_ARCHITECTURE == "HCFormer" and in_feature in out_features and len(out_features) > 1:
            # the head reads only its input (+ the pre-norm pairs): other output norms would get no gradient
            logger.info(f"MODEL.SWIN.OUT_FEATURES: only {in_feature!r} gets an output norm, the HCFormer head "
                        f"reads nothing else (as the release's out_indices=(3,))")
            out_features = [in_feature]
        if not out_features:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES is empty (given {list(s.OUT_FEATURES)})")
        bad = [f for f in out_features if not re.fullmatch(r"res[2-9]", f) or int(f[3:]) - 1 > len(s.DEPTHS)]
        if bad:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES has {bad}; choose from "
                             f"{['res%d' % (i + 2) for i in range(len(s.DEPTHS))]}")
        return {
            "pretrain_img_size": s.PRETRAIN_IMG_SIZE,
            "patch_size": s.PATCH_SIZE,
            "in_chans": input_shape.channels,
            "embed_dim": s.EMBED_DIM,
            "depths": tuple(s.DEPTHS),
            "num_heads": tuple(s.NUM_HEADS),
            "window_size": s.WINDOW_SIZE,
            "mlp_ratio": s.MLP_RATIO,
            "qkv_bias": s.QKV_BIAS,
            "qk_scale": s.QK_SCALE,
            "drop_rate": s.DROP_RATE,
            "attn_drop_rate": s.ATTN_DROP_RATE,
            "drop_path_rate": s.DROP_PATH_RATE,
            "ape": s.APE,
            "patch_norm": s.PATCH_NORM,
            "use_checkpoint": s.USE_CHECKPOINT,
            "out_features": out_features,
            "num_stages": max(int(f[3:]) for f in out_features) - 1,
        }


_RELEASE_SWIN = re.compile(r"patch_embed\.(proj|norm)\.(weight|bias)|absolute_pos_embed|norm\d+\.(weight|bias)|"
                           r"layers\.\d+\.(blocks\.\d+\.[\w.]+|downsample\.(reduction\.weight|norm\.(weight|bias)))")


def release_backbone_key_map(key: Union[str, Mapping[str, torch.Tensor]]):
    """Our name for a tensor of the release's ``HCSwinTransformer`` backbone (DensoITLab/HCFormer).

    Two forms, as :func:`.resnet_dcn.release_backbone_key_map`: one name -> Optional[str], or the release's
    backbone tensors {name: Tensor} -> {our name: Tensor} (KeyError naming any tensor that does not map).

    ``key`` is relative to the backbone (the checkpoint's ``backbone.`` prefix removed), the result relative
    to ours. Both are Mask2Former's Swin, so the Swin tensors keep their names (``patch_embed.*``,
    ``layers.{i}.blocks.{j}.*`` incl. the ``relative_position_index`` buffers, ``layers.{i}.downsample.*``,
    ``norm3.*``). Returns None for tensors that are not the Swin's: the release keeps its clustering
    modules (``layers.{i}.clustering.*``) and HCFormer+'s encoder (``aux.*``) inside the backbone; they belong
    to our head. Raises KeyError for anything else.
    """
    if not isinstance(key, str):
        from .resnet_dcn import _convert_state

        return _convert_state(key, release_backbone_key_map, "HCSwinTransformer")
    if key.startswith("aux.") or re.match(r"layers\.\d+\.clustering\.", key):
        return None
    if _RELEASE_SWIN.fullmatch(key):
        return key
    raise KeyError(f"{key!r} is not a tensor of the release's HCSwinTransformer backbone")
