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
    "read_image_file",
    "read_image_checked",
    "read_label_map",
    "check_label_size",
    "pad_to_divisibility",
    "masks_to_instances",
    "semantic_to_instances",
    "train_metadata",
]

logger = logging.getLogger(__name__)

_IMAGE_PAD_VALUE = 128  # Mask2Former pads images with 128 (mean grey) and labels with ignore


def _wide_to_8bit(image, file_name: str):
    """A 16/32-bit integer or float grayscale PIL image as 8-bit "L" (PIL's own conversion clips every
    value above 255 to white). 16-bit data is scaled by 255 / 65535; floats in [0, 1] by 255."""
    from PIL import Image

    arr = np.asarray(image)
    mode = image.mode
    if mode.startswith("I;16") or (mode == "I" and image.format == "PNG"):  # PNG has no 32-bit gray
        scaled = arr.astype(np.float64) * (255.0 / 65535.0)
    elif mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"image {file_name}: 32-bit integer pixels in [{lo}, {hi}] have no 8-bit reading")
        scaled = arr.astype(np.float64) * (255.0 / 65535.0 if hi > 255 else 1.0)
    else:  # "F"
        if not np.isfinite(arr).all():
            raise ValueError(f"image {file_name}: floating-point image with NaN/Inf pixels")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"image {file_name}: floating-point pixels in [{lo:g}, {hi:g}], expected [0, 1] or [0, 255]")
        scaled = arr.astype(np.float64) * (255.0 if hi <= 1.0 else 1.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def read_image_file(file_name: str, img_format: str) -> np.ndarray:
    """Read an image file as HxWxC uint8 in ``img_format`` (Detectron2's read_image, EXIF orientation
    included). Grayscale, palette, CMYK and RGBA inputs are converted by PIL (RGBA loses its alpha);
    16-bit / 32-bit / float grayscale is scaled to 8 bits here (PIL would clip it to white). Errors name
    the file (missing, unreadable, truncated, unsupported pixel range)."""
    from PIL import Image

    try:
        with open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now: a truncated file fails here, with its name
            image = utils._apply_exif_orientation(image)
            if image.mode.startswith("I") or image.mode == "F":
                image = _wide_to_8bit(image, file_name)
            return utils.convert_PIL_to_numpy(image, img_format)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {file_name}") from None
    except ValueError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise OSError(f"cannot read image {file_name}: {type(e).__name__}: {e}") from e


def read_image_checked(dataset_dict: dict, img_format: str) -> np.ndarray:
    """Read ``file_name`` with :func:`read_image_file` and check it against the dict's width/height.
    Errors name the file."""
    image = read_image_file(dataset_dict["file_name"], img_format)
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


def check_label_size(label_shape, image_shape, image_file: str, label_file: str, what: str = "label map") -> None:
    """A ground-truth map must have the image's height and width; the error names both files."""
    if tuple(label_shape[:2]) != tuple(image_shape[:2]):
        raise ValueError(f"{what} {label_file} has size {tuple(label_shape[:2])} (HxW) but its image {image_file} "
                         f"has {tuple(image_shape[:2])}")


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
