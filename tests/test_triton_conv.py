"""The Triton fused implicit-GEMM convolution (``conv2d_fused``) and the backend's ``conv_bn_act``.

Every result is compared with PyTorch computed in the test (float64 ``F.conv2d`` of the same, already rounded
inputs) on random inputs: kernel sizes 1/3/7, strides, padding, dilation, groups, odd N/C/H/W that leave
partial tiles in every dimension, NCHW and channels_last, the eval-BN/residual/shortcut/ReLU epilogue, the BN+ReLU
prologue (with positive shifts, so a padded zero that went through the activation would show) and the
per-channel statistics. Fusion is checked with the launch counter. CPU runs use the Triton interpreter.
"""

import time
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
import triton

import resnet_fused.backends.triton as tb
from resnet_fused.backends.reference import EvalBN, Shortcut
from resnet_fused.backends.triton import _launch, conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (rtol, atol) of a kernel output against float64 PyTorch on the same inputs, outputs of order 1. fp32 allows
# for TF32 on a GPU (off by default in these tests, see the fixture) and for accumulation order.
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# Per-channel mean / biased variance against float64 torch.var_mean of the float64 convolution: the kernel's
# statistics are of its fp32 accumulator, before the output's rounding to bf16/fp16 (in bf16 the statistics of
# the rounded output are ~1e-4 off, so these checks tell the two apart).
STATS_TOL = (1e-5, 1e-5)


@pytest.fixture(autouse=True)
def _seeded_ieee_fp32():
    """Reproducible random inputs; fp32 convolutions in IEEE precision so their tolerance stays tight on a
    GPU too."""
    torch.manual_seed(0)
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _rand(*shape, dtype=torch.float32, scale=1.0, channels_last=False):
    t = (torch.randn(*shape, device=DEVICE) * scale).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _weight(k, c, r, s, dtype=torch.float32):
    """Weights scaled by 1/sqrt(fan-in) so conv outputs are of order 1."""
    return _rand(k, c, r, s, dtype=dtype, scale=(c * r * s) ** -0.5)


def _bn(k, affine=True, dtype=torch.float32, requires_grad=False):
    """A random eval BatchNorm of k channels (γ, β, μ of order 1, σ² in [0.5, 1.5])."""
    def vec(t):
        return t.to(dtype).requires_grad_(requires_grad)

    weight = vec(torch.randn(k, device=DEVICE)) if affine else None
    bias = vec(torch.randn(k, device=DEVICE)) if affine else None
    return EvalBN(weight, bias, vec(torch.randn(k, device=DEVICE) * 0.5), vec(torch.rand(k, device=DEVICE) + 0.5),
                  1e-5)


def _apply_bn(y, bn):
    """bn(y) = (y − μ)·γ/√(σ² + ε) + β in y's dtype (float64 here), differentiable in every BN tensor."""
    if bn is None:
        return y
    d = y.dtype
    scale = torch.rsqrt(bn.var.to(d) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(d)
    y = (y - bn.mean.to(d).view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
    return y if bn.bias is None else y + bn.bias.to(d).view(1, -1, 1, 1)


def _ref(x, weight, bn=None, stride=1, padding=0, dilation=1, groups=1, residual=None, shortcut_x=None,
         shortcut_weight=None, shortcut_stride=1, relu=False, in_scale=None, in_shift=None, shortcut_bn=None):
    """The fused op in float64 PyTorch (the prologue in fp32 and rounded to x's dtype, as specified)."""
    d = torch.float64
    if in_scale is not None:
        x = torch.relu(x.float() * in_scale.view(1, -1, 1, 1) + in_shift.view(1, -1, 1, 1)).to(x.dtype)
    y = _apply_bn(F.conv2d(x.to(d), weight.to(d), None, stride, padding, dilation, groups), bn)
    if shortcut_x is not None:
        y = y + _apply_bn(F.conv2d(shortcut_x.to(d), shortcut_weight.to(d), None, shortcut_stride), shortcut_bn)
    if residual is not None:
        y = y + residual.to(d)
    return torch.relu(y) if relu else y


def _close(out, ref, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def _is_cl(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


# (N, C, H, W, K, R, S, stride, padding, dilation, groups): ResNet kernel/stride combinations at odd sizes
# that leave partial M, N and C tiles (the interpreter's tile is 128x64x64; "wide" cases have several N and C
# tiles, per group too).
SHAPES = {
    "1x1-wide": (2, 72, 5, 5, 70, 1, 1, 1, 0, 1, 1),
    "1x1-s2": (3, 5, 9, 9, 7, 1, 1, 2, 0, 1, 1),
    "3x3": (3, 5, 7, 7, 6, 3, 3, 1, 1, 1, 1),
    "3x3-s2-rect": (2, 6, 9, 8, 5, 3, 3, 2, 1, 1, 1),
    "3x3-nopad-wide": (3, 66, 10, 9, 65, 3, 3, 1, 0, 1, 1),
    "7x7-s2-stem": (2, 3, 11, 11, 8, 7, 7, 2, 3, 1, 1),
    "3x3-dil2": (2, 4, 7, 7, 4, 3, 3, 1, 2, 2, 1),
    "3x3-groups4": (2, 16, 5, 5, 16, 3, 3, 1, 1, 1, 4),
    "3x3-s2-groups2": (2, 6, 7, 7, 10, 3, 3, 2, 1, 1, 2),
    "1x1-groups2-wide": (2, 140, 5, 5, 136, 1, 1, 1, 0, 1, 2),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_conv_bn_relu_matches_pytorch(name, channels_last):
    n, c, h, w, k, r, s, stride, padding, dilation, groups = SHAPES[name]
    x = _rand(n, c, h, w, channels_last=channels_last)
    weight = _weight(k, c // groups, r, s)
    bn = _bn(k)
    y = conv.conv2d_fused(x, weight, bn, stride, padding, dilation, groups, relu=True)
    ref = _ref(x, weight, bn, stride, padding, dilation, groups, relu=True)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert _is_cl(y) == channels_last
    _close(y, ref, torch.float32)
    assert (y == 0).any() and (y > 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_residual_epilogue(dtype, channels_last):
    """BasicBlock tail: relu(bn(conv(x)) + residual); the residual is a strided view in the other layout."""
    x = _rand(3, 5, 7, 7, dtype=dtype, channels_last=channels_last)
    weight = _weight(6, 5, 3, 3, dtype)
    bn = _bn(6)
    big = _rand(3, 9, 7, 7, dtype=dtype, channels_last=not channels_last)
    residual = big[:, 2:8]
    y = conv.conv2d_fused(x, weight, bn, 1, 1, residual=residual, relu=True)
    assert _is_cl(y) == channels_last and y.dtype == dtype
    _close(y, _ref(x, weight, bn, 1, 1, residual=residual, relu=True), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("main", ["1x1", "3x3"])
def test_shortcut_conv_in_same_accumulator(main, dtype):
    """Block tail with downsample: relu(bn(conv(h)) + bn_d(conv1x1_s2(x, W_d))) in one launch, each branch with
    its own BN scale (two accumulators)."""
    r = 1 if main == "1x1" else 3
    h = _rand(3, 6, 5, 5, dtype=dtype, channels_last=True)
    weight = _weight(66, 6, r, r, dtype)
    bn = _bn(66)
    sx = _rand(3, 70, 9, 10, dtype=dtype)
    sw = _weight(66, 70, 1, 1, dtype)
    _launch.reset_launch_count()
    sbn = _bn(66)
    y = conv.conv2d_fused(h, weight, bn, 1, r // 2, shortcut_x=sx, shortcut_weight=sw, shortcut_bn=sbn,
                          shortcut_stride=2, relu=True)
    assert _launch.launch_count() == 1
    _close(y, _ref(h, weight, bn, 1, r // 2, shortcut_x=sx, shortcut_weight=sw, shortcut_stride=2, relu=True,
                   shortcut_bn=sbn), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_affine_relu_prologue_keeps_padding_zero(stride, dtype):
    """a = relu(x*s + t) on load with t > 0 everywhere: a padded position that went through the activation
    would contribute relu(t) > 0 and show at the borders."""
    x = _rand(2, 5, 7, 7, dtype=dtype, channels_last=True)
    weight = _weight(6, 5, 3, 3, dtype)
    in_scale = _rand(5, scale=0.5) + 1.0
    in_shift = torch.rand(5, device=DEVICE) + 0.5
    y = conv.conv2d_fused(x, weight, None, stride, 1, in_scale=in_scale, in_shift=in_shift)
    _close(y, _ref(x, weight, None, stride, 1, in_scale=in_scale, in_shift=in_shift), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
def test_stats_epilogue(prologue, dtype, interpreter_rounds_bf16_to_nearest):
    """mean and biased var of the output before rounding over N·P·Q = 243 rows (two row tiles, the last partial) and
    70 channels (two channel tiles)."""
    x = _rand(3, 5, 9, 9, dtype=dtype)
    weight = _weight(70, 5, 3, 3, dtype)
    kw = dict(in_scale=_rand(5) + 1.0, in_shift=_rand(5)) if prologue else {}
    _launch.reset_launch_count()
    y, mean, var = conv.conv2d_fused(x, weight, None, 1, 1, stats=True, **kw)
    assert _launch.launch_count() == 2  # the conv and one merge of its 8 partial-statistics rows
    ref = _ref(x, weight, None, 1, 1, **kw)
    _close(y, ref, dtype)
    assert y.is_contiguous()  # NCHW in, NCHW out (with the prologue the kernel stores channels_last, then a copy)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (70,)
    ref_var, ref_mean = torch.var_mean(ref, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=STATS_TOL[0], atol=STATS_TOL[1])
    torch.testing.assert_close(var.double(), ref_var, rtol=STATS_TOL[0], atol=STATS_TOL[1])


def test_stats_of_grouped_strided_conv_with_epilogue():
    x = _rand(2, 6, 7, 7, channels_last=True)
    weight = _weight(10, 3, 3, 3)
    bn = _bn(10)
    y, mean, var = conv.conv2d_fused(x, weight, bn, 2, 1, groups=2, relu=True, stats=True)
    ref = _ref(x, weight, bn, 2, 1, groups=2, relu=True)
    _close(y, ref, torch.float32)
    ref_var, ref_mean = torch.var_mean(ref, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=STATS_TOL[0], atol=STATS_TOL[1])
    torch.testing.assert_close(var.double(), ref_var, rtol=STATS_TOL[0], atol=STATS_TOL[1])


def test_merge_partial_stats_one_launch_and_stable():
    """The per-tile partials of 300 row tiles of height 7 (the last one partial), data with a large common offset
    (1e4, spread 1): merged in ONE launch; a Σ/Σ² merge in fp32 would lose the variance entirely, Chan's merge
    keeps it. Rows past the last tile hold garbage the merge must not read."""
    from resnet_fused.backends.triton import stats

    gen = torch.Generator().manual_seed(0)
    block_m, m, k = 7, 7 * 299 + 3, 5
    data = 1e4 + torch.randn(m, k, generator=gen, dtype=torch.float64)
    tiles = torch.split(data, block_m)
    mean = torch.stack([t.mean(0) for t in tiles])
    m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles])
    f32 = dict(device=DEVICE, dtype=torch.float32)
    garbage = torch.full((4, k), float("nan"), **f32)
    rows = torch.tensor([block_m], device=DEVICE, dtype=torch.int32)
    _launch.reset_launch_count()
    got_mean, got_var = stats.merge_partial_stats(rows, torch.cat([mean.to(**f32), garbage]),
                                                  torch.cat([m2.to(**f32), garbage]), m)
    assert _launch.launch_count() == 1
    ref_var, ref_mean = torch.var_mean(data, dim=0, correction=0)
    torch.testing.assert_close(got_mean.cpu().double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_var.cpu().double(), ref_var, rtol=1e-3, atol=0)


def test_empty_batch_launches_nothing():
    x = _rand(0, 5, 7, 7, channels_last=True)
    weight = _weight(6, 5, 3, 3)
    _launch.reset_launch_count()
    y = conv.conv2d_fused(x, weight, None, 2, 1)
    y2, mean, var = conv.conv2d_fused(x, weight, None, 2, 1, stats=True)
    assert _launch.launch_count() == 0
    assert y.shape == y2.shape == (0, 6, 4, 4)
    assert mean.shape == var.shape == (6,) and mean.isnan().all()


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("tail", ["residual", "shortcut"])
def test_conv_bn_act_gradients(tail, relu):
    """Every gradient of conv_bn_act (x, W, every BN tensor, the residual or the shortcut's input, weight and
    BN tensors) against autograd of the float64 PyTorch formula."""
    x = _rand(2, 5, 7, 7, channels_last=True).requires_grad_()
    weight = _weight(6, 5, 3, 3).requires_grad_()
    bn = _bn(6, requires_grad=True)
    leaves = [x, weight, *bn[:4]]
    if tail == "residual":
        residual = _rand(2, 6, 4, 4).requires_grad_()
        extra, ref_extra = dict(residual=residual), dict(residual=residual)
        leaves.append(residual)
    else:
        sc = Shortcut(_rand(2, 7, 13, 13).requires_grad_(), _weight(6, 7, 1, 1).requires_grad_(),
                      _bn(6, requires_grad=True), 4)
        extra = dict(shortcut=sc)
        ref_extra = dict(shortcut_x=sc.x, shortcut_weight=sc.weight, shortcut_bn=sc.bn, shortcut_stride=4)
        leaves += [sc.x, sc.weight, *sc.bn[:4]]
    _launch.reset_launch_count()
    y = tb.conv_bn_act(x, weight, bn, 2, 1, relu=relu, **extra)
    assert _launch.launch_count() == 1
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    ref = _ref(x, weight, bn, 2, 1, relu=relu, **ref_extra)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    ref_grads = torch.autograd.grad(ref, leaves, dy.double())
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == leaves[i].dtype and g.shape == leaves[i].shape
        torch.testing.assert_close(g.double(), rg.double(), rtol=1e-4, atol=1e-4,
                                   msg=lambda m, i=i: f"grad of leaf {i}: {m}")


def test_conv_bn_act_without_affine_and_grouped():
    """A BN with affine=False (γ, β None) on a grouped conv; gradients of x, W and the running statistics."""
    x = _rand(2, 8, 5, 5).requires_grad_()
    weight = _weight(8, 2, 3, 3).requires_grad_()
    bn = _bn(8, affine=False, requires_grad=True)
    y = tb.conv_bn_act(x, weight, bn, 1, 1, groups=4)
    dy = torch.randn_like(y)
    leaves = [x, weight, bn.mean, bn.var]
    grads = torch.autograd.grad(y, leaves, dy)
    ref = _ref(x, weight, bn, 1, 1, groups=4, relu=True)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    for g, rg in zip(grads, torch.autograd.grad(ref, leaves, dy.double())):
        torch.testing.assert_close(g.double(), rg.double(), rtol=1e-4, atol=1e-4)


def _bad_inputs():
    x = _rand(2, 4, 5, 5)
    w = _weight(6, 4, 3, 3)
    return [
        ("x 3-D", dict(x=x[0], weight=w), ValueError, "x must be 4-D"),
        ("fp64", dict(x=x.double(), weight=w.double()), ValueError, "float64"),
        ("weight dtype", dict(x=x, weight=w.half()), ValueError, "weight dtype"),
        ("channels", dict(x=x, weight=_weight(6, 3, 3, 3)), ValueError, "input channels"),
        ("groups", dict(x=x, weight=w, groups=3), ValueError, "divisible by groups"),
        ("too small", dict(x=x, weight=w, padding=0, dilation=3), ValueError, "does not fit"),
        ("stride", dict(x=x, weight=w, stride=0), ValueError, "stride >= 1"),
        ("bn channels", dict(x=x, weight=w, bn=_bn(5)), ValueError, "bn.weight must be"),
        ("bn half affine", dict(x=x, weight=w, bn=_bn(6)._replace(bias=None)), ValueError, "together"),
        ("residual", dict(x=x, weight=w, padding=1, residual=_rand(2, 6, 4, 4)), ValueError, "residual"),
        ("shortcut pair", dict(x=x, weight=w, shortcut_x=x), ValueError, "given together"),
        ("shortcut without bn", dict(x=x, weight=w, padding=1, shortcut_x=_rand(2, 3, 5, 5),
                                     shortcut_weight=_weight(6, 3, 1, 1)), ValueError, "needs bn and shortcut_bn"),
        ("shortcut spatial", dict(x=x, weight=w, bn=_bn(6), padding=1, shortcut_x=_rand(2, 3, 5, 5),
                                  shortcut_weight=_weight(6, 3, 1, 1), shortcut_bn=_bn(6), shortcut_stride=2),
         ValueError, "shortcut"),
        ("shortcut weight", dict(x=x, weight=w, bn=_bn(6), padding=1, shortcut_x=_rand(2, 3, 5, 5),
                                 shortcut_weight=_weight(6, 4, 1, 1), shortcut_bn=_bn(6)), ValueError,
         "shortcut_weight must"),
        ("scale dtype", dict(x=x, weight=w, in_scale=_rand(4).double(), in_shift=_rand(4)), ValueError, "in_scale"),
        ("scale alone", dict(x=x, weight=w, in_scale=_rand(4)), ValueError, "together"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_raise_clear_errors(case):
    _, kwargs, exc, match = case
    _launch.reset_launch_count()
    with pytest.raises(exc, match=match):
        conv.conv2d_fused(**kwargs)
    assert _launch.launch_count() == 0


@pytest.mark.gpu
@needs_gpu
def test_gpu_device_mismatch_raises():
    with pytest.raises(ValueError, match="weight is on"):
        conv.conv2d_fused(_rand(2, 4, 5, 5), _weight(6, 4, 3, 3).cpu())


def test_unsupported_reasons(monkeypatch):
    x = _rand(1, 2, 3, 3)
    assert tb.unsupported(x, 4, 2) is None
    assert "float64" in tb.unsupported(x.double(), 1, 1)
    assert "int64" in tb.unsupported(x.long(), 1, 1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in tb.unsupported(x.cpu(), 1, 1)


@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
def test_registered_op_passes_opcheck(stats):
    """Schema, fake kernel (shapes, dtype, channels-last layout) and AOT dispatch of the registered op."""
    x = _rand(2, 5, 7, 7, channels_last=True)
    bn = _bn(6)
    args = (x, _weight(6, 5, 3, 3), *bn[:4], bn.eps, [2, 2], [1, 1], [1, 1], 1, _rand(2, 6, 4, 4), None, None,
            None, None, None, None, 0.0, 1, True, None, None, stats)
    torch.library.opcheck(torch.ops.resnet_fused.triton_conv2d_fused.default, args)


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces conv_bn_act (autograd.Function around the registered op)
    without graph breaks, forward and backward."""
    x = _rand(2, 5, 7, 7, channels_last=True).requires_grad_()
    w = _weight(6, 5, 3, 3).requires_grad_()
    bn = _bn(6, requires_grad=True)
    res = _rand(2, 6, 7, 7)
    fn = torch.compile(lambda x, w, g, b: tb.conv_bn_act(x, w, bn._replace(weight=g, bias=b), 1, 1, residual=res),
                       fullgraph=True)
    y = fn(x, w, bn.weight, bn.bias)
    ref = _ref(x, w, bn, 1, 1, residual=res, relu=True)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y)
    leaves = [x, w, bn.weight, bn.bias]
    for g, rg in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy.double())):
        torch.testing.assert_close(g.double(), rg.double(), rtol=1e-4, atol=1e-4)


# ---- GPU: real ResNet shapes in half precision, autotuning ----

RESNET_SHAPES = {
    "layer1-3x3": (8, 64, 56, 56, 64, 3, 3, 1, 1),
    "layer2-3x3-s2": (8, 128, 56, 56, 128, 3, 3, 2, 1),
    "bottleneck-1x1": (8, 256, 28, 28, 64, 1, 1, 1, 0),
    "stem-7x7": (8, 3, 224, 224, 64, 7, 7, 2, 3),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(RESNET_SHAPES))
@pytest.mark.gpu
@needs_gpu
def test_gpu_resnet_shapes(name, dtype):
    n, c, h, w, k, r, s, stride, padding = RESNET_SHAPES[name]
    x = _rand(n, c, h, w, dtype=dtype, channels_last=True)
    weight = _weight(k, c, r, s, dtype)
    bn = _bn(k)
    y, mean, var = conv.conv2d_fused(x, weight, bn, stride, padding, relu=True, stats=True)
    ref = _ref(x, weight, bn, stride, padding, relu=True)
    _close(y, ref, dtype)
    ref_var, ref_mean = torch.var_mean(ref, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-4)
    # autotuning timed every config pruning kept for this shape (more than one) and ran the fastest of them
    tuned = conv._conv_fwd_tuned
    timings = getattr(tuned, "configs_timings", None) or {}
    assert len(timings) > 1, f"autotuning timed {len(timings)} config(s)"
    assert tuned.best_config in timings and timings[tuned.best_config] == min(timings.values())
    assert any(text == conv._config_text(tuned.best_config) for text in tb.tile_configs().values())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_gpu_bottleneck_tail_with_downsample(dtype):
    h = _rand(8, 128, 28, 28, dtype=dtype, channels_last=True)
    weight = _weight(512, 128, 1, 1, dtype)
    bn = _bn(512)
    sx = _rand(8, 256, 56, 56, dtype=dtype, channels_last=True)
    sw = _weight(512, 256, 1, 1, dtype)
    sbn = _bn(512)
    y = conv.conv2d_fused(h, weight, bn, shortcut_x=sx, shortcut_weight=sw, shortcut_bn=sbn, shortcut_stride=2,
                          relu=True)
    _close(y, _ref(h, weight, bn, shortcut_x=sx, shortcut_weight=sw, shortcut_stride=2, relu=True,
                   shortcut_bn=sbn), dtype)


@pytest.mark.gpu
@needs_gpu
def test_gpu_tf32_follows_cudnn_flag():
    """fp32 with allow_tf32 set runs TF32 (error of order 1e-3), IEEE otherwise (tight)."""
    x = _rand(4, 64, 14, 14, channels_last=True)
    weight = _weight(64, 64, 3, 3)
    ref = _ref(x, weight, None, 1, 1)
    _close(conv.conv2d_fused(x, weight, None, 1, 1), ref, torch.float32)
    torch.backends.cudnn.allow_tf32 = True
    torch.testing.assert_close(conv.conv2d_fused(x, weight, None, 1, 1).double(), ref, rtol=2e-2, atol=2e-2)


# ---- configs: pruning, deterministic mode, the selectable prologue form, the packed small-C reduction ----


def _cfg(bm, bn, bk, warps=4):
    import triton

    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps)


def _prune_kwargs(**over):
    kw = dict(GROUPS=1, S=3, PACK_S=False, HAS_SHORTCUT=False, IN_AFFINE_RELU=False, PROLOGUE_SMEM=False)
    kw.update(over)
    return kw


def test_prune_keeps_what_fits_the_shape():
    configs = [_cfg(128, 128, 64, 8), _cfg(128, 64, 64, 8), _cfg(64, 128, 64), _cfg(64, 64, 32), _cfg(64, 32, 32),
               _cfg(64, 64, 16), _cfg(64, 32, 16)]

    def kept(c, k, **kw):
        return [(x.kwargs["BLOCK_M"], x.kwargs["BLOCK_N"], x.kwargs["BLOCK_K"])
                for x in conv._prune(configs, {"C": c, "K": k}, **_prune_kwargs(**kw))]

    # BLOCK_K=16 only below 32 channels; 64x32x16 never: a thread's share of its 32x16 tile is 8 bytes
    assert kept(256, 256) == [(128, 128, 64), (128, 64, 64), (64, 128, 64), (64, 64, 32), (64, 32, 32)]
    assert kept(256, 64) == [(128, 64, 64), (64, 64, 32), (64, 32, 32)]  # no tile wider than K
    assert kept(3, 64) == [(64, 64, 16)]  # the stem unpacked: BLOCK_K=16 only
    assert kept(3, 64, PACK_S=True, S=7) == [(64, 64, 32), (64, 32, 32), (64, 64, 16)]  # a filter row: 21 values
    assert kept(4, 64, PACK_S=True, S=7, PAD_C=4) == [(64, 64, 32), (64, 32, 32), (64, 64, 16)]
    assert kept(128, 128, GROUPS=32) == [(64, 32, 16)]  # 4 channels per group: nothing fits, the last config
    # two accumulators, or an NCHW output: at most 32 fp32 registers per thread each
    assert kept(256, 256, HAS_SHORTCUT=True) == [(128, 64, 64), (64, 64, 32), (64, 32, 32)]
    assert conv._prune(configs, {"C": 256, "K": 256, "stride_yc": 49}, **_prune_kwargs()) == \
        conv._prune(configs, {"C": 256, "K": 256}, **_prune_kwargs(HAS_SHORTCUT=True))
    # the staged prologue's transposed MMA needs BLOCK_N >= 64; the register form does not, but ptxas serializes
    # the wgmma pipeline of 64x32x32 (4 warps) and 128x128x32 (8 warps) with it (the compile report)
    assert kept(32, 64, IN_AFFINE_RELU=True, PROLOGUE_SMEM=True) == [(64, 64, 32)]
    assert kept(32, 64, IN_AFFINE_RELU=True) == [(64, 64, 32)]
    assert kept(32, 64) == [(64, 64, 32), (64, 32, 32)]
    serialized = [_cfg(128, 128, 32, 8), _cfg(64, 32, 32, 4)]
    assert conv._prune(configs + serialized, {"C": 256, "K": 256}, **_prune_kwargs(IN_AFFINE_RELU=True)) == \
        conv._prune(configs, {"C": 256, "K": 256}, **_prune_kwargs(IN_AFFINE_RELU=True))
    assert len(conv._prune(serialized, {"C": 256, "K": 256}, **_prune_kwargs())) == 2


def test_stem_runs_the_packed_reduction():
    """A 3-channel 7x7 conv takes the (s, c)-packed loop (checked on the recorded launch), and its MMA tiles
    issue at least 40% useful work with the configs pruning keeps (the arithmetic the compile report uses)."""
    x = _rand(2, 3, 224, 224, channels_last=True)  # recorded, not run: the ResNet stem's shape
    weight = _weight(64, 3, 7, 7)
    with _launch.capture() as launches:
        conv.conv2d_fused(x, weight, None, 2, 3)
    (launch,) = launches
    assert launch.kwargs["PACK_S"] is True
    nargs = dict(zip(conv._conv_fwd_tuned.arg_names, launch.args))
    for bk in (16, 32):
        useful, issued = conv.mma_macs({**nargs, **launch.kwargs, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": bk})
        assert useful / issued >= 0.4
    with _launch.capture() as launches:
        conv.conv2d_fused(_rand(1, 64, 9, 9), _weight(64, 64, 3, 3), None, 1, 1)
    assert launches[0].kwargs["PACK_S"] is False


@pytest.mark.parametrize("switch", ["env", "torch"])
def test_deterministic_mode_runs_one_fixed_config(switch, monkeypatch):
    """RESNET_FUSED_DETERMINISTIC=1 or torch.use_deterministic_algorithms(True): the launch takes the first
    config pruning keeps (no autotuning), records it in tile_configs(), and reruns agree bit for bit."""
    if switch == "env":
        monkeypatch.setenv("RESNET_FUSED_DETERMINISTIC", "1")
    else:
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert tb.deterministic()
    x = _rand(2, 5, 7, 7, channels_last=True)
    weight = _weight(6, 5, 3, 3)
    with _launch.capture() as launches:
        conv.conv2d_fused(x, weight, None, 1, 1, stats=True)
    assert launches[0].kernel is conv._conv_fwd_kernel  # the plain kernel, not the autotuner
    first = conv.conv2d_fused(x, weight, None, 1, 1, stats=True)
    again = conv.conv2d_fused(x, weight, None, 1, 1, stats=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    _close(first[0], _ref(x, weight, None, 1, 1), torch.float32)
    fixed = {k: v for k, v in tb.tile_configs().items() if k.startswith("fixed ")}
    assert any("R=3" in k and "STATS=True" in k for k in fixed), fixed


def test_prologue_staged_form_still_exact(monkeypatch):
    """RESNET_FUSED_TRITON_PROLOGUE=smem (the transposed, shared-memory staged prologue) computes the same."""
    monkeypatch.setenv("RESNET_FUSED_TRITON_PROLOGUE", "smem")
    x = _rand(2, 5, 7, 7, channels_last=True)
    weight = _weight(6, 5, 3, 3)
    in_scale = _rand(5, scale=0.5) + 1.0
    in_shift = torch.rand(5, device=DEVICE) + 0.5
    with _launch.capture() as launches:
        conv.conv2d_fused(x, weight, None, 1, 1, in_scale=in_scale, in_shift=in_shift)
    assert launches[0].kwargs["PROLOGUE_SMEM"] is True
    y = conv.conv2d_fused(x, weight, None, 1, 1, in_scale=in_scale, in_shift=in_shift)
    _close(y, _ref(x, weight, None, 1, 1, in_scale=in_scale, in_shift=in_shift), torch.float32)
    monkeypatch.setenv("RESNET_FUSED_TRITON_PROLOGUE", "bogus")
    with pytest.raises(ValueError, match="RESNET_FUSED_TRITON_PROLOGUE"):
        conv.conv2d_fused(x, weight, None, 1, 1, in_scale=in_scale, in_shift=in_shift)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("form", ["rs", "smem"])
def test_gpu_prologue_forms(form, monkeypatch):
    """Both forms of the BN+ReLU prologue (wgmma's register operand; staged through shared memory) on a ResNet
    layer in bf16: exact to the tolerance, statistics included."""
    monkeypatch.setenv("RESNET_FUSED_TRITON_PROLOGUE", form)
    x = _rand(8, 64, 56, 56, dtype=torch.bfloat16, channels_last=True)
    weight = _weight(64, 64, 3, 3, torch.bfloat16)
    in_scale = _rand(64, scale=0.5) + 1.0
    in_shift = _rand(64, scale=0.5)
    y, mean, var = conv.conv2d_fused(x, weight, None, 1, 1, in_scale=in_scale, in_shift=in_shift, stats=True)
    ref = _ref(x, weight, None, 1, 1, in_scale=in_scale, in_shift=in_shift)
    _close(y, ref, torch.bfloat16)
    ref_var, ref_mean = torch.var_mean(ref, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_gpu_deterministic_mode_is_bitwise_reproducible(monkeypatch):
    """Deterministic mode on a GPU: the fixed config of each shape, and the same bits on every rerun (what DDP
    ranks computing the same shapes rely on)."""
    monkeypatch.setenv("RESNET_FUSED_DETERMINISTIC", "1")
    x = _rand(8, 128, 28, 28, dtype=torch.bfloat16, channels_last=True)
    weight = _weight(128, 128, 3, 3, torch.bfloat16)
    runs = [conv.conv2d_fused(x, weight, None, 1, 1, stats=True) for _ in range(3)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))
    _close(runs[0][0], _ref(x, weight, None, 1, 1), torch.bfloat16)
    assert any(k.startswith("fixed ") for k in tb.tile_configs())


# ---- grouped convs with few channels per group: GROUP_PACK groups per tile, a block-diagonal weight tile ----

# (N, C, H, W, K, R, S, stride, padding, dilation, groups, GROUP_PACK the launcher picks): ResNeXt-like groups
# of 4 channels; two group blocks, so the block offset shows; groups with more outputs than inputs; dilation.
PACKED_SHAPES = {
    "3x3-8x4": (2, 32, 7, 7, 32, 3, 3, 1, 1, 1, 8, 8),
    "3x3-s2-16x4": (2, 64, 9, 8, 64, 3, 3, 2, 1, 1, 16, 8),
    "3x3-dil2-8x4": (2, 32, 7, 7, 32, 3, 3, 1, 2, 2, 8, 8),
    "3x3-8x4to8": (2, 32, 6, 7, 64, 3, 3, 1, 1, 1, 8, 4),
    "1x1-s2-16x4": (2, 64, 7, 7, 64, 1, 1, 2, 0, 1, 16, 8),
}


def _packed_case(name, dtype=torch.float32, channels_last=True):
    n, c, h, w, k, r, s, stride, padding, dilation, groups, pack = PACKED_SHAPES[name]
    x = _rand(n, c, h, w, dtype=dtype, channels_last=channels_last)
    weight = _weight(k, c // groups, r, s, dtype)
    return x, weight, dict(stride=stride, padding=padding, dilation=dilation, groups=groups), pack


def _launched_pack(*args, **kwargs):
    """GROUP_PACK of the one conv launch ``conv.conv2d_fused(*args, **kwargs)`` makes (recorded, not run)."""
    with _launch.capture() as launches:
        conv.conv2d_fused(*args, **kwargs)
    return launches[0].kwargs["GROUP_PACK"]


def test_group_pack_choice():
    """The launcher's GROUP_PACK: the fewest groups that fill a 32-output, 16-input tile, within 64 channels,
    dividing the groups; none where a group fills the tile alone or there are no groups."""
    assert conv.group_pack(32, 4, 4) == 8  # resnext50_32x4d: a 32x32 block-diagonal tile
    assert conv.group_pack(32, 8, 8) == 4  # resnext101_32x8d
    assert conv.group_pack(64, 1, 1) == 32  # depthwise
    assert conv.group_pack(8, 4, 8) == 4
    assert conv.group_pack(2, 3, 5) == 2  # the block stays below the tile: as many groups as there are
    assert conv.group_pack(3, 4, 4) == 3  # a divisor of the groups, not a power of two
    assert conv.group_pack(1, 4, 4) == 1
    assert conv.group_pack(2, 70, 68) == 1 and conv.group_pack(4, 16, 32) == 1  # wide groups stay unpacked
    assert conv.group_pack(4, 96, 8) == 1  # a block of two groups would exceed 64 input channels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(PACKED_SHAPES))
def test_packed_groups_match_pytorch(name, channels_last, dtype):
    x, weight, geo, pack = _packed_case(name, dtype, channels_last)
    if channels_last:  # the launcher's channels_last weight copy is then the weight itself
        weight = weight.contiguous(memory_format=torch.channels_last)
    assert _launched_pack(x, weight, None, **geo) == pack
    y = conv.conv2d_fused(x, weight, None, **geo)
    assert _is_cl(y) == channels_last
    _close(y, _ref(x, weight, None, **geo), dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", ["3x3-s2-16x4", "3x3-8x4to8"])
def test_packed_groups_with_prologue_bn_residual_relu(name, channels_last):
    """The BN+ReLU prologue (per input channel of the block, positive shifts: zero padding after the activation)
    with the eval BN, residual and ReLU epilogue (per output channel of the block)."""
    x, weight, geo, pack = _packed_case(name, channels_last=channels_last)
    c, k = x.shape[1], weight.shape[0]
    in_scale = _rand(c, scale=0.5) + 1.0
    in_shift = torch.rand(c, device=DEVICE) + 0.5
    bn = _bn(k)
    p, q = conv.output_shape(x, weight, geo["stride"], geo["padding"], geo["dilation"])[2:]
    res = _rand(x.shape[0], k, p, q, channels_last=channels_last)
    kw = dict(residual=res, relu=True, in_scale=in_scale, in_shift=in_shift)
    assert _launched_pack(x, weight, bn, **geo, **kw) == pack
    y = conv.conv2d_fused(x, weight, bn, **geo, **kw)
    _close(y, _ref(x, weight, bn, **geo, **kw), torch.float32)


def test_packed_groups_prologue_staged_form(monkeypatch):
    """The transposed, shared-memory staged prologue form on the packed path."""
    monkeypatch.setenv("RESNET_FUSED_TRITON_PROLOGUE", "smem")
    x, weight, geo, _ = _packed_case("3x3-s2-16x4")
    in_scale = _rand(64, scale=0.5) + 1.0
    in_shift = torch.rand(64, device=DEVICE) + 0.5
    y = conv.conv2d_fused(x, weight, None, **geo, in_scale=in_scale, in_shift=in_shift)
    _close(y, _ref(x, weight, None, **geo, in_scale=in_scale, in_shift=in_shift), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
def test_packed_groups_stats(prologue, dtype, interpreter_rounds_bf16_to_nearest):
    """Per-channel statistics of a packed launch over two row tiles (243 rows) and two group blocks."""
    x = _rand(3, 64, 9, 9, dtype=dtype, channels_last=True)
    weight = _weight(64, 4, 3, 3, dtype)
    kw = dict(in_scale=_rand(64) + 1.0, in_shift=_rand(64)) if prologue else {}
    assert _launched_pack(x, weight, None, 1, 1, groups=16, stats=True, **kw) == 8
    y, mean, var = conv.conv2d_fused(x, weight, None, 1, 1, groups=16, stats=True, **kw)
    ref = _ref(x, weight, None, 1, 1, groups=16, **kw)
    _close(y, ref, dtype)
    ref_var, ref_mean = torch.var_mean(ref, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=STATS_TOL[0], atol=STATS_TOL[1])
    torch.testing.assert_close(var.double(), ref_var, rtol=STATS_TOL[0], atol=STATS_TOL[1])


@pytest.mark.parametrize("merge_tiles", [32, 1], ids=["one-group", "groups-of-1"])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn_relu_prologue"])
def test_packed_groups_bn_finalized_in_launch(prologue, merge_tiles, monkeypatch):
    """conv2d_bn_train on a packed grouped conv: two group blocks (finalize columns) over two row tiles, merged
    in one group or in groups of one; mean, var, scale/shift, running statistics and num_batches_tracked equal
    torch.nn.BatchNorm2d's on the fp64 convolution, and the arrival counters end at zero."""
    from torch import nn

    from resnet_fused.backends.reference import TrainBN

    monkeypatch.setattr(conv, "MERGE_TILES", merge_tiles)
    x = (_rand(3, 64, 9, 9) * 2 + 3).contiguous(memory_format=torch.channels_last)
    weight = _weight(64, 4, 3, 3)
    in_scale = torch.rand(64, device=DEVICE) + 0.5 if prologue else None
    in_shift = torch.randn(64, device=DEVICE) if prologue else None

    def make_bn():
        torch.manual_seed(1)
        bn = nn.BatchNorm2d(64, momentum=0.1).to(DEVICE)
        bn.weight.data = torch.rand(64, device=DEVICE) + 0.5
        bn.bias.data = torch.randn(64, device=DEVICE)
        bn.running_mean.copy_(torch.randn(64, device=DEVICE))
        bn.running_var.copy_(torch.rand(64, device=DEVICE) + 0.5)
        bn.num_batches_tracked.fill_(3)
        return bn

    bn, ref_bn = make_bn(), make_bn().double()
    spec = TrainBN(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps)
    with _launch.capture() as launches:
        conv.conv2d_bn_train(x, weight, spec, 1, 1, groups=16, in_scale=in_scale, in_shift=in_shift)
    assert launches[0].kwargs["GROUP_PACK"] == 8 and launches[0].kwargs["FINALIZE"]
    _launch.reset_launch_count()
    c, mean, var, scale, shift = conv.conv2d_bn_train(x, weight, spec, 1, 1, groups=16, in_scale=in_scale,
                                                      in_shift=in_shift)
    assert _launch.launch_count() == 1
    ref = _ref(x, weight, None, 1, 1, groups=16, in_scale=in_scale, in_shift=in_shift)
    expected = ref_bn(ref)
    tol = dict(rtol=1e-4, atol=1e-4)
    _close(c, ref, torch.float32)
    torch.testing.assert_close(mean.double(), ref.mean((0, 2, 3)), **tol)
    torch.testing.assert_close(var.double(), ref.var((0, 2, 3), unbiased=False), **tol)
    torch.testing.assert_close(c.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1),
                               expected, **tol)
    torch.testing.assert_close(bn.running_mean.double(), ref_bn.running_mean, **tol)
    torch.testing.assert_close(bn.running_var.double(), ref_bn.running_var, **tol)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 4
    assert all(int(buf.abs().max()) == 0 for buf in _launch._COUNTERS.values())


def test_packed_groups_deterministic_mode(monkeypatch):
    """Deterministic mode on the packed path: the fixed config is keyed with GROUP_PACK, and reruns agree."""
    monkeypatch.setenv("RESNET_FUSED_DETERMINISTIC", "1")
    x, weight, geo, _ = _packed_case("3x3-8x4")
    first = conv.conv2d_fused(x, weight, None, **geo, stats=True)
    again = conv.conv2d_fused(x, weight, None, **geo, stats=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    _close(first[0], _ref(x, weight, None, **geo), torch.float32)
    assert any(k.startswith("fixed ") and "GROUPS=8 GROUP_PACK=8" in k for k in tb.tile_configs())


def test_packed_groups_prune_and_mma_macs():
    """ResNeXt-50 32x4d layer1 conv2 (128 channels, 32 groups of 4, 3x3, batch 256 at 56x56, recorded, not
    run): the launcher packs 8 groups per tile, pruning sizes the tiles to the 32-channel block (BLOCK_K=32, not
    16), and the MMA tiles issue 1/8 useful work, 4x the 1/32 of one group per 32x16 tile."""
    x = torch.empty(256, 128, 56, 56, device="meta", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    weight = torch.empty(128, 4, 3, 3, device="meta", dtype=torch.bfloat16)
    with _launch.capture() as launches:
        conv.conv2d_fused(x, weight, None, 1, 1, groups=32, relu=True)
    (launch,) = launches
    assert launch.kwargs["GROUP_PACK"] == 8
    nargs = dict(zip(conv._conv_fwd_tuned.arg_names, launch.args))
    configs = [_cfg(128, 64, 64, 8), _cfg(64, 64, 32), _cfg(64, 32, 32), _cfg(64, 32, 16)]
    kept = conv._prune(configs, nargs, **launch.kwargs)
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept] == [(32, 32)]
    assert launch.grid(kept[0].kwargs) == (4 * 256 * 56 * 56 // 64,)  # 4 group blocks x row tiles, one column
    useful, issued = conv.mma_macs({**nargs, **launch.kwargs, **kept[0].kwargs})
    assert useful == 256 * 56 * 56 * 128 * 9 * 4
    assert useful / issued == pytest.approx(1 / 8)
    unpacked, unpacked_issued = conv.mma_macs({**nargs, **launch.kwargs, "GROUP_PACK": 1, "BLOCK_M": 64,
                                               "BLOCK_N": 32, "BLOCK_K": 16})
    assert unpacked == useful and unpacked / unpacked_issued == pytest.approx(1 / 32)
    # pruning follows the block's widths: unpacked, only the smallest tile would be left
    assert [c.kwargs["BLOCK_K"] for c in conv._prune(configs, nargs, **{**launch.kwargs, "GROUP_PACK": 1})] == [16]


# ---- absent operands, autotuning ----


def test_autotuned_conv_leaves_a_saved_weight_alone(monkeypatch):
    """A conv without BN autotuned over several configs must not touch its 1x1 weight: absent operands (here the
    BN's) point at a scratch tensor, and only the launches that update running statistics have their operands
    restored around the timing runs. Here the same weight Parameter serves two convs of one graph (two crops): the
    first saved it for backward before the second was autotuned, and backward still runs — a copy back into it
    (autotune restoring the "BN" it stood in for) bumps its version counter, and backward refuses."""
    from resnet_fused.backends.triton import train

    def cfg(bm, warps):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=warps,
                             num_stages=1)

    timed = []

    def bench(kernel_call, quantiles):  # the interpreter has no GPU timer: one timed call per config
        t0 = time.perf_counter()
        kernel_call()
        timed.append(time.perf_counter() - t0)
        return [timed[-1]] * len(quantiles)

    configs = [cfg(64, 1), cfg(128, 1), cfg(64, 2)]  # BLOCK_M >= MIN_BLOCK_M: the statistics rows
    for name in ("_conv_fwd_tuned", "_conv_fwd_tuned_update"):
        tuner = getattr(conv, name, None)
        if tuner is not None:
            monkeypatch.setattr(tuner, "configs", configs)
            monkeypatch.setattr(tuner, "cache", {})
            monkeypatch.setitem(vars(tuner), "do_bench", bench)  # over the cached_property
    monkeypatch.setattr(conv, "deterministic", lambda: False)
    weight = torch.nn.Parameter(_weight(32, 16, 1, 1))
    # two crops of different sizes (two autotune keys), channels_last (an NCHW output prunes to one config)
    crops = [_rand(2, 16, 5, 5, channels_last=True).requires_grad_(),
             _rand(2, 16, 3, 3, channels_last=True).requires_grad_()]
    outs = [train.conv_stats(crops[0], weight, 1, 0)]
    del timed[:]
    outs.append(train.conv_stats(crops[1], weight, 1, 0))
    assert len(timed) == len(configs), "the second crop's conv was not autotuned over several configs"
    loss = sum((c * torch.randn_like(c)).sum() + mean.sum() + var.sum() for c, mean, var in outs)
    loss.backward()
    for x, (c, _, _) in zip(crops, outs):
        ref = F.conv2d(x.detach().double(), weight.detach().double())
        _close(c, ref, torch.float32)
    assert weight.grad is not None and all(x.grad is not None for x in crops)


def test_launchers_make_the_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: every registered launcher makes its first CUDA tensor's
    device current around the call (``_launch.device_guard``). Checked without a GPU on fake CUDA tensors of a
    second device, with ``torch.cuda.device`` recorded."""
    from torch._subclasses import FakeTensorMode

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append(None)

    seen = []

    def probe(x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> None:
        seen.append(list(entered))

    def probe_fake(x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> None:
        return None

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    call = _launch.register_op("test_device_guard_probe", probe, probe_fake)
    with FakeTensorMode():
        x = torch.empty(2, device="cuda:1")
    with _launch.direct():
        call(None, x)
    assert seen == [[torch.device("cuda:1")]] and entered[-1] is None
    with _launch.direct():
        call(torch.empty(2), None)  # no CUDA tensor: no guard
    assert seen[-1] == [torch.device("cuda:1"), None]
