"""Training path of the C++/CUDA extension: conv_stats, affine_relu, the backward kernels, bn_finalize, and the cuda
backend's autograd and BN finalize hook over them.

CPU kernels (always run when the extension is built): conv_stats and affine_relu against fp64 formulas written here
(the convolution by test_cuda_ext's conv2d_fp64, which shares no code with the at::convolution and var_mean the
kernels call), the other ops against the reference backend (``resnet_fused.backends.reference``,
``resnet_fused.norm``), in fp32 and fp64, NCHW and channels_last; conv_stats' gradients through the cuda backend's
autograd against autograd through the fp64 formula, the other ops' against the reference's; fused blocks routed to
the extension's CPU kernels against torchvision over SGD steps (outputs, every gradient, running statistics,
``num_batches_tracked``); which tensors backward keeps; ``opcheck``; input checks. GPU kernels (``gpu`` mark): every
op on CUDA in fp32 / fp16 / bf16 through the vector and the scalar paths of both layouts, determinism, and block
training steps against torchvision.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from extension import import_extension

import_extension()

from test_cuda_ext import conv2d_fp64
from tolerances import TOL, assert_close

from resnet_fused import norm
from resnet_fused.backends import cuda as cuda_backend
from resnet_fused.backends import reference

assert cuda_backend.is_built()  # registers the fake and autograd kernels of the ops

ops = torch.ops.resnet_fused

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
CPU_DTYPES = [torch.float32, torch.float64]
# Per-channel sums over N·H·W values round differently from PyTorch's reduction order.
SUM_SCALE = 10.0


def _rand(*shape, dtype=torch.float32, device="cpu", mf=torch.contiguous_format, positive=False,
          requires_grad=False):
    """Random values (never zeros); 4-D tensors laid out in memory format ``mf``; ``positive``: in [0.5, 1.5)."""
    t = torch.rand(*shape, dtype=torch.float64) + 0.5 if positive else torch.randn(*shape, dtype=torch.float64)
    t = t.to(device=device, dtype=dtype)
    if len(shape) == 4:
        t = t.contiguous(memory_format=mf)
    return t.requires_grad_(requires_grad)


def _vec_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _assert_dense_like(out, ref_input):
    """``out`` is dense in ``ref_input``'s suggested memory format, with the strides torch.empty gives it."""
    mf = torch.channels_last if ref_input.is_contiguous(memory_format=torch.channels_last) and not \
        ref_input.is_contiguous() else torch.contiguous_format
    assert out.stride() == torch.empty(out.shape, memory_format=mf).stride()


def _leaves(tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _grads(outputs, inputs, grad_outputs):
    """Gradients of Σ_i <outputs_i, grad_outputs_i> w.r.t. inputs (None for None inputs)."""
    present = [t for t in inputs if t is not None]
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outputs, grad_outputs) if g is not None)
    grads = iter(torch.autograd.grad(loss, present))
    return [None if t is None else next(grads) for t in inputs]


# (C, K, H, W, kernel, stride, padding, dilation, groups)
CONV_CONFIGS = {
    "3x3_c3_k5": (3, 5, 7, 7, 3, 1, 1, 1, 1),
    "1x1_s2": (5, 4, 7, 7, 1, 2, 0, 1, 1),
    "3x3_dil2_groups2": (4, 6, 9, 9, 3, 1, 2, 2, 2),
}


def _conv_stats_args(config, dtype, mf, prologue, requires_grad=False, device="cpu", n=2):
    C, K, H, W, k, s, p, d, g = config
    x = _rand(n, C, H, W, dtype=dtype, device=device, mf=mf, requires_grad=requires_grad)
    w = _rand(K, C // g, k, k, dtype=dtype, device=device, requires_grad=requires_grad)
    vec = _vec_dtype(dtype)
    scale = _rand(C, dtype=vec, device=device, positive=True, requires_grad=requires_grad) if prologue else None
    shift = _rand(C, dtype=vec, device=device, requires_grad=requires_grad) if prologue else None
    return x, w, [s, s], [p, p], [d, d], g, scale, shift


# ------------------------------------------------------------------------------------------ CPU: forward ops


def conv_stats_formula(x, w, stride, padding, dilation, groups, scale, shift):
    """(c, mean, biased var) of c = conv(relu(x*s + t) or x, W) in fp64: conv2d_fp64, explicit mean and variance
    (differentiable)."""
    a = x.double() if scale is None else torch.relu(x.double() * _chan64(scale) + _chan64(shift))
    c = conv2d_fp64(a, w, stride, padding, dilation, groups)
    mean = c.mean((0, 2, 3))
    return c, mean, ((c - mean.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))


def _chan64(v):
    return v.double().view(1, -1, 1, 1)


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("config", CONV_CONFIGS.values(), ids=CONV_CONFIGS.keys())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_conv_stats_cpu(dtype, fmt, config, prologue):
    torch.manual_seed(0)
    x, w, st, pd, dl, g, s, t = _conv_stats_args(config, dtype, FORMATS[fmt], prologue)
    before = [a.clone() for a in (x, w, s, t) if a is not None]
    c, mean, var = ops.conv_stats(x, w, st, pd, dl, g, s, t)
    c_ref, mean_ref, var_ref = conv_stats_formula(x, w, st, pd, dl, g, s, t)
    assert c.dtype == dtype and mean.dtype == var.dtype == _vec_dtype(dtype)
    _assert_dense_like(c, x)
    assert_close(c.double(), c_ref, dtype=dtype)
    assert_close(mean.double(), mean_ref, dtype=dtype)
    assert_close(var.double(), var_ref, dtype=dtype)
    for a, b in zip([a for a in (x, w, s, t) if a is not None], before):
        assert torch.equal(a, b), "inputs must not be modified"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_affine_relu_cpu(dtype, fmt):
    torch.manual_seed(1)
    x = _rand(3, 5, 4, 6, dtype=dtype, mf=FORMATS[fmt])
    s, t = _rand(5, dtype=_vec_dtype(dtype)), _rand(5, dtype=_vec_dtype(dtype))
    a = ops.affine_relu(x, s, t)
    _assert_dense_like(a, x)
    assert a.dtype == dtype
    assert_close(a.double(), torch.relu(x.double() * _chan64(s) + _chan64(t)), dtype=dtype)


def test_affine_relu_cpu_strided_input_and_fp32_params_with_fp64():
    """A non-dense view is read through its strides; fp32 parameters with fp64 activations."""
    torch.manual_seed(2)
    x = _rand(2, 4, 5, 10, dtype=torch.float64)[..., ::2]
    s, t = _rand(4), _rand(4)
    a = ops.affine_relu(x, s, t)
    assert a.is_contiguous()
    assert_close(a, torch.relu(x * _chan64(s) + _chan64(t)), dtype=torch.float64)


# ----------------------------------------------------------------------------------------- CPU: backward ops

PRESENT = {"all": (True, True, True), "dc": (True, False, False), "stats": (False, True, True),
           "dvar": (False, False, True), "none": (False, False, False)}


def conv_stats_backward_input_formula(c, mean, dc, dmean, dvar):
    """dc + dmean/n + dvar·2(c − mean)/n in fp64, absent terms zero."""
    n = c.numel() // c.shape[1]
    g = torch.zeros(c.shape, dtype=torch.float64) if dc is None else dc.double()
    if dmean is not None:
        g = g + dmean.double().view(1, -1, 1, 1) / n
    if dvar is not None:
        g = g + dvar.double().view(1, -1, 1, 1) * (2.0 / n) * (c.double() - mean.double().view(1, -1, 1, 1))
    return g


@pytest.mark.parametrize("present", PRESENT.values(), ids=PRESENT.keys())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_conv_stats_backward_input_cpu(dtype, fmt, present):
    torch.manual_seed(3)
    mf, vec = FORMATS[fmt], _vec_dtype(dtype)
    c = _rand(3, 5, 4, 3, dtype=dtype, mf=mf)
    mean = c.to(vec).mean((0, 2, 3))
    has_dc, has_dmean, has_dvar = present
    dc = _rand(3, 5, 4, 3, dtype=dtype, mf=mf) if has_dc else None
    dmean = _rand(5, dtype=vec) if has_dmean else None
    dvar = _rand(5, dtype=vec) if has_dvar else None
    out = ops.conv_stats_backward_input(c, mean, dc, dmean, dvar)
    assert out.dtype == dtype
    _assert_dense_like(out, c)
    assert_close(out.double(), conv_stats_backward_input_formula(c, mean, dc, dmean, dvar), dtype=dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_affine_relu_backward_cpu(dtype, fmt):
    torch.manual_seed(4)
    vec = _vec_dtype(dtype)
    x, s, t = _rand(3, 5, 4, 3, dtype=dtype, mf=FORMATS[fmt]), _rand(5, dtype=vec), _rand(5, dtype=vec)
    da = _rand(3, 5, 4, 3, dtype=dtype)
    dx, ds, dt = ops.affine_relu_backward(da, x, s, t)
    assert dx.dtype == dtype and ds.dtype == dt.dtype == vec
    _assert_dense_like(dx, x)
    leaves = _leaves([x, s, t])
    want = _grads([reference.affine_relu(*leaves)], leaves, [da])
    for got, exp in zip((dx, ds, dt), want):
        assert_close(got.double(), exp.double(), dtype=dtype, scale=SUM_SCALE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bn_relu_autograd_cpu(fmt):
    """cuda_backend.bn_relu (the affine_relu op with its registered autograd) through the extension's CPU kernels:
    gradients of x, scale and shift against autograd through the reference's PyTorch ops, in fp64."""
    torch.manual_seed(6)
    x, s, t = _rand(3, 5, 4, 3, dtype=torch.float64, mf=FORMATS[fmt]), _rand(5, dtype=torch.float64), _rand(
        5, dtype=torch.float64)
    da = _rand(3, 5, 4, 3, dtype=torch.float64)
    leaves, ref_leaves = _leaves([x, s, t]), _leaves([x, s, t])
    got = _grads([cuda_backend.bn_relu(*leaves)], leaves, [da])
    want = _grads([reference.affine_relu(*ref_leaves)], ref_leaves, [da])
    for g, e in zip(got, want):
        assert_close(g, e, dtype=torch.float64, scale=SUM_SCALE)


def _tail_inputs(dtype, mf, dual, device="cpu", shape=(3, 5, 4, 3)):
    vec = _vec_dtype(dtype)
    C = shape[1]
    inputs = [_rand(*shape, dtype=dtype, device=device, mf=mf), _rand(C, dtype=vec, device=device, positive=True),
              _rand(C, dtype=vec, device=device), _rand(*shape, dtype=dtype, device=device, mf=mf)]
    if dual:
        inputs += [_rand(C, dtype=vec, device=device, positive=True), _rand(C, dtype=vec, device=device)]
    else:
        inputs += [None, None]
    return inputs


@pytest.mark.parametrize("dual", [False, True], ids=["identity", "downsample"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_scale_bias_add_relu_backward_cpu(dtype, fmt, dual):
    torch.manual_seed(5)
    c, s, t, idn, sd, td = _tail_inputs(dtype, FORMATS[fmt], dual)
    dout = _rand(*c.shape, dtype=dtype)
    dc, didn, ds, dt, dsd = ops.scale_bias_add_relu_backward(dout, c, s, t, idn, sd, td)
    for out in (dc, didn):
        assert out.dtype == dtype
        _assert_dense_like(out, c)
    assert dsd.shape == ((5,) if dual else (0,))
    leaves = _leaves([c, s, t, idn, sd, td])
    want = _grads([reference.scale_bias_add_relu(*leaves)], leaves, [dout])
    got = [dc, ds, dt, didn] + ([dsd, dt] if dual else [None, None])
    for name, a, b in zip(("dc", "dscale", "dshift", "didn", "didn_scale", "didn_shift"), got, want):
        if b is None:
            assert a is None
        else:
            assert_close(a.double(), b.double(), dtype=dtype, scale=SUM_SCALE, msg=name)


def _bn(C, dtype, affine=True, momentum=0.1):
    bn = nn.BatchNorm2d(C, affine=affine, momentum=momentum).to(dtype)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


@pytest.mark.parametrize("update", [False, True], ids=["no_running", "running"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_bn_finalize_cpu(dtype, affine, update):
    """The op equals norm's PyTorch finalize: scale, shift and the running-statistics update."""
    torch.manual_seed(6)
    C, count, factor = 6, 37, 0.3
    mean, var = _rand(C, dtype=dtype), _rand(C, dtype=dtype, positive=True)
    bn = _bn(C, dtype, affine)
    bn_ref = _bn(C, dtype, affine)
    bn_ref.load_state_dict(bn.state_dict())
    bn_ref.momentum = factor
    scale_ref, shift_ref = norm.batch_scale_shift(bn_ref.train(update), mean, var, count, torch.Size([1, C, 37]))
    running = (bn.running_mean, bn.running_var) if update else (None, None)
    weight, bias = (bn.weight.detach(), bn.bias.detach()) if affine else (None, None)
    scale, shift = ops.bn_finalize(mean, var, weight, bias, *running, float(count), factor, bn.eps)
    assert scale.dtype == shift.dtype == dtype
    assert_close(scale, scale_ref, dtype=dtype)
    assert_close(shift, shift_ref, dtype=dtype)
    assert_close(bn.running_mean, bn_ref.running_mean, dtype=dtype)
    assert_close(bn.running_var, bn_ref.running_var, dtype=dtype)


# ------------------------------------------------------------------------------- CPU: autograd of the backend


@pytest.mark.parametrize("used", ["all", "c", "stats"])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_conv_stats_grads_match_formula(dtype, fmt, prologue, used):
    """Gradients of x, W, in_scale, in_shift through any subset of (c, mean, var) equal those of autograd through
    the fp64 formula (conv2d_fp64, explicit statistics)."""
    torch.manual_seed(7)
    x, w, st, pd, dl, g, s, t = _conv_stats_args(CONV_CONFIGS["3x3_c3_k5"], dtype, FORMATS[fmt], prologue,
                                                  requires_grad=True)
    outs = cuda_backend.conv_stats(x, w, st, pd, dl, g, s, t)
    grad_c = _rand(*outs[0].shape, dtype=dtype) if used in ("all", "c") else None
    grad_stats = [_rand(5, dtype=_vec_dtype(dtype)) for _ in range(2)] if used in ("all", "stats") else [None, None]
    grad_outs = [grad_c, *grad_stats]
    inputs = [x, w, s, t]
    got = _grads(outs, inputs, grad_outs)
    want = _grads(conv_stats_formula(x, w, st, pd, dl, g, s, t), inputs, grad_outs)
    for name, a, b in zip(("x", "weight", "in_scale", "in_shift"), got, want):
        if b is not None:
            assert a.dtype == b.dtype
            assert_close(a.double(), b.double(), dtype=dtype, scale=SUM_SCALE, msg=name)


def test_conv_stats_frozen_weight_and_input():
    """Only in_scale / in_shift need gradients: no weight gradient is formed, the prologue's are right."""
    torch.manual_seed(8)
    x, w, st, pd, dl, g, s, t = _conv_stats_args(CONV_CONFIGS["3x3_c3_k5"], torch.float64, torch.channels_last,
                                                  True)
    s.requires_grad_()
    t.requires_grad_()
    c, _, var = cuda_backend.conv_stats(x, w, st, pd, dl, g, s, t)
    got = torch.autograd.grad((c.sum() + var.sum()), [s, t])
    c_ref, _, var_ref = reference.conv_stats(x, w, st, pd, dl, g, s, t)
    want = torch.autograd.grad((c_ref.sum() + var_ref.sum()), [s, t])
    for a, b in zip(got, want):
        assert_close(a, b, dtype=torch.float64)


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
def test_gradcheck_conv_stats(prologue):
    torch.manual_seed(9)
    x, w, st, pd, dl, g, s, t = _conv_stats_args((2, 3, 5, 5, 3, 2, 1, 1, 1), torch.float64, torch.channels_last,
                                                  prologue, requires_grad=True)
    tensors = tuple(a for a in (x, w, s, t) if a is not None)

    def fn(*ts):
        x, w, *affine = ts
        s, t = affine if affine else (None, None)
        return ops.conv_stats(x, w, st, pd, dl, g, s, t)

    assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)


MASKS = {"both": (True, True), "input": (True, False), "weight": (False, True)}


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("config", CONV_CONFIGS.values(), ids=CONV_CONFIGS.keys())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_conv_stats_backward_conv_cpu(dtype, fmt, config, prologue, mask):
    """The conv's backward given g = dL/dc: dx, dW, d in_scale, d in_shift against autograd through the fp64
    formula; outputs output_mask did not ask for (and the prologue's without one) are 0-element tensors."""
    torch.manual_seed(10)
    x, w, st, pd, dl, g, s, t = _conv_stats_args(config, dtype, FORMATS[fmt], prologue, requires_grad=True)
    w = w.detach().contiguous(memory_format=FORMATS[fmt]).requires_grad_()  # KRSC filters with NHWC activations
    c = conv_stats_formula(x, w, st, pd, dl, g, s, t)[0]
    grad = _rand(*c.shape, dtype=dtype, mf=FORMATS[fmt])
    got = ops.conv_stats_backward_conv(grad, x.detach(), w.detach(), st, pd, dl, g, _detach(s), _detach(t),
                                       list(mask))
    want = _grads([c], [x, w, s, t], [grad])
    asked = (mask[0], mask[1], mask[0] and prologue, mask[0] and prologue)
    for name, a, b, on in zip(("dx", "dweight", "dscale", "dshift"), got, want, asked):
        if not on:
            assert a.numel() == 0, name
            continue
        assert a.shape == b.shape and a.dtype == (b.dtype if name in ("dscale", "dshift") else dtype), name
        assert_close(a.double(), b.double(), dtype=dtype, scale=SUM_SCALE, msg=name)
    if mask[0]:  # the layouts the fake kernel promises
        _assert_dense_like(got[0], x)
    if mask[1]:
        _assert_dense_like(got[1], w)


def _detach(t):
    return None if t is None else t.detach()


@pytest.mark.parametrize("dual", [False, True], ids=["identity", "downsample"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_scale_bias_add_relu_grads_match_reference(fmt, dual):
    torch.manual_seed(10)
    inputs = [None if v is None else v.requires_grad_() for v in _tail_inputs(torch.float32, FORMATS[fmt], dual)]
    out = cuda_backend.scale_bias_add_relu(*inputs)
    dout = _rand(*out.shape)
    got = _grads([out], inputs, [dout])
    leaves = _leaves(inputs)
    want = _grads([reference.scale_bias_add_relu(*leaves)], leaves, [dout])
    for a, b in zip(got, want):
        if b is not None:
            assert_close(a, b, dtype=torch.float32, scale=SUM_SCALE)
    if dual:
        assert got[5].data_ptr() != got[2].data_ptr(), "the shift gradients must not share storage"


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_finalize_grads_match_norm(dtype, affine):
    """Gradients of mean, var, γ, β through the backend's finalize equal those through norm's PyTorch finalize."""
    torch.manual_seed(11)
    C = 5
    mean, var = _rand(C, dtype=dtype, requires_grad=True), _rand(C, dtype=dtype, positive=True, requires_grad=True)
    bn = _bn(C, dtype, affine).train()
    params = [bn.weight, bn.bias] if affine else []
    ds, dt = _rand(C, dtype=dtype), _rand(C, dtype=dtype)

    def grads(finalize):
        scale, shift = norm.batch_scale_shift(bn, mean, var, 10, torch.Size([2, C, 5]), finalize)
        return torch.autograd.grad((scale * ds).sum() + (shift * dt).sum(), [mean, var, *params])

    for a, b in zip(grads(cuda_backend.finalize), grads(None)):
        assert_close(a, b, dtype=dtype)


def test_gradcheck_finalize():
    torch.manual_seed(12)
    C = 4
    inputs = (_rand(C, dtype=torch.float64, requires_grad=True),
              _rand(C, dtype=torch.float64, positive=True, requires_grad=True),
              _rand(C, dtype=torch.float64, positive=True, requires_grad=True),
              _rand(C, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(
        lambda m, v, w, b: cuda_backend.finalize(m, v, w, b, None, None, 8, 0.1, 1e-5), inputs)


def test_finalize_half_running_stats():
    """Running statistics in another dtype than the batch statistics are updated through temporaries."""
    torch.manual_seed(13)
    mean, var = _rand(4), _rand(4, positive=True)
    rm, rv = _rand(4).half(), _rand(4, positive=True).half()
    want_rm = (rm.float() * 0.9 + mean * 0.1).half()
    want_rv = (rv.float() * 0.9 + var * (6 / 5) * 0.1).half()
    cuda_backend.finalize(mean, var, None, None, rm, rv, 6, 0.1, 1e-5)
    assert_close(rm, want_rm, dtype=torch.float16)
    assert_close(rv, want_rv, dtype=torch.float16)


# -------------------------------------------------------------------------------- what backward keeps alive


def _saved(fn):
    """(result of fn(), data pointers of the tensors autograd saved while running it)."""
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _ptrs(*tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_conv_stats_saves_inputs_c_and_mean_only():
    torch.manual_seed(14)
    x, w, st, pd, dl, g, s, t = _conv_stats_args(CONV_CONFIGS["3x3_c3_k5"], torch.float32, torch.channels_last, True,
                                                  requires_grad=True)
    (c, mean, _), saved = _saved(lambda: cuda_backend.conv_stats(x, w, st, pd, dl, g, s, t))
    assert saved == _ptrs(x, w, s, t, c, mean)


@pytest.mark.parametrize("dual", [False, True], ids=["identity", "downsample"])
def test_tail_saves_inputs_not_output(dual):
    torch.manual_seed(15)
    inputs = [None if v is None else v.requires_grad_() for v in _tail_inputs(torch.float32, torch.channels_last,
                                                                                 dual)]
    _, saved = _saved(lambda: cuda_backend.scale_bias_add_relu(*inputs))
    assert saved == _ptrs(*[v for v in inputs if v is not None])


# ------------------------------------------------------------------------------- blocks on the CPU kernels


class _OpLog(TorchDispatchMode):
    """Counts the resnet_fused ops dispatched while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("resnet_fused::"):
            key = name.split("::")[1]
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def _route_cpu_through_extension(monkeypatch):
    """Let the cuda backend take CPU tensors: its ops then run the extension's CPU kernels."""
    monkeypatch.setattr(cuda_backend, "unsupported", lambda x, groups=1, dilation=1: None)


def _assert_block_matches(fused, tv, y_fused, y_tv, x_fused, x_tv, dtype, grad_scale=1.0, when=""):
    """Output, input and parameter gradients, running statistics and num_batches_tracked of a fused block equal
    torchvision's: the tolerance table's bound for ``dtype``, times ``grad_scale`` for gradients, times the
    magnitude of the expected tensor (gradients of a BN block reach 10s)."""

    def check(actual, expected, scale, msg):
        magnitude = max(1.0, expected.detach().abs().max().item())
        assert_close(actual, expected, dtype=dtype, scale=scale * magnitude, msg=f"{msg}{when}")

    check(y_fused, y_tv, 1.0, "output")
    check(x_fused.grad, x_tv.grad, grad_scale, "input grad")
    fused_params = dict(fused.named_parameters())
    for name, p in tv.named_parameters():
        check(fused_params[name].grad, p.grad, grad_scale, f"grad of {name}")
    fused_buffers = dict(fused.named_buffers())
    assert fused_buffers.keys() == dict(tv.named_buffers()).keys()
    for name, b in tv.named_buffers():
        if b.dtype == torch.long:
            assert torch.equal(fused_buffers[name], b), f"{name}{when}"
        else:
            check(fused_buffers[name], b, 1.0, name)


def _block_pair(kind, inplanes, planes, stride, down, momentum=0.1):
    """(torchvision block, fused block with backend="cuda") with the same weights, non-trivial BN affine
    parameters and BN momentum ``momentum`` (None: cumulative averages)."""
    import torchvision.models.resnet as tvr

    import resnet_fused

    out = planes * getattr(tvr, kind).expansion

    def downsample():
        return nn.Sequential(tvr.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out)) if down else None

    tv = getattr(tvr, kind)(inplanes, planes, stride, downsample())
    fused = getattr(resnet_fused, kind)(inplanes, planes, stride, downsample(), backend="cuda")
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    fused.load_state_dict(tv.state_dict())
    for m in (*tv.modules(), *fused.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return tv, fused


BLOCK_CASES = {
    "basic_identity": ("BasicBlock", 5, 5, 1, False, 0.1),
    "basic_down_s2_cumulative": ("BasicBlock", 4, 6, 2, True, None),
    "bottleneck_down_s1": ("Bottleneck", 5, 3, 1, True, 0.1),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", BLOCK_CASES.values(), ids=BLOCK_CASES.keys())
def test_block_training_through_extension_cpu_kernels(monkeypatch, case, fmt):
    """Two SGD steps of a fused block (backend="cuda" on the extension's CPU kernels) against torchvision in fp64:
    outputs, input and parameter gradients, running statistics and num_batches_tracked; every BN goes through
    bn_finalize and backward through the fused backward kernels."""
    _route_cpu_through_extension(monkeypatch)
    kind, inplanes, planes, stride, down, momentum = case
    torch.manual_seed(16)
    tv, fused = (m.double() for m in _block_pair(kind, inplanes, planes, stride, down, momentum))
    bns = [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    opt_tv, opt_fused = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (tv, fused))
    for step in range(2):
        x = torch.randn(2, inplanes, 7, 7, dtype=torch.float64).contiguous(memory_format=FORMATS[fmt])
        x_tv, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_tv = tv(x_tv)
        with _OpLog() as log:
            y_fused = fused(x_fused)
            grad = torch.randn_like(y_tv)
            y_fused.backward(grad)
        y_tv.backward(grad)
        assert log.counts == {"conv_stats": len(bns), "bn_finalize": len(bns), "scale_bias_add_relu": 1,
                              "conv_stats_backward_input": len(bns), "conv_stats_backward_conv": len(bns),
                              "scale_bias_add_relu_backward": 1}
        _assert_block_matches(fused, tv, y_fused, y_tv, x_fused, x_tv, torch.float64, when=f", step {step}")
        for opt in (opt_tv, opt_fused):
            opt.step()
            opt.zero_grad()


def test_torch_compile_fullgraph_block(monkeypatch):
    """torch.compile(fullgraph=True) traces a training block on the cuda backend (extension CPU kernels) forward
    and backward without graph breaks, bn_finalize's running-statistics update included, and matches
    torchvision."""
    from resnet_fused import backends

    backends.load("cuda")
    _route_cpu_through_extension(monkeypatch)
    torch.manual_seed(18)
    tv, fused = _block_pair("BasicBlock", 4, 6, 2, True)
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 7, 7)
    x_tv, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fused, y_tv = compiled(x_fused), tv(x_tv)
    grad = torch.randn_like(y_tv)
    y_fused.backward(grad)
    y_tv.backward(grad)
    _assert_block_matches(fused, tv, y_fused, y_tv, x_fused, x_tv, torch.float32, grad_scale=4.0)
    torch._dynamo.reset()


def _sync_bn_worker_on_extension(rank: int, init_file: str, backend: str, result_dir: str) -> None:
    """test_training's SyncBN rank, with the cuda backend on the extension's CPU kernels (a spawned process does
    not inherit the test's monkeypatch)."""
    import test_training

    cuda_backend.unsupported = lambda x, groups=1, dilation=1: None
    test_training._sync_bn_worker(rank, init_file, backend, result_dir)


@pytest.mark.slow
def test_sync_batchnorm_two_processes_through_extension(monkeypatch):
    """SyncBN over 2 gloo ranks with the backend's finalize: the statistics are all-reduced before bn_finalize,
    and everything matches plain BN on the whole batch (test_training's SyncBN test, on the cuda backend)."""
    import test_training

    _route_cpu_through_extension(monkeypatch)
    monkeypatch.setattr(test_training, "_sync_bn_worker", _sync_bn_worker_on_extension)
    test_training.test_sync_batchnorm_two_processes("cuda")


# ------------------------------------------------------------------------------------------------ opcheck


def _opcheck_cases():
    torch.manual_seed(17)
    for fmt, mf in FORMATS.items():
        for prologue in (False, True):
            args = _conv_stats_args(CONV_CONFIGS["3x3_c3_k5"], torch.float32, mf, prologue, requires_grad=True)
            yield f"conv_stats_{fmt}_{'prologue' if prologue else 'plain'}", ops.conv_stats.default, args
        x, s, t, da = _rand(2, 5, 4, 3, mf=mf), _rand(5), _rand(5), _rand(2, 5, 4, 3, mf=mf)
        yield f"affine_relu_{fmt}", ops.affine_relu.default, (x, s, t)
        yield f"affine_relu_backward_{fmt}", ops.affine_relu_backward.default, (da, x, s, t)
        for prologue in (False, True):
            xc, wc, st, pd, dl, g, sc, sh = _conv_stats_args(CONV_CONFIGS["1x1_s2"], torch.float32, mf, prologue)
            grad = _rand(2, 4, 4, 4, mf=mf)
            yield (f"conv_stats_backward_conv_{fmt}_{'prologue' if prologue else 'plain'}",
                   ops.conv_stats_backward_conv.default, (grad, xc, wc, st, pd, dl, g, sc, sh, [True, True]))
        for present_name, (has_dc, has_dmean, has_dvar) in PRESENT.items():
            args = (x, s, da if has_dc else None, t if has_dmean else None, _rand(5) if has_dvar else None)
            yield f"conv_stats_backward_input_{fmt}_{present_name}", ops.conv_stats_backward_input.default, args
        for dual in (False, True):
            c, sc, sh, idn, sd, td = _tail_inputs(torch.float32, mf, dual)
            yield (f"scale_bias_add_relu_backward_{fmt}_{'dual' if dual else 'identity'}",
                   ops.scale_bias_add_relu_backward.default, (_rand(*c.shape), c, sc, sh, idn, sd, td))
    for update in (False, True):
        running = (_rand(6), _rand(6, positive=True)) if update else (None, None)
        yield (f"bn_finalize_{'running' if update else 'no_running'}", ops.bn_finalize.default,
               (_rand(6), _rand(6, positive=True), _rand(6), _rand(6), *running, 12.0, 0.1, 1e-5))
    yield ("bn_finalize_no_affine", ops.bn_finalize.default,
           (_rand(6), _rand(6, positive=True), None, None, None, None, 12.0, 0.1, 1e-5))


OPCHECK_CASES = {name: (op, args) for name, op, args in _opcheck_cases()}


@pytest.mark.parametrize("case", OPCHECK_CASES.values(), ids=OPCHECK_CASES.keys())
def test_opcheck(case):
    op, args = case
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------- input checks


def _x(*shape, dtype=torch.float32):
    return _rand(*shape, dtype=dtype)


BAD_INPUTS = {
    "conv_stats_x_rank": (ops.conv_stats, (_x(4, 6, 6), _x(8, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1, None, None),
                          "resnet_fused::conv_stats: x must be 4-D"),
    "conv_stats_channels": (ops.conv_stats, (_x(2, 4, 6, 6), _x(8, 3, 3, 3), [1, 1], [1, 1], [1, 1], 1, None, None),
                            "x has 4 channels but weight expects 3"),
    "conv_stats_scale_alone": (ops.conv_stats, (_x(2, 4, 6, 6), _x(8, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1, _x(4),
                                                None), "in_scale and in_shift must be given together"),
    "conv_stats_scale_size": (ops.conv_stats, (_x(2, 4, 6, 6), _x(8, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1, _x(5),
                                               _x(4)), "in_scale must be 1-D of size C = 4"),
    "conv_stats_shift_dtype": (ops.conv_stats, (_x(2, 4, 6, 6), _x(8, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1, _x(4),
                                                _x(4, dtype=torch.float16)), "in_shift must be float32"),
    "conv_stats_stride": (ops.conv_stats, (_x(2, 4, 6, 6), _x(8, 4, 3, 3), [0, 1], [1, 1], [1, 1], 1, None, None),
                          "stride must be >= 1"),
    "conv_backward_g_shape": (ops.conv_stats_backward_conv, (_x(2, 8, 6, 5), _x(2, 4, 6, 6), _x(8, 4, 3, 3), [1, 1],
                                                             [1, 1], [1, 1], 1, None, None, [True, True]),
                              "resnet_fused::conv_stats_backward_conv: g must have the conv's output shape"),
    "conv_backward_g_dtype": (ops.conv_stats_backward_conv, (_x(2, 8, 6, 6, dtype=torch.float64), _x(2, 4, 6, 6),
                                                             _x(8, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1, None, None,
                                                             [True, True]), "g must have the dtype of x"),
    "conv_backward_shift_alone": (ops.conv_stats_backward_conv, (_x(2, 8, 6, 6), _x(2, 4, 6, 6), _x(8, 4, 3, 3),
                                                                 [1, 1], [1, 1], [1, 1], 1, None, _x(4),
                                                                 [True, True]),
                                  "in_scale and in_shift must be given together"),
    "conv_backward_engine": (ops.conv_stats_backward_conv, (_x(2, 8, 6, 6), _x(2, 4, 6, 6), _x(8, 4, 3, 3), [1, 1],
                                                            [1, 1], [1, 1], 1, None, None, [True, True], "fast"),
                             "unknown engine 'fast'"),
    "affine_relu_int": (ops.affine_relu, (torch.ones(2, 4, 3, 3, dtype=torch.int32), _x(4), _x(4)),
                        "resnet_fused::affine_relu: x must be float32/float64/float16/bfloat16"),
    "affine_relu_scale_size": (ops.affine_relu, (_x(2, 4, 3, 3), _x(3), _x(4)), "scale must be 1-D of size C = 4"),
    "affine_relu_backward_da_shape": (ops.affine_relu_backward, (_x(2, 4, 3, 4), _x(2, 4, 3, 3), _x(4), _x(4)),
                                      "da must have the shape of x"),
    "affine_relu_backward_da_dtype": (ops.affine_relu_backward, (_x(2, 4, 3, 3, dtype=torch.float64),
                                                                 _x(2, 4, 3, 3), _x(4), _x(4)),
                                      "da must have the dtype of x"),
    "stats_backward_dc_shape": (ops.conv_stats_backward_input, (_x(2, 4, 3, 3), _x(4), _x(2, 4, 3, 2), None, None),
                                "dc must have the shape of c"),
    "stats_backward_dvar_size": (ops.conv_stats_backward_input, (_x(2, 4, 3, 3), _x(4), None, None, _x(5)),
                                 "dvar must be 1-D of size C = 4"),
    "stats_backward_mean_rank": (ops.conv_stats_backward_input, (_x(2, 4, 3, 3), _x(1, 4), None, _x(4), None),
                                 "mean must be 1-D of size C = 4"),
    "tail_backward_dout_shape": (ops.scale_bias_add_relu_backward, (_x(2, 4, 3, 2), _x(2, 4, 3, 3), _x(4), _x(4),
                                                                    _x(2, 4, 3, 3), None, None),
                                 "resnet_fused::scale_bias_add_relu_backward: dout must have the shape of c"),
    "tail_backward_idn_scale_alone": (ops.scale_bias_add_relu_backward, (_x(2, 4, 3, 3), _x(2, 4, 3, 3), _x(4),
                                                                         _x(4), _x(2, 4, 3, 3), _x(4), None),
                                      "idn_scale and idn_shift must be given together"),
    "tail_backward_idn_dtype": (ops.scale_bias_add_relu_backward, (_x(2, 4, 3, 3), _x(2, 4, 3, 3), _x(4), _x(4),
                                                                   _x(2, 4, 3, 3, dtype=torch.float64), None, None),
                                "idn must have the dtype of c"),
    "bn_finalize_mean_rank": (ops.bn_finalize, (_x(1, 4), _x(1, 4), None, None, None, None, 8.0, 0.1, 1e-5),
                              "resnet_fused::bn_finalize: mean must be 1-D"),
    "bn_finalize_mean_dtype": (ops.bn_finalize, (_x(4, dtype=torch.float16), _x(4, dtype=torch.float16), None, None,
                                                 None, None, 8.0, 0.1, 1e-5), "mean must be float32 or float64"),
    "bn_finalize_var_size": (ops.bn_finalize, (_x(4), _x(5), None, None, None, None, 8.0, 0.1, 1e-5),
                             "var must have the shape of mean"),
    "bn_finalize_weight_dtype": (ops.bn_finalize, (_x(4), _x(4), _x(4, dtype=torch.float64), None, None, None, 8.0,
                                                   0.1, 1e-5), "weight must have the dtype of mean"),
    "bn_finalize_running_alone": (ops.bn_finalize, (_x(4), _x(4), None, None, _x(4), None, 8.0, 0.1, 1e-5),
                                  "running_mean and running_var must be given together"),
    "bn_finalize_running_strided": (ops.bn_finalize, (_x(4), _x(4), None, None, _x(8)[::2], _x(4), 8.0, 0.1, 1e-5),
                                    "must be contiguous"),
    "bn_finalize_count": (ops.bn_finalize, (_x(4), _x(4), None, None, _x(4), _x(4), 1.0, 0.1, 1e-5),
                          "count must be > 1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_rejects_bad_input(case):
    op, args, message = case
    with pytest.raises(RuntimeError, match=message):
        op(*args)


# ---------------------------------------------------------------------------------------------------- GPU

CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def cuda_build():
    """A CUDA build of the extension, fp32 convolutions without TF32 (fp32 results held to fp32 tolerances)."""
    if not cuda_backend.build_info()["with_cuda"]:
        pytest.fail("a GPU is present but resnet_fused._C was built without CUDA")
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


# (shape, memory format, storage offset in elements): which pass variant each case reaches. NHWC: vector packs
# (C % 8 == 0), narrow pack rows (C=24), a row wider than one block (C=4096), scalar (odd C), misaligned; NCHW:
# vector (H*W % 8 == 0), scalar (H*W = 49); a large case for many blocks of partials per channel.
GPU_CASES = {
    "nhwc_vector": ((2, 64, 7, 7), torch.channels_last, 0),
    "nhwc_vector_c24": ((3, 24, 5, 5), torch.channels_last, 0),
    "nhwc_vector_wide_c": ((2, 4096, 3, 3), torch.channels_last, 0),
    "nhwc_scalar_odd_c": ((2, 5, 7, 7), torch.channels_last, 0),
    "nhwc_scalar_misaligned": ((2, 64, 7, 7), torch.channels_last, 1),
    "nchw_vector": ((2, 3, 8, 8), torch.contiguous_format, 0),
    "nchw_scalar_odd_hw": ((2, 3, 7, 7), torch.contiguous_format, 0),
    "nhwc_large": ((16, 256, 28, 28), torch.channels_last, 0),
    "nchw_large": ((16, 64, 28, 28), torch.contiguous_format, 0),
}


def _cuda_rand(shape, dtype, mf, offset, positive=False):
    """Random CUDA tensor whose data starts `offset` elements into its storage (1 breaks 16-byte alignment)."""
    n = 1
    for s in shape:
        n *= s
    base = torch.rand(n + offset, device="cuda") + 0.5 if positive else torch.randn(n + offset, device="cuda")
    base = base.to(dtype)
    if mf == torch.channels_last:
        N, C, H, W = shape
        return base[offset:].view(N, H, W, C).permute(0, 3, 1, 2)
    return base[offset:].view(shape)


def _cpu64(t):
    return None if t is None else t.detach().cpu().double()


def _off_kink(grad, pre):
    """``grad`` with zeros where the fp64 pre-activation ``pre`` of a ReLU lies within 1e-3 of 0: there a mask
    computed in fp32 may differ from one computed in fp64 (with millions of elements, some always do)."""
    return torch.where(pre.to(grad.device).abs() < 1e-3, torch.zeros_like(grad), grad)


def _check_gpu(actual, expected, dtype, reduced=False, msg=None):
    """GPU result vs the fp64 CPU op on the same (rounded) inputs.

    Tensor results: the dtype's tolerance. Per-channel sums (``reduced``): fp32 vectors summed in fp32 from the same
    inputs on both sides, so fp32's tolerance whatever the activation dtype, times SUM_SCALE for the summation order;
    the absolute part also scales with the largest expected sum (the rounding of a sum of N·H·W terms grows with
    them), the relative part does not: an all-zero, halved or doubled result fails."""
    actual = actual.detach().cpu().double()
    if not reduced:
        assert_close(actual, expected, dtype=dtype, msg=msg)
        return
    rtol, atol = TOL[torch.float32]
    magnitude = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected.double(), rtol=rtol * SUM_SCALE,
                               atol=atol * SUM_SCALE * max(1.0, magnitude), msg=msg)


@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_elementwise_and_reduction_ops_cuda(dtype, case, cuda_build):
    torch.manual_seed(20)
    shape, mf, offset = case
    C = shape[1]
    x, da, c, idn, dout = (_cuda_rand(shape, dtype, mf, offset) for _ in range(5))
    s, t, sd, td, mean, dmean, dvar = (torch.randn(C, device="cuda") for _ in range(7))
    s, sd = s.abs() + 0.5, sd.abs() + 0.5

    a = ops.affine_relu(x, s, t)
    assert a.dtype == dtype
    _assert_dense_like(a, x)
    _check_gpu(a, ops.affine_relu(_cpu64(x), _cpu64(s), _cpu64(t)), dtype)

    for dc_, dmean_, dvar_ in ((da, dmean, dvar), (None, dmean, None), (da, None, None)):
        got = ops.conv_stats_backward_input(c, mean, dc_, dmean_, dvar_)
        _assert_dense_like(got, c)
        _check_gpu(got, ops.conv_stats_backward_input(_cpu64(c), _cpu64(mean), _cpu64(dc_), _cpu64(dmean_),
                                                      _cpu64(dvar_)), dtype)

    def chan(v):
        return _cpu64(v).view(1, -1, 1, 1)

    da = _off_kink(da, _cpu64(x) * chan(s) + chan(t))
    want = ops.affine_relu_backward(_cpu64(da), _cpu64(x), _cpu64(s), _cpu64(t))
    for i, (got, exp) in enumerate(zip(ops.affine_relu_backward(da, x, s, t), want)):
        _check_gpu(got, exp, dtype, reduced=i > 0, msg=f"affine_relu_backward output {i}")

    for idn_scale, idn_shift in ((None, None), (sd, td)):
        branch = _cpu64(idn) if idn_scale is None else _cpu64(idn) * chan(idn_scale) + chan(idn_shift)
        dout = _off_kink(dout, _cpu64(c) * chan(s) + chan(t) + branch)
        got = ops.scale_bias_add_relu_backward(dout, c, s, t, idn, idn_scale, idn_shift)
        want = ops.scale_bias_add_relu_backward(_cpu64(dout), _cpu64(c), _cpu64(s), _cpu64(t), _cpu64(idn),
                                                _cpu64(idn_scale), _cpu64(idn_shift))
        for i, (g, e) in enumerate(zip(got, want)):
            _check_gpu(g, e, dtype, reduced=i > 1, msg=f"scale_bias_add_relu_backward output {i}")


def _conv_stats_cuda_args(dtype, mf, prologue, n=4):
    """A ResNet-like 3x3 conv (C = K = 64, 14x14) at realistic scales: weights N(0, 1/fan-in) (as a trained or
    Kaiming-initialised conv has), so c is of order 1, and a BN-like in_scale in [0.5, 1.5), in_shift N(0, 1).
    With unscaled N(0, 1) weights c reaches |c| ~ 100, and the fp16 on-load prologue's documented error (scale and
    shift rounded to fp16: 2^-11 relative to |x·s| + |t| per activation) summed over 576 taps exceeds the fp16
    table's atol: a CPU emulation of that kernel put 67-149 of the 50,176 outputs over it (worst 1.7-3.5x);
    with these scales none, the worst at 0.13x (test_conv_stats_cuda_inputs_fit_the_tolerance)."""
    x, w, st, pd, dl, g, s, t = _conv_stats_args((64, 64, 14, 14, 3, 1, 1, 1, 1), dtype, mf, prologue,
                                                  device="cuda", n=n)
    w = (w.float() * (64 * 9) ** -0.5).to(dtype).contiguous(memory_format=mf)
    return x, w, st, pd, dl, g, s, t


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_stats_cuda(dtype, fmt, prologue, cuda_build):
    """c against the fp64 formula (activation and convolution in fp64, conv2d_fp64: not the cuDNN call the plain
    path makes) at the dtype's tolerance; mean / biased variance against fp64 statistics of the op's own c (what
    BatchNorm normalizes) at fp32-summation bounds: relative 1e-4 for the variance (the kernels' documented worst
    case is 2e-5), the mean to 1e-5 of the channel's spread."""
    torch.manual_seed(21)
    x, w, st, pd, dl, g, s, t = _conv_stats_cuda_args(dtype, FORMATS[fmt], prologue)
    c, mean, var = ops.conv_stats(x, w, st, pd, dl, g, s, t)
    assert c.dtype == dtype and mean.dtype == var.dtype == torch.float32
    _assert_dense_like(c, x)
    c_ref, _, _ = conv_stats_formula(x, w, st, pd, dl, g, s, t)
    assert_close(c.double(), c_ref, dtype=dtype)
    var_ref, mean_ref = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-5, atol=1e-5 * var_ref.max().sqrt().item())
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-4, atol=1e-6 * var_ref.max().item())


def test_conv_stats_cuda_inputs_fit_the_tolerance():
    """CPU emulation of test_conv_stats_cuda's fp16 / bf16 prologue cases on its input distribution: the on-load
    prologue (scale and shift rounded to the dtype, relu(x·rd(s) + rd(t)) rounded once) and the exact activation
    path (relu(x·s + t) rounded to the dtype), each followed by the conv rounded to the dtype, stay within half the
    dtype's tolerance of the fp64 formula."""
    torch.manual_seed(25)
    for dtype in (torch.float16, torch.bfloat16):
        x = _rand(4, 64, 14, 14, dtype=dtype)
        w = (_rand(64, 64, 3, 3) * (64 * 9) ** -0.5).to(dtype)
        s, t = _rand(64, positive=True), _rand(64)
        ref = F.conv2d(torch.relu(x.double() * _chan64(s) + _chan64(t)), w.double(), padding=1)
        for a in (torch.relu(x.double() * _chan64(s.to(dtype)) + _chan64(t.to(dtype))).to(dtype),
                  torch.relu(x.float() * _chan64(s).float() + _chan64(t).float()).to(dtype)):
            c = F.conv2d(a.double(), w.double(), padding=1).to(dtype).double()
            assert_close(c, ref, dtype=dtype, scale=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_stats_cuda_large_mean_and_determinism(cuda_build):
    """Welford/Chan statistics stay exact-to-fp32 for a mean far above the spread, and repeated runs of every
    reducing op are bitwise identical."""
    torch.manual_seed(22)
    x = (torch.randn(8, 32, 28, 28, device="cuda") + 1000.0).to(memory_format=torch.channels_last)
    w = torch.zeros(32, 32, 1, 1, device="cuda")
    w[torch.arange(32), torch.arange(32)] = 1.0  # identity 1x1 conv: c = x
    _, mean, var = ops.conv_stats(x, w.to(memory_format=torch.channels_last), [1, 1], [0, 0], [1, 1], 1, None, None)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-3, atol=0)
    s, t = torch.rand(32, device="cuda") + 0.5, torch.randn(32, device="cuda")
    dout = torch.randn_like(x)
    for fn in (lambda: ops.conv_stats(x, w, [1, 1], [0, 0], [1, 1], 1, s, t)[1:],
               lambda: ops.affine_relu_backward(dout, x, s, t),
               lambda: ops.scale_bias_add_relu_backward(dout, x, s, t, x, s, t)):
        first, second = fn(), fn()
        for a, b in zip(first, second):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bn_finalize_cuda(cuda_build):
    torch.manual_seed(23)
    C = 300
    mean, var = torch.randn(C, device="cuda"), torch.rand(C, device="cuda") + 0.5
    w, b = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
    rm, rv = torch.randn(C, device="cuda"), torch.rand(C, device="cuda") + 0.5
    rm_cpu, rv_cpu = rm.cpu(), rv.cpu()
    got = ops.bn_finalize(mean, var, w, b, rm, rv, 50.0, 0.1, 1e-5)
    want = ops.bn_finalize(mean.cpu(), var.cpu(), w.cpu(), b.cpu(), rm_cpu, rv_cpu, 50.0, 0.1, 1e-5)
    for a, e in zip((*got, rm, rv), (*want, rm_cpu, rv_cpu)):
        assert_close(a.cpu(), e, dtype=torch.float32)
    scale, shift = ops.bn_finalize(mean, var, None, None, None, None, 50.0, 0.1, 1e-5)
    assert_close(scale.cpu(), torch.rsqrt(var.cpu() + 1e-5), dtype=torch.float32)
    assert_close(shift.cpu(), -mean.cpu() * scale.cpu(), dtype=torch.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", [("BasicBlock", 64, 64, 1, False), ("BasicBlock", 32, 64, 2, True),
                                  ("Bottleneck", 64, 32, 2, True)],
                         ids=["basic", "basic_down_s2", "bottleneck_down_s2"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_block_train_step_cuda_matches_torchvision(case, fmt, cuda_build):
    """One fp32 training step with backend="cuda": output, input and parameter gradients, running statistics
    and num_batches_tracked against torchvision."""
    torch.manual_seed(24)
    mf = FORMATS[fmt]
    tv, fused = (m.cuda().to(memory_format=mf) for m in _block_pair(*case))
    x = torch.randn(8, case[1], 14, 14, device="cuda").contiguous(memory_format=mf)
    x_tv, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    with _OpLog() as log:
        y_fused = fused(x_fused)
        grad = torch.randn_like(y_fused)
        y_fused.backward(grad)
    assert log.counts.get("bn_finalize") == len([m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)])
    y_tv = tv(x_tv)
    y_tv.backward(grad)

    _assert_block_matches(fused, tv, y_fused, y_tv, x_fused, x_tv, torch.float32, grad_scale=4.0)


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_stats_cuda_takes_the_tensor_core_kernel(dtype, prologue, cuda_build):
    """Covered fp16/bf16 channels_last calls run the CUTLASS conv-with-statistics kernel: the op's results are
    bitwise those of the kernel called directly — on x with the prologue on load in fp16, on the exactly
    activated input in bf16 (its on-load prologue rounds scale/shift to bf16, so it is opt-in)."""
    from test_cutlass import _require_cutlass

    from resnet_fused import _C

    _require_cutlass()  # a GPU build without them fails (unless RESNET_FUSED_ALLOW_NO_CUTLASS=1)
    torch.manual_seed(23)
    x, w, st, pd, dl, g, s, t = _conv_stats_args((64, 64, 14, 14, 3, 1, 1, 1, 1), dtype, torch.channels_last,
                                                  prologue, device="cuda", n=4)
    w = w.contiguous(memory_format=torch.channels_last)
    before = _C.cutlass_conv_launches()
    got = ops.conv_stats(x, w, st, pd, dl, g, s, t)
    assert _C.cutlass_conv_launches() == before + 1
    if prologue and dtype == torch.bfloat16:
        direct = torch.ops.resnet_fused_debug.cutlass_conv_stats(ops.affine_relu(x, s, t), w, None, None, st, pd,
                                                                 dl, g)
    else:
        direct = torch.ops.resnet_fused_debug.cutlass_conv_stats(x, w, s, t, st, pd, dl, g)
    assert direct[3]
    for name, a, b in zip(("c", "mean", "var"), got, direct[:3]):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------- GPU: the engines


def _engine_declined(err, engine):
    """Whether ``err`` is the op's refusal of a forced engine (not a failure)."""
    return f"engine '{engine}' cannot run this call: " in str(err)


@pytest.mark.parametrize("engine", ["cudnn", "cutlass", "plain"])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_stats_cuda_engines(dtype, prologue, engine, cuda_build):
    """conv_stats on each engine alone: c against the fp64 formula, mean / biased variance against fp64 statistics
    of the op's own c — with half of the channels' means 64 times their spread, where fp32 Σc / Σc² (cuDNN's
    genstats) cannot resolve the variance and the cudnn engine must recompute them exactly. plain always runs;
    cutlass runs these covered calls; cudnn runs them when built with the frontend, else declines."""
    torch.manual_seed(26)
    x, w, st, pd, dl, g, s, t = _conv_stats_cuda_args(dtype, torch.channels_last, prologue)
    if not prologue:
        offset = torch.zeros(64, device="cuda")
        offset[::2] = 64.0
        x = (x.float() + offset.view(1, -1, 1, 1)).to(dtype).contiguous(memory_format=torch.channels_last)
        eye = torch.eye(64, device="cuda").view(64, 64, 1, 1) * 0.5
        w = (w.float() * 0.1 + torch.nn.functional.pad(eye, (1, 1, 1, 1))).to(dtype)
        w = w.contiguous(memory_format=torch.channels_last)
    try:
        c, mean, var = ops.conv_stats(x, w, st, pd, dl, g, s, t, engine)
    except RuntimeError as err:
        assert _engine_declined(err, engine), err
        assert engine == "cudnn" and cuda_backend.build_info()["cudnn_frontend"] is None, err
        return
    assert cuda_backend._ext.last_engine().split()[0] == engine
    c_ref, _, _ = conv_stats_formula(x, w, st, pd, dl, g, s, t)
    assert_close(c.double(), c_ref, dtype=dtype)
    var_ref, mean_ref = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    if not prologue:
        assert (mean_ref[::2].abs() > 16 * var_ref[::2].sqrt()).all()  # the ill-conditioned channels are there
    # cudnn: the documented bound of a channel kept from the fp32 sums (cudnn_graph.h: 3ρ/τ with ρ = 2^-16, τ =
    # 2^-5); the others' centred statistics: fp32 summation
    var_rtol = 1.5e-3 if engine == "cudnn" else 1e-4
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-5, atol=1e-5 * var_ref.max().sqrt().item())
    torch.testing.assert_close(var.double(), var_ref, rtol=var_rtol, atol=0)


def _off_relu_kink(x, s, t):
    """x with every element whose BN pre-activation x·s + t lies within 1e-2 of 0 moved to where it is 0.5: there
    the ReLU mask of a fp32 computation may differ from the fp64 one."""
    pre = x.double() * _chan64(s) + _chan64(t)
    moved = ((0.5 - _chan64(t)) / _chan64(s)).expand_as(pre)
    return torch.where(pre.abs() < 1e-2, moved, x.double()).to(x.dtype).contiguous(
        memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else
        torch.contiguous_format)


@pytest.mark.parametrize("engine", ["cudnn", "cutlass", "plain"])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_stats_backward_conv_cuda_engines(dtype, prologue, engine, cuda_build):
    """The conv's backward on each engine alone against the op's fp64 CPU kernel on the same inputs: dx and dW at
    the dtype's tolerance (dW, a sum over N·H·W, at SUM_SCALE times it), the prologue's per-channel sums at fp32's.
    cutlass (forward kernels only) declines; cudnn declines only without the frontend or where cuDNN refuses the
    graph, for fp32 without TF32 (its reason is checked); plain runs everything."""
    torch.manual_seed(27)
    x, w, st, pd, dl, g, s, t = _conv_stats_cuda_args(dtype, torch.channels_last, prologue)
    if prologue:
        x = _off_relu_kink(x, s, t)
    grad = torch.randn(4, 64, 14, 14, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    args = (grad, x, w, st, pd, dl, g, s, t, [True, True])
    try:
        got = ops.conv_stats_backward_conv(*args, engine)
    except RuntimeError as err:
        assert _engine_declined(err, engine), err
        assert engine == "cutlass" or (engine == "cudnn" and (
            cuda_backend.build_info()["cudnn_frontend"] is None or dtype == torch.float32)), err
        return
    assert engine != "cutlass", "the cutlass engine ran a backward"
    assert cuda_backend._ext.last_engine().split()[0] == engine
    _assert_dense_like(got[0], x)
    _assert_dense_like(got[1], w)
    want = ops.conv_stats_backward_conv(*(_cpu64(a) if isinstance(a, torch.Tensor) else a for a in args))
    for i, (name, a, e) in enumerate(zip(("dx", "dweight", "dscale", "dshift"), got, want)):
        if not prologue and i > 1:
            assert a.numel() == 0 and e.numel() == 0, name
        elif i == 1:
            assert_close(a.detach().cpu().double(), e, dtype=dtype, scale=SUM_SCALE, msg=name)
        else:
            _check_gpu(a, e, dtype, reduced=i > 1, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_stats_cudnn_engine_declines_under_graph_capture(cuda_build):
    """The cudnn engine's exact-variance check synchronizes with the host: while a CUDA graph is captured it
    declines, and "auto" falls through to an engine that captures."""
    if cuda_backend.build_info()["cudnn_frontend"] is None:
        pytest.skip("built without the cuDNN frontend")
    x, w, st, pd, dl, g, s, t = _conv_stats_cuda_args(torch.float16, torch.channels_last, True)
    ops.conv_stats(x, w, st, pd, dl, g, s, t, "cutlass,plain")  # warm-up outside the capture
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        with pytest.raises(RuntimeError, match="CUDA graph capture"):
            ops.conv_stats(x, w, st, pd, dl, g, s, t, "cudnn")
        c, mean, var = ops.conv_stats(x, w, st, pd, dl, g, s, t)
    graph.replay()
    torch.cuda.synchronize()
    c_ref, mean_ref, var_ref = ops.conv_stats(x, w, st, pd, dl, g, s, t, "plain")
    assert_close(c.double(), c_ref.double(), dtype=torch.float16)
    torch.testing.assert_close(var, var_ref, rtol=1e-4, atol=1e-6)
