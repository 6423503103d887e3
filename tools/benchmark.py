#!/usr/bin/env python
"""Where the time and memory of a hierseg_d2 model go: parameters, FLOPs, latency, peak RSS and a per-part
breakdown at inference for a few input sizes, and one training step.

    python tools/benchmark.py                                   # COCO panoptic R50, random weights
    python tools/benchmark.py --sizes 512x512 800x1216 --threads 1 --iters 3
    python tools/benchmark.py --config-file <cfg> --skip-train MODEL.HCFORMER.LEVELS 2

- Each input size and the training step run in a fresh subprocess, so the peak RSS
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, read after the timed runs and before the FLOP count) is
  that size's own peak, model included.
- Latency: median of ``--iters`` runs after one warm-up, with ``--threads`` torch threads (stated in the
  output; OMP_WAIT_POLICY=PASSIVE unless set, see docs/performance.md). Inference is one image of the given
  size as a Detectron2 input dict, the outputs of MODEL.MASK_FORMER.TEST.*_ON included (this tool turns on
  all three unless ``--outputs`` says otherwise).
- Parts, timed by forward hooks and wrappers around the model's own functions (no model code changes):
  backbone, clustering (the ClusteringModules), decoder (the transformer predictor), head_other (the rest
  of the head: encoder, mask features), decoding (eq. 5, ``HCFormer.decode_outputs``), postprocess (the
  three outputs together, ``postprocess_image``); then semantic / panoptic / instance post-processing
  timed one at a time on the same predictions (outside the forward: they share work when run together).
  Parts are medians over the runs, so they need not add up to the median total exactly; they are nested in
  ``total`` and never overlap.
- Training step: batch 2 (``--train-size``, default 512x512) of random images with 3 random instances each,
  forward (parts as above plus criterion), backward and an SGD step; ``--iters`` steps after one warm-up.
- CPU time: the process's user + system time (``resource.getrusage``) of each timed run, next to its wall
  time: on a shared machine it moves less than the wall time with the other jobs' load.
- ``--code-root DIR``: run the workers on another checkout's ``hierseg_d2`` (and its tools/analyze_model.py),
  e.g. a ``git worktree`` of an older commit, to compare commits with the same benchmark.
- FLOPs: tools/analyze_model.py's FlopCountAnalysis (fvcore) at each size (``--no-flops`` to skip).
"""
import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see docs/performance.md

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "coco", "panoptic-segmentation", "hcformer_R50_bs16_50ep.yaml")
INFER_PARTS = ["backbone", "clustering", "decoder", "head_other", "decoding", "postprocess"]
POST_PARTS = ["semantic", "panoptic", "instance"]
TRAIN_PARTS = ["backbone", "clustering", "decoder", "head_other", "decoding", "criterion", "forward", "backward"]


def get_parser():
    # imported here, in the parent only: a worker gets its settings as JSON (--worker-args) and may run an
    # older checkout's hierseg_d2 (--code-root) that lacks parse_size
    from hierseg_d2.config import parse_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    parser.add_argument("--sizes", nargs="*", type=parse_size, default=[(512, 512), (800, 1216), (1024, 2048)],
                        metavar="HxW", help="inference input sizes (default 512x512 800x1216 1024x2048; "
                                            "none: training step only)")
    parser.add_argument("--train-size", type=parse_size, default=(512, 512), metavar="HxW")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--iters", type=int, default=3, help="timed runs after one warm-up (default 3)")
    parser.add_argument("--outputs", default="semantic,panoptic,instance",
                        help="comma-separated inference outputs to turn on (default all three)")
    parser.add_argument("--fold-bn", action="store_true",
                        help="inference: fold FrozenBN into the convs (hierseg_d2.utils.inference_opt)")
    parser.add_argument("--channels-last", action="store_true", help="inference: channels_last backbone")
    parser.add_argument("--skip-train", action="store_true", help="no training step")
    parser.add_argument("--no-flops", action="store_true", help="no FLOP count")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--code-root", default=ROOT, metavar="DIR",
                        help="checkout whose hierseg_d2 and tools/analyze_model.py the workers run (default this one)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


# --------------------------------------------------------------------------------------------------- worker
def _load_analyze_model():
    """tools/analyze_model.py of the checkout whose hierseg_d2 is imported (see --code-root)."""
    import importlib.util

    import hierseg_d2

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(hierseg_d2.__file__))), "tools",
                        "analyze_model.py")
    spec = importlib.util.spec_from_file_location("analyze_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PartTimer:
    """Accumulates wall time per part name over one run (``reset`` between runs)."""

    def __init__(self):
        self.times = {}
        self._start = {}

    def reset(self):
        self.times = {}

    def add(self, name, seconds):
        self.times[name] = self.times.get(name, 0.0) + seconds

    def hook_module(self, module, name):
        def pre(mod, inputs):
            self._start[id(mod)] = time.perf_counter()

        def post(mod, inputs, output):
            self.add(name, time.perf_counter() - self._start.pop(id(mod)))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def wrap(self, fn, name):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)
        return timed


def instrument(model, timer: PartTimer):
    """Hooks/wrappers timing the parts of an HCFormer (see the module docstring)."""
    from hierseg_d2.modeling.meta_arch import hcformer

    head = model.sem_seg_head
    timer.hook_module(model.backbone, "backbone")
    timer.hook_module(head, "head")
    for module in head.clustering.values():
        timer.hook_module(module, "clustering")
    timer.hook_module(head.predictor, "decoder")
    timer.hook_module(model.criterion, "criterion")
    model.decode_outputs = timer.wrap(model.decode_outputs, "decoding")
    if hasattr(hcformer, "postprocess_image"):
        hcformer.postprocess_image = timer.wrap(hcformer.postprocess_image, "postprocess")
    else:  # the code before issue 18 (to benchmark it for comparison): the resize and the three outputs
        for name in ["sem_seg_postprocess", "semantic_inference", "panoptic_inference", "instance_inference"]:
            setattr(hcformer, name, timer.wrap(getattr(hcformer, name), "postprocess"))


def _finish_parts(times):
    times = dict(times)
    times["head_other"] = times.pop("head", 0.0) - times.get("clustering", 0.0) - times.get("decoder", 0.0)
    return times


def _median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def _cpu_seconds():
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_bytes():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _worker_cfg(args):
    analyze = _load_analyze_model()
    args.register, args.cpu = [], True
    cfg = analyze.setup(args)
    return analyze, cfg


def run_infer(args):
    import torch

    analyze, cfg = _worker_cfg(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = analyze.build_eval_model(cfg)
    if args.fold_bn or args.channels_last:
        from hierseg_d2.utils import inference_opt

        if args.fold_bn:
            inference_opt.fold_frozen_bn(model)
        if args.channels_last:
            inference_opt.channels_last_backbone(model)
    timer = PartTimer()
    instrument(model, timer)
    from hierseg_d2.modeling.meta_arch import hcformer

    height, width = args.size
    image = torch.rand(3, height, width) * 255
    inputs = [{"image": image, "height": height, "width": width}]
    totals, cpus, parts = [], [], []
    with torch.no_grad():
        for i in range(args.iters + 1):
            timer.reset()
            cpu, start = _cpu_seconds(), time.perf_counter()
            model(inputs)
            elapsed = time.perf_counter() - start
            if i:  # the first run is the warm-up
                totals.append(elapsed)
                cpus.append(_cpu_seconds() - cpu)
                parts.append(_finish_parts(timer.times))
        rss = _peak_rss_bytes()
        alone = {name: None for name in POST_PARTS}
    if hasattr(hcformer, "postprocess_image"):
        alone = _postprocess_alone(model, inputs, args.iters)
    flops = None
    if not args.no_flops:
        with torch.no_grad():
            flops = analyze.count_flops(model, height, width).total()
    result = {"size": [height, width], "threads": torch.get_num_threads(), "total": _median(totals),
              "cpu": _median(cpus), "runs": totals, "cpu_runs": cpus,
              "parts": {k: _median([p.get(k, 0.0) for p in parts]) for k in INFER_PARTS},
              "postprocess_alone": alone, "peak_rss": rss, "params": analyze.count_parameters(model),
              "flops": flops, "iters": args.iters}
    return result


def _postprocess_alone(model, inputs, iters):
    """Each post-processing alone, on the predictions of one more forward (captured by a wrapper)."""
    import torch
    from hierseg_d2.modeling.meta_arch import hcformer

    with torch.no_grad():
        captured = {}
        post = hcformer.postprocess_image

        def capture(*a, **kw):
            captured["args"], captured["kwargs"] = a, kw
            return post(*a, **kw)
        hcformer.postprocess_image = capture
        model(inputs)
        hcformer.postprocess_image = post
        alone = {}
        postprocess_image = _unwrapped_postprocess()
        for name in POST_PARTS:
            kwargs = dict(captured["kwargs"], semantic_on=name == "semantic", panoptic_on=name == "panoptic",
                          instance_on=name == "instance")
            runs = []
            for _ in range(iters):
                start = time.perf_counter()
                postprocess_image(*captured["args"], **kwargs)
                runs.append(time.perf_counter() - start)
            alone[name] = _median(runs)
    return alone


def _unwrapped_postprocess():
    from hierseg_d2.modeling.meta_arch.postprocessing import postprocess_image

    return postprocess_image


def _random_train_inputs(batch, height, width, num_classes, seed=0):
    import torch
    from detectron2.structures import Instances

    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        masks = torch.zeros(3, height, width, dtype=torch.bool)
        for k in range(3):
            y0, x0 = int(torch.randint(0, height // 2, (1,), generator=g)), int(torch.randint(0, width // 2, (1,), generator=g))
            masks[k, y0:y0 + height // 2, x0:x0 + width // 2] = True
        inst = Instances((height, width))
        inst.gt_masks = masks
        inst.gt_classes = torch.randint(0, num_classes, (3,), generator=g)
        inputs.append({"image": torch.rand(3, height, width, generator=g) * 255, "instances": inst})
    return inputs


def run_train(args):
    import torch

    analyze, cfg = _worker_cfg(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from detectron2.modeling import build_model

    model = build_model(cfg).train()
    timer = PartTimer()
    instrument(model, timer)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    height, width = args.train_size
    inputs = _random_train_inputs(args.train_batch, height, width, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    totals, cpus, parts = [], [], []
    for i in range(args.iters + 1):
        timer.reset()
        cpu, start = _cpu_seconds(), time.perf_counter()
        losses = model(inputs)
        forward = time.perf_counter() - start
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        backward = time.perf_counter() - start - forward
        optimizer.step()
        elapsed = time.perf_counter() - start
        if i:
            totals.append(elapsed)
            cpus.append(_cpu_seconds() - cpu)
            parts.append(dict(_finish_parts(timer.times), forward=forward, backward=backward))
    return {"size": [height, width], "batch": args.train_batch, "threads": torch.get_num_threads(),
            "total": _median(totals), "cpu": _median(cpus), "runs": totals, "cpu_runs": cpus, "parts": {k: _median([p.get(k, 0.0) for p in parts]) for k in TRAIN_PARTS},
            "peak_rss": _peak_rss_bytes(), "iters": args.iters, "loss": float(loss)}


# --------------------------------------------------------------------------------------------------- parent
WORKER_SETTINGS = ["config_file", "threads", "iters", "train_size", "train_batch", "no_flops", "fold_bn",
                   "channels_last", "opts"]


def _subprocess(args, worker, size=None):
    settings = {name: getattr(args, name) for name in WORKER_SETTINGS}
    settings.update(worker=worker, size=size)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-args", json.dumps(settings)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    root = os.path.abspath(args.code_root)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {worker} {size or ''} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCHMARK ")]
    if not lines:
        raise RuntimeError(f"benchmark worker {worker} printed no result:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len("BENCHMARK "):])


def _output_opts(outputs: str):
    names = {s.strip() for s in outputs.split(",") if s.strip()}
    unknown = names - set(POST_PARTS)
    if unknown or not names:
        raise SystemExit(f"--outputs {outputs!r}: expected a comma-separated subset of {','.join(POST_PARTS)}")
    return ["MODEL.MASK_FORMER.TEST.SEMANTIC_ON", str("semantic" in names),
            "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", str("panoptic" in names),
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", str("instance" in names)]


def format_report(results) -> str:
    lines = []
    load = results.get("load")
    lines.append(f"config: {results['config']}  code: {results.get('code_root', ROOT)}" + "".join(f"  {k}" for k in ["fold_bn", "channels_last"]
                                                           if results.get(k)))
    lines.append(f"threads: {results['threads']}  OMP_WAIT_POLICY={results['omp_wait_policy']}  "
                 f"load average before: {load}  runs: median of {results['iters']} after 1 warm-up")
    infer = results["inference"]
    if infer:
        lines.append(f"params: {infer[0]['params'] / 1e6:.2f}M")
        head = f"{'inference':<22}" + "".join(f"{'x'.join(map(str, r['size'])):>14}" for r in infer)
        lines.append(head)

        def row(name, values, fmt):
            lines.append(f"{name:<22}" + "".join(f"{fmt(v):>14}" for v in values))
        row("GFLOPs", [r["flops"] for r in infer], lambda v: "-" if v is None else f"{v / 1e9:.1f}")
        row("latency (s)", [r["total"] for r in infer], lambda v: f"{v:.3f}")
        row("CPU time (s)", [r["cpu"] for r in infer], lambda v: f"{v:.3f}")
        row("peak RSS (GB)", [r["peak_rss"] for r in infer], lambda v: f"{v / 1e9:.2f}")
        for part in INFER_PARTS:
            row(f"  {part} (s)", [r["parts"][part] for r in infer], lambda v: f"{v:.3f}")
        row("  above backbone (%)", [100 * (r["total"] - r["parts"]["backbone"]) / r["total"] for r in infer],
            lambda v: f"{v:.0f}")
        for part in POST_PARTS:
            row(f"  {part} alone (s)", [r["postprocess_alone"][part] for r in infer],
                lambda v: "-" if v is None else f"{v:.3f}")
    train = results.get("train")
    if train:
        lines.append(f"training step, batch {train['batch']} at {'x'.join(map(str, train['size']))}: "
                     f"{train['total']:.3f} s (CPU {train['cpu']:.3f} s), peak RSS {train['peak_rss'] / 1e9:.2f} GB")
        lines.append("  steps (s): " + ", ".join(f"{w:.3f} (CPU {c:.3f})" for w, c in zip(train["runs"],
                                                                                       train["cpu_runs"])))
        lines.append("  " + ", ".join(f"{k} {v:.3f} s" for k, v in train["parts"].items()))
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker-args"]:  # a worker: settings parsed and checked by the parent (_subprocess)
        args = argparse.Namespace(**json.loads(argv[1]))
        args.size = tuple(args.size) if args.size else None
        args.train_size = tuple(args.train_size)
        result = run_infer(args) if args.worker == "infer" else run_train(args)
        print("BENCHMARK " + json.dumps(result), flush=True)
        return result
    args = get_parser().parse_args(argv)
    if args.iters < 1 or args.threads < 1:
        raise SystemExit("--iters and --threads must be >= 1")
    args.opts = _output_opts(args.outputs) + list(args.opts)
    results = {"config": args.config_file, "code_root": os.path.abspath(args.code_root), "threads": args.threads,
               "iters": args.iters,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "fold_bn": args.fold_bn,
               "channels_last": args.channels_last,
               "load": " ".join(f"{v:.2f}" for v in os.getloadavg()), "inference": [], "train": None}
    for size in args.sizes:
        results["inference"].append(_subprocess(args, "infer", size))
    if not args.skip_train:
        results["train"] = _subprocess(args, "train")
    results["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(format_report(results) + f"\nload average after: {results['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
