"""Bad input: converted, padded, skipped with a logged warning, or a clear error naming the file --
never a bare traceback from a data-loader worker."""

import logging
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, build_detection_train_loader
from PIL import Image

from hierseg_d2.data.dataset_mappers import (
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    SkipBadSamples,
    build_mapper,
)

from test_mask_former_mappers import make_cfg  # noqa: E402  (same directory)


@pytest.fixture
def bad_records(shapes_root, tmp_path):
    """Semantic records: good ones plus each kind of bad input, keyed by kind."""
    good = DatasetCatalog.get("shapes_train_sem_seg")
    src = good[0]
    img = Image.open(src["file_name"])
    sem = Image.open(src["sem_seg_file_name"])
    d = str(tmp_path)

    def rec(name, image=None, label=None):
        f, s = os.path.join(d, name + ".png"), os.path.join(d, name + "_sem.png")
        if image is not None:
            image.save(f)
        (label if label is not None else sem).save(s)
        return {"file_name": f, "sem_seg_file_name": s}

    corrupt = os.path.join(d, "corrupt.jpg")
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    unknown = np.array(sem).copy()
    unknown[:5, :5] = 200  # not one of the 12 classes
    return {
        "good": good,
        "corrupt": {"file_name": corrupt, "sem_seg_file_name": src["sem_seg_file_name"]},
        "missing": {"file_name": os.path.join(d, "missing.jpg"), "sem_seg_file_name": src["sem_seg_file_name"]},
        "gray": rec("gray", img.convert("L")),
        "rgba": rec("rgba", img.convert("RGBA")),
        "small": rec("small", img.resize((24, 20)), sem.resize((24, 20), Image.NEAREST)),
        "unknown_class": rec("unknown", img, Image.fromarray(unknown)),
        "no_segments": rec("empty", img, Image.fromarray(np.full(np.array(sem).shape, 255, np.uint8))),
    }


def _semantic_mapper():
    return MaskFormerSemanticDatasetMapper(make_cfg("shapes_train_sem_seg", "mask_former_semantic"), True)


def test_corrupt_and_missing_images_fail_naming_the_file(bad_records):
    mapper = _semantic_mapper()
    with pytest.raises(OSError, match="corrupt.jpg"):
        mapper(bad_records["corrupt"])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        mapper(bad_records["missing"])


def test_grayscale_and_rgba_become_rgb(bad_records):
    mapper = MaskFormerSemanticDatasetMapper(
        True, augmentations=[], image_format="RGB", ignore_label=255, size_divisibility=-1, num_classes=12
    )
    gray = mapper(bad_records["gray"])["image"]
    assert gray.shape[0] == 3 and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgba = mapper(bad_records["rgba"])["image"]
    ref = np.asarray(Image.open(bad_records["good"][0]["file_name"]).convert("RGB"))
    np.testing.assert_array_equal(rgba.permute(1, 2, 0).numpy(), ref)


def test_image_smaller_than_32px_is_padded(bad_records):
    out = _semantic_mapper()(bad_records["small"])  # resized up, cropped, padded to 128
    assert out["image"].shape[-2:] == (128, 128) and out["sem_seg"].shape == (128, 128)
    plain = MaskFormerSemanticDatasetMapper(
        True, augmentations=[], image_format="RGB", ignore_label=255, size_divisibility=32, num_classes=12
    )(bad_records["small"])
    assert plain["image"].shape[-2:] == (32, 32)
    assert (plain["sem_seg"][20:] == 255).all() and (plain["sem_seg"][:, 24:] == 255).all()
    assert len(plain["instances"]) > 0


def test_unknown_class_becomes_ignore_with_warning(bad_records, caplog):
    mapper = MaskFormerSemanticDatasetMapper(
        True, augmentations=[], image_format="RGB", ignore_label=255, size_divisibility=-1, num_classes=12
    )
    with caplog.at_level(logging.WARNING):
        out = mapper(bad_records["unknown_class"])
    assert (out["sem_seg"][:5, :5] == 255).all() and 200 not in out["instances"].gt_classes.tolist()
    assert "unknown.png" in caplog.text and "200" in caplog.text


def test_no_segments_gives_empty_targets(bad_records, shapes_root):
    out = _semantic_mapper()(bad_records["no_segments"])
    assert len(out["instances"]) == 0 and out["instances"].gt_masks.shape == (0, 128, 128)
    rec = dict(DatasetCatalog.get("shapes_train_panoptic")[0], segments_info=[])
    out = MaskFormerPanopticDatasetMapper(make_cfg("shapes_train_panoptic"), True)(rec)
    assert len(out["instances"]) == 0 and (out["sem_seg"] == 255).all()


def _loader(records, num_workers):
    cfg = make_cfg("shapes_train_sem_seg", "mask_former_semantic")
    return build_detection_train_loader(
        records,
        mapper=build_mapper(cfg, True),
        total_batch_size=2,
        aspect_ratio_grouping=False,
        num_workers=num_workers,
    )


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_skips_bad_samples(bad_records, caplog, num_workers):
    kinds = ["corrupt", "missing", "gray", "rgba", "small", "unknown_class", "no_segments"]
    records = bad_records["good"][:3] + [bad_records[k] for k in kinds]
    seen = []
    with caplog.at_level(logging.WARNING):
        for _, batch in zip(range(8), _loader(records, num_workers)):
            for x in batch:
                assert x["image"].shape == (3, 128, 128) and x["sem_seg"].shape == (128, 128)
                seen.append(os.path.basename(x["file_name"]))
    assert len(seen) == 16
    assert "corrupt.jpg" not in seen and "missing.jpg" not in seen
    if num_workers == 0:  # worker processes log in their own process
        assert "Skipping sample" in caplog.text and "corrupt.jpg" in caplog.text


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_fails_clearly_when_everything_is_broken(bad_records, num_workers):
    broken = [dict(bad_records["missing"], file_name=f"/nonexistent/img{i}.jpg") for i in range(8)]
    with pytest.raises(RuntimeError, match=r"in a row failed to load.*/nonexistent/img"):
        next(iter(_loader(broken, num_workers)))


def test_skip_bad_samples_counts_and_resets():
    calls = []

    def mapper(d):
        calls.append(d["file_name"])
        if d["file_name"].startswith("bad"):
            raise ValueError("boom")
        return d

    wrapped = SkipBadSamples(mapper, max_consecutive_failures=3)
    assert wrapped({"file_name": "bad1"}) is None and wrapped({"file_name": "bad2"}) is None
    assert wrapped({"file_name": "ok"}) == {"file_name": "ok"}  # resets the run of failures
    assert wrapped({"file_name": "bad3"}) is None and wrapped({"file_name": "bad4"}) is None
    assert (wrapped.num_seen, wrapped.num_skipped) == (5, 4)
    with pytest.raises(RuntimeError, match="3 training samples in a row.*bad5"):
        wrapped({"file_name": "bad5"})
    strict = SkipBadSamples(mapper, skip=False)
    with pytest.raises(RuntimeError, match="Failed to map bad6: ValueError: boom"):
        strict({"file_name": "bad6"})
