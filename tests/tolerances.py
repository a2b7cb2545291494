"""One table of tolerances per dtype (the package's, :mod:`resnet_fused.tolerances`), and the three ways the
tests compare against it.

* :func:`assert_close_to_oracle` — the project's rule for a fused result: its error against an fp64 oracle (an
  fp64 formula, or torchvision run in float64 — never the code under test) is at most twice the error of
  PyTorch's own computation in the same dtype against that oracle, plus the table's tolerance. PyTorch's error
  is the measure of normal rounding: a result that is zero, doubled or otherwise wrong lands far outside it —
  and a comparison whose bound would let a zero or doubled result pass fails as ill-conditioned.
* :func:`assert_close` — the table's (rtol, atol) for ``dtype`` against a result computed another way in the
  same dtype (element by element, ``torch.testing.assert_close``).
* :func:`assert_close_at_scale` — the same with ``atol`` measured in units of the expected tensor's largest entry
  (gradients of a BN block span orders of magnitude, and an absolute bound on entries near zero means nothing);
  ``rtol`` stays the table's, so a zero or doubled result still fails element by element.
"""

import torch

from resnet_fused.tolerances import ORACLE_FACTOR, TOL, allowed_error


def assert_close(actual, expected, dtype=None, scale=1.0, msg=None):
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: expected's dtype)."""
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale, msg=msg)


def assert_close_at_scale(actual, expected, dtype=None, factor=1.0, msg=None):
    """Element by element: ``|actual − expected| ≤ atol·factor·max(1, max|expected|) + rtol·factor·|expected|``.

    ``rtol·factor`` must stay below 1/2, so that zeros or a doubled result cannot pass."""
    rtol, atol = TOL[dtype or expected.dtype]
    assert rtol * factor < 0.5, f"rtol {rtol} x {factor} would let a zero or doubled result pass"
    magnitude = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol * factor, atol=atol * factor * magnitude, msg=msg)


def oracle_errors(actual, eager, oracle) -> tuple[float, float, float]:
    """(max |actual − oracle|, max |eager − oracle|, max |oracle|), all in float64."""
    oracle = oracle.detach().double()
    if actual.shape != oracle.shape or eager.shape != oracle.shape:
        raise AssertionError(f"shapes differ: actual {tuple(actual.shape)}, eager {tuple(eager.shape)}, "
                             f"oracle {tuple(oracle.shape)}")
    if oracle.numel() == 0:
        return 0.0, 0.0, 0.0
    err = (actual.detach().double() - oracle).abs().max().item()
    eager_err = (eager.detach().double() - oracle).abs().max().item()
    return err, eager_err, oracle.abs().max().item()


def assert_close_to_oracle(actual, eager, oracle, dtype, what="result", factor=ORACLE_FACTOR, tol_scale=1.0):
    """The fused ``actual`` is within ``factor``x the error of PyTorch's ``eager`` result (same dtype) against the
    fp64 ``oracle``, plus the table's ``atol + rtol·max|oracle|`` for ``dtype`` (times ``tol_scale``, for a test
    that wants a tighter slack). NaN anywhere fails."""
    assert_oracle_errors(*oracle_errors(actual, eager, oracle), dtype, what, factor, tol_scale)


def assert_oracle_errors(err, eager_err, size, dtype, what="result", factor=ORACLE_FACTOR, tol_scale=1.0):
    """The rule of :func:`assert_close_to_oracle` on errors measured elsewhere (e.g. in a subprocess):
    ``err ≤ factor·eager_err + tol_scale·(atol + rtol·size)``."""
    rtol, atol = TOL[dtype]
    allowed = allowed_error(eager_err, size, dtype, factor, tol_scale)
    # A bound as large as the result itself lets zeros or a doubled result pass: the comparison is ill-conditioned
    # (PyTorch's own error in this dtype is as large as the result) and proves nothing.
    assert not (size > 2 * atol and allowed >= size), (
        f"{what}: this comparison cannot fail (allowed error {allowed:.3g} >= max |oracle| {size:.3g}: PyTorch's own "
        f"{dtype} error is {eager_err:.3g}); choose a better-conditioned case")
    assert err <= allowed, (f"{what}: error {err:.3g} vs the fp64 oracle, allowed {allowed:.3g} "
                            f"({factor:g} x PyTorch's {dtype} error {eager_err:.3g} + tolerance; max |oracle| "
                            f"{size:.3g})")
