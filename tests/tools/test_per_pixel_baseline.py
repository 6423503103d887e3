"""tools/per_pixel_baseline.py: the backbone + per-pixel classifier yardstick for short from-scratch runs."""

import os

import torch
from tests.scripts import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "shapes", "hcformer_R18_s16_shapes.yaml")


def _tool():
    return load_script("tools/per_pixel_baseline.py")


def _cfg(*opts):
    from hierseg_d2.config import load_config

    return load_config(CONFIG, ["DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
                                "MODEL.HCFORMER.DCN_DOWNSAMPLING", "False", *opts])


def test_fits_one_batch_and_predicts_at_the_original_size(shapes_root):
    from detectron2.data import build_detection_train_loader

    from hierseg_d2.data.dataset_mappers import build_mapper

    torch.manual_seed(0)
    cfg = _cfg()
    model = _tool().PerPixelBaseline(cfg, "res4")
    batch = next(iter(build_detection_train_loader(cfg, mapper=build_mapper(cfg, True))))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(batch)["loss_sem_seg"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 75, 101, dtype=torch.uint8), "height": 150, "width": 202}])
    assert out[0]["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 150, 202)


def test_main_prints_miou_of_train_and_val(shapes_root, capsys):
    results = _tool().main(["--config-file", CONFIG, "--iters", "2", "--eval-train", "DATALOADER.NUM_WORKERS", "0",
                            "SOLVER.IMS_PER_BATCH", "2", "MODEL.HCFORMER.DCN_DOWNSAMPLING", "False"])
    assert set(results) == {"shapes_train_panoptic_with_sem_seg", "shapes_val_panoptic_with_sem_seg"}
    assert all(0.0 <= r["mIoU"] <= 100.0 for r in results.values())
    out = capsys.readouterr().out
    assert "mIoU things" in out and "shapes_val_panoptic_with_sem_seg" in out


def test_unknown_feature_is_named(shapes_root):
    import pytest

    with pytest.raises(KeyError, match="res9"):
        _tool().PerPixelBaseline(_cfg(), "res9")
