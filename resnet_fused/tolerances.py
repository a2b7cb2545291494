"""The project's tolerance rule: how far a fused result may be from an fp64 oracle.

A result in ``dtype`` is accepted when its largest error against the fp64 oracle is at most ``ORACLE_FACTOR``
times the error of PyTorch's own computation in the same dtype (the measure of normal rounding), plus the
table's ``atol + rtol·max|oracle|``. A zero, doubled or otherwise wrong result lands far outside it. The tests
(tests/tolerances.py) and ``auto``'s validation of every candidate (:mod:`resnet_fused.dispatch`) use this rule.
"""

from __future__ import annotations

import math

import torch

# (rtol, atol) for a fused result vs the same computation in PyTorch in the same dtype.
TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}

# A fused result may be this many times as far from the fp64 oracle as PyTorch's own result in the same dtype.
ORACLE_FACTOR = 2.0


def allowed_error(eager_err: float, size: float, dtype: torch.dtype, factor: float = ORACLE_FACTOR,
                  tol_scale: float = 1.0) -> float:
    """The largest error against the fp64 oracle the rule accepts: ``factor·eager_err + tol_scale·(atol +
    rtol·size)``, with ``eager_err`` PyTorch's own error in ``dtype`` and ``size`` the oracle's max |entry|."""
    rtol, atol = TOL[dtype]
    return factor * eager_err + tol_scale * (atol + rtol * size)


def max_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    """max |actual − oracle| in float64 (inf for a NaN/inf entry or a shape mismatch; 0 for empty tensors)."""
    if actual.shape != oracle.shape:
        return math.inf
    if oracle.numel() == 0:
        return 0.0
    err = (actual.detach().double() - oracle.detach().double()).abs().max().item()
    return err if math.isfinite(err) else math.inf
