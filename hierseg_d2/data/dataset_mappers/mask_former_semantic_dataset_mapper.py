"""MaskFormer semantic-segmentation training mapper (the Mask2Former recipe)."""

import copy
import logging
from typing import Optional

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import transforms as T

from .utils import (
    pad_to_divisibility,
    read_image_checked,
    read_label_map,
    check_label_size,
    sanitize_semantic,
    semantic_to_instances,
    train_metadata,
)

__all__ = ["MaskFormerSemanticDatasetMapper", "build_mask_former_augmentations"]


def build_mask_former_augmentations(cfg, ignore_label: Optional[int] = None):
    """Resize shortest edge -> crop -> optional SSD colour jitter -> horizontal flip. With ``ignore_label``
    the crop keeps no class above SINGLE_CATEGORY_MAX_AREA of it (semantic/panoptic recipe); without,
    it is a plain random crop (instance recipe)."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        if ignore_label is None:
            augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        else:
            augs.append(
                T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA, ignore_label
                )
            )
    if cfg.INPUT.COLOR_AUG_SSD:
        from detectron2.projects.point_rend import ColorAugSSDTransform

        augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
    augs.append(T.RandomFlip())
    return augs


class MaskFormerSemanticDatasetMapper:
    """Map a semantic-segmentation dataset dict to MaskFormer training inputs.

    Output keys: ``image`` (CHW uint8 tensor), ``sem_seg`` (HW int64, ``ignore_label`` = ignore) and
    ``instances`` (one target per class present: ``gt_classes``, ``gt_masks`` N x H x W bool).
    """

    @configurable
    def __init__(
        self,
        is_train=True,
        *,
        augmentations,
        image_format,
        ignore_label,
        size_divisibility,
        num_classes=None,
    ):
        self.is_train = is_train
        self.tfm_gens = augmentations
        self.img_format = image_format
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility
        self.num_classes = num_classes
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(f"[{self.__class__.__name__}] Augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        meta = train_metadata(cfg)
        ignore_label = meta.get("ignore_label", 255)
        stuff = meta.get("stuff_classes", None)
        return {
            "is_train": is_train,
            "augmentations": build_mask_former_augmentations(cfg, ignore_label),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": ignore_label,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "num_classes": len(stuff) if stuff else None,
        }

    def _read_semantic(self, dataset_dict, image_shape=None):
        if "sem_seg_file_name" not in dataset_dict:
            raise ValueError(f"No 'sem_seg_file_name' for {dataset_dict['file_name']} in a semantic dataset.")
        sem_file = dataset_dict.pop("sem_seg_file_name")
        sem_seg = read_label_map(sem_file)
        if image_shape is not None:
            check_label_size(sem_seg.shape, image_shape, dataset_dict["file_name"], sem_file, "semantic label map")
        if self.num_classes is not None:
            sem_seg = sanitize_semantic(sem_seg, self.num_classes, self.ignore_label, dataset_dict["file_name"])
        return sem_seg

    def __call__(self, dataset_dict):
        assert self.is_train, "MaskFormerSemanticDatasetMapper should only be used for training!"
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict, self.img_format)
        sem_seg = self._read_semantic(dataset_dict, image.shape)
        if "annotations" in dataset_dict:
            raise ValueError("Semantic segmentation dataset should not have 'annotations'.")

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        aug_input, _ = T.apply_transform_gens(self.tfm_gens, aug_input)
        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        sem_seg = torch.as_tensor(aug_input.sem_seg.astype("long"))
        image, (sem_seg,) = pad_to_divisibility(image, self.size_divisibility, [(sem_seg, self.ignore_label)])

        dataset_dict["image"] = image
        dataset_dict["sem_seg"] = sem_seg.long()
        dataset_dict["instances"] = semantic_to_instances(sem_seg, self.ignore_label)
        return dataset_dict
