"""Segmentation heads registered in Detectron2's SEM_SEG_HEADS_REGISTRY."""
from .hcformer_head import HCFormerHead
