"""The shapes generator: deterministic, consistent annotations in every format, the promised statistics."""

import hashlib
import json
import os
import threading
import time

import numpy as np
from PIL import Image

from hierseg_d2.data.datasets import shapes_generator as sg
from hierseg_d2.data.datasets.shapes_generator import (
    SHAPES_CATEGORIES,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    is_generated,
    render_image,
    shapes_paths,
)


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def _tree_digests(d):
    out = {}
    for dirpath, _, files in os.walk(d):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, d)] = _digest(p)
    return out


def test_categories_things_then_stuff():
    things = [c for c in SHAPES_CATEGORIES if c["isthing"]]
    stuff = [c for c in SHAPES_CATEGORIES if not c["isthing"]]
    assert len(things) == 8 and len(stuff) == 4
    assert [c["id"] for c in SHAPES_CATEGORIES] == list(range(1, 13))
    assert SHAPES_CATEGORIES[:8] == things  # contiguous ids: things 0-7, stuff 8-11
    assert len({c["name"] for c in SHAPES_CATEGORIES}) == 12


def test_deterministic_and_prefix_stable(tmp_path):
    a = generate_shapes_dataset(str(tmp_path / "a"), {"train": 3, "val": 2}, seed=5, progress=False)
    b = generate_shapes_dataset(str(tmp_path / "b"), {"train": 3, "val": 2}, seed=5, progress=False)
    assert _tree_digests(a) == _tree_digests(b)
    # a longer split starts with the same images (each image has its own random stream)
    c = generate_shapes_dataset(str(tmp_path / "c"), {"train": 5, "val": 0}, seed=5, progress=False)
    for i in (1, 2, 3):
        assert _digest(f"{a}/train/{i:06d}.jpg") == _digest(f"{c}/train/{i:06d}.jpg")
    # another seed gives other images
    d = generate_shapes_dataset(str(tmp_path / "d"), {"train": 1, "val": 0}, seed=6, progress=False)
    assert _digest(f"{a}/train/000001.jpg") != _digest(f"{d}/train/000001.jpg")


def test_annotation_formats_agree(shapes_root):
    """Panoptic PNG+json, instances json (RLE) and semantic PNG describe the same segmentation."""
    from panopticapi.utils import rgb2id
    from pycocotools import mask as mask_util

    p = shapes_paths(shapes_root, "val")
    pan_json = json.load(open(p["panoptic_json"]))
    inst_json = json.load(open(p["instances_json"]))
    assert pan_json["categories"] == SHAPES_CATEGORIES
    assert [c["id"] for c in inst_json["categories"]] == list(range(1, 9))
    assert pan_json["images"] == inst_json["images"]
    inst_by_image = {}
    for a in inst_json["annotations"]:
        inst_by_image.setdefault(a["image_id"], []).append(a)
    images = {im["id"]: im for im in pan_json["images"]}
    for ann in pan_json["annotations"]:
        im = images[ann["image_id"]]
        image = np.asarray(Image.open(os.path.join(p["image_root"], im["file_name"])))
        assert image.shape == (im["height"], im["width"], 3)
        ids = rgb2id(np.asarray(Image.open(os.path.join(p["panoptic_root"], ann["file_name"]))))
        sem = np.asarray(Image.open(os.path.join(p["sem_seg_root"], ann["file_name"])))
        assert ids.shape == sem.shape == image.shape[:2]
        assert (ids > 0).all()  # every pixel is labelled (no VOID in shapes)
        expected_sem = np.full(sem.shape, 255)
        things = []
        for s in ann["segments_info"]:
            m = ids == s["id"]
            assert m.sum() == s["area"] > 0
            x, y, w, h = s["bbox"]
            ys, xs = np.nonzero(m)
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            expected_sem[m] = s["category_id"] - 1
            if s["category_id"] <= 8:
                things.append((s["category_id"], m))
        np.testing.assert_array_equal(sem, expected_sem)
        insts = inst_by_image[ann["image_id"]]
        assert len(insts) == len(things)
        for a, (cat, m) in zip(insts, things):
            assert a["category_id"] == cat and a["iscrowd"] == 0 and a["area"] == m.sum()
            np.testing.assert_array_equal(mask_util.decode(a["segmentation"]).astype(bool), m)
            assert a["bbox"] == [int(v) for v in mask_util.toBbox(a["segmentation"])]


def _hsv(rgb):
    import colorsys

    return colorsys.rgb_to_hsv(*(np.asarray(rgb, np.float64) / 255.0))


def test_dataset_statistics():
    """Sizes vary (not only multiples of 32), several overlapping things per image, each thing class in
    its own hue family but varying in brightness, greyish stuff, things are not slivers, stuff regions
    are coherent blobs."""
    from scipy import ndimage

    sizes, n_things, colours = [], [], {}
    for i in range(40):
        image, sem, things, stuff = render_image(0, "train", i)
        h, w = sem.shape
        sizes += [h, w]
        n_things.append(len(things))
        for t in things:
            m = t["mask"]
            assert m.sum() >= 80
            colours.setdefault(t["category_id"], []).append(_hsv(image[m].mean(0)))
            assert np.median([_hsv(p)[1] for p in image[m][::7]]) > 0.6  # saturated
        for cid, m in stuff.items():
            assert np.median([_hsv(p)[1] for p in image[m][::13]]) < 0.4, cid  # greyish
            # pieces of the stuff region once the things lying on it are given back to it
            lab, _ = ndimage.label(m | np.isin(sem, range(8)))
            n = len(np.unique(lab[m]))
            assert n == 1, f"stuff {cid} of image {i} is fragmented into {n} pieces"
    assert 96 <= min(sizes) and max(sizes) <= 192
    assert sum(s % 32 != 0 for s in sizes) > len(sizes) // 2
    assert np.mean(n_things) >= 3 and min(n_things) >= 1
    # class k's instances have hue 45k +- 12 degrees (shading and noise move the mean a little) ...
    for cid, cols in colours.items():
        hue_dev = (np.array(cols)[:, 0] * 360 - 45 * (cid - 1) + 180) % 360 - 180
        assert np.abs(hue_dev).max() < 15, (cid, hue_dev)
        # ... but brightness and saturation vary from instance to instance
        if len(cols) >= 5:
            assert np.array(cols)[:, 1:].std(0).min() > 0.05, cid


def test_occlusion_present_but_bounded():
    """Later shapes cover parts of earlier ones, but every thing keeps >= 60 % of its drawn area."""
    occluded = 0
    for i in range(30):
        _, _, things, _ = render_image(0, "train", i)
        for a, t in enumerate(things):
            visible = int(t["mask"].sum())
            assert visible >= 0.6 * t["drawn_area"]
            occluded += visible < t["drawn_area"]
            for u in things[a + 1 :]:
                assert not (t["mask"] & u["mask"]).any()  # panoptic: visible masks are disjoint
    assert occluded >= 10


def test_first_use_generation_is_locked(tmp_path, monkeypatch):
    """Two concurrent callers: one generates, the other waits and reuses it."""
    calls = []
    real = sg.generate_shapes_dataset

    def counting(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)  # widen the race window
        return real(*args, **kwargs)

    monkeypatch.setattr(sg, "generate_shapes_dataset", counting)
    root = str(tmp_path)
    num = {"train": 2, "val": 1}
    threads = [threading.Thread(target=ensure_shapes_dataset, args=(root, num, None, False)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert is_generated(root, num)
    assert not is_generated(root, {"train": 3, "val": 1})
    # asking for other sizes regenerates
    ensure_shapes_dataset(root, {"train": 3, "val": 1}, progress=False)
    assert len(calls) == 2 and is_generated(root, {"train": 3, "val": 1})
    assert os.listdir(root) == ["shapes"]  # lock and temporary files stay inside the (gitignored) dir
