"""tools/export_model.py as a user runs it: export + self-check + --run-eval on shapes val (the same numbers
as the PyTorch model), TorchScript from a sample image, and a config it cannot export (non-zero exit, the
reason and what to do)."""
import json
import os

import pytest
import torch
from detectron2.evaluation import inference_on_dataset

from hierseg_d2.checkpoint import HierSegCheckpointer
from hierseg_d2.data.datasets.register_shapes import shapes_paths
from hierseg_d2.engine.trainer import Trainer
from tests.export.models import HILA_CONFIG, LOW_THRESHOLDS, ONE_LAYER, R18_CONFIG, fixed_random_model
from tests.scripts import load_script

DATASET = "shapes_val_panoptic_with_sem_seg"


@pytest.fixture
def weights(tmp_path):
    """A fixed random demo model saved as a checkpoint, and the model."""
    cfg, model = fixed_random_model(R18_CONFIG, ONE_LAYER)
    HierSegCheckpointer(model, save_dir=str(tmp_path)).save("random")
    return str(tmp_path / "random.pth"), cfg, model


def test_onnx_export_and_eval_equal_pytorch(shapes_root, weights, tmp_path):
    path, cfg, model = weights
    tool = load_script("tools/export_model.py")
    out = tmp_path / "onnx"
    summary = tool.main(["--config-file", R18_CONFIG, "--format", "onnx", "--output", str(out), "--sample-size",
                         "96x128", "--threads", "1", "--run-eval", "MODEL.WEIGHTS", path] + ONE_LAYER + LOW_THRESHOLDS)
    assert (out / "model.onnx").is_file() and (out / "config.yaml").is_file()
    assert summary["dcn"] == "grid_sample"  # onnxruntime has no DeformConv kernel
    for size, d in summary["max_abs_diff"].items():
        assert d["pred_masks"] < 1e-3, size
    assert json.loads((out / "export.json").read_text())["path"] == str(out / "model.onnx")
    with torch.no_grad():
        ref = inference_on_dataset(model, Trainer.build_test_loader(cfg, DATASET),
                                   Trainer.build_evaluator(cfg, DATASET, str(tmp_path / "pytorch")))
    exported = summary["eval"]
    assert set(exported) == {"panoptic_seg", "segm", "sem_seg"}
    for task, metrics in ref.items():
        for k in ("PQ", "AP", "mIoU"):
            if k in metrics:
                assert exported[task][k] == pytest.approx(metrics[k], abs=1e-6), (task, k)


def test_torchscript_export_from_a_sample_image(shapes_root, tmp_path):
    tool = load_script("tools/export_model.py")
    image_root = shapes_paths(shapes_root, "val")["image_root"]
    image = os.path.join(image_root, sorted(os.listdir(image_root))[0])
    summary = tool.main(["--config-file", R18_CONFIG, "--format", "torchscript", "--output", str(tmp_path),
                         "--sample-image", image, "--threads", "1"] + ONE_LAYER)
    assert (tmp_path / "model.ts").is_file() and summary["dcn"] is None
    assert all(d["pred_masks"] < 1e-3 for d in summary["max_abs_diff"].values())


def test_unexportable_config_exits_with_the_reason(tmp_path):
    """HILA (F.fold -> ONNX Col2Im, opset 18) cannot be exported to ONNX with torch 2.3.1: exit status 1 with
    the reason and what to do, no model file."""
    tool = load_script("tools/export_model.py")
    with pytest.raises(SystemExit) as exit_info:
        tool.cli(["--config-file", HILA_CONFIG, "--format", "onnx", "--output", str(tmp_path), "--sample-size", "64x64"])
    message = str(exit_info.value.code)
    assert "cannot be exported to ONNX" in message and "--format torchscript" in message
    assert not (tmp_path / "model.onnx").exists()
