"""Backend registry: which implementation of the fused ops runs a given input.

Backends are modules exposing ``NAME``, ``unsupported(x, groups, dilation) -> str | None``, the ops
``conv_bias_act``, ``conv_stats``, ``scale_bias_add_relu`` and ``bn_relu`` (see
:mod:`resnet_fused.backends.reference`), and optionally ``finalize``, a fused BatchNorm finalize (see
:func:`resnet_fused.norm.batch_scale_shift`):

* ``reference`` — plain PyTorch, every device and floating dtype: the oracle and the CPU path;
* ``triton``    — Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``);
* ``cuda``      — the C++/CUDA extension ``resnet_fused._C``.

``auto`` in a fused block or stem races every way the package can run it, eager torchvision included, checked
against a float64 reference (:mod:`resnet_fused.dispatch`). :func:`resolve` with ``auto`` (one backend module,
no block: ``explain``'s column) takes the first backend that can run the input in a fixed order per device
(:mod:`.autoselect`): CPU tensors use ``reference``; CUDA tensors ``triton``, ``cuda``, then ``reference``. When
``auto`` has to fall back because a preferred backend cannot run a config (grouped convolution, an odd dtype), it
warns once per reason. A backend named explicitly that cannot run raises a ``RuntimeError`` that says why.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

from . import autoselect, reference

BACKENDS = ("reference", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS


_modules: dict[str, ModuleType | str] = {"reference": reference}
_warned: set[str] = set()


def check_name(name: str) -> str:
    """Validate a backend name, raising ``ValueError`` for an unknown one."""
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(map(repr, CHOICES))}")
    return name


def load(name: str) -> ModuleType | str:
    """The backend module, or a string saying why it cannot be imported here."""
    check_name(name)
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{name}")
        except ImportError as err:
            _modules[name] = f"it could not be imported ({err})"
    return _modules[name]


def preload(name: str) -> None:
    """Import now what a module set to backend ``name`` may run (the backend's module, the C++ extension), so that
    nothing is imported inside a ``torch.compile`` trace of its first call, which dynamo cannot trace (``auto``: every
    backend where a GPU is present, else the reference backend, all that ``auto`` runs on a CPU)."""
    names = (name,) if name != "auto" else (BACKENDS if torch.cuda.is_available() else ("reference",))
    for each in names:
        mod = load(each)
        if not isinstance(mod, str) and hasattr(mod, "is_built"):
            mod.is_built()  # the cuda backend imports and registers its extension on first use


def _probe() -> torch.Tensor:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.empty(1, 1, 1, 1, device=device)


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (on its GPU if it has one, else on its CPU)."""
    probe = _probe()
    names = []
    for name in BACKENDS:
        if _why_not(load(name), probe, 1, 1) is None:
            names.append(name)
    return names


def resolve(name: str, x: torch.Tensor, groups: int = 1, dilation: int = 1) -> ModuleType:
    """The backend module that runs input ``x`` of a block with the given conv ``groups``/``dilation``."""
    check_name(name)
    if name != "auto":
        mod = load(name)
        reason = _why_not(mod, x, groups, dilation)
        if reason is not None:
            raise RuntimeError(f"resnet_fused backend {name!r} cannot run this input: {reason}")
        return mod
    # Why each backend of the order cannot run x (None: it can), asked once per call.
    if x.device.type == "cuda":
        reasons = {b: _why_not(load(b), x, groups, dilation) for b in BACKENDS}
        order = autoselect.order(x.device, x.dtype)
    else:
        reasons, order = {"reference": reference.unsupported(x, groups, dilation)}, ("reference",)
    first = reasons[order[0]]
    if first is not None and first not in _warned:
        _warned.add(first)
        warnings.warn(f"resnet_fused: backend {order[0]!r} cannot run this input ({first}); falling back",
                      RuntimeWarning, stacklevel=3)
    for candidate in order:
        if reasons[candidate] is None:
            return load(candidate)
    return reference


def _why_not(mod: ModuleType | str, x: torch.Tensor, groups: int, dilation: int) -> str | None:
    return mod if isinstance(mod, str) else mod.unsupported(x, groups, dilation)
