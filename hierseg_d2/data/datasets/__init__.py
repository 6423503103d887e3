"""Dataset registrations. Importing this module registers every dataset for ``$DETECTRON2_DATASETS``
(default ``./datasets``); each ``register_all_*(root)`` can re-register the same names for another root."""

from .register_ade20k_semantic import register_all_ade20k_semantic
from .register_cityscapes_semantic import register_all_cityscapes_semantic
from .register_coco_instances import register_all_coco_instances
from .register_coco_panoptic_annos_semseg import (
    load_coco_panoptic_json,
    panoptic_metadata,
    register_all_coco_panoptic_annos_sem_seg,
    register_coco_panoptic_annos_sem_seg,
)
from .register_custom import (
    add_register_argument,
    check_num_classes,
    import_registrations,
    load_semantic_folder,
    register_custom_coco_instances,
    register_custom_coco_panoptic,
    register_custom_semantic,
    setup_datasets,
)
from .register_shapes import get_shapes_instances_metadata, get_shapes_metadata, register_all_shapes
from .shapes_generator import SHAPES_CATEGORIES, ensure_shapes_dataset, generate_shapes_dataset
from .utils import datasets_root


def register_all(root: str) -> None:
    """Register every dataset of the project for ``root`` (replacing earlier registrations)."""
    register_all_shapes(root)
    register_all_coco_instances(root)
    register_all_coco_panoptic_annos_sem_seg(root)
    register_all_ade20k_semantic(root)
    register_all_cityscapes_semantic(root)


register_all(datasets_root())
