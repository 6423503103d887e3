"""ADE20K-150 semantic segmentation (``ade20k_sem_seg_{train,val}``, the names Detectron2 and
Mask2Former use), with the labels converted to 0-149 / 255 by ``datasets/prepare_ade20k_sem_seg.py``."""

import os

from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES
from detectron2.data.datasets.coco import load_sem_seg

from .utils import register_dataset, with_required_paths

__all__ = ["register_all_ade20k_semantic"]

PREPARE_HINT = (
    "Download ADEChallengeData2016.zip (the SceneParsing benchmark) into ADEChallengeData2016/, then run "
    "`python datasets/prepare_ade20k_sem_seg.py` to write ADEChallengeData2016/annotations_detectron2"
)


def register_all_ade20k_semantic(root: str) -> None:
    """(Re-)register ``ade20k_sem_seg_{train,val}`` for ``root/ADEChallengeData2016``."""
    root = os.path.join(root, "ADEChallengeData2016")
    for split, dirname in [("train", "training"), ("val", "validation")]:
        name = f"ade20k_sem_seg_{split}"
        image_dir = os.path.join(root, "images", dirname)
        gt_dir = os.path.join(root, "annotations_detectron2", dirname)
        loader = with_required_paths(
            name,
            lambda x=image_dir, y=gt_dir: load_sem_seg(y, x, gt_ext="png", image_ext="jpg"),
            [image_dir, gt_dir],
            PREPARE_HINT,
        )
        register_dataset(
            name,
            loader,
            stuff_classes=ADE20K_SEM_SEG_CATEGORIES[:],
            image_root=image_dir,
            sem_seg_root=gt_dir,
            evaluator_type="sem_seg",
            ignore_label=255,
        )
