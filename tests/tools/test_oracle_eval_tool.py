"""tools/oracle_eval.py (called by `make demo` before training): prints the oracle tables."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_oracle_eval_prints_tables(shapes_root, capsys):
    spec = importlib.util.spec_from_file_location("oracle_eval", os.path.join(REPO, "tools", "oracle_eval.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    results = tool.main(["--root", shapes_root])
    out = capsys.readouterr().out
    assert "| ground truth " in out and "| shifted by 3 px" in out
    gt, bad = results["ground truth"], results["shifted by 3 px"]
    assert gt["panoptic_seg"]["PQ"] == pytest.approx(100.0) and gt["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert bad["panoptic_seg"]["PQ"] < 100.0
