"""The shared checkpoint-conversion steps (hierseg_d2/modeling/backbone/convert.py); each family's own
mapping is tested with the authors' layouts in its test file."""
import pickle

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from hierseg_d2.modeling.backbone.convert import (
    check_against_model,
    load_state_dict,
    naming_file,
    save_d2_checkpoint,
    split_state_dict,
)


def test_load_unwraps_checkpoints_and_names_the_file_at_fault(tmp_path):
    weights = {"a.weight": torch.randn(2, 3)}
    torch.save({"state_dict": {"model": weights}, "epoch": 3}, tmp_path / "nested.pth")
    assert torch.equal(load_state_dict(str(tmp_path / "nested.pth"))["a.weight"], weights["a.weight"])
    with open(tmp_path / "numpy.pkl", "wb") as f:  # a Detectron2-style pickle of numpy arrays
        pickle.dump({"model": {"a.weight": weights["a.weight"].numpy()}}, f)
    assert torch.equal(load_state_dict(str(tmp_path / "numpy.pkl"))["a.weight"], weights["a.weight"])
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth"):
        load_state_dict(str(tmp_path / "list.pth"))


def test_split_strips_prefixes_drops_heads_and_rejects_foreign_names():
    sd = {"module.backbone.stem.w": torch.zeros(1), "module.head.fc.w": torch.zeros(1), "blk.0.unused": torch.zeros(1)}
    kept, dropped = split_state_dict(sd, keep=("stem.", "blk."), drop=("head.",), drop_suffixes=(".unused",))
    assert list(kept) == ["stem.w"] and dropped == ["module.head.fc.w", "blk.0.unused"]
    with pytest.raises(KeyError, match="decoder.w"), naming_file("ckpt.pth"):
        split_state_dict({"stem.w": torch.zeros(1), "decoder.w": torch.zeros(1)}, keep=("stem.",))


def test_check_against_model_reports_new_parameters_and_rejects_mismatches():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3)}
    assert check_against_model({"a": torch.ones(2)}, expected, "x", allow_missing=True) == ["b"]
    with pytest.raises(KeyError, match="missing \\['b'\\]"):
        check_against_model({"a": torch.ones(2)}, expected, "x")
    with pytest.raises(KeyError, match="unexpected \\['c'\\]"):
        check_against_model({"a": torch.ones(2), "c": torch.ones(1)}, expected, "x", allow_missing=True)
    with pytest.raises(ValueError, match="'a' has shape \\(4,\\)"):
        check_against_model({"a": torch.ones(4), "b": torch.ones(3)}, expected, "x")


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_saved_checkpoint_loads_strictly_by_exact_names(tmp_path, suffix):
    model = nn.Module()
    model.backbone = nn.Linear(3, 2)
    source = {f"backbone.{k}": torch.randn_like(v) for k, v in model.backbone.state_dict().items()}
    out = save_d2_checkpoint(source, str(tmp_path / f"ckpt{suffix}"), "test")
    assert out["matching_heuristics"] is False and isinstance(out["model"]["backbone.weight"],
                                                              np.ndarray if suffix == ".pkl" else torch.Tensor)
    DetectionCheckpointer(model).load(str(tmp_path / f"ckpt{suffix}"))  # as MODEL.WEIGHTS is loaded
    for name, value in model.state_dict().items():  # every tensor arrived under its exact name
        torch.testing.assert_close(value, source[name])
