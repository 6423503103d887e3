"""Real-dataset registrations on miniature copies of their layouts (real category lists), the prepare
scripts that derive their labels, and the errors when files are missing."""

import importlib.util
import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES, COCO_CATEGORIES
from PIL import Image

from hierseg_d2.data.datasets import (
    datasets_root,
    register_all_ade20k_semantic,
    register_all_cityscapes_semantic,
    register_all_coco_instances,
    register_all_coco_panoptic_annos_sem_seg,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
THINGS = [c for c in COCO_CATEGORIES if c["isthing"]]
CAT = {c["name"]: c for c in COCO_CATEGORIES}


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "datasets", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def restore_default_registrations():
    yield
    root = datasets_root()
    register_all_coco_instances(root)
    register_all_coco_panoptic_annos_sem_seg(root)
    register_all_ade20k_semantic(root)
    register_all_cityscapes_semantic(root)


def _rng_image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- COCO
def _make_mini_coco(root):
    """2 val images; panoptic PNG/json with real ids (133 categories); instances json (80 categories)
    with the thing segments as RLE. Returns {file stem: expected semantic map (contiguous ids)}."""
    from panopticapi.utils import id2rgb
    from pycocotools import mask as mask_util

    coco = os.path.join(root, "coco")
    for d in ("val2017", "panoptic_val2017", "annotations"):
        os.makedirs(os.path.join(coco, d), exist_ok=True)
    contiguous = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
    layouts = [  # (image id, [(category name, y0, y1, x0, x1, iscrowd)])
        (
            139,
            [
                ("sky-other-merged", 0, 20, 0, 40, 0),
                ("grass-merged", 20, 30, 0, 40, 0),
                ("person", 5, 25, 5, 15, 0),
                ("car", 18, 28, 20, 35, 0),
                ("person", 2, 8, 30, 38, 1),
            ],
        ),
        (285, [("wall-other-merged", 0, 30, 0, 40, 0), ("dog", 10, 28, 8, 30, 0)]),
    ]
    images, pan_anns, inst_anns, expected = [], [], [], {}
    for image_id, segs in layouts:
        h, w = 30, 40
        stem = f"{image_id:012d}"
        Image.fromarray(_rng_image(h, w, image_id)).save(os.path.join(coco, "val2017", stem + ".jpg"))
        pan = np.zeros((h, w), np.int64)
        sem = np.full((h, w), 255)
        info = []
        for k, (name, y0, y1, x0, x1, crowd) in enumerate(segs):
            seg_id = 1000 * (k + 1) + 7  # arbitrary ids, as in COCO
            pan[y0:y1, x0:x1] = seg_id
            info.append(
                {
                    "id": seg_id,
                    "category_id": CAT[name]["id"],
                    "iscrowd": crowd,
                    "area": 0,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                }
            )
        pan[-1, -1] = 0  # one VOID pixel
        for s in info:
            m = pan == s["id"]
            s["area"] = int(m.sum())
            sem[m] = contiguous[s["category_id"]]
            if CAT_BY_ID[s["category_id"]]["isthing"]:
                rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                inst_anns.append(
                    {
                        "id": len(inst_anns) + 1,
                        "image_id": image_id,
                        "category_id": s["category_id"],
                        "segmentation": rle,
                        "area": s["area"],
                        "bbox": list(map(float, mask_util.toBbox(rle))),
                        "iscrowd": s["iscrowd"],
                    }
                )
        Image.fromarray(id2rgb(pan)).save(os.path.join(coco, "panoptic_val2017", stem + ".png"))
        images.append({"id": image_id, "file_name": stem + ".jpg", "height": h, "width": w})
        pan_anns.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": info})
        expected[stem] = sem
    with open(os.path.join(coco, "annotations", "panoptic_val2017.json"), "w") as f:
        json.dump({"images": images, "annotations": pan_anns, "categories": COCO_CATEGORIES}, f)
    with open(os.path.join(coco, "annotations", "instances_val2017.json"), "w") as f:
        json.dump({"images": images, "annotations": inst_anns, "categories": THINGS}, f)
    return expected


CAT_BY_ID = {c["id"]: c for c in COCO_CATEGORIES}


def test_coco_panoptic_semseg_and_instances(tmp_path):
    root = str(tmp_path)
    expected = _make_mini_coco(root)
    register_all_coco_panoptic_annos_sem_seg(root)
    register_all_coco_instances(root)

    # before the prepare script ran: a clear error naming the missing directory and the script
    with pytest.raises(FileNotFoundError, match="panoptic_semseg_val2017.*prepare_coco_semantic_annos_from_panoptic"):
        DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")

    coco = os.path.join(root, "coco")
    n = _script("prepare_coco_semantic_annos_from_panoptic").convert_panoptic_json(
        os.path.join(coco, "annotations", "panoptic_val2017.json"),
        os.path.join(coco, "panoptic_val2017"),
        os.path.join(coco, "panoptic_semseg_val2017"),
    )
    assert n == 2
    for stem, sem in expected.items():
        got = np.asarray(Image.open(os.path.join(coco, "panoptic_semseg_val2017", stem + ".png")))
        np.testing.assert_array_equal(got, sem)

    meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert len(meta.stuff_classes) == 133 and len(meta.thing_classes) == 80
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.json_file.endswith("instances_val2017.json")
    assert len(MetadataCatalog.get("coco_2017_val_panoptic").thing_classes) == 80
    dicts = DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert [os.path.basename(d["file_name"]) for d in dicts] == ["000000000139.jpg", "000000000285.jpg"]
    segs = dicts[0]["segments_info"]
    assert [(s["category_id"], s["isthing"]) for s in segs] == [
        (COCO_CATEGORIES.index(CAT["sky-other-merged"]), False),
        (COCO_CATEGORIES.index(CAT["grass-merged"]), False),
        (0, True),  # person
        (2, True),  # car
        (0, True),
    ]
    assert len(DatasetCatalog.get("coco_2017_val_panoptic")) == 2

    inst = DatasetCatalog.get("coco_2017_val")
    assert MetadataCatalog.get("coco_2017_val").evaluator_type == "coco"
    assert [a["category_id"] for a in inst[1]["annotations"]] == [THINGS.index(CAT["dog"])]

    # the whole evaluation path works on the real layout: the oracle gets 100 everywhere
    from detectron2.config import get_cfg

    from hierseg_d2 import add_hierseg_config
    from hierseg_d2.evaluation.oracle import run_oracle_evaluation

    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    res = run_oracle_evaluation(cfg, "coco_2017_val_panoptic_with_sem_seg")
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert res["segm"]["AP"] == pytest.approx(100.0, abs=0.5)
    assert res["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_unknown_panoptic_category_is_dropped_with_warning(tmp_path, caplog):
    root = str(tmp_path)
    _make_mini_coco(root)
    path = os.path.join(root, "coco", "annotations", "panoptic_val2017.json")
    data = json.load(open(path))
    data["annotations"][1]["segments_info"][1]["category_id"] = 999  # not a COCO category
    json.dump(data, open(path, "w"))
    register_all_coco_panoptic_annos_sem_seg(root)
    with caplog.at_level("WARNING"):
        dicts = DatasetCatalog.get("coco_2017_val_panoptic")
    assert [len(d["segments_info"]) for d in dicts] == [5, 1]
    assert "999" in caplog.text and "000000000285.png" in caplog.text


def test_coco_instances_unknown_category_names_the_id(tmp_path):
    root = str(tmp_path)
    _make_mini_coco(root)
    path = os.path.join(root, "coco", "annotations", "instances_val2017.json")
    data = json.load(open(path))
    data["annotations"][0]["category_id"] = 999
    json.dump(data, open(path, "w"))
    register_all_coco_instances(root)
    with pytest.raises(KeyError, match="999"):
        DatasetCatalog.get("coco_2017_val")


# ----------------------------------------------------------------------------- ADE20K
def test_ade20k_prepare_and_load(tmp_path):
    root = str(tmp_path)
    base = os.path.join(root, "ADEChallengeData2016")
    rng = np.random.default_rng(0)
    raw = {}
    for split in ("training", "validation"):
        os.makedirs(os.path.join(base, "images", split))
        os.makedirs(os.path.join(base, "annotations", split))
        for i in (1, 2):
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
            Image.fromarray(_rng_image(24, 32, i)).save(os.path.join(base, "images", split, stem + ".jpg"))
            label = rng.integers(0, 151, (24, 32)).astype(np.uint8)  # 0 = other, 1..150 classes
            label[0, :3] = [0, 1, 150]
            Image.fromarray(label).save(os.path.join(base, "annotations", split, stem + ".png"))
            raw[(split, stem)] = label
    register_all_ade20k_semantic(root)
    with pytest.raises(FileNotFoundError, match="annotations_detectron2.*prepare_ade20k_sem_seg.py"):
        DatasetCatalog.get("ade20k_sem_seg_val")

    _script("prepare_ade20k_sem_seg").main(["--root", root])
    dicts = DatasetCatalog.get("ade20k_sem_seg_val")
    assert len(dicts) == 2 and len(DatasetCatalog.get("ade20k_sem_seg_train")) == 2
    for d in dicts:
        stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
        got = np.asarray(Image.open(d["sem_seg_file_name"])).astype(int)
        ref = raw[("validation", stem)].astype(int)
        np.testing.assert_array_equal(got, np.where(ref == 0, 255, ref - 1))
        assert got[0, :3].tolist() == [255, 0, 149]
    meta = MetadataCatalog.get("ade20k_sem_seg_val")
    assert meta.stuff_classes == ADE20K_SEM_SEG_CATEGORIES and len(meta.stuff_classes) == 150
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255


# ----------------------------------------------------------------------------- Cityscapes
def test_cityscapes_semantic(tmp_path):
    root = str(tmp_path)
    register_all_cityscapes_semantic(root)
    with pytest.raises(FileNotFoundError, match="leftImg8bit/val.*createTrainIdLabelImgs"):
        DatasetCatalog.get("cityscapes_fine_sem_seg_val")
    img_dir = os.path.join(root, "cityscapes", "leftImg8bit", "val", "frankfurt")
    gt_dir = os.path.join(root, "cityscapes", "gtFine", "val", "frankfurt")
    os.makedirs(img_dir)
    os.makedirs(gt_dir)
    stem = "frankfurt_000000_000294_"
    Image.fromarray(_rng_image(16, 32, 0)).save(os.path.join(img_dir, stem + "leftImg8bit.png"))
    for kind in ("labelIds", "instanceIds", "labelTrainIds"):
        Image.fromarray(np.zeros((16, 32), np.uint8)).save(os.path.join(gt_dir, f"{stem}gtFine_{kind}.png"))
    json.dump(
        {"imgHeight": 16, "imgWidth": 32, "objects": []}, open(os.path.join(gt_dir, stem + "gtFine_polygons.json"), "w")
    )
    dicts = DatasetCatalog.get("cityscapes_fine_sem_seg_val")
    assert len(dicts) == 1 and dicts[0]["sem_seg_file_name"].endswith("gtFine_labelTrainIds.png")
    meta = MetadataCatalog.get("cityscapes_fine_sem_seg_val")
    assert meta.evaluator_type == "cityscapes_sem_seg" and len(meta.stuff_classes) == 19 and meta.ignore_label == 255
