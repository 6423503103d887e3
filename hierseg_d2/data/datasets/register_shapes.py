"""Registration of the embedded "shapes" dataset (generated on first use under ``<root>/shapes``).

Names (Detectron2/Mask2Former naming), for split in {train, val}:

* ``shapes_{split}_panoptic``               COCO panoptic, Detectron2's standard loader
* ``shapes_{split}_panoptic_with_sem_seg``  the same + ``sem_seg_file_name`` (Mask2Former style)
* ``shapes_{split}_instance``               COCO instances json (RLE masks), Detectron2's loader
* ``shapes_{split}_sem_seg``                semantic labels only (contiguous ids, 255 = ignore)

Loading any of them (``DatasetCatalog.get``) generates the dataset first if it is not on disk.
"""

import functools
from typing import Dict, Optional

from detectron2.data.datasets.coco import load_coco_json, load_sem_seg

from .register_coco_panoptic_annos_semseg import panoptic_metadata, register_coco_panoptic_annos_sem_seg
from .shapes_generator import IGNORE_LABEL, SHAPES_CATEGORIES, ensure_shapes_dataset, shapes_paths
from .utils import register_dataset

__all__ = ["get_shapes_metadata", "get_shapes_instances_metadata", "register_all_shapes", "SHAPES_SPLITS"]

SHAPES_SPLITS = ("train", "val")
_HINT = "It is generated on first use; generate it explicitly with `python datasets/prepare_shapes.py`"


def get_shapes_metadata() -> Dict:
    """Panoptic/semantic metadata, Mask2Former convention: 8 things then 4 stuff, contiguous 0-11."""
    return panoptic_metadata(SHAPES_CATEGORIES)


def get_shapes_instances_metadata() -> Dict:
    """Instance-segmentation metadata: only the 8 thing classes, contiguous 0-7."""
    meta = get_shapes_metadata()
    return {k: meta[k] for k in ("thing_classes", "thing_colors", "thing_dataset_id_to_contiguous_id")}


def register_all_shapes(root: str, num_images: Optional[Dict[str, int]] = None, progress: bool = True) -> None:
    """(Re-)register every ``shapes_*`` name for a dataset under ``root``.

    ``num_images`` (e.g. ``{"train": 16, "val": 8}``) is what first use generates; None = the
    defaults (300 train / 50 val) or whatever complete dataset already exists there.
    """
    ensure = functools.partial(ensure_shapes_dataset, root, num_images, None, progress)
    meta = get_shapes_metadata()
    for split in SHAPES_SPLITS:
        p = shapes_paths(root, split)
        register_coco_panoptic_annos_sem_seg(
            f"shapes_{split}_panoptic",
            meta,
            p["image_root"],
            p["panoptic_root"],
            p["panoptic_json"],
            p["sem_seg_root"],
            p["instances_json"],
            how_to_prepare=_HINT,
            before_load=ensure,
        )

        inst_name = f"shapes_{split}_instance"

        def load_instances(p=p, inst_name=inst_name):
            ensure()
            return load_coco_json(p["instances_json"], p["image_root"], inst_name)

        register_dataset(
            inst_name,
            load_instances,
            json_file=p["instances_json"],
            image_root=p["image_root"],
            evaluator_type="coco",
            **get_shapes_instances_metadata(),
        )

        def load_semantic(p=p):
            ensure()
            return load_sem_seg(p["sem_seg_root"], p["image_root"], gt_ext="png", image_ext="jpg")

        register_dataset(
            f"shapes_{split}_sem_seg",
            load_semantic,
            image_root=p["image_root"],
            sem_seg_root=p["sem_seg_root"],
            evaluator_type="sem_seg",
            ignore_label=IGNORE_LABEL,
            stuff_classes=meta["stuff_classes"],
            stuff_colors=meta["stuff_colors"],
            stuff_dataset_id_to_contiguous_id=meta["stuff_dataset_id_to_contiguous_id"],
        )
