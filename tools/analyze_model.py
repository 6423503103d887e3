#!/usr/bin/env python
"""FLOPs and parameter counts of a hierseg_d2 model, measured with Detectron2's tools.

    python tools/analyze_model.py --config-file configs/coco/panoptic-segmentation/hcformer_R50_bs16_50ep.yaml
    python tools/analyze_model.py --config-file <cfg> --tasks parameter
    python tools/analyze_model.py --config-file <cfg> --height 512 --width 512 MODEL.HCFORMER.LEVELS 0

FLOPs: ``detectron2.utils.analysis.FlopCountAnalysis`` (fvcore; one fused multiply-add = one flop) of the
model in eval mode on one image of ``--height`` x ``--width`` (default 800 x 1216, Mask2Former's R50
reference input here), inference post-processing included, as a batch of one dict {"image", "height",
"width"}. Weights are random unless ``--load`` loads ``MODEL.WEIGHTS``: the count does not depend on them
except through data-dependent post-processing (a few Mflops). ``torchvision::deform_conv2d`` (DCNv2) is
counted as its convolution plus 4 flops per bilinearly sampled input value, the convention fvcore uses
for bilinear upsampling; ``aten::baddbmm`` (masked attention) as its matmul; any other operator fvcore
skips is listed (element-wise ops and data movement).
"""
import argparse
import logging
import os
from typing import Any, List

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis, parameter_count_table
from detectron2.utils.logger import setup_logger

from hierseg_d2.checkpoint import HierSegCheckpointer
from hierseg_d2.config import add_hierseg_config
from hierseg_d2.data.datasets import add_register_argument, setup_datasets

logger = logging.getLogger("hierseg_d2.analyze_model")


def deform_conv2d_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle of torchvision::deform_conv2d(input, weight, offset, mask, bias, ...)."""
    from fvcore.nn.jit_handles import get_shape

    weight_shape = get_shape(inputs[1])  # (Cout, Cin / groups, kh, kw)
    out_shape = get_shape(outputs[0])  # (B, Cout, Ho, Wo)
    batch, c_out, h_out, w_out = out_shape
    c_in_per_group, kh, kw = weight_shape[1:]
    c_in = get_shape(inputs[0])[1]
    conv = batch * c_out * h_out * w_out * c_in_per_group * kh * kw
    sampling = 4 * batch * c_in * kh * kw * h_out * w_out
    return int(conv + sampling)


def baddbmm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle of aten::baddbmm(input, batch1, batch2, ...): the batched matmul (attention with masks in
    nn.MultiheadAttention), which fvcore would otherwise skip."""
    from fvcore.nn.jit_handles import get_shape

    b, n, k = get_shape(inputs[1])
    m = get_shape(inputs[2])[2]
    return int(b * n * k * m)


def setup(args):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    setup_datasets(cfg, args.register)  # the model reads the metadata of DATASETS.TRAIN[0]
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cfg.freeze()
    return cfg


def build_eval_model(cfg, load: bool = False) -> torch.nn.Module:
    model = build_model(cfg)
    if load:
        HierSegCheckpointer.from_config(cfg, model).load(cfg.MODEL.WEIGHTS)  # safe loading
    return model.eval()


def count_flops(model: torch.nn.Module, height: int, width: int) -> FlopCountAnalysis:
    """FlopCountAnalysis of ``model`` on one random ``height`` x ``width`` image (Detectron2 input format)."""
    image = torch.rand(3, height, width, device=next(model.parameters()).device) * 255
    inputs = [{"image": image, "height": height, "width": width}]
    flops = FlopCountAnalysis(model, inputs)
    flops.set_op_handle("torchvision::deform_conv2d", deform_conv2d_flop_jit, "aten::baddbmm", baddbmm_flop_jit)
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    return flops


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--tasks", action="append", choices=["flop", "parameter"],
                        help="flop and/or parameter (repeat the option for both; default both)")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--load", action="store_true", help="load MODEL.WEIGHTS (default: random weights)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    add_register_argument(parser)
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    args.tasks = args.tasks or ["flop", "parameter"]
    setup_logger(name="hierseg_d2")
    setup_logger(name="fvcore")
    cfg = setup(args)
    model = build_eval_model(cfg, args.load)
    result = {}
    if "parameter" in args.tasks:
        result["params"] = count_parameters(model)
        logger.info("Parameter count:\n" + parameter_count_table(model, max_depth=2))
        logger.info(f"Total parameters: {result['params'] / 1e6:.2f}M")
    if "flop" in args.tasks:
        with torch.no_grad():
            flops = count_flops(model, args.height, args.width)
            result["flops"] = flops.total()
        by_module = flops.by_module()
        top = {k: v for k, v in by_module.items() if k.count(".") <= 1 and v > 0}
        logger.info("GFLOPs by module: " + ", ".join(f"{k or 'total'}={v / 1e9:.2f}" for k, v in top.items()))
        skipped = dict(flops.unsupported_ops())
        if skipped:
            logger.info(f"Operators not counted (no flop handle): {skipped}")
        logger.info(f"Total GFLOPs at {args.height}x{args.width}: {result['flops'] / 1e9:.1f}")
    return result


if __name__ == "__main__":
    main()
