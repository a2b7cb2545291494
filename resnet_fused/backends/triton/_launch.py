"""What every Triton launcher of this package shares: the launch counter and the op registration.

Fusion is the point of the package, so tests assert it by counting: each launcher calls :func:`record` once
per Triton kernel it launches. Under ``torch.compile`` the launchers run once while tracing, so the counter
counts traced launches there, not executed ones.

Each launcher is registered as a torch op (:func:`register_op`) so that ``torch.compile`` traces it: a
``triton_op`` whose kernels are wrapped with :func:`wrap` on GPUs; under the Triton interpreter (whose kernels
``wrap_triton`` hands back unwrapped, so a derived fake kernel would run the interpreter on fake tensors) an
opaque ``custom_op`` with an explicit fake kernel.
"""

import os

import torch

# Read once: Triton decides at kernel definition whether a kernel is interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_count = 0


def wrap(kernel):
    """``kernel`` wrapped for ``torch.compile`` tracing where this torch has ``wrap_triton``."""
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    return wrap_triton(kernel) if wrap_triton is not None else kernel


def register_op(name: str, impl, fake):
    """``impl`` registered as the torch op ``resnet_fused::<name>`` (see the module docstring)."""
    qualname = f"resnet_fused::{name}"
    if INTERPRET:
        op = torch.library.custom_op(qualname, mutates_args=())(impl)
        op.register_fake(fake)
        return op
    if hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"):
        return torch.library.triton_op(qualname, mutates_args=())(impl)
    return impl


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
