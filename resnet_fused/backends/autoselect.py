"""``auto`` at the level of one op call: the backend order :func:`resnet_fused.backends.resolve` uses for ``auto``.

The fused blocks and the ResNet stem do not use it: they race every way the package can run them, per block and
torchvision's own forward included, in :mod:`resnet_fused.dispatch`. This order serves what asks for one backend
module without a block (``explain``'s backend column) and is :mod:`resnet_fused.dispatch`'s static order without
``eager``: on a GPU ``triton``, then ``cuda``, then ``reference`` (the first that can run the input);
``reference`` on a CPU. ``RESNET_FUSED_AUTO_BACKEND=triton|cuda|reference`` puts that backend first.
"""

from __future__ import annotations

import os

import torch

CANDIDATES = ("triton", "cuda")
DEFAULT_ORDER = ("triton", "cuda", "reference")
ENV_FORCE = "RESNET_FUSED_AUTO_BACKEND"
EAGER = "eager"
FORCEABLE = (EAGER, "reference", "triton", "cuda")


def env_choice(var: str, choices: tuple[str, ...]) -> str | None:
    """The one of ``choices`` that environment variable ``var`` names (None when unset or empty); a ``ValueError``
    naming the choices for anything else."""
    env = os.environ.get(var, "").strip()
    if not env:
        return None
    if env not in choices:
        raise ValueError(f"{var}={env!r}: choose one of {', '.join(choices)}")
    return env


def forced_candidate() -> str | None:
    """What ``RESNET_FUSED_AUTO_BACKEND`` names (``eager``, ``reference``, ``triton`` or ``cuda``; empty: nothing),
    else None."""
    return env_choice(ENV_FORCE, FORCEABLE)


def order(device: torch.device, dtype: torch.dtype, runnable: dict | None = None) -> tuple[str, ...]:
    """The order in which ``auto`` tries backends for a CUDA input of ``dtype`` on ``device``: the backend
    ``RESNET_FUSED_AUTO_BACKEND`` names first (``eager`` has no backend module: ignored here), then
    :data:`DEFAULT_ORDER`."""
    first = forced_candidate()
    if first is None or first == EAGER:
        return DEFAULT_ORDER
    return (first,) + tuple(b for b in DEFAULT_ORDER if b != first)
