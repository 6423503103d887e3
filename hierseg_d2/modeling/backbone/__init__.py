"""Backbones registered in Detectron2's BACKBONE_REGISTRY; each family in the file named after it."""
from .hierarchy import FALLBACK_PAIRS, downsampled_name, get_clustering_pairs


def add_backbone_config(cfg):
    """Add the config node of every backbone family (``MODEL.SWIN``, ``MODEL.HILA``, ...)."""
