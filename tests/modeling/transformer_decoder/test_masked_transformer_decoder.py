"""Single-scale masked-attention decoder: outputs, deep supervision, masking, parameter count."""
import math

import torch

from hierseg_d2.modeling.transformer_decoder import MaskedTransformerDecoder, PositionEmbeddingSine


def _decoder(**kw):
    args = dict(in_channels=24, num_classes=5, hidden_dim=32, num_queries=6, nheads=2, dim_feedforward=64,
                dec_layers=2, pre_norm=False, mask_dim=16, enforce_input_project=False)
    args.update(kw)
    return MaskedTransformerDecoder(**args)


def test_outputs_and_deep_supervision():
    torch.manual_seed(0)
    dec = _decoder()
    out = dec(torch.randn(2, 24, 3, 5), torch.randn(2, 16, 3, 5))
    assert out["pred_logits"].shape == (2, 6, 6) and out["pred_masks"].shape == (2, 6, 3, 5)
    # one prediction from the learnable queries plus one after each of the first L - 1 layers
    assert len(out["aux_outputs"]) == 2
    assert all(a["pred_masks"].shape == (2, 6, 3, 5) for a in out["aux_outputs"])


def test_cross_attention_ignores_masked_memory():
    torch.manual_seed(1)
    dec = _decoder(dec_layers=1).eval()
    x, mask_features = torch.randn(1, 24, 4, 4), torch.randn(1, 16, 4, 4)
    captured = []
    dec.transformer_cross_attention_layers[0].register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    _, _, attn_mask = dec.forward_prediction_heads(dec.query_feat.weight[:, None], mask_features, (4, 4))
    blocked = attn_mask[0, 0]  # query 0, head 0: memory positions query 0 may not see
    assert blocked.any() and not blocked.all(), "pick a seed where query 0's mask is partial"
    dec(x, mask_features)
    x2 = x.clone().flatten(2)
    x2[:, :, blocked] += 10 * torch.randn_like(x2[:, :, blocked])
    dec(x2.view_as(x), mask_features)
    torch.testing.assert_close(captured[0][0], captured[1][0])  # query 0 unchanged
    assert not torch.allclose(captured[0][1:], captured[1][1:])  # other queries do see those positions


def test_empty_mask_attends_everywhere():
    dec = _decoder(dec_layers=1)
    with torch.no_grad():  # mask embeddings of all ones on negative features: every mask is empty
        dec.mask_embed.layers[-1].weight.zero_()
        dec.mask_embed.layers[-1].bias.fill_(1.0)
    logits, masks, attn_mask = dec.forward_prediction_heads(dec.query_feat.weight[:, None],
                                                            torch.full((1, 16, 2, 2), -1.0), (2, 2))
    assert torch.all(masks < 0)
    assert not attn_mask.any()  # instead of attending to nothing (NaN), attend everywhere


def test_parameter_count_of_default_sizes():
    d, f, q, k, c, m, layers = 256, 2048, 100, 133, 2048, 256, 8
    dec = _decoder(in_channels=c, num_classes=k, hidden_dim=d, num_queries=q, nheads=8, dim_feedforward=f,
                   dec_layers=layers, mask_dim=m)
    attention = 4 * d * d + 4 * d + 2 * d  # in/out projections + their biases + LayerNorm
    ffn = 2 * d * f + d + f + 2 * d
    expected = (layers * (2 * attention + ffn) + 2 * d  # layers + decoder_norm
                + 2 * q * d + d  # query features + query positional embeddings + level embedding
                + c * d + d  # input projection
                + d * (k + 1) + k + 1  # class head
                + 2 * (d * d + d) + d * m + m)  # 3-layer mask MLP
    assert sum(p.numel() for p in dec.parameters()) == expected
    print(f"decoder params: {expected / 1e6:.2f}M")


def test_sine_encoding_shape_and_range():
    pos = PositionEmbeddingSine(8)(torch.zeros(2, 3, 5, 7))
    assert pos.shape == (2, 16, 5, 7) and pos.abs().max() <= 1
    assert not torch.allclose(pos[:, :, 0, 0], pos[:, :, 4, 6])


def test_sine_encoding_normalises_by_the_last_valid_coordinate():
    # Mask2Former / HCFormer release: y / (y_last + eps) * 2 pi with y = 1..H counted on the not-mask
    height, width = 5, 7
    pos = PositionEmbeddingSine(8, normalize=True)(torch.zeros(1, 3, height, width))
    ys = torch.arange(1, height + 1, dtype=torch.float32) / (height + 1e-6) * 2 * math.pi
    xs = torch.arange(1, width + 1, dtype=torch.float32) / (width + 1e-6) * 2 * math.pi
    torch.testing.assert_close(pos[0, 0, :, 0], ys.sin())  # channel 0: sin of y at the lowest frequency
    torch.testing.assert_close(pos[0, 1, :, 0], ys.cos())
    torch.testing.assert_close(pos[0, 8, 0, :], xs.sin())  # channels 8..: x
    # padded columns (True in the mask) do not count: the valid part is encoded as a map of its own size
    mask = torch.zeros(1, height, width + 3, dtype=torch.bool)
    mask[..., width:] = True
    padded = PositionEmbeddingSine(8, normalize=True)(torch.zeros(1, 3, height, width + 3), mask)
    torch.testing.assert_close(padded[..., :width], pos)
