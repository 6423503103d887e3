"""MaskFormer post-processing (App. E) on hand-built predictions."""
import torch

from hierseg_d2.modeling.meta_arch.postprocessing import instance_inference, panoptic_inference, semantic_inference

BIG = 20.0  # logits that saturate softmax / sigmoid


def _class_logits(classes, num_classes=4, score=BIG):
    logits = torch.zeros(len(classes), num_classes + 1)
    for q, c in enumerate(classes):
        logits[q, c] = score
    return logits


def _mask(region, shape=(8, 8)):
    m = torch.full(shape, -BIG)
    m[region] = BIG
    return m


def test_semantic_inference_matches_sum_over_queries():
    torch.manual_seed(0)
    cls, masks = torch.randn(3, 5), torch.randn(3, 4, 6)
    out = semantic_inference(cls, masks)
    ref = torch.zeros(4, 4, 6)
    for q in range(3):
        for c in range(4):
            ref[c] += cls[q].softmax(-1)[c] * masks[q].sigmoid()
    torch.testing.assert_close(out, ref)


def test_panoptic_inference_thresholds_and_stuff_merging():
    # classes 0, 1 things; 2, 3 stuff; class 4 = no object
    cls = torch.cat([
        _class_logits([0, 2, 2, 4]),
        _class_logits([1], score=0.5),  # low confidence: dropped by the object-mask threshold
        _class_logits([1]),  # its mask is mostly won by query 0: dropped by the overlap threshold
    ])
    masks = torch.stack([
        _mask((slice(0, 8), slice(0, 4))),  # thing, left half
        _mask((slice(0, 4), slice(4, 8))),  # stuff 2, top right
        _mask((slice(4, 8), slice(4, 8))),  # stuff 2, bottom right -> same segment as query 1
        _mask((slice(0, 8), slice(0, 8))),  # no object
        _mask((slice(0, 8), slice(0, 8))),
        _mask((slice(0, 8), slice(0, 5))),  # overlaps query 0 entirely, only column 4 left
    ])
    masks[5] = masks[5] - 1  # slightly less confident than query 0 where they overlap
    seg, info = panoptic_inference(cls, masks, {0, 1}, object_mask_threshold=0.8, overlap_threshold=0.8)
    assert seg.dtype == torch.int32 and seg.shape == (8, 8)
    assert info == [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": False, "category_id": 2}]
    assert torch.all(seg[:, :4] == 1) and torch.all(seg[:, 4:] == 2)


def test_panoptic_inference_with_nothing_kept():
    seg, info = panoptic_inference(_class_logits([4, 4]), torch.randn(2, 5, 5), {0}, 0.8, 0.8)
    assert info == [] and torch.all(seg == 0)


def test_instance_inference_scores_boxes_and_thing_filter():
    cls = _class_logits([0, 3, 1])
    masks = torch.stack([_mask((slice(1, 3), slice(2, 6))), _mask((slice(0, 8), slice(0, 8))),
                         _mask((slice(5, 8), slice(0, 2)))])
    masks[0, 1, 2] = 0.01  # still inside the binary mask, but its sigmoid (~0.5) lowers the mask score
    inst = instance_inference(cls, masks, topk=3, thing_ids={0, 1})
    assert set(inst.get_fields()) == {"pred_masks", "pred_boxes", "scores", "pred_classes"}
    assert inst.image_size == (8, 8)
    assert 3 not in inst.pred_classes.tolist()  # stuff class removed
    order = {int(c): i for i, c in enumerate(inst.pred_classes)}
    i0, i1 = order[0], order[1]
    # boxes are (x0, y0, x1, y1) of the binary masks
    torch.testing.assert_close(inst.pred_boxes.tensor[i0], torch.tensor([2.0, 1.0, 6.0, 3.0]))
    torch.testing.assert_close(inst.pred_boxes.tensor[i1], torch.tensor([0.0, 5.0, 2.0, 8.0]))
    torch.testing.assert_close(inst.scores[i0], (7 + torch.tensor(0.01).sigmoid()) / 8, atol=1e-4, rtol=0)
    torch.testing.assert_close(inst.scores[i1], torch.tensor(1.0), atol=1e-4, rtol=0)
    assert inst.pred_masks.shape == (len(inst), 8, 8) and inst.pred_masks[i0].sum() == 8


def test_panoptic_overlap_ratio_is_pixels_won_over_own_pixels():
    """Mask2Former's rule: a query passes when the pixels it wins (anywhere) are >= overlap_threshold of its
    own (probability >= 0.5) pixels, and then keeps the pixels that are both."""
    def logit(p):
        return torch.logit(torch.tensor(p)).item()
    masks = torch.empty(2, 8, 8)
    masks[0, :, :4], masks[0, :, 4:] = logit(0.6), logit(0.3)  # own: left half; wins row 7 of it and the right half
    masks[1] = logit(0.05)
    masks[1, :7, :4] = logit(0.9)  # wins rows 0-6 of the left half
    seg, info = panoptic_inference(_class_logits([0, 1]), masks, {0, 1}, object_mask_threshold=0.8,
                                   overlap_threshold=0.8)
    # query 0: won 36 / own 32 >= 0.8, although only 4 of its own pixels are kept
    assert info == [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": True, "category_id": 1}]
    expected = torch.zeros(8, 8, dtype=torch.int32)
    expected[7, :4], expected[:7, :4] = 1, 2
    assert torch.equal(seg, expected)
