"""HAT-Net: vision transformers with hierarchical multi-head self-attention (H-MHSA).

Liu et al., "Vision Transformers with Hierarchical Attention" (Sec. 3, eq. 6-14, Table 1). H-MHSA first
attends inside G1 x G1 grids (local, eq. 6-9), then lets every token attend to the G2 x G2 average-pooled
map of that local result (global, eq. 10-13), and projects the sum (eq. 14).

Module and parameter names follow the authors' release (``patch_embed``, ``blocks.<stage>.<i>.attn``
/ ``.conv``, ``ds2``..``ds4``), so their ImageNet checkpoints load after :func:`convert_hat_net_state_dict`
adds the ``backbone.`` prefix. Two naming facts to keep in mind:

* the paper numbers the stem "stage 1", so transformer stages 2-5 of the paper are ``blocks.0``..``blocks.3``
  here and produce ``res2``..``res5`` (strides 4-32);
* the authors' downsampling module ``ds{k}`` closes paper stage k; its output (conv 3x3 stride 2 followed by
  its GroupNorm ``ds{k}.norm``) opens our stage k+1 and is returned as the HCFormer "after" map
  ``ds{k+1}``: module ``ds2`` -> output ``ds3`` (stride 8), ``ds3`` -> ``ds4``, ``ds4`` -> ``ds5``.

Every norm is ``GroupNorm(1, C, eps=1e-6)`` (LayerNorm over C, H and W of each image) as in the release.
The release also holds an ``attn.proj_norm`` per block that its forward never uses; we leave it out (an
unused parameter breaks DistributedDataParallel) and the converter drops it.

Any input size works: the local attention pads to a multiple of G1 and masks the padded keys; the pooled
keys average only over real positions (windows overlapping the border are partial, never empty).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from timm.layers import DropPath, trunc_normal_
from torch import nn

from .convert import add_prefix, split_state_dict
from .hierarchy import HierarchicalBackbone, downsampled_name
from .layers import pad_to_multiple
from .presets import resolve_preset

__all__ = [
    "HATNET_PRESETS",
    "GRID_SETTINGS",
    "MHSA",
    "HMHSA",
    "DWConvMLP",
    "HATBlock",
    "Downsample",
    "HATNet",
    "add_hat_net_config",
    "build_hat_net_backbone",
    "convert_hat_net_state_dict",
]

# Table 1 of the paper (confirmed by the release): channels, blocks, head dim, MLP expansion E, DW-conv K.
HATNET_PRESETS = {
    "tiny": dict(dims=(48, 96, 240, 384), depths=(2, 2, 6, 3), head_dim=48, expansions=(8, 8, 4, 4),
                 kernel_sizes=(3, 3, 3, 3), drop_path_rate=0.1),
    "small": dict(dims=(64, 128, 320, 512), depths=(2, 3, 8, 3), head_dim=64, expansions=(8, 8, 4, 4),
                  kernel_sizes=(3, 3, 3, 3), drop_path_rate=0.1),
    "medium": dict(dims=(64, 128, 320, 512), depths=(3, 6, 18, 3), head_dim=64, expansions=(8, 8, 4, 4),
                   kernel_sizes=(5, 3, 5, 3), drop_path_rate=0.1),
    "large": dict(dims=(64, 128, 320, 640), depths=(3, 8, 27, 3), head_dim=64, expansions=(8, 8, 4, 4),
                  kernel_sizes=(3, 3, 3, 3), drop_path_rate=0.1),
}

# G1 (grid size of the local attention) and G2 (pooling of the global keys) for the three H-MHSA stages
# (res2, res3, res4; the paper's stages 2-4). Parameter-free: switching needs no retraining (Sec. 3.3).
GRID_SETTINGS = {
    "dense": dict(g1=(8, 8, 8), g2=(16, 8, 4)),  # segmentation / detection (Sec. 3.3, 4.2, 4.3)
    "imagenet": dict(g1=(8, 7, 7), g2=(8, 4, 2)),  # 224 x 224 classification (Sec. 4.1)
}


def _norm(dim: int) -> nn.GroupNorm:
    """The release's norm: one group, i.e. a LayerNorm over (C, H, W) of each image."""
    return nn.GroupNorm(1, dim, eps=1e-6)


class MHSA(nn.Module):
    """Plain global multi-head self-attention on a (B, C, H, W) map (eq. 1-3; the last stage of HAT-Net).

    ``forward`` returns A W^p; the residual "+ X" of eq. 3 is added by :class:`HATBlock` (with drop path).
    """

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"HAT-Net attention: channels {dim} are not a multiple of head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.norm = _norm(dim)
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)  # W^q, W^k, W^v stacked: channel = which*C + head*d + j
        self.proj = nn.Conv2d(dim, dim, 1)  # W^p

    def split_heads(self, x: torch.Tensor, parts: int) -> torch.Tensor:
        """(B, parts*C, H, W) -> (parts, B, heads, H*W, head_dim)."""
        B = x.shape[0]
        return x.reshape(B, parts, self.num_heads, self.head_dim, -1).permute(1, 0, 2, 4, 3)

    def merge_heads(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B, heads, H*W, head_dim) -> (B, C, H, W)."""
        B = x.shape[0]
        return x.transpose(-2, -1).reshape(B, self.num_heads * self.head_dim, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        q, k, v = self.split_heads(self.qkv(self.norm(x)), 3)
        return self.proj(self.merge_heads(F.scaled_dot_product_attention(q, k, v), H, W))


class HMHSA(MHSA):
    """Hierarchical multi-head self-attention (eq. 6-14).

    Local step: ``qkv`` (W_1^q, W_1^k, W_1^v) of the normalised input, attention inside each G1 x G1 grid
    (eq. 6-8), residual and ``grid_norm`` (eq. 9): A_1 = GN(X + local). Global step: queries ``q`` (W_2^q)
    of A_1, keys/values ``kv`` (W_2^k, W_2^v) of ``ds_norm(AvgPool_G2(A_1))`` (eq. 10-13). Output
    (A_1 + A_2) W^p (eq. 14; :class:`HATBlock` adds X).

    Maps that are not multiples of G1 are padded at the bottom/right and the padded keys are masked out
    of every local softmax (each grid keeps at least one real key because the padding is < G1). The G2
    pooling covers ceil(H/G2) x ceil(W/G2) windows and averages over the real positions only, so border
    windows are partial means and no window consists of padding alone.
    ``grid_size`` and ``ds_ratio`` hold no parameters and may be changed on a trained module.
    """

    def __init__(self, dim: int, head_dim: int, grid_size: int = 8, ds_ratio: int = 8):
        super().__init__(dim, head_dim)
        self.grid_size = grid_size  # G1
        self.ds_ratio = ds_ratio  # G2
        self.grid_norm = _norm(dim)
        self.ds_norm = _norm(dim)
        self.q = nn.Conv2d(dim, dim, 1)
        self.kv = nn.Conv2d(dim, 2 * dim, 1)

    def local_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention inside G1 x G1 grids of a (B, 3C, H, W) qkv map; returns (B, C, H, W)."""
        B, _, H, W = qkv.shape
        G = self.grid_size
        qkv = pad_to_multiple(qkv, G)
        Hp, Wp = qkv.shape[-2:]
        nh, nw = Hp // G, Wp // G
        # (B, 3, heads, d, nh, G, nw, G) -> (3, B, heads * nh * nw grids, G*G tokens, d): 4-D, as the fused
        # attention kernels want
        qkv = qkv.reshape(B, 3, self.num_heads, self.head_dim, nh, G, nw, G)
        q, k, v = qkv.permute(1, 0, 2, 4, 6, 5, 7, 3).reshape(3, B, self.num_heads * nh * nw, G * G, -1)
        mask = None
        if (Hp, Wp) != (H, W):
            valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=qkv.device)
            valid[:H, :W] = True
            # one row of allowed keys per grid (head-major like q), broadcast over batch and queries
            mask = valid.reshape(nh, G, nw, G).permute(0, 2, 1, 3).reshape(nh * nw, 1, G * G)
            mask = mask.repeat(self.num_heads, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.reshape(B, self.num_heads, nh, nw, G, G, self.head_dim).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(B, self.num_heads * self.head_dim, Hp, Wp)[:, :, :H, :W]

    def pool(self, a1: torch.Tensor) -> torch.Tensor:
        """AvgPool_G2 (eq. 10) over ceil-sized windows, each averaged over its real positions only."""
        # padding=0 with ceil_mode: border windows are clipped to the map and divided by their clipped
        # size, i.e. the mean of the real positions (the border windows always start inside the map)
        return F.avg_pool2d(a1, self.ds_ratio, self.ds_ratio, ceil_mode=True, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        a1 = self.grid_norm(x + self.local_attention(self.qkv(self.norm(x))))  # eq. 6-9
        (q,) = self.split_heads(self.q(a1), 1)  # eq. 12
        k, v = self.split_heads(self.kv(self.ds_norm(self.pool(a1))), 2)  # eq. 10-12
        a2 = self.merge_heads(F.scaled_dot_product_attention(q, k, v), H, W)  # eq. 13
        return self.proj(a1 + a2)  # eq. 14 without + X


class DWConvMLP(nn.Module):
    """HAT-Net's MLP: GN, 1x1 expansion, SiLU, KxK depth-wise conv, SiLU, 1x1 reduction, GN (no biases).

    Attribute and index names (``conv1.0`` norm, ``conv1.1`` conv, ``conv2.0``, ``conv3.0``, ``conv3.1``)
    are the release's.
    """

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 3, act_layer=nn.SiLU):
        super().__init__()
        self.conv1 = nn.Sequential(_norm(dim), nn.Conv2d(dim, hidden_dim, 1, bias=False), act_layer())
        self.conv2 = nn.Sequential(
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2, groups=hidden_dim,
                      bias=False),
            act_layer(),
        )
        self.conv3 = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1, bias=False), _norm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class HATBlock(nn.Module):
    """x + attn(x) (eq. 3 / eq. 14), then x + MLP(x) (eq. 4), both residual branches with drop path."""

    def __init__(self, dim: int, head_dim: int, expansion: int, kernel_size: int, drop_path: float = 0.0,
                 grid_size: Optional[int] = None, ds_ratio: Optional[int] = None):
        super().__init__()
        if grid_size is None:
            self.attn = MHSA(dim, head_dim)
        else:
            self.attn = HMHSA(dim, head_dim, grid_size, ds_ratio)
        self.conv = DWConvMLP(dim, dim * expansion, kernel_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.conv(x))


class Downsample(nn.Module):
    """3x3 stride-2 convolution followed by GroupNorm between two stages."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = _norm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def _check_grid(values: Sequence[int], name: str) -> Tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"HAT-Net {name} must hold 3 positive integers (stages res2, res3, res4), "
                         f"got {list(values)}")
    return values


class HATNet(HierarchicalBackbone):
    """HAT-Net backbone (Fig. 1, Table 1) returning res2..res5 (``out_features``) and ds3..ds5.

    Stem: conv 3x3 s2 (3 -> 16), GN, SiLU, conv 3x3 s2 (16 -> dims[0]). Stages res2..res4 stack
    H-MHSA + MLP blocks with grid sizes ``g1`` and pooling ratios ``g2``; res5 uses plain global MHSA.
    Stages are joined by :class:`Downsample` (the authors' ``ds2``, ``ds3``, ``ds4``; see the module
    docstring for how they map to the output names ``ds3``, ``ds4``, ``ds5``, which are always returned).

    Built as ``HATNet(cfg, input_shape)`` (``MODEL.HATNET``, see :func:`add_hat_net_config`) or from
    keyword arguments, e.g. ``HATNet(**HATNET_PRESETS["small"])``.
    """

    family = "HAT-Net"
    config_node = "MODEL.HATNET"

    @configurable
    def __init__(self, *, dims: Sequence[int] = (48, 96, 240, 384), depths: Sequence[int] = (2, 2, 6, 3),
                 head_dim: int = 48, expansions: Sequence[int] = (8, 8, 4, 4),
                 kernel_sizes: Sequence[int] = (3, 3, 3, 3), g1: Sequence[int] = (8, 8, 8),
                 g2: Sequence[int] = (16, 8, 4), drop_path_rate: float = 0.0, in_chans: int = 3,
                 out_features: Sequence[str] = ("res2", "res3", "res4", "res5")):
        super().__init__()
        for name, values in (("dims", dims), ("depths", depths), ("expansions", expansions),
                             ("kernel_sizes", kernel_sizes)):
            if len(values) != 4:
                raise ValueError(f"HAT-Net {name} must have 4 entries (res2..res5), got {list(values)}")
        g1, g2 = _check_grid(g1, "g1 (MODEL.HATNET.G1)"), _check_grid(g2, "g2 (MODEL.HATNET.G2)")
        self.patch_embed = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, stride=2, padding=1),
            _norm(16),
            nn.SiLU(),
            nn.Conv2d(16, dims[0], 3, stride=2, padding=1),
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.blocks = nn.ModuleList()
        for s in range(4):
            first = sum(depths[:s])
            grid = dict(grid_size=g1[s], ds_ratio=g2[s]) if s < 3 else {}
            self.blocks.append(nn.ModuleList(
                HATBlock(dims[s], head_dim, expansions[s], kernel_sizes[s], dpr[first + i], **grid)
                for i in range(depths[s])
            ))
        # the authors' names: ds{k} closes paper stage k (= our res{k}) and opens our stage k+1
        self.ds2 = Downsample(dims[0], dims[1])
        self.ds3 = Downsample(dims[1], dims[2])
        self.ds4 = Downsample(dims[2], dims[3])
        self.apply(self._init_weights)
        self.init_outputs(dims, out_features, always_return_ds=True)

    @classmethod
    def from_config(cls, cfg: CN, input_shape: ShapeSpec) -> Dict:
        kwargs = resolve_preset(cfg.MODEL.HATNET, HATNET_PRESETS, "MODEL.HATNET")
        return dict(in_chans=input_shape.channels, **kwargs)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the release's initialisation: truncated normal (std 0.02) convolutions, unit GroupNorms
        if isinstance(m, nn.Conv2d):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grid(self, g1: Sequence[int], g2: Sequence[int]) -> None:
        """Switch G1 / G2 of the three H-MHSA stages (parameter-free, Sec. 3.3)."""
        g1, g2 = _check_grid(g1, "g1"), _check_grid(g2, "g2")
        for s in range(3):
            for block in self.blocks[s]:
                block.attn.grid_size, block.attn.ds_ratio = g1[s], g2[s]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """res_k for ``out_features`` and every ds_k, sized ceil(H / 2^k) x ceil(W / 2^k)."""
        self.check_input(x)
        outputs = {}
        x = self.patch_embed(x)
        downsamples = (self.ds2, self.ds3, self.ds4)
        for s in range(4):
            if s > 0:
                x = downsamples[s - 1](x)
                outputs[downsampled_name(s + 2)] = x
            for block in self.blocks[s]:
                x = block(x)
            outputs[f"res{s + 2}"] = x
        return self.select_outputs(outputs)


def add_hat_net_config(cfg: CN) -> None:
    """Add ``MODEL.HATNET``: PRESET plus per-field overrides ("unset" values take the preset's)."""
    cfg.MODEL.HATNET = CN()
    node = cfg.MODEL.HATNET
    node.PRESET = "tiny"  # tiny | small | medium | large
    node.DIMS = []
    node.DEPTHS = []
    node.HEAD_DIM = -1
    node.EXPANSIONS = []
    node.KERNEL_SIZES = []
    node.DROP_PATH_RATE = -1.0
    # G1 / G2 for res2, res3, res4 (the paper's stages 2-4); ImageNet values: [8, 7, 7] / [8, 4, 2]
    node.G1 = list(GRID_SETTINGS["dense"]["g1"])
    node.G2 = list(GRID_SETTINGS["dense"]["g2"])
    node.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # ds3..ds5 are always returned as well


@BACKBONE_REGISTRY.register()
def build_hat_net_backbone(cfg: CN, input_shape: ShapeSpec) -> HATNet:
    """HAT-Net from ``MODEL.HATNET`` (preset + overrides)."""
    return HATNet(cfg, input_shape)


def convert_hat_net_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str = "backbone."
                               ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map an authors' HAT-Net state dict onto :class:`HATNet` inside a Detectron2 model.

    Returns (converted, dropped): backbone tensors under ``prefix`` with the authors' names otherwise
    unchanged, and the names dropped on purpose (the ImageNet classifier and the ``attn.proj_norm``
    tensors the authors' forward never uses). A ``module.``/``backbone.`` prefix is removed. Any other
    name raises ``KeyError`` naming it.
    """
    kept, dropped = split_state_dict(state_dict, keep=("patch_embed.", "blocks.", "ds2.", "ds3.", "ds4."),
                                     drop=("classifier.", "head."),
                                     drop_suffixes=(".attn.proj_norm.weight", ".attn.proj_norm.bias"),
                                     layout="the authors' HAT_Net")
    return add_prefix(kept, prefix), dropped
