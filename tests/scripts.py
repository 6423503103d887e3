"""The project's scripts (tools/*.py, demo/*.py, datasets/*.py) as modules in tests: their file names
(``convert-mit-to-d2.py``) are not importable names."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """The module of ``REPO/relpath``, executed afresh (each call gives a new module)."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
