"""Masked-attention transformer decoder (Mask2Former's design) on one feature map, as HCFormer uses it.

HCFormer has no pixel decoder, so the decoder attends to a single map, the backbone's coarsest one
(stride 32), instead of Mask2Former's three pixel-decoder scales (Sec. 4.1, App. C). Each layer is
masked cross-attention -> self-attention -> FFN; the attention mask of layer l is the mask predicted
after layer l - 1, at the memory's resolution. Predictions (class logits and mask logits from the mask
embeddings, eq. 4 before the sigmoid) are made from the learnable queries and after every layer for
deep supervision. As in the HCFormer release (HCTransformerDecoder) the memory gets a level embedding
(one level, so a learnt bias) and the positional encoding ignores padding.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry
from fvcore.nn import weight_init
from torch import nn

from .layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from .position_encoding import PositionEmbeddingSine

__all__ = ["TRANSFORMER_DECODER_REGISTRY", "build_transformer_decoder", "MaskedTransformerDecoder"]

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for HCFormer's transformer decoders: called with (cfg, in_channels, mask_classification).
"""


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True) -> nn.Module:
    """Build the decoder named by ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME`` (default
    ``MaskedTransformerDecoder``)."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


@TRANSFORMER_DECODER_REGISTRY.register()
class MaskedTransformerDecoder(nn.Module):
    """Single-scale masked-attention decoder giving class logits and mask logits per query.

    Args:
        in_channels: channels of the memory map (projected to ``hidden_dim`` by ``input_proj`` if needed).
        mask_classification: predict class logits (always True for HCFormer; kept for Mask2Former parity).
        num_classes: K; the class head has K + 1 outputs (last = no object).
        hidden_dim, num_queries, nheads, dim_feedforward, dec_layers, pre_norm, dropout: transformer sizes.
        mask_dim: channels of the mask embeddings, equal to those of the mask features.
        enforce_input_project: add a 1x1 projection even when in_channels == hidden_dim.
    """

    @configurable
    def __init__(self, in_channels: int, mask_classification: bool = True, *, num_classes: int, hidden_dim: int,
                 num_queries: int, nheads: int, dim_feedforward: int, dec_layers: int, pre_norm: bool,
                 mask_dim: int, enforce_input_project: bool, dropout: float = 0.0):
        super().__init__()
        if not mask_classification:
            raise ValueError("MaskedTransformerDecoder: HCFormer needs mask_classification=True")
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers))
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positional embeddings
        # one level (the release's single scale): a learnt bias added to the memory
        self.level_embed = nn.Embedding(1, hidden_dim)
        if in_channels != hidden_dim or enforce_input_project:
            self.input_proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
            weight_init.c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            "dec_layers": mf.DEC_LAYERS,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "dropout": mf.DROPOUT,
        }

    def forward(self, x: torch.Tensor, mask_features: torch.Tensor) -> Dict:
        """
        Args:
            x: (B, C_in, h, w) memory map (the coarsest backbone map, or HCFormer+'s encoder output).
            mask_features: (B, mask_dim, h', w') per-pixel embeddings E_feature of eq. (4).

        Returns:
            dict with "pred_logits" (B, Q, K + 1), "pred_masks" (B, Q, h', w') mask logits of the last
            layer, and "aux_outputs": the same two keys for the earlier predictions.
        """
        memory_hw = x.shape[-2:]
        pos = self.pe_layer(x).flatten(2).permute(2, 0, 1)  # (hw, B, C)
        memory = (self.input_proj(x).flatten(2) + self.level_embed.weight[..., None]).permute(2, 0, 1)
        batch = x.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)  # (Q, B, C)

        classes, masks = [], []
        logits, mask_logits, attn_mask = self.forward_prediction_heads(output, mask_features, memory_hw)
        classes.append(logits)
        masks.append(mask_logits)
        for i in range(self.num_layers):
            output = self.transformer_cross_attention_layers[i](output, memory, memory_mask=attn_mask, pos=pos,
                                                                query_pos=query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            logits, mask_logits, attn_mask = self.forward_prediction_heads(output, mask_features, memory_hw)
            classes.append(logits)
            masks.append(mask_logits)
        return {"pred_logits": classes[-1], "pred_masks": masks[-1],
                "aux_outputs": self._aux_outputs(classes[:-1], masks[:-1])}

    def forward_prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor, memory_hw):
        """Class logits, mask logits and the next layer's attention mask from the current queries."""
        decoded = self.decoder_norm(output).transpose(0, 1)  # (B, Q, C)
        class_logits = self.class_embed(decoded)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        # masked attention: attend only where the current mask is foreground (prob >= 0.5)
        resized = mask_logits if mask_logits.shape[-2:] == memory_hw else F.interpolate(
            mask_logits, size=memory_hw, mode="bilinear", align_corners=False)
        attn_mask = (resized.sigmoid().flatten(2) < 0.5).detach()  # True = not allowed
        # a query whose mask is empty would attend to nothing (NaN): let it attend everywhere (as Mask2Former's
        # in-place `attn_mask[attn_mask.all(-1)] = False`, written without indexing: that exports as a boolean
        # Where, which onnxruntime does not implement)
        attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
        attn_mask = attn_mask.repeat_interleave(self.num_heads, dim=0)  # (B * nheads, Q, hw)
        return class_logits, mask_logits, attn_mask

    @staticmethod
    def _aux_outputs(classes: List[torch.Tensor], masks: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        return [{"pred_logits": c, "pred_masks": m} for c, m in zip(classes, masks)]
