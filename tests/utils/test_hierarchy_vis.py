"""Hierarchy strips: layout, cluster boundaries and red leak regions where they are known exactly."""
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog

from hierseg_d2.evaluation.clustering_evaluator import cluster_maps_from_hierarchy
from hierseg_d2.utils import hierarchy_vis as hv
from tests.evaluation.test_clustering_evaluator import one_hot_assign

STUFF = "_test_hierarchy_vis_meta"



def leaky_hierarchy():
    # 16x16 input, no resize: stride-4 pixel (0, 1) (image rows 0-3, cols 4-7) joins stride-8 cluster (0, 1)
    return {"assignments": [one_hot_assign(4, 4, {(0, 1): 5}), one_hot_assign(2, 2), one_hot_assign(1, 1)],
            "image_size": (16, 16), "padded_size": (16, 16)}


def halves():
    seg = np.zeros((16, 16), dtype=np.int64)
    seg[:, 8:] = 1
    return seg


def test_cluster_boundaries_exact():
    ids = np.array([[0, 0, 1],
                    [0, 0, 1],
                    [2, 2, 2]])
    expected = np.array([[0, 1, 0],  # (0,1): right neighbour differs; (0,2): same as right/below-less
                         [1, 1, 1],  # (1,0), (1,1): lower neighbour differs; (1,2): lower differs
                         [0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(hv.cluster_boundaries(ids), expected)


def test_strip_layout_and_red_leak_region():
    image = np.full((16, 16, 3), 100, dtype=np.uint8)
    maps = cluster_maps_from_hierarchy(leaky_hierarchy(), 16, 16, include_grid=False)
    pred = np.zeros((16, 16, 3), dtype=np.uint8)
    strip = hv.draw_hierarchy_strip(image, maps, pred, gt_segments=halves())
    k = hv.display_scale(16, 16)
    side, ph = 16 * k, 16 * k + hv.HEADER_H
    # 2 rows x (3 levels + ground truth / prediction) panels
    assert strip.shape == (2 * ph + hv.GAP, 4 * side + 3 * hv.GAP, 3)

    # bottom-left panel = leaks of the stride-8 level: exactly the moved 4x4 block is red
    panel = strip[ph + hv.GAP + hv.HEADER_H:, :side].astype(int)
    red = (panel[..., 0] > 150) & (panel[..., 1] < 80)
    expected = np.zeros((16, 16), dtype=bool)
    expected[0:4, 4:8] = True
    expected = np.repeat(np.repeat(expected, k, 0), k, 1)
    gt_edge = np.zeros((side, side), dtype=bool)  # white GT boundary lines are drawn over the red
    gt_edge[:, 8 * k - k:8 * k + k] = True
    np.testing.assert_array_equal(red[~gt_edge], expected[~gt_edge])

    # top-left panel = stride-8 clusters: white boundary after the moved block (image col 8) and at row 8
    top = strip[hv.HEADER_H:ph, :side]
    white = top.min(axis=2) > 200
    assert white[:, 8 * k - 1].sum() > 0 and white[8 * k - 1, :].all()
    assert not white[2 * k, :2 * k].any()  # inside the first cluster, away from the (thick) lines
    # coarsest level is a single cluster: no line at all
    coarse = strip[hv.HEADER_H:ph, 2 * (side + hv.GAP):2 * (side + hv.GAP) + side]
    assert not (coarse.min(axis=2) > 200).any()


def test_strip_without_ground_truth_is_one_row():
    image = np.full((16, 16, 3), 100, dtype=np.uint8)
    maps = cluster_maps_from_hierarchy(leaky_hierarchy(), 16, 16, include_grid=False)
    strip = hv.draw_hierarchy_strip(image, maps, np.zeros((5, 5, 3), np.uint8))
    k = hv.display_scale(16, 16)
    assert strip.shape == (16 * k + hv.HEADER_H, 4 * 16 * k + 3 * hv.GAP, 3)


@pytest.fixture
def metadata():
    MetadataCatalog.get(STUFF).set(stuff_classes=["left", "right"], stuff_colors=[[0, 0, 255], [0, 255, 0]])
    yield MetadataCatalog.get(STUFF)
    MetadataCatalog.remove(STUFF)


def test_hierarchy_strip_from_model_output(metadata, tmp_path):
    from PIL import Image

    sem = halves().astype(np.uint8)
    Image.fromarray(sem).save(tmp_path / "gt.png")
    record = {"file_name": "x.jpg", "sem_seg_file_name": str(tmp_path / "gt.png")}
    logits = torch.zeros(2, 16, 16)
    logits[1, :, 8:] = 1.0  # a perfect semantic prediction
    out = {"sem_seg": logits, "hierarchy": leaky_hierarchy()}
    image = np.full((16, 16, 3), 100, dtype=np.uint8)
    strip, scores = hv.hierarchy_strip(image, out, metadata, record)
    assert strip.ndim == 3 and strip.shape[0] > 2 * 16 * hv.display_scale(16, 16)
    assert scores["UE@stride8"] == pytest.approx(100 * 32 / 256)  # see the evaluator's known-leak test
    assert scores["ASA@stride8"] == pytest.approx(100 * (1 - 16 / 256))
    assert scores["clusters@stride32"] == 1
    with pytest.raises(KeyError, match="return_assignments"):
        hv.hierarchy_strip(image, {"sem_seg": logits}, metadata, record)


def test_clustering_table_lists_every_level():
    table = hv.format_clustering_table({"UE@stride4": 1.0, "ASA@stride4": 99.0, "clusters@stride4": 16.0,
                                        "UE@stride8": 12.5, "ASA@stride8": 93.75, "clusters@stride8": 4.0})
    lines = table.splitlines()
    assert "no clustering" in lines[2] and "A(2) stride 8" in lines[3] and "12.50" in lines[3]
