"""Drop-in torchvision ResNets whose residual blocks run as fused kernels.

``BasicBlock``, ``Bottleneck`` and ``ResNet`` subclass torchvision's classes (``isinstance`` answers as for
torchvision's) and are built by torchvision's constructors, so submodule names, initialization and ``state_dict``
keys are torchvision's; they add one keyword, ``backend``. Only ``forward`` differs:

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

from torchvision.models import resnet as tv
from torchvision.models.resnet import conv1x1, conv3x3  # noqa: F401  (torchvision's helpers, under their names)

from . import backends, dispatch, norm, report
from .fused import (_cast, _Fused, _FusedBlock, _FusedForward, _compute_dtype, _fused_class, _hook_issue, _pair_issue,
                    check_input, is_fx_symbolic_tracing, register)

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "fuse", "convert_sync_batchnorm", "resnet18", "resnet34",
           "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
           "wide_resnet50_2", "wide_resnet101_2"]


class BasicBlock(_FusedBlock, tv.BasicBlock):
    """torchvision's ``BasicBlock``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, fused."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None, *, backend: str = "auto") -> None:
        tv.BasicBlock.__init__(self, inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self._init_fused(backend)

    _STAGES = (("conv1", "bn1"), ("conv2", "bn2"))
    _ACTS = ("relu",)

    def _eager_forward(self, x: Tensor) -> Tensor:
        return tv.BasicBlock.forward(self, x)


class Bottleneck(_FusedBlock, tv.Bottleneck):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride in the 3x3), fused.

    ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``, ``expansion = 4``.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None, *, backend: str = "auto") -> None:
        tv.Bottleneck.__init__(self, inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self._init_fused(backend)

    _STAGES = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _ACTS = ("relu",)

    def _eager_forward(self, x: Tensor) -> Tensor:
        return tv.Bottleneck.forward(self, x)


class ResNet(_Fused, tv.ResNet):
    """torchvision's ``ResNet`` with fused blocks and a fused stem (conv 7x7 s2 + BN + ReLU)."""

    def __init__(self, block: type[tv.BasicBlock | tv.Bottleneck], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: list[bool] | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None, *, backend: str = "auto") -> None:
        self._init_fused(backend)  # first: torchvision's constructor builds the blocks (_make_layer) with it
        tv.ResNet.__init__(self, block, layers, num_classes, zero_init_residual, groups, width_per_group,
                           replace_stride_with_dilation, norm_layer)

    def _make_layer(self, block: type[tv.BasicBlock | tv.Bottleneck], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        layer = tv.ResNet._make_layer(self, block, planes, blocks, stride, dilate)
        for m in layer:
            if isinstance(m, _FusedBlock):
                m._init_fused(self.backend)
        return layer

    def _stages(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.conv1, self.bn1)]

    def _fusion_issue(self) -> str | None:
        return self._stem_issue()

    def _hook_issue(self) -> str | None:
        return _hook_issue(self, ("conv1", "bn1", "relu"))  # maxpool runs as its module: its hooks fire

    def _stem_issue(self) -> str | None:
        """Why the stem runs unfused (None: it runs fused)."""
        if type(self.relu) is not nn.ReLU:
            return f"activation relu is a {type(self.relu).__name__}, not an nn.ReLU"
        return _pair_issue(self.conv1, self.bn1, "conv1/bn1: ")

    def _stem(self, x: Tensor) -> Tensor:
        """``relu(bn1(conv1(x)))``: one conv_bn_act launch in eval, conv_stats + BN + ReLU in training."""
        if (is_fx_symbolic_tracing() or dispatch.eager_memo(self, "stem", x) or x.dim() != 4
                or x.shape[0] == 0 or not x.is_floating_point() or self._stem_issue() is not None
                or self._hook_issue() is not None):
            return self.relu(self.bn1(self.conv1(x)))
        check_input(x, self.conv1)
        parts = {"conv1": self.conv1, "bn1": self.bn1, "relu": self.relu}
        return dispatch.run(self, "stem", parts, x, 1, 1, self._fused_stem,
                            lambda p, x: p["relu"](p["bn1"](p["conv1"](x))))

    def _fused_stem(self, be, x: Tensor) -> Tensor:
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
    Subclasses of those classes are left alone: their ``forward`` may differ — except the classes FSDP2's
    ``fully_shard`` generates (``FSDPBasicBlock``), which only add hooks: their modules get FSDP2's subclass of the
    fused class. A converted block that the fused path does not cover (another norm layer or activation, SE, ...)
    runs its own forward, and so does a block while one of its modules carries a hook.

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


def _resnet(block: type[tv.BasicBlock | tv.Bottleneck], layers: list[int], weights: Any, progress: bool,
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
