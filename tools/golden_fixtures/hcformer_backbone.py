"""Golden fixtures for HCFormer's backbones, made with the release's own classes (DensoITLab/HCFormer).

Run by hand, not in CI:

    HCFORMER_RELEASE=/path/to/DensoITLab/HCFormer .venv/bin/python tools/golden_fixtures/hcformer_backbone.py

writes tests/fixtures/golden/hcformer_backbone.pt (read by tests/modeling/backbone/
test_golden_hcformer_backbone.py). Everything is float32 on the CPU with fixed seeds and random weights at
reduced widths:

* ``block``: one DCN bottleneck as the release builds it: its ``dconv_bottleneck`` applied to a torchvision
  ``Bottleneck`` (32 -> 64 channels, stride 2) with FrozenBN;
* ``r50``: the release's ``HCResNet`` (stem..layer4, the clustering inputs) for ResNet-50 with DCN
  downsampling at 3 levels, torchvision's ResNet-50 at 1/16 of the widths (stem 4, res2..res5 16..128
  channels, blocks 3/4/6/3);
* ``r18``: the same for ResNet-18 with ``downsampling='conv'`` (1/16 widths): the release cannot build
  ResNet-18 with DCN (its ``dconv_bottleneck`` swaps ``conv2``, which has stride 1 in a BasicBlock; the
  script checks that this fails);
* ``swin``: the release's ``HCSwinTransformer`` (embed dim 8, depths 2/2/2/2, heads 1/1/2/2, window 4).

For each model: the release's state dict (release layout, ``backbone.`` prefix removed), the inputs (one
square, one not), the outputs (``res*``) and the (before, after) maps the release hands each of its
Clustering modules (captured by forward pre-hooks), finest level first.

Shims (the release runs unchanged; only what cannot run here is replaced, outside the project):

* torchvision's ``resnet{18,50}(pretrained=True)`` (no internet) -> a torchvision ``ResNet`` of the same
  blocks at 1/16 of the widths, ``pretrained`` ignored;
* Detectron2's ``ModulatedDeformConv`` is CUDA-only -> the same module (same parameters) whose forward is
  ``torchvision.ops.deform_conv2d``. Before use the script checks that this shim computes Detectron2's
  kernel (detectron2/layers/csrc/deformable/deform_conv_cuda_kernel.cu, ``modulated_deformable_im2col_
  gpu_kernel``: channel 2 * (i * k + j) = dy and 2 * (i * k + j) + 1 = dx of tap (i, j), mask channel
  i * k + j, a sample at (h, w) is read only if -1 < h < H and -1 < w < W, corners outside read 0) written
  out as a naive loop, with random offsets that push samples across the border; the max abs difference is
  stored as ``dcn_layout_check``;
* ``turtle`` (imported and unused by hcswin.py; needs Tk) -> an empty module;
* the packages ``hcformer``, ``hcformer.modeling`` and ``hcformer.modeling.transformer_decoder`` -> empty
  packages on the release's folders, so that their ``__init__`` (datasets, heads, registries) is not run.
"""
import math
import os
import sys
import types

import torch
import torch.nn as nn
import torchvision
import torchvision.models as M
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import deform_conv2d

# by file location: a ``tools`` package in site-packages shadows this repository's tools/ folder
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import release_checkout, release_commit, save_fixture  # noqa: E402

REPO = "DensoITLab/HCFormer"
WIDTH_DIVISOR = 16
# the release's Clustering needs each map exactly twice the next (its inputs are padded to 32)
INPUTS = {"square": (64, 64), "nonsquare": (64, 96)}


# ---------------------------------------------------------------- shims
def _install_dcn_shim():
    import detectron2.layers as d2_layers

    class TorchvisionModulatedDeformConv(d2_layers.ModulatedDeformConv):
        """Detectron2's ModulatedDeformConv (same parameters and init), forward on torchvision's kernel."""

        def forward(self, x, offset, mask):
            x = deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                              dilation=self.dilation, mask=mask)
            if self.norm is not None:
                x = self.norm(x)
            if self.activation is not None:
                x = self.activation(x)
            return x

    d2_layers.ModulatedDeformConv = TorchvisionModulatedDeformConv
    return TorchvisionModulatedDeformConv


def _naive_detectron2_dcn(x, offset, mask, weight, bias, stride, padding):
    """Detectron2's modulated_deformable_im2col_gpu_kernel + GEMM, one output at a time (1 deformable group)."""
    B, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    Ho, Wo = offset.shape[-2:]
    out = torch.zeros(B, O, Ho, Wo, dtype=torch.float64)
    x, offset, mask, weight = x.double(), offset.double(), mask.double(), weight.double()

    def bilinear(img, h, w):  # dmcn_im2col_bilinear
        h_low, w_low = math.floor(h), math.floor(w)
        lh, lw = h - h_low, w - w_low
        val = torch.zeros(img.shape[0], dtype=torch.float64)
        for hh, ww, wt in ((h_low, w_low, (1 - lh) * (1 - lw)), (h_low, w_low + 1, (1 - lh) * lw),
                           (h_low + 1, w_low, lh * (1 - lw)), (h_low + 1, w_low + 1, lh * lw)):
            if 0 <= hh <= H - 1 and 0 <= ww <= W - 1:
                val += wt * img[:, hh, ww]
        return val

    for b in range(B):
        for ho in range(Ho):
            for wo in range(Wo):
                cols = []
                for i in range(kh):
                    for j in range(kw):
                        t = i * kw + j
                        h = ho * stride - padding + i + offset[b, 2 * t, ho, wo].item()
                        w = wo * stride - padding + j + offset[b, 2 * t + 1, ho, wo].item()
                        v = bilinear(x[b], h, w) if (-1 < h < H and -1 < w < W) else torch.zeros(C, dtype=torch.float64)
                        cols.append(v * mask[b, t, ho, wo].item())
                col = torch.stack(cols, 1)  # C x taps
                out[b, :, ho, wo] = (weight.reshape(O, C, kh * kw) * col).sum((1, 2)) + bias.double()
    return out


def check_dcn_shim(shim_cls) -> float:
    torch.manual_seed(1)
    diffs = []
    for k, stride, pad in ((3, 2, 1), (1, 2, 0)):
        conv = shim_cls(3, 4, kernel_size=k, stride=stride, padding=pad)
        nn.init.normal_(conv.bias)
        x = torch.randn(1, 3, 7, 9)
        Ho, Wo = (7 + 2 * pad - k) // stride + 1, (9 + 2 * pad - k) // stride + 1
        offset = 2.5 * torch.randn(1, 2 * k * k, Ho, Wo)  # large enough to cross the border
        mask = torch.rand(1, k * k, Ho, Wo)
        with torch.no_grad():
            ours = conv(x, offset, mask)
        ref = _naive_detectron2_dcn(x, offset, mask, conv.weight.detach(), conv.bias.detach(), stride, pad)
        diffs.append((ours.double() - ref).abs().max().item())
    diff = max(diffs)
    assert diff < 1e-5, f"torchvision's deform_conv2d does not compute Detectron2's DCN kernel: {diff}"
    print(f"DCN shim = naive Detectron2 kernel, max abs diff {diff:.2e}")
    return diff


class _SmallResNet(ResNet):
    """torchvision's ResNet with every width divided by WIDTH_DIVISOR (same blocks, same init)."""

    def __init__(self, block, layers):
        self._divided = False
        super().__init__(block, layers)
        stem = 64 // WIDTH_DIVISOR
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if not self._divided:  # first call: the stem width
            self.inplanes //= WIDTH_DIVISOR
            self._divided = True
        return super()._make_layer(block, planes // WIDTH_DIVISOR, blocks, stride, dilate)


def _install_torchvision_shim():
    M.__dict__["resnet50"] = lambda pretrained=False, **kw: _SmallResNet(Bottleneck, [3, 4, 6, 3])
    M.__dict__["resnet18"] = lambda pretrained=False, **kw: _SmallResNet(BasicBlock, [2, 2, 2, 2])


def _install_package_stubs(release):
    sys.modules.setdefault("turtle", types.ModuleType("turtle")).down = None
    for name, rel in (("hcformer", "hcformer"), ("hcformer.modeling", "hcformer/modeling"),
                      ("hcformer.modeling.transformer_decoder", "hcformer/modeling/transformer_decoder")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(release, rel)]
        sys.modules[name] = pkg


# ---------------------------------------------------------------- helpers
def randomize(module: nn.Module, seed: int) -> None:
    """Random values for the tensors the release initialises to constants (FrozenBN statistics, LayerNorms,
    biases, the zero-initialised DCN predictors), so that every tensor matters."""
    from detectron2.layers import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    for name, m in module.named_modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(0.3 + 0.4 * torch.rand(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
        elif isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif name.endswith(".offset") and isinstance(m, nn.Conv2d):  # DeformConv's predictor
            with torch.no_grad():
                # offsets of about +-1 px and masks away from 0.5
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
        elif name.endswith(".deform") and getattr(m, "bias", None) is not None:
            with torch.no_grad():
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def capture_pairs(clustering_modules):
    """Forward pre-hooks recording the (before, after) maps each Clustering module receives."""
    store = {}
    for i, mod in enumerate(clustering_modules):
        mod.register_forward_pre_hook(lambda m, args, i=i: store.__setitem__(i, (args[0].detach().clone(),
                                                                                  args[1].detach().clone())))
    return store


def state_dict(module):
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def run(model, clustering_modules, finest_first, seed):
    """Inputs, res outputs and clustering pairs (finest level first) at the two input sizes."""
    pairs = capture_pairs(clustering_modules)
    runs = {}
    for i, (name, (h, w)) in enumerate(INPUTS.items()):
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed + i))
        pairs.clear()
        with torch.no_grad():
            out = model(x)
        order = sorted(pairs, reverse=not finest_first)
        runs[name] = {
            "input": x,
            "outputs": {k: v for k, v in out.items() if k.startswith("res")},
            "pairs": [{"before": pairs[j][0], "after": pairs[j][1]} for j in order],
        }
        mags = {k: f"{v.abs().max().item():.2g}" for k, v in runs[name]["outputs"].items()}
        print(f"  {name} {tuple(x.shape)}: |res| max {mags}")
    return runs


# ---------------------------------------------------------------- models
def make_block(dcn_shim):
    from detectron2.layers import FrozenBatchNorm2d
    from hcformer.modeling.backbone.resnet import dconv_bottleneck

    torch.manual_seed(10)
    downsample = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
    layer = nn.Sequential(Bottleneck(32, 16, stride=2, downsample=downsample), Bottleneck(64, 16))
    layer = FrozenBatchNorm2d.convert_frozen_batchnorm(layer)
    layer = dconv_bottleneck(layer, 32, 64)
    block = layer[0].eval()
    randomize(block, 11)
    runs = {}
    for i, (name, (h, w)) in enumerate({"square": (16, 16), "nonsquare": (15, 22)}.items()):
        x = torch.relu(torch.randn(1, 32, h, w, generator=torch.Generator().manual_seed(12 + i)))
        with torch.no_grad():
            runs[name] = {"input": x, "output": block(x)}
    return {"weights": state_dict(block), "runs": runs,
            "config": {"in_channels": 32, "out_channels": 64, "bottleneck_channels": 16, "stride": 2}}


def make_resnet(depth, downsampling, seed):
    from hcformer.modeling.backbone.resnet import HCResNet

    torch.manual_seed(seed)
    model = HCResNet(depth=depth, hierarchical_level=3, emb_dim=4, downsampling=downsampling).eval()
    randomize(model, seed + 1)
    # clustering_layers are coarsest first (the release reverses them); report the pairs finest first
    runs = run(model, model.clustering_layers, finest_first=False, seed=seed + 2)
    return {"weights": state_dict(model), "runs": runs,
            "config": {"depth": depth, "downsampling": downsampling, "width_divisor": WIDTH_DIVISOR,
                       "stem_out_channels": 64 // WIDTH_DIVISOR, "res2_out_channels": 256 // WIDTH_DIVISOR
                       if depth >= 50 else 64 // WIDTH_DIVISOR,
                       "width_per_group": 64 // WIDTH_DIVISOR, "levels": 3}}


def check_r18_dcn_fails():
    from hcformer.modeling.backbone.resnet import HCResNet

    try:
        model = HCResNet(depth=18, hierarchical_level=3, emb_dim=4, downsampling="deform").eval()
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
    except RuntimeError as e:
        print(f"release HCResNet-18 with DCN fails as expected: {str(e).splitlines()[0][:100]}")
        return True
    raise AssertionError("the release's HCResNet-18 with downsampling='deform' ran; update the docs")


def make_swin(seed):
    from detectron2.config import get_cfg
    from hcformer.config import add_hcformer_config, add_maskformer2_config
    from hcformer.modeling.backbone.hcswin import HCSwinTransformer

    cfg = get_cfg()
    add_maskformer2_config(cfg)
    add_hcformer_config(cfg)
    swin = {"EMBED_DIM": 8, "DEPTHS": [2, 2, 2, 2], "NUM_HEADS": [1, 1, 2, 2], "WINDOW_SIZE": 4,
            "DROP_PATH_RATE": 0.0, "OUT_FEATURES": ["res5"], "APE": False, "PATCH_NORM": True}
    for k, v in swin.items():
        setattr(cfg.MODEL.SWIN, k, v)
    cfg.MODEL.HC.EMB_DIM = 4
    torch.manual_seed(seed)
    model = HCSwinTransformer(cfg, None)
    model.eval()  # the release's train() returns None
    randomize(model, seed + 1)
    clustering = [layer.clustering for layer in model.layers if layer.clustering is not None]
    runs = run(model, clustering, finest_first=True, seed=seed + 2)
    return {"weights": state_dict(model), "runs": runs, "config": swin}


def main():
    release = release_checkout("HCFORMER_RELEASE", REPO)
    commit = release_commit(release)
    torch.set_num_threads(1)
    shim = _install_dcn_shim()
    _install_torchvision_shim()
    _install_package_stubs(release)
    content = {"dcn_layout_check": check_dcn_shim(shim), "torchvision": torchvision.__version__}
    print("block")
    content["block"] = make_block(shim)
    print("r50 (1/16 widths, DCN at 3 levels)")
    content["r50"] = make_resnet(50, "deform", seed=20)
    print("r18 (1/16 widths, plain downsampling)")
    content["r18"] = make_resnet(18, "conv", seed=30)
    check_r18_dcn_fails()
    print("swin")
    content["swin"] = make_swin(seed=40)
    save_fixture("hcformer_backbone", content, REPO, commit)


if __name__ == "__main__":
    main()
