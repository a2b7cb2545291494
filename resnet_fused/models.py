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
non-square convs, an empty batch) run their own forward, so behaviour always matches torchvision.
``_FusedBlock`` describes a block by the names of its modules, so timm's ResNet blocks
(:mod:`resnet_fused.timm_blocks`) run the same driver.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import backends, dispatch, norm
from .backends.reference import Shortcut

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


# ---------------------------------------------------------------------------------------------------------
# The fused forward shared by both block types
# ---------------------------------------------------------------------------------------------------------

def _square(v: tuple[int, ...]) -> bool:
    return all(e == v[0] for e in v)


def _plain_conv(conv: nn.Module) -> bool:
    """An ``nn.Conv2d`` whose forward is ``nn.Conv2d``'s: the class itself, or the class
    ``torch.nn.utils.parametrize`` derives from it (its ``weight`` is recomputed on every access, so the fused
    path sees the parametrized weight live and differentiates through it)."""
    cls = type(conv)
    return cls is nn.Conv2d or (parametrize.is_parametrized(conv) and cls.__bases__ == (nn.Conv2d,))


# The norm layers a convolution's epilogue can apply: exactly these classes (a subclass, such as timm's
# BatchNormAct2d, may add an activation to its forward), plus torchvision's FrozenBatchNorm2d (norm.is_frozen).
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _pair_issue(conv: nn.Module, bn: nn.Module, names: str = "") -> str | None:
    """Why ``bn(conv(x))`` cannot run as one fused convolution with its BN as a per-channel scale/shift, or
    None when it can. ``names`` prefixes the message ("conv2/bn2: ")."""
    if not _plain_conv(conv):
        return f"{names}convolution is a {type(conv).__name__}, not an nn.Conv2d"
    if conv.bias is not None:
        return f"{names}convolution has a bias"
    if conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):
        return f"{names}convolution pads with padding_mode={conv.padding_mode!r}, padding={conv.padding!r}"
    if not all(map(_square, (conv.stride, conv.padding, conv.dilation))):
        return f"{names}convolution has a non-square stride, padding or dilation"
    if not (type(bn) in _BATCH_NORMS or norm.is_frozen(bn)):
        return (f"{names}norm layer is a {type(bn).__name__} (fused: BatchNorm2d, SyncBatchNorm, "
                f"FrozenBatchNorm2d)")
    if norm.channels(bn) != conv.out_channels:
        return f"{names}norm layer has {norm.channels(bn)} channels for {conv.out_channels} conv outputs"
    return None


def _fusable_pair(conv: nn.Module, bn: nn.Module) -> bool:
    return _pair_issue(conv, bn) is None


def _shortcut_pair(downsample: nn.Module | None) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
    """torchvision's downsample ``Sequential(conv1x1(stride), BatchNorm2d)``, if that is what it is."""
    if (type(downsample) is nn.Sequential and len(downsample) == 2 and _fusable_pair(*downsample)
            and downsample[0].kernel_size == (1, 1) and downsample[0].padding == (0, 0)
            and downsample[0].groups == 1 and downsample[0].dilation == (1, 1)):
        return downsample[0], downsample[1]
    return None


def _inactive_module_issue(name: str, m: nn.Module | None) -> str | None:
    """Why the optional module ``name`` of a block (timm's ``aa``, ``se``, ``drop_block``, ``drop_path``) is
    not the identity now, or None when it is absent, an ``nn.Identity``, or timm's ``DropPath``/``DropBlock2d``
    in eval mode or with a drop probability of 0 (their forward then returns its input)."""
    if m is None or type(m) is nn.Identity:
        return None
    cls = type(m)
    if (cls.__name__ in ("DropPath", "DropBlock2d") and cls.__module__.startswith("timm.")
            and (not m.training or not m.drop_prob)):
        return None
    return f"{name} is a {cls.__name__}" + (" in training mode" if cls.__name__ in ("DropPath", "DropBlock2d")
                                            else "")


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the convolutions run in: autocast's for eligible inputs, else the weights' (== x's)."""
    device = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if x.dtype != weight.dtype:
        raise RuntimeError(f"Input type ({x.dtype}) and weight type ({weight.dtype}) should be the same")
    return x.dtype


def check_input(x: Tensor, conv: nn.Conv2d) -> None:
    """Reject input the block cannot take, with the error class PyTorch raises for it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")
    if not x.is_floating_point():
        raise RuntimeError(f"expected a floating-point input, got {x.dtype}")
    if x.shape[1] != conv.in_channels:
        raise RuntimeError(f"Given groups={conv.groups}, weight of size {list(conv.weight.shape)}, expected "
                           f"input{list(x.shape)} to have {conv.in_channels} channels, but got {x.shape[1]} "
                           f"channels instead")
    if x.device != conv.weight.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but the input is on {x.device} "
                           f"and the weights are on {conv.weight.device}")


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _finalize(be):
    """The backend's fused BN finalize (see :func:`resnet_fused.norm.batch_scale_shift`), if it has one."""
    return getattr(be, "finalize", None)


class _FusedForward:
    """Runs a chain of (conv, BN) stages plus a shortcut through one backend."""

    def __init__(self, stages: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> None:
        self.stages = stages

    def eval(self, be, x: Tensor, dtype: torch.dtype, shortcut, identity: Tensor | None) -> Tensor:
        """One ``conv_bn_act`` (+ReLU) per stage with its BN from the live tensors; the last takes the shortcut
        or the identity."""
        h = x
        last = len(self.stages) - 1
        for i, (conv, bn) in enumerate(self.stages):
            extra: dict[str, Any] = {}
            if i == last and shortcut is not None:
                conv_d, bn_d = shortcut
                extra = dict(shortcut=Shortcut(x, _cast(conv_d.weight, dtype), norm.eval_bn(bn_d), conv_d.stride[0]))
            elif i == last and identity is not None:
                extra = dict(residual=identity)
            h = be.conv_bn_act(h, _cast(conv.weight, dtype), norm.eval_bn(bn), conv.stride[0], conv.padding[0],
                               conv.dilation[0], conv.groups, relu=True, **extra)
        return h

    def train(self, be, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Every stage as ``conv_stats`` + finalize, each applying the previous BN+ReLU on load; returns the
        last raw conv output with its BN scale/shift, which the caller's tail applies."""
        h, scale, shift = x, None, None
        for conv, bn in self.stages:
            h, scale, shift = conv_bn_train(be, conv, bn, h, dtype, scale, shift)
        return h, scale, shift


def conv_bn_train(be, conv: nn.Conv2d, bn: nn.Module, x: Tensor, dtype: torch.dtype, in_scale: Tensor | None = None,
                  in_shift: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A training stage ``c = conv(relu(x*in_scale + in_shift) or x)`` with ``bn``'s (scale, shift) for c: one launch
    (``be.conv_bn_train``, the finalize inside the convolution) where the backend has it and the BN uses batch
    statistics it can finalize alone (:func:`resnet_fused.norm.train_bn`), else ``conv_stats`` + finalize."""
    weight = _cast(conv.weight, dtype)
    args = (conv.stride[0], conv.padding[0], conv.dilation[0], conv.groups)
    fused = getattr(be, "conv_bn_train", None)
    spec = norm.train_bn(bn) if fused is not None and norm.uses_batch_stats(bn) else None
    if spec is not None:
        return fused(x, weight, spec, *args, in_scale=in_scale, in_shift=in_shift)
    stats = be.conv_stats(x, weight, *args, in_scale=in_scale, in_shift=in_shift)
    return (stats[0], *norm.scale_shift(bn, stats, _finalize(be)))


def _block_forward(block: _FusedBlock, x: Tensor) -> Tensor:
    stages = block._stages()
    check_input(x, stages[0][0])
    if x.shape[0] == 0 or block._fusion_issue() is not None:
        return block._eager_forward(x)
    # backend "auto": the fastest of every fused path and the block's own forward, checked (resnet_fused.dispatch)
    return dispatch.run(block, "block", {"block": block}, x, max(c.groups for c, _ in stages),
                        max(c.dilation[0] for c, _ in stages), lambda be, x: _fused_block_forward(block, be, x),
                        lambda parts, x: type(block)._eager_forward(parts["block"], x))


def _fused_block_forward(block: _FusedBlock, be, x: Tensor) -> Tensor:
    stages = block._stages()
    shortcut = _shortcut_pair(block.downsample)
    dtype = _compute_dtype(x, stages[0][0].weight)
    run = _FusedForward(stages)
    # A downsample of another shape than conv1x1+BN runs as the module it is and joins as the residual.
    generic = block.downsample(x) if block.downsample is not None and shortcut is None else None
    with torch.autocast(x.device.type, enabled=False):
        xc = _cast(x, dtype)
        identity = _cast(generic, dtype) if generic is not None else (xc if shortcut is None else None)
        bns = [bn for _, bn in stages] + ([shortcut[1]] if shortcut is not None else [])
        if not any(norm.uses_batch_stats(bn) for bn in bns):
            return run.eval(be, xc, dtype, shortcut, identity)
        c, scale, shift = run.train(be, xc, dtype)
        if shortcut is None:
            return be.scale_bias_add_relu(c, scale, shift, identity)
        c_d, scale_d, shift_d = conv_bn_train(be, *shortcut, xc, dtype)
        return be.scale_bias_add_relu(c, scale, shift, c_d, scale_d, shift_d)


class _Fused(nn.Module):
    """What every fused module carries: the backend name."""

    backend: str

    def _init_fused(self, backend: str) -> None:
        self.backend = backends.check_name(backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class _FusedBlock(_Fused):
    """What every fused residual block shares: the forward driver over a declarative description of the block.

    A block is ``act(bn_n(conv_n(... act(bn_1(conv_1(x))) ...)) + downsample(x))`` where every activation is a
    ReLU. A class states where those modules live, so torchvision's and timm's blocks (other attribute names)
    run the same driver:

    * ``_STAGES``: the (conv, norm) attribute names in order (conv1/bn1, conv2/bn2[, conv3/bn3]);
    * ``_ACTS``: the activation attributes, each of which must be an ``nn.ReLU`` for the fused path;
    * ``_IDENTITIES``: optional modules of the block that must be absent or the identity (timm's anti-aliasing,
      attention, DropBlock and DropPath);
    * ``downsample``: the shortcut, fused when it is ``Sequential(conv1x1, BN)``, else run as it is and added
      as the residual;
    * ``_eager_forward``: the original forward, run whenever :meth:`_fusion_issue` names a reason.
    """

    _STAGES: tuple[tuple[str, str], ...] = ()
    _ACTS: tuple[str, ...] = ()
    _IDENTITIES: tuple[str, ...] = ()

    def _stages(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, conv), getattr(self, bn)) for conv, bn in self._STAGES]

    def _fusion_issue(self) -> str | None:
        """Why this block runs its original forward instead of the fused one (None: it runs fused)."""
        for conv, bn in self._STAGES:
            issue = _pair_issue(getattr(self, conv), getattr(self, bn), f"{conv}/{bn}: ")
            if issue is not None:
                return issue
        for name in self._ACTS:
            act = getattr(self, name)
            if type(act) is not nn.ReLU:
                return f"activation {name} is a {type(act).__name__}, not an nn.ReLU"
        for name in self._IDENTITIES:
            issue = _inactive_module_issue(name, getattr(self, name, None))
            if issue is not None:
                return issue
        return None

    def _eager_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return _block_forward(self, x)


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

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


# ---------------------------------------------------------------------------------------------------------
# Converting torchvision models
# ---------------------------------------------------------------------------------------------------------

_FUSED_CLASSES = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck, "ResNet": ResNet}
_TIMM_BLOCKS = ("BasicBlock", "Bottleneck")


def _fused_class(module: nn.Module) -> type[_Fused] | None:
    """The fused class for ``module``: torchvision's ``BasicBlock``/``Bottleneck``/``ResNet`` and timm's
    ``BasicBlock``/``Bottleneck`` (exactly those classes), or a module already of a fused class."""
    cls = type(module)
    if cls in _FUSED_CLASSES.values():
        return cls
    if cls.__module__ == "torchvision.models.resnet" and cls.__name__ in _FUSED_CLASSES:
        return _FUSED_CLASSES[cls.__name__]
    if cls.__module__ in ("timm.models.resnet", "resnet_fused.timm_blocks"):
        from . import timm_blocks  # timm is imported already: the model is timm's

        if cls in timm_blocks.FUSED.values():
            return cls
        return timm_blocks.FUSED.get(cls)
    return None


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
    from . import report

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
