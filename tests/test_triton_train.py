"""Triton training-path ops (conv_stats, scale_bias_add_relu) and their fused elementwise kernels.

Every forward value and every gradient is compared against plain PyTorch autograd of the op's formula and
against the reference backend's op, on random inputs with odd sizes, NCHW and channels_last; kernel fusion is
checked with the launch counter. CPU runs use the Triton interpreter (TRITON_INTERPRET=1).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from resnet_fused.backends import reference
from resnet_fused.backends.triton import _launch, elementwise, train
from tolerances import TOL, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Per-channel sums over N·H·W elements round differently from PyTorch's reduction order: they (and what is
# computed from them) get the tolerance table's bound times this factor.
SUM_SCALE = 10.0

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _act(shape, fmt, dtype=torch.float32):
    return torch.randn(shape, device=DEVICE).to(dtype=dtype, memory_format=FORMATS[fmt]).requires_grad_()


def _vec(n, positive=False):
    v = torch.rand(n, device=DEVICE) + 0.5 if positive else torch.randn(n, device=DEVICE)
    return v.requires_grad_()


def _chan(v):
    return v.view(1, -1, 1, 1)


def _grads(out, inputs, grad_out):
    """Gradients of sum(out_i * grad_out_i) w.r.t. inputs (None where an input does not take part)."""
    loss = sum((o.float() * g).sum() for o, g in zip(out, grad_out))
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(loss, present, allow_unused=True))
    return [next(grads) if t is not None else None for t in inputs]


def _clone_leaves(tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


# ---------------------------------------------------------------------------------------- scale_bias_add_relu


def _tail_formula(c, scale, shift, idn, idn_scale=None, idn_shift=None):
    z = c.float() * _chan(scale) + _chan(shift)
    z = z + (idn.float() if idn_scale is None else idn.float() * _chan(idn_scale) + _chan(idn_shift))
    return torch.relu(z).to(c.dtype)


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("dual", [False, True], ids=["identity", "downsample"])
def test_scale_bias_add_relu(fmt, dual):
    torch.manual_seed(0)
    shape = (3, 5, 7, 7)
    inputs = [_act(shape, fmt), _vec(5, True), _vec(5), _act(shape, fmt)]
    if dual:
        inputs += [_vec(5, True), _vec(5)]
    grad_out = torch.randn(shape, device=DEVICE)

    _launch.reset_launch_count()
    out = train.scale_bias_add_relu(*inputs)
    assert _launch.launch_count() == 1
    assert out.dtype == inputs[0].dtype
    assert out.is_contiguous(memory_format=FORMATS[fmt])
    grads = _grads([out], inputs, [grad_out])
    assert _launch.launch_count() == 2

    expected_inputs = _clone_leaves(inputs)
    expected = _tail_formula(*expected_inputs)
    # the relu kink is never hit exactly on random inputs, so the mask is unambiguous
    assert (expected != 0).any() and (expected == 0).any()
    expected_grads = _grads([expected], expected_inputs, [grad_out])
    assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, scale=SUM_SCALE if g.dim() == 1 else 1.0)

    ref_inputs = _clone_leaves(inputs)
    ref_out = reference.scale_bias_add_relu(*ref_inputs)
    ref_grads = _grads([ref_out], ref_inputs, [grad_out])
    assert_close(out, ref_out)
    for g, e in zip(grads, ref_grads):
        assert_close(g, e, scale=SUM_SCALE if g.dim() == 1 else 1.0)


def test_scale_bias_add_relu_mixed_formats():
    """idn in another memory format (and non-contiguous) than c: result follows c's format."""
    torch.manual_seed(1)
    c = _act((2, 6, 5, 9), "nhwc")
    idn_big = torch.randn(2, 6, 5, 18, device=DEVICE)
    idn = idn_big[..., ::2].requires_grad_()
    scale, shift = _vec(6, True), _vec(6)
    out = train.scale_bias_add_relu(c, scale, shift, idn)
    assert out.is_contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(out)
    grads = _grads([out], [c, scale, shift, idn], [grad_out])
    inputs = _clone_leaves([c, scale, shift, idn])
    expected = _tail_formula(*inputs)
    expected_grads = _grads([expected], inputs, [grad_out])
    assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, scale=SUM_SCALE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_bias_add_relu_low_precision(dtype):
    """Low-precision activations with fp32 per-channel vectors: fp32 math, results in the activation dtype."""
    torch.manual_seed(2)
    shape = (2, 5, 6, 6)
    inputs = [_act(shape, "nhwc", dtype), _vec(5, True), _vec(5), _act(shape, "nhwc", dtype), _vec(5, True),
              _vec(5)]
    grad_out = torch.randn(shape, device=DEVICE).to(dtype)
    out = train.scale_bias_add_relu(*inputs)
    grads = _grads([out], inputs, [grad_out])
    ref_inputs = _clone_leaves(inputs)
    ref_out = reference.scale_bias_add_relu(*ref_inputs)
    ref_grads = _grads([ref_out], ref_inputs, [grad_out])
    assert out.dtype == dtype
    assert_close(out, ref_out)
    for g, e, inp in zip(grads, ref_grads, inputs):
        assert g.dtype == inp.dtype
        assert_close(g, e, scale=1.0 if g.dim() == 4 else SUM_SCALE)


# ------------------------------------------------------------------------------------------------ conv_stats


def _conv_stats_formula(x, weight, stride, padding, in_scale=None, in_shift=None):
    a = x if in_scale is None else torch.relu(x * _chan(in_scale) + _chan(in_shift))
    c = F.conv2d(a, weight, None, stride, padding)
    var, mean = torch.var_mean(c, dim=(0, 2, 3), correction=0)
    return c, mean, var


class _FakeConv:
    """Stands in for ``conv.conv2d_fused`` with the exact PyTorch formula, so the autograd and backward
    kernels of ``train`` are tested on their own."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, weight, stride=1, padding=0, dilation=1, groups=1, in_scale=None, in_shift=None,
                 stats=False):
        assert stats
        self.calls += 1
        with torch.no_grad():
            a = x if in_scale is None else torch.relu(x.float() * _chan(in_scale) + _chan(in_shift)).to(x.dtype)
            c = F.conv2d(a, weight, None, stride, padding, dilation, groups)
            var, mean = torch.var_mean(c.float(), dim=(0, 2, 3), correction=0)
        return c, mean, var


@pytest.fixture(params=["fused_conv", "fake_conv"])
def conv_impl(request, monkeypatch):
    """conv_stats runs once with the real conv kernel and once with the PyTorch stand-in."""
    if request.param == "fake_conv":
        fake = _FakeConv()
        monkeypatch.setattr(train, "conv2d_fused", fake, raising=False)
        return fake
    return None


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn_relu_prologue"])
@pytest.mark.parametrize("stride,ksize", [(1, 3), (2, 3), (2, 1)])
def test_conv_stats(conv_impl, fmt, prologue, stride, ksize):
    torch.manual_seed(3)
    n, cin, cout, hw = 3, 5, 6, 7
    x = _act((n, cin, hw, hw), fmt)
    if prologue:
        # shifts around zero so the relu masks part of the input
        x = (x.detach() * 2).requires_grad_()
    weight = (torch.randn(cout, cin, ksize, ksize, device=DEVICE) * 0.3).requires_grad_()
    scale, shift = (_vec(cin, True), _vec(cin)) if prologue else (None, None)
    padding = ksize // 2
    inputs = [x, weight, scale, shift]

    _launch.reset_launch_count()
    outs = train.conv_stats(x, weight, stride, padding, in_scale=scale, in_shift=shift)
    forward_launches = _launch.launch_count()
    c, mean, var = outs
    assert c.is_contiguous(memory_format=FORMATS[fmt])
    assert mean.dtype == var.dtype == torch.float32
    grad_out = [torch.randn_like(c), torch.randn_like(mean), torch.randn_like(var)]
    _launch.reset_launch_count()
    grads = _grads(outs, inputs, grad_out)
    # stats backward, and with the prologue: its recompute for wgrad and its one-pass backward
    assert _launch.launch_count() == (3 if prologue else 1)
    if conv_impl is None:
        assert 1 <= forward_launches <= 2  # the conv, plus at most a small statistics merge
    else:
        assert forward_launches == 0 and conv_impl.calls == 1

    expected_inputs = _clone_leaves(inputs)
    expected = _conv_stats_formula(expected_inputs[0], expected_inputs[1], stride, padding, *expected_inputs[2:])
    expected_grads = _grads(expected, expected_inputs, grad_out)
    ref_inputs = _clone_leaves(inputs)
    ref = reference.conv_stats(ref_inputs[0], ref_inputs[1], stride, padding, in_scale=ref_inputs[2],
                               in_shift=ref_inputs[3])
    ref_grads = _grads(ref, ref_inputs, grad_out)
    for actual, e, r in zip(outs, expected, ref):
        assert_close(actual, e, scale=SUM_SCALE)
        assert_close(actual, r, scale=SUM_SCALE)
    for g, e, r in zip(grads, expected_grads, ref_grads):
        if e is None:
            assert g is None
            continue
        assert_close(g, e, scale=SUM_SCALE)
        assert_close(g, r, scale=SUM_SCALE)


@pytest.mark.parametrize("used", ["c", "stats", "var"])
def test_conv_stats_partial_outputs(conv_impl, used):
    """Outputs that take no part in the loss get no gradient; the others still flow correctly."""
    torch.manual_seed(4)
    x = _act((2, 4, 5, 5), "nhwc")
    weight = torch.randn(3, 4, 3, 3, device=DEVICE).requires_grad_()
    scale, shift = _vec(4, True), _vec(4)
    inputs = [x, weight, scale, shift]
    c, mean, var = train.conv_stats(x, weight, 1, 1, in_scale=scale, in_shift=shift)
    picked = {"c": [c], "stats": [mean, var], "var": [var]}[used]
    grad_out = [torch.randn_like(t) for t in picked]
    grads = _grads(picked, inputs, grad_out)
    expected_inputs = _clone_leaves(inputs)
    ec, emean, evar = _conv_stats_formula(expected_inputs[0], expected_inputs[1], 1, 1, *expected_inputs[2:])
    expected_picked = {"c": [ec], "stats": [emean, evar], "var": [evar]}[used]
    expected_grads = _grads(expected_picked, expected_inputs, grad_out)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, scale=SUM_SCALE)


def test_conv_stats_frozen_weight(conv_impl):
    """Without a weight gradient the prologue activation is not recomputed; the other gradients are exact."""
    torch.manual_seed(12)
    x = (_act((2, 4, 5, 5), "nhwc").detach() * 2).requires_grad_()
    weight = torch.randn(3, 4, 3, 3, device=DEVICE)
    scale, shift = _vec(4, True), _vec(4)
    inputs = [x, scale, shift]
    outs = train.conv_stats(x, weight, 1, 1, in_scale=scale, in_shift=shift)
    grad_out = [torch.randn_like(t) for t in outs]
    _launch.reset_launch_count()
    grads = _grads(outs, inputs, grad_out)
    assert _launch.launch_count() == 2  # stats backward, prologue backward
    expected_inputs = _clone_leaves(inputs)
    expected = _conv_stats_formula(expected_inputs[0], weight, 1, 1, *expected_inputs[1:])
    for g, e in zip(grads, _grads(expected, expected_inputs, grad_out)):
        assert_close(g, e, scale=SUM_SCALE)


def test_conv_stats_low_precision(conv_impl):
    """bf16 activations and weights with fp32 prologue vectors: c in bf16, statistics and their grads fp32."""
    torch.manual_seed(5)
    x = _act((2, 4, 6, 6), "nhwc", torch.bfloat16)
    weight = (torch.randn(8, 4, 3, 3, device=DEVICE) * 0.3).to(torch.bfloat16).requires_grad_()
    scale, shift = _vec(4, True), _vec(4)
    inputs = [x, weight, scale, shift]
    outs = train.conv_stats(x, weight, 1, 1, in_scale=scale, in_shift=shift)
    assert outs[0].dtype == torch.bfloat16 and outs[1].dtype == outs[2].dtype == torch.float32
    grad_out = [torch.randn_like(t) for t in outs]
    grads = _grads(outs, inputs, grad_out)
    ref_inputs = _clone_leaves(inputs)
    ref = reference.conv_stats(ref_inputs[0], ref_inputs[1], 1, 1, in_scale=ref_inputs[2], in_shift=ref_inputs[3])
    ref_grads = _grads(ref, ref_inputs, grad_out)
    for actual, r in zip(outs, ref):
        assert_close(actual.float(), r.float(), torch.bfloat16)
    rtol, atol = TOL[torch.bfloat16]
    for g, r, inp in zip(grads, ref_grads, inputs):
        assert g.dtype == inp.dtype
        # sums over N·H·W: the absolute bound grows with the gradient's magnitude, the relative one does not (so
        # a zero or doubled gradient fails)
        magnitude = max(1.0, r.float().abs().max().item())
        torch.testing.assert_close(g.float(), r.float(), rtol=rtol, atol=atol * magnitude)


# ------------------------------------------------------------------------------------------- kernels direct


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_stats_bwd(fmt):
    torch.manual_seed(6)
    c = _act((3, 5, 7, 7), fmt).detach()
    mean = c.mean(dim=(0, 2, 3))
    dc, dmean, dvar = torch.randn_like(c), torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE)
    m = c.numel() // 5
    _launch.reset_launch_count()
    out = elementwise.stats_bwd(c, mean, dc, dmean, dvar)
    assert _launch.launch_count() == 1
    assert_close(out, dc + _chan(dmean) / m + _chan(dvar) * 2 * (c - _chan(mean)) / m)
    assert_close(elementwise.stats_bwd(c, mean, None, dmean, None), (_chan(dmean) / m).expand_as(c))
    assert_close(elementwise.stats_bwd(c, mean, dc, None, None), dc)
    assert elementwise.stats_bwd(c, mean) is None


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_affine_relu_kernels(fmt):
    torch.manual_seed(7)
    x = _act((3, 5, 7, 7), fmt).detach() * 2
    scale, shift = torch.rand(5, device=DEVICE) + 0.5, torch.randn(5, device=DEVICE)
    grad_a = torch.randn_like(x)
    _launch.reset_launch_count()
    a = elementwise.affine_relu_fwd(x, scale, shift)
    dx, dscale, dshift = elementwise.affine_relu_bwd(grad_a, x, scale, shift)
    assert _launch.launch_count() == 2
    z = x * _chan(scale) + _chan(shift)
    g = grad_a * (z > 0)
    assert a.is_contiguous(memory_format=FORMATS[fmt]) and dx.is_contiguous(memory_format=FORMATS[fmt])
    assert_close(a, torch.relu(z))
    assert_close(dx, g * _chan(scale))
    assert_close(dscale, (g * x).sum((0, 2, 3)), scale=SUM_SCALE)
    assert_close(dshift, g.sum((0, 2, 3)), scale=SUM_SCALE)


def test_many_rows_multi_program_reduction():
    """Enough rows for several programs along N·H·W: partial sums must add up across programs."""
    torch.manual_seed(8)
    x = torch.randn(4, 3, 40, 40, device=DEVICE).to(memory_format=torch.channels_last)
    scale, shift = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    grad_a = torch.randn_like(x)
    assert elementwise._plan(x, torch.channels_last).grid[0] > 1
    dx, dscale, dshift = elementwise.affine_relu_bwd(grad_a, x, scale, shift)
    g = grad_a * (x * _chan(scale) + _chan(shift) > 0)
    assert_close(dx, g * _chan(scale))
    assert_close(dscale, (g * x).sum((0, 2, 3)), scale=SUM_SCALE)
    assert_close(dshift, g.sum((0, 2, 3)), scale=SUM_SCALE)


def test_relu_propagates_nan():
    """A NaN reaching a ReLU stays NaN as in torch.relu, so a diverging run shows in its loss."""
    c = torch.randn(2, 3, 4, 4, device=DEVICE)
    c[1, 2, 3, 0] = float("nan")
    scale, shift = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    expected = torch.relu(c * _chan(scale) + _chan(shift))
    assert expected.isnan().sum() == 1
    torch.testing.assert_close(elementwise.affine_relu_fwd(c, scale, shift), expected, equal_nan=True)
    torch.testing.assert_close(elementwise.tail_fwd(c, scale, shift, torch.zeros_like(c)), expected, equal_nan=True)


def test_empty_batch():
    c = torch.randn(0, 4, 3, 3, device=DEVICE)
    scale, shift = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    _launch.reset_launch_count()
    assert elementwise.tail_fwd(c, scale, shift, c).shape == c.shape
    dc, didn, dscale, dshift, didn_scale, _ = elementwise.tail_bwd(c, c, scale, shift, c)
    assert _launch.launch_count() == 0
    assert dc.shape == didn.shape == c.shape and didn_scale is None
    assert_close(dscale, torch.zeros(4, device=DEVICE))
    assert_close(dshift, torch.zeros(4, device=DEVICE))


def test_bad_inputs():
    c = torch.randn(2, 4, 3, 3, device=DEVICE)
    scale, shift = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="idn has shape"):
        elementwise.tail_fwd(c, scale, shift, c[:, :3])
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        elementwise.tail_fwd(c, scale[:3], shift, c)
    with pytest.raises(TypeError, match="shift must be float32"):
        elementwise.tail_fwd(c, scale, shift.double(), c)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        elementwise.affine_relu_fwd(c.double(), scale, shift)
    with pytest.raises(ValueError, match="4-D"):
        elementwise.affine_relu_fwd(c[0], scale, shift)
    with pytest.raises(ValueError, match="given together"):
        train.scale_bias_add_relu(c, scale, shift, c, idn_scale=scale)
    with pytest.raises(ValueError, match="given together"):
        train.conv_stats(c, torch.randn(4, 4, 1, 1, device=DEVICE), 1, 0, in_scale=scale)


@pytest.mark.parametrize("kind,inplanes,planes,stride,downsample",
                         [("BasicBlock", 5, 5, 1, False), ("Bottleneck", 5, 3, 2, True)],
                         ids=["basic", "bottleneck_down"])
def test_training_block_launch_counts(kind, inplanes, planes, stride, downsample):
    """A training block is ONE launch per conv (its BatchNorm finalized inside it) plus ONE tail kernel
    forward; backward is one tail kernel, per conv ONE BatchNorm backward (with the recompute of its prologue's
    activation for the weight gradient), and for each conv with the BN+ReLU prologue its one-pass backward."""
    torch.manual_seed(9)
    out = planes * getattr(resnet_fused, kind).expansion
    ds = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)) if downsample else None
    block = getattr(resnet_fused, kind)(inplanes, planes, stride, ds, backend="triton").to(DEVICE)
    x = torch.randn(2, inplanes, 5, 5, device=DEVICE, requires_grad=True)
    convs = 2 if kind == "BasicBlock" else 3
    _launch.reset_launch_count()
    y = block(x)
    assert _launch.launch_count() == convs + downsample + 1
    _launch.reset_launch_count()
    y.sum().backward()
    assert _launch.launch_count() == 1 + (convs + downsample) + (convs - 1)


def _opcheck_cases():
    torch.manual_seed(10)
    x = torch.randn(2, 5, 4, 3, device=DEVICE).to(memory_format=torch.channels_last)
    y = torch.randn(2, 5, 4, 3, device=DEVICE)
    s, t = torch.rand(5, device=DEVICE) + 0.5, torch.randn(5, device=DEVICE)
    ops = torch.ops.resnet_fused
    return {
        "tail_fwd": (ops.triton_tail_fwd, (x, s, t, y, None, None)),
        "tail_fwd_dual": (ops.triton_tail_fwd, (x, s, t, y, s, t)),
        "tail_bwd": (ops.triton_tail_bwd, (y, x, s, t, y, None, None)),
        "tail_bwd_dual": (ops.triton_tail_bwd, (y, x, s, t, y, s, t)),
        "affine_relu_fwd": (ops.triton_affine_relu_fwd, (y, s, t)),
        "affine_relu_bwd": (ops.triton_affine_relu_bwd, (x, x, s, t)),
        "stats_bwd": (ops.triton_stats_bwd, (x, s, y, t, s)),
        "stats_bwd_mean_only": (ops.triton_stats_bwd, (y, s, None, t, None)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_registered_ops_pass_opcheck(case):
    """Schema, fake kernel (shapes, dtypes, memory format) and AOT dispatch of each registered op."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op.default, args)


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces a training block's ops (conv_stats with the BN+ReLU prologue, the
    dual tail) forward and backward without graph breaks, and computes what eager computes."""
    torch.manual_seed(11)
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, device=DEVICE, requires_grad=True)
    s, t = _vec(4, True), _vec(4)
    cd = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)

    def block_tail(x, w, s, t, cd):
        c, mean, var = train.conv_stats(x, w, 1, 1, in_scale=s, in_shift=t)
        scale = torch.rsqrt(var + 1e-5)
        return train.scale_bias_add_relu(c, scale, -mean * scale, cd, s, t)

    inputs = [x, w, s, t, cd]
    out = torch.compile(block_tail, fullgraph=True)(*inputs)
    expected = block_tail(*inputs)
    assert_close(out, expected)
    grad = torch.randn_like(out)
    for g, e in zip(_grads([out], inputs, [grad]), _grads([expected], inputs, [grad])):
        assert_close(g, e, scale=SUM_SCALE)


# ------------------------------------------------------------------------------------------------ finalize


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.bfloat16, None], ids=["fp32", "bf16", "none"])
def test_finalize_matches_formula(affine, running_dtype):
    """scale/shift and the running-statistics update of the one-launch finalize against the fp64 formula of
    BatchNorm's training step (biased variance to normalize, unbiased to update; factor 1/3 as momentum=None
    gives on the third batch); gradients of mean, var, γ, β against autograd of that formula."""
    from resnet_fused.backends.triton import stats

    torch.manual_seed(13)
    k, count, factor, eps = 37, 50, 1.0 / 3.0, 1e-5
    mean = torch.randn(k, device=DEVICE).requires_grad_()
    var = (torch.rand(k, device=DEVICE) + 0.1).requires_grad_()
    gamma = torch.randn(k, device=DEVICE).requires_grad_() if affine else None
    beta = torch.randn(k, device=DEVICE).requires_grad_() if affine else None
    running = None
    if running_dtype is not None:
        running = (torch.randn(k, device=DEVICE).to(running_dtype),
                   (torch.rand(k, device=DEVICE) + 0.5).to(running_dtype))
    before = [r.double().clone() for r in running] if running else None
    _launch.reset_launch_count()
    scale, shift = stats.finalize(mean, var, gamma, beta, *(running or (None, None)), count, factor, eps)
    assert _launch.launch_count() == 1

    d = [t.detach().double().requires_grad_() if t is not None else None for t in (mean, var, gamma, beta)]
    ref_scale = torch.rsqrt(d[1] + eps) * (d[2] if affine else 1.0)
    ref_shift = -d[0] * ref_scale + (d[3] if affine else 0.0)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shift.double(), ref_shift, rtol=1e-6, atol=1e-6)
    if running:
        exp_mean = before[0] * (1 - factor) + d[0].detach() * factor
        exp_var = before[1] * (1 - factor) + d[1].detach() * count / (count - 1) * factor
        for got, exp in zip(running, (exp_mean, exp_var)):
            assert got.dtype == running_dtype
            assert_close(got.double(), exp.to(running_dtype).double(), running_dtype)
    gs, gt = torch.randn(k, device=DEVICE), torch.randn(k, device=DEVICE)
    leaves = [t for t in (mean, var, gamma, beta) if t is not None]
    ref_leaves = [t for t in d if t is not None]
    grads = torch.autograd.grad((scale * gs + shift * gt).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_scale * gs.double() + ref_shift * gt.double()).sum(), ref_leaves)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def test_finalize_is_the_backends_hook_and_updates_like_batchnorm():
    """A training BatchNorm through norm.py with the Triton finalize (momentum=None, the cumulative average)
    updates running statistics and num_batches_tracked exactly as nn.BatchNorm2d does, over three batches."""
    from resnet_fused import norm
    from resnet_fused.backends.triton import finalize

    torch.manual_seed(14)
    bn = nn.BatchNorm2d(6, momentum=None).to(DEVICE)
    ref = nn.BatchNorm2d(6, momentum=None).to(DEVICE)
    with torch.no_grad():
        for m in (bn, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
            m.bias.copy_(torch.linspace(-1, 1, 6))
    for step in range(3):
        c = torch.randn(4, 6, 3, 3, device=DEVICE) * (step + 1) + step
        var, mean = torch.var_mean(c, dim=(0, 2, 3), correction=0)
        _launch.reset_launch_count()
        scale, shift = norm.scale_shift(bn, (c, mean, var), finalize)
        assert _launch.launch_count() == 1
        expected = ref(c)
        assert_close(c * _chan(scale) + _chan(shift), expected)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    assert_close(bn.running_mean, ref.running_mean)
    assert_close(bn.running_var, ref.running_var)


def test_finalize_op_passes_opcheck():
    torch.manual_seed(15)
    v = [torch.randn(5, device=DEVICE) for _ in range(3)] + [torch.rand(5, device=DEVICE) + 0.5]
    for running in ((None, None), (torch.randn(5, device=DEVICE), torch.rand(5, device=DEVICE) + 0.5)):
        torch.library.opcheck(torch.ops.resnet_fused.triton_bn_finalize.default,
                              (v[0], v[3], v[1], v[2], *running, 12, 0.1, 1e-5))


# ------------------------------------------------------------------------- in-kernel sums, bn_train_bwd


def _counters_are_zero():
    """Every arrival counter of the zero-once workspace is back at zero (kernels leave them so)."""
    return all(bool((buf == 0).all()) for buf in _launch._COUNTERS.values())


# under the interpreter's plan: one program; several row programs; several row and channel programs
_SUM_SHAPES = {"one_program": (2, 5, 3, 3), "rows": (4, 3, 40, 40), "rows_and_channels": (2, 130, 12, 12)}


@pytest.mark.parametrize("name", list(_SUM_SHAPES))
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("dual", [False, True], ids=["identity", "downsample"])
def test_tail_bwd_channel_sums(name, fmt, dual):
    """tail_bwd's per-channel sums, added up by the kernel's last program per channel block, against autograd of
    the tail; one launch, the counters left at zero, the same bits on a second call."""
    torch.manual_seed(20)
    shape = _SUM_SHAPES[name]
    k = shape[1]
    inputs = [_act(shape, fmt), _vec(k, True), _vec(k), _act(shape, fmt)]
    if dual:
        inputs += [_vec(k, True), _vec(k)]
    if _launch.INTERPRET:
        grid = elementwise._plan(inputs[0], FORMATS[fmt]).grid
        assert (grid[0] > 1, grid[1] > 1) == {"one_program": (False, False), "rows": (True, False),
                                              "rows_and_channels": (True, True)}[name]
    dout = torch.randn(shape, device=DEVICE)
    args = [t.detach() for t in inputs]
    _launch.reset_launch_count()
    dc, didn, dscale, dshift, didn_scale, didn_shift = elementwise.tail_bwd(dout, *args)
    assert _launch.launch_count() == 1
    assert _counters_are_zero()
    again = elementwise.tail_bwd(dout, *args)
    assert _counters_are_zero()
    for a, b in zip((dscale, dshift, didn_scale, didn_shift), again[2:]):
        assert (a is None and b is None) or torch.equal(a, b)

    expected = _grads([_tail_formula(*inputs)], inputs, [dout])
    assert_close(dc, expected[0])
    assert_close(dscale, expected[1], scale=SUM_SCALE)
    assert_close(dshift, expected[2], scale=SUM_SCALE)
    assert_close(didn, expected[3])
    if dual:
        assert_close(didn_scale, expected[4], scale=SUM_SCALE)
        assert_close(didn_shift, expected[5], scale=SUM_SCALE)
        assert didn_shift.data_ptr() != dshift.data_ptr()
    else:
        assert didn_scale is None


@pytest.mark.parametrize("shape", list(_SUM_SHAPES), ids=list(_SUM_SHAPES))
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_affine_relu_bwd_channel_sums(shape, fmt):
    """affine_relu_bwd's dscale/dshift, added up in the kernel, against autograd of relu(x*s + t)."""
    torch.manual_seed(21)
    shape = _SUM_SHAPES[shape]
    k = shape[1]
    x, scale, shift = _act(shape, fmt), _vec(k, True), _vec(k)
    grad_a = torch.randn(shape, device=DEVICE)
    _launch.reset_launch_count()
    dx, dscale, dshift = elementwise.affine_relu_bwd(grad_a, x.detach(), scale.detach(), shift.detach())
    assert _launch.launch_count() == 1
    assert _counters_are_zero()
    _, dscale2, dshift2 = elementwise.affine_relu_bwd(grad_a, x.detach(), scale.detach(), shift.detach())
    assert _counters_are_zero()
    assert torch.equal(dscale, dscale2) and torch.equal(dshift, dshift2)
    assert dscale.shape == dshift.shape == (k,) and dscale.dtype == torch.float32
    ex, es, et = _grads([torch.relu(x * _chan(scale) + _chan(shift))], [x, scale, shift], [grad_a])
    assert_close(dx, ex)
    assert_close(dscale, es, scale=SUM_SCALE)
    assert_close(dshift, et, scale=SUM_SCALE)


def test_channel_sums_low_precision():
    """bf16 activations: the in-kernel sums are fp32 and match autograd in fp32 of the bf16 values."""
    torch.manual_seed(22)
    shape = (4, 3, 40, 40)
    x = _act(shape, "nhwc", torch.bfloat16)
    scale, shift = _vec(3, True), _vec(3)
    grad_a = torch.randn(shape, device=DEVICE).to(torch.bfloat16)
    dx, dscale, dshift = elementwise.affine_relu_bwd(grad_a, x.detach(), scale.detach(), shift.detach())
    assert _counters_are_zero()
    assert dx.dtype == torch.bfloat16 and dscale.dtype == dshift.dtype == torch.float32
    xf = x.detach().float().requires_grad_()
    ex, es, et = _grads([torch.relu(xf * _chan(scale) + _chan(shift))], [xf, scale, shift], [grad_a.float()])
    assert_close(dx.float(), ex, torch.bfloat16)
    assert_close(dscale, es, scale=SUM_SCALE)
    assert_close(dshift, et, scale=SUM_SCALE)


def test_channel_sums_empty_batch():
    """An empty batch launches nothing, gets zero sums and touches no counter."""
    x = torch.randn(0, 4, 3, 3, device=DEVICE)
    scale, shift = torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE)
    _launch.reset_launch_count()
    dx, dscale, dshift = elementwise.affine_relu_bwd(x, x, scale, shift)
    _, _, tscale, tshift, tidn_scale, tidn_shift = elementwise.tail_bwd(x, x, scale, shift, x, scale, shift)
    assert _launch.launch_count() == 0
    assert dx.shape == x.shape
    for v in (dscale, dshift, tscale, tshift, tidn_scale, tidn_shift):
        assert v.shape == (4,) and not v.any()
    assert dscale.data_ptr() != dshift.data_ptr() and tscale.data_ptr() != tshift.data_ptr()


BN_EPS = 1e-5


def _bn_case(shape, fmt, dtype=torch.float32, affine=True):
    """c, its fp32 batch mean and biased variance, γ (or None): the forward state of a training BatchNorm."""
    c = _act(shape, fmt, dtype).detach()
    var, mean = torch.var_mean(c.double(), dim=(0, 2, 3), correction=0)
    weight = torch.rand(shape[1], device=DEVICE) + 0.5 if affine else None
    return c, mean.float(), var.float(), weight


def _bn_train_bwd_expected(c, weight, bias, dc, dscale, dshift):
    """dc_total, dγ, dβ by fp64 autograd of the forward: mean/var of c, scale = γ/√(var+ε), shift = β − mean·scale,
    loss = Σ c·dc + Σ scale·dscale + Σ shift·dshift (absent terms left out)."""
    cd = c.detach().double().requires_grad_()
    k = c.shape[1]
    gamma = (weight if weight is not None else torch.ones(k, device=DEVICE)).double().requires_grad_()
    beta = (bias if bias is not None else torch.zeros(k, device=DEVICE)).double().requires_grad_()
    var, mean = torch.var_mean(cd, dim=(0, 2, 3), correction=0)
    scale = gamma * torch.rsqrt(var + BN_EPS)
    shift = beta - mean * scale
    loss = 0.0
    for t, g in ((cd, dc), (scale, dscale), (shift, dshift)):
        if g is not None:
            loss = loss + (t * g.double()).sum()
    return torch.autograd.grad(loss, [cd, gamma, beta], allow_unused=True, materialize_grads=True)


_BN_GRADS = {"all": ("dc", "dscale", "dshift"), "no_dc": ("dscale", "dshift"), "dc_dshift": ("dc", "dshift"),
             "dc_only": ("dc",)}


@pytest.mark.parametrize("recompute", [False, True], ids=["alone", "recompute"])
@pytest.mark.parametrize("grads", list(_BN_GRADS))
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_bn_train_bwd(affine, fmt, grads, recompute):
    """dc_total and dγ of the one-launch BatchNorm backward (finalize backward folded in) against fp64 autograd of
    the forward; the fused recompute of another tensor (other shape, channels and memory format) against
    relu(x*s + t)."""
    torch.manual_seed(23)
    shape = (3, 5, 7, 7)
    c, mean, var, weight = _bn_case(shape, fmt, affine=affine)
    bias = torch.randn(5, device=DEVICE) if affine else None
    given = {"dc": torch.randn_like(c), "dscale": torch.randn(5, device=DEVICE),
             "dshift": torch.randn(5, device=DEVICE)}
    given = {k: v for k, v in given.items() if k in _BN_GRADS[grads]}
    other = "nhwc" if fmt == "nchw" else "nchw"
    x = _act((2, 6, 4, 9), other).detach()
    xs, xt = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)

    _launch.reset_launch_count()
    dc_total, dweight, a = elementwise.bn_train_bwd(c, mean, var, weight, BN_EPS, **given,
                                                    recompute=(x, xs, xt) if recompute else None)
    assert _launch.launch_count() == 1
    exp_dc, exp_dgamma, exp_dbeta = _bn_train_bwd_expected(c, weight, bias, given.get("dc"), given.get("dscale"),
                                                           given.get("dshift"))
    assert dc_total.dtype == c.dtype and dc_total.is_contiguous(memory_format=FORMATS[fmt])
    assert_close(dc_total.double(), exp_dc, torch.float32)
    if affine:
        assert dweight.shape == (5,) and dweight.dtype == torch.float32
        assert_close(dweight.double(), exp_dgamma, torch.float32)
        # dβ = dshift: no kernel output
        assert_close(given.get("dshift", torch.zeros(5, device=DEVICE)).double(), exp_dbeta, torch.float32)
    else:
        assert dweight is None
    if recompute:
        assert a.is_contiguous(memory_format=FORMATS[other]) and a.dtype == x.dtype
        assert_close(a, torch.relu(x * _chan(xs) + _chan(xt)))
    else:
        assert a is None


def test_bn_train_bwd_many_programs_matches_two_launches():
    """Several row and channel programs in both jobs; the same bits as the finalize backward followed by
    stats_bwd (the two launches it replaces), fp32 and bf16."""
    from resnet_fused.backends.triton import stats

    torch.manual_seed(24)
    for dtype in (torch.float32, torch.bfloat16):
        c, mean, var, weight = _bn_case((2, 130, 12, 12), "nhwc", dtype)
        x = _act((4, 3, 40, 40), "nchw", dtype).detach()
        xs, xt = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
        if _launch.INTERPRET:
            cgrid = elementwise._plan(c, torch.channels_last).grid
            xgrid = elementwise._plan(x, torch.contiguous_format).grid
            assert cgrid[0] > 1 and cgrid[1] > 1 and xgrid[0] > 1
        dc, dscale, dshift = torch.randn_like(c), torch.randn(130, device=DEVICE), torch.randn(130, device=DEVICE)
        _launch.reset_launch_count()
        dc_total, dweight, a = elementwise.bn_train_bwd(c, mean, var, weight, BN_EPS, dc, dscale, dshift,
                                                        recompute=(x, xs, xt))
        assert _launch.launch_count() == 1
        dmean, dvar, dw = stats._finalize_bwd_op(mean, var, weight, dscale, dshift, BN_EPS)
        assert torch.equal(dweight, dw)
        assert torch.equal(dc_total, elementwise.stats_bwd(c, mean, dc, dmean, dvar))
        assert torch.equal(a, elementwise.affine_relu_fwd(x, xs, xt))


def test_bn_train_bwd_low_precision():
    """bf16 c and dc: fp32 math, dc_total in bf16 within the bf16 tolerance of fp64 autograd."""
    torch.manual_seed(25)
    c, mean, var, weight = _bn_case((2, 6, 5, 5), "nhwc", torch.bfloat16)
    dc = torch.randn_like(c)
    dscale, dshift = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    x = _act((2, 4, 3, 3), "nhwc", torch.bfloat16).detach()
    xs, xt = torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE)
    dc_total, dweight, a = elementwise.bn_train_bwd(c, mean, var, weight, BN_EPS, dc, dscale, dshift,
                                                    recompute=(x, xs, xt))
    exp_dc, exp_dgamma, _ = _bn_train_bwd_expected(c, weight, None, dc, dscale, dshift)
    assert dc_total.dtype == a.dtype == torch.bfloat16 and dweight.dtype == torch.float32
    assert_close(dc_total.double(), exp_dc, torch.bfloat16)
    assert_close(dweight.double(), exp_dgamma, torch.float32)
    assert_close(a.float(), torch.relu(x.float() * _chan(xs) + _chan(xt)), torch.bfloat16)


def test_bn_train_bwd_partial_work():
    """No gradient: nothing to do without a recompute (no launch), the recompute alone with one; an empty batch
    still gets dγ from its per-channel terms; an empty x gets an empty a."""
    torch.manual_seed(26)
    c, mean, var, weight = _bn_case((2, 4, 3, 3), "nchw")
    x = torch.randn(2, 3, 2, 2, device=DEVICE)
    xs, xt = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    _launch.reset_launch_count()
    assert elementwise.bn_train_bwd(c, mean, var, weight, BN_EPS) == (None, None, None)
    assert _launch.launch_count() == 0
    dc_total, dweight, a = elementwise.bn_train_bwd(c, mean, var, weight, BN_EPS, recompute=(x, xs, xt))
    assert _launch.launch_count() == 1 and dc_total is None and dweight is None
    assert_close(a, torch.relu(x * _chan(xs) + _chan(xt)))

    empty = torch.randn(0, 4, 3, 3, device=DEVICE)
    dscale, dshift = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    _launch.reset_launch_count()
    dc_total, dweight, a = elementwise.bn_train_bwd(empty, mean, var, weight, BN_EPS, dscale=dscale, dshift=dshift,
                                                    recompute=(x[:0], xs, xt))
    assert _launch.launch_count() == 1
    assert dc_total.shape == empty.shape and a.shape == (0, 3, 2, 2)
    assert_close(dweight, (dscale - mean * dshift) / torch.sqrt(var + BN_EPS))


def test_bn_train_bwd_passes_opcheck():
    torch.manual_seed(27)
    c = torch.randn(2, 5, 4, 3, device=DEVICE).to(memory_format=torch.channels_last)
    var, mean = torch.var_mean(c, dim=(0, 2, 3), correction=0)
    w, ds, dt = torch.rand(5, device=DEVICE) + 0.5, torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE)
    x = torch.randn(3, 6, 2, 5, device=DEVICE)
    xs, xt = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    op = torch.ops.resnet_fused.triton_bn_train_bwd.default
    for args in ((c, mean, var, w, BN_EPS, torch.randn_like(c), ds, dt, x, xs, xt),
                 (c, mean, var, None, BN_EPS, torch.randn_like(c), None, None, None, None, None),
                 (c, mean, var, w, BN_EPS, None, ds, dt, None, None, None),
                 (c, mean, var, w, BN_EPS, None, None, None, x, xs, xt)):
        torch.library.opcheck(op, args)


def test_bn_train_bwd_bad_inputs():
    c, mean, var, weight = _bn_case((2, 4, 3, 3), "nchw")
    x = torch.randn(2, 3, 2, 2, device=DEVICE)
    xs, xt = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    dc = torch.randn_like(c)
    with pytest.raises(ValueError, match=r"mean must have shape \(4,\)"):
        elementwise.bn_train_bwd(c, mean[:3], var, weight, BN_EPS, dc)
    with pytest.raises(TypeError, match="var must be float32"):
        elementwise.bn_train_bwd(c, mean, var.double(), weight, BN_EPS, dc)
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        elementwise.bn_train_bwd(c, mean, var, xs, BN_EPS, dc)
    with pytest.raises(ValueError, match="dc has shape"):
        elementwise.bn_train_bwd(c, mean, var, weight, BN_EPS, dc[:, :, :2])
    with pytest.raises(TypeError, match="dshift must be float32"):
        elementwise.bn_train_bwd(c, mean, var, weight, BN_EPS, dshift=mean.half())
    with pytest.raises(TypeError, match="eps must be a float"):
        elementwise.bn_train_bwd(c, mean, var, weight, "1e-5", dc)
    with pytest.raises(TypeError, match="recompute must be None or a tuple"):
        elementwise.bn_train_bwd(c, mean, var, weight, BN_EPS, dc, recompute=(x, xs))
    with pytest.raises(ValueError, match=r"in_scale must have shape \(3,\)"):
        elementwise.bn_train_bwd(c, mean, var, weight, BN_EPS, dc, recompute=(x, mean, xt))
    with pytest.raises(ValueError, match="x must be 4-D"):
        elementwise.bn_train_bwd(c, mean, var, weight, BN_EPS, dc, recompute=(x[0], xs, xt))
    with pytest.raises(TypeError, match="c must be float16, bfloat16 or float32"):
        elementwise.bn_train_bwd(c.double(), mean, var, weight, BN_EPS, dc)
