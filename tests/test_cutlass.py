"""The CUTLASS tensor-core convolutions behind the cuda backend's ``conv_bn_act`` (csrc/cutlass/fprop.cu).

GPU (``gpu`` mark): the extension reports the CUTLASS version it was compiled against (setup.py's header lookup:
``CUTLASS_PATH``, else the ``cutlass_library`` package). float16 / bfloat16 channels_last ``conv_bn_act`` against
the reference backend on the same inputs (tolerances.py), on shapes the CUTLASS kernels cover (3x3 / 1x1 / 7x7,
strides 1 and 2, dilation, odd N/H/W and channel counts that leave partial tiles, each optional epilogue term,
affine and ``affine=False`` BNs, a downsample shortcut) and on shapes they do not (C=3, groups=2, NCHW, a
misaligned input, float32), which must stay correct through the cuDNN path; which tile configuration and swizzle
width ran (128x64 for K <= 64, the 1x1 convs swizzled). Which path ran is read from ``_C.cutlass_conv_launches()``,
the count of CUTLASS kernels launched, on every GPU test: a GPU build without the CUTLASS kernels FAILS these
tests (it would otherwise pass them all on the cuDNN path) unless ``RESNET_FUSED_ALLOW_NO_CUTLASS=1`` says that
build is intended (then they skip). The training-path ``cutlass_conv_stats`` is reached through the test hook
``torch.ops.resnet_fused_debug.cutlass_conv_stats``: its output against the reference conv, its mean / biased
variance against fp64 statistics of that output, bitwise reproducibility, and the calls it declines (C=3, float32,
a scale / shift that is not fp32, contiguous, on x's device); with the BN+ReLU prologue (in_scale / in_shift) the
same checks against the reference's conv_stats with that prologue, padding included, plus bf16's own out-of-bounds
marker (0x7eff, CUTLASS's fp16 one, is a finite bf16 value that must be read as a value). CPU: the cost of
rounding scale / shift to the activation dtype against the tolerance, and that the bf16 marker is a NaN nobody
produces.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

from extension import import_extension

_C = import_extension()

from tolerances import assert_close  # noqa: E402

from resnet_fused.backends import cuda as cuda_backend  # noqa: E402
from resnet_fused.backends import reference  # noqa: E402

assert cuda_backend.is_built()

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ALLOW_NO_CUTLASS = "RESNET_FUSED_ALLOW_NO_CUTLASS"


def _cutlass_headers() -> Path | None:
    """The include dir setup.py would use (same lookup), or None."""
    root = os.environ.get("CUTLASS_PATH", "").strip()
    if root:
        return Path(root, "include")
    spec = importlib.util.find_spec("cutlass_library")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        inc = Path(loc, "source", "include")
        if Path(inc, "cutlass", "cutlass.h").is_file():
            return inc
    return None


def _require_cutlass():
    """The CUTLASS kernels must be in a CUDA build tested on a GPU: without them every test here would pass on the
    cuDNN path. Fails, or skips when RESNET_FUSED_ALLOW_NO_CUTLASS=1 declares such a build intended; skips on a GPU
    below compute capability 8.0 (which the kernels do not run)."""
    info = cuda_backend.build_info()
    if not info["with_cuda"]:
        pytest.fail("a GPU is present but resnet_fused._C was built without CUDA")
    if info["cutlass"] is None or not hasattr(_C, "cutlass_conv_launches"):
        if os.environ.get(ALLOW_NO_CUTLASS) == "1":
            pytest.skip(f"resnet_fused._C was built without the CUTLASS kernels ({ALLOW_NO_CUTLASS}=1)")
        pytest.fail(f"resnet_fused._C was built without the CUTLASS kernels (no headers at build time): install "
                    f"nvidia-cutlass (or set CUTLASS_PATH) and rebuild, or set {ALLOW_NO_CUTLASS}=1 if intended")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the CUTLASS kernels need compute capability >= 8.0")


def _launches() -> int:
    """CUTLASS kernels launched so far (the build must have them: _require_cutlass)."""
    _require_cutlass()
    return _C.cutlass_conv_launches()


@pytest.mark.gpu
@needs_gpu
def test_build_info_reports_cutlass():
    """The GPU build has the CUTLASS kernels, compiled against the headers setup.py finds here (their version)."""
    _require_cutlass()
    info = cuda_backend.build_info()
    headers = _cutlass_headers()
    if headers is not None:
        text = Path(headers, "cutlass", "version.h").read_text()
        version = ".".join(re.search(rf"#define CUTLASS_{part}\s+(\d+)", text).group(1)
                           for part in ("MAJOR", "MINOR", "PATCH"))
        assert info["cutlass"] == version
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["cutlass"])
    assert isinstance(_C.cutlass_conv_launches(), int)


def test_build_info_has_a_cutlass_entry():
    """Every build reports its CUTLASS version, None without the kernels (a CPU build has none)."""
    info = cuda_backend.build_info()
    assert "cutlass" in info
    if not info["with_cuda"]:
        assert info["cutlass"] is None and not hasattr(_C, "cutlass_conv_launches")


# ---------------------------------------------------------------------------------------------------- GPU


def _rand(*shape, dtype, scale=1.0, channels_last=True):
    t = (torch.randn(*shape, device="cuda") * scale).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last and len(shape) == 4 else t


def _weight(k, c, r, s, dtype, channels_last=True):
    """Weights scaled by 1/sqrt(fan-in), so conv outputs are of order 1."""
    return _rand(k, c, r, s, dtype=dtype, scale=(c * r * s) ** -0.5, channels_last=channels_last)


def _out_hw(h, w, k, stride, padding, dilation):
    return ((h + 2 * padding - dilation * (k - 1) - 1) // stride + 1,
            (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1)


def _bn(k, affine=True):
    """An EvalBN of k channels on the GPU with non-trivial fp32 tensors (γ in ±[0.5, 1.5), σ² in [0.5, 2.5))."""
    weight = (torch.rand(k, device="cuda") + 0.5) * torch.where(torch.arange(k, device="cuda") % 3 == 0, -1.0, 1.0)
    return reference.EvalBN(weight if affine else None, torch.randn(k, device="cuda") if affine else None,
                            torch.randn(k, device="cuda"), torch.rand(k, device="cuda") * 2 + 0.5, 1e-5)


def _check(out, args, relu, dtype):
    """Output dtype, layout, and values against the reference backend on the same inputs."""
    x, w, bn, stride, padding, dilation, groups, residual, shortcut = args
    ref = reference.conv_bn_act(x, w, bn, stride, padding, dilation, groups, residual, shortcut, relu)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.stride() == torch.empty(ref.shape, memory_format=reference.memory_format(x)).stride()
    assert_close(out.double(), ref.double(), dtype=dtype)


def _run(args, relu, engines="cutlass,plain"):
    """torch.ops.resnet_fused.conv_bn_act on engines ``engines`` (default: CUTLASS where it covers the call, else
    cuDNN + the channel pass), called directly: no engine measurement launches anything behind the test's back."""
    x, w, bn, stride, padding, dilation, groups, residual, shortcut = args
    pair = [stride, stride], [padding, padding], [dilation, dilation]
    sc = shortcut or reference.Shortcut(None, None, reference.EvalBN(None, None, None, None, 0.0), 1)
    return torch.ops.resnet_fused.conv_bn_act(x, w, *bn[:4], bn.eps, *pair, groups, residual, sc.x, sc.weight,
                                              *sc.bn[:4], sc.bn.eps, [sc.stride, sc.stride], relu, engines)


# name: (N, C, K, H, W, kernel, stride, padding, dilation)
COVERED = {
    "3x3_s1_k64_narrow_tile": (2, 64, 64, 14, 14, 3, 1, 1, 1),
    "3x3_s2_odd_hw": (2, 32, 64, 15, 13, 3, 2, 1, 1),
    "1x1_s1": (2, 64, 256, 7, 7, 1, 1, 0, 1),
    "1x1_s2": (2, 128, 256, 14, 14, 1, 2, 0, 1),
    "3x3_c24_k40_n3": (3, 24, 40, 11, 9, 3, 1, 1, 1),
    "3x3_dilation2": (2, 16, 24, 13, 13, 3, 1, 2, 2),
    "7x7_s2_c8": (2, 8, 64, 20, 20, 7, 2, 3, 1),
    "1x1_k512_swizzle": (2, 64, 512, 9, 9, 1, 1, 0, 1),
    "1x1_k1024_swizzle": (2, 128, 1024, 7, 7, 1, 1, 0, 1),
}


def _expected_config(K, kernel):
    """The tile configuration and swizzle width the fprop kernels must choose (csrc/cutlass/conv_cutlass_common.h):
    128x64 for K <= 64, else 128x128; 1x1 convs swizzled by CUTLASS's width rule over the column tiles (8 for >= 6,
    4 for >= 3, 2 for 2), others not."""
    tile_n = 64 if K <= 64 else 128
    n = -(-K // tile_n)
    width = (8 if n >= 6 else 4 if n >= 3 else 2 if n >= 2 else 1) if kernel == 1 else 1
    return f"128x{tile_n}x64/3 swizzle {width}"
# (affine BN, residual, relu)
TERMS = {
    "bn": (True, False, False),
    "bn_relu": (True, False, True),
    "bn_residual": (True, True, False),
    "bn_residual_relu": (True, True, True),
    "no_affine_residual_relu": (False, True, True),
}


@pytest.mark.parametrize("terms", TERMS.values(), ids=TERMS.keys())
@pytest.mark.parametrize("shape", COVERED.values(), ids=COVERED.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@needs_gpu
def test_covered_shapes_run_cutlass(dtype, shape, terms):
    torch.manual_seed(0)
    N, C, K, H, W, k, s, p, d = shape
    affine, with_residual, relu = terms
    P, Q = _out_hw(H, W, k, s, p, d)
    x, w = _rand(N, C, H, W, dtype=dtype), _weight(K, C, k, k, dtype)
    residual = _rand(N, K, P, Q, dtype=dtype) if with_residual else None
    args = (x, w, _bn(K, affine), s, p, d, 1, residual, None)
    before = _launches()
    out = _run(args, relu)
    _check(out, args, relu, dtype)
    assert _launches() == before + 1, "a covered conv_bn_act must be one CUTLASS launch"
    assert _C.cutlass_last_config() == _expected_config(K, k), "tile configuration / swizzle width"
    assert _C.last_engine() == "cutlass " + _expected_config(K, k)


@pytest.mark.parametrize("with_residual", [False, True], ids=["shortcut", "shortcut_residual"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@needs_gpu
def test_downsample_shortcut_runs_two_cutlass_launches(dtype, with_residual):
    """BasicBlock 64 -> 128, stride 2 tail: relu(bn(conv3x3(h)) + bn_d(conv1x1_s2(x_in)) [+ residual])."""
    torch.manual_seed(1)
    N = 2
    h, w = _rand(N, 128, 7, 7, dtype=dtype), _weight(128, 128, 3, 3, dtype)
    sc = reference.Shortcut(_rand(N, 64, 14, 14, dtype=dtype), _weight(128, 64, 1, 1, dtype), _bn(128), 2)
    residual = _rand(N, 128, 7, 7, dtype=dtype) if with_residual else None
    args = (h, w, _bn(128), 1, 1, 1, 1, residual, sc)
    before = _launches()
    out = _run(args, True)
    _check(out, args, True, dtype)
    assert _launches() == before + 2, "shortcut conv + main conv: two CUTLASS launches"


def _misaligned(t):
    """A channels_last copy of `t` whose data starts 2 bytes past a 16-byte boundary."""
    N, C, H, W = t.shape
    base = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    view = base[1:].view(N, H, W, C).permute(0, 3, 1, 2)
    view.copy_(t)
    return view


def _fallback_case(name, dtype):
    """conv_bn_act arguments (all epilogue terms) for a call the CUTLASS kernels do not cover."""
    cl = name != "nchw"
    C, K, groups, Cs = {"c3_stem": (3, 64, 1, 8), "groups2": (16, 32, 2, 8), "shortcut_c3": (16, 32, 1, 3)}.get(
        name, (16, 32, 1, 8))
    x = _rand(2, C, 9, 9, dtype=dtype, channels_last=cl)
    w = _weight(K, C // groups, 3, 3, dtype, channels_last=cl and name != "weight_nchw")
    if name == "misaligned":
        x = _misaligned(x)
    residual = _rand(2, K, 9, 9, dtype=dtype, channels_last=cl)
    sc = reference.Shortcut(_rand(2, Cs, 17, 17, dtype=dtype, channels_last=cl),
                            _weight(K, Cs, 1, 1, dtype, channels_last=cl), _bn(K), 2)
    return (x, w, _bn(K), 1, 1, 1, groups, residual, sc)


FALLBACK = ["c3_stem", "groups2", "nchw", "misaligned", "shortcut_c3"]


@pytest.mark.parametrize("name", FALLBACK)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.gpu
@needs_gpu
def test_uncovered_calls_use_cudnn_and_stay_correct(dtype, name):
    torch.manual_seed(2)
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        args = _fallback_case(name, dtype)
        before = _launches()
        out = _run(args, True)
        _check(out, args, True, dtype)
        assert _launches() == before, "an uncovered call must not launch any CUTLASS kernel"
        assert _C.last_engine() == "plain"
        with pytest.raises(RuntimeError, match="engine 'cutlass' cannot run this call: "):
            _run(args, True, engines="cutlass")  # the forced engine's own reason
        assert _launches() == before
    finally:
        torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@needs_gpu
def test_nchw_weights_are_taken_to_krsc_and_run_cutlass(dtype):
    """channels_last activations with NCHW-contiguous filters (a model whose weights were not converted): the
    filters are made KRSC for the kernels, the shortcut and main convs both run on CUTLASS, and stay correct."""
    torch.manual_seed(2)
    args = _fallback_case("weight_nchw", dtype)
    assert not args[1].is_contiguous(memory_format=torch.channels_last)
    before = _launches()
    out = _run(args, True)
    _check(out, args, True, dtype)
    assert _launches() == before + 2


@pytest.mark.gpu
@needs_gpu
def test_window_larger_than_padded_input_is_pytorchs_error():
    """A 7x7 window over a 6x6 input with stride 2: C++'s truncating division made the output 1x1 and the kernels
    ran on it; now every size check (the op's, the CUTLASS units' own, reached here through the test hook) raises
    PyTorch's error, and nothing is launched."""
    x, w = _rand(1, 8, 6, 6, dtype=torch.float16), _weight(8, 8, 7, 7, torch.float16)
    before = _launches()
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        torch.ops.resnet_fused_debug.cutlass_conv_stats(x, w, None, None, [2, 2], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        _run((x, w, _bn(8), 2, 0, 1, 1, None, None), True)
    assert _launches() == before


# ------------------------------------------------------------------------- cutlass_conv_stats (training path)

# name: (N, C, K, H, W, kernel, stride, padding): partial row and column tiles, two column tiles (K=256), and
# more tile rows (130) than the merge's chunk count.
STATS_SHAPES = {
    "3x3_c64_k64": (2, 64, 64, 14, 14, 3, 1, 1),
    "3x3_s2_k40": (3, 24, 40, 15, 11, 3, 2, 1),
    "1x1_k256": (2, 64, 256, 7, 7, 1, 1, 0),
    "3x3_130_tiles": (4, 16, 32, 64, 65, 3, 1, 1),
}


def _conv_stats(*args):
    _require_cutlass()
    return torch.ops.resnet_fused_debug.cutlass_conv_stats(*args)


@pytest.mark.parametrize("shape", STATS_SHAPES.values(), ids=STATS_SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@needs_gpu
def test_cutlass_conv_stats(dtype, shape):
    """c against the reference conv; mean / biased variance against fp64 statistics of the c it stored; the
    same bits on a second run (fixed-order merge)."""
    torch.manual_seed(3)
    N, C, K, H, W, k, s, p = shape
    x, w = _rand(N, C, H, W, dtype=dtype), _weight(K, C, k, k, dtype)
    # Channel offsets, so the variance is not computed around a zero mean.
    x = (x + torch.linspace(-1, 2, C, device="cuda").view(1, -1, 1, 1).to(dtype)).contiguous(
        memory_format=torch.channels_last)
    before = _launches()
    c, mean, var, ran = _conv_stats(x, w, None, None, [s, s], [p, p], [1, 1], 1)
    assert ran and _launches() == before + 1
    ref_c, _, _ = reference.conv_stats(x, w, s, p)
    assert c.is_contiguous(memory_format=torch.channels_last)
    assert_close(c.double(), ref_c.double(), dtype=dtype)
    ref_var, ref_mean = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-5)
    c2, mean2, var2, _ = _conv_stats(x, w, None, None, [s, s], [p, p], [1, 1], 1)
    assert torch.equal(c2, c) and torch.equal(mean2, mean) and torch.equal(var2, var)


@pytest.mark.gpu
@needs_gpu
def test_cutlass_conv_stats_declines_uncovered_calls():
    torch.manual_seed(4)
    x, w = _rand(2, 16, 8, 8, dtype=torch.bfloat16), _weight(32, 16, 3, 3, torch.bfloat16)
    scale, shift = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    args = ([1, 1], [1, 1], [1, 1], 1)
    before = _launches()
    x3, w3 = _rand(2, 3, 8, 8, dtype=torch.bfloat16), _weight(32, 3, 3, 3, torch.bfloat16)
    assert not _conv_stats(x3, w3, None, None, *args)[3]  # C = 3
    xf, wf = x.float(), w.float()
    assert not _conv_stats(xf, wf, None, None, *args)[3]  # float32
    assert not _conv_stats(xf, wf, scale, shift, *args)[3]  # float32, with the prologue
    assert not _conv_stats(x, w, scale.double(), shift, *args)[3]  # float64 scale
    assert not _conv_stats(x, w, scale, shift.cpu(), *args)[3]  # shift on another device
    strided = torch.rand(32, device="cuda")[::2]
    assert not _conv_stats(x, w, strided, shift, *args)[3]  # non-contiguous scale
    assert _launches() == before
    with pytest.raises(RuntimeError, match="given together"):
        _conv_stats(x, w, scale, None, *args)
    with pytest.raises(RuntimeError, match="shape"):
        _conv_stats(x, w, scale[:8], shift[:8], *args)


# ------------------------------------------------------------- cutlass_conv_stats with the BN+ReLU prologue

# name: (N, C, K, H, W, kernel, stride, padding): padding on every side, stride 2 with odd sizes, channel counts
# that leave a partial 64-channel slice (24, 72) or need two (128), partial row / column tiles, 1x1 convs.
PROLOGUE_SHAPES = {
    "3x3_s1_c64_k64": (2, 64, 64, 14, 14, 3, 1, 1),
    "3x3_s2_c24_k40": (3, 24, 40, 15, 11, 3, 2, 1),
    "3x3_s1_c128_k64": (2, 128, 64, 10, 9, 3, 1, 1),
    "3x3_s2_c72_k48": (2, 72, 48, 9, 9, 3, 2, 1),
    "1x1_s1_c64_k256": (2, 64, 256, 7, 7, 1, 1, 0),
    "1x1_s2_c128_k256": (2, 128, 256, 14, 14, 1, 2, 0),
    "3x3_130_tiles": (4, 16, 32, 64, 65, 3, 1, 1),
}


def _bn_inputs(N, C, H, W, dtype, device="cuda"):
    """x with per-channel offsets (many negative pre-activations) and a BN-style scale / shift in fp32: scale
    mostly in [0.5, 1.5] with some negative channels, shift of order 1 (positive shifts make wrongly transformed
    padding visible: relu(0*s + t) = t != 0)."""
    x = torch.randn(N, C, H, W, device=device) + torch.linspace(-1, 1, C, device=device).view(1, -1, 1, 1)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    scale = torch.rand(C, device=device) + 0.5
    scale[::5] *= -1
    shift = torch.randn(C, device=device) * 0.5
    return x, scale, shift


def _rounded(t, dtype):
    """What the kernel uses of an fp32 scale / shift: the value rounded to the activation dtype."""
    return t.to(dtype).float()


@pytest.mark.parametrize("shape", PROLOGUE_SHAPES.values(), ids=PROLOGUE_SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@needs_gpu
def test_cutlass_conv_stats_prologue(dtype, shape):
    """c = conv(relu(x*scale + shift), W) in one CUTLASS launch: against the reference with the scale / shift the
    kernel uses (rounded to the activation dtype) at the usual tolerance, and against the fp32 scale / shift at
    twice it (the rounding's cost, see test_prologue_rounding_fits_the_tolerance); mean / biased variance against
    fp64 statistics of the stored c; the same bits on a second run."""
    torch.manual_seed(5)
    N, C, K, H, W, k, s, p = shape
    x, scale, shift = _bn_inputs(N, C, H, W, dtype)
    w = _weight(K, C, k, k, dtype)
    args = ([s, s], [p, p], [1, 1], 1)
    before = _launches()
    c, mean, var, ran = _conv_stats(x, w, scale, shift, *args)
    assert ran and _launches() == before + 1
    assert c.is_contiguous(memory_format=torch.channels_last)
    ref_c, _, _ = reference.conv_stats(x, w, s, p, in_scale=_rounded(scale, dtype), in_shift=_rounded(shift, dtype))
    assert_close(c.double(), ref_c.double(), dtype=dtype)
    exact_c, _, _ = reference.conv_stats(x, w, s, p, in_scale=scale, in_shift=shift)
    assert_close(c.double(), exact_c.double(), dtype=dtype, scale=2.0)
    ref_var, ref_mean = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-5)
    c2, mean2, var2, _ = _conv_stats(x, w, scale, shift, *args)
    assert torch.equal(c2, c) and torch.equal(mean2, mean) and torch.equal(var2, var)


@pytest.mark.gpu
@needs_gpu
def test_cutlass_conv_stats_prologue_bf16_reads_0x7eff_as_a_value():
    """0x7eff, CUTLASS's fp16 out-of-bounds marker, is the finite bf16 1.6948e38: a channel pair holding it must be
    transformed like any value, not zeroed like padding. With scale 2^-120 it becomes 127.5 before the shift."""
    torch.manual_seed(6)
    dtype = torch.bfloat16
    x, scale, shift = _bn_inputs(2, 16, 9, 9, dtype)
    big = torch.tensor([0x7EFF], dtype=torch.int16).view(torch.bfloat16).to("cuda")
    for n, h, w_ in ((0, 0, 0), (0, 4, 5), (1, 8, 3)):
        x[n, 0:2, h, w_] = big
    scale[0:2] = 2.0**-120
    w = _weight(32, 16, 3, 3, dtype)
    c, _, _, ran = _conv_stats(x, w, scale, shift, [1, 1], [1, 1], [1, 1], 1)
    assert ran
    ref_c, _, _ = reference.conv_stats(x, w, 1, 1, in_scale=_rounded(scale, dtype), in_shift=_rounded(shift, dtype))
    assert ref_c.double().abs().max() > 5  # the big activations reach the output
    assert_close(c.double(), ref_c.double(), dtype=dtype)


# --------------------------------------------------------------------------------------------------- CPU


def test_prologue_rounding_fits_the_tolerance():
    """The cost of rounding scale / shift to the activation dtype, measured in fp64 on the GPU tests' input
    distribution (3x3 conv with padding): it must leave room in the tolerance the GPU test allows against the
    fp32 scale / shift (twice the dtype's usual one), i.e. stay within the usual one."""
    torch.manual_seed(7)
    for dtype in (torch.float16, torch.bfloat16):
        x, scale, shift = _bn_inputs(4, 64, 12, 12, dtype, device="cpu")
        w = (torch.randn(64, 64, 3, 3) * (64 * 9) ** -0.5).to(dtype).double()

        def conv(s, t, x=x, w=w, dtype=dtype):
            a = torch.relu(x.double() * s.double().view(1, -1, 1, 1) + t.double().view(1, -1, 1, 1))
            return torch.nn.functional.conv2d(a.to(dtype).double(), w, padding=1)

        assert_close(conv(_rounded(scale, dtype), _rounded(shift, dtype)), conv(scale, shift), dtype=dtype)


def test_bf16_out_of_bounds_marker_is_a_nan_nobody_makes():
    """The bf16 prologue's out-of-bounds marker (kBf16PadBits in csrc/cutlass/fprop_stats.cu) must be a bf16 NaN
    (so no finite input is mistaken for padding) that PyTorch and the hardware do not produce; CUTLASS's fp16
    marker 0x7eff, a NaN in fp16, is finite in bf16 (why bf16 needs its own)."""
    src = Path(__file__).resolve().parents[1] / "csrc" / "cutlass" / "fprop_stats.cu"
    bits = int(re.search(r"kBf16PadBits\s*=\s*0x([0-9a-fA-F]{4});", src.read_text()).group(1), 16)

    def as_dtype(b, dtype):
        return torch.tensor([b - (1 << 16) if b >= 1 << 15 else b], dtype=torch.int16).view(dtype)

    assert torch.isnan(as_dtype(bits, torch.bfloat16)).all()
    made = {int(torch.tensor(float("nan")).to(torch.bfloat16).view(torch.int16)) & 0xFFFF,
            int((-torch.tensor(float("nan"))).to(torch.bfloat16).view(torch.int16)) & 0xFFFF,
            int(torch.relu(torch.tensor([float("nan")], dtype=torch.bfloat16)).view(torch.int16)) & 0xFFFF,
            0x7FFF}  # the canonical NaN of PTX arithmetic
    assert bits not in made
    assert torch.isfinite(as_dtype(0x7EFF, torch.bfloat16)).all()
    assert torch.isnan(as_dtype(0x7EFF, torch.float16)).all()


@pytest.mark.gpu
@needs_gpu
def test_env_switch_turns_the_cutlass_kernels_off():
    """RESNET_FUSED_CUTLASS=0 (read once per process): covered calls take the cuDNN path, and stay correct."""
    import os
    import subprocess
    import sys

    code = """
import torch, resnet_fused._C as C
from resnet_fused.backends import cuda as be, reference as ref
x = torch.randn(2, 16, 9, 9, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
w = torch.randn(32, 16, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
bn = ref.EvalBN(None, None, torch.zeros(32, device="cuda"), torch.ones(32, device="cuda"), 1e-5)
out = be.conv_bn_act(x, w, bn, 1, 1, relu=True)
c, mean, var = be.conv_stats(x, w, 1, 1)
torch.testing.assert_close(out.float(), ref.conv_bn_act(x, w, bn, 1, 1, relu=True).float(), rtol=2e-2, atol=2e-2)
torch.cuda.synchronize()
print(C.cutlass_conv_launches())
"""
    env = dict(os.environ, RESNET_FUSED_CUTLASS="0")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "0"
