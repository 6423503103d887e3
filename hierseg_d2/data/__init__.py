"""Datasets (registered on import) and dataset mappers of hierseg_d2."""

from . import datasets  # noqa: F401  (registers shapes_*, coco_2017_*, ade20k_sem_seg_*, cityscapes_*)
from .dataset_mappers import build_mapper  # noqa: F401
