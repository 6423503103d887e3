#!/usr/bin/env python
"""Export an HCFormer to ONNX or TorchScript, check it against PyTorch, and optionally evaluate it.

    python tools/export_model.py --config-file configs/shapes/hcformer_R18_s16_shapes.yaml \
        --format onnx --output output/export [--sample-image img.png] [--run-eval] \
        MODEL.WEIGHTS output/demo/model_final.pth

The exported network maps a normalised, padded image (1, 3, H, W) (H, W: any multiple of the size
divisibility; batch and both sizes are dynamic axes) to class logits, mask logits decoded through the
hierarchy and the hierarchy's soft assignments. ``hierseg_d2.export.ExportedHCFormer`` runs it on
Detectron2 input dicts with the PyTorch model's own normalisation and post-processing, so its results are
Detectron2's format (evaluators, Visualizer). Writes ``<output>/model.onnx`` or ``model.ts`` and
``<output>/config.yaml``; the export is checked against PyTorch at the sample's size and a second size and
refused (non-zero exit, a message saying why and what to do) if any output differs by more than 1e-3.

DCNv2 (``--dcn``): onnxruntime has no DeformConv kernel; ``auto`` (default) checks the installed
onnxruntime and otherwise writes DCNv2 with standard ops (``grid_sample``, exact up to float rounding);
``deformconv`` writes the ONNX DeformConv op for runtimes that implement it. Needs the optional packages of
requirements-export.txt (docs/deployment.md).
"""
import argparse
import json
import logging
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from hierseg_d2.checkpoint import HierSegCheckpointer  # noqa: E402
from hierseg_d2.config import load_config, parse_size  # noqa: E402
from hierseg_d2.data.datasets import add_register_argument  # noqa: E402

logger = logging.getLogger("hierseg_d2.export")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    parser.add_argument("--output", required=True, help="directory for the exported model")
    parser.add_argument("--sample-image", metavar="IMG",
                        help="image to trace with (resized as at test time); default: a random --sample-size image")
    parser.add_argument("--sample-size", type=parse_size, default=(256, 320), metavar="HxW",
                        help="size of the random tracing image without --sample-image (default 256x320)")
    parser.add_argument("--dcn", choices=["auto", "grid_sample", "deformconv"], default="auto",
                        help="how DCNv2 is written to ONNX (default auto: DeformConv if onnxruntime runs it, "
                             "else standard ops)")
    parser.add_argument("--run-eval", action="store_true",
                        help="evaluate the exported model on --dataset with the project's evaluators")
    parser.add_argument("--dataset", help="registered dataset for --run-eval (default DATASETS.TEST[0])")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime / torch threads (default: theirs)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return add_register_argument(parser)


def sample_input(cfg, model, args) -> torch.Tensor:
    """The normalised padded image to trace with: --sample-image as the test-time mapper sees it, or random."""
    if args.sample_image:
        import detectron2.data.transforms as T
        from detectron2.data.detection_utils import read_image

        image = read_image(args.sample_image, format=cfg.INPUT.FORMAT)
        aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        image = aug.get_transform(image).apply_image(image)
        inputs = [{"image": torch.as_tensor(image.astype("float32").transpose(2, 0, 1))}]
        return model.preprocess_image(inputs).tensor
    h, w = args.sample_size
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    return model.preprocess_image([{"image": image}]).tensor


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="hierseg_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    from hierseg_d2.export import evaluate_exported, export_and_verify

    cfg = load_config(args.config_file, args.opts, register=args.register)
    cfg.freeze()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        HierSegCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)  # safe loading, match check
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting randomly initialised weights")
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    sample = sample_input(cfg, model, args)
    result = export_and_verify(model, sample, args.output, args.format, dcn=args.dcn, num_threads=args.threads)
    summary = {"path": result["path"], "format": result["format"], "dcn": result["dcn"],
               "max_abs_diff": {f"{h}x{w}": d for (h, w), d in result["diffs"].items()}}
    if args.run_eval:
        dataset = args.dataset or (cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None)
        if dataset is None:
            raise ValueError("--run-eval: no --dataset given and DATASETS.TEST is empty")
        summary["eval"] = evaluate_exported(cfg, result["runner"], dataset,
                                            os.path.join(args.output, "inference", dataset))
    with open(os.path.join(args.output, "export.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    logger.info(f"exported {result['format']} model: {result['path']} (verified against PyTorch)")
    return summary


def cli(argv=None):
    """``main`` with a refused export turned into exit status 1 and the reason on stderr (no traceback)."""
    from hierseg_d2.export.exporter import UnsupportedExportError

    try:
        return main(argv)
    except UnsupportedExportError as e:
        sys.exit(f"export_model.py: {e}")


if __name__ == "__main__":
    cli()
