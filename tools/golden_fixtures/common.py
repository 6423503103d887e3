"""Plumbing shared by the golden-fixture scripts in this folder.

Each script builds an authors' release's own model classes from a local checkout of the release (the path
comes from an environment variable, never from the network), runs them on fixed random weights and
inputs, and saves weights + inputs + outputs as plain tensors under ``tests/fixtures/golden/``. The
tests load them with ``torch.load(weights_only=True)``, convert the weights with our converters and
compare our outputs. The scripts are run by hand (documented in docs/fidelity.md), not in CI.
"""
import os
import subprocess
import sys
from typing import Any, Dict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE_DIR = os.path.join(ROOT, "tests", "fixtures", "golden")

__all__ = ["FIXTURE_DIR", "release_checkout", "release_commit", "save_fixture"]


def release_checkout(env_var: str, repo: str) -> str:
    """The release checkout named by ``env_var``, put first on ``sys.path``; exits with a message if unset."""
    path = os.environ.get(env_var, "")
    if not path or not os.path.isdir(path):
        raise SystemExit(f"set {env_var} to a git checkout of the release github.com/{repo} "
                         f"(got {path!r})")
    path = os.path.abspath(path)
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


def release_commit(path: str) -> str:
    """The commit of the checkout at ``path`` (recorded in every fixture)."""
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"{path} is not a git checkout, so its commit cannot be recorded: {e}")


def _check_plain(value: Any, where: str) -> None:
    # Fixtures must load with weights_only=True: tensors and plain containers only.
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"fixture key {where}.{k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"fixture entry {where} has type {type(value).__name__}; only tensors and plain "
                    f"containers can be saved")


def save_fixture(name: str, content: Dict[str, Any], repo: str, commit: str) -> str:
    """Write ``tests/fixtures/golden/<name>.pt`` holding ``content`` plus the release's name and commit."""
    content = dict(content, release=repo, commit=commit)
    _check_plain(content, name)
    os.makedirs(FIXTURE_DIR, exist_ok=True)
    path = os.path.join(FIXTURE_DIR, f"{name}.pt")
    torch.save(content, path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, {repo} @ {commit[:12]})")
    return path
