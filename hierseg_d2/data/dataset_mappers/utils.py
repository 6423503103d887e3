"""Helpers shared by the MaskFormer-family mappers: reading inputs with clear errors, padding, targets."""

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.structures import BitMasks, Instances

__all__ = [
    "read_image_checked",
    "read_label_map",
    "pad_to_divisibility",
    "masks_to_instances",
    "semantic_to_instances",
    "train_metadata",
]

logger = logging.getLogger(__name__)

_IMAGE_PAD_VALUE = 128  # Mask2Former pads images with 128 (mean grey) and labels with ignore


def read_image_checked(dataset_dict: dict, img_format: str) -> np.ndarray:
    """Read ``file_name`` as HxWx3 in ``img_format``; grayscale, palette and RGBA inputs are
    converted by PIL (RGBA loses its alpha). Errors name the file."""
    file_name = dataset_dict["file_name"]
    try:
        image = utils.read_image(file_name, format=img_format)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {file_name}") from None
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise OSError(f"cannot read image {file_name}: {type(e).__name__}: {e}") from e
    utils.check_image_size(dataset_dict, image)
    return image


def read_label_map(file_name: str, what: str = "semantic label") -> np.ndarray:
    """Read a single-channel label PNG as (H, W); 8-bit labels stay uint8.

    Why uint8: Detectron2 resizes uint8 arrays with PIL and other dtypes with torch, whose "nearest"
    picks different pixels; the panoptic PNG (uint8 RGB) must land on the same pixels as the semantic
    map, so both take the PIL path. Wider labels (16-bit PNGs) are returned as float64."""
    try:
        label = utils.read_image(file_name)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {file_name}") from None
    except Exception as e:
        raise OSError(f"cannot read {what} {file_name}: {type(e).__name__}: {e}") from e
    if label.ndim != 2:
        raise ValueError(f"{what} {file_name} must be a single-channel image, got shape {label.shape}")
    return label if label.dtype == np.uint8 else label.astype("double")


def sanitize_semantic(sem_seg: np.ndarray, num_classes: int, ignore_label: int, file_name: str) -> np.ndarray:
    """Labels outside [0, num_classes) that are not ``ignore_label`` become ignore, with a warning."""
    bad = (sem_seg >= num_classes) & (sem_seg != ignore_label)
    if bad.any():
        logger.warning(
            f"{file_name}: {int(bad.sum())} pixel(s) with unknown class id(s) "
            f"{sorted(np.unique(sem_seg[bad]).astype(int).tolist())[:10]} set to ignore ({ignore_label})."
        )
        sem_seg = sem_seg.copy()
        sem_seg[bad] = ignore_label
    return sem_seg


def pad_to_divisibility(
    image: torch.Tensor, size_divisibility: int, segs: Sequence[Tuple[Optional[torch.Tensor], int]] = ()
):
    """Pad (right/bottom) a CHW image and any (tensor, pad value) label maps to the next multiple of
    ``size_divisibility`` (Mask2Former pads to the crop size; this is the same for crops <= the size
    divisibility and also works for images smaller than 32 px)."""
    if size_divisibility <= 0:
        return image, [s for s, _ in segs]
    h, w = image.shape[-2:]
    ph = (size_divisibility - h % size_divisibility) % size_divisibility
    pw = (size_divisibility - w % size_divisibility) % size_divisibility
    if ph == 0 and pw == 0:
        return image, [s for s, _ in segs]
    pad = [0, pw, 0, ph]
    image = F.pad(image, pad, value=_IMAGE_PAD_VALUE).contiguous()
    out = []
    for s, value in segs:
        out.append(None if s is None else F.pad(s, pad, value=value).contiguous())
    return image, out


def masks_to_instances(image_shape, classes: List[int], masks: List[torch.Tensor], with_boxes: bool = False):
    """Instances with gt_classes (int64) and gt_masks (N, H, W bool tensor); optionally gt_boxes."""
    from detectron2.structures import Boxes

    instances = Instances(image_shape)
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if len(masks) == 0:
        gt_masks = torch.zeros((0, image_shape[0], image_shape[1]), dtype=torch.bool)
    else:
        gt_masks = BitMasks(torch.stack([m.bool() for m in masks])).tensor
    instances.gt_masks = gt_masks
    if with_boxes:
        instances.gt_boxes = BitMasks(gt_masks).get_bounding_boxes() if len(masks) else Boxes(torch.zeros((0, 4)))
    return instances


def semantic_to_instances(sem_seg: torch.Tensor, ignore_label: int) -> Instances:
    """One target per class present in the label map (MaskFormer's semantic targets)."""
    classes = [int(c) for c in torch.unique(sem_seg).tolist() if c != ignore_label]
    masks = [sem_seg == c for c in classes]
    return masks_to_instances(tuple(sem_seg.shape[-2:]), classes, masks)


def train_metadata(cfg):
    """Metadata of the first training dataset (where the mappers read ignore_label / classes)."""
    return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if len(cfg.DATASETS.TRAIN) else MetadataCatalog.get("__none__")
