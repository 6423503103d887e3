"""MaskFormer post-processing (HCFormer App. E) from one image's class logits and decoded mask logits.

Each pixel goes to the query maximising p_i(c_i) * m_i(pixel) among queries whose most likely class
c_i is not "no object", i.e. the clustering problem of eq. (2) with the queries as prototypes.
"""
import ctypes
import ctypes.util
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from .bilinear import exact_upsampling_available, is_power_of_two, upsample_rows

__all__ = ["semantic_inference", "panoptic_inference", "instance_inference", "postprocess_image"]


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """(Q, K+1) logits, (Q, H, W) mask logits -> (K, H, W) per-class scores sum_i p_i(c) m_i."""
    return torch.einsum("qc,qhw->chw", F.softmax(mask_cls, dim=-1)[..., :-1], mask_pred.sigmoid())


def panoptic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, thing_ids: Optional[Set[int]],
                       object_mask_threshold: float, overlap_threshold: float
                       ) -> Tuple[torch.Tensor, List[Dict]]:
    """Panoptic segmentation in Detectron2's format: (H, W) int32 segment ids (0 = void) and segments_info.

    Queries scoring below ``object_mask_threshold`` or predicting "no object" are dropped; a query keeps
    the pixels it wins (and where its mask is >= 0.5) only if they are at least ``overlap_threshold`` of
    its own mask; stuff queries of the same class are merged into one segment. ``thing_ids`` are the
    contiguous ids of thing classes (None: every class is a thing).
    """
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    panoptic = _PanopticBands(scores[keep], labels[keep], tuple(mask_pred.shape[-2:]), mask_pred.device)
    panoptic.add(mask_pred[keep].sigmoid(), 0, mask_pred.shape[-2])  # the whole image as one band
    return panoptic.finish(thing_ids, overlap_threshold)


def instance_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, topk: int,
                       thing_ids: Optional[Set[int]] = None) -> Instances:
    """Top-k (query, class) pairs as Detectron2 Instances with pred_masks, pred_boxes, scores, pred_classes.

    The score is the class probability times the mean mask probability inside the binary mask (logits > 0);
    ``thing_ids`` (panoptic datasets) drops stuff classes. ``pred_masks`` are bool, as Detectron2's Mask R-CNN
    outputs.
    """
    scores, labels, queries = _instance_pairs(F.softmax(mask_cls, dim=-1), topk, thing_ids)
    queries, pair_rows = torch.unique(queries, return_inverse=True)
    instances = _InstanceBands(scores, labels, pair_rows, queries.numel(), tuple(mask_pred.shape[-2:]),
                               mask_pred.device, mask_pred.dtype)
    mask_pred = mask_pred[queries]
    instances.add(mask_pred > 0, mask_pred.sigmoid(), 0, mask_pred.shape[-2])  # the whole image as one band
    return instances.finish()


class _Scratch:
    """Per-band temporaries reused from band to band: a fresh tensor of a few MB per band costs more in page
    faults (~0.25 ms per MB on this machine) than the work done on it."""

    def __init__(self, device):
        self.device, self.buffers = device, {}

    def __call__(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buffer[:numel].view(shape)


class _PanopticBands:
    """Panoptic segmentation of :func:`panoptic_inference` built from bands of rows of the kept queries' mask
    probabilities: per band, the winning query of each pixel (first maximum of score * probability) and the
    per-query pixel counts the overlap decision needs (won, own = probability >= 0.5, both); after the last
    band, the decisions and the stuff merging, then the segment map by one lookup. Same result as deciding on
    the whole (N, H, W) stack, without keeping it."""

    def __init__(self, scores: torch.Tensor, classes: torch.Tensor, size: Tuple[int, int], device):
        self.scores, self.classes = scores, classes
        self.scores_list = scores.tolist()  # float32 values: as Python scalars, the same products
        n = scores.shape[0]
        # winner index where the winner's own mask covers the pixel, n elsewhere (a void entry in the lookup)
        self.code = torch.full(size, n, dtype=torch.long, device=device)
        self.won, self.own, self.both = (torch.zeros(n, dtype=torch.long, device=device) for _ in range(3))

    def add(self, probs: torch.Tensor, y0: int, y1: int, scratch: Optional[_Scratch] = None):
        """``probs``: (N, y1 - y0, W) probabilities of the kept queries on output rows y0:y1."""
        n = self.scores.shape[0]
        if n == 0:
            return
        scratch = scratch or _Scratch(probs.device)
        probs = probs.reshape(n, -1)
        pixels = probs.shape[1]
        # first maximum of score * probability over the queries (argmax's choice), one query at a time: over
        # the non-contiguous query axis argmax is 2.5x slower
        best = torch.mul(probs[0], self.scores_list[0], out=scratch("best", (pixels,), probs.dtype))
        winner = scratch("winner", (pixels,), torch.long).zero_()
        weighted = scratch("weighted", (pixels,), probs.dtype)
        better = scratch("better", (pixels,), torch.bool)
        for k in range(1, n):
            torch.gt(torch.mul(probs[k], self.scores_list[k], out=weighted), best, out=better)
            torch.maximum(best, weighted, out=best)
            winner.masked_fill_(better, k)
        own = torch.ge(probs, 0.5, out=scratch("own", (n, pixels), torch.bool))
        own_winner = own.gather(0, winner[None])[0]
        self.own += own.sum(1)
        self.won += torch.bincount(winner, minlength=n)
        self.both += torch.bincount(winner[own_winner], minlength=n)
        self.code[y0:y1] = torch.where(own_winner, winner, n).view(y1 - y0, -1)

    def finish(self, thing_ids: Optional[Set[int]], overlap_threshold: float) -> Tuple[torch.Tensor, List[Dict]]:
        n = self.scores.shape[0]
        lookup = [0] * (n + 1)
        segments_info: List[Dict] = []
        stuff_segment = {}
        for k, (pred_class, won, own, both) in enumerate(zip(self.classes.tolist(), self.won.tolist(),
                                                            self.own.tolist(), self.both.tolist())):
            isthing = thing_ids is None or pred_class in thing_ids
            if won == 0 or own == 0 or both == 0 or won / own < overlap_threshold:
                continue
            if not isthing and pred_class in stuff_segment:  # stuff of one class: one segment
                lookup[k] = stuff_segment[pred_class]
                continue
            lookup[k] = len(segments_info) + 1
            if not isthing:
                stuff_segment[pred_class] = lookup[k]
            segments_info.append({"id": lookup[k], "isthing": bool(isthing), "category_id": pred_class})
        lookup = torch.tensor(lookup, dtype=torch.int32, device=self.code.device)
        return lookup[self.code], segments_info


class _InstanceBands:
    """Instances of :func:`instance_inference` built from bands of rows: per query, the binary mask
    (logits > 0: not probabilities > 0.5, the sigmoid rounds to 0.5 near 0) is written once per (query,
    class) pair into bool ``pred_masks``, and its area, rows and columns and the probability sum inside it
    are accumulated; boxes and mask scores follow after the last band."""

    def __init__(self, pair_scores: torch.Tensor, pair_labels: torch.Tensor, pair_rows: torch.Tensor,
                 num_queries: int, size: Tuple[int, int], device, dtype):
        self.pair_scores, self.pair_labels, self.pair_rows, self.dtype = pair_scores, pair_labels, pair_rows, dtype
        height, width = size
        self.masks = torch.empty((pair_rows.numel(), height, width), dtype=torch.bool, device=device)
        self.area = torch.zeros(num_queries, dtype=torch.long, device=device)
        self.inside = torch.zeros(num_queries, dtype=torch.float64, device=device)
        self.rows = torch.zeros((num_queries, height), dtype=torch.bool, device=device)
        self.cols = torch.zeros((num_queries, width), dtype=torch.uint8, device=device)

    def add(self, positive: torch.Tensor, probs: torch.Tensor, y0: int, y1: int, scratch: Optional[_Scratch] = None):
        """``positive``: (N, y1 - y0, W) logits > 0 of the instance queries, ``probs`` their probabilities."""
        scratch = scratch or _Scratch(probs.device)
        self.masks[:, y0:y1] = torch.index_select(positive, 0, self.pair_rows,
                                                  out=scratch("pair_masks", (self.pair_rows.numel(),) + positive.shape[1:],
                                                              torch.bool))
        # reductions on uint8: several times faster than on bool here (a copy: a dtype view does not trace)
        positive = scratch("positive_u8", positive.shape, torch.uint8).copy_(positive)
        row_area = positive.sum(2, dtype=torch.int32)
        self.area += row_area.sum(1)
        self.rows[:, y0:y1] = row_area > 0
        torch.maximum(self.cols, positive.amax(1), out=self.cols)
        # float32 band sums accumulated in float64 (the naive whole-image float32 sum rounds more)
        inside = torch.mul(probs, positive, out=scratch("inside", probs.shape, probs.dtype))
        self.inside += inside.flatten(1).sum(1)

    def finish(self) -> Instances:
        inst = Instances(tuple(self.masks.shape[-2:]))
        inst.pred_masks = self.masks
        inst.pred_boxes = Boxes(_boxes(self.rows, self.cols.bool())[self.pair_rows])
        area = self.area.to(self.dtype)
        mask_scores = self.inside.to(self.dtype) / (area + 1e-6)
        inst.scores = self.pair_scores * mask_scores[self.pair_rows]
        inst.pred_classes = self.pair_labels
        return inst


def _boxes(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N, 4) XYXY float boxes from per-mask occupied rows (N, H) and columns (N, W), as
    BitMasks.get_bounding_boxes (zeros for an empty mask)."""
    height, width = rows.shape[1], cols.shape[1]
    x0 = cols.byte().argmax(1)  # first maximum: the first occupied column
    x1 = width - cols.flip(1).byte().argmax(1)
    y0 = rows.byte().argmax(1)
    y1 = height - rows.flip(1).byte().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return boxes * cols.any(1, keepdim=True)


def _instance_pairs(probs: torch.Tensor, topk: int, thing_ids: Optional[Set[int]]):
    """Top-k (query, class) pairs of (Q, K+1) class probabilities, stuff classes dropped when ``thing_ids`` is
    given: their scores, classes and queries."""
    num_queries, num_classes = probs.shape[0], probs.shape[1] - 1
    class_scores = probs[:, :-1]
    labels = torch.arange(num_classes, device=probs.device).repeat(num_queries)
    scores, indices = class_scores.flatten().topk(min(topk, class_scores.numel()), sorted=False)
    labels, queries = labels[indices], indices // num_classes
    if thing_ids is not None:
        is_thing = torch.tensor([int(c) in thing_ids for c in labels], dtype=torch.bool, device=probs.device)
        scores, labels, queries = scores[is_thing], labels[is_thing], queries[is_thing]
    return scores, labels, queries


def _bilinear(x: torch.Tensor, size: Tuple[int, int], channels: int) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of (c, h, w) ``x``, part of a stack of ``channels`` maps, equal to
    the same rows of resizing the whole stack. PyTorch's CPU dispatch runs a different (channels-last,
    vectorised) kernel, which rounds differently, for 3 maps with one thread or an output with H + W <= 128:
    a part of 3 maps of a larger stack (or of fewer of a stack of 3) gets copies of its first map. The output
    size is the callers' concern: that kernel's rounding also depends on the number of maps, so with such an
    output the whole stack is resized (postprocess_image), and bands are widened (:func:`_row_bands`)."""
    c = x.shape[0]
    extra = (4 if c == 3 else 3) - c if (c == 3) != (channels == 3) else 0
    if extra > 0:
        x = torch.cat([x, x[:1].expand(extra, -1, -1)])
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0, :c]


def _resize(logits: torch.Tensor, padded_size: Tuple[int, int], image_size: Tuple[int, int],
            out_size: Tuple[int, int], channels: int) -> torch.Tensor:
    """(N, h, w) decoded logits, part of a stack of ``channels``, -> (N, H, W) at the output size: the
    upsampling to the padded size, the crop and the resize of Detectron2's sem_seg_postprocess, the last
    skipped when it is the identity (bilinear with align_corners=False at scale 1 copies its input)."""
    x = _bilinear(logits, padded_size, channels)[:, :image_size[0], :image_size[1]]
    if tuple(x.shape[-2:]) != tuple(out_size):
        x = _bilinear(x, out_size, channels)
    return x


def _row_bands(logits: torch.Tensor, padded_size: Tuple[int, int], image_size: Tuple[int, int],
               out_size: Tuple[int, int], chunk: int, channels: int):
    """Bands of about ``chunk`` output rows: a list of (y0, y1) and a function (y0, y1, out) writing into ``out``
    the (N, y1 - y0, W) rows of resizing the whole stack of ``channels`` decoded maps (``logits`` are N of
    them), bit for bit.

    When the output is the cropped image (no second resize) and the padded size is 2^k times the decoded one
    (stride 4: k = 2), the rows are computed from the decoded rows they read: by the separable form of
    PyTorch's kernel (:mod:`.bilinear`, 4x faster) where it rounds alike and PyTorch would use that kernel
    (not for H + W <= 128 or a stack of 3, see :func:`_bilinear`); otherwise by ``F.interpolate`` of the slice
    of decoded rows the band reads (output row y reads rows floor((y + 0.5) / 2^k - 0.5) and the next),
    widened while the upsampled slice has H + W <= 128: relative to the slice, the source coordinate only
    shifts by the slice's first row, exactly in float, so the rows equal those of the whole upsampling. Band
    edges then sit half a decoded row into one (y = 2^(k-1) mod 2^k) so that consecutive slices share one
    decoded row. With a second, non-integer resize (e.g. evaluation at the original resolution) the rows come
    from the whole resized stack, computed 16 maps at a time.
    """
    height, (h, w) = out_size[0], logits.shape[-2:]
    ratio = padded_size[0] // h
    offset = 0
    if tuple(image_size) != tuple(out_size) or ratio * h != padded_size[0] or ratio & (ratio - 1):  # 1, 2, 4, ...
        full = logits.new_empty((logits.shape[0],) + tuple(out_size))
        for start in range(0, logits.shape[0], 16):
            full[start:start + 16] = _resize(logits[start:start + 16], padded_size, image_size, out_size, channels)

        def rows(y0: int, y1: int, out: torch.Tensor):
            out.copy_(full[:, y0:y1])
    elif (is_power_of_two(ratio) and tuple(padded_size) == (ratio * h, ratio * w) and sum(padded_size) > 128
          and channels != 3 and exact_upsampling_available(logits.device.type, logits.dtype)):
        def rows(y0: int, y1: int, out: torch.Tensor):
            upsample_rows(logits, ratio, y0, y1, image_size[1], out=out)
    else:
        def first_row(y: int) -> int:  # floor((y + 0.5) / ratio - 0.5), clamped at 0 as PyTorch does
            return max((2 * y + 1 - ratio) // (2 * ratio), 0)

        def rows(y0: int, y1: int, out: torch.Tensor):
            m0, m1 = first_row(y0), min(first_row(y1 - 1) + 2, h)
            while ratio * (m1 - m0) + padded_size[1] <= 128 and (m0 > 0 or m1 < h):
                m0, m1 = max(m0 - 1, 0), min(m1 + 1, h)
            x = _bilinear(logits[:, m0:m1], (ratio * (m1 - m0), padded_size[1]), channels)
            out.copy_(x[:, y0 - ratio * m0:y1 - ratio * m0, :image_size[1]])
        offset = ratio // 2
    edges = [0] + list(range(offset + chunk, height, chunk)) + [height]
    return list(zip(edges[:-1], edges[1:])), rows


def _select(band: torch.Tensor, rows: torch.Tensor, scratch: _Scratch, name: str) -> torch.Tensor:
    """band[rows] into a reused buffer (band itself when rows are all of it, in order)."""
    if rows.numel() == band.shape[0] and bool((rows == torch.arange(rows.numel(), device=rows.device)).all()):
        return band
    return torch.index_select(band, 0, rows, out=scratch(name, (rows.numel(),) + band.shape[1:], band.dtype))


def _matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a @ b written into ``out``, a reused buffer; the plain product while tracing, whose two-operand form
    FLOP counters (fvcore's matmul handle) expect."""
    if torch.jit.is_tracing():
        return a @ b
    return torch.mm(a, b, out=out)


def _vector_multiple(numel: int) -> int:
    """``numel`` rounded up to a multiple of 64: a sigmoid over that many contiguous floats runs every element
    through PyTorch's vectorised loop (its last numel % (2 x vector width) elements go to a scalar sigmoid
    that rounds differently), as the sigmoid of a whole (Q, H, W) stack does."""
    return -(-numel // 64) * 64


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def _release_free_heap(device: torch.device):
    """Return the C heap's free pages to the OS before allocating the outputs: the network's activations,
    freed by now, stay in glibc's heap (0.3 GB at 800x1216 with R50) while the outputs need fresh pages, so
    that without this the peak RSS is both."""
    if device.type == "cpu" and _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def postprocess_image(mask_cls: torch.Tensor, mask_logits: torch.Tensor, padded_size: Tuple[int, int],
                      image_size: Tuple[int, int], out_size: Tuple[int, int], *, semantic_on: bool,
                      panoptic_on: bool, instance_on: bool, thing_ids: Optional[Set[int]] = None,
                      object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8, topk: int = 100,
                      chunk: int = 16) -> Dict:
    """The three outputs of one image from its (Q, K+1) class logits and (Q, h, w) decoded mask logits, equal
    to resizing every mask to ``out_size`` (upsample to ``padded_size``, crop to ``image_size``, resize) and
    calling :func:`semantic_inference`, :func:`panoptic_inference`, :func:`instance_inference`, but streamed
    over bands of ``chunk`` output rows, so that no (Q, H, W) stack exists:

    - per band, the queries an output uses (all for the semantic scores; those above the object threshold for
      panoptic; those of the top-k (query, class) pairs for instances) are upsampled for those rows only
      (bit-identical rows, see :func:`_row_bands`) and passed through the sigmoid once;
    - the semantic scores of the band are one matrix product written into the (K, H, W) output, the panoptic
      winners and counts and the instance masks, areas, boxes and probability sums are accumulated
      (:class:`_PanopticBands`, :class:`_InstanceBands`); instance ``pred_masks`` are bool, as Detectron2's
      Mask R-CNN outputs.
    """
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[-1] - 1
    mask_cls = mask_cls.to(mask_logits)
    probs = F.softmax(mask_cls, dim=-1)
    device, dtype = mask_logits.device, mask_logits.dtype
    height, width = out_size
    needed = [torch.zeros(0, dtype=torch.long, device=device)]
    if panoptic_on:
        scores, labels = probs.max(-1)
        kept = (labels.ne(num_classes) & (scores > object_mask_threshold)).nonzero()[:, 0]
        needed.append(kept)
    if instance_on:
        pair_scores, pair_labels, pair_queries = _instance_pairs(probs, topk, thing_ids)
        inst_queries, pair_rows = torch.unique(pair_queries, return_inverse=True)
        needed.append(inst_queries)
    # rows of the band tensor: every query for the semantic scores, otherwise only the queries used (all when
    # a resize has H + W <= 128: PyTorch's kernel for it then rounds per stack size, see _bilinear)
    small = min(sum(padded_size), sum(out_size)) <= 128
    if semantic_on or small:
        used = torch.arange(num_queries, device=device)
    else:
        used = torch.unique(torch.cat(needed))
    slot = torch.full((num_queries,), -1, dtype=torch.long, device=device)
    slot[used] = torch.arange(used.numel(), device=device)
    result = {}
    _release_free_heap(device)
    if semantic_on:
        sem_seg = mask_logits.new_empty((num_classes, height, width))
        class_probs = probs[:, :-1].t().contiguous()
    if panoptic_on:
        panoptic = _PanopticBands(scores[kept], labels[kept], (height, width), device)
        kept_rows = slot[kept]
    if instance_on:
        instances = _InstanceBands(pair_scores, pair_labels, pair_rows, inst_queries.numel(), (height, width),
                                   device, dtype)
        inst_rows = slot[inst_queries]
    if used.numel():
        bands, rows = _row_bands(mask_logits if semantic_on else mask_logits[used], padded_size, image_size,
                                 out_size, chunk, num_queries)
        band_rows = max(y1 - y0 for y0, y1 in bands)
        buffer = mask_logits.new_empty(_vector_multiple(used.numel() * band_rows * width))
        scratch = _Scratch(device)
        for y0, y1 in bands:
            band = buffer[:used.numel() * (y1 - y0) * width].view(used.numel(), y1 - y0, width)
            rows(y0, y1, band)
            whole = buffer[:_vector_multiple(band.numel())]
            if instance_on and inst_queries.numel():
                positive = torch.gt(_select(band, inst_rows, scratch, "instance"), 0,
                                    out=scratch("positive", (inst_rows.numel(), y1 - y0, width), torch.bool))
            # in place over the whole (contiguous) tensor: every element in PyTorch's vectorised loop
            torch.sigmoid(whole, out=whole)
            if semantic_on:  # into a contiguous product, then one copy: faster than into sem_seg's rows
                product = _matmul_into(class_probs, band.view(used.numel(), -1),
                                       scratch("product", (num_classes, (y1 - y0) * width), dtype))
                sem_seg[:, y0:y1] = product.view(num_classes, y1 - y0, width)
            if panoptic_on and kept.numel():
                panoptic.add(_select(band, kept_rows, scratch, "panoptic"), y0, y1, scratch)
            if instance_on and inst_queries.numel():
                instances.add(positive, _select(band, inst_rows, scratch, "instance"), y0, y1, scratch)
    if semantic_on:
        result["sem_seg"] = sem_seg if used.numel() else sem_seg.zero_()
    if panoptic_on:
        result["panoptic_seg"] = panoptic.finish(thing_ids, overlap_threshold)
    if instance_on:
        result["instances"] = instances.finish()
    return result
