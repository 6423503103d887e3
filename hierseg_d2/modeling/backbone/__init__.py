"""Backbones registered in Detectron2's BACKBONE_REGISTRY; each family in the file named after it."""
from .hafa import HAFA, add_hafa_config  # noqa: F401
from .hat_net import HATNet, add_hat_net_config  # noqa: F401
from .hierarchy import FALLBACK_PAIRS, downsampled_name, get_clustering_pairs
from .hila import HILABackbone, add_hila_config  # noqa: F401
from .hrvit import HRViT, add_hrvit_config  # noqa: F401
from .mit import MixVisionTransformer, add_mit_config  # noqa: F401
from .pvt import PyramidVisionTransformer, add_pvt_config  # noqa: F401
from .resnet_dcn import add_hcformer_resnet_config, build_hcformer_resnet_backbone  # noqa: F401  (registers)
from .swin import D2SwinTransformer, add_swin_config  # noqa: F401


def add_backbone_config(cfg):
    """Add the config node of every backbone family (``MODEL.SWIN``, ``MODEL.HILA``, ...)."""
    add_hcformer_resnet_config(cfg)
    add_swin_config(cfg)
    add_hat_net_config(cfg)
    add_hrvit_config(cfg)
    add_mit_config(cfg)
    add_hila_config(cfg)
    add_pvt_config(cfg)
    add_hafa_config(cfg)
