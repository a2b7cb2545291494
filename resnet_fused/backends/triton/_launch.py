"""What every Triton launcher of this package shares: the launch counter and the op registration.

Fusion is the point of the package, so tests assert it by counting: each launcher calls :func:`record` once
per Triton kernel it launches. Under ``torch.compile`` the launchers run once while tracing, so the counter
counts traced launches there, not executed ones.

Each launcher is registered as a torch op (:func:`register_op`) so that ``torch.compile`` traces it: a
``triton_op`` whose kernels are wrapped with :func:`wrap` on GPUs; under the Triton interpreter (whose kernels
``wrap_triton`` cannot trace: a derived fake kernel would run the interpreter on fake tensors, and torch 2.11
refuses them) an opaque ``custom_op`` with an explicit fake kernel, its kernels unwrapped.

:func:`capture` records the launches instead of running them (the launchers bind their arguments as for a real
launch, so tensors on the ``meta`` device do): that is how ``benchmarks.compile_report`` compiles exactly what a
launch would compile, ahead of time, for a GPU this machine does not have.
"""

import contextlib
import os
from typing import Any, NamedTuple

import torch

from ..reference import is_tracing

# Read once: Triton decides at kernel definition whether a kernel is interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_count = 0
_captured: list | None = None  # the launches recorded inside capture(), else None
_direct = False  # inside direct(): the launchers bypass the registered ops


class Launch(NamedTuple):
    """One kernel launch as a launcher made it: the kernel (a JITFunction, or an Autotuner around one), the
    grid (a tuple, or a function of the chosen config's meta-parameters) and the arguments."""

    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _captured.append(Launch(self.kernel, grid, args, kwargs))
        return launch


@contextlib.contextmanager
def capture():
    """Inside this context the launchers record their kernel launches (a list of :class:`Launch`, yielded)
    instead of running them, and call their implementations directly instead of through the registered ops."""
    global _captured
    saved, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = saved


@contextlib.contextmanager
def direct():
    """Inside this context the launchers call their implementations directly instead of through the registered
    ops, so that a ``TorchDispatchMode`` sees every ATen op they run (launch-count tests)."""
    global _direct
    saved, _direct = _direct, True
    try:
        yield
    finally:
        _direct = saved


def wrap(kernel):
    """``kernel`` wrapped for ``torch.compile`` tracing where this torch has ``wrap_triton`` (a recorder
    inside :func:`capture`). Under the interpreter the kernel itself: the ops are opaque there, and some torch
    versions' ``wrap_triton`` (2.11) refuses an interpreted kernel."""
    if _captured is not None:
        return _Recorder(kernel)
    if INTERPRET:
        return kernel
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    return wrap_triton(kernel) if wrap_triton is not None else kernel


def register_op(name: str, impl, fake, mutates_args=()):
    """``impl`` registered as the torch op ``resnet_fused::<name>`` (see the module docstring), mutating the
    arguments named in ``mutates_args``; returns the function the launchers call: the op, or ``impl`` itself
    inside :func:`capture`, under :func:`device_guard` (every launcher calls its kernels through here)."""
    qualname = f"resnet_fused::{name}"
    if INTERPRET:
        op = torch.library.custom_op(qualname, mutates_args=mutates_args)(impl)
        op.register_fake(fake)
    elif hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"):
        op = torch.library.triton_op(qualname, mutates_args=mutates_args)(impl)
    else:
        return impl

    def call(*args):
        with device_guard(args):
            return impl(*args) if _captured is not None or _direct else op(*args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = impl.__doc__
    return call


def device_guard(args):
    """The CUDA device of the first CUDA tensor in ``args`` made current (Triton launches on the current
    device, whatever device the tensors are on), or nothing: no CUDA tensor, or while torch.compile traces (its
    generated code guards the device itself)."""
    dev = next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"), None)
    if dev is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


def cacheable(like: torch.Tensor) -> bool:
    """Whether a launch on ``like`` may use a workspace cached across calls: not while tracing (fake tensors,
    torch.compile) nor while capturing a CUDA graph, where a fresh buffer is made (and replayed with the graph)."""
    return not (is_tracing(like) or (like.device.type == "cuda" and torch.cuda.is_current_stream_capturing()))


_COUNTERS: dict = {}  # (device, stream) -> the int32 arrival counters kernels on that stream share


def counters(like: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` int32 arrival counters, all zero, on ``like``'s device, for kernels whose last program merges what
    the others wrote (:func:`.stats.arrive`). Every such kernel leaves the counters it used at zero, so one
    buffer per device and stream, zeroed once, serves every launch on that stream: no fill launch per call.
    While tracing (fake tensors, ``torch.compile``) or capturing a CUDA graph, a fresh zeroed buffer (then a fill
    in the graph, replayed with it) instead of the cache."""
    zeros = dict(device=like.device, dtype=torch.int32)
    if not cacheable(like):
        return torch.zeros(n, **zeros)
    stream = torch.cuda.current_stream(like.device).cuda_stream if like.device.type == "cuda" else None
    key = (like.device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 4096), **zeros)
    return buf[:n]


def record(n: int = 1) -> None:
    """Count ``n`` kernel launches."""
    global _count
    _count += n


def launch_count() -> int:
    """Kernel launches recorded since the last :func:`reset_launch_count`."""
    return _count


def reset_launch_count() -> None:
    """Set the launch counter back to zero."""
    global _count
    _count = 0
