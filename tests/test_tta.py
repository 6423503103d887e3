"""Test-time augmentation for semantic segmentation (TEST.AUG.*, Trainer.test_with_TTA) on a tiny random
shapes HCFormer."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from hierseg_d2 import add_hierseg_config
from hierseg_d2.data.dataset_mappers import build_mapper
from hierseg_d2.data.datasets import datasets_root, register_all_shapes
from hierseg_d2.engine import Trainer
from hierseg_d2.test_time_augmentation import SemanticSegmentorWithTTA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_CONFIG = os.path.join(ROOT, "configs/shapes/hcformer_R18_shapes.yaml")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    register_all_shapes(str(tmp_path_factory.mktemp("tta") / "datasets"), num_images={"train": 1, "val": 2},
                        progress=False)
    yield
    register_all_shapes(datasets_root())


def tta_cfg(*opts):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(SHAPES_CONFIG)
    # test images resized to shorter side 128; a TTA scale of 128 is then the plain test input
    cfg.merge_from_list(["MODEL.MASK_FORMER.DEC_LAYERS", "1", "DATALOADER.NUM_WORKERS", "0",
                         "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256",
                         "TEST.AUG.MIN_SIZES", "(128,)", "TEST.AUG.MAX_SIZE", "256", "TEST.AUG.FLIP", "False", *opts])
    return cfg


@pytest.fixture(scope="module")
def model_and_input(shapes):
    cfg = tta_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    record = DatasetCatalog.get("shapes_val_panoptic_with_sem_seg")[0]
    return model, build_mapper(cfg, False)(record)


def plain(model, dataset_dict):
    with torch.no_grad():
        return model([dict(dataset_dict)])[0]["sem_seg"]


def test_single_scale_without_flip_is_plain_inference(model_and_input):
    model, d = model_and_input
    out = SemanticSegmentorWithTTA(tta_cfg(), model)([dict(d)])[0]
    assert set(out) == {"sem_seg"}
    assert torch.equal(out["sem_seg"], plain(model, d))
    assert model.panoptic_on and model.instance_on  # switched off only during TTA


def test_flipped_branch_is_the_mirror_of_inference_on_the_flipped_input(model_and_input):
    model, d = model_and_input
    tta = SemanticSegmentorWithTTA(tta_cfg("TEST.AUG.FLIP", "True"), model)
    branches = tta.augmented_predictions(dict(d))
    assert len(branches) == 2
    flipped_input = dict(d, image=d["image"].flip(dims=[2]))
    mirrored = plain(model, flipped_input).flip(dims=[2])
    assert torch.equal(branches[0], plain(model, d))
    assert torch.allclose(branches[1], mirrored, atol=1e-6)
    assert not torch.allclose(branches[0], branches[1], atol=1e-3)  # a random model is not symmetric
    averaged = tta([dict(d)])[0]["sem_seg"]
    assert torch.allclose(averaged, (branches[0] + branches[1]) / 2, atol=1e-6)


def test_several_scales_come_back_at_the_original_size(model_and_input):
    model, d = model_and_input
    tta = SemanticSegmentorWithTTA(tta_cfg("TEST.AUG.MIN_SIZES", "(96, 160)", "TEST.AUG.FLIP", "True"), model)
    branches = tta.augmented_predictions(dict(d))
    assert len(branches) == 4
    assert all(b.shape[1:] == (d["height"], d["width"]) for b in branches)
    assert not torch.allclose(branches[0], branches[2], atol=1e-3)  # the scales differ


def test_eval_only_with_tta(shapes, tmp_path):
    cfg = tta_cfg("OUTPUT_DIR", str(tmp_path), "TEST.AUG.ENABLED", "True")
    torch.manual_seed(0)
    model = build_model(cfg)
    res = Trainer.test(cfg, model)
    tta = Trainer.test_with_TTA(cfg, model)
    assert list(tta) == ["sem_seg_TTA"]
    # one scale, no flip: the same numbers as plain inference
    assert tta["sem_seg_TTA"] == pytest.approx(res["sem_seg"], nan_ok=True)
    assert res["sem_seg"]["mIoU"] > 0
    assert os.path.isfile(tmp_path / "inference_TTA" / "shapes_val_panoptic_with_sem_seg" / "sem_seg_predictions.json")
    cfg.defrost()
    cfg.DATASETS.TEST = ("shapes_val_instance",)
    with pytest.raises(ValueError, match="semantic segmentation"):
        Trainer.test_with_TTA(cfg, model)
