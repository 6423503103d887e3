"""MaskFormer instance-segmentation training mapper (COCO-style annotations: polygons or RLE)."""

import copy
import logging

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .mask_former_semantic_dataset_mapper import build_mask_former_augmentations
from .utils import masks_to_instances, pad_to_divisibility, read_image_checked

__all__ = ["MaskFormerInstanceDatasetMapper"]


class MaskFormerInstanceDatasetMapper:
    """Map an instance-segmentation dataset dict to MaskFormer training inputs: ``image`` and
    ``instances`` (``gt_classes``, ``gt_masks`` N x H x W bool); crowd annotations are dropped."""

    @configurable
    def __init__(self, is_train=True, *, augmentations, image_format, size_divisibility):
        self.is_train = is_train
        self.tfm_gens = augmentations
        self.img_format = image_format
        self.size_divisibility = size_divisibility
        logging.getLogger(__name__).info(f"[{self.__class__.__name__}] Augmentations used in training: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "augmentations": build_mask_former_augmentations(cfg),
            "image_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    def __call__(self, dataset_dict):
        assert self.is_train, "MaskFormerInstanceDatasetMapper should only be used for training!"
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict, self.img_format)
        if "annotations" not in dataset_dict:
            raise ValueError(f"No 'annotations' for {dataset_dict['file_name']} in an instance dataset.")

        aug_input = T.AugInput(image)
        aug_input, transforms = T.apply_transform_gens(self.tfm_gens, aug_input)
        image = aug_input.image
        h, w = image.shape[:2]

        annos = []
        for obj in dataset_dict.pop("annotations"):
            if obj.get("iscrowd", 0) == 0:
                obj.pop("keypoints", None)
                annos.append(utils.transform_instance_annotations(obj, transforms, (h, w)))
        classes, masks = [], []
        if annos:
            if "segmentation" not in annos[0]:
                raise ValueError(f"{dataset_dict['file_name']}: instance annotations have no 'segmentation'.")
            bitmasks = utils.annotations_to_instances(annos, (h, w), mask_format="bitmask").gt_masks.tensor
            classes = [int(obj["category_id"]) for obj in annos]
            masks = list(bitmasks)

        image = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        image, masks = pad_to_divisibility(image, self.size_divisibility, [(m.to(torch.uint8), 0) for m in masks])
        dataset_dict["image"] = image
        dataset_dict["instances"] = masks_to_instances(tuple(image.shape[-2:]), classes, masks)
        return dataset_dict
