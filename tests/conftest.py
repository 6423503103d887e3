"""Fixtures shared by every test area (keep this file minimal)."""

import pytest

# Small shapes dataset for tests: big enough for a few training iterations and an oracle evaluation.
SHAPES_TEST_IMAGES = {"train": 16, "val": 8}


@pytest.fixture(scope="session")
def shapes_session_root(tmp_path_factory):
    """A temporary DETECTRON2_DATASETS root holding a small shapes dataset (16 train / 8 val),
    generated once per session."""
    from hierseg_d2.data.datasets import ensure_shapes_dataset

    root = str(tmp_path_factory.mktemp("datasets"))
    ensure_shapes_dataset(root, SHAPES_TEST_IMAGES, progress=False)
    return root


@pytest.fixture
def shapes_root(shapes_session_root):
    """Point every ``shapes_*`` registered name at the small session dataset (re-done for each test,
    since other tests may re-register the names) and return its root."""
    from hierseg_d2.data.datasets import register_all_shapes

    register_all_shapes(shapes_session_root, SHAPES_TEST_IMAGES, progress=False)
    return shapes_session_root
