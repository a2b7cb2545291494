"""Precision of the batch statistics that the CUTLASS training convolution (csrc/cutlass/fprop_stats.cu) makes in
its epilogue: mean-centred per-tile partials merged with Chan's formula, so BatchNorm's mean / biased variance do
not depend on how far the channel mean is from zero.

All tests are GPU tests (``gpu`` mark). They reach the kernel through the test hook
``torch.ops.resnet_fused_debug.cutlass_conv_stats`` (as tests/test_cutlass.py does) and through the public op
``torch.ops.resnet_fused.conv_stats``, which tries it first for float16 / bfloat16 channels_last calls; which path
ran is read from ``_C.cutlass_conv_launches()`` (a GPU build without the CUTLASS kernels fails these tests unless
``RESNET_FUSED_ALLOW_NO_CUTLASS=1``, as test_cutlass.py's). The statistics are compared with fp64 ``torch.var_mean``
of the ``c`` the kernel returned (the statistics are of the stored, rounded values): a 1x1 identity convolution (c =
x exactly) of inputs with channel means of 100 and 1000 and unit-order spreads, over N*H*W pixels spanning several
128-row tiles with a ragged last tile, a constant channel (variance exactly 0), a one-pixel batch, a 3x3 convolution
whose output mean is hundreds of times its spread, and bitwise reproducibility.
"""

from __future__ import annotations

import pytest
import torch

from extension import import_extension

_C = import_extension()

from test_cutlass import _require_cutlass  # noqa: E402  (a GPU build without CUTLASS fails, unless opted out)
from tolerances import assert_close  # noqa: E402

from resnet_fused.backends import cuda as cuda_backend  # noqa: E402
from resnet_fused.backends import reference  # noqa: E402

assert cuda_backend.is_built()

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Relative tolerance of the variance against fp64 statistics of the returned c; the mean's.
VAR_RTOL = 1e-4
MEAN_RTOL = 1e-5


def _conv_stats_hook(x, w, stride=1, padding=0):
    _require_cutlass()
    before = _C.cutlass_conv_launches()
    c, mean, var, ran = torch.ops.resnet_fused_debug.cutlass_conv_stats(
        x, w, None, None, [stride, stride], [padding, padding], [1, 1], 1)
    assert ran and _C.cutlass_conv_launches() == before + 1
    return c, mean, var


def _identity_weight(c, dtype):
    return torch.eye(c, device="cuda").view(c, c, 1, 1).to(dtype).contiguous(memory_format=torch.channels_last)


def _offset_input(n, c, h, w, dtype, offset):
    """offset + per-channel spreads in [0.5, 2] (so every channel has its own variance), channels_last."""
    spread = torch.linspace(0.5, 2.0, c, device="cuda").view(1, -1, 1, 1)
    x = torch.randn(n, c, h, w, device="cuda") * spread + offset
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def _check_stats(c, mean, var):
    ref_var, ref_mean = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), ref_mean, rtol=MEAN_RTOL, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=VAR_RTOL, atol=1e-7)


# name: (dtype, offset). Values v + 1000 in float16 are 0.5 apart and their squares (~1e6) exceed float16 (no
# matter: the kernel works in fp32 about centred values).
LARGE_MEANS = {
    "bf16_100": (torch.bfloat16, 100.0),
    "fp16_100": (torch.float16, 100.0),
    "fp16_1000": (torch.float16, 1000.0),
    "bf16_-300": (torch.bfloat16, -300.0),
}
# (N, H, W): 3*23*23 = 1587 pixels = 12 full tiles of 128 rows + 51; 2*9*7 = 126 < one tile; 1 pixel.
PIXELS = {"12_tiles_ragged": (3, 23, 23), "one_partial_tile": (2, 9, 7), "one_pixel": (1, 1, 1)}


@pytest.mark.parametrize("pixels", PIXELS.values(), ids=PIXELS.keys())
@pytest.mark.parametrize("case", LARGE_MEANS.values(), ids=LARGE_MEANS.keys())
@pytest.mark.gpu
@needs_gpu
def test_identity_conv_large_mean(case, pixels):
    """c = x exactly; mean / variance of channels with |mean| >> std against fp64; a constant channel has
    variance exactly 0; the same bits on a second run. K = 72: a full and a partial column tile."""
    dtype, offset = case
    torch.manual_seed(11)
    n, h, w = pixels
    C = 72
    x = _offset_input(n, C, h, w, dtype, offset)
    x[:, 5] = offset + 0.5  # a constant channel (offset + 0.5 rounded to dtype)
    constant = x[0, 5, 0, 0].item()
    weight = _identity_weight(C, dtype)
    c, mean, var = _conv_stats_hook(x, weight)
    assert torch.equal(c, x)
    _check_stats(c, mean, var)
    assert var[5].item() == 0.0 and mean[5].item() == constant
    if n * h * w == 1:
        assert torch.equal(var, torch.zeros_like(var)) and torch.equal(mean, x.view(-1).float())
    c2, mean2, var2 = _conv_stats_hook(x, weight)
    assert torch.equal(c2, c) and torch.equal(mean2, mean) and torch.equal(var2, var)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@needs_gpu
def test_3x3_conv_large_output_mean(dtype):
    """A 3x3 convolution (no padding) whose outputs have a mean of about 30 and a spread of about 0.1 (input
    mean 30, weights summing to about 1); 2*17*15 = 510 pixels (3 full tiles + 126 rows), K = 48."""
    torch.manual_seed(12)
    N, C, K, H, W = 2, 32, 48, 19, 17
    x = _offset_input(N, C, H, W, dtype, 30.0)
    fan = C * 9
    w = ((torch.randn(K, C, 3, 3, device="cuda") * 0.1 + 1.0) / fan).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    c, mean, var = _conv_stats_hook(x, w, stride=1, padding=0)
    ref_c, _, _ = reference.conv_stats(x, w, 1, 0)
    assert_close(c.double(), ref_c.double(), dtype=dtype)
    _check_stats(c, mean, var)
    c2, mean2, var2 = _conv_stats_hook(x, w, stride=1, padding=0)
    assert torch.equal(c2, c) and torch.equal(mean2, mean) and torch.equal(var2, var)


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn_relu_prologue"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@needs_gpu
def test_public_conv_stats_large_mean(dtype, prologue):
    """torch.ops.resnet_fused.conv_stats runs the CUTLASS kernel (on the activated input when there is a
    BN+ReLU prologue, whose shift of +100 keeps relu's input positive) and its statistics hold at |mean| >> std;
    bitwise reproducible."""
    _require_cutlass()
    torch.manual_seed(13)
    N, C, H, W = 3, 64, 23, 23
    x = _offset_input(N, C, H, W, dtype, 0.0 if prologue else 100.0)
    weight = _identity_weight(C, dtype)
    scale = shift = None
    if prologue:
        scale = torch.rand(C, device="cuda") + 0.5
        shift = torch.full((C,), 100.0, device="cuda")

    def run():
        before = _C.cutlass_conv_launches()
        out = torch.ops.resnet_fused.conv_stats(x, weight, [1, 1], [0, 0], [1, 1], 1, scale, shift)
        assert _C.cutlass_conv_launches() == before + 1, "conv_stats did not run the CUTLASS kernel"
        return out

    c, mean, var = run()
    a = torch.relu(x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype) if prologue else x
    assert_close(c.double(), a.double(), dtype=dtype)
    _check_stats(c, mean, var)
    c2, mean2, var2 = run()
    assert torch.equal(c2, c) and torch.equal(mean2, mean) and torch.equal(var2, var)
