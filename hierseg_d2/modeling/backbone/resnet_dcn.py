"""ResNet for HCFormer: DCNv2 at the downsampling layers that carry clustering modules (HCFormer Sec. 2.5).

The network is Detectron2's ResNet (``BasicStem``, ``BottleneckBlock`` / ``BasicBlock``, ``make_stage``) in
its torchvision-v1.5 configuration (``MODEL.RESNETS.STRIDE_IN_1X1: False``: the stride sits in the 3x3
conv, as in torchvision's ``Bottleneck`` that the release DensoITLab/HCFormer builds on); only the first
block of res3 / res4 / res5 changes, as the release's ``dconv_bottleneck`` (hcformer/modeling/backbone/
resnet.py) does:

* BOTH stride-2 layers of that block, the 3x3 ``conv2`` and the 1x1 ``shortcut`` conv, become modulated
  deformable convs (DCNv2) with a bias (Detectron2's ``ModulatedDeformConv`` default, which the release
  uses), each with its own offset/modulation predictor: a 3x3 conv with the layer's stride and padding 1,
  zero-initialised, predicting 2 offsets + 1 modulation scalar per kernel tap (27 channels for conv2, 3 for
  the shortcut); modulation = ``sigmoid`` (0.5 at init) as the release, ``2 * sigmoid`` (1 at init) as an
  option (``MODEL.RESNETS.DCN_MODULATION``). This is done for the stages whose downsampling carries a
  clustering module under ``MODEL.HCFORMER.LEVELS`` (see :func:`dcn_stages_for_levels`);
  ``MODEL.HCFORMER.DCN_DOWNSAMPLING: False`` keeps the plain convs everywhere (the release's
  ``DOWNSAMPLING: conv``).
* the backbone returns the output of that WHOLE first block as ``ds3`` / ``ds4`` / ``ds5`` (the release's
  ``d_x1 = layer2[0](x1)``, paired with ``x1``; see :mod:`.hierarchy`), 512 / 1024 / 2048 channels for R-50.

The deformable convs run on ``torchvision.ops.deform_conv2d`` (Detectron2's own DCN is CUDA-only). Both
kernels read the offsets in the same layout, checked in their sources and by the golden fixture
(tools/golden_fixtures/hcformer_backbone.py): for each deformable group, channel ``2 * (i * k + j)`` is the
vertical and ``2 * (i * k + j) + 1`` the horizontal offset of tap (i, j), channel ``i * k + j`` of the mask
its modulation; samples beyond the border read zeros. The release splits its predictor output with
``chunk(3)`` into (a, b, mask) and passes ``cat(a, b)``, i.e. the first 2/3 of the channels as offsets in
that interleaved layout, the last 1/3 as the mask; so do we. Under AMP both compute the deformable conv
in float32 (the release casts with ``.float()``, torchvision's autocast kernel likewise); torchvision casts
the result back to the input's dtype, the release keeps float32 for the following BN.

Parameter names are Detectron2's (``res3.0.conv2.weight``, ``res3.0.conv2.norm.*``, ``res3.0.shortcut.*``),
so R-50.pkl loads; new and reported as missing are the DCN biases ``res{3,4,5}.0.{conv2,shortcut}.bias`` (zero
at init) and the predictors ``res{3,4,5}.0.{conv2,shortcut}_offset.{weight,bias}``.
:func:`release_backbone_key_map` maps the release's (torchvision) names onto these.
BasicBlock ResNets (18/34, the shapes configs) get the same treatment on their stride-2 layers, ``conv1``
and ``shortcut``; the release cannot build them (its ``dconv_bottleneck`` replaces ``conv2``, which has
stride 1 in a BasicBlock).

Stages after the head's input are not built: for HCFormer (``MODEL.META_ARCHITECTURE: HCFormer``) the
builder drops the ``MODEL.RESNETS.OUT_FEATURES`` after ``MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE``, and
Detectron2's ResNet builds stages up to the last out feature; with the head on res4, res5 does not exist,
so every parameter gets a gradient (DDP without ``find_unused_parameters``).
"""
import logging
import re
from typing import Dict, Mapping, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

from .hierarchy import downsampled_name, hcformer_out_features

__all__ = [
    "ModulatedDeformConv",
    "DownsamplingBottleneckBlock",
    "DownsamplingBasicBlock",
    "HCFormerResNet",
    "add_hcformer_resnet_config",
    "dcn_stages_for_levels",
    "build_hcformer_resnet_backbone",
    "release_backbone_key_map",
]

logger = logging.getLogger(__name__)

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
MODULATIONS = ("sigmoid", "2sigmoid")


def add_hcformer_resnet_config(cfg: CN) -> None:
    """``MODEL.RESNETS.DCN_MODULATION``: "sigmoid" (the release's, DCNv2's) or "2sigmoid" (modulation 1 at
    init, so that with zero offsets the block starts as the pretrained plain conv)."""
    cfg.MODEL.RESNETS.DCN_MODULATION = "sigmoid"


class ModulatedDeformConv(nn.Module):
    """DCNv2 (modulated deformable convolution) on ``torchvision.ops.deform_conv2d``, with an optional norm.

    Mirrors ``detectron2.layers.Conv2d``'s layout (``weight``, ``bias``, ``norm``) so that a plain conv's
    checkpoint loads into it, and ``detectron2.layers.ModulatedDeformConv``'s arguments (bias on by
    default, zero-initialised). ``forward(x, offset, mask)`` takes offsets (B, 2 * deformable_groups * k * k,
    Ho, Wo), (dy, dx) per kernel tap, and a mask (B, deformable_groups * k * k, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deformable_groups=1, bias=True, norm: Optional[nn.Module] = None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.deformable_groups = groups, deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.norm = norm
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                          dilation=self.dilation, mask=mask)
        if self.norm is not None:
            x = self.norm(x)
        return x

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deformable_groups={self.deformable_groups}, bias={self.bias is not None}")


class _DeformableDownsampling:
    """Mixin: make the block's stride-2 layers DCNv2 (``<name>``) with predictors (``<name>_offset``)."""

    def _setup_deformable(self, modulation: str) -> None:
        if modulation not in MODULATIONS:
            raise ValueError(f"MODEL.RESNETS.DCN_MODULATION must be one of {MODULATIONS}, got {modulation!r}")
        self._modulation_scale = 2.0 if modulation == "2sigmoid" else 1.0
        self._deform_names = []

    def _make_deformable(self, name: str, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                         padding: int, dilation: int, groups: int, deformable_groups: int, norm) -> None:
        dcn = ModulatedDeformConv(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                  dilation=dilation, groups=groups, deformable_groups=deformable_groups,
                                  bias=True, norm=get_norm(norm, out_channels))
        weight_init.c2_msra_fill(dcn)  # same init as the plain conv it replaces (bias 0)
        setattr(self, name, dcn)
        # the release's predictor: a 3x3 conv with the layer's stride and padding 1 on the layer's input,
        # whatever the layer's own kernel (3 channels for the 1x1 shortcut)
        taps = kernel_size * kernel_size * deformable_groups
        offset = Conv2d(in_channels, 3 * taps, kernel_size=3, stride=stride, padding=dilation, dilation=dilation)
        nn.init.zeros_(offset.weight)
        nn.init.zeros_(offset.bias)
        setattr(self, name + "_offset", offset)
        self._deform_names.append(name)

    def _layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Layer ``name`` (+ its norm) on ``x``, deformable when it was made so."""
        conv = getattr(self, name)
        if name not in self._deform_names:
            return conv(x)
        offset_mask = getattr(self, name + "_offset")(x)
        n_offset = offset_mask.shape[1] * 2 // 3
        offset, mask = offset_mask[:, :n_offset], offset_mask[:, n_offset:]
        mask = mask.sigmoid()
        if self._modulation_scale != 1.0:
            mask = self._modulation_scale * mask
        return conv(x, offset, mask)


class DownsamplingBottleneckBlock(_DeformableDownsampling, BottleneckBlock):
    """Detectron2's BottleneckBlock opening a stage; with ``deform`` its stride-2 3x3 ``conv2`` and its 1x1
    ``shortcut`` are DCNv2 (the release's ``dconv_bottleneck``)."""

    def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=2, num_groups=1, norm="BN",
                 stride_in_1x1=False, dilation=1, deform=False, deform_num_groups=1, modulation="sigmoid"):
        super().__init__(in_channels, out_channels, bottleneck_channels=bottleneck_channels, stride=stride,
                         num_groups=num_groups, norm=norm, stride_in_1x1=stride_in_1x1, dilation=dilation)
        self._setup_deformable(modulation)
        if deform:
            if stride_in_1x1:
                raise ValueError("MODEL.HCFORMER.DCN_DOWNSAMPLING needs the stride in the 3x3 conv: set "
                                 "MODEL.RESNETS.STRIDE_IN_1X1 False (torchvision-style ResNet)")
            self._make_deformable("conv2", bottleneck_channels, bottleneck_channels, 3, stride, dilation,
                                  dilation, num_groups, deform_num_groups, norm)
            self._make_deformable("shortcut", in_channels, out_channels, 1, stride, 0, 1, 1,
                                  deform_num_groups, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self._layer("conv2", out))
        out = self.conv3(out)
        out = out + (self._layer("shortcut", x) if self.shortcut is not None else x)
        return F.relu_(out)


class DownsamplingBasicBlock(_DeformableDownsampling, BasicBlock):
    """Detectron2's BasicBlock (ResNet-18/34) opening a stage; with ``deform`` its stride-2 3x3 ``conv1`` and
    its 1x1 ``shortcut`` are DCNv2 (our extension: the release has no BasicBlock variant)."""

    def __init__(self, in_channels, out_channels, *, stride=2, norm="BN", deform=False, deform_num_groups=1,
                 modulation="sigmoid"):
        super().__init__(in_channels, out_channels, stride=stride, norm=norm)
        self._setup_deformable(modulation)
        if deform:
            self._make_deformable("conv1", in_channels, out_channels, 3, stride, 1, 1, 1, deform_num_groups, norm)
            self._make_deformable("shortcut", in_channels, out_channels, 1, stride, 0, 1, 1,
                                  deform_num_groups, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self._layer("conv1", x))
        out = self.conv2(out)
        out = out + (self._layer("shortcut", x) if self.shortcut is not None else x)
        return F.relu_(out)


class HCFormerResNet(ResNet):
    """Detectron2's ResNet that also returns ``ds3`` / ``ds4`` / ``ds5``, the outputs of the first (downsampling)
    block of res3 / res4 / res5, and pairs them with res2 / res3 / res4 for HCFormer's clustering."""

    def __init__(self, stem, stages, out_features=None, freeze_at=0):
        super().__init__(stem, stages, out_features=out_features, freeze_at=freeze_at)
        self._downsampled: Dict[str, str] = {}  # stage name -> name of its "after" map
        for name, stage in zip(self.stage_names, self.stages):
            if name != "res2":
                ds = downsampled_name(int(name[3:]))
                self._downsampled[name] = ds
                self._out_feature_channels[ds] = stage[0].out_channels
                self._out_feature_strides[ds] = self._out_feature_strides[name]

    def clustering_pairs(self) -> Dict[int, Tuple[str, str]]:
        """{level i: (res_i, ds_{i+1})} for every downsampling stage this network has."""
        return {int(stage[3:]) - 1: (f"res{int(stage[3:]) - 1}", ds) for stage, ds in self._downsampled.items()}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """res2..res5 as Detectron2's ResNet, plus ds3..ds5."""
        assert x.dim() == 4, f"ResNet takes an input of shape (N, C, H, W). Got {x.shape} instead!"
        outputs = {}
        x = self.stem(x)
        for name, stage in zip(self.stage_names, self.stages):
            x = stage[0](x)
            if name in self._downsampled:
                outputs[self._downsampled[name]] = x
            for block in stage[1:]:
                x = block(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        names = list(self._out_features) + list(self._downsampled.values())
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in names}


def dcn_stages_for_levels(levels: int, last_stage: int = 5) -> Tuple[int, ...]:
    """Stages whose downsampling layer carries a clustering module at ``levels`` hierarchy levels.

    Level i clusters res_i with the output of the first block of stage i+1; levels are used from the
    coarsest (i = last_stage - 1, below the head's input res_{last_stage}) down, so LEVELS = L gives stages
    last_stage, ..., last_stage + 1 - L (the release: ``range(5 - L, 5)`` of its layer1..4).
    """
    if not 0 <= levels <= last_stage - 2:
        raise ValueError(f"MODEL.HCFORMER.LEVELS must be in 0..{last_stage - 2} with the head on res{last_stage} "
                         f"(MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE), got {levels}")
    return tuple(range(last_stage, last_stage - levels, -1))


@BACKBONE_REGISTRY.register()
def build_hcformer_resnet_backbone(cfg, input_shape: ShapeSpec) -> HCFormerResNet:
    """ResNet from ``MODEL.RESNETS.*`` (as Detectron2's build_resnet_backbone) with DCNv2 downsampling at
    the clustering levels (``MODEL.HCFORMER.LEVELS``, ``MODEL.HCFORMER.DCN_DOWNSAMPLING``); stages after the
    last needed output are not built."""
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.RESNETS.DEPTH = {depth} is not one of {sorted(_BLOCKS_PER_STAGE)}")
    if r.RES5_DILATION != 1:
        raise ValueError("MODEL.RESNETS.RES5_DILATION must be 1 for HCFormer: res5 must downsample "
                         f"(got {r.RES5_DILATION})")
    if any(r.DEFORM_ON_PER_STAGE):
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE uses Detectron2's CUDA-only DCN; HCFormer's "
                         "DCNv2 downsampling is switched by MODEL.HCFORMER.DCN_DOWNSAMPLING")
    out_features = hcformer_out_features(cfg, r.OUT_FEATURES, "MODEL.RESNETS.OUT_FEATURES")
    unknown = [f for f in out_features if f not in ("res2", "res3", "res4", "res5")]
    if unknown or not out_features:
        raise ValueError(f"MODEL.RESNETS.OUT_FEATURES must name some of res2..res5, got {list(r.OUT_FEATURES)}")
    last_stage = max(int(f[3:]) for f in out_features)
    deform_stages = (dcn_stages_for_levels(cfg.MODEL.HCFORMER.LEVELS, last_stage)
                     if cfg.MODEL.HCFORMER.DCN_DOWNSAMPLING else ())

    norm = r.NORM
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=norm)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    basic = depth < 50
    if basic and r.NUM_GROUPS != 1:
        raise ValueError(f"MODEL.RESNETS.NUM_GROUPS must be 1 for ResNet-{depth}, got {r.NUM_GROUPS}")

    stages = []
    for stage_idx, num_blocks in zip(range(2, last_stage + 1), _BLOCKS_PER_STAGE[depth]):
        kwargs = {"in_channels": in_channels, "out_channels": out_channels, "norm": norm}
        if not basic:
            kwargs.update(bottleneck_channels=bottleneck_channels, stride_in_1x1=r.STRIDE_IN_1X1,
                          num_groups=r.NUM_GROUPS)
        if stage_idx == 2:
            blocks = ResNet.make_stage(BasicBlock if basic else BottleneckBlock, num_blocks, **kwargs)
        else:
            first_cls = DownsamplingBasicBlock if basic else DownsamplingBottleneckBlock
            first = first_cls(stride=2, deform=stage_idx in deform_stages, deform_num_groups=r.DEFORM_NUM_GROUPS,
                              modulation=r.DCN_MODULATION, **kwargs)
            kwargs["in_channels"] = out_channels
            rest = ResNet.make_stage(BasicBlock if basic else BottleneckBlock, num_blocks - 1, **kwargs)
            blocks = [first] + rest
        stages.append(blocks)
        in_channels, out_channels, bottleneck_channels = out_channels, out_channels * 2, bottleneck_channels * 2
    logger.info(f"HCFormer ResNet-{depth} up to res{last_stage}: DCNv2 downsampling in "
                f"{['res%d' % s for s in sorted(deform_stages)] or 'no stage'}")
    return HCFormerResNet(stem, stages, out_features=out_features, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


_RELEASE_STEM = {"stem.0.weight": "stem.conv1.weight"}
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
_RELEASE_LAYER = re.compile(r"layer([1-4])\.(\d+)\.(.+)")


def release_backbone_key_map(key: Union[str, Mapping[str, torch.Tensor]]):
    """Our name for a tensor of the release's ResNet backbone (``D2HCResNet`` of DensoITLab/HCFormer).

    Two forms: ``release_backbone_key_map(name: str) -> Optional[str]`` for one name, and
    ``release_backbone_key_map(state: Mapping[str, Tensor]) -> Dict[str, Tensor]`` for the release's
    backbone tensors (as the full-checkpoint converter tools/convert-hcformer-to-d2.py passes them, after
    taking out the head's): every tensor renamed, ``num_batches_tracked`` dropped, anything else that does
    not map (including a head tensor) a KeyError naming it.

    ``key`` is relative to the backbone (the checkpoint's ``backbone.`` prefix removed), the result relative
    to ours (add ``backbone.`` back for a whole model). The release builds on torchvision's ResNet; the
    mapping is torchvision -> Detectron2 (``layer{1..4}`` -> ``res{2..5}``, ``conv{n}`` / ``bn{n}`` ->
    ``conv{n}`` / ``conv{n}.norm``, ``downsample.{0,1}`` -> ``shortcut`` / ``shortcut.norm``, the stem's
    ``stem.{0,1}`` -> ``stem.conv1`` / ``stem.conv1.norm``) plus its DCN wrappers (``<conv>.deform.*`` ->
    ``<conv>.*``, ``<conv>.offset.*`` -> ``<conv>_offset.*``).

    Returns None for tensors that are not the ResNet's: the release keeps its clustering modules
    (``clustering_layers.*``) and HCFormer+'s encoder (``aux.*``) inside the backbone; they belong to our
    head. Also None for ``*.num_batches_tracked`` (BatchNorm bookkeeping FrozenBN does not have).
    Raises KeyError for anything else.
    """
    if not isinstance(key, str):
        return _convert_state(key, _release_key, "HCResNet")
    return _release_key(key)


def _convert_state(state: Mapping[str, torch.Tensor], key_map, family: str) -> Dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        new = key_map(name)
        if new is None:
            if name.endswith(".num_batches_tracked"):
                continue
            raise KeyError(f"{name!r} is not a tensor of the release's {family} backbone itself (a head tensor: "
                           f"convert it with the head)")
        if new in out:
            raise KeyError(f"release backbone tensors {name!r} and another both map to {new!r}")
        out[new] = value
    return out


def _release_key(key: str) -> Optional[str]:
    if key.startswith(("clustering_layers.", "aux.")) or key.endswith(".num_batches_tracked"):
        return None
    if key in _RELEASE_STEM:
        return _RELEASE_STEM[key]
    if key.startswith("stem.1.") and key[len("stem.1."):] in _BN_TENSORS:
        return "stem.conv1.norm." + key[len("stem.1."):]
    m = _RELEASE_LAYER.fullmatch(key)
    if m:
        stage, block, rest = f"res{int(m.group(1)) + 1}", m.group(2), m.group(3)
        ours = _release_block_key(rest)
        if ours is not None:
            return f"{stage}.{block}.{ours}"
    raise KeyError(f"{key!r} is not a tensor of the release's HCResNet backbone")


def _release_block_key(rest: str) -> Optional[str]:
    m = re.fullmatch(r"conv([1-3])\.(weight|deform\.weight|deform\.bias|offset\.weight|offset\.bias)", rest)
    if m:
        conv, tensor = f"conv{m.group(1)}", m.group(2)
        return _dcn_key(conv, tensor)
    m = re.fullmatch(r"bn([1-3])\.(\w+)", rest)
    if m and m.group(2) in _BN_TENSORS:
        return f"conv{m.group(1)}.norm.{m.group(2)}"
    m = re.fullmatch(r"downsample\.0\.(weight|deform\.weight|deform\.bias|offset\.weight|offset\.bias)", rest)
    if m:
        return _dcn_key("shortcut", m.group(1))
    m = re.fullmatch(r"downsample\.1\.(\w+)", rest)
    if m and m.group(1) in _BN_TENSORS:
        return f"shortcut.norm.{m.group(1)}"
    return None


def _dcn_key(conv: str, tensor: str) -> str:
    if tensor.startswith("offset."):
        return f"{conv}_offset.{tensor[len('offset.'):]}"
    return f"{conv}.{tensor.replace('deform.', '')}"
