"""tools/benchmark.py in its fast form: a tiny shapes model at a tiny size, one timed run. Checks that the
table has every part with sensible numbers (parts nested in the total, peak RSS of a real process)."""
import math

from tests.scripts import load_script

TINY = ["MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "10",
        "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64"]


def test_fast_benchmark_reports_every_part(capsys, tmp_path):
    benchmark = load_script("tools/benchmark.py")
    results = benchmark.main(["--config-file", "configs/shapes/hcformer_R18_s16_shapes.yaml", "--sizes", "48x64",
                              "--train-size", "32x32", "--iters", "1", "--threads", "1",
                              "--json", str(tmp_path / "b.json"), *TINY])
    out = capsys.readouterr().out
    (infer,), train = results["inference"], results["train"]
    assert infer["size"] == [48, 64] and infer["threads"] == 1
    assert 1e5 < infer["params"] < 5e7 and infer["flops"] > 1e6
    assert 5e7 < infer["peak_rss"] < 8e9 and 5e7 < train["peak_rss"] < 8e9  # bytes of a real process
    assert set(infer["parts"]) == set(benchmark.INFER_PARTS)
    assert all(v >= 0 for v in infer["parts"].values()) and infer["parts"]["backbone"] > 0
    # one run: the parts are disjoint pieces of the total
    assert sum(infer["parts"].values()) <= infer["total"] + 1e-6
    assert set(infer["postprocess_alone"]) == {"semantic", "panoptic", "instance"}
    assert all(v is not None and v >= 0 for v in infer["postprocess_alone"].values())
    assert set(train["parts"]) == set(benchmark.TRAIN_PARTS) and math.isfinite(train["loss"])
    # CPU time of each timed run, next to its wall time; the workers ran this checkout's hierseg_d2
    for r in (infer, train):
        assert len(r["runs"]) == len(r["cpu_runs"]) == 1 and r["total"] == r["runs"][0]
        assert 0 < r["cpu"] == r["cpu_runs"][0]
    assert results["code_root"] == benchmark.ROOT
    forward_parts = [train["parts"][k] for k in ["backbone", "clustering", "decoder", "head_other", "decoding",
                                                  "criterion"]]
    assert sum(forward_parts) <= train["parts"]["forward"] + 1e-6
    assert train["parts"]["forward"] + train["parts"]["backward"] <= train["total"] + 1e-6
    for text in ["threads: 1", "OMP_WAIT_POLICY", "load average", "latency (s)", "peak RSS (GB)", "GFLOPs",
                 "backbone", "clustering", "decoder", "decoding", "postprocess", "semantic alone", "CPU time (s)",
                 "panoptic alone", "instance alone", "training step, batch 2 at 32x32", "steps (s):"]:
        assert text in out, text
    assert (tmp_path / "b.json").exists()


def test_bad_size_is_a_clear_error(capsys):
    benchmark = load_script("tools/benchmark.py")
    try:
        benchmark.main(["--sizes", "800by1216"])
    except SystemExit:
        pass
    assert "800by1216" in capsys.readouterr().err
