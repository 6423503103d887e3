"""hierseg_d2: unified segmentation by hierarchical clustering (HCFormer) on Detectron2.

Importing the package registers its datasets, backbones, heads and meta-architectures.
"""
from . import data  # noqa: F401
from . import modeling  # noqa: F401
from .config import add_hierseg_config  # noqa: F401
