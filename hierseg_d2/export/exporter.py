"""HCFormer's network (normalised padded image -> class logits, decoded mask logits, assignments) exported to
ONNX or TorchScript.

The exported graph is :meth:`HCFormer.predict`, the function the PyTorch forward itself runs; the pixel
normalisation / padding (:meth:`HCFormer.preprocess_image`) and the post-processing
(:meth:`HCFormer.inference`) stay in Python and are shared by :class:`hierseg_d2.export.ExportedHCFormer`.
Height and width are dynamic (any multiple of the model's size divisibility), and so is the batch.
"""
import contextlib
import logging
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..modeling.meta_arch.hcformer import HCFormer
from .dcn import (DCN_MODES, DEFORMCONV_OPSET, dcn_implementation, onnxruntime_supports_deformconv,
                  register_deformconv_symbolic, uses_deform_conv)

__all__ = ["ExportableHCFormer", "export_onnx", "export_torchscript", "output_names", "ONNX_OPSET",
           "UnsupportedExportError", "check_exportable", "verification_sizes", "compare_with_pytorch",
           "check_agreement", "VERIFY_ATOL", "export_and_verify"]

logger = logging.getLogger(__name__)

ONNX_OPSET = 17  # the newest opset torch 2.3's exporter writes correctly (at 18: invalid ReduceL2 nodes)
VERIFY_ATOL = 1e-3  # max abs difference of any output accepted by the export's self-check


class UnsupportedExportError(RuntimeError):
    """The model or the chosen export path cannot give a correct exported model here."""


def check_exportable(model: nn.Module) -> HCFormer:
    if not isinstance(model, HCFormer):
        raise UnsupportedExportError(
            f"export: only MODEL.META_ARCHITECTURE 'HCFormer' is exportable, got {type(model).__name__!r}")
    return model


class ExportableHCFormer(nn.Module):
    """``images`` (B, 3, Hp, Wp), normalised and padded -> (pred_logits (B, Q, K+1), pred_masks (B, Q, h, w)
    decoded through the hierarchy, A(first) ... A(last) each (B, 9, H_i, W_i), finest first)."""

    def __init__(self, model: HCFormer):
        super().__init__()
        self.model = check_exportable(model)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outputs = self.model.predict(images)
        return (outputs["pred_logits"], outputs["pred_masks"], *outputs["assignments"])


@contextlib.contextmanager
def _quiet_tracer():
    """Silence the tracer's "converting a tensor to a Python boolean" warnings: they come from the model's
    size checks, which hold for every padded size; the export is verified at a second size instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def output_names(model: HCFormer) -> List[str]:
    return ["pred_logits", "pred_masks"] + [f"assignments_{i}" for i in range(len(model.sem_seg_head.levels))]


def _resolve_dcn(dcn: str, model: HCFormer, sample: torch.Tensor) -> Optional[str]:
    """The DCNv2 form to write, None for a model without DCNv2."""
    if dcn not in DCN_MODES:
        raise ValueError(f"export: --dcn must be one of {DCN_MODES}, got {dcn!r}")
    if not uses_deform_conv(ExportableHCFormer(model).eval(), sample):
        return None
    if dcn != "auto":
        return dcn
    supported, reason = onnxruntime_supports_deformconv()
    if supported:
        return "deformconv"
    logger.warning(f"{reason}: exporting DCNv2 with standard ops instead (--dcn grid_sample, exact up to float "
                   "rounding); --dcn deformconv writes the DeformConv op for runtimes that implement it")
    return "grid_sample"


def export_onnx(model: HCFormer, sample: torch.Tensor, path: str, dcn: str = "auto") -> Optional[str]:
    """Export to ``path`` (.onnx); ``sample``: a normalised padded (1, 3, Hp, Wp) image for tracing.
    ``dcn``: how DCNv2 layers are written (:mod:`hierseg_d2.export.dcn`); returns the one used (None: the
    model has no DCNv2)."""
    wrapper = ExportableHCFormer(model).eval()
    mode = _resolve_dcn(dcn, model, sample)
    opset = ONNX_OPSET
    if mode == "deformconv":
        register_deformconv_symbolic()
        opset = DEFORMCONV_OPSET
    names = output_names(model)
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}, "pred_logits": {0: "batch"},
               "pred_masks": {0: "batch", 2: "mask_height", 3: "mask_width"}}
    dynamic.update({n: {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} for n in names[2:]})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        dcn_context = dcn_implementation(mode) if mode else contextlib.nullcontext()
        with torch.no_grad(), dcn_context, _quiet_tracer():
            torch.onnx.export(wrapper, (sample,), path, opset_version=opset, input_names=["images"],
                              output_names=names, dynamic_axes=dynamic, do_constant_folding=True)
    except Exception as e:  # e.g. an op without an ONNX form at this opset
        lines = str(e).strip().splitlines() or [""]
        reason = f"{type(e).__name__}: " + lines[0].split(", try exporting with this version")[0].rstrip(".")
        raise UnsupportedExportError(
            f"this model cannot be exported to ONNX with torch {torch.__version__}'s exporter at opset {opset} "
            f"({reason}). A newer opset is no way out: {ONNX_OPSET} is the newest this exporter writes correctly "
            f"(at 18 it writes invalid ReduceL2 nodes and fails on Col2Im with dynamic sizes). Export it with "
            f"--format torchscript instead, or use a backbone whose ops ONNX covers (docs/deployment.md lists "
            f"what is tested).") from e
    logger.info(f"ONNX model (opset {opset}, DCNv2 as {mode or 'none in this model'}) written to {path}")
    return mode


def export_torchscript(model: HCFormer, sample: torch.Tensor, path: str) -> None:
    """Trace to ``path`` (.ts); DCNv2 stays torchvision's op (``import torchvision`` before loading)."""
    wrapper = ExportableHCFormer(model).eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad(), _quiet_tracer():
        traced = torch.jit.trace(wrapper, (sample,), check_trace=False)
    traced.save(path)
    logger.info(f"TorchScript model written to {path}")


def verification_sizes(model: HCFormer, height: int, width: int) -> List[Tuple[int, int]]:
    """The sample's padded size and a second one (one divisibility step taller, two wider): a graph that
    kept the sample's sizes anywhere fails on the second."""
    d = max(int(model.size_divisibility), 1)
    return [(height, width), (height + d, width + 2 * d)]


def compare_with_pytorch(model: HCFormer, run_network, sizes: Sequence[Tuple[int, int]], seed: int = 0
                         ) -> Dict[Tuple[int, int], Dict[str, float]]:
    """Max abs differences between ``model.predict`` and ``run_network`` (an exported network) on random
    normalised images of the given padded sizes: {size: {"pred_logits", "pred_masks", "assignments"}}."""
    generator = torch.Generator().manual_seed(seed)
    diffs = {}
    for h, w in sizes:
        images = torch.randn(1, 3, h, w, generator=generator)
        with torch.no_grad():
            ref = model.predict(images.to(model.device))
            out = run_network(images)
        diffs[(h, w)] = {
            "pred_logits": float((ref["pred_logits"].cpu() - out["pred_logits"]).abs().max()),
            "pred_masks": float((ref["pred_masks"].cpu() - out["pred_masks"]).abs().max()),
            "assignments": max([float((a.cpu() - b).abs().max()) for a, b in zip(ref["assignments"],
                                                                                   out["assignments"])] or [0.0]),
        }
    return diffs


def check_agreement(diffs: Dict[Tuple[int, int], Dict[str, float]], path: str, atol: float = VERIFY_ATOL) -> None:
    """Raise :class:`UnsupportedExportError` naming the size and output when a difference exceeds ``atol``."""
    for (h, w), d in diffs.items():
        bad = {k: v for k, v in d.items() if not v <= atol}  # NaN fails too
        if bad:
            raise UnsupportedExportError(
                f"{path}: the exported model disagrees with PyTorch at {h}x{w} (max abs diff {bad}, tolerance "
                f"{atol}); the graph is not valid for this input size, do not deploy it")


def export_and_verify(model: HCFormer, sample: torch.Tensor, output_dir: str, fmt: str, dcn: str = "auto",
                      num_threads: Optional[int] = None) -> Dict:
    """Export ``model`` to ``output_dir/model.onnx`` or ``model.ts`` and check it against PyTorch at the
    sample's size and a second size (:func:`verification_sizes`). Returns {"path", "format", "dcn",
    "diffs"}; raises :class:`UnsupportedExportError` with what to do when the model cannot be exported, the
    runtime cannot run it or the outputs disagree."""
    from .runner import ExportedHCFormer

    check_exportable(model).eval()
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"export format must be 'onnx' or 'torchscript', got {fmt!r}")
    path = os.path.join(output_dir, "model.onnx" if fmt == "onnx" else "model.ts")
    mode = None
    if fmt == "onnx":
        mode = export_onnx(model, sample, path, dcn)
    else:
        export_torchscript(model, sample, path)
    runner = ExportedHCFormer(model, path, num_threads=num_threads)  # explains a missing DeformConv kernel
    diffs = compare_with_pytorch(model, runner.run_network, verification_sizes(model, *sample.shape[-2:]))
    for (h, w), d in diffs.items():
        logger.info(f"{fmt} vs PyTorch at {h}x{w}: max abs diff " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    check_agreement(diffs, path)
    return {"path": path, "format": fmt, "dcn": mode, "diffs": diffs, "runner": runner}
