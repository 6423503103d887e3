"""Run an exported HCFormer (ONNX in onnxruntime, or TorchScript) on Detectron2 input dicts and return
Detectron2's output format, through the PyTorch model's own pre- and post-processing
(:meth:`HCFormer.preprocess_image`, :meth:`HCFormer.inference`): the evaluators, ``inference_on_dataset``
and the Visualizer take the results as they take the PyTorch model's."""
import os
from typing import Dict, List, Optional

import numpy as np
import torch
import torchvision  # noqa: F401  (registers torchvision::deform_conv2d for TorchScript models)

from ..modeling.meta_arch.hcformer import HCFormer
from .exporter import UnsupportedExportError, check_exportable

__all__ = ["ExportedHCFormer", "exported_format", "evaluate_exported"]


def exported_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        return "onnx"
    if ext in (".ts", ".pt"):
        return "torchscript"
    raise ValueError(f"{path}: unknown exported model type {ext!r} (expected .onnx or .ts)")


class ExportedHCFormer:
    """Callable like the model at inference: ``runner(batched_inputs) -> [result dict per image]``.

    Args:
        model: an HCFormer built from the same config; it provides the normalisation, padding and
            post-processing settings (its own weights are not used).
        path: the exported network (.onnx or .ts).
        num_threads: intra-op threads of onnxruntime (default: onnxruntime's choice).
    """

    def __init__(self, model: HCFormer, path: str, num_threads: Optional[int] = None):
        self.model = check_exportable(model).eval()
        self.path = path
        self.format = exported_format(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"exported model {path} does not exist")
        if self.format == "onnx":
            self.session = _ort_session(path, num_threads)
            self.output_names = [o.name for o in self.session.get_outputs()]
        else:
            self.module = torch.jit.load(path, map_location="cpu").eval()

    def run_network(self, images: torch.Tensor) -> Dict:
        """Normalised padded images -> the outputs of :meth:`HCFormer.predict` (pred_logits, pred_masks,
        assignments) computed by the exported network."""
        if self.format == "onnx":
            arrays = self.session.run(None, {"images": images.detach().cpu().numpy().astype(np.float32)})
            outs = [torch.from_numpy(a) for a in arrays]
        else:
            with torch.no_grad():
                outs = list(self.module(images))
        return {"pred_logits": outs[0], "pred_masks": outs[1], "assignments": outs[2:]}

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict]:
        with torch.no_grad():
            images = self.model.preprocess_image(batched_inputs)
            return self.model.inference(self.run_network(images.tensor), batched_inputs, images)


def _ort_session(path: str, num_threads: Optional[int]):
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("running an ONNX model needs onnxruntime: pip install -r requirements-export.txt "
                          "-c requirements.txt") from e
    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        if "DeformConv" in str(e):
            raise UnsupportedExportError(
                f"{path}: onnxruntime {onnxruntime.__version__} has no CPU kernel for the ONNX DeformConv op this "
                f"model uses for DCNv2. Re-export with `--dcn grid_sample` (the same DCNv2 from standard ops, "
                f"exact up to float rounding) or use a DCN-free model (MODEL.HCFORMER.DCN_DOWNSAMPLING False, "
                f"retrained); keep this file for runtimes that implement DeformConv.") from e
        raise


def evaluate_exported(cfg, runner: ExportedHCFormer, dataset_name: str, output_folder: str) -> Dict:
    """``inference_on_dataset`` of the exported model on a registered dataset with the project's test loader
    and evaluators (the same as ``train_net.py --eval-only``)."""
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    from ..engine.trainer import Trainer

    loader = Trainer.build_test_loader(cfg, dataset_name)
    evaluator = Trainer.build_evaluator(cfg, dataset_name, output_folder)
    results = inference_on_dataset(runner, loader, evaluator)
    print_csv_format(results)
    return results
