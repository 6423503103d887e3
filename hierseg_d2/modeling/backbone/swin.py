"""Swin Transformer as Mask2Former users know it (``D2SwinTransformer``, ``MODEL.SWIN.*``), with HCFormer pairs.

The network is Detectron2's own :class:`detectron2.modeling.backbone.swin.SwinTransformer`; this subclass
only reads ``MODEL.SWIN.*`` (Mask2Former's keys and defaults), names the outputs res2..res5 and also returns
the PatchMerging outputs ``ds3`` / ``ds4`` / ``ds5`` (HCFormer Fig. II: the map right after each patch-merging
layer, paired with the stage output before it). Subclassing keeps Mask2Former's parameter names
(``backbone.patch_embed.*``, ``backbone.layers.{i}.*``, ``backbone.norm{i}.*``), so its converted Swin
checkpoints load unchanged.

Detectron2's ``BasicLayer.forward`` already returns the PatchMerging output next to the stage output, so
:meth:`D2SwinTransformer.forward` repeats the parent's loop and keeps that tensor: no hook, same
computation. Any input size works: PatchEmbed pads to the patch size, windows are padded and cropped
inside each block and PatchMerging pads odd sizes, giving ceil(H / 2^k) x ceil(W / 2^k) at stride 2^k.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.swin import SwinTransformer

from .hierarchy import downsampled_name

__all__ = ["add_swin_config", "D2SwinTransformer"]


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
    def __init__(self, *, out_features=("res2", "res3", "res4", "res5"), **kwargs):
        num_stages = len(kwargs.get("depths", (2, 2, 6, 2)))
        valid = [f"res{i + 2}" for i in range(num_stages)]
        unknown = [f for f in out_features if f not in valid]
        if unknown:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES has {unknown}; choose from {valid}")
        # every stage gets its output norm (norm{i}) so that the parameter set matches Mask2Former's
        super().__init__(out_indices=tuple(range(num_stages)), **kwargs)
        self._out_features = list(out_features)
        self._stage_names = valid
        self._out_feature_strides = {}
        self._out_feature_channels = {}
        for i, name in enumerate(valid):
            self._out_feature_strides[name] = self.patch_embed.patch_size[0] * 2 ** i
            self._out_feature_channels[name] = self.num_features[i]
            if i > 0:  # PatchMerging output opening stage i + 2
                ds = downsampled_name(i + 2)
                self._out_feature_strides[ds] = self._out_feature_strides[name]
                self._out_feature_channels[ds] = self.num_features[i]

    def clustering_pairs(self) -> Dict[int, Tuple[str, str]]:
        """{2: ("res2", "ds3"), 3: ("res3", "ds4"), 4: ("res4", "ds5")}: stage output before each PatchMerging
        and the PatchMerging output."""
        return {i + 2: (self._stage_names[i], downsampled_name(i + 3)) for i in range(len(self._stage_names) - 1)}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """res_k (after the stage's output norm) for ``out_features``, and every ds_k (PatchMerging output)."""
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
            if name in self._out_features:
                x_out = getattr(self, f"norm{i}")(x_out)
                outputs[name] = x_out.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
            if layer.downsample is not None:  # x is the PatchMerging output, tokens of stage i + 1
                outputs[downsampled_name(i + 3)] = (
                    x.view(-1, Wh, Ww, self.num_features[i + 1]).permute(0, 3, 1, 2).contiguous())
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        names = self._out_features + [downsampled_name(i + 3) for i in range(len(self._stage_names) - 1)]
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in names}

    @property
    def size_divisibility(self) -> int:
        return 32

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        s = cfg.MODEL.SWIN
        if len(s.DEPTHS) != len(s.NUM_HEADS):
            raise ValueError(f"MODEL.SWIN.DEPTHS {s.DEPTHS} and MODEL.SWIN.NUM_HEADS {s.NUM_HEADS} differ in length")
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
            "out_features": s.OUT_FEATURES,
        }
