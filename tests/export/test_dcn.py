"""DCNv2 for export: the standard-op form against torchvision, the DeformConv symbolic against ONNX's
reference implementation, and the onnxruntime probe."""
import io

import numpy as np
import pytest
import torch
import torchvision

from hierseg_d2.export.dcn import (DEFORMCONV_OPSET, dcn_implementation, deform_conv2d_grid_sample,
                                   onnxruntime_supports_deformconv, register_deformconv_symbolic)
from hierseg_d2.modeling.backbone import resnet_dcn

# (kernel, stride, padding, dilation, offset groups, height, width): the backbone's 3x3 / 1x1 stride-2
# layers, offset groups, dilation, and maps of one row and odd sizes
CASES = [(3, 2, 1, 1, 1, 9, 11), (1, 2, 0, 1, 1, 8, 8), (3, 1, 1, 1, 2, 7, 5), (3, 2, 2, 2, 1, 1, 6)]


def _random_case(k, s, p, d, og, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, h, w, generator=g)
    weight, bias = torch.randn(5, 4, k, k, generator=g), torch.randn(5, generator=g)
    ho, wo = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    offset = torch.randn(2, 2 * og * k * k, ho, wo, generator=g) * 3  # many samples beyond the border
    mask = torch.rand(2, og * k * k, ho, wo, generator=g)
    return x, offset, weight, bias, mask, dict(stride=s, padding=p, dilation=d)


@pytest.mark.parametrize("case", CASES)
def test_grid_sample_form_equals_torchvision(case):
    x, offset, weight, bias, mask, kw = _random_case(*case)
    ref = torchvision.ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kw)
    out = deform_conv2d_grid_sample(x, offset, weight, bias, mask=mask, **kw)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-5
    no_mask = deform_conv2d_grid_sample(x, offset, weight, None, **kw)
    assert (no_mask - torchvision.ops.deform_conv2d(x, offset, weight, None, **kw)).abs().max() < 1e-5


def test_dcn_implementation_swaps_the_backbone_op_and_restores_it():
    original = resnet_dcn.deform_conv2d
    with dcn_implementation("grid_sample"):
        assert resnet_dcn.deform_conv2d is deform_conv2d_grid_sample
    assert resnet_dcn.deform_conv2d is original
    with pytest.raises(ValueError, match="'grid_sample' or 'deformconv'"):
        with dcn_implementation("cuda"):
            pass


class _DCN(torch.nn.Module):
    def __init__(self, weight, bias, kw):
        super().__init__()
        self.weight, self.bias, self.kw = torch.nn.Parameter(weight), torch.nn.Parameter(bias), kw

    def forward(self, x, offset, mask):
        return torchvision.ops.deform_conv2d(x, offset, self.weight, self.bias, mask=mask, **self.kw)


@pytest.mark.parametrize("case", CASES[:2])  # the backbone's 3x3 and 1x1 stride-2 layers
def test_deformconv_symbolic_matches_onnx_reference(case):
    """The ONNX DeformConv we write computes torchvision's DCNv2 (offset layout, padding, modulation), checked
    with onnx's reference evaluator since onnxruntime cannot run the op."""
    from onnx.reference import ReferenceEvaluator

    x, offset, weight, bias, mask, kw = _random_case(*case)
    register_deformconv_symbolic()
    buf = io.BytesIO()
    torch.onnx.export(_DCN(weight, bias, kw), (x, offset, mask), buf, opset_version=DEFORMCONV_OPSET,
                      input_names=["x", "offset", "mask"])
    out = ReferenceEvaluator(buf.getvalue()).run(None, {"x": x.numpy(), "offset": offset.numpy(),
                                                        "mask": mask.numpy()})[0]
    ref = torchvision.ops.deform_conv2d(x, offset, weight, bias, mask=mask, **kw).numpy()
    assert np.abs(out - ref).max() < 1e-4


def test_onnxruntime_probe_names_the_version():
    import onnxruntime

    supported, reason = onnxruntime_supports_deformconv()
    assert onnxruntime.__version__ in reason
    assert ("no CPU kernel" in reason) == (not supported)
