"""tools/benchmark_export.py on the demo config at a small size (the R50 figures are in docs/deployment.md)."""
from tests.export.models import ONE_LAYER, R18_CONFIG
from tests.scripts import load_script


def test_prints_pytorch_and_onnxruntime_latency(capsys):
    tool = load_script("tools/benchmark_export.py")
    result = tool.main(["--config-file", R18_CONFIG, "--size", "96x128", "--iters", "1"] + ONE_LAYER)
    out = capsys.readouterr().out
    assert "| pytorch |" in out and "| onnx |" in out and "load average" in out
    assert set(result["rows"]) == {"pytorch", "onnx"} and result["threads"] == 1
    assert all(v["network"] > 0 and v["full"] > 0 for v in result["rows"].values())
