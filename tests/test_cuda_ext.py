"""Tests of the C++/CUDA extension ``resnet_fused._C`` (``torch.ops.resnet_fused.*``) and its backend module.

CPU kernels (always run when the extension is built): outputs against the PyTorch formula computed here in
fp64, memory format, fake kernels and autograd registration (``opcheck``), fp64 ``gradcheck``, input checks,
build info. GPU kernels (``gpu`` mark): the vectorized and the scalar paths of both CUDA epilogues against the
same formulas, fp32 / fp16 / bf16.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("resnet_fused._C", reason="resnet_fused._C is not built (pip install --no-build-isolation -e .)")

from resnet_fused.backends import cuda as cuda_backend  # noqa: E402
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


def conv_bias_act_formula(x, w, b, stride, padding, dilation, groups, residual, sx, sw, ss, relu):
    """act(conv2d(x, W) + b + conv2d_1x1(shortcut_x, W_s) + residual) in fp64."""
    y = F.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups)
    if b is not None:
        y = y + _chan(b)
    if sx is not None:
        y = y + F.conv2d(sx.double(), sw.double(), None, ss)
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
FEATURES = ["bias", "bias_residual", "bias_shortcut", "all", "plain"]


def _conv_args(config, feature, dtype, mf, device="cpu", requires_grad=False, bias_dtype=None):
    C, K, H, W, k, s, p, d, g = config
    N = 2
    x = _rand(N, C, H, W, dtype=dtype, device=device, mf=mf, requires_grad=requires_grad)
    w = _rand(K, C // g, k, k, dtype=dtype, device=device, mf=mf, requires_grad=requires_grad)
    b = None
    if feature != "plain":
        b = _rand(K, dtype=bias_dtype or dtype, device=device, requires_grad=requires_grad)
    P = (H + 2 * p - d * (k - 1) - 1) // s + 1
    Q = (W + 2 * p - d * (k - 1) - 1) // s + 1
    residual = sx = sw = None
    if feature in ("bias_residual", "all"):
        residual = _rand(N, K, P, Q, dtype=dtype, device=device, mf=mf, requires_grad=requires_grad)
    ss = 1
    if feature in ("bias_shortcut", "all"):
        ss = 2
        Cs = 3
        sx = _rand(N, Cs, 2 * P - 1, 2 * Q, dtype=dtype, device=device, mf=mf, requires_grad=requires_grad)
        sw = _rand(K, Cs, 1, 1, dtype=dtype, device=device, requires_grad=requires_grad)
    return (x, w, b, [s, s], [p, p], [d, d], g, residual, sx, sw, [ss, ss]), (N, K, P, Q)


# ---------------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("config", CONV_CONFIGS.values(), ids=CONV_CONFIGS.keys())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_bias_act_cpu(dtype, fmt, config, feature, relu):
    torch.manual_seed(0)
    args, shape = _conv_args(config, feature, dtype, FORMATS[fmt])
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = ops.conv_bias_act(*args, relu)
    ref = conv_bias_act_formula(*args, relu)
    assert out.dtype == dtype
    _assert_format(out, args[0], shape)
    assert_close(out.double(), ref, dtype=dtype)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), "inputs must not be modified"


def test_conv_bias_act_cpu_bf16_with_fp32_bias():
    """bf16 activations with the bias in the fp32 accumulation dtype (how BN folding delivers it)."""
    torch.manual_seed(1)
    args, shape = _conv_args(CONV_CONFIGS["3x3_c3_k5_h7"], "all", torch.bfloat16, torch.channels_last,
                             bias_dtype=torch.float32)
    out = ops.conv_bias_act(*args, True)
    assert out.dtype == torch.bfloat16
    _assert_format(out, args[0], shape)
    ref = conv_bias_act_formula(*args, True)
    # The conv itself runs in bf16: compare with the error PyTorch's own bf16 conv makes, plus rounding.
    x, w = args[0], args[1]
    conv_err = (F.conv2d(x, w, None, 1, 1).double() - F.conv2d(x.double(), w.double(), None, 1, 1)).abs().max()
    torch.testing.assert_close(out.double(), ref, atol=2 * conv_err.item() + 5e-2, rtol=2e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_conv_bias_act_mixed_layouts(device, no_tf32):
    """channels_last x with an NCHW weight, a strided (non-dense) residual and an NCHW shortcut input: the output
    still follows x's layout and every operand is read through its own strides."""
    if device == "cuda":
        _needs_cuda_build()
    torch.manual_seed(16)
    x = _rand(2, 8, 6, 6, device=device, mf=torch.channels_last)
    w, b = _rand(16, 8, 3, 3, device=device), _rand(16, device=device)
    residual = _rand(2, 16, 6, 12, device=device)[..., ::2]
    sx, sw = _rand(2, 4, 11, 11, device=device), _rand(16, 4, 1, 1, device=device)
    args = (x, w, b, [1, 1], [1, 1], [1, 1], 1, residual, sx, sw, [2, 2])
    out = ops.conv_bias_act(*args, True)
    _assert_format(out, x, (2, 16, 6, 6))
    ref = conv_bias_act_formula(*args, True)
    assert_close(out.double(), ref, dtype=torch.float32)


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
    """The module-level API forwards ints / tuples and the optional arguments correctly."""
    torch.manual_seed(4)
    x, w, b = _rand(2, 4, 6, 6), _rand(8, 4, 3, 3), _rand(8)
    sx, sw = _rand(2, 3, 6, 6), _rand(8, 3, 1, 1)
    out = cuda_backend.conv_bias_act(x, w, b, stride=2, padding=1, shortcut_x=sx, shortcut_weight=sw,
                                     shortcut_stride=2)
    ref = conv_bias_act_formula(x, w, b, 2, 1, 1, 1, None, sx, sw, 2, True)
    assert_close(out.double(), ref, dtype=torch.float32)
    c, idn, s, t = _rand(2, 8, 3, 3), _rand(2, 8, 3, 3), _rand(8), _rand(8)
    assert_close(cuda_backend.scale_bias_add_relu(c, s, t, idn).double(),
                 scale_bias_add_relu_formula(c, s, t, idn, None, None), dtype=torch.float32)


# --------------------------------------------------------------------------------------- opcheck, autograd

OPCHECK_CONV = {
    "nchw_all": (CONV_CONFIGS["3x3_c3_k5_h7"], "all", torch.contiguous_format, True),
    "nhwc_shortcut_norelu": (CONV_CONFIGS["3x3_s2_dil2_c5"], "bias_shortcut", torch.channels_last, False),
    "nhwc_groups_plain": (CONV_CONFIGS["3x3_groups2"], "plain", torch.channels_last, True),
}


@pytest.mark.parametrize("case", OPCHECK_CONV.values(), ids=OPCHECK_CONV.keys())
def test_opcheck_conv_bias_act(case):
    torch.manual_seed(5)
    config, feature, mf, relu = case
    args, _ = _conv_args(config, feature, torch.float32, mf, requires_grad=True)
    torch.library.opcheck(ops.conv_bias_act.default, (*args, relu))


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


@pytest.mark.parametrize("feature, fmt", [("all", "nchw"), ("all", "nhwc"), ("bias_residual", "nhwc")])
def test_gradcheck_conv_bias_act(feature, fmt):
    torch.manual_seed(7)
    args, _ = _conv_args((3, 4, 5, 5, 3, 1, 1, 1, 1), feature, torch.float64, FORMATS[fmt], requires_grad=True)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]

    def fn(*ts):
        it = iter(ts)
        full = [next(it) if isinstance(a, torch.Tensor) else a for a in args]
        return ops.conv_bias_act(*full, True)

    assert torch.autograd.gradcheck(fn, tuple(tensors), fast_mode=True)


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
    x, w, b = _rand(2, 4, 6, 6), _rand(8, 4, 3, 3), _rand(8)
    return dict(x=x, weight=w, bias=b, stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, residual=None,
                shortcut_x=None, shortcut_weight=None, shortcut_stride=[1, 1], relu=True)


BAD_CONV = {
    "x_rank": (dict(x=_rand(4, 6, 6)), "x must be 4-D"),
    "channel_mismatch": (dict(weight=_rand(8, 3, 3, 3)), "x has 4 channels but weight expects 3"),
    "groups_mismatch": (dict(groups=3), "weight expects"),
    "weight_dtype": (dict(weight=_rand(8, 4, 3, 3, dtype=torch.float64)), "weight must have the dtype of x"),
    "bias_size": (dict(bias=_rand(7)), "bias must be 1-D of size K = 8"),
    "bias_dtype": (dict(bias=_rand(8, dtype=torch.float16)), "bias must have the dtype of x"),
    "residual_shape": (dict(residual=_rand(2, 8, 5, 6)), "residual must have the output shape"),
    "residual_dtype": (dict(residual=_rand(2, 8, 6, 6, dtype=torch.float64)), "residual must have the dtype"),
    "shortcut_alone": (dict(shortcut_x=_rand(2, 3, 6, 6)), "must be given together"),
    "shortcut_not_1x1": (dict(shortcut_x=_rand(2, 3, 6, 6), shortcut_weight=_rand(8, 3, 3, 3)),
                         r"shortcut_weight must be \[K, Cs, 1, 1\]"),
    "shortcut_spatial": (dict(shortcut_x=_rand(2, 3, 6, 6), shortcut_weight=_rand(8, 3, 1, 1),
                              shortcut_stride=[2, 2]), "shortcut conv output is 3x3"),
    "stride_zero": (dict(stride=[0, 1]), "stride must be >= 1"),
    "empty_output": (dict(padding=[0, 0], weight=_rand(8, 4, 7, 7)), "output would be empty"),
}


@pytest.mark.parametrize("case", BAD_CONV.values(), ids=BAD_CONV.keys())
def test_conv_bias_act_rejects_bad_input(case):
    override, message = case
    kwargs = {**_conv_ok(), **override}
    with pytest.raises(RuntimeError, match=message):
        ops.conv_bias_act(*kwargs.values())


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


# (conv config, N, feature, relu): the epilogue with each optional term; C multiples of 8 hit the NHWC vector path.
CONV_GPU_CASES = {
    "resnet_3x3_all": ((64, 64, 14, 14, 3, 1, 1, 1, 1), "all", True),
    "resnet_1x1_s2_shortcut": ((32, 64, 14, 14, 1, 2, 0, 1, 1), "bias_shortcut", True),
    "odd_c5_bias_residual": ((5, 5, 7, 7, 3, 1, 1, 1, 1), "bias_residual", True),
    "odd_no_relu": ((3, 5, 7, 7, 3, 2, 1, 1, 1), "bias", False),
    "plain_conv": ((16, 16, 8, 8, 3, 1, 1, 1, 1), "plain", False),
    "groups_dilation": ((16, 32, 9, 9, 3, 1, 2, 2, 4), "all", True),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CONV_GPU_CASES.values(), ids=CONV_GPU_CASES.keys())
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_bias_act_cuda(dtype, case, fmt, no_tf32):
    _needs_cuda_build()
    torch.manual_seed(12)
    config, feature, relu = case
    args, shape = _conv_args(config, feature, dtype, FORMATS[fmt], device="cuda")
    out = ops.conv_bias_act(*args, relu)
    assert out.dtype == dtype
    _assert_format(out, args[0], shape)
    # Same cuDNN convolutions in the op's dtype, epilogue in fp64: differences are the epilogue's rounding.
    x, w, b, st, pd, dl, g, res, sx, sw, ss = args
    y = F.conv2d(x, w, None, st, pd, dl, g).double()
    if b is not None:
        y = y + _chan(b)
    if sx is not None:
        y = y + F.conv2d(sx, sw, None, ss).double()
    if res is not None:
        y = y + res.double()
    ref = torch.relu(y) if relu else y
    assert_close(out.double(), ref, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_bias_act_cuda_fp32_bias_with_bf16(no_tf32):
    _needs_cuda_build()
    torch.manual_seed(13)
    args, _ = _conv_args((64, 64, 8, 8, 3, 1, 1, 1, 1), "all", torch.bfloat16, torch.channels_last, device="cuda",
                         bias_dtype=torch.float32)
    out = ops.conv_bias_act(*args, True)
    x, w, b, st, pd, dl, g, res, sx, sw, ss = args
    y = F.conv2d(x, w, None, st, pd, dl, g).double() + _chan(b) + F.conv2d(sx, sw, None, ss).double() + res.double()
    assert_close(out.double(), torch.relu(y), dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_grads_and_opcheck(no_tf32):
    _needs_cuda_build()
    torch.manual_seed(14)
    args, _ = _conv_args((16, 16, 8, 8, 3, 1, 1, 1, 1), "all", torch.float32, torch.channels_last, device="cuda",
                         requires_grad=True)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    out = ops.conv_bias_act(*args, True)
    x, w, b, st, pd, dl, g, res, sx, sw, ss = args
    ref = torch.relu(F.conv2d(x, w, b, st, pd, dl, g) + F.conv2d(sx, sw, None, ss) + res)
    go = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, tensors, go), torch.autograd.grad(ref, tensors, go)):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    torch.library.opcheck(ops.conv_bias_act.default, (*args, True))
    c = _rand(2, 16, 4, 4, device="cuda", mf=torch.channels_last, requires_grad=True)
    idn = _rand(2, 16, 4, 4, device="cuda", mf=torch.channels_last, requires_grad=True)
    params = [_rand(16, device="cuda", requires_grad=True) for _ in range(4)]
    torch.library.opcheck(ops.scale_bias_add_relu.default, (c, params[0], params[1], idn, params[2], params[3]))
