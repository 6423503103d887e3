"""COCO instance mapper with large-scale jitter (LSJ), the Mask2Former COCO recipe."""

import copy
import logging

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .utils import masks_to_instances, read_image_checked

__all__ = ["COCOInstanceNewBaselineDatasetMapper", "build_lsj_augmentations"]


def build_lsj_augmentations(cfg, is_train):
    """Flip -> ResizeScale(MIN_SCALE..MAX_SCALE of IMAGE_SIZE) -> FixedSizeCrop(IMAGE_SIZE), padding
    smaller results (images pad 128, labels 255) to IMAGE_SIZE x IMAGE_SIZE."""
    assert is_train, "Only support training augmentation"
    image_size = cfg.INPUT.IMAGE_SIZE
    augs = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal", vertical=cfg.INPUT.RANDOM_FLIP == "vertical")
        )
    augs += [
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE,
            max_scale=cfg.INPUT.MAX_SCALE,
            target_height=image_size,
            target_width=image_size,
        ),
        T.FixedSizeCrop(crop_size=(image_size, image_size)),
    ]
    return augs


class COCOInstanceNewBaselineDatasetMapper:
    """LSJ instance mapper. Output: ``image`` (CHW uint8, IMAGE_SIZE square), ``padding_mask`` (HW bool,
    True on padding) and ``instances`` (``gt_classes``, ``gt_masks`` N x H x W bool, ``gt_boxes`` from
    the masks); instances cropped away entirely are dropped."""

    @configurable
    def __init__(self, is_train=True, *, tfm_gens, image_format):
        self.is_train = is_train
        self.tfm_gens = tfm_gens
        self.img_format = image_format
        logging.getLogger(__name__).info(f"[{self.__class__.__name__}] Full TransformGens used in training: {tfm_gens}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "tfm_gens": build_lsj_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def _augment(self, dataset_dict):
        image = read_image_checked(dataset_dict, self.img_format)
        orig_shape = image.shape[:2]
        padding_mask = np.ones(image.shape[:2])
        image, transforms = T.apply_transform_gens(self.tfm_gens, image)
        # the crop pads with 255 where there was no image: that is the padding
        padding_mask = ~transforms.apply_segmentation(padding_mask).astype(bool)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict["padding_mask"] = torch.as_tensor(np.ascontiguousarray(padding_mask))
        return orig_shape, image.shape[:2], transforms

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        _, image_shape, transforms = self._augment(dataset_dict)
        if "annotations" not in dataset_dict:
            raise ValueError(f"No 'annotations' for {dataset_dict['file_name']} in an instance dataset.")
        annos = [
            utils.transform_instance_annotations(obj, transforms, image_shape)
            for obj in dataset_dict.pop("annotations")
            if obj.get("iscrowd", 0) == 0
        ]
        classes, masks = [], []
        if annos:
            bitmasks = utils.annotations_to_instances(annos, image_shape, mask_format="bitmask").gt_masks.tensor
            keep = bitmasks.flatten(1).any(1)  # drop instances the crop removed entirely
            classes = [int(a["category_id"]) for a, k in zip(annos, keep.tolist()) if k]
            masks = list(bitmasks[keep])
        dataset_dict["instances"] = masks_to_instances(image_shape, classes, masks, with_boxes=True)
        return dataset_dict
