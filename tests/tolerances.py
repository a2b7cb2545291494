"""One table of tolerances per dtype, shared by the tests that compare against PyTorch/torchvision."""

import torch

# (rtol, atol) for a fused result vs the same computation in PyTorch in the same dtype.
TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def assert_close(actual, expected, dtype=None, scale=1.0, msg=None):
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: expected's dtype)."""
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale, msg=msg)
