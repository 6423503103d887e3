"""Sine positional encoding of a 2-D feature map (DETR / Mask2Former convention)."""
import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Fixed sin/cos encoding of normalised (y, x) coordinates: ``num_pos_feats`` channels per axis.

    Args:
        num_pos_feats: channels per axis (half the model width).
        temperature: base of the frequency progression.
        normalize: scale coordinates to (0, ``scale``] so the encoding does not depend on the map size.
        scale: range of the normalised coordinates (2*pi).
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, 2 * num_pos_feats, H, W); only the shape and device of ``x`` are used.

        ``mask`` (B, H, W), True at padded pixels: coordinates count the valid pixels only (cumsum of the
        not-mask), as Mask2Former and the HCFormer release do; None = no padding.
        """
        b, _, height, width = x.shape
        if mask is None:
            mask = torch.zeros((b, height, width), dtype=torch.bool, device=x.device)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            # the last coordinate maps to scale (y / (y_last + eps) * 2 pi), as the releases
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        # interleave sin on even and cos on odd channels
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)
