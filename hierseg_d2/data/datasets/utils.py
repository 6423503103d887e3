"""Helpers shared by the dataset registrations: (re-)registering a name and failing clearly on missing files."""

import colorsys
import functools
import os
from typing import Callable, Dict, Iterable, List

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["datasets_root", "register_dataset", "require_paths", "with_required_paths", "default_color",
           "images_by_stem", "IMAGE_EXTENSIONS"]

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



# what Detectron2's read_image (PIL) reads; matched case-insensitively
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def default_color(i: int) -> List[int]:
    """A distinct RGB colour for class ``i`` (golden-ratio hues), for categories that bring none."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.25 * (i % 3 == 2))
    return [int(round(255 * v)) for v in (r, g, b)]


def images_by_stem(image_dir: str, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> Dict[str, str]:
    """``{path relative to image_dir without extension: path}`` of every image under ``image_dir``
    (recursively), so that annotations can be matched to images of any extension. Two images with the
    same stem (``a.jpg`` and ``a.png``) are ambiguous: ValueError naming both."""
    exts = tuple(e.lower() for e in extensions)
    found: Dict[str, str] = {}
    for dirpath, _, files in os.walk(image_dir):
        for f in sorted(files):
            if not f.lower().endswith(exts):
                continue
            path = os.path.join(dirpath, f)
            stem = os.path.splitext(os.path.relpath(path, image_dir))[0]
            if stem in found:
                raise ValueError(f"{image_dir}: two images share the name {stem!r}: {found[stem]} and {path}")
            found[stem] = path
    return found
