"""The shapes_* names: Detectron2/Mask2Former metadata, dataset dicts, generation on first use."""

import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from hierseg_d2.data.datasets import register_all_shapes
from hierseg_d2.data.datasets.shapes_generator import SHAPES_CATEGORIES, is_generated

NAMES = ["panoptic", "panoptic_with_sem_seg", "instance", "sem_seg"]


def test_metadata(shapes_root):
    for split in ("train", "val"):
        pan = MetadataCatalog.get(f"shapes_{split}_panoptic_with_sem_seg")
        assert pan.evaluator_type == "coco_panoptic_seg" and pan.ignore_label == 255 and pan.label_divisor == 1000
        assert pan.thing_classes == [c["name"] for c in SHAPES_CATEGORIES[:8]]
        assert pan.stuff_classes == [c["name"] for c in SHAPES_CATEGORIES]  # Mask2Former: all classes
        assert len(pan.thing_colors) == 8 and len(pan.stuff_colors) == 12
        assert pan.thing_dataset_id_to_contiguous_id == {i: i - 1 for i in range(1, 9)}
        assert pan.stuff_dataset_id_to_contiguous_id == {i: i - 1 for i in range(1, 13)}
        for key in ("image_root", "panoptic_root", "panoptic_json", "json_file", "sem_seg_root"):
            path = getattr(pan, key)
            assert path.startswith(shapes_root) and os.path.exists(path), key
        assert MetadataCatalog.get(f"shapes_{split}_panoptic").evaluator_type == "coco_panoptic_seg"
        inst = MetadataCatalog.get(f"shapes_{split}_instance")
        assert inst.evaluator_type == "coco" and inst.thing_classes == pan.thing_classes
        assert inst.thing_dataset_id_to_contiguous_id == pan.thing_dataset_id_to_contiguous_id
        assert os.path.isfile(inst.json_file)
        sem = MetadataCatalog.get(f"shapes_{split}_sem_seg")
        assert sem.evaluator_type == "sem_seg" and sem.ignore_label == 255
        assert sem.stuff_classes == pan.stuff_classes and os.path.isdir(sem.sem_seg_root)


def test_dataset_dicts(shapes_root):
    for split, n in (("train", 16), ("val", 8)):
        dicts = {name: DatasetCatalog.get(f"shapes_{split}_{name}") for name in NAMES}
        assert all(len(d) == n for d in dicts.values())
        pan, pws, inst, sem = (dicts[k] for k in NAMES)
        for a, b, c, d in zip(pan, pws, inst, sem):
            assert a["file_name"] == b["file_name"] == c["file_name"] == d["file_name"]
            assert os.path.isfile(a["file_name"]) and os.path.isfile(b["sem_seg_file_name"])
            assert a["image_id"] == b["image_id"] == c["image_id"]
            things = [s for s in a["segments_info"] if s["isthing"]]
            assert all(0 <= s["category_id"] < 8 for s in things)
            assert all(8 <= s["category_id"] < 12 for s in a["segments_info"] if not s["isthing"])
            # instance annotations are the thing segments, with contiguous ids from the json
            assert [x["category_id"] for x in c["annotations"]] == [s["category_id"] for s in things]
            assert all(x["segmentation"]["counts"] and x["bbox_mode"] == BoxMode.XYWH_ABS for x in c["annotations"])
            assert d["sem_seg_file_name"] == b["sem_seg_file_name"]


def test_generated_on_first_use(tmp_path):
    """Registering does not write anything; loading a shapes_* name generates the dataset."""
    # root/shapes/val -> root: the root registered now (the session fixture's, or the default)
    previous_root = os.path.dirname(os.path.dirname(MetadataCatalog.get("shapes_val_sem_seg").image_root))
    root = str(tmp_path)
    try:
        register_all_shapes(root, {"train": 2, "val": 2}, progress=False)
        assert not is_generated(root)
        assert len(DatasetCatalog.get("shapes_val_sem_seg")) == 2
        assert is_generated(root, {"train": 2, "val": 2})
        assert len(DatasetCatalog.get("shapes_train_instance")) == 2
    finally:
        register_all_shapes(previous_root)  # leave the names as they were
