"""MaskFormer-family mappers on the shapes dataset: exact targets without augmentation, consistent
targets with the configured augmentations, and build_mapper's choice by INPUT.DATASET_MAPPER_NAME."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from PIL import Image

from hierseg_d2 import add_hierseg_config
from hierseg_d2.data.dataset_mappers import (
    MAPPERS,
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    SkipBadSamples,
    build_mapper,
)


def make_cfg(train_name="shapes_train_panoptic_with_sem_seg", mapper="mask_former_panoptic"):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.INPUT.DATASET_MAPPER_NAME = mapper
    cfg.INPUT.MIN_SIZE_TRAIN = (96, 128, 160)
    cfg.INPUT.MAX_SIZE_TRAIN = 320
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (128, 128)
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.8
    cfg.INPUT.COLOR_AUG_SSD = True
    cfg.INPUT.SIZE_DIVISIBILITY = 128
    cfg.INPUT.IMAGE_SIZE = 128
    cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE = 0.5, 1.5
    return cfg


def _png(path):
    return np.asarray(Image.open(path))


def _check_common(out, divisibility=None):
    img = out["image"]
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
    inst = out["instances"]
    assert inst.image_size == tuple(img.shape[-2:])
    assert inst.gt_classes.dtype == torch.int64 and inst.gt_masks.dtype == torch.bool
    assert inst.gt_masks.shape == (len(inst.gt_classes),) + tuple(img.shape[-2:])
    if divisibility:
        assert img.shape[-2] % divisibility == 0 and img.shape[-1] % divisibility == 0


def _no_aug(cls, **kw):
    return cls(True, augmentations=[], image_format="RGB", size_divisibility=32, **kw)


def test_semantic_mapper_exact_without_augmentation(shapes_root):
    rec = DatasetCatalog.get("shapes_train_sem_seg")[0]
    out = _no_aug(MaskFormerSemanticDatasetMapper, ignore_label=255, num_classes=12)(rec)
    _check_common(out, 32)
    image, sem = _png(rec["file_name"]), _png(rec["sem_seg_file_name"])
    h, w = sem.shape
    H, W = out["sem_seg"].shape
    assert (H, W) == (-(-h // 32) * 32, -(-w // 32) * 32)  # padded up to a multiple of 32
    np.testing.assert_array_equal(out["image"][:, :h, :w].permute(1, 2, 0).numpy(), image)
    assert (out["image"][:, h:, :] == 128).all() and (out["image"][:, :, w:] == 128).all()
    np.testing.assert_array_equal(out["sem_seg"][:h, :w].numpy(), sem)
    assert (out["sem_seg"][h:] == 255).all() and (out["sem_seg"][:, w:] == 255).all()
    assert out["sem_seg"].dtype == torch.int64
    classes = sorted(set(np.unique(sem).tolist()) - {255})
    assert out["instances"].gt_classes.tolist() == classes
    for c, m in zip(classes, out["instances"].gt_masks):
        assert torch.equal(m, out["sem_seg"] == c)


def test_panoptic_mapper_exact_without_augmentation(shapes_root):
    from panopticapi.utils import rgb2id

    rec = DatasetCatalog.get("shapes_train_panoptic_with_sem_seg")[1]
    out = _no_aug(MaskFormerPanopticDatasetMapper, ignore_label=255, num_classes=12)(rec)
    _check_common(out, 32)
    ids = rgb2id(_png(rec["pan_seg_file_name"]))
    h, w = ids.shape
    assert out["instances"].gt_classes.tolist() == [s["category_id"] for s in rec["segments_info"]]
    for s, m in zip(rec["segments_info"], out["instances"].gt_masks):
        np.testing.assert_array_equal(m[:h, :w].numpy(), ids == s["id"])
        assert not m[h:].any() and not m[:, w:].any()
    np.testing.assert_array_equal(out["sem_seg"][:h, :w].numpy(), _png(rec["sem_seg_file_name"]))


def test_instance_mapper_exact_without_augmentation(shapes_root):
    from pycocotools import mask as mask_util

    rec = DatasetCatalog.get("shapes_train_instance")[2]
    mapper = MaskFormerInstanceDatasetMapper(True, augmentations=[], image_format="RGB", size_divisibility=32)
    out = mapper(rec)
    _check_common(out, 32)
    assert out["instances"].gt_classes.tolist() == [a["category_id"] for a in rec["annotations"]]
    for a, m in zip(rec["annotations"], out["instances"].gt_masks):
        ref = mask_util.decode(a["segmentation"]).astype(bool)
        np.testing.assert_array_equal(m[: ref.shape[0], : ref.shape[1]].numpy(), ref)


@pytest.mark.parametrize("train_name", ["shapes_train_panoptic_with_sem_seg", "shapes_train_panoptic"])
def test_panoptic_mapper_with_augmentation_is_consistent(shapes_root, train_name):
    """Masks and the semantic map go through the same (nearest) transforms: each target's pixels carry
    its class in sem_seg, targets are disjoint, and sem_seg is ignore exactly outside them."""
    cfg = make_cfg(train_name)
    mapper = MaskFormerPanopticDatasetMapper(cfg, True)
    assert any(isinstance(a, T.RandomCrop_CategoryAreaConstraint) for a in mapper.tfm_gens)
    for rec in DatasetCatalog.get(train_name)[:4]:
        out = mapper(rec)
        _check_common(out, 128)
        sem, inst = out["sem_seg"], out["instances"]
        assert inst.gt_masks.sum(0).max() <= 1
        for c, m in zip(inst.gt_classes, inst.gt_masks):
            assert (sem[m] == c).all()
        np.testing.assert_array_equal((sem != 255).numpy(), inst.gt_masks.any(0).numpy())


def test_semantic_mapper_with_augmentation_is_consistent(shapes_root):
    mapper = MaskFormerSemanticDatasetMapper(make_cfg("shapes_train_sem_seg", "mask_former_semantic"), True)
    for rec in DatasetCatalog.get("shapes_train_sem_seg")[:4]:
        out = mapper(rec)
        _check_common(out, 128)
        for c, m in zip(out["instances"].gt_classes, out["instances"].gt_masks):
            assert torch.equal(m, out["sem_seg"] == c)


@pytest.mark.parametrize(
    "cls,train_name,max_class",
    [
        (COCOInstanceNewBaselineDatasetMapper, "shapes_train_instance", 8),
        (COCOPanopticNewBaselineDatasetMapper, "shapes_train_panoptic", 12),
    ],
)
def test_lsj_mappers(shapes_root, cls, train_name, max_class):
    from detectron2.structures import BitMasks

    mapper = cls(make_cfg(train_name), True)
    assert [type(a) for a in mapper.tfm_gens] == [T.RandomFlip, T.ResizeScale, T.FixedSizeCrop]
    for rec in DatasetCatalog.get(train_name)[:4]:
        out = mapper(rec)
        _check_common(out)
        assert out["image"].shape[-2:] == (128, 128)
        pad = out["padding_mask"]
        assert pad.dtype == torch.bool and pad.shape == (128, 128)
        inst = out["instances"]
        assert not inst.gt_masks[:, pad].any()  # no target on padding
        assert (out["image"][:, pad] == 128).all()
        assert ((inst.gt_classes >= 0) & (inst.gt_classes < max_class)).all()
        assert inst.gt_masks.flatten(1).any(1).all()  # cropped-away targets were dropped
        assert torch.equal(inst.gt_boxes.tensor, BitMasks(inst.gt_masks).get_bounding_boxes().tensor)


def test_build_mapper_by_name(shapes_root):
    expected = {
        "mask_former_semantic": MaskFormerSemanticDatasetMapper,
        "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
        "mask_former_instance": MaskFormerInstanceDatasetMapper,
        "coco_instance_lsj": COCOInstanceNewBaselineDatasetMapper,
        "coco_panoptic_lsj": COCOPanopticNewBaselineDatasetMapper,
    }
    assert set(MAPPERS) == set(expected)
    for name, cls in expected.items():
        m = build_mapper(make_cfg(mapper=name), True)
        assert isinstance(m, SkipBadSamples) and type(m.mapper) is cls
    test_mapper = build_mapper(make_cfg(), False)
    assert type(test_mapper.mapper.mapper) is DatasetMapper and not test_mapper.skip  # behind CheckGroundTruthSize
    with pytest.raises(KeyError, match="no_such_mapper"):
        build_mapper(make_cfg(mapper="no_such_mapper"), True)
