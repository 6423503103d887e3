"""Tiny conv backbones for HCFormer tests (not test modules): one with ``clustering_pairs()`` and
"after" maps ds3..ds5, one plain res2..res5 backbone that exercises the documented fallback."""
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from hierseg_d2 import add_hierseg_config

CHANNELS = {"res2": 8, "ds3": 12, "res3": 16, "ds4": 12, "res4": 16, "ds5": 20, "res5": 24}
STRIDES = {"res2": 4, "ds3": 8, "res3": 8, "ds4": 16, "res4": 16, "ds5": 32, "res5": 32}
TEST_DATASET = "hcformer_unittest_dataset"  # metadata only: classes 0, 1 are things, 2, 3 stuff


def _conv(cin, cout, stride):
    # padding 1 with stride 2 gives ceil(n / 2), the project's size convention
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())


class _TinyBackbone(Backbone):
    """res2..res5 plus the maps right after each stride-2 conv (ds3..ds5)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 8, 2), _conv(8, CHANNELS["res2"], 2))
        self.down = nn.ModuleDict({f"ds{k}": _conv(CHANNELS[f"res{k - 1}"], CHANNELS[f"ds{k}"], 2)
                                   for k in (3, 4, 5)})
        self.stage = nn.ModuleDict({f"res{k}": _conv(CHANNELS[f"ds{k}"], CHANNELS[f"res{k}"], 1)
                                    for k in (3, 4, 5)})

    def forward(self, x):
        out = {"res2": self.stem(x)}
        for k in (3, 4, 5):
            out[f"ds{k}"] = self.down[f"ds{k}"](out[f"res{k - 1}"])
            out[f"res{k}"] = self.stage[f"res{k}"](out[f"ds{k}"])
        return out

    def output_shape(self):
        return {n: ShapeSpec(channels=CHANNELS[n], stride=STRIDES[n]) for n in CHANNELS}


class TinyPairsBackbone(_TinyBackbone):
    """Implements the clustering_pairs() contract with the ds maps."""

    def clustering_pairs(self):
        return {2: ("res2", "ds3"), 3: ("res3", "ds4"), 4: ("res4", "ds5")}


class TinyPlainBackbone(_TinyBackbone):
    """Only res2..res5 and no clustering_pairs(): HCFormer pairs consecutive stages."""

    def forward(self, x):
        return {k: v for k, v in super().forward(x).items() if k.startswith("res")}

    def output_shape(self):
        return {n: s for n, s in super().output_shape().items() if n.startswith("res")}


@BACKBONE_REGISTRY.register()
def build_tiny_pairs_backbone(cfg, input_shape):
    return TinyPairsBackbone()


@BACKBONE_REGISTRY.register()
def build_tiny_plain_backbone(cfg, input_shape):
    return TinyPlainBackbone()


def register_test_metadata():
    meta = MetadataCatalog.get(TEST_DATASET)
    if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        meta.set(thing_dataset_id_to_contiguous_id={1: 0, 2: 1},
                 stuff_dataset_id_to_contiguous_id={1: 0, 2: 1, 3: 2, 4: 3},
                 thing_classes=["a", "b"], stuff_classes=["a", "b", "c", "d"])


def tiny_cfg(backbone="build_tiny_pairs_backbone", levels=3):
    """A CPU-sized HCFormer config: hidden 32, 2 decoder layers, 10 queries, 4 classes."""
    register_test_metadata()
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "HCFormer"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.SEM_SEG_HEAD.NAME = "HCFormerHead"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 32
    mf = cfg.MODEL.MASK_FORMER
    mf.HIDDEN_DIM, mf.NHEADS, mf.DIM_FEEDFORWARD, mf.DEC_LAYERS, mf.NUM_OBJECT_QUERIES = 32, 2, 64, 2, 10
    mf.TRAIN_NUM_POINTS = 256
    cfg.MODEL.HCFORMER.LEVELS = levels
    cfg.MODEL.HCFORMER.CLUSTER_DIM = 16
    cfg.DATASETS.TRAIN = (TEST_DATASET,)
    return cfg
