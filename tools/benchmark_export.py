#!/usr/bin/env python
"""CPU latency of an exported HCFormer against PyTorch: the network (normalised padded image -> class
logits, decoded masks, assignments) and the whole inference (+ the shared post-processing).

    python tools/benchmark_export.py                    # COCO panoptic R50 (DCNv2), random weights, 800x1216
    python tools/benchmark_export.py --threads 2 --iters 5 --size 800x1216 [--formats onnx torchscript]
    python tools/benchmark_export.py --config-file <cfg> --weights w.pth [KEY VALUE ...]

Median of ``--iters`` runs after one warm-up, with ``--threads`` threads for torch and onnxruntime alike
(OMP_WAIT_POLICY=PASSIVE unless set). The model is exported to a temporary directory (``--output`` to keep
it) with the export's self-check. The machine's load average is printed with the figures.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spin-waiting (docs/performance.md)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

from hierseg_d2.config import parse_size  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "coco", "panoptic-segmentation", "hcformer_R50_bs16_50ep.yaml")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    parser.add_argument("--size", type=parse_size, default=(800, 1216), metavar="HxW")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--formats", nargs="+", choices=["onnx", "torchscript"], default=["onnx"])
    parser.add_argument("--weights", help="checkpoint to load (default: random weights)")
    parser.add_argument("--output", help="keep the exported models here (default: a temporary directory)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser


def median_time(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    args = get_parser().parse_args(argv)
    import torch
    from detectron2.modeling import build_model

    from hierseg_d2.checkpoint import HierSegCheckpointer
    from hierseg_d2.config import load_config
    from hierseg_d2.export import export_and_verify

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if args.weights:  # the configs' MODEL.WEIGHTS (ImageNet backbones) do not change the timing
        HierSegCheckpointer.from_config(cfg, model).load(args.weights)
    h, w = args.size
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    inputs = [{"image": image, "height": h, "width": w}]
    padded = model.preprocess_image(inputs).tensor
    params = sum(p.numel() for p in model.parameters())
    rows, diffs = [], {}
    with torch.no_grad():
        rows.append(("pytorch", median_time(lambda: model.predict(padded), args.iters),
                     median_time(lambda: model(inputs), args.iters)))
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            out = os.path.join(args.output or tmp, fmt)
            result = export_and_verify(model, padded, out, fmt, num_threads=args.threads)
            runner = result["runner"]
            rows.append((fmt, median_time(lambda: runner.run_network(padded), args.iters),
                         median_time(lambda: runner(inputs), args.iters)))
            diffs[fmt] = result["diffs"]
    load = os.getloadavg()
    print(f"\n{os.path.relpath(args.config_file, ROOT)}: {params / 1e6:.2f}M parameters, input {h}x{w} "
          f"(padded {tuple(padded.shape[-2:])}), {args.threads} thread(s), median of {args.iters} runs, "
          f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print("| runtime | network (s) | with post-processing (s) |\n|---|---:|---:|")
    for name, net, full in rows:
        print(f"| {name} | {net:.2f} | {full:.2f} |")
    for fmt, per_size in diffs.items():
        print(f"{fmt} vs PyTorch, max abs diff: " + "; ".join(
            f"{h}x{w}: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()) for (h, w), d in per_size.items()))
    return {"params": params, "diffs": diffs, "threads": args.threads, "load": load,
            "rows": {name: {"network": net, "full": full} for name, net, full in rows}}


if __name__ == "__main__":
    main()
