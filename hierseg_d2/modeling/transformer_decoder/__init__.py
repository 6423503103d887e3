"""Transformer decoders (TRANSFORMER_DECODER_REGISTRY) and the layers shared with HCFormer+'s encoder."""
from .layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer, TransformerEncoder
from .masked_transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MaskedTransformerDecoder,
    build_transformer_decoder,
)
from .position_encoding import PositionEmbeddingSine
