"""Boundary IoU / Boundary AP (hierseg_d2/evaluation/boundary.py, tools/evaluate_coco_boundary_ap.py) against
naive per-pixel implementations of Cheng et al.'s definitions."""
import contextlib
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO

from hierseg_d2.evaluation import boundary_iou, evaluate_boundary_ap, mask_to_boundary
from tests.scripts import load_script

THRESHOLDS = np.linspace(0.5, 0.95, 10)


def naive_boundary(mask, dilation_ratio):
    """Mask pixels whose chessboard distance to the nearest background pixel (the outside of the image
    being background) is at most d = round(ratio * diagonal), d >= 1."""
    h, w = mask.shape
    d = max(1, int(round(dilation_ratio * math.sqrt(h * h + w * w))))
    by, bx = np.nonzero(mask == 0)
    out = np.zeros_like(mask, dtype=np.uint8)
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            dist = min(y + 1, h - y, x + 1, w - x)  # nearest pixel outside the image
            if by.size:
                dist = min(dist, int(np.maximum(np.abs(by - y), np.abs(bx - x)).min()))
            out[y, x] = dist <= d
    return out


def naive_iou(a, b):
    a, b = a.astype(bool), b.astype(bool)
    union = (a | b).sum()
    return 1.0 if union == 0 else (a & b).sum() / union


@pytest.mark.parametrize("shape,ratio", [((9, 13), 0.02), ((12, 10), 0.1), ((16, 16), 0.2), ((7, 20), 0.15)])
def test_boundary_region_matches_the_naive_definition(shape, ratio):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    for _ in range(5):
        # blobs: random rectangles, some touching the image border, with holes
        mask = np.zeros(shape, np.uint8)
        for _ in range(3):
            y0, x0 = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
            mask[y0:y0 + rng.integers(2, shape[0]), x0:x0 + rng.integers(2, shape[1])] = 1
        mask[rng.random(shape) < 0.05] = 0
        ours = mask_to_boundary(mask, ratio)
        np.testing.assert_array_equal(ours, naive_boundary(mask, ratio))
        assert ours.sum() < mask.sum() or ours.sum() == mask.sum()


def test_boundary_iou_against_naive():
    a = np.zeros((20, 24), np.uint8)
    a[3:15, 4:18] = 1
    b = np.zeros_like(a)
    b[5:17, 4:20] = 1
    ratio = 0.1  # d = round(0.1 * 31.2) = 3
    expected = naive_iou(naive_boundary(a, ratio), naive_boundary(b, ratio))
    assert boundary_iou(a, b, ratio) == pytest.approx(expected)
    assert boundary_iou(a, b, ratio) < naive_iou(a, b)  # boundaries are harsher than masks here
    assert boundary_iou(a, a, ratio) == 1.0


def rle(mask):
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def square(h, w, y0, x0, size_y, size_x):
    m = np.zeros((h, w), np.uint8)
    m[y0:y0 + size_y, x0:x0 + size_x] = 1
    return m


@pytest.fixture
def coco_case(tmp_path):
    """Two images, two categories; one ground truth and one detection per (image, category) pair kept
    simple enough that AP follows from the pairs' IoUs."""
    h, w = 40, 48
    gts = {(1, 1): square(h, w, 5, 5, 20, 20), (1, 2): square(h, w, 20, 28, 15, 18),
           (2, 1): square(h, w, 0, 0, 24, 30)}
    dts = {(1, 1): square(h, w, 6, 5, 20, 20), (1, 2): square(h, w, 21, 28, 15, 17),
           (2, 1): square(h, w, 2, 1, 21, 30)}
    gt_json = {"images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i in (1, 2)],
               "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "slab"}],
               "annotations": [{"id": k + 1, "image_id": img, "category_id": cat, "segmentation": rle(m),
                                "area": int(m.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0}
                               for k, ((img, cat), m) in enumerate(gts.items())]}
    dt_json = [{"image_id": img, "category_id": cat, "segmentation": rle(m), "score": SCORES[img, cat],
                "bbox": [0, 0, 1, 1]} for (img, cat), m in dts.items()]
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt_json))
    dt_path.write_text(json.dumps(dt_json))
    return gts, dts, str(gt_path), str(dt_path)


SCORES = {(1, 1): 0.9, (1, 2): 0.8, (2, 1): 0.7}


def expected_ap(gts, dts, ratio, boundary=True):
    """COCO AP written out for one gt and one detection per (image, category): per category and threshold,
    detections by score, cumulative precision / recall, precision made monotone, read at the 101 recall
    points; averaged over thresholds and categories."""
    per_cat = {}
    for key, g in gts.items():
        iou = naive_iou(g, dts[key])
        if boundary:
            iou = min(iou, naive_iou(naive_boundary(g, ratio), naive_boundary(dts[key], ratio)))
        per_cat.setdefault(key[1], []).append((SCORES[key], iou))
    aps = []
    for pairs in per_cat.values():
        pairs.sort(key=lambda p: -p[0])
        for t in THRESHOLDS:
            tp = np.cumsum([iou >= t for _, iou in pairs])
            fp = np.cumsum([iou < t for _, iou in pairs])
            recall, precision = tp / len(pairs), tp / (tp + fp)
            precision = np.maximum.accumulate(precision[::-1])[::-1]
            points = []
            for r in np.linspace(0, 1, 101):
                i = np.searchsorted(recall, r, side="left")
                points.append(precision[i] if i < len(recall) else 0.0)
            aps.append(np.mean(points))
    return 100 * float(np.mean(aps))


def test_boundary_ap_against_naive(coco_case):
    gts, dts, gt_path, dt_path = coco_case
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
    preds = json.load(open(dt_path))
    ratio = 0.05  # d = round(0.05 * 62.5) = 3
    b = evaluate_boundary_ap(coco_gt, preds, ratio, verbose=False)
    m = evaluate_boundary_ap(coco_gt, preds, ratio, verbose=False, iou_type="segm")
    assert b["AP"] == pytest.approx(expected_ap(gts, dts, ratio), abs=1e-6)
    assert m["AP"] == pytest.approx(expected_ap(gts, dts, ratio, boundary=False), abs=1e-6)
    # boundary IoUs 0.71, 0.60, 0.41 against mask IoUs 0.90, 0.83, 0.82: Boundary AP 22.6, mask AP 75.0
    assert 20 < b["AP"] < 25 and 70 < m["AP"] < 80


def load_tool():
    return load_script("tools/evaluate_coco_boundary_ap.py")


def test_tool_and_bad_input(coco_case, tmp_path, capsys):
    gts, dts, gt_path, dt_path = coco_case
    tool = load_tool()
    res = tool.main(["--gt-json-file", gt_path, "--dt-json-file", dt_path, "--dilation-ratio", "0.05"])
    assert res["AP"] == pytest.approx(expected_ap(gts, dts, 0.05), abs=1e-6)
    assert "Boundary AP" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        tool.main(["--gt-json-file", gt_path, "--dt-json-file", str(tmp_path / "nothing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match="bad.json"):
        tool.main(["--gt-json-file", gt_path, "--dt-json-file", str(bad)])
    with pytest.raises(ValueError, match="not a COCO instances json"):
        tool.main(["--gt-json-file", dt_path, "--dt-json-file", dt_path])
    wrong = json.load(open(dt_path))
    wrong[0]["image_id"] = 99
    bad.write_text(json.dumps(wrong))
    with pytest.raises(KeyError, match="image ids \\[99\\]"):
        tool.main(["--gt-json-file", gt_path, "--dt-json-file", str(bad)])
    with pytest.raises(KeyError, match="not a registered dataset"):
        tool.main(["--dataset-name", "no_such_dataset", "--dt-json-file", dt_path])


def test_evaluator_reports_boundary_ap_next_to_mask_ap(shapes_root, tmp_path):
    """Ground-truth masks as predictions: Boundary AP 100; the same masks eroded by 2 px keep a mask AP far
    above their Boundary AP."""
    import cv2
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Instances

    from hierseg_d2.evaluation import BoundaryCOCOEvaluator

    name = "shapes_val_instance"
    records = DatasetCatalog.get(name)[:3]

    def run(erode):
        ev = BoundaryCOCOEvaluator(name, output_dir=str(tmp_path / f"e{erode}"), dilation_ratio=0.02)
        ev.reset()
        for r in records:
            h, w = r["height"], r["width"]
            masks = []
            for a in r["annotations"]:
                m = mask_util.decode(a["segmentation"]) if isinstance(a["segmentation"], dict) else \
                    mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w)))
                if erode:
                    m = cv2.erode(m, np.ones((3, 3), np.uint8), iterations=erode)
                masks.append(torch.from_numpy(m.astype(bool)))
            inst = Instances((h, w))
            inst.pred_masks = torch.stack(masks)
            inst.scores = torch.ones(len(masks))
            inst.pred_classes = torch.tensor([a["category_id"] for a in r["annotations"]])
            ev.process([{"image_id": r["image_id"], "file_name": r["file_name"]}], [{"instances": inst}])
        return ev.evaluate(img_ids=[r["image_id"] for r in records])

    exact = run(0)
    assert exact["boundary_segm"]["AP"] == pytest.approx(100.0) and exact["segm"]["AP"] == pytest.approx(100.0)
    eroded = run(2)
    assert eroded["boundary_segm"]["AP"] < eroded["segm"]["AP"] - 10
