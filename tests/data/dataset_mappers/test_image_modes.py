"""Unusual image modes read correctly (16-bit, 32-bit, float, CMYK, palette) or refused naming the file;
truncated files named; ground-truth / image size mismatches caught in the mappers, naming both files, in
training and in evaluation (before the inference pass)."""
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from hierseg_d2.data.dataset_mappers import MaskFormerPanopticDatasetMapper, MaskFormerSemanticDatasetMapper
from hierseg_d2.data.dataset_mappers import build_mapper
from hierseg_d2.data.dataset_mappers.utils import read_image_file

from test_mask_former_mappers import make_cfg  # noqa: E402  (same directory)


def test_16_bit_gray_png_is_scaled_not_clipped_to_white(tmp_path):
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    path = str(tmp_path / "gray16.png")
    cv2.imwrite(path, ramp)
    assert Image.open(path).mode == "I;16"
    img = read_image_file(path, "RGB")
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    expected = np.rint(ramp * (255.0 / 65535.0))
    assert np.abs(img[..., 0].astype(int) - expected).max() <= 0  # exact 8-bit reading of the 16-bit values
    assert (img[..., 0] == img[..., 2]).all()
    assert img.min() == 0 and 200 < img.max() < 255  # neither clipped to white nor to black
    bgr = read_image_file(path, "BGR")
    assert (bgr == img[..., ::-1]).all()


def test_16_bit_colour_float_cmyk_and_palette(tmp_path):
    colour = np.zeros((8, 8, 3), np.uint16)
    colour[..., 0] = 65535  # blue in OpenCV's BGR
    cv2.imwrite(str(tmp_path / "c16.png"), colour)
    assert (read_image_file(str(tmp_path / "c16.png"), "RGB")[0, 0] == [0, 0, 255]).all()

    f = Image.fromarray(np.full((6, 6), 0.5, np.float32), "F")
    f.save(tmp_path / "f.tiff")
    assert (read_image_file(str(tmp_path / "f.tiff"), "RGB") == 128).all()
    Image.fromarray(np.full((6, 6), 7.0e3, np.float32), "F").save(tmp_path / "bad_f.tiff")
    with pytest.raises(ValueError, match=r"bad_f.tiff: floating-point pixels in \[7000, 7000\]"):
        read_image_file(str(tmp_path / "bad_f.tiff"), "RGB")

    Image.new("CMYK", (5, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red
    rgb = read_image_file(str(tmp_path / "cmyk.jpg"), "RGB")
    assert rgb.shape == (4, 5, 3) and rgb[..., 0].min() > 200 and rgb[..., 1:].max() < 60

    p = Image.new("P", (4, 4))
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png")
    assert read_image_file(str(tmp_path / "p.png"), "RGB")[1, 1].tolist() == [10, 200, 30]


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    cv2.imwrite(str(good), np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:600])
    with pytest.raises(OSError, match=rf"(?i)cannot read image {cut}: .*truncated"):
        read_image_file(str(cut), "RGB")


@pytest.fixture
def mismatched(shapes_root, tmp_path):
    """A panoptic+semantic record whose label PNGs are 8 px narrower than the image."""
    rec = dict(DatasetCatalog.get("shapes_train_panoptic_with_sem_seg")[0])
    for key in ("pan_seg_file_name", "sem_seg_file_name"):
        label = Image.open(rec[key])
        small = tmp_path / f"small_{key}.png"
        label.crop((0, 0, label.width - 8, label.height)).save(small)
        rec[key] = str(small)
    return rec


def test_size_mismatch_in_training_names_both_files(mismatched):
    rec = dict(mismatched)
    panoptic = MaskFormerPanopticDatasetMapper(make_cfg(), True)
    with pytest.raises(ValueError) as info:
        panoptic(dict(rec))
    assert rec["file_name"] in str(info.value) and rec["pan_seg_file_name"] in str(info.value)
    semantic = MaskFormerSemanticDatasetMapper(make_cfg("shapes_train_sem_seg", "mask_former_semantic"), True)
    rec = {"file_name": rec["file_name"], "sem_seg_file_name": rec["sem_seg_file_name"]}
    with pytest.raises(ValueError) as info:
        semantic(dict(rec))
    assert rec["file_name"] in str(info.value) and rec["sem_seg_file_name"] in str(info.value)


def test_size_mismatch_in_evaluation_is_caught_before_inference(mismatched):
    mapper = build_mapper(make_cfg(), False)
    with pytest.raises(RuntimeError) as info:
        mapper(dict(mismatched))
    msg = str(info.value)
    assert mismatched["file_name"] in msg and "small_sem_seg_file_name.png" in msg
    good = DatasetCatalog.get("shapes_val_panoptic_with_sem_seg")[0]
    assert mapper(dict(good))["image"].shape[0] == 3  # matching sizes pass
    assert os.path.exists(good["pan_seg_file_name"])
