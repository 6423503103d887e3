"""postprocess_image (the inference path of HCFormer) against the naive algorithm it replaces: every mask
resized to the output size (upsample to the padded size, Detectron2's sem_seg_postprocess), then semantic,
panoptic and instance inference on the full (Q, H, W) stack.

One torch thread: PyTorch's kernels then take one path per call (with more, a parallel split can leave a
few elements of the naive stack to a scalar sigmoid that rounds differently), so the semantic scores are
compared bit for bit."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from hierseg_d2 import add_hierseg_config
from hierseg_d2.modeling.meta_arch import postprocessing
from hierseg_d2.modeling.meta_arch.bilinear import upsample_rows
from hierseg_d2.modeling.meta_arch.postprocessing import _row_bands, postprocess_image
from tests.modeling.fake_backbones import TEST_DATASET, tiny_cfg


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-for-bit comparisons (conftest.py)


def naive_outputs(mask_cls, mask_logits, padded_size, image_size, out_size, thing_ids, object_mask_threshold,
                  overlap_threshold, topk):
    """The pre-issue-18 algorithm, written out: all masks at full resolution, three sigmoids, one mask per
    (query, class) pair."""
    mask_pred = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)[0]
    mask_pred = sem_seg_postprocess(mask_pred, image_size, *out_size)
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[-1] - 1
    sem = torch.einsum("qc,qhw->chw", F.softmax(mask_cls, -1)[..., :-1], mask_pred.sigmoid())
    scores, labels = F.softmax(mask_cls, -1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep].sigmoid()
    seg = torch.zeros(out_size, dtype=torch.int32)
    info, stuff = [], {}
    if cur_masks.shape[0]:
        winner = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
        for k in range(cur_classes.shape[0]):
            c = int(cur_classes[k])
            isthing = thing_ids is None or c in thing_ids
            own = cur_masks[k] >= 0.5
            mask = (winner == k) & own
            area, orig = int((winner == k).sum()), int(own.sum())
            if area == 0 or orig == 0 or int(mask.sum()) == 0 or area / orig < overlap_threshold:
                continue
            if not isthing and c in stuff:
                seg[mask] = stuff[c]
                continue
            sid = len(info) + 1
            if not isthing:
                stuff[c] = sid
            seg[mask] = sid
            info.append({"id": sid, "isthing": bool(isthing), "category_id": c})
    probs = F.softmax(mask_cls, -1)[:, :-1]
    labels = torch.arange(num_classes).repeat(num_queries)
    s, idx = probs.flatten().topk(min(topk, probs.numel()), sorted=False)
    lab, m = labels[idx], mask_pred[idx // num_classes]
    if thing_ids is not None:
        k = torch.tensor([int(c) in thing_ids for c in lab], dtype=torch.bool)
        s, lab, m = s[k], lab[k], m[k]
    masks = (m > 0).float()
    mask_scores = (m.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    boxes = []
    for b in m > 0:  # naive boxes: first/last rows and columns with a pixel
        ys, xs = torch.where(b)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(ys) else [0, 0, 0, 0])
    return sem, (seg, info), (masks, torch.tensor(boxes, dtype=torch.float32).view(-1, 4), s * mask_scores, lab)


def assert_equal_outputs(new, ref):
    sem, (seg, info), (masks, boxes, scores, classes) = ref
    assert torch.equal(new["sem_seg"], sem)  # bit for bit: same argmax per pixel
    assert torch.equal(new["panoptic_seg"][0], seg) and new["panoptic_seg"][1] == info
    inst = new["instances"]
    assert inst.pred_masks.dtype == torch.bool and torch.equal(inst.pred_masks, masks > 0)
    assert torch.equal(inst.pred_classes, classes)
    torch.testing.assert_close(inst.scores, scores, rtol=1e-6, atol=1e-7)  # sums over pixels: float rounding
    torch.testing.assert_close(inst.pred_boxes.tensor, boxes, rtol=0, atol=0)


def _random_case(q, k, mask_size, seed=0, confident=10):
    g = torch.Generator().manual_seed(seed)
    mask_cls = torch.randn(q, k + 1, generator=g)
    rows = torch.randperm(q, generator=g)[:confident]
    mask_cls[rows, torch.arange(len(rows)) % (k + 1)] += 8.0  # confident queries of every class and "no object"
    # blobs a few pixels wide, so that queries keep their masks against the overlap threshold
    blobs = torch.randn(1, q, (mask_size[0] + 3) // 4, (mask_size[1] + 3) // 4, generator=g) * 4
    blobs = F.interpolate(blobs, scale_factor=4, mode="bilinear", align_corners=False)[0]
    return mask_cls, blobs[:, :mask_size[0], :mask_size[1]] + torch.randn(q, *mask_size, generator=g)


@pytest.mark.parametrize("sizes", [((32, 48), (30, 45), (30, 45)),  # no resize after the crop
                                   ((32, 48), (30, 45), (61, 89)),  # crop and resize
                                   ((32, 32), (32, 32), (20, 20)),  # downscaled output
                                   ((64, 96), (64, 96), (64, 96)),  # whole rows: bands without a copy
                                   ((160, 64), (150, 64), (150, 64))])  # H + W > 128 for the whole only
@pytest.mark.parametrize("thing_ids", [None, {0, 1}])
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_equal_to_naive_on_confident_random_queries(sizes, thing_ids, chunk):
    padded, image, out = sizes
    mask_cls, mask_logits = _random_case(25, 5, (padded[0] // 4, padded[1] // 4))
    kwargs = dict(thing_ids=thing_ids, object_mask_threshold=0.8, overlap_threshold=0.3, topk=12)
    new = postprocess_image(mask_cls, mask_logits, padded, image, out, semantic_on=True, panoptic_on=True,
                            instance_on=True, chunk=chunk, **kwargs)
    ref = naive_outputs(mask_cls, mask_logits, padded, image, out, **kwargs)
    assert len(ref[1][1]) > 0 and len(ref[2][3]) > 0  # the case is not trivial
    assert_equal_outputs(new, ref)
    # one output alone equals its part of the three (only the queries it uses are resized)
    only = postprocess_image(mask_cls, mask_logits, padded, image, out, semantic_on=False, panoptic_on=True,
                             instance_on=False, chunk=chunk, **kwargs)
    assert set(only) == {"panoptic_seg"} and torch.equal(only["panoptic_seg"][0], ref[1][0])
    assert only["panoptic_seg"][1] == ref[1][1]
    only = postprocess_image(mask_cls, mask_logits, padded, image, out, semantic_on=False, panoptic_on=False,
                             instance_on=True, chunk=chunk, **kwargs)["instances"]
    assert torch.equal(only.pred_masks, new["instances"].pred_masks)
    assert torch.equal(only.scores, new["instances"].scores)


def test_equal_to_naive_with_ties_and_three_queries():
    """Duplicated queries tie everywhere (the first one wins, as argmax); 3 used queries of a larger stack
    (PyTorch resizes 3 maps with another kernel on one thread) and a stack of 3. Q x H x W is a multiple of
    32: the naive stack's sigmoid then has no scalar tail (which rounds differently)."""
    mask_cls, mask_logits = _random_case(6, 3, (12, 20), seed=1, confident=6)
    mask_cls[3:], mask_logits[3:] = mask_cls[:3], mask_logits[:3]
    kwargs = dict(thing_ids={0}, object_mask_threshold=0.5, overlap_threshold=0.0, topk=4)
    for q in (6, 3):
        ref = naive_outputs(mask_cls[:q], mask_logits[:q], (48, 80), (48, 80), (48, 80), **kwargs)
        new = postprocess_image(mask_cls[:q], mask_logits[:q], (48, 80), (48, 80), (48, 80), semantic_on=True,
                                panoptic_on=True, instance_on=True, chunk=4, **kwargs)
        assert len(ref[1][1]) > 0
        assert_equal_outputs(new, ref)
        only = postprocess_image(mask_cls[:q], mask_logits[:q], (48, 80), (48, 80), (48, 80), semantic_on=False,
                                 panoptic_on=True, instance_on=False, chunk=4, **kwargs)
        assert torch.equal(only["panoptic_seg"][0], ref[1][0])


@pytest.mark.parametrize("sizes", [((64, 96), (64, 96), (64, 96)), ((160, 64), (150, 61), (150, 61))])
@pytest.mark.parametrize("fast", [True, False])
def test_separable_upsampling_and_its_fallback(monkeypatch, sizes, fast):
    """Where H + W > 128 the bands come from the separable upsampling (bilinear.upsample_rows); on a CPU whose
    PyTorch rounds it differently (the probe says no) from F.interpolate slices. Both equal the naive outputs."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2:4])
        return upsample_rows(*args, **kwargs)

    monkeypatch.setattr(postprocessing, "upsample_rows", counted)
    if not fast:
        monkeypatch.setattr(postprocessing, "exact_upsampling_available", lambda *args: False)
    padded, image, out = sizes
    mask_cls, mask_logits = _random_case(25, 5, (padded[0] // 4, padded[1] // 4), seed=2)
    kwargs = dict(thing_ids={0, 1}, object_mask_threshold=0.8, overlap_threshold=0.3, topk=12)
    new = postprocess_image(mask_cls, mask_logits, padded, image, out, semantic_on=True, panoptic_on=True,
                            instance_on=True, chunk=16, **kwargs)
    ref = naive_outputs(mask_cls, mask_logits, padded, image, out, **kwargs)
    assert len(ref[1][1]) > 0 and len(ref[2][3]) > 0
    assert_equal_outputs(new, ref)
    assert len(calls) == (-(-image[0] // 16) if fast else 0)


@pytest.mark.parametrize("channels,part,mask_size,ratio", [
    (25, 25, (12, 20), 4), (4, 4, (12, 20), 4), (3, 3, (12, 20), 4), (1, 1, (7, 9), 2),  # H + W <= 128: one band
    (25, 25, (50, 76), 4), (25, 3, (50, 76), 4), (3, 3, (50, 76), 4), (3, 1, (50, 76), 4), (1, 1, (50, 76), 4),
    (25, 3, (40, 9), 4),  # bands widened to H + W > 128
    (25, 25, (5, 30), 8), (4, 4, (33, 70), 2), (4, 4, (60, 90), 1)])
def test_row_bands_equal_the_whole_upsampling(channels, part, mask_size, ratio):
    """Bands of rows (with their margins) against F.interpolate of the whole stack, bit for bit."""
    logits = torch.randn(channels, *mask_size, generator=torch.Generator().manual_seed(0)) * 4
    padded = (mask_size[0] * ratio, mask_size[1] * ratio)
    image = (padded[0] - 3, padded[1] - 5)
    whole = F.interpolate(logits[None], size=padded, mode="bilinear", align_corners=False)[0]
    for chunk in (1, 3, 8, 1000):
        bands, rows = _row_bands(logits[:part], padded, image, image, chunk, channels)
        assert bands[0][0] == 0 and bands[-1][1] == image[0]
        got = torch.full((part,) + image, float("nan"))
        for y0, y1 in bands:
            rows(y0, y1, got[:, y0:y1])
        assert torch.equal(got, whole[:part, :image[0], :image[1]])


def _model_case(model, inputs):
    """The model's inference outputs and the naive ones, from the same decoded predictions."""
    images = [(x["image"] - model.pixel_mean) / model.pixel_std for x in inputs]
    images = ImageList.from_tensors(images, model.size_divisibility)
    with torch.no_grad():
        outputs = model.decode_outputs(model.sem_seg_head(model.backbone(images.tensor)))
        new = model.inference(outputs, inputs, images)
    refs = []
    for b, x in enumerate(inputs):
        size = tuple(images.image_sizes[b])
        refs.append(naive_outputs(outputs["pred_logits"][b], outputs["pred_masks"][b], tuple(images.tensor.shape[-2:]),
                                  size, (x.get("height", size[0]), x.get("width", size[1])), model._thing_ids(),
                                  model.object_mask_threshold, model.overlap_threshold, model.test_topk_per_image))
    return new, refs


def _confident(model, bias):
    with torch.no_grad():  # untrained class scores are low: make queries confident
        model.sem_seg_head.predictor.class_embed.weight.mul_(4)
        model.sem_seg_head.predictor.class_embed.bias.copy_(torch.tensor(bias))


def test_tiny_model_inference_equals_naive():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    mf = cfg.MODEL.MASK_FORMER
    mf.TEST.PANOPTIC_ON = mf.TEST.INSTANCE_ON = True
    mf.TEST.OVERLAP_THRESHOLD = 0.0
    model = build_model(cfg).eval()
    _confident(model, [6.0, 2.0, 5.0, 0.0, -10.0])
    inputs = [{"image": torch.rand(3, 61, 75) * 255, "height": 122, "width": 150},
              {"image": torch.rand(3, 64, 64) * 255}]
    new, refs = _model_case(model, inputs)
    for n, r in zip(new, refs):
        assert_equal_outputs(n, r)


def test_shapes_model_inference_equals_naive():
    torch.manual_seed(0)
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file("configs/shapes/hcformer_R18_s16_shapes.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = (TEST_DATASET,)  # 4 classes, things 0 and 1
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.0
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    model = build_model(cfg).eval()
    _confident(model, [6.0, 2.0, 5.0, 0.0, -10.0])
    new, refs = _model_case(model, [{"image": torch.rand(3, 96, 80) * 255, "height": 150, "width": 125}])
    assert len(refs[0][1][1]) > 0
    assert_equal_outputs(new[0], refs[0])
