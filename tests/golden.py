"""Loading the golden fixtures (tests/fixtures/golden/*.pt, made by tools/golden_fixtures/) in tests."""
import os
from typing import Any, Dict

import torch

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "golden")


def load_fixture(name: str) -> Dict[str, Any]:
    """The fixture ``name`` (tensors and plain containers; never unpickles code)."""
    path = os.path.join(FIXTURE_DIR, f"{name}.pt")
    assert os.path.isfile(path), f"golden fixture {path} is missing: run tools/golden_fixtures/ (docs/fidelity.md)"
    content = torch.load(path, map_location="cpu", weights_only=True)
    assert content.get("commit"), f"{path} does not name the release commit it was made from"
    return content


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()
