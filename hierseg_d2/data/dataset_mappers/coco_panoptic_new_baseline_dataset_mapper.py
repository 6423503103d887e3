"""COCO panoptic mapper with large-scale jitter (LSJ), the Mask2Former COCO recipe."""

import copy

import torch

from .coco_instance_new_baseline_dataset_mapper import COCOInstanceNewBaselineDatasetMapper
from .mask_former_panoptic_dataset_mapper import read_panoptic_png
from .utils import check_label_size, masks_to_instances

__all__ = ["COCOPanopticNewBaselineDatasetMapper"]


class COCOPanopticNewBaselineDatasetMapper(COCOInstanceNewBaselineDatasetMapper):
    """LSJ panoptic mapper. Output: ``image``, ``padding_mask`` and ``instances`` with one target per
    non-crowd segment still visible after the crop (``gt_classes``, ``gt_masks``, ``gt_boxes``)."""

    def __call__(self, dataset_dict):
        from panopticapi.utils import rgb2id

        dataset_dict = copy.deepcopy(dataset_dict)
        orig_shape, image_shape, transforms = self._augment(dataset_dict)
        if "pan_seg_file_name" not in dataset_dict:
            raise ValueError(f"No 'pan_seg_file_name' for {dataset_dict['file_name']} in a panoptic dataset.")
        pan_file = dataset_dict.pop("pan_seg_file_name")
        pan_seg = read_panoptic_png(pan_file)
        check_label_size(pan_seg.shape, orig_shape, dataset_dict["file_name"], pan_file, "panoptic label")
        pan_ids = torch.as_tensor(rgb2id(transforms.apply_segmentation(pan_seg)).astype("int64"))
        classes, masks = [], []
        for seg in dataset_dict.pop("segments_info"):
            if not seg.get("iscrowd", 0):
                m = pan_ids == seg["id"]
                if m.any():
                    classes.append(seg["category_id"])
                    masks.append(m)
        dataset_dict["instances"] = masks_to_instances(image_shape, classes, masks, with_boxes=True)
        return dataset_dict
