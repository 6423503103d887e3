"""Fixed random HCFormers for the export tests: every tensor matters (DCN offset predictors, which start at
zero, get random weights) and the post-processing has segments to produce (no query predicts "no object",
thresholds 0)."""
import torch
from detectron2.modeling import build_model

from hierseg_d2.config import load_config
from tests.scripts import REPO

R18_CONFIG = str(REPO / "configs/shapes/hcformer_R18_s16_shapes.yaml")  # the demo's model: DCNv2, 2 levels
HILA_CONFIG = str(REPO / "configs/shapes/hila/hcformer_hila_mit_b0_s3_shapes.yaml")
# MiT-B0 (SegFormer) under HCFormer: the HILA shapes config without HILA's inter-level attention
MIT_B0_OPTS = ["MODEL.BACKBONE.NAME", "build_mit_backbone", "MODEL.MIT.PRESET", "b0"]
# for the tool tests: one decoder layer, a smaller graph to export (the network itself is tested in tests/export)
ONE_LAYER = ["MODEL.MASK_FORMER.DEC_LAYERS", "1"]
# every query kept, so that the panoptic / instance outputs are not empty on a random model
LOW_THRESHOLDS = ["MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0",
                  "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.0"]


def fixed_random_model(config_file: str, opts=(), seed: int = 0):
    cfg = load_config(config_file, list(opts) + LOW_THRESHOLDS)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_offset." in name:  # DCN offset / modulation predictors: zero at init
                p.normal_(0.0, 0.05)
        predictor = model.sem_seg_head.predictor
        predictor.class_embed.bias[-1] = -10.0  # no query predicts "no object"
        last = list(predictor.mask_embed.modules())[-1]
        last.weight.normal_(0.0, 1.0)  # queries with different masks, of both signs (foreground to segment)
    return cfg, model


def detectron2_inputs(sizes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, h, w), generator=g).float(), "height": h, "width": w}
            for h, w in sizes]
