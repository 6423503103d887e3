"""Clustering-quality metrics and evaluator on hand-made clusterings whose errors are known exactly."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from hierseg_d2.evaluation.clustering_evaluator import (
    IGNORE,
    ClusteringEvaluator,
    achievable_segmentation_accuracy,
    cluster_maps_from_hierarchy,
    clustering_scores,
    leaking_pixels,
    load_gt_segments,
    undersegmentation_error,
)


# ----------------------------------------------------------------------------------------------------
# independent references: the set formulas of Stutz et al., written with Python sets of pixels
# ----------------------------------------------------------------------------------------------------
def _sets(labels, valid):
    out = {}
    for y, x in zip(*np.nonzero(valid)):
        out.setdefault(int(labels[y, x]), set()).add((int(y), int(x)))
    return out


def naive_ue(clusters, segments):
    valid = segments != IGNORE
    S, G = _sets(clusters, valid), _sets(segments, valid)
    n = int(valid.sum())
    total = 0
    for g in G.values():
        for s in S.values():
            if s & g:
                total += min(len(s & g), len(s - g))
    return total / n


def naive_asa(clusters, segments):
    valid = segments != IGNORE
    S, G = _sets(clusters, valid), _sets(segments, valid)
    return sum(max(len(s & g) for g in G.values()) for s in S.values()) / int(valid.sum())


def two_halves(h=16, w=16):
    seg = np.zeros((h, w), dtype=np.int64)
    seg[:, w // 2:] = 1
    return seg


# ----------------------------------------------------------------------------------------------------
# metric functions
# ----------------------------------------------------------------------------------------------------
def test_perfect_clustering_has_zero_error_and_full_accuracy():
    seg = two_halves()
    # over-segmentation that respects the segment boundary: 8x8 blocks
    clusters = (np.arange(16)[:, None] // 8) * 2 + np.arange(16)[None, :] // 8
    s = clustering_scores(clusters, seg)
    assert s["UE"] == 0.0 and s["ASA"] == 100.0 and s["clusters"] == 4
    assert not leaking_pixels(clusters, seg).any()


def test_known_leak():
    seg = two_halves()  # 128 px per segment
    clusters = np.where(seg == 0, 0, 1)
    clusters[0:4, 4:8] = 1  # 16 px of segment 0 leak into the cluster of segment 1
    # pairs: (c1, g0): min(16, 128); (c1, g1): min(128, 16); (c0, g0): min(112, 0)
    assert undersegmentation_error(clusters, seg) == pytest.approx(32 / 256)
    assert achievable_segmentation_accuracy(clusters, seg) == pytest.approx(1 - 16 / 256)
    leak = leaking_pixels(clusters, seg)
    expected = np.zeros_like(leak)
    expected[0:4, 4:8] = True
    np.testing.assert_array_equal(leak, expected)


def test_one_cluster_over_two_equal_segments():
    seg = two_halves()
    clusters = np.zeros_like(seg)
    assert undersegmentation_error(clusters, seg) == pytest.approx(1.0)  # 2 * min(128, 128) / 256
    assert achievable_segmentation_accuracy(clusters, seg) == pytest.approx(0.5)
    assert leaking_pixels(clusters, seg).sum() == 128  # one half, the tie goes to segment 0
    assert leaking_pixels(clusters, seg)[:, 8:].all()


def test_ignored_pixels_do_not_count():
    seg = two_halves()
    clusters = np.where(seg == 0, 0, 1)
    clusters[0:4, 4:8] = 1
    seg[0:4, 4:8] = IGNORE  # the leaking block is unlabelled: no error left
    assert undersegmentation_error(clusters, seg) == 0.0
    assert achievable_segmentation_accuracy(clusters, seg) == 1.0
    assert not leaking_pixels(clusters, seg).any()
    assert np.isnan(undersegmentation_error(clusters, np.full_like(seg, IGNORE)))


def test_random_maps_match_set_formulas():
    rng = np.random.default_rng(0)
    for _ in range(5):
        seg = rng.integers(-1, 4, size=(9, 11))  # -1 = IGNORE
        clusters = rng.integers(0, 6, size=(9, 11)) * 7 + 3  # arbitrary, non-contiguous ids
        assert undersegmentation_error(clusters, seg) == pytest.approx(naive_ue(clusters, seg))
        assert achievable_segmentation_accuracy(clusters, seg) == pytest.approx(naive_asa(clusters, seg))
        valid = seg != IGNORE
        # leaking fraction among labelled pixels is exactly 1 - ASA
        assert leaking_pixels(clusters, seg).sum() / valid.sum() == pytest.approx(1 - naive_asa(clusters, seg))
        assert not leaking_pixels(clusters, seg)[~valid].any()
        # huge / negative ids (e.g. RGB-encoded panoptic ids) give the same numbers as small ones
        huge_seg = np.where(valid, seg * 10**7 - 5, IGNORE)
        assert clustering_scores(clusters * 10**9, huge_seg) == clustering_scores(clusters, seg)
        np.testing.assert_array_equal(leaking_pixels(-clusters, huge_seg), leaking_pixels(clusters, seg))


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="same shape"):
        undersegmentation_error(np.zeros((4, 4)), np.zeros((4, 5)))


# ----------------------------------------------------------------------------------------------------
# hierarchy -> cluster maps
# ----------------------------------------------------------------------------------------------------
def one_hot_assign(h, w, overrides=()):
    """(9, h, w) hard assignment: every pixel to its own parent (channel 4) except ``{(y, x): k}``."""
    a = torch.zeros(9, h, w)
    a[4] = 1.0
    for (y, x), k in dict(overrides).items():
        a[:, y, x] = 0.0
        a[k, y, x] = 1.0
    return a


def hierarchy(leak=False, image_size=(16, 16)):
    # 16x16 padded input: A(2) on 4x4 (stride 4), A(3) on 2x2, A(4) on 1x1
    overrides = {(0, 1): 5} if leak else {}  # k = 3 * (dy + 1) + (dx + 1) = 5: dy = 0, dx = +1
    return {
        "assignments": [one_hot_assign(4, 4, overrides), one_hot_assign(2, 2), one_hot_assign(1, 1)],
        "image_size": image_size,
        "padded_size": (16, 16),
    }


def test_cluster_maps_compose_and_map_to_the_original_image():
    maps = cluster_maps_from_hierarchy(hierarchy(leak=True), 32, 32)  # image resized x0.5 for the net
    assert list(maps) == [4, 8, 16, 32]
    assert all(m.shape == (32, 32) for m in maps.values())
    # stride-4 grid: 4x4 cells of the network input = 8x8 cells of the original image
    assert len(np.unique(maps[4])) == 16 and len(np.unique(maps[4][:8, :8])) == 1
    # stride 8: 2x2 clusters of 16x16 px, except the moved stride-4 pixel (0, 1) -> cluster (0, 1)
    expected = (np.arange(32)[:, None] // 16) * 2 + np.arange(32)[None, :] // 16
    expected[0:8, 8:16] = 1
    np.testing.assert_array_equal(maps[8], expected)
    assert len(np.unique(maps[16])) == 1 and len(np.unique(maps[32])) == 1


def test_cluster_maps_crop_the_padding():
    # a 12x16 input padded to 16x16: the bottom stride-4 row is padding and must not be sampled
    maps = cluster_maps_from_hierarchy(hierarchy(image_size=(12, 16)), 12, 16)
    assert maps[4].max() < 12  # rows 0..2 of the 4x4 grid only
    assert maps[4].shape == (12, 16)


def test_cluster_maps_reject_inconsistent_sizes():
    h = hierarchy()
    h["padded_size"] = (24, 16)  # 24 / 4 is not a power-of-two stride
    with pytest.raises(ValueError, match="power-of-two stride"):
        cluster_maps_from_hierarchy(h, 16, 16)


# ----------------------------------------------------------------------------------------------------
# evaluator on a registered toy dataset (semantic and panoptic ground truth)
# ----------------------------------------------------------------------------------------------------
def _register(name, records, **meta):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(**meta)


@pytest.fixture
def toy_datasets(tmp_path):
    seg = np.kron(two_halves(), np.ones((2, 2), dtype=np.int64))  # 32x32, left half 0, right half 1
    sem = np.where(seg == 0, 3, 7).astype(np.uint8)  # class ids 3 / 7
    sem[0:8, 0:8] = 255  # an ignored corner
    sem_path = str(tmp_path / "sem.png")
    Image.fromarray(sem).save(sem_path)
    pan = np.zeros((32, 32, 3), dtype=np.uint8)  # panoptic ids 0 (void), 1, 2 encoded as R
    pan[..., 0] = np.where(seg == 0, 1, 2)
    pan[0:8, 0:8] = 0
    pan_path = str(tmp_path / "pan.png")
    Image.fromarray(pan).save(pan_path)
    recs_sem = [dict(file_name=f"img{i}.jpg", height=32, width=32, sem_seg_file_name=sem_path) for i in range(2)]
    recs_pan = [dict(file_name=f"img{i}.jpg", height=32, width=32, pan_seg_file_name=pan_path,
                     segments_info=[dict(id=1, category_id=0), dict(id=2, category_id=1)]) for i in range(2)]
    _register("_test_clustering_sem", recs_sem, ignore_label=255)
    _register("_test_clustering_pan", recs_pan, ignore_label=255)
    yield
    for name in ("_test_clustering_sem", "_test_clustering_pan"):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.parametrize("dataset", ["_test_clustering_sem", "_test_clustering_pan"])
def test_evaluator_reports_known_values(toy_datasets, dataset, tmp_path):
    rec = DatasetCatalog.get(dataset)[0]
    segments, kind = load_gt_segments(rec)
    assert kind == ("semantic" if dataset.endswith("sem") else "panoptic")
    assert (segments[0:8, 0:8] == IGNORE).all() and len(np.unique(segments)) == 3

    ev = ClusteringEvaluator(dataset, distributed=True, output_dir=str(tmp_path))  # gather: no-op on 1 process
    ev.reset()
    inputs = [dict(file_name=f"img{i}.jpg", height=32, width=32) for i in range(2)]
    ev.process(inputs, [{"hierarchy": hierarchy(leak=False)}, {"hierarchy": hierarchy(leak=True)}])
    res = ev.evaluate()["clustering"]
    n = 32 * 32 - 64  # labelled pixels
    # image 0 is perfect at strides 4 and 8; image 1 moves the labelled 8x8 px block at rows 0-7,
    # cols 8-15 (left segment) into the top-right stride-8 cluster (256 px of the right segment):
    # pairs (top-right, left) = min(64, 256) and (top-right, right) = min(256, 64)
    leak_ue = (64 + 64) / n
    assert res["UE@stride4"] == 0.0 and res["ASA@stride4"] == 100.0
    assert res["UE@stride8"] == pytest.approx(100 * (0 + leak_ue) / 2)
    assert res["ASA@stride8"] == pytest.approx(100 * (1 + (1 - 64 / n)) / 2)
    # strides 16 and 32: one cluster over both halves (448 and 512 labelled pixels)
    one_cluster_ue = 2 * 448 / n
    assert res["UE@stride16"] == pytest.approx(100 * one_cluster_ue)
    assert res["ASA@stride32"] == pytest.approx(100 * 512 / n)
    assert res["clusters@stride8"] == 4 and res["clusters@stride32"] == 1
    assert list(res)[:3] == ["UE@stride4", "ASA@stride4", "clusters@stride4"]
    per_image = json.loads((tmp_path / "clustering_per_image.json").read_text())
    assert [r["file_name"] for r in per_image] == ["img0.jpg", "img1.jpg"]
    assert per_image[0]["UE@stride8"] == 0.0 and per_image[1]["UE@stride8"] == pytest.approx(100 * leak_ue)


def test_instance_ground_truth_segments():
    # two overlapping squares (the smaller one stays on top), a crowd region, and background
    rec = dict(file_name="i.jpg", height=10, width=10, annotations=[
        dict(segmentation=[[0, 0, 6, 0, 6, 6, 0, 6]], iscrowd=0, category_id=0),
        dict(segmentation=[[4, 4, 8, 4, 8, 8, 4, 8]], iscrowd=0, category_id=1),
        dict(segmentation={"size": [10, 10], "counts": [90, 10]}, iscrowd=1, category_id=0),  # last column
    ])
    seg, kind = load_gt_segments(rec)
    assert kind == "instance"
    expected = np.zeros((10, 10), dtype=np.int64)
    expected[0:6, 0:6] = 1
    expected[4:8, 4:8] = 2
    expected[:, 9] = IGNORE  # column-major RLE: the last 10 pixels are column 9
    np.testing.assert_array_equal(seg, expected)


def test_evaluator_needs_hierarchy_output(toy_datasets):
    ev = ClusteringEvaluator("_test_clustering_sem", distributed=False)
    with pytest.raises(KeyError, match="CLUSTERING_EVAL"):
        ev.process([dict(file_name="img0.jpg", height=32, width=32)], [{"sem_seg": torch.zeros(2, 32, 32)}])
