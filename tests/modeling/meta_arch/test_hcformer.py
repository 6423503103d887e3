"""HCFormer meta-architecture: losses and gradients, Detectron2 output formats, hierarchy outputs,
odd input sizes, a short overfit, and the R50 parameter counts of the paper."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from hierseg_d2 import add_hierseg_config
from tests.modeling.fake_backbones import tiny_cfg


def _item(height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, height, width, dtype=torch.bool)
    masks[0, : height // 2, : width // 2] = True  # thing class 0
    masks[1, height // 2:, :] = True  # stuff class 2
    masks[2, : height // 2, width // 2:] = True  # thing class 1
    inst = Instances((height, width))
    inst.gt_masks, inst.gt_classes = masks, torch.tensor([0, 2, 1])
    image = torch.rand(3, height, width, generator=g) * 40 + masks.float().argmax(0) * 80
    return {"image": image, "instances": inst}


@pytest.mark.parametrize("backbone", ["build_tiny_pairs_backbone", "build_tiny_plain_backbone"])
def test_training_losses_and_gradients(backbone):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(backbone))
    losses = model([_item(64, 96), _item(61, 75, seed=1)])
    expected = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")} | {"loss_scale"}
    assert set(losses) == expected
    # loss_scale = SCALE_WEIGHT * |sum_i s^(i)| (release) with s initialised to 0.1 at three levels
    torch.testing.assert_close(losses["loss_scale"], torch.tensor(0.1 * 3 * 0.1))
    sum(losses.values()).backward()
    for level in ("2", "3", "4"):
        scale = model.sem_seg_head.clustering[level].scale
        assert scale.grad is not None and scale.grad.abs() > 0
    stem = model.backbone.stem[0][0].weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0


def test_no_deep_supervision_drops_aux_losses():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = False
    losses = build_model(cfg)([_item(64, 64)])
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_scale"}


def test_training_without_instances_is_a_clear_error():
    with pytest.raises(KeyError, match="instances"):
        build_model(tiny_cfg())([{"image": torch.rand(3, 64, 64)}])


def test_inference_formats_for_all_tasks():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.0  # untrained masks overlap a lot: keep winners
    cfg.TEST.DETECTIONS_PER_IMAGE = 7
    model = build_model(cfg).eval()
    with torch.no_grad():  # untrained class scores are low: make every query confidently "class 0"
        model.sem_seg_head.predictor.class_embed.weight.zero_()
        model.sem_seg_head.predictor.class_embed.bias.copy_(torch.tensor([6.0, 2.0, 0.0, 0.0, -10.0]))
    inputs = [{"image": torch.rand(3, 61, 75) * 255, "height": 122, "width": 150},
              {"image": torch.rand(3, 64, 64) * 255}]
    with torch.no_grad():
        outputs = model(inputs)
    assert len(outputs) == 2
    for out, (h, w) in zip(outputs, [(122, 150), (64, 64)]):
        assert set(out) == {"sem_seg", "panoptic_seg", "instances"}
        assert out["sem_seg"].shape == (4, h, w) and out["sem_seg"].dtype == torch.float32
        seg, info = out["panoptic_seg"]
        assert seg.shape == (h, w) and seg.dtype == torch.int32 and len(info) > 0
        assert {int(i) for i in seg.unique()} - {0} == {s["id"] for s in info}
        for s in info:
            assert set(s) == {"id", "category_id", "isthing"} and isinstance(s["isthing"], bool)
            assert s["isthing"] == (s["category_id"] in (0, 1))
        inst = out["instances"]
        assert isinstance(inst, Instances) and inst.image_size == (h, w)
        assert set(inst.get_fields()) == {"pred_masks", "scores", "pred_classes", "pred_boxes"}
        assert 0 < len(inst) <= 7 and inst.pred_masks.shape == (len(inst), h, w)
        assert isinstance(inst.pred_boxes, Boxes) and set(inst.pred_classes.tolist()) <= {0, 1}  # things only
        assert torch.all(inst.scores[:-1] >= 0) and inst.pred_classes.dtype == torch.int64


def test_hierarchy_outputs_and_odd_unpadded_input():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 0  # no padding: 61 x 75 stays odd at every stride
    cfg.MODEL.HCFORMER.CLUSTERING_EVAL = True
    model = build_model(cfg).eval()
    assert model.return_assignments
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 61, 75) * 255}])[0]
    hierarchy = out["hierarchy"]
    assert hierarchy["image_size"] == (61, 75) and hierarchy["padded_size"] == (61, 75)
    assert [tuple(a.shape) for a in hierarchy["assignments"]] == [(9, 16, 19), (9, 8, 10), (9, 4, 5)]
    for a in hierarchy["assignments"]:
        torch.testing.assert_close(a.sum(0), torch.ones(a.shape[1:]))
    assert out["sem_seg"].shape == (4, 61, 75)
    model.return_assignments = False
    with torch.no_grad():
        assert "hierarchy" not in model([{"image": torch.rand(3, 64, 64) * 255}])[0]


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = [_item(64, 64)]
    history = []
    for _ in range(40):
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss))
    assert min(history[-3:]) < 0.6 * history[0], history


def _r50_cfg(enc_layers):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "HCFormer"
    cfg.MODEL.BACKBONE.NAME = "build_hcformer_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.NAME = "HCFormerHead"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 133  # COCO panoptic
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = enc_layers
    return cfg  # 100 queries, 8 decoder layers, LEVELS 3 and DCNv2 are the defaults


@pytest.mark.parametrize("enc_layers,paper_millions", [(0, 38), (6, 46)])
def test_r50_coco_panoptic_parameter_count(enc_layers, paper_millions):
    cfg = _r50_cfg(enc_layers)
    assert (cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, cfg.MODEL.MASK_FORMER.DEC_LAYERS, cfg.MODEL.HCFORMER.LEVELS,
            cfg.MODEL.HCFORMER.DCN_DOWNSAMPLING) == (100, 8, 3, True)
    model = build_model(cfg)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"HCFormer{'+' if enc_layers else ''} R50 COCO panoptic: {millions:.2f}M params (paper {paper_millions}M)")
    assert abs(millions - paper_millions) / paper_millions < 0.03
