"""Helpers shared by the dataset registrations: (re-)registering a name and failing clearly on missing files."""

import functools
import os
from typing import Callable, Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["datasets_root", "register_dataset", "require_paths", "with_required_paths"]

_README = "datasets/README.md"


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` or ``./datasets``: where Detectron2 (and we) expect datasets."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_dataset(name: str, loader: Callable[[], list], **metadata) -> None:
    """Register ``name`` (replacing an existing registration, so a root can be switched, e.g. in tests)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    MetadataCatalog.pop(name, None)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def require_paths(dataset_name: str, paths: Iterable[str], how_to_prepare: str) -> None:
    """Raise FileNotFoundError naming the first missing path and how to create it."""
    for p in paths:
        if p and not os.path.exists(p):
            raise FileNotFoundError(
                f"Dataset '{dataset_name}' needs '{p}', which does not exist. {how_to_prepare} "
                f"(layout: {_README}; set $DETECTRON2_DATASETS to the directory holding the datasets)."
            )


def with_required_paths(dataset_name: str, loader: Callable[[], list], paths, how_to_prepare: str):
    """Wrap a DatasetCatalog loader so that it first checks ``paths`` (see :func:`require_paths`)."""

    @functools.wraps(loader)
    def checked_loader():
        require_paths(dataset_name, paths, how_to_prepare)
        return loader()

    return checked_loader

