"""The separable power-of-two bilinear upsampling against F.interpolate of the whole stack, bit for bit."""
import pytest
import torch
import torch.nn.functional as F

from hierseg_d2.modeling.meta_arch import bilinear
from hierseg_d2.modeling.meta_arch.bilinear import exact_upsampling_available, upsample_rows


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-for-bit comparisons (conftest.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maps,size,ratio", [
    (100, (25, 38), 4),  # COCO-like: 100 queries at stride 4 of a 100x152 image
    (7, (1, 70), 4), (7, (2, 70), 4), (5, (40, 1), 4),  # one decoded row / column: clamped indices
    (4, (33, 50), 2), (2, (9, 20), 8), (1, (30, 40), 4), (25, (17, 23), 4)])
def test_upsample_rows_equals_interpolate(maps, size, ratio, dtype):
    x = (torch.randn(maps, *size, generator=torch.Generator().manual_seed(0)) * 10).to(dtype)
    x[0, 0, 0] = -0.0  # signed zeros and exact zeros pass through the clamped border unchanged
    whole = F.interpolate(x[None], scale_factor=ratio, mode="bilinear", align_corners=False)[0]
    height, width = whole.shape[-2:]
    assert height + width > 128  # PyTorch's channels-first kernel (the one this form reproduces)
    for chunk in (1, 3, 5, 16, height):
        edges = list(range(0, height, chunk)) + [height]
        for cols in (width, width - 3):
            got = torch.cat([upsample_rows(x, ratio, a, b, cols) for a, b in zip(edges[:-1], edges[1:])], 1)
            assert torch.equal(got, whole[..., :cols]), (chunk, cols)
    y1 = min(7, height)
    out = torch.full((maps, y1 - 1, width), float("nan"), dtype=dtype)
    assert upsample_rows(x, ratio, 1, y1, width, out=out) is out and torch.equal(out, whole[:, 1:y1])


def test_available_here_and_not_on_gpus():
    """The CPU this project runs on (and CI, a machine like it) takes the fast path; GPUs never do."""
    assert exact_upsampling_available("cpu", torch.float32)
    assert exact_upsampling_available("cpu", torch.float64)
    assert not exact_upsampling_available("cuda", torch.float32)


def test_probe_rejects_a_form_that_rounds_differently(monkeypatch):
    """Without the fused multiply-add (a product and a sum, both rounded) the results differ from
    F.interpolate in the last bit, and the probe must say so."""
    def unfused(first, second, l0, l1, out):
        torch.add(first * l0, second * l1, out=out)

    monkeypatch.setattr(bilinear, "_combine", unfused)
    exact_upsampling_available.cache_clear()
    try:
        assert not exact_upsampling_available("cpu", torch.float32)
    finally:
        exact_upsampling_available.cache_clear()


@pytest.mark.parametrize("args", [(3, 0, 4, 10), (4, 0, 41, 10), (4, 5, 5, 10), (4, 0, 4, 41)])
def test_bad_arguments(args):
    ratio, y0, y1, width = args
    with pytest.raises(ValueError, match="upsample_rows"):
        upsample_rows(torch.zeros(2, 10, 10), ratio, y0, y1, width)


def test_upsample_rows_with_two_threads():
    """Both sides split their work over threads: still the same elements, bit for bit."""
    torch.set_num_threads(2)  # the one_thread fixture restores the count afterwards
    x = torch.randn(40, 30, 50, generator=torch.Generator().manual_seed(3)) * 10
    whole = F.interpolate(x[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    got = torch.cat([upsample_rows(x, 4, y, min(y + 16, 120), 200) for y in range(0, 120, 16)], 1)
    assert torch.equal(got, whole)
