"""ResNet for HCFormer: DCNv2 at the downsampling layers that carry clustering modules (HCFormer Sec. 2.5).

The network is Detectron2's ResNet (``BasicStem``, ``BottleneckBlock`` / ``BasicBlock``, ``make_stage``);
only the first block of res3 / res4 / res5 changes:

* its stride-2 3x3 conv becomes a modulated deformable conv (DCNv2) computed with
  ``torchvision.ops.deform_conv2d`` (Detectron2's own DCN is CUDA-only), for the stages whose
  downsampling layer carries a clustering module under ``MODEL.HCFORMER.LEVELS`` (App. F.2: LEVELS 1
  -> res5, 2 -> res4 + res5, 3 -> res3 + res4 + res5); ``MODEL.HCFORMER.DCN_DOWNSAMPLING: False``
  keeps the plain conv everywhere;
* it also hands back the map right after that stride-2 conv (after its norm and ReLU), which the
  backbone returns as ``ds3`` / ``ds4`` / ``ds5`` (see :mod:`.hierarchy`). The block returns it from
  :meth:`forward_with_downsampled` rather than through a forward hook: the computation is the block's
  normal forward, the capture is explicit, and it survives tracing / FLOP counting / TorchScript.

Parameter names are Detectron2's (``res3.0.conv2.weight``, ``res3.0.conv2.norm.*``), so R-50.pkl loads;
the DCN offset/mask predictors ``res{3,4,5}.0.conv2_offset.{weight,bias}`` (Detectron2's
DeformBottleneckBlock name) are new and reported as missing. They are initialised to zero and the
modulation is ``2 * sigmoid`` (1 at init), so at initialisation the block equals the pretrained plain conv
exactly; DCNv2's plain ``sigmoid`` would halve the pretrained responses feeding a frozen BN.
"""
import logging
from typing import Dict, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

from .hierarchy import downsampled_name

__all__ = [
    "ModulatedDeformConv",
    "DownsamplingBottleneckBlock",
    "DownsamplingBasicBlock",
    "HCFormerResNet",
    "dcn_stages_for_levels",
    "build_hcformer_resnet_backbone",
]

logger = logging.getLogger(__name__)

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class ModulatedDeformConv(nn.Module):
    """DCNv2 (modulated deformable convolution) on ``torchvision.ops.deform_conv2d``, with an optional norm.

    Mirrors ``detectron2.layers.Conv2d``'s layout (``weight``, ``bias``, ``norm``) so that a plain conv's
    checkpoint loads into it. ``forward(x, offset, mask)`` takes torchvision's offset layout
    (B, 2 * deformable_groups * k * k, Ho, Wo), (dy, dx) per kernel tap, and a mask of
    (B, deformable_groups * k * k, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deformable_groups=1, bias=False, norm: Optional[nn.Module] = None):
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
                f"deformable_groups={self.deformable_groups}")


class _DeformableDownsampling:
    """Mixin: replace the block's stride-2 3x3 conv ``name`` by DCNv2 with a zero-initialised predictor."""

    def _make_deformable(self, name: str, in_channels: int, out_channels: int, stride: int, dilation: int,
                         groups: int, deformable_groups: int, norm) -> None:
        kernel_taps = 9
        dcn = ModulatedDeformConv(in_channels, out_channels, 3, stride=stride, padding=dilation,
                                  dilation=dilation, groups=groups, deformable_groups=deformable_groups,
                                  bias=False, norm=get_norm(norm, out_channels))
        weight_init.c2_msra_fill(dcn)  # same init as the plain conv it replaces
        setattr(self, name, dcn)
        # 2 offsets + 1 modulation scalar per tap and deformable group, predicted from the conv's input
        offset = Conv2d(in_channels, 3 * kernel_taps * deformable_groups, kernel_size=3, stride=stride,
                        padding=dilation, dilation=dilation)
        nn.init.zeros_(offset.weight)
        nn.init.zeros_(offset.bias)
        setattr(self, name + "_offset", offset)
        self._deform_name = name

    def _apply_downsampling(self, x: torch.Tensor) -> torch.Tensor:
        """The downsampling conv (+ its norm), deformable when this block was made deformable."""
        conv = getattr(self, self._deform_name)
        if not isinstance(conv, ModulatedDeformConv):
            return conv(x)
        offset_mask = getattr(self, self._deform_name + "_offset")(x)
        n_offset = offset_mask.shape[1] * 2 // 3
        offset, mask = offset_mask[:, :n_offset], offset_mask[:, n_offset:]
        # 2 * sigmoid: modulation 1 at init, so the block starts as the (pretrained) plain conv
        return conv(x, offset, 2.0 * mask.sigmoid())


class DownsamplingBottleneckBlock(_DeformableDownsampling, BottleneckBlock):
    """Detectron2's BottleneckBlock opening a stage: its stride-2 conv may be DCNv2, and it exposes the map
    right after that conv (after norm + ReLU) through :meth:`forward_with_downsampled`."""

    def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=2, num_groups=1, norm="BN",
                 stride_in_1x1=False, dilation=1, deform=False, deform_num_groups=1):
        super().__init__(in_channels, out_channels, bottleneck_channels=bottleneck_channels, stride=stride,
                         num_groups=num_groups, norm=norm, stride_in_1x1=stride_in_1x1, dilation=dilation)
        self.stride_in_1x1 = stride_in_1x1
        self.downsampled_channels = bottleneck_channels
        self._deform_name = "conv2"
        if deform:
            if stride_in_1x1:
                raise ValueError("MODEL.HCFORMER.DCN_DOWNSAMPLING needs the stride in the 3x3 conv: set "
                                 "MODEL.RESNETS.STRIDE_IN_1X1 False (torchvision-style ResNet)")
            self._make_deformable("conv2", bottleneck_channels, bottleneck_channels, stride, dilation,
                                  num_groups, deform_num_groups, norm)

    def forward_with_downsampled(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(block output, map right after the stride-2 conv) — the same computation as ``forward``."""
        out = F.relu_(self.conv1(x))
        if self.stride_in_1x1:
            down = out
        out = F.relu_(self._apply_downsampling(out))
        if not self.stride_in_1x1:
            down = out
        out = self.conv3(out)
        out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return F.relu_(out), down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_downsampled(x)[0]


class DownsamplingBasicBlock(_DeformableDownsampling, BasicBlock):
    """Detectron2's BasicBlock (ResNet-18/34) opening a stage; its stride-2 conv is ``conv1``."""

    def __init__(self, in_channels, out_channels, *, stride=2, norm="BN", deform=False, deform_num_groups=1):
        super().__init__(in_channels, out_channels, stride=stride, norm=norm)
        self.downsampled_channels = out_channels
        self._deform_name = "conv1"
        if deform:
            self._make_deformable("conv1", in_channels, out_channels, stride, 1, 1, deform_num_groups, norm)

    def forward_with_downsampled(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        down = F.relu_(self._apply_downsampling(x))
        out = self.conv2(down)
        out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return F.relu_(out), down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_downsampled(x)[0]


class HCFormerResNet(ResNet):
    """Detectron2's ResNet that also returns ``ds3`` / ``ds4`` / ``ds5``, the maps right after the downsampling
    layers into res3 / res4 / res5, and pairs them with res2 / res3 / res4 for HCFormer's clustering."""

    def __init__(self, stem, stages, out_features=None, freeze_at=0):
        super().__init__(stem, stages, out_features=out_features, freeze_at=freeze_at)
        self._downsampled: Dict[str, str] = {}  # stage name -> name of its "after" map
        for name, stage in zip(self.stage_names, self.stages):
            if hasattr(stage[0], "forward_with_downsampled"):
                ds = downsampled_name(int(name[3:]))
                self._downsampled[name] = ds
                self._out_feature_channels[ds] = stage[0].downsampled_channels
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
            for i, block in enumerate(stage):
                if i == 0 and name in self._downsampled:
                    x, outputs[self._downsampled[name]] = block.forward_with_downsampled(x)
                else:
                    x = block(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        names = list(self._out_features) + list(self._downsampled.values())
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in names}


def dcn_stages_for_levels(levels: int) -> Tuple[int, ...]:
    """Stages whose downsampling layer carries a clustering module at ``levels`` hierarchy levels.

    Level i clusters res_i with the map after the downsampling into stage i+1; levels are used from the
    coarsest (i = 4) down, so LEVELS = L gives stages 5, ..., 6 - L.
    """
    if not 0 <= levels <= 3:
        raise ValueError(f"MODEL.HCFORMER.LEVELS must be in 0..3, got {levels}")
    return tuple(range(5, 5 - levels, -1))


@BACKBONE_REGISTRY.register()
def build_hcformer_resnet_backbone(cfg, input_shape: ShapeSpec) -> HCFormerResNet:
    """ResNet from ``MODEL.RESNETS.*`` (as Detectron2's build_resnet_backbone) with DCNv2 downsampling at
    the clustering levels (``MODEL.HCFORMER.LEVELS``, ``MODEL.HCFORMER.DCN_DOWNSAMPLING``)."""
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
    deform_stages = dcn_stages_for_levels(cfg.MODEL.HCFORMER.LEVELS) if cfg.MODEL.HCFORMER.DCN_DOWNSAMPLING else ()

    norm = r.NORM
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=norm)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    basic = depth < 50
    if basic and r.NUM_GROUPS != 1:
        raise ValueError(f"MODEL.RESNETS.NUM_GROUPS must be 1 for ResNet-{depth}, got {r.NUM_GROUPS}")

    stages = []
    for stage_idx, num_blocks in zip(range(2, 6), _BLOCKS_PER_STAGE[depth]):
        kwargs = {"in_channels": in_channels, "out_channels": out_channels, "norm": norm}
        if not basic:
            kwargs.update(bottleneck_channels=bottleneck_channels, stride_in_1x1=r.STRIDE_IN_1X1,
                          num_groups=r.NUM_GROUPS)
        if stage_idx == 2:
            blocks = ResNet.make_stage(BasicBlock if basic else BottleneckBlock, num_blocks, **kwargs)
        else:
            first_cls = DownsamplingBasicBlock if basic else DownsamplingBottleneckBlock
            first = first_cls(stride=2, deform=stage_idx in deform_stages,
                              deform_num_groups=r.DEFORM_NUM_GROUPS, **kwargs)
            kwargs["in_channels"] = out_channels
            rest = ResNet.make_stage(BasicBlock if basic else BottleneckBlock, num_blocks - 1, **kwargs)
            blocks = [first] + rest
        stages.append(blocks)
        in_channels, out_channels, bottleneck_channels = out_channels, out_channels * 2, bottleneck_channels * 2
    logger.info(f"HCFormer ResNet-{depth}: DCNv2 downsampling in "
                f"{['res%d' % s for s in sorted(deform_stages)] or 'no stage'}")
    return HCFormerResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
