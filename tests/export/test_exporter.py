"""Exported HCFormers (ONNX in onnxruntime, TorchScript) against PyTorch: the demo's config (ResNet-18 with
DCNv2) and a transformer backbone (MiT-B0), at two image sizes; configs that cannot be exported fail with a
message saying what to do."""
import pytest
import torch

from hierseg_d2.export import (ExportedHCFormer, UnsupportedExportError, check_exportable, compare_with_pytorch,
                               export_and_verify)
from tests.export.models import HILA_CONFIG, MIT_B0_OPTS, R18_CONFIG, detectron2_inputs, fixed_random_model

PADDED_SIZES = [(96, 128), (128, 160)]  # network inputs (multiples of 32)
IMAGE_SIZES = [(96, 128), (117, 150)]  # Detectron2 inputs: the second is padded to 128 x 160


@pytest.fixture(scope="module", params=["r18_dcn", "mit_b0"])
def exported(request, tmp_path_factory):
    """One model per config, exported once in each format (traced at 96 x 128)."""
    config, opts = {"r18_dcn": (R18_CONFIG, []), "mit_b0": (HILA_CONFIG, MIT_B0_OPTS)}[request.param]
    torch.set_num_threads(1)
    _, model = fixed_random_model(config, opts)
    out = tmp_path_factory.mktemp(request.param)
    sample = torch.randn(1, 3, *PADDED_SIZES[0])
    runners = {fmt: export_and_verify(model, sample, str(out / fmt), fmt, num_threads=1)["runner"]
               for fmt in ("onnx", "torchscript")}
    return request.param, model, runners


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_network_outputs_agree_at_two_sizes(exported, fmt):
    name, model, runners = exported
    diffs = compare_with_pytorch(model, runners[fmt].run_network, PADDED_SIZES, seed=1)
    for size, d in diffs.items():
        assert d["pred_masks"] < 1e-3 and d["pred_logits"] < 1e-3 and d["assignments"] < 1e-3, (name, size, d)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_detectron2_results_agree(exported, fmt):
    """Same panoptic segments (ids and segments_info), semantic scores and instances as the PyTorch model,
    for images whose size is not a multiple of 32."""
    name, model, runners = exported
    inputs = detectron2_inputs(IMAGE_SIZES)
    for x in inputs:
        with torch.no_grad():
            ref = model([x])[0]
        out = runners[fmt]([x])[0]
        ref_ids, ref_info = ref["panoptic_seg"]
        ids, info = out["panoptic_seg"]
        assert len(ref_info) > 0
        assert info == ref_info and torch.equal(ids, ref_ids), (name, x["image"].shape)
        assert (out["sem_seg"] - ref["sem_seg"]).abs().max() < 1e-4
        assert torch.equal(out["instances"].pred_classes, ref["instances"].pred_classes)
        assert (out["instances"].scores - ref["instances"].scores).abs().max() < 1e-4


def test_batch_of_two(exported):
    name, model, runners = exported
    images = torch.randn(2, 3, *PADDED_SIZES[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.predict(images)
    for fmt, runner in runners.items():
        out = runner.run_network(images)
        assert out["pred_masks"].shape == ref["pred_masks"].shape
        assert (out["pred_masks"] - ref["pred_masks"]).abs().max() < 1e-3, (name, fmt)


def test_hila_cannot_be_exported_to_onnx(tmp_path):
    """HILA's F.fold needs Col2Im (opset 18), which torch 2.3.1's exporter cannot write correctly."""
    _, model = fixed_random_model(HILA_CONFIG)
    with pytest.raises(UnsupportedExportError, match="cannot be exported to ONNX.*col2im.*--format torchscript"):
        export_and_verify(model, torch.randn(1, 3, 64, 64), str(tmp_path), "onnx")


def test_hila_exports_to_torchscript(tmp_path):
    _, model = fixed_random_model(HILA_CONFIG)
    runner = export_and_verify(model, torch.randn(1, 3, 64, 64), str(tmp_path), "torchscript")["runner"]
    diffs = compare_with_pytorch(model, runner.run_network, PADDED_SIZES + [(160, 96)], seed=3)
    assert all(d["pred_masks"] < 1e-3 and d["assignments"] < 1e-3 for d in diffs.values()), diffs


def test_deformconv_in_onnxruntime_says_what_to_do(tmp_path):
    _, model = fixed_random_model(R18_CONFIG)
    with pytest.raises(UnsupportedExportError, match="no CPU kernel for the ONNX DeformConv.*--dcn grid_sample"):
        export_and_verify(model, torch.randn(1, 3, 64, 64), str(tmp_path), "onnx", dcn="deformconv")
    assert (tmp_path / "model.onnx").is_file()  # kept for runtimes that implement DeformConv


def test_only_hcformer_is_exportable():
    with pytest.raises(UnsupportedExportError, match="MODEL.META_ARCHITECTURE 'HCFormer'"):
        check_exportable(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="unknown exported model type"):
        ExportedHCFormer(fixed_random_model(R18_CONFIG)[1], "model.bin")
