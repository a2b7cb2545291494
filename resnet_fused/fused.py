"""The fused residual block: its forward driver, the rules for what it covers, and which classes fuse() converts.

A block is ``act(bn_n(conv_n(... act(bn_1(conv_1(x))) ...)) + shortcut(x))`` with ReLU activations.
:class:`_FusedBlock` describes one by the names of its modules, so torchvision's blocks
(:mod:`resnet_fused.models`) and timm's (:mod:`resnet_fused.timm_blocks`) run the same driver,
:func:`_block_forward`:

* every BatchNorm uses running statistics (eval): each convolution is one ``conv_bn_act`` launch applying its BN
  as a per-channel scale/shift from the BN's live tensors, plus the ReLU; the last takes the identity as
  ``residual`` or the downsample branch (1x1 conv + BN) as ``shortcut`` in the same launch;
* otherwise (training): each convolution produces its raw output with its batch statistics (NormConv), applying
  the previous BN+ReLU on load, and ``scale_bias_add_relu`` is the tail, the downsample's BN in the same kernel.

The downsample branch is torchvision's ``Sequential(conv1x1, BN)`` or timm's average-pool downsample (``d``
variants: ATen's ``avg_pool2d`` with the pool's arguments, then the same 1x1 conv + BN shortcut).

:func:`_pair_issue` and :meth:`_FusedBlock._fusion_issue` say why a block cannot run fused; it then runs its
original forward. So it does, decided per call, while one of its modules carries a hook (:func:`_hook_issue`:
forward, pre- or backward hooks, pruning, global module hooks), which the fused path would skip, and under
``torch.fx`` symbolic tracing, which then records the original computation. ``FUSED`` maps the classes
:func:`resnet_fused.fuse` converts to their fused classes: the modules defining those register them on import
(:mod:`resnet_fused.models` for torchvision's, :mod:`resnet_fused.timm_blocks` for timm's, imported only when a timm
block is met); FSDP2's generated subclasses of them are recognised (:func:`_fsdp_wrapped`). This module imports
neither, so models, report and timm_blocks import it without a cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize, prune

from . import backends, dispatch, norm
from .backends.reference import Shortcut

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
    """The (1x1 conv, BN) of a downsample the fused tail takes as its shortcut: torchvision's
    ``Sequential(conv1x1(stride), BatchNorm2d)``, or timm's average-pool downsample (``d`` variants)
    ``Sequential(AvgPool2d or Identity, conv1x1, BatchNorm2d)``, whose pool :func:`_shortcut_input` applies."""
    if type(downsample) is not nn.Sequential or len(downsample) not in (2, 3):
        return None
    if len(downsample) == 3 and type(downsample[0]) not in (nn.AvgPool2d, nn.Identity):
        return None
    conv, bn = downsample[-2], downsample[-1]
    if (_fusable_pair(conv, bn) and conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
            and conv.dilation == (1, 1)):
        return conv, bn
    return None


def _shortcut_input(downsample: nn.Sequential, x: Tensor, xc: Tensor, dtype: torch.dtype) -> Tensor:
    """The input of the shortcut's 1x1 conv: the block input ``xc`` (cast to the compute dtype), or for timm's
    average-pool downsample ATen's ``avg_pool2d`` of ``x`` with the pool module's own arguments (``ceil_mode``,
    ``count_include_pad``: odd sizes exact), in x's dtype as the eager module computes it, then cast."""
    pool = downsample[0] if len(downsample) == 3 else None
    if type(pool) is not nn.AvgPool2d:
        return xc
    pooled = torch.nn.functional.avg_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                                            pool.count_include_pad, pool.divisor_override)
    return _cast(pooled, dtype)


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

    def eval(self, be, x: Tensor, dtype: torch.dtype, shortcut, identity: Tensor | None,
             shortcut_x: Tensor | None = None) -> Tensor:
        """One ``conv_bn_act`` (+ReLU) per stage with its BN from the live tensors; the last takes the shortcut
        (its conv applied to ``shortcut_x``, default ``x``) or the identity."""
        h = x
        last = len(self.stages) - 1
        for i, (conv, bn) in enumerate(self.stages):
            extra: dict[str, Any] = {}
            if i == last and shortcut is not None:
                conv_d, bn_d = shortcut
                sx = x if shortcut_x is None else shortcut_x
                extra = dict(shortcut=Shortcut(sx, _cast(conv_d.weight, dtype), norm.eval_bn(bn_d), conv_d.stride[0]))
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
        sx = _shortcut_input(block.downsample, x, xc, dtype) if shortcut is not None else None
        bns = [bn for _, bn in stages] + ([shortcut[1]] if shortcut is not None else [])
        if not any(norm.uses_batch_stats(bn) for bn in bns):
            return run.eval(be, xc, dtype, shortcut, identity, sx)
        c, scale, shift = run.train(be, xc, dtype)
        if shortcut is None:
            return be.scale_bias_add_relu(c, scale, shift, identity)
        c_d, scale_d, shift_d = conv_bn_train(be, *shortcut, sx, dtype)
        return be.scale_bias_add_relu(c, scale, shift, c_d, scale_d, shift_d)


def _module_hook_issue(name: str, m: nn.Module) -> str | None:
    """Why module ``m`` (the block's ``name``) must run as itself: it carries a hook its forward or backward would
    call (pruning is a forward pre-hook that recomputes the weight), or None."""
    if m._forward_pre_hooks:
        if any(isinstance(h, prune.BasePruningMethod) for h in m._forward_pre_hooks.values()):
            return f"{name} is pruned (torch.nn.utils.prune's forward pre-hook)"
        return f"{name} has a forward pre-hook"
    if m._forward_hooks:
        return f"{name} has a forward hook"
    if m._backward_hooks or m._backward_pre_hooks:
        return f"{name} has a backward hook"
    return None


def _hook_issue(owner: nn.Module, names: tuple[str, ...] | None = None) -> str | None:
    """Why ``owner`` runs its eager forward now because of hooks: a global module hook
    (``torch.nn.modules.module.register_module_*_hook``), or a hook on one of its modules (``names``; None: every
    submodule, at any depth), which the fused path would not call. None when there is none: the check costs a few
    dictionary lookups per module and call, so adding or removing a hook takes effect at the next call."""
    if (_module._global_forward_pre_hooks or _module._global_forward_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return "a global module hook is registered (torch.nn.modules.module.register_module_*_hook)"
    todo = [owner._modules.get(name) for name in names] if names is not None else list(owner._modules.values())
    for m in todo:  # grows while it is walked: every submodule, parents first
        if m is None:
            continue
        if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks:
            name = next(n for n, c in owner.named_modules() if c is m)
            return f"{_module_hook_issue(name, m)}: runs its eager forward while the hook is there"
        if names is None:
            todo.extend(m._modules.values())
    return None


class _Fused(nn.Module):
    """What every fused module carries: the backend name, and the (conv, norm) stages of its fused path with the
    reason that path does not run (:func:`resnet_fused.explain` reads both)."""

    backend: str

    def _init_fused(self, backend: str) -> None:
        self.backend = backends.check_name(backend)
        backends.preload(backend)

    def _stages(self) -> list[tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    def _fusion_issue(self) -> str | None:
        """Why the fused path cannot cover the modules as they are (None: it can)."""
        raise NotImplementedError

    def _hook_issue(self) -> str | None:
        """Why the fused path does not run now because of hooks (None: no hook is skipped)."""
        raise NotImplementedError

    def _eager_reason(self) -> str | None:
        """Why the module runs its eager forward now (None: it runs fused), as :func:`resnet_fused.explain` says."""
        return self._hook_issue() or self._fusion_issue()

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
    * ``_eager_forward``: the original forward, run whenever :meth:`_fusion_issue` names a reason, while one of the
      block's modules carries a hook (:meth:`_hook_issue`), and under ``torch.fx`` symbolic tracing.
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

    def _hook_issue(self) -> str | None:
        return _hook_issue(self)

    def _eager_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # Under torch.fx symbolic tracing (create_feature_extractor) the block is its eager computation: a graph of
        # its modules and ops. Hooks on its modules (pruning included) are honoured by running it eagerly, and so
        # is a call auto has measured eager the fastest for (dispatch.eager_memo: nothing else to check then).
        if (is_fx_symbolic_tracing() or dispatch.eager_memo(self, "block", x)
                or self._hook_issue() is not None):
            return self._eager_forward(x)
        return _block_forward(self, x)


# ---------------------------------------------------------------------------------------------------------
# Conversion rules: which classes fuse() converts
# ---------------------------------------------------------------------------------------------------------

# (module, class name) of a class fuse() converts -> its fused class. Exactly those classes: a subclass may
# change the forward. Filled by the modules that define the fused classes.
FUSED: dict[tuple[str, str], type[_Fused]] = {}

# Where the fused classes for another library's blocks are defined, imported when one of its blocks is met (so the
# library stays optional and is imported only by its own models).
_PROVIDERS = {"timm.models.resnet": "resnet_fused.timm_blocks"}


def register(module: str, name: str, fused_cls: type[_Fused]) -> None:
    """Make :func:`resnet_fused.fuse` convert instances of exactly the class ``module.name`` to ``fused_cls``
    (matched by name, so that library need not be imported)."""
    FUSED[(module, name)] = fused_cls


def _fsdp_wrapped(cls: type) -> type | None:
    """The class FSDP2's ``fully_shard`` wrapped in ``cls``, or None. ``fully_shard`` swaps a module's class ``C``
    for a generated ``FSDP<C>(FSDPModule, C)``, whose own member is ``__deepcopy__``: all it changes is the hooks
    it registers on the instance and FSDPModule's methods."""
    bases = cls.__bases__
    if (len(bases) == 2 and bases[0].__name__ == "FSDPModule" and bases[0].__module__.startswith("torch.distributed.")
            and cls.__name__ == f"FSDP{bases[1].__name__}"):
        return bases[1]
    return None


_FSDP_CLASSES: dict[tuple[type, type], type] = {}


def _fsdp_class(wrapper: type, fused_cls: type[_Fused]) -> type:
    """FSDP2's class for ``fused_cls``, made as ``fully_shard`` makes ``wrapper`` (its mixin, its ``__deepcopy__``)."""
    key = (wrapper.__bases__[0], fused_cls)
    if key not in _FSDP_CLASSES:
        members = {k: v for k, v in wrapper.__dict__.items() if k == "__deepcopy__"}
        _FSDP_CLASSES[key] = type(f"FSDP{fused_cls.__name__}", (key[0], fused_cls), members)
    return _FSDP_CLASSES[key]


def registered(cls: type) -> type[_Fused] | None:
    """The fused class :func:`resnet_fused.fuse` converts exactly ``cls`` to (its library's fused classes
    imported first when one of its blocks is met), or None."""
    key = (cls.__module__, cls.__qualname__)
    if key not in FUSED and cls.__module__ in _PROVIDERS:
        importlib.import_module(_PROVIDERS[cls.__module__])
    return FUSED.get(key)


def _fused_class(module: nn.Module) -> type[_Fused] | None:
    """The class fuse() gives ``module``: the fused class registered in ``FUSED`` for its exact class, or its own
    class when it is fused already; for a module FSDP2 has wrapped (``fully_shard`` before ``fuse``), FSDP2's
    class for that fused class. None when fuse() leaves it."""
    cls = type(module)
    inner = _fsdp_wrapped(cls)
    base = cls if inner is None else inner
    if base in FUSED.values():
        return cls
    fused_cls = registered(base)
    if fused_cls is None or inner is None:
        return fused_cls
    return _fsdp_class(cls, fused_cls)
