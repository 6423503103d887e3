"""Export of HCFormer to ONNX / TorchScript and a runner returning Detectron2-format results
(docs/deployment.md). ``onnx`` and ``onnxruntime`` are optional: requirements-export.txt."""
from .dcn import DCN_MODES, deform_conv2d_grid_sample, dcn_implementation, onnxruntime_supports_deformconv
from .exporter import (ExportableHCFormer, UnsupportedExportError, check_exportable, compare_with_pytorch,
                       export_and_verify, export_onnx, export_torchscript, output_names, verification_sizes)
from .runner import ExportedHCFormer, evaluate_exported, exported_format

__all__ = ["DCN_MODES", "deform_conv2d_grid_sample", "dcn_implementation", "onnxruntime_supports_deformconv",
           "ExportableHCFormer", "UnsupportedExportError", "check_exportable", "compare_with_pytorch",
           "export_and_verify", "export_onnx", "export_torchscript", "output_names", "verification_sizes",
           "ExportedHCFormer", "evaluate_exported", "exported_format"]
