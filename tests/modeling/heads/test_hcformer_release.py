"""Golden fixture of the HCFormer release's head (tools/golden_fixtures/hcformer_head.py): the release's weights,
converted with our converter and loaded strictly, give its assignments, decoded masks, class logits of every
prediction, post-processed outputs and loss terms (max abs diff < 1e-4), square and non-square."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.postprocessing import sem_seg_postprocess

from hierseg_d2 import add_hierseg_config
from hierseg_d2.modeling.criterion import SetCriterion
from hierseg_d2.modeling.heads import HCFormerHead
from hierseg_d2.modeling.heads.release_convert import convert_head_state_dict
from hierseg_d2.modeling.matcher import HungarianMatcher
from hierseg_d2.modeling.meta_arch.hcformer import HCFormer
from hierseg_d2.modeling.meta_arch.postprocessing import instance_inference, panoptic_inference, semantic_inference
from tests.golden import load_fixture, max_abs_diff

TOL = 1e-4
PAIRS = {2: ("res2", "ds3"), 3: ("res3", "ds4"), 4: ("res4", "ds5")}
FIXTURE = load_fixture("hcformer_head")


def _cfg(variant):
    c = FIXTURE["config"]
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = c["num_classes"]
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = c["hidden_dim"]
    mf = cfg.MODEL.MASK_FORMER
    mf.HIDDEN_DIM, mf.NHEADS, mf.DIM_FEEDFORWARD = c["hidden_dim"], c["nheads"], c["dim_feedforward"]
    mf.DEC_LAYERS, mf.NUM_OBJECT_QUERIES = c["dec_layers"], c["num_queries"]
    mf.ENC_LAYERS = c["enc_layers"] if variant == "plus" else 0
    cfg.MODEL.HCFORMER.CLUSTER_DIM = c["emb_dim"]
    return cfg


def _input_shape():
    ch = FIXTURE["channels"]
    shape = {f"res{k}": ShapeSpec(channels=ch[f"res{k}"], stride=2 ** k) for k in (2, 3, 4, 5)}
    # the release's after maps: output of the first block of the next stage
    shape.update({f"ds{k}": ShapeSpec(channels=ch[f"res{k}"], stride=2 ** k) for k in (3, 4, 5)})
    return shape


def _build(variant):
    cfg = _cfg(variant)
    head = HCFormerHead(cfg, _input_shape(), clustering_pairs=PAIRS)
    c = FIXTURE["config"]
    criterion = SetCriterion(c["num_classes"], HungarianMatcher(c["class_weight"], c["mask_weight"], c["dice_weight"],
                                                                num_points=c["num_points"]),
                             weight_dict={}, eos_coef=c["eos_coef"], losses=["labels", "masks", "scale"],
                             num_points=c["num_points"], oversample_ratio=c["oversample_ratio"],
                             importance_sample_ratio=c["importance_sample_ratio"],
                             scale_loss=cfg.MODEL.HCFORMER.SCALE_LOSS)
    converted, backbone_rest = convert_head_state_dict(FIXTURE["heads"][variant]["state_dict"])
    assert backbone_rest == {}, f"unconverted: {sorted(backbone_rest)}"
    head.load_state_dict({k[len("sem_seg_head."):]: v for k, v in converted.items()
                          if k.startswith("sem_seg_head.")}, strict=True)
    criterion.load_state_dict({k[len("criterion."):]: v for k, v in converted.items()
                               if k.startswith("criterion.")}, strict=True)
    assert set(converted) == {"sem_seg_head." + k for k in head.state_dict()} | {"criterion.empty_weight"}
    return head.eval(), criterion


@pytest.fixture(scope="module", params=["plain", "plus"])
def variant(request):
    head, criterion = _build(request.param)
    return request.param, head, criterion


@pytest.mark.parametrize("size", ["square", "nonsquare"])
def test_release_head_outputs_and_losses(variant, size):
    name, head, criterion = variant
    ref = FIXTURE["heads"][name]["runs"][size]
    c = FIXTURE["config"]
    with torch.no_grad():
        outputs = HCFormer.decode_outputs(head(ref["features"]))
    # assignments: ours finest first, the release's coarsest first
    assert len(outputs["assignments"]) == len(ref["assignments"]) == 3
    for ours, theirs in zip(outputs["assignments"], reversed(ref["assignments"])):
        assert max_abs_diff(ours, theirs) < TOL
    assert max_abs_diff(outputs["pred_logits"], ref["pred_logits"]) < TOL
    assert max_abs_diff(outputs["pred_masks"], ref["pred_masks"]) < TOL
    assert len(outputs["aux_outputs"]) == len(ref["aux_outputs"]) == c["dec_layers"]
    for ours, theirs in zip(outputs["aux_outputs"], ref["aux_outputs"]):
        assert max_abs_diff(ours["pred_logits"], theirs["pred_logits"]) < TOL
        assert max_abs_diff(ours["pred_masks"], theirs["pred_masks"]) < TOL

    # post-processing of image 0, as the meta-arch at inference (resized before inference)
    padded = tuple(ref["features"]["res2"].shape[-2:])
    padded = (padded[0] * 4, padded[1] * 4)
    mask_pred = F.interpolate(outputs["pred_masks"], size=padded, mode="bilinear", align_corners=False)[0]
    mask_pred = sem_seg_postprocess(mask_pred, tuple(ref["image_size"]), *ref["output_size"])
    mask_cls = outputs["pred_logits"][0]
    thing_ids = set(c["thing_ids"])
    assert max_abs_diff(semantic_inference(mask_cls, mask_pred), ref["sem_seg"]) < TOL
    panoptic_seg, segments_info = panoptic_inference(mask_cls, mask_pred, thing_ids, c["object_mask_threshold"],
                                                     c["overlap_threshold"])
    assert segments_info == ref["segments_info"] and len(segments_info) > 0
    assert torch.equal(panoptic_seg, ref["panoptic_seg"])
    inst = instance_inference(mask_cls, mask_pred, c["topk"], thing_ids)
    assert max_abs_diff(inst.scores, ref["instances"]["scores"]) < TOL
    assert torch.equal(inst.pred_masks.bool(), ref["instances"]["pred_masks"])
    assert torch.equal(inst.pred_classes, ref["instances"]["pred_classes"])

    # every loss term with the release's random point draws (same seed, same order of draws)
    outputs = HCFormer.decode_outputs(head(ref["features"]))
    torch.manual_seed(c["loss_seed"])
    losses = criterion(outputs, ref["targets"])
    theirs = {("loss_scale" if k == "loss_l1" else k): v for k, v in ref["losses"].items()}
    assert set(losses) == set(theirs)
    for k, v in theirs.items():
        assert max_abs_diff(losses[k], v.reshape(losses[k].shape)) < TOL, k
