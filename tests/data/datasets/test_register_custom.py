"""Pieces of the custom-dataset registration: images matched by stem, colours, --register imports."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from hierseg_d2.data.datasets import import_registrations, load_coco_panoptic_json, panoptic_metadata
from hierseg_d2.data.datasets.utils import default_color, images_by_stem

CATS = [{"id": 5, "name": "road", "isthing": 0}, {"id": 3, "name": "car", "isthing": 1}]


def test_panoptic_annotations_without_image_entries_find_images_of_any_extension(tmp_path):
    (tmp_path / "img" / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "sub" / "b.JPG")
    ann = [{"image_id": i, "file_name": f, "segments_info": [{"id": 1, "category_id": 3}]}
           for i, f in enumerate(["a.png", "sub/b.png"])]
    path = tmp_path / "pan.json"
    path.write_text(json.dumps({"annotations": ann, "categories": CATS}))
    records = load_coco_panoptic_json(str(path), str(tmp_path / "img"), str(tmp_path / "pan"), None,
                                      panoptic_metadata(CATS))
    assert [os.path.relpath(r["file_name"], tmp_path / "img") for r in records] == ["a.png", "sub/b.JPG"]
    assert records[0]["segments_info"][0]["category_id"] == 0  # car: the only thing, first
    path.write_text(json.dumps({"annotations": ann + [dict(ann[0], file_name="c.png")], "categories": CATS}))
    with pytest.raises(FileNotFoundError, match="'c.png' has no entry in 'images'.*no image named c"):
        load_coco_panoptic_json(str(path), str(tmp_path / "img"), str(tmp_path / "pan"), None,
                                panoptic_metadata(CATS))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    with pytest.raises(ValueError, match="two images share the name 'a'"):
        images_by_stem(str(tmp_path / "img"))


def test_generated_colours_are_distinct_and_json_colours_kept():
    colours = [tuple(default_color(i)) for i in range(200)]
    assert len(set(colours)) == 200 and all(0 <= v <= 255 for c in colours for v in c)
    meta = panoptic_metadata([dict(CATS[0], color=[1, 2, 3]), CATS[1]])
    assert meta["stuff_colors"][1] == [1, 2, 3] and meta["thing_colors"] == [default_color(0)]


def test_register_imports_files_once_and_modules(tmp_path, monkeypatch):
    f = tmp_path / "reg.py"
    f.write_text("COUNT = globals().get('COUNT', 0) + 1\nimport builtins\n"
                 "builtins._hierseg_reg_calls = getattr(builtins, '_hierseg_reg_calls', 0) + 1\n")
    import builtins

    (mod,) = import_registrations([str(f)])
    again = import_registrations([str(f), ""])
    assert again == [mod] and builtins._hierseg_reg_calls == 1
    monkeypatch.syspath_prepend(str(tmp_path))
    (by_name,) = import_registrations(["reg"])
    assert by_name.__name__ == "reg" and builtins._hierseg_reg_calls == 2
