"""Inference-time FrozenBN folding and channels_last backbone: outputs equal to float rounding."""
import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from hierseg_d2 import add_hierseg_config
from hierseg_d2.utils.inference_opt import channels_last_backbone, fold_frozen_bn
from tests.modeling.fake_backbones import TEST_DATASET


def _model(config, depth):
    torch.manual_seed(0)
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = (TEST_DATASET,)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 2
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # statistics far from the identity, as in a trained network
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("config,depth", [("configs/shapes/hcformer_R18_s16_shapes.yaml", 18),
                                          ("configs/coco/panoptic-segmentation/hcformer_R50_bs16_50ep.yaml", 50)])
def test_fold_frozen_bn_and_channels_last_equal(config, depth):
    model = _model(config, depth)
    n_norms = sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    x = torch.rand(1, 3, 64, 96) * 255
    inputs = [{"image": x[0], "height": 64, "width": 96}]
    with torch.no_grad():
        ref_feats = model.backbone((x - model.pixel_mean) / model.pixel_std)
        ref = model(inputs)[0]["sem_seg"]
        folded = copy.deepcopy(model)
        assert fold_frozen_bn(folded) == n_norms > 0
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
        feats = folded.backbone((x - model.pixel_mean) / model.pixel_std)
        for k in ref_feats:
            scale = ref_feats[k].abs().max()
            assert (feats[k] - ref_feats[k]).abs().max() <= 1e-5 * scale, k
        torch.testing.assert_close(folded(inputs)[0]["sem_seg"], ref, atol=1e-5, rtol=1e-4)
        fast = channels_last_backbone(folded)
        out = fast(inputs)[0]["sem_seg"]
        assert out.is_contiguous()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
