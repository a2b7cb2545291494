"""Tests of the C++/CUDA extension ``resnet_fused._C`` (``torch.ops.resnet_fused.*``) and its backend module.

CPU kernels (always run when the extension is built): ``conv_bn_act`` against an fp64 formula written here (its own
convolution by shifted windows and einsum, not ``at::convolution`` that the kernel calls) in fp64 / fp32 / fp16 /
bf16, NCHW and channels_last, affine and ``affine=False`` BNs, BN tensors of another dtype; every gradient (input,
weights, residual, both BNs' four tensors) against autograd through that formula; memory format, fake kernels and
autograd registration (``opcheck``), fp64 ``gradcheck``, input checks (PyTorch's error for a window larger than the
padded input); ``scale_bias_add_relu`` likewise; build info; the engine argument and the engine choice (forced
engine, measurement with fake timings, memory and disk cache). GPU kernels (``gpu`` mark): ``conv_bn_act`` on shapes
the CUTLASS kernels cover and on shapes that take cuDNN plus the channel pass, each engine forced (it runs what it
covers, declines the rest with its reason), the measured engine choice, ``scale_bias_add_relu``'s vectorized and
scalar paths, fp32 / fp16 / bf16, against the same formulas.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from extension import import_extension

import_extension()

from resnet_fused.backends import cuda as cuda_backend  # noqa: E402
from resnet_fused.backends import reference  # noqa: E402
from tolerances import assert_close  # noqa: E402

assert cuda_backend.is_built()  # registers the fake and autograd kernels of the ops

ops = torch.ops.resnet_fused

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _rand(*shape, dtype=torch.float32, device="cpu", mf=torch.contiguous_format, requires_grad=False):
    t = torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)
    if len(shape) == 4:
        t = t.contiguous(memory_format=mf)
    return t.requires_grad_(requires_grad)


def _chan(v):
    return v.double().view(1, -1, 1, 1)


def _pair(v):
    return list(v) if isinstance(v, (list, tuple)) else [v, v]


def conv2d_fp64(x, w, stride=1, padding=0, dilation=1, groups=1):
    """conv2d in fp64 as a sum over the R*S filter taps of strided windows of the zero-padded input times the tap's
    weights (einsum): an oracle that shares no code with ``at::convolution``; differentiable."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    x, w = x.double(), w.double()
    n, c, h, wd = x.shape
    k, cg, r, s = w.shape
    p = (h + 2 * ph - dh * (r - 1) - 1) // sh + 1
    q = (wd + 2 * pw - dw * (s - 1) - 1) // sw + 1
    xp = F.pad(x, (pw, pw, ph, ph))
    out = x.new_zeros(n, groups, k // groups, p, q)
    for i in range(r):
        for j in range(s):
            win = xp[:, :, i * dh: i * dh + sh * (p - 1) + 1: sh, j * dw: j * dw + sw * (q - 1) + 1: sw]
            out = out + torch.einsum("ngcpq,gkc->ngkpq", win.reshape(n, groups, cg, p, q),
                                     w[:, :, i, j].reshape(groups, k // groups, cg))
    return out.reshape(n, k, p, q)


def bn_fp64(bn):
    """(s, t) of an EvalBN in fp64: s = γ/√(σ²+ε), t = β − μ·s (differentiable in the BN tensors)."""
    invstd = 1.0 / torch.sqrt(bn.var.double() + bn.eps)
    s = invstd if bn.weight is None else bn.weight.double() * invstd
    t = -bn.mean.double() * s
    return s, (t if bn.bias is None else t + bn.bias.double())


def conv_bn_act_formula(x, w, bn, stride, padding, dilation, groups, residual, shortcut, relu):
    """act(conv(x, W)·s + t + conv1x1(x_d, W_d)·s_d + t_d + residual) in fp64 (conv2d_fp64, bn_fp64)."""
    s, t = bn_fp64(bn)
    y = conv2d_fp64(x, w, stride, padding, dilation, groups) * _chan(s) + _chan(t)
    if shortcut is not None:
        sd, td = bn_fp64(shortcut.bn)
        y = y + conv2d_fp64(shortcut.x, shortcut.weight, shortcut.stride) * _chan(sd) + _chan(td)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def scale_bias_add_relu_formula(c, s, t, idn, s_d, t_d):
    """relu(c*s + t + (idn*s_d + t_d or idn)) in fp64."""
    r = idn.double() if s_d is None else idn.double() * _chan(s_d) + _chan(t_d)
    return torch.relu(c.double() * _chan(s) + _chan(t) + r)


def _assert_format(out, ref_input, shape):
    """Output dense in the input's memory format, with the strides torch.empty gives that format."""
    mf = torch.channels_last if ref_input.is_contiguous(memory_format=torch.channels_last) and not \
        ref_input.is_contiguous() else torch.contiguous_format
    assert out.shape == shape
    assert out.stride() == torch.empty(shape, memory_format=mf).stride()


# (C, K, H, W, kernel, stride, padding, dilation, groups)
CONV_CONFIGS = {
    "3x3_c3_k5_h7": (3, 5, 7, 7, 3, 1, 1, 1, 1),
    "3x3_s2_dil2_c5": (5, 4, 9, 7, 3, 2, 2, 2, 1),
    "3x3_groups2": (4, 6, 7, 7, 3, 1, 1, 1, 2),
    "1x1_s2": (5, 3, 7, 7, 1, 2, 0, 1, 1),
}
# (feature, relu) of the CPU kernel's output test: every term with and without the ReLU at least once.
CPU_CASES = {"bn_norelu": ("bn", False), "bn_residual": ("bn_residual", True), "bn_shortcut": ("bn_shortcut", True),
             "all": ("all", True), "all_norelu": ("all", False), "no_affine_shortcut": ("no_affine_shortcut", True)}


def _eval_bn(k, dtype=torch.float32, device="cpu", affine=True, requires_grad=False):
    """An EvalBN of k channels with random, non-trivial tensors: γ in [0.5, 1.5) with some negative, β and μ of
    order 1, σ² in [0.5, 2.5); eps 1e-5."""
    def vec(t):
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    weight = torch.rand(k, dtype=torch.float64) + 0.5
    weight[::3] *= -1
    weight = vec(weight) if affine else None
    bias = vec(torch.randn(k, dtype=torch.float64)) if affine else None
    return reference.EvalBN(weight, bias, vec(torch.randn(k, dtype=torch.float64)),
                            vec(torch.rand(k, dtype=torch.float64) * 2 + 0.5), 1e-5)


def _conv_args(config, feature, dtype, mf, device="cpu", requires_grad=False, bn_dtype=None, n=2):
    """(x, W, bn, stride, padding, dilation, groups, residual, shortcut) of a conv_bn_act call and its output shape;
    BN tensors in ``bn_dtype`` (default: the accumulation dtype of ``dtype``)."""
    C, K, H, W, k, s, p, d, g = config
    bn_dtype = bn_dtype or reference.acc_dtype(dtype)
    x = _rand(n, C, H, W, dtype=dtype, device=device, mf=mf, requires_grad=requires_grad)
    w = _rand(K, C // g, k, k, dtype=dtype, device=device, mf=mf, requires_grad=requires_grad)
    bn = _eval_bn(K, bn_dtype, device, requires_grad=requires_grad)
    P = (H + 2 * p - d * (k - 1) - 1) // s + 1
    Q = (W + 2 * p - d * (k - 1) - 1) // s + 1
    residual = shortcut = None
    if feature in ("bn_residual", "all"):
        residual = _rand(n, K, P, Q, dtype=dtype, device=device, mf=mf, requires_grad=requires_grad)
    if feature in ("bn_shortcut", "all", "no_affine_shortcut"):
        sx = _rand(n, 3, 2 * P - 1, 2 * Q, dtype=dtype, device=device, mf=mf, requires_grad=requires_grad)
        sw = _rand(K, 3, 1, 1, dtype=dtype, device=device, requires_grad=requires_grad)
        shortcut = reference.Shortcut(sx, sw, _eval_bn(K, bn_dtype, device, feature != "no_affine_shortcut",
                                                       requires_grad), 2)
    if feature == "no_affine_shortcut":
        bn = _eval_bn(K, bn_dtype, device, affine=False, requires_grad=requires_grad)
    return (x, w, bn, [s, s], [p, p], [d, d], g, residual, shortcut), (n, K, P, Q)


def _op_args(args, relu):
    """The positional arguments of torch.ops.resnet_fused.conv_bn_act for _conv_args' tuple."""
    x, w, bn, st, pd, dl, g, residual, shortcut = args
    sc = shortcut or reference.Shortcut(None, None, reference.EvalBN(None, None, None, None, 0.0), 1)
    return (x, w, bn.weight, bn.bias, bn.mean, bn.var, bn.eps, st, pd, dl, g, residual, sc.x, sc.weight,
            sc.bn.weight, sc.bn.bias, sc.bn.mean, sc.bn.var, sc.bn.eps, [sc.stride, sc.stride], relu)


def _tensors(args):
    """Every tensor of _conv_args' tuple, BN tensors and the shortcut's included (None left out)."""
    x, w, bn, _, _, _, _, residual, shortcut = args
    out = [x, w, *bn[:4], residual]
    if shortcut is not None:
        out += [shortcut.x, shortcut.weight, *shortcut.bn[:4]]
    return [t for t in out if t is not None]


# ---------------------------------------------------------------------------------------------------- CPU

CPU_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("case", CPU_CASES.values(), ids=CPU_CASES.keys())
@pytest.mark.parametrize("config", CONV_CONFIGS.values(), ids=CONV_CONFIGS.keys())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_conv_bn_act_cpu(dtype, fmt, config, case):
    """The CPU kernel against the fp64 formula on the same (rounded) inputs; output dtype and memory format; the
    inputs untouched."""
    torch.manual_seed(0)
    feature, relu = case
    args, shape = _conv_args(config, feature, dtype, FORMATS[fmt])
    before = [t.clone() for t in _tensors(args)]
    out = ops.conv_bn_act(*_op_args(args, relu))
    assert out.dtype == dtype
    _assert_format(out, args[0], shape)
    ref = conv_bn_act_formula(*args, relu)
    # fp16 / bf16: the kernel's convolution output is rounded to the dtype before the BN (PyTorch's CPU conv
    # returns it in x's dtype): twice the table's tolerance covers that rounding times |s| <= 1.5.
    assert_close(out.double(), ref, dtype=dtype, scale=1.0 if dtype in (torch.float32, torch.float64) else 2.0)
    for a, b in zip(_tensors(args), before):
        assert torch.equal(a, b), "inputs must not be modified"


@pytest.mark.parametrize("bn_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_conv_bn_act_cpu_bn_tensors_of_another_dtype(bn_dtype):
    """fp32 activations with the BN tensors of a half (or double) model: s and t are computed from them in fp32."""
    torch.manual_seed(1)
    args, shape = _conv_args(CONV_CONFIGS["3x3_c3_k5_h7"], "all", torch.float32, torch.channels_last,
                             bn_dtype=bn_dtype)
    out = ops.conv_bn_act(*_op_args(args, True))
    _assert_format(out, args[0], shape)
    assert_close(out.double(), conv_bn_act_formula(*args, True), dtype=torch.float32)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_conv_bn_act_mixed_layouts(device, no_tf32):
    """channels_last x with an NCHW weight, a strided (non-dense) residual, an NCHW shortcut input and strided BN
    vectors: the output still follows x's layout and every operand is read through its own strides."""
    if device == "cuda":
        _needs_cuda_build()
    torch.manual_seed(16)
    x = _rand(2, 8, 6, 6, device=device, mf=torch.channels_last)
    w = _rand(16, 8, 3, 3, device=device)
    bn = reference.EvalBN(*(_rand(32, device=device)[::2] for _ in range(3)),
                          _rand(32, device=device)[::2].abs() + 0.5, 1e-3)
    residual = _rand(2, 16, 6, 12, device=device)[..., ::2]
    sc = reference.Shortcut(_rand(2, 4, 11, 11, device=device), _rand(16, 4, 1, 1, device=device),
                            _eval_bn(16, device=device), 2)
    args = (x, w, bn, [1, 1], [1, 1], [1, 1], 1, residual, sc)
    out = ops.conv_bn_act(*_op_args(args, True))
    _assert_format(out, x, (2, 16, 6, 6))
    assert_close(out.double().cpu(), conv_bn_act_formula(*args, True).cpu(), dtype=torch.float32)


SBAR_SHAPES = {"c3_h7": (2, 3, 7, 7), "c5_h7x5": (3, 5, 7, 5), "c16_h4": (2, 16, 4, 4)}


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("shape", SBAR_SHAPES.values(), ids=SBAR_SHAPES.keys())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_bias_add_relu_cpu(dtype, fmt, shape, dual):
    torch.manual_seed(2)
    mf = FORMATS[fmt]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    C = shape[1]
    c = _rand(*shape, dtype=dtype, mf=mf)
    idn = _rand(*shape, dtype=dtype, mf=mf)
    s, t = _rand(C, dtype=pdtype), _rand(C, dtype=pdtype)
    s_d, t_d = (_rand(C, dtype=pdtype), _rand(C, dtype=pdtype)) if dual else (None, None)
    before = [c.clone(), idn.clone()]
    out = ops.scale_bias_add_relu(c, s, t, idn, s_d, t_d)
    assert out.dtype == dtype
    _assert_format(out, c, c.shape)
    assert_close(out.double(), scale_bias_add_relu_formula(c, s, t, idn, s_d, t_d), dtype=dtype)
    assert torch.equal(c, before[0]) and torch.equal(idn, before[1]), "inputs must not be modified"


def test_scale_bias_add_relu_cpu_mixed_layouts_and_bf16():
    """bf16 c in channels_last, idn in NCHW and a non-dense view: the output follows c's layout."""
    torch.manual_seed(3)
    c = _rand(2, 6, 5, 5, dtype=torch.bfloat16, mf=torch.channels_last)
    idn = _rand(2, 6, 5, 10, dtype=torch.bfloat16)[..., ::2]
    s, t = _rand(6), _rand(6)
    out = ops.scale_bias_add_relu(c, s, t, idn, None, None)
    _assert_format(out, c, c.shape)
    assert_close(out.double(), scale_bias_add_relu_formula(c, s, t, idn, None, None), dtype=torch.bfloat16)


def test_backend_api_cpu_matches_ops():
    """The module-level API forwards ints / tuples, the EvalBN / Shortcut and the optional arguments correctly."""
    torch.manual_seed(4)
    x, w, bn = _rand(2, 4, 6, 6), _rand(8, 4, 3, 3), _eval_bn(8, affine=False)
    sc = reference.Shortcut(_rand(2, 3, 6, 6), _rand(8, 3, 1, 1), _eval_bn(8), 2)
    out = cuda_backend.conv_bn_act(x, w, bn, stride=2, padding=1, shortcut=sc)
    assert_close(out.double(), conv_bn_act_formula(x, w, bn, 2, 1, 1, 1, None, sc, True), dtype=torch.float32)
    out = cuda_backend.conv_bn_act(x, w, bn, 1, 1, 1, 1, residual=_rand(2, 8, 6, 6), relu=False)
    assert out.shape == (2, 8, 6, 6)
    c, idn, s, t = _rand(2, 8, 3, 3), _rand(2, 8, 3, 3), _rand(8), _rand(8)
    assert_close(cuda_backend.scale_bias_add_relu(c, s, t, idn).double(),
                 scale_bias_add_relu_formula(c, s, t, idn, None, None), dtype=torch.float32)


def test_conv_bn_act_sees_in_place_edits():
    """No copy of the BN tensors or weights is kept between calls: .data edits (which bump no version counter)
    change the next result."""
    torch.manual_seed(5)
    args, _ = _conv_args(CONV_CONFIGS["3x3_c3_k5_h7"], "all", torch.float32, torch.channels_last)
    x, w, bn, st, pd, dl, g, residual, sc = args
    for edit in (lambda: w.data.mul_(2.0), lambda: bn.var.data.mul_(3.0), lambda: bn.mean.data.add_(1.0),
                 lambda: sc.weight.data.neg_(), lambda: sc.bn.weight.data.mul_(0.5), lambda: bn.bias.data.sub_(1.0)):
        before = ops.conv_bn_act(*_op_args(args, True))
        edit()
        after = ops.conv_bn_act(*_op_args(args, True))
        assert not torch.equal(before, after)
        assert_close(after.double(), conv_bn_act_formula(*args, True), dtype=torch.float32)


# --------------------------------------------------------------------------------------- opcheck, autograd

OPCHECK_CONV = {
    "nchw_all": (CONV_CONFIGS["3x3_c3_k5_h7"], "all", torch.contiguous_format, True),
    "nhwc_shortcut_norelu": (CONV_CONFIGS["3x3_s2_dil2_c5"], "bn_shortcut", torch.channels_last, False),
    "nhwc_groups_no_affine": (CONV_CONFIGS["3x3_groups2"], "no_affine_shortcut", torch.channels_last, True),
}


@pytest.mark.parametrize("case", OPCHECK_CONV.values(), ids=OPCHECK_CONV.keys())
def test_opcheck_conv_bn_act(case):
    torch.manual_seed(5)
    config, feature, mf, relu = case
    args, _ = _conv_args(config, feature, torch.float32, mf, requires_grad=True)
    torch.library.opcheck(ops.conv_bn_act.default, _op_args(args, relu))


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_scale_bias_add_relu(fmt, dual):
    torch.manual_seed(6)
    mf = FORMATS[fmt]
    c = _rand(2, 5, 4, 3, mf=mf, requires_grad=True)
    idn = _rand(2, 5, 4, 3, mf=mf, requires_grad=True)
    params = [_rand(5, requires_grad=True) for _ in range(4 if dual else 2)]
    s_d, t_d = params[2:] if dual else (None, None)
    torch.library.opcheck(ops.scale_bias_add_relu.default, (c, params[0], params[1], idn, s_d, t_d))


@pytest.mark.parametrize("feature, fmt", [("all", "nchw"), ("all", "nhwc"), ("no_affine_shortcut", "nhwc")])
def test_gradcheck_conv_bn_act(feature, fmt):
    torch.manual_seed(7)
    args, _ = _conv_args((3, 4, 5, 5, 3, 1, 1, 1, 1), feature, torch.float64, FORMATS[fmt], requires_grad=True)
    op_args = _op_args(args, True)
    positions = [i for i, a in enumerate(op_args) if isinstance(a, torch.Tensor)]

    def fn(*ts):
        full = list(op_args)
        for i, t in zip(positions, ts):
            full[i] = t
        return ops.conv_bn_act(*full)

    assert torch.autograd.gradcheck(fn, tuple(op_args[i] for i in positions), fast_mode=True)


@pytest.mark.parametrize("feature", ["all", "no_affine_shortcut", "bn_residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_bn_act_grads_match_formula(dtype, feature):
    """Every gradient (x, W, residual, the shortcut's x_d and W_d, both BNs' γ, β, μ, σ²) through the op's registered
    autograd against autograd through the fp64 formula; each in its tensor's dtype."""
    torch.manual_seed(9)
    args, shape = _conv_args(CONV_CONFIGS["3x3_s2_dil2_c5"], feature, dtype, torch.channels_last,
                             requires_grad=True)
    tensors = _tensors(args)
    out = cuda_backend.conv_bn_act(*args[:7], residual=args[7], shortcut=args[8])
    g = _rand(*shape, dtype=dtype)
    got = torch.autograd.grad(out, tensors, g)
    want = torch.autograd.grad(conv_bn_act_formula(*args, True), tensors, g.double())
    for i, (a, b, t) in enumerate(zip(got, want, tensors)):
        assert a.dtype == t.dtype
        # per-channel BN gradients are sums over N·P·Q terms
        assert_close(a.double(), b.double(), dtype=dtype, scale=1.0 if a.dim() == 4 else 10.0, msg=f"tensor {i}")


@pytest.mark.parametrize("dual", [False, True])
def test_gradcheck_scale_bias_add_relu(dual):
    torch.manual_seed(8)
    c = _rand(2, 3, 4, 4, dtype=torch.float64, mf=torch.channels_last, requires_grad=True)
    idn = _rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    params = [_rand(3, dtype=torch.float64, requires_grad=True) for _ in range(4 if dual else 2)]
    s_d, t_d = params[2:] if dual else (None, None)
    assert torch.autograd.gradcheck(ops.scale_bias_add_relu, (c, params[0], params[1], idn, s_d, t_d),
                                    fast_mode=True)


def test_grads_fp32_params_match_pytorch_autograd():
    """fp32 params with fp32 activations; every gradient vs autograd through the PyTorch formula."""
    torch.manual_seed(9)
    c, idn = _rand(2, 4, 5, 5, requires_grad=True), _rand(2, 4, 5, 5, requires_grad=True)
    params = [_rand(4, requires_grad=True) for _ in range(4)]
    out = ops.scale_bias_add_relu(c, *params[:2], idn, *params[2:])
    ref = scale_bias_add_relu_formula(c, *params[:2], idn, *params[2:])
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [c, idn, *params], g)
    want = torch.autograd.grad(ref, [c, idn, *params], g.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert_close(a.double(), b.double(), dtype=torch.float32)


# ------------------------------------------------------------------------------------------ input checks


def _conv_ok():
    bn = _eval_bn(8)
    return dict(x=_rand(2, 4, 6, 6), weight=_rand(8, 4, 3, 3), bn_weight=bn.weight, bn_bias=bn.bias,
                bn_mean=bn.mean, bn_var=bn.var, bn_eps=1e-5, stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1,
                residual=None, shortcut_x=None, shortcut_weight=None, shortcut_bn_weight=None, shortcut_bn_bias=None,
                shortcut_bn_mean=None, shortcut_bn_var=None, shortcut_bn_eps=1e-5, shortcut_stride=[1, 1],
                relu=True)


def _shortcut(cs=3, k=8, stride=1, hw=6, kernel=1):
    bn = _eval_bn(k)
    return dict(shortcut_x=_rand(2, cs, hw, hw), shortcut_weight=_rand(k, cs, kernel, kernel),
                shortcut_bn_weight=bn.weight, shortcut_bn_bias=bn.bias, shortcut_bn_mean=bn.mean,
                shortcut_bn_var=bn.var, shortcut_stride=[stride, stride])


BAD_CONV = {
    "x_rank": (dict(x=_rand(4, 6, 6)), "x must be 4-D"),
    "channel_mismatch": (dict(weight=_rand(8, 3, 3, 3)), "x has 4 channels but weight expects 3"),
    "groups_mismatch": (dict(groups=3), "weight expects"),
    "weight_dtype": (dict(weight=_rand(8, 4, 3, 3, dtype=torch.float64)), "weight must have the dtype of x"),
    "bn_mean_size": (dict(bn_mean=_rand(7)), "bn_mean must be 1-D of size K = 8"),
    "bn_var_rank": (dict(bn_var=_rand(1, 8)), "bn_var must be 1-D of size K = 8"),
    "bn_var_int": (dict(bn_var=torch.ones(8, dtype=torch.int32)), "bn_var must be float32/float64"),
    "bn_weight_alone": (dict(bn_bias=None), "bn_weight and bn_bias must be given together"),
    "bn_eps_negative": (dict(bn_eps=-1.0), "bn_eps must be finite and >= 0"),
    "residual_shape": (dict(residual=_rand(2, 8, 5, 6)), "residual must have the output shape"),
    "residual_dtype": (dict(residual=_rand(2, 8, 6, 6, dtype=torch.float64)), "residual must have the dtype"),
    "shortcut_alone": (dict(shortcut_x=_rand(2, 3, 6, 6)), "must be given together"),
    "shortcut_bn_without_shortcut": (dict(shortcut_bn_mean=_rand(8), shortcut_bn_var=_rand(8)),
                                     "given without a shortcut"),
    "shortcut_without_bn": ({**_shortcut(), "shortcut_bn_mean": None, "shortcut_bn_var": None},
                            "shortcut_bn_mean and shortcut_bn_var must be given together"),
    "shortcut_bn_size": ({**_shortcut(), "shortcut_bn_mean": _rand(5)}, "shortcut_bn_mean must be 1-D of size K"),
    "shortcut_not_1x1": (_shortcut(kernel=3), r"shortcut_weight must be \[K, Cs, 1, 1\]"),
    "shortcut_spatial": (_shortcut(stride=2), "shortcut conv output is 3x3"),
    "stride_zero": (dict(stride=[0, 1]), "stride must be >= 1"),
    "kernel_larger_than_input": (dict(padding=[0, 0], weight=_rand(8, 4, 7, 7)),
                                 "Kernel size can't be greater than actual input size"),
}


@pytest.mark.parametrize("case", BAD_CONV.values(), ids=BAD_CONV.keys())
def test_conv_bn_act_rejects_bad_input(case):
    override, message = case
    kwargs = {**_conv_ok(), **override}
    with pytest.raises(RuntimeError, match=message):
        ops.conv_bn_act(*kwargs.values())


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_window_larger_than_padded_input_is_pytorchs_error(device):
    """A 7x7 window over a 6x6 input with stride 2: C++'s truncating division made the output 1x1 (garbage on the
    CUDA kernels, a shape the fake kernel disagreed with); the op, its fake kernel and F.conv2d now all refuse."""
    x, w = torch.randn(1, 8, 6, 6, device=device), torch.randn(8, 8, 7, 7, device=device)
    bn = _eval_bn(8, device=device)
    args = (x, w, bn, [2, 2], [0, 0], [1, 1], 1, None, None)
    message = r"Calculated padded input size per channel: \(6 x 6\). Kernel size: \(7 x 7\). Kernel size can't be"
    if device == "cpu":
        with pytest.raises(RuntimeError, match=message):
            F.conv2d(x, w, stride=2)
    with pytest.raises(RuntimeError, match=message):
        ops.conv_bn_act(*_op_args(args, True))
    # one row more fits: a 1x1 output, as PyTorch's
    x7 = torch.randn(1, 8, 7, 7, device=device)
    assert ops.conv_bn_act(*_op_args((x7, *args[1:]), True)).shape == (1, 8, 1, 1)


def _sbar_ok():
    return dict(c=_rand(2, 4, 3, 3), scale=_rand(4), shift=_rand(4), idn=_rand(2, 4, 3, 3), idn_scale=None,
                idn_shift=None)


BAD_SBAR = {
    "c_rank": (dict(c=_rand(4, 3, 3), idn=_rand(4, 3, 3)), "c must be 4-D"),
    "idn_shape": (dict(idn=_rand(2, 4, 3, 4)), "idn must have the shape of c"),
    "idn_dtype": (dict(idn=_rand(2, 4, 3, 3, dtype=torch.float64)), "idn must have the dtype of c"),
    "scale_size": (dict(scale=_rand(5)), "scale must be 1-D of size C = 4"),
    "shift_rank": (dict(shift=_rand(1, 4)), "shift must be 1-D of size C = 4"),
    "scale_dtype": (dict(scale=_rand(4, dtype=torch.float16)), "scale must be float32"),
    "idn_scale_alone": (dict(idn_scale=_rand(4)), "must be given together"),
    "idn_shift_size": (dict(idn_scale=_rand(4), idn_shift=_rand(3)), "idn_shift must be 1-D of size C = 4"),
    "int_c": (dict(c=torch.ones(2, 4, 3, 3, dtype=torch.int32), idn=torch.ones(2, 4, 3, 3, dtype=torch.int32)),
              "c must be float32/float64/float16/bfloat16"),
}


@pytest.mark.parametrize("case", BAD_SBAR.values(), ids=BAD_SBAR.keys())
def test_scale_bias_add_relu_rejects_bad_input(case):
    override, message = case
    kwargs = {**_sbar_ok(), **override}
    with pytest.raises(RuntimeError, match=message):
        ops.scale_bias_add_relu(*kwargs.values())


# ------------------------------------------------------------------------------------------- build, backend


def test_build_info():
    info = cuda_backend.build_info()
    assert set(info) == {"with_cuda", "cuda_version", "archs", "torch_version", "cutlass", "cudnn_frontend"}
    assert info["torch_version"] == torch.__version__.split("+")[0]
    if info["with_cuda"]:
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"])
        assert info["archs"] and all(isinstance(a, int) and a >= 50 for a in info["archs"])
        assert torch.version.cuda is not None
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
    else:
        assert info["cuda_version"] is None and info["archs"] == []


def test_unsupported_reasons():
    reason = cuda_backend.unsupported(torch.zeros(1, 1, 1, 1), 1, 1)
    if cuda_backend.build_info()["with_cuda"]:
        assert "CUDA tensors only" in reason
    else:
        assert "built without CUDA" in reason
    if torch.cuda.is_available() and cuda_backend.build_info()["with_cuda"]:
        assert cuda_backend.unsupported(torch.zeros(1, 1, 1, 1, device="cuda"), 32, 2) is None
        assert "float64" in cuda_backend.unsupported(torch.zeros(1, 1, 1, 1, device="cuda", dtype=torch.float64),
                                                     1, 1)


def test_conv_stats_runs_the_extension_op():
    """The backend's conv_stats is the extension's op with its registered autograd (tests/test_cuda_train.py checks
    it in depth), and matches the reference backend."""
    from resnet_fused.backends import reference

    torch.manual_seed(10)
    x, w, s, t = _rand(2, 3, 5, 5, requires_grad=True), _rand(4, 3, 3, 3), _rand(3), _rand(3)
    got = cuda_backend.conv_stats(x, w, 1, 1, in_scale=s, in_shift=t)
    assert all(type(o.grad_fn).__name__.startswith("GeneratedBackwardFor_resnet_fused_conv_stats") for o in got)
    want = reference.conv_stats(x, w, 1, 1, in_scale=s, in_shift=t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


BLOCK_CASES = {
    "basic_identity": ("BasicBlock", 5, 5, 1, False),
    "basic_down_s2": ("BasicBlock", 4, 6, 2, True),
    "bottleneck_down_s1": ("Bottleneck", 5, 3, 1, True),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", BLOCK_CASES.values(), ids=BLOCK_CASES.keys())
def test_blocks_through_extension_cpu_kernels(monkeypatch, case, train):
    """resnet_fused blocks with backend="cuda", routed to the extension's CPU kernels, match torchvision (fp64):
    the ops' argument conventions (live eval BN, shortcut fusion, dual tail) are the blocks' own."""
    import torchvision.models.resnet as tvr

    import resnet_fused

    kind, inplanes, planes, stride, down = case
    monkeypatch.setattr(cuda_backend, "unsupported", lambda x, groups=1, dilation=1: None)
    calls = {"conv_bn_act": 0, "scale_bias_add_relu": 0}
    for name in calls:
        op = getattr(cuda_backend, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(cuda_backend, name, counted)

    torch.manual_seed(15)
    out = planes * getattr(tvr, kind).expansion

    def downsample():
        return nn.Sequential(tvr.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out)) if down else None

    tv = getattr(tvr, kind)(inplanes, planes, stride, downsample()).double()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    fused = getattr(resnet_fused, kind)(inplanes, planes, stride, downsample(), backend="cuda").double()
    fused.load_state_dict(tv.state_dict())
    tv.train(train)
    fused.train(train)
    x = torch.randn(2, inplanes, 7, 7, dtype=torch.float64)
    x_tv, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_tv, y_fused = tv(x_tv), fused(x_fused)
    assert_close(y_fused, y_tv, dtype=torch.float64)
    grad = torch.randn_like(y_tv)
    y_tv.backward(grad)
    y_fused.backward(grad)
    assert_close(x_fused.grad, x_tv.grad, dtype=torch.float64)
    fused_params = dict(fused.named_parameters())
    for name, p in tv.named_parameters():
        assert_close(fused_params[name].grad, p.grad, dtype=torch.float64, msg=name)
    if train:
        assert calls["scale_bias_add_relu"] == 1
    else:
        assert calls["conv_bn_act"] == len([m for m in fused.modules() if isinstance(m, nn.Conv2d)]) - down


# ------------------------------------------------------------------------------------------------ engines


def test_engine_argument_is_validated():
    """The ops take 'auto' or a comma-separated list of distinct engines; the CPU kernels (one implementation)
    accept any valid list and reject the rest."""
    torch.manual_seed(30)
    args, _ = _conv_args(CONV_CONFIGS["3x3_c3_k5_h7"], "all", torch.float32, torch.channels_last)
    ref = ops.conv_bn_act(*_op_args(args, True))
    for engines in ("auto", "plain", "cutlass,plain", "cudnn,cutlass,plain"):
        assert torch.equal(ops.conv_bn_act(*_op_args(args, True), engines), ref)
    for engines, message in (("bogus", "unknown engine 'bogus'"), ("plain,plain", "listed twice"),
                             ("cutlass,", "unknown engine ''"), ("", "unknown engine ''")):
        with pytest.raises(RuntimeError, match=message):
            ops.conv_bn_act(*_op_args(args, True), engines)
    x, w = _rand(2, 3, 5, 5), _rand(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="unknown engine"):
        ops.conv_stats(x, w, [1, 1], [1, 1], [1, 1], 1, None, None, "cuDNN")
    assert ops.conv_stats(x, w, [1, 1], [1, 1], [1, 1], 1, None, None, "cutlass,plain")[0].shape == (2, 4, 5, 5)


def test_forced_engine_context_and_environment(monkeypatch):
    monkeypatch.delenv(cuda_backend.ENV_ENGINE, raising=False)
    assert cuda_backend.forced() is None
    monkeypatch.setenv(cuda_backend.ENV_ENGINE, "plain")
    assert cuda_backend.forced() == "plain"
    with cuda_backend.forced_engine("cutlass"):
        assert cuda_backend.forced() == "cutlass"
        with cuda_backend.forced_engine("cudnn"):
            assert cuda_backend.forced() == "cudnn"
        assert cuda_backend.forced() == "cutlass"
    assert cuda_backend.forced() == "plain"
    monkeypatch.setenv(cuda_backend.ENV_ENGINE, "fast")
    with pytest.raises(ValueError, match="RESNET_FUSED_CUDA_ENGINE='fast'"):
        cuda_backend.forced()
    with pytest.raises(ValueError, match="unknown cuda engine"):
        with cuda_backend.forced_engine("triton"):
            pass


def test_cpu_tensors_get_the_default_order(monkeypatch):
    """CPU tensors (the extension's CPU kernels) are never measured, nor forced."""
    monkeypatch.setenv(cuda_backend.ENV_ENGINE, "cutlass")

    def no_measure(run):
        raise AssertionError("measured a CPU call")

    assert cuda_backend._engines_for(torch.zeros(1), "k", lambda e: None, no_measure) == "auto"


def test_fake_tensors_are_never_measured(monkeypatch, tmp_path):
    """A call on fake CUDA tensors (AOTAutograd tracing a backward) takes the traced order — the stored choice, else
    "auto" — and neither measures nor records what ran."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from resnet_fused import dispatch

    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(cuda_backend.ENV_ENGINE, raising=False)
    monkeypatch.setattr(cuda_backend, "_engine_memory", {})
    monkeypatch.setattr(cuda_backend, "_engine_ran", {})
    monkeypatch.setattr(dispatch, "env_key", lambda device: "env")
    with FakeTensorMode():
        x = torch.empty(2, 3, 4, 4, device="cuda:0")

    def no_measure(run):
        raise AssertionError("measured a traced call")

    assert cuda_backend._engines_for(x, "k", lambda e: None, no_measure) == "auto"
    cuda_backend._engine_memory["cuda:0|k"] = {"engine": "plain"}
    assert cuda_backend._engines_for(x, "k", lambda e: None, no_measure) == "plain,cudnn,cutlass"
    cuda_backend._record_ran(x, "k")
    assert cuda_backend._engine_ran == {}


def _fake_run(declines=(), fails=()):
    """A stand-in for one op call on one engine: declines like the C++ ops, fails, or runs."""
    calls = []

    def run(engine):
        calls.append(engine)
        if engine in declines:
            raise RuntimeError(f"resnet_fused::conv_bn_act: engine '{engine}' cannot run this call: no {engine}\n"
                               "Exception raised from decline at engine.cpp:60")
        if engine in fails:
            raise RuntimeError(f"CUDA error: {engine} broke")

    return run, calls


def test_measure_engines_races_the_engines_that_run():
    """Fake timings: the fastest engine that ran wins; a declining engine is recorded with its reason (the C++
    message's tail), a failing one with its error and a warning, neither races."""
    run, calls = _fake_run(declines=("cudnn",), fails=("plain",))
    timings = {"cudnn": 0.1, "cutlass": 0.5, "plain": 0.2}

    def timer(fn):
        fn()
        return timings[calls[-1]]

    with pytest.warns(RuntimeWarning, match="'plain' failed while being measured"):
        entry = cuda_backend.measure_engines(run, timer)
    assert entry == {"engine": "cutlass", "ms": {"cutlass": 0.5}, "declined": {"cudnn": "no cudnn"},
                     "errors": {"plain": "RuntimeError: CUDA error: plain broke"}}
    run, calls = _fake_run()
    entry = cuda_backend.measure_engines(run, lambda fn: (fn(), timings[calls[-1]])[1])
    assert entry["engine"] == "cudnn" and entry["ms"] == timings
    run, _ = _fake_run(declines=cuda_backend.ENGINES)
    assert cuda_backend.measure_engines(run, lambda fn: fn())["engine"] is None


def test_measured_order_is_cached_in_memory_and_on_disk(monkeypatch, tmp_path):
    """The first call of a key measures; later calls reuse the choice from memory, a new process from the disk
    file (under its environment key); another environment measures again; a winner goes first, then the default
    order; nothing is measured (nor stored) while torch.compile traces."""
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_backend, "_engine_memory", {})
    measured = []

    def measure(run):
        measured.append(run)
        return {"engine": "cutlass", "ms": {"cutlass": 1.0, "plain": 2.0}, "declined": {"cudnn": "no frontend"},
                "errors": {}}

    def order(env="gpu A", key="conv_bn_act|k1", memory="cuda:0"):
        return cuda_backend._measured_order(f"{memory}|{key}", lambda: env, key, "run", measure)

    assert order() == "cutlass,cudnn,plain" and measured == ["run"]
    assert order() == "cutlass,cudnn,plain" and len(measured) == 1
    table = json.loads(cuda_backend.engine_cache_path().read_text())
    assert table == {"gpu A": {"conv_bn_act|k1": measure(None)}}
    measured.clear()
    cuda_backend.clear_engine_memory()
    assert order() == "cutlass,cudnn,plain" and measured == []  # from the disk file
    assert order(env="gpu B", memory="cuda:1") == "cutlass,cudnn,plain" and len(measured) == 1
    assert cuda_backend.engine_cache_path().parent == tmp_path
    assert set(json.loads(cuda_backend.engine_cache_path().read_text())) == {"gpu A", "gpu B"}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert order(key="conv_bn_act|k2") == "auto" and len(measured) == 1
    assert "cuda:0|conv_bn_act|k2" not in cuda_backend._engine_memory
    choices = cuda_backend.engine_choices()
    assert choices["conv_bn_act|k1"]["engine"] == "cutlass"
    assert choices["conv_bn_act|k1"]["declined"] == {"cudnn": "no frontend"}


def test_no_winner_means_the_default_order(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_backend, "_engine_memory", {})
    entry = {"engine": None, "ms": {}, "declined": {}, "errors": {"plain": "boom"}}
    assert cuda_backend._measured_order("cuda:0|k", lambda: "env", "k", None, lambda run: entry) == "auto"
    assert not cuda_backend.engine_cache_path().exists()  # nothing to remember


# ---------------------------------------------------------------------------------------------------- GPU

CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def no_tf32():
    """Full-precision fp32 cuDNN convolutions, so fp32 results can be held to fp32 tolerances."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _needs_cuda_build():
    if not cuda_backend.build_info()["with_cuda"]:
        pytest.fail("a GPU is present but resnet_fused._C was built without CUDA")


# (shape, memory format, storage offset in elements): which kernel variant each case reaches. NHWC vector
# cases cover channel-pack rows narrower than a block (C=24: 3 or 6 packs), wider than one (C=4096) and
# several rows per thread (the large case).
SBAR_GPU_CASES = {
    "nhwc_vector": ((2, 64, 7, 7), torch.channels_last, 0),
    "nhwc_vector_c24": ((3, 24, 5, 5), torch.channels_last, 0),
    "nhwc_vector_wide_c": ((2, 4096, 3, 3), torch.channels_last, 0),
    "nhwc_scalar_odd_c": ((2, 5, 7, 7), torch.channels_last, 0),
    "nchw_vector": ((2, 3, 8, 8), torch.contiguous_format, 0),
    "nchw_scalar_odd_hw": ((2, 3, 7, 7), torch.contiguous_format, 0),
    "nhwc_scalar_misaligned": ((2, 64, 7, 7), torch.channels_last, 1),
    "nhwc_vector_large": ((4, 256, 28, 28), torch.channels_last, 0),
}


def _cuda_rand(shape, dtype, mf, offset):
    """Random tensor whose data starts `offset` elements into its storage (offset 1 breaks 16-byte alignment)."""
    n = 1
    for s in shape:
        n *= s
    base = torch.randn(n + offset, device="cuda", dtype=torch.float32).to(dtype)
    if mf == torch.channels_last:
        N, C, H, W = shape
        return base[offset:].view(N, H, W, C).permute(0, 3, 1, 2)
    return base[offset:].view(shape)


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("case", SBAR_GPU_CASES.values(), ids=SBAR_GPU_CASES.keys())
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scale_bias_add_relu_cuda(dtype, case, dual):
    _needs_cuda_build()
    torch.manual_seed(11)
    shape, mf, offset = case
    C = shape[1]
    c = _cuda_rand(shape, dtype, mf, offset)
    idn = _cuda_rand(shape, dtype, mf, offset)
    s, t = _rand(C, device="cuda"), _rand(C, device="cuda")
    s_d, t_d = (_rand(C, device="cuda"), _rand(C, device="cuda")) if dual else (None, None)
    out = ops.scale_bias_add_relu(c, s, t, idn, s_d, t_d)
    assert out.dtype == dtype and out.device == c.device
    _assert_format(out, c, c.shape)
    ref = scale_bias_add_relu_formula(c, s, t, idn, s_d, t_d)
    assert_close(out.double(), ref, dtype=dtype)
    cpu = ops.scale_bias_add_relu(c.cpu().float(), s.cpu(), t.cpu(), idn.cpu().float(),
                                  None if s_d is None else s_d.cpu(), None if t_d is None else t_d.cpu())
    assert_close(out.cpu().float(), cpu.to(dtype).float(), dtype=dtype)


# (conv config, feature, relu): the epilogue with each optional term; fp16 / bf16 channels_last cases with C and K
# multiples of 8 are covered by the CUTLASS kernels, the others take cuDNN plus the channel pass (C multiples of 8
# hit its NHWC vector path).
CONV_GPU_CASES = {
    "resnet_3x3_all": ((64, 64, 14, 14, 3, 1, 1, 1, 1), "all", True),
    "resnet_1x1_s2_shortcut": ((32, 64, 14, 14, 1, 2, 0, 1, 1), "bn_shortcut", True),
    "k256_1x1_residual": ((64, 256, 7, 7, 1, 1, 0, 1, 1), "bn_residual", True),
    "odd_c5_residual": ((5, 5, 7, 7, 3, 1, 1, 1, 1), "bn_residual", True),
    "odd_no_relu": ((3, 5, 7, 7, 3, 2, 1, 1, 1), "bn", False),
    "no_affine_shortcut": ((16, 16, 8, 8, 3, 1, 1, 1, 1), "no_affine_shortcut", False),
    "groups_dilation": ((16, 32, 9, 9, 3, 1, 2, 2, 4), "all", True),
}


def _check_conv_bn_act_gpu(out, args, relu, dtype, shape):
    """Output dtype, layout and values against the fp64 formula on the same (rounded) inputs. fp16 / bf16: twice the
    table's tolerance (cuDNN's conv output is rounded to the dtype before the BN, and so is the shortcut branch's
    temporary on the CUTLASS path)."""
    assert out.dtype == dtype and out.device.type == "cuda"
    _assert_format(out, args[0], shape)
    ref = conv_bn_act_formula(*args, relu)
    assert_close(out.double(), ref, dtype=dtype, scale=1.0 if dtype == torch.float32 else 2.0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CONV_GPU_CASES.values(), ids=CONV_GPU_CASES.keys())
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_bn_act_cuda(dtype, case, fmt, no_tf32):
    _needs_cuda_build()
    torch.manual_seed(12)
    config, feature, relu = case
    args, shape = _conv_args(config, feature, dtype, FORMATS[fmt], device="cuda")
    out = ops.conv_bn_act(*_op_args(args, relu))
    _check_conv_bn_act_gpu(out, args, relu, dtype, shape)


@pytest.mark.parametrize("bn_dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_bn_act_cuda_bn_tensors_of_another_dtype(bn_dtype, no_tf32):
    """bf16 activations with the BN buffers of a half / bf16 / double model: read as they are, converted on load."""
    _needs_cuda_build()
    torch.manual_seed(13)
    args, shape = _conv_args((64, 64, 8, 8, 3, 1, 1, 1, 1), "all", torch.bfloat16, torch.channels_last,
                             device="cuda", bn_dtype=bn_dtype)
    out = ops.conv_bn_act(*_op_args(args, True))
    _check_conv_bn_act_gpu(out, args, True, torch.bfloat16, shape)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_grads_and_opcheck(no_tf32):
    _needs_cuda_build()
    torch.manual_seed(14)
    args, shape = _conv_args((16, 16, 8, 8, 3, 1, 1, 1, 1), "all", torch.float32, torch.channels_last, device="cuda",
                             requires_grad=True)
    tensors = _tensors(args)
    out = cuda_backend.conv_bn_act(*args[:7], residual=args[7], shortcut=args[8])
    go = torch.randn_like(out)
    want = torch.autograd.grad(conv_bn_act_formula(*args, True), tensors, go.double())
    for i, (a, e) in enumerate(zip(torch.autograd.grad(out, tensors, go), want)):
        assert_close(a.double(), e.double(), dtype=torch.float32, scale=1.0 if a.dim() == 4 else 10.0,
                     msg=f"tensor {i}")
    torch.library.opcheck(ops.conv_bn_act.default, _op_args(args, True))
    c = _rand(2, 16, 4, 4, device="cuda", mf=torch.channels_last, requires_grad=True)
    idn = _rand(2, 16, 4, 4, device="cuda", mf=torch.channels_last, requires_grad=True)
    params = [_rand(16, device="cuda", requires_grad=True) for _ in range(4)]
    torch.library.opcheck(ops.scale_bias_add_relu.default, (c, params[0], params[1], idn, params[2], params[3]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_window_larger_than_padded_input_cuda():
    """The CUDA kernel refuses the 7x7-over-6x6 stride-2 conv with PyTorch's error (it computed a 1x1 output)."""
    _needs_cuda_build()
    x = torch.randn(1, 8, 6, 6, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 7, 7, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    args = (x, w, _eval_bn(8, device="cuda"), [2, 2], [0, 0], [1, 1], 1, None, None)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        ops.conv_bn_act(*_op_args(args, True))


def _cutlass_covers(config, dtype, fmt, feature):
    """Whether the CUTLASS engine covers a CONV_GPU_CASES case (csrc/cutlass/conv_cutlass.h's rules)."""
    C, K, *_, g = config
    return (dtype != torch.float32 and fmt == "nhwc" and g == 1 and C % 8 == 0 and K % 8 == 0
            and cuda_backend.build_info()["cutlass"] is not None and torch.cuda.get_device_capability()[0] >= 8)


@pytest.mark.parametrize("engine", ["cutlass", "plain", "cudnn"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CONV_GPU_CASES.values(), ids=CONV_GPU_CASES.keys())
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_bn_act_cuda_engines(dtype, case, fmt, engine, no_tf32):
    """Each engine forced: plain runs everything; cutlass runs exactly the calls its rules cover and declines the
    rest with its reason; cudnn runs what cuDNN's graphs accept (built with the frontend) or declines with cuDNN's
    reason. What runs matches the fp64 formula, and _C.last_engine() names the engine."""
    _needs_cuda_build()
    torch.manual_seed(12)
    config, feature, relu = case
    args, shape = _conv_args(config, feature, dtype, FORMATS[fmt], device="cuda")
    x, w, bn, st, pd, dl, g, residual, shortcut = args
    try:
        with cuda_backend.forced_engine(engine):
            out = cuda_backend.conv_bn_act(x, w, bn, st, pd, dl, g, residual, shortcut, relu)
    except RuntimeError as err:
        assert f"engine '{engine}' cannot run this call: " in str(err)
        assert engine == "cudnn" or (engine == "cutlass" and not _cutlass_covers(config, dtype, fmt, feature))
        return
    assert engine != "cutlass" or _cutlass_covers(config, dtype, fmt, feature), "ran a call it should decline"
    assert cuda_backend._ext.last_engine().split()[0] == engine
    _check_conv_bn_act_gpu(out, args, relu, dtype, shape)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_choice_is_measured_once_and_reported(monkeypatch, tmp_path, no_tf32):
    """The first eager call of a key times every engine and stores the choice (memory and disk); the next calls
    reuse it; engine_choices() reports the timings, the declines and what ran; a forced engine overrides it."""
    _needs_cuda_build()
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(cuda_backend.ENV_ENGINE, raising=False)
    cuda_backend.clear_engine_memory()
    torch.manual_seed(31)
    args, shape = _conv_args((64, 64, 14, 14, 3, 1, 1, 1, 1), "bn_residual", torch.bfloat16, torch.channels_last,
                             device="cuda", n=8)
    x, w, bn, st, pd, dl, g, residual, _ = args
    measured = []
    real = cuda_backend.measure_engines
    monkeypatch.setattr(cuda_backend, "measure_engines", lambda run: measured.append(1) or real(run))
    outs = [cuda_backend.conv_bn_act(x, w, bn, st, pd, dl, g, residual) for _ in range(3)]
    assert measured == [1]
    (key, entry), = cuda_backend.engine_choices().items()
    assert key.startswith("conv_bn_act|")
    assert set(entry["ms"]) | set(entry["declined"]) | set(entry["errors"]) == set(cuda_backend.ENGINES)
    assert entry["engine"] == min(entry["ms"], key=entry["ms"].get)
    assert entry["ran"].split()[0] == entry["engine"]
    assert json.loads(cuda_backend.engine_cache_path().read_text())
    for out in outs:
        _check_conv_bn_act_gpu(out, args, True, torch.bfloat16, shape)
    with cuda_backend.forced_engine("plain"):
        cuda_backend.conv_bn_act(x, w, bn, st, pd, dl, g, residual)
    assert cuda_backend.engine_choices()[key]["ran"] == "plain"
    cuda_backend.clear_engine_memory()
