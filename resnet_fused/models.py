"""Drop-in torchvision ResNets whose residual blocks run as fused kernels.

``BasicBlock``, ``Bottleneck`` and ``ResNet`` have torchvision's constructor signatures, submodule names and
therefore its exact ``state_dict`` keys, plus one keyword, ``backend``. Only ``forward`` differs:

* Every BatchNorm uses running statistics (eval): each convolution is one ``conv_bn_act`` launch that applies
  its BN as a per-channel scale and shift in fp32 in the epilogue, computed from the BN's live tensors on every
  call (nothing folded or cached, so no weight edit can be missed), plus the ReLU; the block's last convolution
  takes the identity as ``residual`` or the downsample branch (1x1 conv + its BN) as ``shortcut`` in the same
  launch, so a BasicBlock is 2 launches and a Bottleneck 3, downsample included.
* Otherwise (training): NormConv. ``conv_stats`` produces each raw conv output with its batch statistics,
  :mod:`resnet_fused.norm` turns them into per-channel scale/shift (updating running statistics), the next
  ``conv_stats`` applies that BN+ReLU to its input on load, and ``scale_bias_add_relu`` is the tail, with the
  downsample branch's BN in the same kernel.

BatchNorm2d, SyncBatchNorm and torchvision's FrozenBatchNorm2d are fused. A FrozenBatchNorm2d (detection
backbones) or a BatchNorm in eval mode is a constant per-channel scale/shift, so a block whose norms all use
running statistics takes the one-launch eval path in training too; its op is differentiable in the input, the
conv weights and every BN tensor, so the convolutions keep training (frozen buffers get no gradient).

Blocks the fused path does not cover (another norm layer, an activation other than ReLU, biased or
non-square convs, an empty batch) run their own forward, so behaviour always matches torchvision. The driver
the blocks share with timm's (:mod:`resnet_fused.timm_blocks`) is in :mod:`resnet_fused.fused`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import backends, norm, report
from .fused import (_cast, _Fused, _FusedBlock, _FusedForward, _compute_dtype, _fused_class, _pair_issue, check_input,
                    register)

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "fuse", "convert_sync_batchnorm", "resnet18", "resnet34",
           "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
           "wide_resnet50_2", "wide_resnet101_2"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(_FusedBlock):
    """torchvision's ``BasicBlock``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, fused."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None, *, backend: str = "auto") -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        # Both self.conv1 and self.downsample layers downsample the input when stride != 1
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_fused(backend)

    _STAGES = (("conv1", "bn1"), ("conv2", "bn2"))
    _ACTS = ("relu",)

    def _eager_forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(_FusedBlock):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride in the 3x3), fused.

    ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``, ``expansion = 4``.
    """

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None, *, backend: str = "auto") -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        # Both self.conv2 and self.downsample layers downsample the input when stride != 1
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_fused(backend)

    _STAGES = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _ACTS = ("relu",)

    def _eager_forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(_Fused):
    """torchvision's ``ResNet`` with fused blocks and a fused stem (conv 7x7 s2 + BN + ReLU)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: list[bool] | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None, *, backend: str = "auto") -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self._init_fused(backend)

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # each element in the tuple indicates if we should replace
            # the 2x2 stride with a dilated convolution instead
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None "
                             f"or a 3-element tuple, got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN in each residual branch,
        # so that the residual branch starts with zeros, and each residual block behaves like an identity.
        # This improves the model by 0.2~0.3% according to https://arxiv.org/abs/1706.02677
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        extra = {"backend": self.backend} if issubclass(block, _FusedBlock) else {}

        layers = []
        layers.append(block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                            previous_dilation, norm_layer, **extra))
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer, **extra))

        return nn.Sequential(*layers)

    def _stages(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.conv1, self.bn1)]

    def _fusion_issue(self) -> str | None:
        return self._stem_issue()

    def _stem_issue(self) -> str | None:
        """Why the stem runs unfused (None: it runs fused)."""
        if type(self.relu) is not nn.ReLU:
            return f"activation relu is a {type(self.relu).__name__}, not an nn.ReLU"
        return _pair_issue(self.conv1, self.bn1, "conv1/bn1: ")

    def _stem(self, x: Tensor) -> Tensor:
        """``relu(bn1(conv1(x)))``: one conv_bn_act launch in eval, conv_stats + BN + ReLU in training."""
        if (x.dim() != 4 or x.shape[0] == 0 or not x.is_floating_point() or self._stem_issue() is not None):
            return self.relu(self.bn1(self.conv1(x)))
        check_input(x, self.conv1)
        be = backends.resolve(self.backend, x)
        dtype = _compute_dtype(x, self.conv1.weight)
        run = _FusedForward([(self.conv1, self.bn1)])
        with torch.autocast(x.device.type, enabled=False):
            xc = _cast(x, dtype)
            if not norm.uses_batch_stats(self.bn1):
                return run.eval(be, xc, dtype, None, None)
            c, scale, shift = run.train(be, xc, dtype)
            return be.bn_relu(c, scale, shift)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.maxpool(self._stem(x))

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


# ---------------------------------------------------------------------------------------------------------
# Converting torchvision models
# ---------------------------------------------------------------------------------------------------------

for _cls in (BasicBlock, Bottleneck, ResNet):
    register("torchvision.models.resnet", _cls.__name__, _cls)


def fuse(module: nn.Module, backend: str = "auto", verbose: bool = False) -> nn.Module:
    """Fuse every ResNet block in ``module`` (itself included), in place: torchvision's ``BasicBlock``,
    ``Bottleneck`` and ``ResNet`` (also inside detection and segmentation models) and timm's ``BasicBlock`` and
    ``Bottleneck``.

    Each converted module keeps its identity, submodules, parameters, buffers and hooks — only its class
    changes (as ``torch.nn.utils.parametrize`` does) — so an optimizer built before ``fuse`` keeps training
    the model and ``state_dict`` keys stay torchvision's (timm's). Already fused modules get ``backend`` set.
    Subclasses of those classes are left alone: their ``forward`` may differ. A converted block that the fused
    path does not cover (another norm layer or activation, SE, ...) runs its own forward.

    Warns once when nothing in ``module`` can run fused; ``verbose=True`` prints :func:`resnet_fused.explain`'s
    table. Returns ``module``.
    """
    backends.check_name(backend)
    for m in module.modules():
        cls = _fused_class(m)
        if cls is None:
            continue
        if type(m) is not cls:
            m.__class__ = cls
        m._init_fused(backend)
    if verbose:
        report.explain(module)
    report.warn_if_nothing_fused(module)
    return module


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm with ``torch.nn.SyncBatchNorm`` (same parameters and buffers, same keys).

    The fused blocks' BN finalize step then combines (mean, variance, count) over ``process_group`` (default:
    the whole world) before normalizing, so statistics cover the global batch as SyncBatchNorm's do.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)


# ---------------------------------------------------------------------------------------------------------
# Constructors (torchvision's signatures)
# ---------------------------------------------------------------------------------------------------------

def _ovewrite_named_param(kwargs: dict[str, Any], param: str, new_value: Any) -> None:
    if param in kwargs:
        if kwargs[param] != new_value:
            raise ValueError(f"The parameter '{param}' expected value {new_value} but got {kwargs[param]} instead.")
    else:
        kwargs[param] = new_value


def _verify_weights(enum_name: str, weights: Any) -> Any:
    """Accept a member of torchvision's ``enum_name`` Weights enum, its name as a string, or None.

    torchvision's own ``verify`` checks the member, so one of another enum (``resnet18(weights=
    ResNet50_Weights.IMAGENET1K_V1)``) raises torchvision's ``TypeError`` before anything is built or
    downloaded."""
    if weights is None:
        return None
    if not isinstance(weights, str) and not (hasattr(weights, "get_state_dict") and hasattr(weights, "meta")):
        raise TypeError(f"weights must be None, a torchvision {enum_name} member or its name, got {weights!r}")
    import torchvision.models  # a Weights member or its name: torchvision is there

    return getattr(torchvision.models, enum_name).verify(weights)


def _resnet(block: type[BasicBlock | Bottleneck], layers: list[int], weights: Any, progress: bool,
            enum_name: str, **kwargs: Any) -> ResNet:
    weights = _verify_weights(enum_name, weights)
    if weights is not None:
        _ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`__."""
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, "ResNet18_Weights", **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`__."""
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, "ResNet34_Weights", **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 (v1.5) from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`__."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, "ResNet50_Weights", **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 (v1.5) from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`__."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "ResNet101_Weights", **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 (v1.5) from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`__."""
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, "ResNet152_Weights", **kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d from `Aggregated Residual Transformation <https://arxiv.org/abs/1611.05431>`__."""
    _ovewrite_named_param(kwargs, "groups", 32)
    _ovewrite_named_param(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, "ResNeXt50_32X4D_Weights", **kwargs)


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d from `Aggregated Residual Transformation <https://arxiv.org/abs/1611.05431>`__."""
    _ovewrite_named_param(kwargs, "groups", 32)
    _ovewrite_named_param(kwargs, "width_per_group", 8)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "ResNeXt101_32X8D_Weights", **kwargs)


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d from `Aggregated Residual Transformation <https://arxiv.org/abs/1611.05431>`__."""
    _ovewrite_named_param(kwargs, "groups", 64)
    _ovewrite_named_param(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "ResNeXt101_64X4D_Weights", **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 from `Wide Residual Networks <https://arxiv.org/abs/1605.07146>`__."""
    _ovewrite_named_param(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, "Wide_ResNet50_2_Weights", **kwargs)


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2 from `Wide Residual Networks <https://arxiv.org/abs/1605.07146>`__."""
    _ovewrite_named_param(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, "Wide_ResNet101_2_Weights", **kwargs)
