"""COCO 2017 panoptic with semantic labels derived from the panoptic annotations (Mask2Former layout).

Registers, for ``root`` = ``$DETECTRON2_DATASETS``:

* ``coco_2017_{train,val}_panoptic`` -- Detectron2's "standard" COCO panoptic records (same dicts as
  its loader, plus height/width, and unknown categories dropped with a warning instead of a bare
  KeyError), thing_classes/thing_colors restricted to the 80 thing classes as Mask2Former does;
* ``coco_2017_{train,val}_panoptic_with_sem_seg`` -- the same records plus ``sem_seg_file_name``
  pointing at ``coco/panoptic_semseg_{train,val}2017`` (made by
  ``datasets/prepare_coco_semantic_annos_from_panoptic.py``).

Metadata follows the Mask2Former convention (see :func:`panoptic_metadata`): contiguous ids run over
all categories, things first (COCO's file order: 80 things then 53 stuff), ``stuff_classes`` lists *all* classes,
``thing_dataset_id_to_contiguous_id`` maps only things, ``stuff_dataset_id_to_contiguous_id`` maps
every category (so semantic labels and the SemSegEvaluator cover things and stuff).
"""

import json
import logging
import os
from typing import Dict, List, Optional

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.utils.file_io import PathManager

from .utils import default_color, images_by_stem, register_dataset, with_required_paths

__all__ = [
    "panoptic_metadata",
    "load_coco_panoptic_json",
    "register_coco_panoptic_annos_sem_seg",
    "register_all_coco_panoptic_annos_sem_seg",
]

logger = logging.getLogger(__name__)

PREPARE_HINT = (
    "Download the COCO 2017 images (train2017.zip, val2017.zip), annotations_trainval2017.zip and "
    "panoptic_annotations_trainval2017.zip (unzip the panoptic PNG archives inside it) into coco/, then run "
    "`python datasets/prepare_coco_semantic_annos_from_panoptic.py` to derive coco/panoptic_semseg_*2017"
)

_PREDEFINED_SPLITS_COCO_PANOPTIC = {
    # name: (image_root, panoptic_root, panoptic_json, semantic_root, instances_json)
    "coco_2017_train_panoptic": (
        "coco/train2017",
        "coco/panoptic_train2017",
        "coco/annotations/panoptic_train2017.json",
        "coco/panoptic_semseg_train2017",
        "coco/annotations/instances_train2017.json",
    ),
    "coco_2017_val_panoptic": (
        "coco/val2017",
        "coco/panoptic_val2017",
        "coco/annotations/panoptic_val2017.json",
        "coco/panoptic_semseg_val2017",
        "coco/annotations/instances_val2017.json",
    ),
}


def panoptic_metadata(categories: List[dict]) -> Dict:
    """Mask2Former-convention metadata from a COCO-panoptic category list (``id``, ``name``,
    ``isthing``, optional ``color``).

    Contiguous ids put the things first (in list order), then the stuff (in list order), whatever the
    order and the values of the dataset ids: Detectron2's Visualizer indexes ``thing_classes`` with the
    contiguous id of a thing segment, and its COCOEvaluator requires the thing ids to be 0..T-1, so the
    things must come first. ``stuff_classes`` lists *all* classes (``stuff_classes[i]`` is the name of
    contiguous id ``i``), ``thing_classes == stuff_classes[:T]``. COCO (80 things then 53 stuff) keeps
    its file order.
    """
    categories = list(categories)
    seen = {}
    for c in categories:
        missing = [k for k in ("id", "name", "isthing") if k not in c]
        if missing:
            raise KeyError(f"panoptic category {c!r} has no {', '.join(missing)}")
        if c["id"] in seen:
            raise ValueError(f"panoptic category id {c['id']} is used twice ({seen[c['id']]!r} and {c['name']!r})")
        seen[c["id"]] = c["name"]
    ordered = [c for c in categories if c["isthing"]] + [c for c in categories if not c["isthing"]]
    colors = [list(c["color"]) if c.get("color") is not None else default_color(i) for i, c in enumerate(ordered)]
    num_things = sum(1 for c in ordered if c["isthing"])
    return {
        "thing_classes": [c["name"] for c in ordered[:num_things]],
        "thing_colors": colors[:num_things],
        # all classes: semantic heads and SemSegEvaluator predict things and stuff alike
        "stuff_classes": [c["name"] for c in ordered],
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(ordered[:num_things])},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(ordered)},
    }


def load_coco_panoptic_json(
    json_file: str, image_dir: str, gt_dir: str, semseg_dir: Optional[str], meta: Dict
) -> List[dict]:
    """Load COCO panoptic annotations as Detectron2 dicts (``file_name``, ``image_id``, ``height``,
    ``width``, ``pan_seg_file_name``, ``sem_seg_file_name`` if ``semseg_dir``, ``segments_info`` with
    contiguous ``category_id`` and ``isthing``).

    Image file names come from the json's ``images`` list (so PNG or JPEG images both work).
    Segments whose category is not in the metadata are dropped and counted in a warning that names
    the files; their pixels then belong to no target (they are ignored by the mappers).
    """
    with PathManager.open(json_file) as f:
        json_info = json.load(f)
    images = {img["id"]: img for img in json_info.get("images", [])}
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]

    ret, unknown, by_stem = [], [], None
    for ann in json_info["annotations"]:
        image_id = ann["image_id"]
        img = images.get(image_id, {})
        if "file_name" in img:
            image_file = os.path.join(image_dir, img["file_name"])
        else:  # no image entry: the image with the annotation PNG's stem, whatever its extension
            if by_stem is None:
                by_stem = images_by_stem(image_dir)
            stem = os.path.splitext(ann["file_name"])[0]
            if stem not in by_stem:
                raise FileNotFoundError(
                    f"{json_file}: annotation {ann['file_name']!r} has no entry in 'images' and {image_dir} has "
                    f"no image named {stem}.*")
            image_file = by_stem[stem]
        segments = []
        for seg in ann["segments_info"]:
            cat = seg["category_id"]
            if cat in thing_map:
                segments.append(dict(seg, category_id=thing_map[cat], isthing=True))
            elif cat in stuff_map:
                segments.append(dict(seg, category_id=stuff_map[cat], isthing=False))
            else:
                unknown.append((ann["file_name"], cat))
        record = {
            "file_name": image_file,
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(gt_dir, ann["file_name"]),
            "segments_info": segments,
        }
        if "height" in img and "width" in img:
            record["height"], record["width"] = img["height"], img["width"]
        if semseg_dir is not None:
            record["sem_seg_file_name"] = os.path.join(semseg_dir, ann["file_name"])
        ret.append(record)
    if unknown:
        logger.warning(
            f"{json_file}: dropped {len(unknown)} segment(s) with a category id unknown to the metadata, "
            f"e.g. {unknown[:5]} (file, category_id)."
        )
    if not ret:
        raise ValueError(f"No annotations found in {json_file}.")
    return ret


def register_coco_panoptic_annos_sem_seg(
    name: str,
    metadata: Dict,
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    sem_seg_root: str,
    instances_json: Optional[str],
    how_to_prepare: str = PREPARE_HINT,
    before_load=None,
) -> None:
    """Register ``name`` (standard panoptic records) and ``name + "_with_sem_seg"`` (+ semantic labels).

    ``before_load`` (optional callable) runs before loading, e.g. to generate a synthetic dataset.
    """
    common = dict(
        panoptic_root=panoptic_root,
        image_root=image_root,
        panoptic_json=panoptic_json,
        json_file=instances_json,
        evaluator_type="coco_panoptic_seg",
        ignore_label=255,
        label_divisor=1000,
        **metadata,
    )

    def _prepared(load):
        def run():
            if before_load is not None:
                before_load()
            return load()

        return run

    paths = [image_root, panoptic_root, panoptic_json]
    register_dataset(
        name,
        _prepared(
            with_required_paths(
                name,
                lambda: load_coco_panoptic_json(panoptic_json, image_root, panoptic_root, None, metadata),
                paths,
                how_to_prepare,
            )
        ),
        **common,
    )
    semantic_name = name + "_with_sem_seg"
    register_dataset(
        semantic_name,
        _prepared(
            with_required_paths(
                semantic_name,
                lambda: load_coco_panoptic_json(panoptic_json, image_root, panoptic_root, sem_seg_root, metadata),
                paths + [sem_seg_root],
                how_to_prepare,
            )
        ),
        sem_seg_root=sem_seg_root,
        **common,
    )


def register_all_coco_panoptic_annos_sem_seg(root: str) -> None:
    """(Re-)register ``coco_2017_{train,val}_panoptic[_with_sem_seg]`` for datasets under ``root``."""
    meta = panoptic_metadata(COCO_CATEGORIES)
    for name, (image_root, pan_root, pan_json, sem_root, inst_json) in _PREDEFINED_SPLITS_COCO_PANOPTIC.items():
        register_coco_panoptic_annos_sem_seg(
            name,
            meta,
            os.path.join(root, image_root),
            os.path.join(root, pan_root),
            os.path.join(root, pan_json),
            os.path.join(root, sem_root),
            os.path.join(root, inst_json),
        )
        assert len(MetadataCatalog.get(name).thing_classes) == 80
