"""Config keys of hierseg_d2, added on top of Detectron2's defaults by :func:`add_hierseg_config`.

``MODEL.MASK_FORMER.*``, ``INPUT.*`` and ``SOLVER.*`` keep Mask2Former's names so that its users find
them where they expect; ``MODEL.HCFORMER.*`` holds the clustering; each backbone family has its own node
(``MODEL.SWIN``, ``MODEL.HILA``, ``MODEL.HAFA``, ``MODEL.HATNET``, ``MODEL.HRVIT``), added by the family's
module.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_hierseg_config", "load_config"]


def add_hierseg_config(cfg: CN) -> None:
    """Add every hierseg_d2 key to ``cfg`` (in place)."""
    # ---------------- data ----------------
    # Python files / modules imported before the datasets are used (they register your datasets, see
    # docs/custom_datasets.md); the command-line option --register adds to them.
    cfg.DATASETS.REGISTER = []
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # large-scale jitter (COCO instance/panoptic recipe)
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    # ---------------- solver ----------------
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0

    # ---------------- Mask2Former-shared head keys ----------------
    cfg.MODEL.MASK_FORMER = CN()
    mf = cfg.MODEL.MASK_FORMER
    mf.TRANSFORMER_DECODER_NAME = "MaskedTransformerDecoder"
    mf.TRANSFORMER_IN_FEATURE = "res5"  # the coarsest map: decoder memory and mask features (eq. 4)
    mf.DEEP_SUPERVISION = True
    mf.NO_OBJECT_WEIGHT = 0.1
    mf.CLASS_WEIGHT = 2.0
    mf.DICE_WEIGHT = 5.0
    mf.MASK_WEIGHT = 5.0
    mf.NHEADS = 8
    mf.DROPOUT = 0.0
    mf.DIM_FEEDFORWARD = 2048
    mf.ENC_LAYERS = 0  # HCFormer+ uses 6
    mf.DEC_LAYERS = 8  # transformer layers; the release's DEC_LAYERS counts the predictions (9 = 8 layers)
    mf.PRE_NORM = False
    mf.HIDDEN_DIM = 256
    mf.NUM_OBJECT_QUERIES = 100
    mf.ENFORCE_INPUT_PROJ = False
    mf.SIZE_DIVISIBILITY = 32
    mf.TRAIN_NUM_POINTS = 112 * 112
    mf.OVERSAMPLE_RATIO = 3.0
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75
    mf.TEST = CN()
    mf.TEST.SEMANTIC_ON = True
    mf.TEST.INSTANCE_ON = False
    mf.TEST.PANOPTIC_ON = False
    mf.TEST.OBJECT_MASK_THRESHOLD = 0.8
    mf.TEST.OVERLAP_THRESHOLD = 0.8
    mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256

    # ---------------- HCFormer clustering ----------------
    cfg.MODEL.HCFORMER = CN()
    hc = cfg.MODEL.HCFORMER
    hc.LEVELS = 3  # 0-3 hierarchy levels decoded: A(4); A(3), A(4); A(2), A(3), A(4)
    hc.CLUSTER_DIM = 128  # C_F
    hc.SCALE_INIT = 0.1  # s^(i) (the release's MODEL.HC.TEMPERATURE); temperature 1e-8 + |s|
    # loss_scale: "release" = |sum_i s^(i)| (the release's loss_l1), "paper" = sum_i |s^(i)| (Sec. 4.1)
    hc.SCALE_LOSS = "release"
    hc.SCALE_WEIGHT = 0.1  # weight of loss_scale (the release's MODEL.HC.L1_WEIGHT)
    hc.ENC_DROPOUT = 0.1  # HCFormer+ encoder dropout (the release's TransformerEnc default)
    hc.DCN_DOWNSAMPLING = True  # DCNv2 at the ResNet downsampling layers that carry clustering
    hc.CLUSTERING_EVAL = False  # add the clustering-quality evaluator (per-level UE / ASA)

    # ---------------- backbone families ----------------
    from .modeling.backbone import add_backbone_config

    add_backbone_config(cfg)

    # ---------------- safety: checkpoint loading, divergence guard (hierseg_d2/checkpoint.py) ----------------
    from .checkpoint import add_reliability_config

    add_reliability_config(cfg)


def load_config(config_file: str, opts=(), register=()) -> CN:
    """Detectron2's defaults + :func:`add_hierseg_config` + ``config_file`` + ``opts`` (KEY VALUE ...), on the
    CPU when no GPU is present; not frozen. The one config loader of the tools and demos. ``register``
    (``--register``) and ``DATASETS.REGISTER`` are imported and NUM_CLASSES is checked against the datasets
    (:func:`hierseg_d2.data.datasets.setup_datasets`)."""
    import torch
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    from .data.datasets import setup_datasets

    setup_datasets(cfg, register)
    return cfg


def parse_size(text: str):
    """``HEIGHTxWIDTH`` (e.g. ``800x1216``) -> (height, width): an argparse ``type`` for the tools' size options."""
    import argparse

    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HEIGHTxWIDTH, e.g. 800x1216") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r}: height and width must be positive")
    return h, w
