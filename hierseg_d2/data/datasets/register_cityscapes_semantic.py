"""Cityscapes fine semantic segmentation: Detectron2's builtin ``cityscapes_fine_sem_seg_{train,val}``
(its loader and metadata: 19 train ids, 255 ignore), re-registered for a given root and with a clear
error when the files are missing."""

import os

from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.cityscapes import load_cityscapes_semantic

from .utils import register_dataset, with_required_paths

__all__ = ["register_all_cityscapes_semantic"]

PREPARE_HINT = (
    "Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into cityscapes/, then run "
    "`CITYSCAPES_DATASET=<root>/cityscapes python -m cityscapesscripts.preparation.createTrainIdLabelImgs` "
    "(pip install cityscapesscripts) to write the *_gtFine_labelTrainIds.png files"
)


def register_all_cityscapes_semantic(root: str) -> None:
    """(Re-)register ``cityscapes_fine_sem_seg_{train,val}`` for ``root/cityscapes``."""
    meta = _get_builtin_metadata("cityscapes")
    for split in ("train", "val"):
        name = f"cityscapes_fine_sem_seg_{split}"
        image_dir = os.path.join(root, "cityscapes", "leftImg8bit", split)
        gt_dir = os.path.join(root, "cityscapes", "gtFine", split)
        loader = with_required_paths(
            name,
            lambda x=image_dir, y=gt_dir: load_cityscapes_semantic(x, y),
            [image_dir, gt_dir],
            PREPARE_HINT,
        )
        register_dataset(
            name,
            loader,
            image_dir=image_dir,
            gt_dir=gt_dir,
            evaluator_type="cityscapes_sem_seg",
            ignore_label=255,
            **meta,
        )
