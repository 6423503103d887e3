"""COCO 2017 instances: Detectron2's builtin ``coco_2017_{train,val}`` (its loader and metadata),
re-registered for a given root and with a clear error when the files are missing."""

import os

from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.coco import load_coco_json

from .utils import register_dataset, with_required_paths

__all__ = ["register_all_coco_instances"]

PREPARE_HINT = (
    "Download COCO 2017 (train2017.zip, val2017.zip, annotations_trainval2017.zip from cocodataset.org) "
    "and unzip them into coco/"
)

_PREDEFINED_SPLITS_COCO = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}


def register_all_coco_instances(root: str) -> None:
    """(Re-)register ``coco_2017_{train,val}`` exactly as Detectron2's builtin does, for ``root``."""
    meta = _get_builtin_metadata("coco")  # 80 thing classes, ids -> 0..79
    for name, (image_root, json_file) in _PREDEFINED_SPLITS_COCO.items():
        image_root, json_file = os.path.join(root, image_root), os.path.join(root, json_file)
        loader = with_required_paths(
            name,
            lambda j=json_file, i=image_root, n=name: load_coco_json(j, i, n),
            [json_file, image_root],
            PREPARE_HINT,
        )
        register_dataset(name, loader, json_file=json_file, image_root=image_root, evaluator_type="coco", **meta)
