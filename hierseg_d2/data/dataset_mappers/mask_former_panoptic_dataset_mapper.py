"""MaskFormer panoptic-segmentation training mapper (semantic recipe, one target per segment)."""

import copy

import numpy as np
import torch

from detectron2.data import transforms as T

from .mask_former_semantic_dataset_mapper import MaskFormerSemanticDatasetMapper
from .utils import check_label_size, masks_to_instances, pad_to_divisibility, read_image_checked

__all__ = ["MaskFormerPanopticDatasetMapper", "read_panoptic_png", "panoptic_to_semantic"]

_NO_SEGMENT = -1  # panoptic id of padding / unlabeled pixels after transforms


def read_panoptic_png(file_name: str) -> np.ndarray:
    """COCO panoptic PNG as an HxWx3 uint8 RGB array (transformed like an image, decoded after)."""
    from detectron2.data import detection_utils as utils

    try:
        return utils.read_image(file_name, "RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"panoptic label file not found: {file_name}") from None
    except Exception as e:
        raise OSError(f"cannot read panoptic label {file_name}: {type(e).__name__}: {e}") from e


def panoptic_to_semantic(pan_ids: np.ndarray, segments_info, ignore_label: int) -> np.ndarray:
    """Semantic map from panoptic ids + segments_info (pixels of no listed segment -> ignore); uint8
    when every id fits (see ``read_label_map`` for why)."""
    fits = ignore_label <= 255 and all(s["category_id"] <= 255 for s in segments_info)
    sem = np.full(pan_ids.shape, ignore_label, dtype=np.uint8 if fits else np.float64)
    for seg in segments_info:
        sem[pan_ids == seg["id"]] = seg["category_id"]
    return sem


class MaskFormerPanopticDatasetMapper(MaskFormerSemanticDatasetMapper):
    """Map a COCO-panoptic dataset dict to MaskFormer training inputs.

    Same augmentations as the semantic mapper (the crop constraint uses ``sem_seg_file_name`` when
    present, else the semantic map derived from the panoptic PNG). Output: ``image``, ``sem_seg``,
    ``instances`` with one target per non-crowd segment (``gt_classes``, ``gt_masks``).
    """

    def __call__(self, dataset_dict):
        assert self.is_train, "MaskFormerPanopticDatasetMapper should only be used for training!"
        from panopticapi.utils import rgb2id

        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict, self.img_format)
        if "pan_seg_file_name" not in dataset_dict:
            raise ValueError(f"No 'pan_seg_file_name' for {dataset_dict['file_name']} in a panoptic dataset.")
        pan_file = dataset_dict.pop("pan_seg_file_name")
        pan_seg = read_panoptic_png(pan_file)
        segments_info = dataset_dict.pop("segments_info")
        check_label_size(pan_seg.shape, image.shape, dataset_dict["file_name"], pan_file, "panoptic label")
        if "sem_seg_file_name" in dataset_dict:
            sem_seg = self._read_semantic(dataset_dict, image.shape)
        else:
            sem_seg = panoptic_to_semantic(rgb2id(pan_seg), segments_info, self.ignore_label)

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        aug_input, transforms = T.apply_transform_gens(self.tfm_gens, aug_input)
        pan_ids = rgb2id(transforms.apply_segmentation(pan_seg))

        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        sem_seg = torch.as_tensor(aug_input.sem_seg.astype("long"))
        pan_ids = torch.as_tensor(pan_ids.astype("long"))
        image, (sem_seg, pan_ids) = pad_to_divisibility(
            image, self.size_divisibility, [(sem_seg, self.ignore_label), (pan_ids, _NO_SEGMENT)]
        )

        classes, masks = [], []
        for seg in segments_info:
            if not seg.get("iscrowd", 0):
                classes.append(seg["category_id"])
                masks.append(pan_ids == seg["id"])
        dataset_dict["image"] = image
        dataset_dict["sem_seg"] = sem_seg.long()
        dataset_dict["instances"] = masks_to_instances(tuple(image.shape[-2:]), classes, masks)
        return dataset_dict
