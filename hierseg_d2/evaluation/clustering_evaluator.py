"""Clustering quality of HCFormer's intermediate hard clusters against ground-truth segments.

HCFormer decodes masks by copying each cluster's value to its members (Sec. 2.3), so the decoding can
only be as good as the clusters are pure. Following the paper we measure that purity with the
superpixel metrics of Stutz et al. (2018), per hierarchy level, on the HARD clusters (argmax of every
soft assignment, composed down to the finest level and mapped to the original image).

Notation: an image with ``N`` labelled pixels, clusters ``S_j`` and ground-truth segments ``G_i``
(unlabelled / ignore pixels are removed from every set and from ``N`` before counting).

* Undersegmentation error, in the corrected form of Neubert & Protzel (2012) that Stutz et al. use::

      UE = 1/N * sum_i sum_{j : S_j ∩ G_i ≠ ∅} min(|S_j ∩ G_i|, |S_j \\ G_i|)

  For every (cluster, segment) pair that overlaps we count the smaller of "the part of the cluster
  inside the segment" and "the part outside it": the leakage of the cluster across that segment.
  0 for a clustering that never crosses a segment boundary.
* Achievable segmentation accuracy::

      ASA = 1/N * sum_j max_i |S_j ∩ G_i|

  the pixel accuracy obtained by giving every cluster the label of the segment it overlaps most: an
  upper bound on the accuracy of any decoding that copies one value per cluster. 1 for a pure
  clustering. ``1 - ASA`` is exactly the fraction of *leaking pixels* (pixels outside the majority
  segment of their cluster), the red regions of :mod:`hierseg_d2.utils.hierarchy_vis`.

Both are computed per image and averaged over the dataset (as in Stutz et al.), and reported in
percent like PQ / mIoU. Ground-truth segments are the panoptic segments when the dataset has panoptic
annotations, else the semantic regions (one segment per class), else the instance masks plus one
background segment.
"""
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..modeling.clustering import compose_hard_assignments

__all__ = [
    "IGNORE",
    "contingency",
    "undersegmentation_error",
    "achievable_segmentation_accuracy",
    "leaking_pixels",
    "clustering_scores",
    "cluster_maps_from_hierarchy",
    "load_gt_segments",
    "ClusteringEvaluator",
]

IGNORE = -1  # segment id of unlabelled pixels in the ground-truth segment maps used here

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# pure numpy metrics
# ----------------------------------------------------------------------------------------------------
def _check_pair(clusters: np.ndarray, segments: np.ndarray) -> None:
    if clusters.shape != segments.shape:
        raise ValueError(f"clusters of shape {clusters.shape} and ground-truth segments of shape "
                         f"{segments.shape} must have the same shape")


def _labelled(clusters: np.ndarray, segments: np.ndarray, ignore_label: int):
    """Labelled-pixel mask and the cluster / segment ids of those pixels as small non-negative ints."""
    _check_pair(clusters, segments)
    valid = segments != ignore_label
    c = clusters[valid].astype(np.int64)
    s = segments[valid].astype(np.int64)
    # ids are used as array indices below; compact them only when they are negative or huge
    # (panoptic ids are RGB-encoded), since np.unique sorts and dominates the cost on large images
    if c.size and (c.min() < 0 or c.max() >= max(4 * c.size, 1 << 20)):
        c = np.unique(c, return_inverse=True)[1].reshape(-1)
    if s.size and (s.min() < 0 or s.max() >= 1 << 16):
        s = np.unique(s, return_inverse=True)[1].reshape(-1)
    return valid, c, s


def _pairs(c: np.ndarray, s: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_seg = int(s.max()) + 1 if s.size else 1
    n_cl = int(c.max()) + 1 if c.size else 1
    key = c * n_seg + s
    if n_cl * n_seg <= max(4 * key.size, 1 << 22):  # dense counting is linear time
        counts = np.bincount(key, minlength=n_cl * n_seg)
        pairs = np.flatnonzero(counts)
        count = counts[pairs]
    else:
        pairs, count = np.unique(key, return_counts=True)
    return pairs // n_seg, pairs % n_seg, count


def contingency(clusters: np.ndarray, segments: np.ndarray,
                ignore_label: int = IGNORE) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table of a clustering against ground-truth segments.

    Args:
        clusters: integer cluster id per pixel (any shape).
        segments: integer ground-truth segment id per pixel, same shape; ``ignore_label`` = unlabelled.
        ignore_label: pixels with this segment id are left out.

    Returns:
        ``(cluster, segment, count)``: three 1-D arrays over the non-empty intersections
        ``S_j ∩ G_i`` of labelled pixels, sorted by (cluster, segment); ``cluster`` / ``segment`` are the
        ids themselves, or their ranks when the ids are negative or very large, and ``count`` is
        ``|S_j ∩ G_i|``.
    """
    _, c, s = _labelled(clusters, segments, ignore_label)
    return _pairs(c, s)


def _ue_asa(cl: np.ndarray, count: np.ndarray) -> Tuple[float, float]:
    n = count.sum()
    if n == 0:
        return float("nan"), float("nan")
    size = np.bincount(cl, weights=count)  # |S_j| over labelled pixels
    ue = np.minimum(count, size[cl] - count).sum() / n
    best = np.zeros(len(size), dtype=np.int64)
    np.maximum.at(best, cl, count)
    return float(ue), float(best.sum() / n)


def undersegmentation_error(clusters: np.ndarray, segments: np.ndarray, ignore_label: int = IGNORE) -> float:
    """Corrected undersegmentation error (Neubert & Protzel; Stutz et al. 2018), as a fraction in [0, 1).

    ``UE = 1/N sum_i sum_{j: S_j∩G_i≠∅} min(|S_j ∩ G_i|, |S_j \\ G_i|)`` over labelled pixels.
    Returns NaN when no pixel is labelled.
    """
    cl, _, count = contingency(clusters, segments, ignore_label)
    return _ue_asa(cl, count)[0]


def achievable_segmentation_accuracy(clusters: np.ndarray, segments: np.ndarray,
                                     ignore_label: int = IGNORE) -> float:
    """Achievable segmentation accuracy ``1/N sum_j max_i |S_j ∩ G_i|`` as a fraction in (0, 1].

    Returns NaN when no pixel is labelled.
    """
    cl, _, count = contingency(clusters, segments, ignore_label)
    return _ue_asa(cl, count)[1]


def leaking_pixels(clusters: np.ndarray, segments: np.ndarray, ignore_label: int = IGNORE) -> np.ndarray:
    """Bool map of the pixels that leak: labelled pixels outside the majority segment of their cluster.

    Their fraction among labelled pixels is exactly ``1 - ASA``. Ties between equally large segments
    of a cluster are broken towards the smaller segment id (the count is the same either way).
    """
    valid, c, s = _labelled(clusters, segments, ignore_label)
    out = np.zeros(segments.shape, dtype=bool)
    if not valid.any():
        return out
    pair_cluster, pair_segment, count = _pairs(c, s)
    # pairs come sorted by (cluster, segment); order each cluster's pairs by decreasing count (ties:
    # smaller segment first) and take the first one as the cluster's majority segment
    order = np.lexsort((pair_segment, -count, pair_cluster))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair_cluster[order][1:] != pair_cluster[order][:-1]
    majority = np.zeros(int(c.max()) + 1, dtype=np.int64)
    majority[pair_cluster[order][first]] = pair_segment[order][first]
    out[valid] = majority[c] != s
    return out


def clustering_scores(clusters: np.ndarray, segments: np.ndarray,
                      ignore_label: int = IGNORE) -> Dict[str, float]:
    """UE and ASA in percent plus the number of clusters that contain labelled pixels."""
    cl, _, count = contingency(clusters, segments, ignore_label)
    ue, asa = _ue_asa(cl, count)
    return {"UE": 100.0 * ue, "ASA": 100.0 * asa, "clusters": float(len(np.unique(cl)))}


# ----------------------------------------------------------------------------------------------------
# from HCFormer's "hierarchy" output to per-level cluster maps on the original image
# ----------------------------------------------------------------------------------------------------
def _power_of_two_stride(padded: int, size: int, what: str) -> int:
    stride = 2 ** int(round(math.log2(padded / size)))
    if math.ceil(padded / stride) != size:
        raise ValueError(f"hierarchy: {what} of {size} px does not come from a padded input of {padded} px "
                         f"by a power-of-two stride (got {padded / size:.3f})")
    return stride


def cluster_maps_from_hierarchy(hierarchy: Mapping, height: int, width: int,
                                include_grid: bool = True) -> "OrderedDict[int, np.ndarray]":
    """Hard per-level clusters of one image, mapped to the original ``height x width`` image.

    Args:
        hierarchy: HCFormer's per-image ``"hierarchy"`` output: ``{"assignments": [(9, h_i, w_i), ...]
            finest first, "image_size": (H, W), "padded_size": (Hp, Wp)}``.
        height, width: size of the original image (the ``"height"``/``"width"`` of the input dict).
        include_grid: also return the finest grid itself (every pixel of the finest map is its own
            cluster): the error floor due to the layers before the first clustering (stem / patch
            embedding), which no clustering level can remove.

    Returns:
        ``{stride: (height, width) int64 cluster ids}`` ordered from fine to coarse; ``stride`` is the
        stride of the map whose pixels are the cluster prototypes (8, 16, 32 for A(2), A(3), A(4)).
    """
    for key in ("assignments", "image_size", "padded_size"):
        if key not in hierarchy:
            raise KeyError(f"hierarchy output lacks {key!r} (has {sorted(hierarchy)})")
    assignments = [torch.as_tensor(a) for a in hierarchy["assignments"]]
    if not assignments:
        raise ValueError("hierarchy output has no assignments (MODEL.HCFORMER.LEVELS = 0?)")
    img_h, img_w = (int(v) for v in hierarchy["image_size"])
    pad_h, pad_w = (int(v) for v in hierarchy["padded_size"])
    fine_h, fine_w = assignments[0].shape[-2:]
    stride0 = _power_of_two_stride(pad_h, fine_h, "the finest assignment height")
    if _power_of_two_stride(pad_w, fine_w, "the finest assignment width") != stride0:
        raise ValueError(f"hierarchy: the finest assignment map {(fine_h, fine_w)} has different strides in height "
                         f"and width for a padded input of {(pad_h, pad_w)}")
    with torch.no_grad():
        levels = [ids.cpu().numpy() for ids in compose_hard_assignments(assignments)]
    # original pixel -> resized input pixel (nearest, pixel-centre aligned) -> finest-map pixel
    rows = np.minimum(((np.arange(height) + 0.5) * img_h / height).astype(np.int64), img_h - 1) // stride0
    cols = np.minimum(((np.arange(width) + 0.5) * img_w / width).astype(np.int64), img_w - 1) // stride0
    if rows.max() >= fine_h or cols.max() >= fine_w:
        raise ValueError(f"hierarchy: image_size {(img_h, img_w)} exceeds the finest assignment map "
                         f"{(fine_h, fine_w)} at stride {stride0}")
    out = OrderedDict()
    if include_grid:
        out[stride0] = rows[:, None] * fine_w + cols[None, :]
    for level, ids in enumerate(levels):
        out[stride0 * 2 ** (level + 1)] = ids[rows[:, None], cols[None, :]].astype(np.int64)
    return out


# ----------------------------------------------------------------------------------------------------
# ground truth
# ----------------------------------------------------------------------------------------------------
def _read_png(path: str) -> np.ndarray:
    with PathManager.open(path, "rb") as f:
        return np.asarray(Image.open(f))


def load_gt_segments(record: Mapping, ignore_label: int = 255) -> Tuple[np.ndarray, str]:
    """Ground-truth segment map (int64, ``IGNORE`` = unlabelled) of one dataset record.

    Uses, in this order: panoptic segments (``pan_seg_file_name`` + ``segments_info``; id 0 and ids
    missing from ``segments_info`` are unlabelled), semantic regions (``sem_seg_file_name``; one segment
    per class, ``ignore_label`` unlabelled), instance masks (``annotations``; one segment per instance,
    the rest of the image is one background segment, crowd regions unlabelled).

    Returns:
        (segments, kind) with kind in {"panoptic", "semantic", "instance"}.
    """
    if "pan_seg_file_name" in record:
        from panopticapi.utils import rgb2id

        pan = rgb2id(_read_png(record["pan_seg_file_name"])).astype(np.int64)
        known = np.unique([s["id"] for s in record.get("segments_info", [])]).astype(np.int64)
        # RGB-encoded ids -> 0..K-1 (cheap to count with); void (id 0) and unannotated ids -> IGNORE
        index = np.searchsorted(known, pan).clip(max=max(len(known) - 1, 0))
        hit = known[index] == pan if len(known) else np.zeros(pan.shape, dtype=bool)
        return np.where(hit, index, IGNORE), "panoptic"
    if "sem_seg_file_name" in record:
        sem = _read_png(record["sem_seg_file_name"]).astype(np.int64)
        if sem.ndim != 2:
            raise ValueError(f"semantic ground truth {record['sem_seg_file_name']} has shape {sem.shape}; "
                             "expected a single-channel label PNG")
        sem[sem == ignore_label] = IGNORE
        return sem, "semantic"
    if "annotations" in record:
        return _instance_segments(record), "instance"
    raise KeyError(f"record of {record.get('file_name', '?')} has no ground-truth segments: expected "
                   "'pan_seg_file_name', 'sem_seg_file_name' or 'annotations'")


def _instance_segments(record: Mapping) -> np.ndarray:
    import pycocotools.mask as mask_util
    from detectron2.structures import polygons_to_bitmask

    height, width = record["height"], record["width"]
    seg = np.zeros((height, width), dtype=np.int64)  # 0 = background segment
    masks = []
    for k, anno in enumerate(record["annotations"]):
        poly = anno.get("segmentation")
        if poly is None:
            raise KeyError(f"annotation {k} of {record.get('file_name', '?')} has no 'segmentation'")
        if isinstance(poly, list):
            m = polygons_to_bitmask(poly, height, width)
        else:
            rle = mask_util.frPyObjects(poly, height, width) if isinstance(poly["counts"], list) else poly
            m = mask_util.decode(rle).astype(bool)
        masks.append((bool(anno.get("iscrowd", 0)), m))
    # paint large instances first so that small ones stay visible where masks overlap
    for k, (crowd, m) in sorted(enumerate(masks), key=lambda t: -t[1][1].sum()):
        seg[m] = IGNORE if crowd else k + 1
    return seg


# ----------------------------------------------------------------------------------------------------
# evaluator
# ----------------------------------------------------------------------------------------------------
class ClusteringEvaluator(DatasetEvaluator):
    """Per-level undersegmentation error and achievable segmentation accuracy of HCFormer's hard clusters.

    Needs the model's ``"hierarchy"`` outputs (``model.return_assignments = True``, which
    ``MODEL.HCFORMER.CLUSTERING_EVAL: True`` sets). Ground truth is read from the dataset records
    (``DatasetCatalog``) by ``file_name``, like Detectron2's SemSegEvaluator.

    ``evaluate()`` returns ``{"clustering": {"UE@stride8": ..., "ASA@stride8": ...,
    "clusters@stride8": ..., ...}}`` (percent; mean over images). ``stride4`` (or the finest stride in
    use) is the grid of the finest map without any clustering, the floor set by the stem. With an
    ``output_dir``, the per-image numbers are also written to ``clustering_per_image.json`` there.
    """

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None):
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        meta = MetadataCatalog.get(dataset_name)
        self._ignore_label = getattr(meta, "ignore_label", 255)
        self._records = {r["file_name"]: r for r in DatasetCatalog.get(dataset_name)}
        self._kind = None
        self.reset()

    def reset(self):
        self._per_image: List[Dict[str, object]] = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "hierarchy" not in out:
                raise KeyError("ClusteringEvaluator needs the model's 'hierarchy' output: set "
                               "MODEL.HCFORMER.CLUSTERING_EVAL True (or model.return_assignments = True)")
            record = self._records.get(inp["file_name"], inp)
            segments, kind = load_gt_segments(record, self._ignore_label)
            if self._kind is None:
                self._kind = kind
                logger.info(f"ClusteringEvaluator on {self._dataset_name}: ground-truth segments = {kind}")
            height, width = segments.shape
            if (inp.get("height", height), inp.get("width", width)) != (height, width):
                raise ValueError(f"ground truth of {inp['file_name']} is {height}x{width} but the input says "
                                 f"{inp.get('height')}x{inp.get('width')}")
            if not (segments != IGNORE).any():
                logger.warning(f"ClusteringEvaluator: {inp['file_name']} has no labelled pixel; skipped")
                continue
            maps = cluster_maps_from_hierarchy(out["hierarchy"], height, width)
            row = {"file_name": inp["file_name"]}
            for stride, clusters in maps.items():
                for name, value in clustering_scores(clusters, segments).items():
                    row[f"{name}@stride{stride}"] = value
            self._per_image.append(row)

    def evaluate(self):
        rows = self._per_image
        if self._distributed:
            comm.synchronize()
            rows = [r for part in comm.gather(rows, dst=0) for r in part]
            if not comm.is_main_process():
                return {}
        if not rows:
            logger.warning(f"ClusteringEvaluator on {self._dataset_name}: no image evaluated")
            return {}
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            with PathManager.open(os.path.join(self._output_dir, "clustering_per_image.json"), "w") as f:
                json.dump(rows, f)  # per-image numbers, to find the images where a level leaks most
        keys = sorted({k for r in rows for k in r if k != "file_name"}, key=_metric_order)
        res = OrderedDict((k, float(np.mean([r[k] for r in rows if k in r]))) for k in keys)
        return OrderedDict(clustering=res)


def _metric_order(key: str):
    name, stride = key.split("@stride")
    return int(stride), ("UE", "ASA", "clusters").index(name)
