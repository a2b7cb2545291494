"""The cuDNN graph engine (csrc/cudnn/): one cuDNN fusion graph per ResNet conv with its BN / ReLU work.

The engine is reached through its test library ``torch.ops.resnet_fused_cudnn`` (registered when the extension
is built with the cudnn-frontend headers; ``build_info()["cudnn_frontend"]`` names the versions, None without it).

CPU tests (no GPU needed): every graph the engine builds — eval conv·scale+shift [+residual] [ReLU], the NormConv
forward with genstats [BN+ReLU prologue], dgrad with ReLU backward [prologue], dgrad + ReLU backward + BN backward
weights, wgrad [prologue] — is built from shapes alone (meta tensors) for each ResNet-50 conv layer in bf16 and fp16
channels_last, and must pass the frontend's validate() and cuDNN's own lowering to an operation graph (the steps
that need no device); a graph cuDNN refuses comes back as ok=False with the frontend's message, never an exception;
the engine refuses what it does not run (CPU tensors, fp64) and raises on contradictory arguments; the statistics'
exact route (genstats_mean_var) recovers channels whose fp32 Σ / Σ² cannot resolve their variance.

GPU tests (``gpu`` mark): each graph on CUDA against an fp64 PyTorch formula computed here — outputs, statistics at
channel means far from zero, every gradient — and the cache. A graph may be refused only where the cuDNN support
report (benchmarks/results/cudnn/, cuDNN's own plan build for an H100 of every graph these tests call) shows cuDNN
has no engine for it; any other refusal fails.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import cudnn_report  # noqa: E402  (the repository's benchmarks package)

pytest.importorskip("resnet_fused._C", reason="resnet_fused._C is not built (pip install --no-build-isolation -e .)")

from tolerances import TOL, assert_close

from resnet_fused.backends import cuda as cuda_backend

INFO = cuda_backend.build_info()
HAS_ENGINE = INFO.get("cudnn_frontend") is not None
needs_engine = pytest.mark.skipif(not HAS_ENGINE, reason="resnet_fused._C was built without the cuDNN frontend")

KINDS = ("conv_scale_bias_act", "conv_genstats", "conv_dgrad_drelu", "conv_dgrad_drelu_bn", "conv_wgrad")

# ResNet-50's distinct convolutions (torchvision v1.5: the stride on the 3x3): name -> (C, H, K, R, stride, padding).
RESNET50_CONVS = {
    "stem_7x7_s2": (3, 224, 64, 7, 2, 3),
    "l1_1x1_64_64": (64, 56, 64, 1, 1, 0),
    "l1_3x3_64": (64, 56, 64, 3, 1, 1),
    "l1_1x1_64_256": (64, 56, 256, 1, 1, 0),
    "l1_1x1_256_64": (256, 56, 64, 1, 1, 0),
    "l2_1x1_256_128": (256, 56, 128, 1, 1, 0),
    "l2_3x3_128_s2": (128, 56, 128, 3, 2, 1),
    "l2_3x3_128": (128, 28, 128, 3, 1, 1),
    "l2_1x1_128_512": (128, 28, 512, 1, 1, 0),
    "l2_down_256_512_s2": (256, 56, 512, 1, 2, 0),
    "l3_3x3_256_s2": (256, 28, 256, 3, 2, 1),
    "l3_1x1_1024_256": (1024, 14, 256, 1, 1, 0),
    "l3_down_512_1024_s2": (512, 28, 1024, 1, 2, 0),
    "l4_3x3_512_s2": (512, 14, 512, 3, 2, 1),
    "l4_3x3_512": (512, 7, 512, 3, 1, 1),
    "l4_1x1_512_2048": (512, 7, 2048, 1, 1, 0),
    "l4_down_1024_2048_s2": (1024, 14, 2048, 1, 2, 0),
}
BATCH = 32


def _ops():
    return torch.ops.resnet_fused_cudnn


# ---------------------------------------------------------------------------------------------------------------
# CPU: build information, graph construction, refusals, argument errors
# ---------------------------------------------------------------------------------------------------------------


def test_build_info_names_the_frontend():
    """build_info()["cudnn_frontend"] is "frontend <wheel version>, cuDNN <loaded cuDNN>" or None without it."""
    assert "cudnn_frontend" in INFO
    if not HAS_ENGINE:
        with pytest.raises((AttributeError, RuntimeError)):
            _ops().version()
        return
    v = torch.backends.cudnn.version()  # the cuDNN torch loaded, e.g. 92400
    cudnn = f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    expected = f"frontend {importlib.metadata.version('nvidia-cudnn-frontend')}, cuDNN {cudnn}"
    assert INFO["cudnn_frontend"].startswith(expected), INFO["cudnn_frontend"]
    assert _ops().version() == INFO["cudnn_frontend"]
    assert _ops().cache_capacity() > 0


@needs_engine
def test_available_matches_the_machine():
    assert _ops().available() == (torch.cuda.is_available() and torch.backends.cudnn.enabled)


def _variants(kind):
    """(prologue, residual, relu) combinations each graph kind builds."""
    if kind == "conv_scale_bias_act":
        return [(False, residual, relu) for residual in (False, True) for relu in (False, True)]
    if kind == "conv_dgrad_drelu_bn":
        return [(False, False, True)]
    return [(prologue, False, True) for prologue in (False, True)]


@needs_engine
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layer", list(RESNET50_CONVS))
def test_every_graph_validates_for_resnet50_layers(layer, dtype):
    c, h, k, r, stride, padding = RESNET50_CONVS[layer]
    for kind in KINDS:
        for prologue, residual, relu in _variants(kind):
            for vec_dtype in (torch.float32, dtype) if prologue or kind == "conv_scale_bias_act" else (None,):
                ok, reason = _ops().validate(kind, [BATCH, c, h, h], [k, c, r, r], dtype, [stride] * 2, [padding] * 2,
                                             [1, 1], 1, prologue=prologue, residual=residual, relu=relu,
                                             vec_dtype=vec_dtype)
                assert ok and reason == "", (kind, prologue, residual, relu, vec_dtype, reason)


@needs_engine
@pytest.mark.parametrize("kind", KINDS)
def test_odd_shapes_validate(kind):
    """Channels off the tile sizes, an odd spatial size, grouped and dilated convolutions, NCHW strides."""
    for x_shape, w_shape, stride, padding, dilation, groups, channels_last in [
        ([3, 24, 11, 11], [40, 24, 3, 3], 1, 1, 1, 1, True),
        ([2, 32, 9, 9], [32, 8, 3, 3], 2, 2, 2, 4, True),
        ([2, 16, 8, 8], [16, 16, 1, 1], 1, 0, 1, 1, False),
    ]:
        ok, reason = _ops().validate(kind, x_shape, w_shape, torch.bfloat16, [stride] * 2, [padding] * 2,
                                     [dilation] * 2, groups, channels_last=channels_last)
        assert ok, (x_shape, w_shape, reason)


@needs_engine
def test_refused_graph_returns_the_frontends_message():
    """A filter of more than 2^31 elements (16384·16384·3·3) is refused by the frontend's own validation: ok=False
    with its message and the graph's description, not an exception."""
    ok, reason = _ops().validate("conv_scale_bias_act", [1, 16384, 8, 8], [16384, 16384, 3, 3], torch.bfloat16,
                                 [1, 1], [1, 1])
    assert not ok
    assert "INT32_MAX" in reason and "conv_scale_bias_act bf16" in reason, reason


@needs_engine
def test_engine_refuses_what_it_does_not_run():
    """fp64 and CPU tensors are refused with a reason (the caller falls back), never an exception."""
    ok, reason = _ops().validate("conv_genstats", [2, 8, 6, 6], [8, 8, 3, 3], torch.float64, [1, 1], [1, 1])
    assert not ok and "Double" in reason, reason
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    w = torch.randn(4, 8, 3, 3).to(memory_format=torch.channels_last)
    y = torch.empty(2, 4, 6, 6).to(memory_format=torch.channels_last)
    ok, reason = _ops().conv_scale_bias_act(x, w, torch.rand(4) + 0.5, torch.randn(4), None, y, [1, 1], [1, 1],
                                            [1, 1], 1, True)
    assert not ok and "CUDA tensors" in reason, reason


@needs_engine
def test_contradictory_arguments_raise():
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(4, 8, 3, 3)
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    with pytest.raises(RuntimeError, match="y must have shape"):
        _ops().conv_scale_bias_act(x, w, scale, shift, None, torch.empty(2, 4, 5, 5), [1, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match="scale must be 1-D of size 4"):
        _ops().conv_scale_bias_act(x, w, torch.ones(8), shift, None, torch.empty(2, 4, 6, 6), [1, 1], [1, 1], [1, 1],
                                   1, True)
    with pytest.raises(RuntimeError, match="in_scale and in_shift must be given together"):
        _ops().conv_genstats(x, w, torch.ones(8), None, torch.empty(2, 4, 6, 6), torch.empty(4), torch.empty(4),
                             [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="unknown graph kind"):
        _ops().validate("conv_bias", [2, 8, 6, 6], [4, 8, 3, 3], torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# The statistics' exact route (CUDA-free ATen code: runs on CPU tensors too)
# ---------------------------------------------------------------------------------------------------------------


def _fp32_sums(c):
    """Σc and Σc² per channel, exact then rounded once to fp32: the best any fp32 genstats can return."""
    c64 = c.double()
    return c64.sum((0, 2, 3)).float(), c64.square().sum((0, 2, 3)).float()


@needs_engine
def test_ill_conditioned_channels_threshold():
    """v = q − m² against τ·q (τ = 2^-5): v/q = 0.05 is kept, 0.02 and a negative v are flagged, a zero channel and
    a centred one are kept."""
    count = 100
    m = torch.tensor([3.0, 3.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    q = torch.tensor([9.0 / 0.95, 9.0 / 0.98, 3.9, 0.0, 1.0], dtype=torch.float64)
    flags = _ops().ill_conditioned_channels((m * count).float(), (q * count).float(), count)
    assert flags.tolist() == [False, True, True, False, False]


# Per dtype of c: channel spreads for the means 0, 1, 1e2, 1e3, 1e4, -3e4 (bf16 ones wide enough that the stored
# values of every channel still differ).
FAR_MEAN_SPREADS = {
    torch.float32: [1.0, 0.5, 1.0, 2.0, 1.0, 0.1],
    torch.bfloat16: [1.0, 0.5, 1.0, 8.0, 64.0, 256.0],
}


@needs_engine
@pytest.mark.parametrize("dtype", list(FAR_MEAN_SPREADS), ids=["fp32", "bf16"])
def test_genstats_mean_var_recomputes_ill_conditioned_channels(dtype):
    """Channel means up to 3e4 times wider than their spreads: the bare formula q − m² on fp32 sums misses the
    float32 tolerance on the far channels (checked, so the case exercises the cancellation); genstats_mean_var
    flags exactly the channels below τ, recomputes them from c, and every channel's mean / variance meets the
    tolerance against fp64 statistics of c."""
    torch.manual_seed(0)
    means = torch.tensor([0.0, 1.0, 100.0, 1000.0, 1e4, -3e4])
    spreads = torch.tensor(FAR_MEAN_SPREADS[dtype])
    c = (torch.randn(4, 6, 5, 7) * spreads.view(1, -1, 1, 1) + means.view(1, -1, 1, 1)).to(dtype)
    c = c.contiguous(memory_format=torch.channels_last)
    s, sq = _fp32_sums(c)
    var_ref, mean_ref = torch.var_mean(c.double(), dim=(0, 2, 3), unbiased=False)
    count = c.numel() // c.shape[1]
    naive_var = (sq / count - (s / count) ** 2).double()
    rtol, _ = TOL[torch.float32]
    assert ((naive_var - var_ref).abs() > rtol * var_ref)[3:].all(), (naive_var, var_ref)
    mean, var = torch.empty(6), torch.empty(6)
    n = _ops().genstats_mean_var(c, s, sq, mean, var)
    flagged = _ops().ill_conditioned_channels(s, sq, count)
    q = sq.double() / count
    assert flagged.tolist() == ((q - (s.double() / count) ** 2) < q / 32).tolist()
    assert n == int(flagged.sum()) and flagged[3:].all() and not flagged[:2].any(), flagged
    assert_close(mean.double(), mean_ref, dtype=torch.float32)
    assert_close(var.double(), var_ref, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# GPU: each graph against an fp64 PyTorch formula
# ---------------------------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16]
# name -> (N, C, H, K, R, stride, padding): the cuDNN support report plans every graph these tests call on these shapes
# (formulation "gpu test"), and a test may accept a refusal only where the report shows one.
GPU_CONVS = cudnn_report.GPU_TEST_CONVS
EPS = 1e-5
# Per-channel statistics: cuDNN sums the fp32 accumulators before c is rounded, in its own order (the same allowance
# as tests/test_cuda_train.py's SUM_SCALE).
STAT_SCALE = 10.0
# The stem's input is the image: no BN + ReLU prologue before it and no gradient w.r.t. it.
INNER_CONVS = [name for name in GPU_CONVS if not name.startswith("7x7")]
PROLOGUE_CASES = [(conv, vec) for conv in GPU_CONVS for vec in ("fp32", "io", "none") if vec == "none" or
                  conv in INNER_CONVS]


def _require_gpu_engine():
    if not (torch.cuda.is_available() and HAS_ENGINE and _ops().available()):
        pytest.skip("needs a CUDA GPU and the cuDNN graph engine")


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _randn(*shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return _cl((torch.randn(*shape, device="cuda", dtype=torch.float64) * scale + offset).to(dtype)) \
        if len(shape) == 4 else (torch.randn(*shape, device="cuda", dtype=torch.float64) * scale + offset).to(dtype)


def _conv_case(name, dtype):
    n, c, h, k, r, stride, padding = GPU_CONVS[name]
    x = _randn(n, c, h, h, dtype=dtype)
    w = _randn(k, c, r, r, dtype=dtype, scale=(c * r * r) ** -0.5)
    p = (h + 2 * padding - r) // stride + 1
    return x, w, (n, k, p, p), [stride, stride], [padding, padding]


def _close(actual, expected, dtype):
    """The dtype's tolerance relative to the expected tensor's magnitude (sums and gradients of many terms)."""
    scale = expected.abs().max().clamp_min(1e-30)
    assert_close(actual.double() / scale, expected / scale, dtype=dtype)


# cuDNN's own plan build (heuristics, support check, plans) of every graph these GPU tests call, for an H100 and the
# cuDNN of the GPUs and of CI: benchmarks/results/cudnn/cudnn.json (python -m benchmarks.cudnn_report), rows of
# formulation "gpu test".
CUDNN_REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cudnn" / "cudnn.json"


def _report_rows():
    if not hasattr(_report_rows, "rows"):
        rows = json.loads(CUDNN_REPORT.read_text())["rows"] if CUDNN_REPORT.is_file() else []
        _report_rows.rows = [r for r in rows if r["formulation"] == "gpu test"]
    return _report_rows.rows


def _may_refuse(graph, conv, dtype, vec, relu=True, residual=False, layout="nhwc"):
    """Why cuDNN may refuse this call without that being a defect, or None: only where the cuDNN support report
    planned this very graph (graph, shapes, dtype, layout, vector dtype, prologue, flags) and cuDNN had no engine
    for it — on the cuDNN this process loaded, or on any cuDNN of the report when it does not cover that one. The
    refusal is then recorded as an xfail with cuDNN's reason; anywhere else a refusal fails the test.
    vec: "fp32" / "io" (the prologue's or eval's vectors in that dtype) or "none" (no prologue)."""
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    prologue = vec != "none" and graph != "conv_scale_bias_act"
    vec_dtype = name if vec == "io" else "fp32"
    major, rest = divmod(torch.backends.cudnn.version() or 0, 10000)
    loaded = f"{major}.{rest // 100}.{rest % 100}"
    rows = [r for r in _report_rows() if r["graph"] == graph and f"test.{conv}" in r["convs"] and r["dtype"] == name
            and r["layout"] == layout and r["vec_dtype"] == vec_dtype and r["prologue"] == prologue
            and (graph != "conv_scale_bias_act" or (r["relu"], r["residual"]) == (relu, residual))]
    mine = [r for r in rows if r["cudnn"] == loaded] or rows
    refused = [r for r in mine if r["status"] != "built"]
    if not refused:
        return None
    return f"cuDNN {refused[0]['cudnn']} has no engine for this graph on an H100 (benchmarks/results/cudnn/)"


def _no_engine_anywhere(graph, dtype):
    """Why cuDNN may refuse ``graph`` in ``dtype`` for any shape, or None: only where the cuDNN support report planned
    that graph in that dtype and cuDNN had an engine for none of its rows (e.g. genstats in bf16)."""
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    rows = json.loads(CUDNN_REPORT.read_text())["rows"] if CUDNN_REPORT.is_file() else []
    rows = [r for r in rows if r["graph"] == graph and r["dtype"] == name]
    if not rows or any(r["status"] == "built" for r in rows):
        return None
    return f"cuDNN has no engine for {graph} in {name} on an H100 (benchmarks/results/cudnn/, {len(rows)} rows)"


def _ok(result, allow_refusal_msg=None):
    ok, reason = result
    if not ok and allow_refusal_msg is not None:
        pytest.xfail(f"{allow_refusal_msg}: {reason}")
    assert ok, reason


def _operand(x, s, t):
    """The convolution's operand in fp64: x, or relu(x·s + t) rounded to x's dtype (the tensor cores' operand)."""
    if s is None:
        return x.double()
    a = (x.double() * s.double().view(1, -1, 1, 1) + t.double().view(1, -1, 1, 1)).relu()
    return a.to(x.dtype).double()


def _vec(n, dtype, positive=False):
    t = torch.rand(n, device="cuda", dtype=torch.float64) + 0.5 if positive else \
        torch.randn(n, device="cuda", dtype=torch.float64)
    return t.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("vec", ["fp32", "io"])
@pytest.mark.parametrize("relu,residual", [(True, True), (True, False), (False, False)],
                         ids=["relu_residual", "relu", "linear"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("conv", list(GPU_CONVS))
def test_gpu_conv_scale_bias_act(conv, dtype, relu, residual, vec):
    _require_gpu_engine()
    torch.manual_seed(1)
    x, w, out, stride, padding = _conv_case(conv, dtype)
    vdt = torch.float32 if vec == "fp32" else dtype
    scale, shift = _vec(out[1], vdt, positive=True), _vec(out[1], vdt)
    res = _randn(*out, dtype=dtype) if residual else None
    y = _cl(torch.empty(out, device="cuda", dtype=dtype))
    _ok(_ops().conv_scale_bias_act(x, w, scale, shift, res, y, stride, padding, [1, 1], 1, relu),
        _may_refuse("conv_scale_bias_act", conv, dtype, vec, relu=relu, residual=residual))
    ref = F.conv2d(x.double(), w.double(), None, stride, padding) * scale.double().view(1, -1, 1, 1) \
        + shift.double().view(1, -1, 1, 1)
    if residual:
        ref = ref + res.double()
    if relu:
        ref = ref.relu()
    assert_close(y.double(), ref, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("conv,vec", PROLOGUE_CASES)
def test_gpu_conv_genstats(conv, dtype, vec):
    """c = conv(relu(x·s + t) or x, w) against fp64; Σ / Σ² (of cuDNN's fp32 accumulators, before c's rounding) per
    channel relative to Σ|c| / Σc², their rounding scale, and mean / variance through the exact route against fp64
    statistics of the fp64 c (the channels here are well conditioned)."""
    _require_gpu_engine()
    torch.manual_seed(2)
    x, w, out, stride, padding = _conv_case(conv, dtype)
    s = t = None
    if vec != "none":
        vdt = torch.float32 if vec == "fp32" else dtype
        s, t = _vec(x.shape[1], vdt, positive=True), _vec(x.shape[1], vdt)
    c = _cl(torch.empty(out, device="cuda", dtype=dtype))
    total, sq_total = torch.empty(out[1], device="cuda"), torch.empty(out[1], device="cuda")
    _ok(_ops().conv_genstats(x, w, s, t, c, total, sq_total, stride, padding, [1, 1], 1),
        _may_refuse("conv_genstats", conv, dtype, vec))
    c_ref = F.conv2d(_operand(x, s, t), w.double(), None, stride, padding)
    assert_close(c.double(), c_ref, dtype=dtype)
    dims = (0, 2, 3)
    abs_sum, sq_ref = c_ref.abs().sum(dims), c_ref.square().sum(dims)
    assert_close(total.double() / abs_sum, c_ref.sum(dims) / abs_sum, dtype=torch.float32, scale=STAT_SCALE)
    assert_close(sq_total.double() / sq_ref, torch.ones_like(sq_ref), dtype=torch.float32, scale=STAT_SCALE)
    mean, var = torch.empty_like(total), torch.empty_like(total)
    _ops().genstats_mean_var(c, total, sq_total, mean, var)
    var_ref, mean_ref = torch.var_mean(c_ref, dim=dims, unbiased=False)
    assert_close(var.double(), var_ref, dtype=torch.float32, scale=STAT_SCALE)
    assert_close((mean.double() - mean_ref) / var_ref.sqrt(), torch.zeros_like(mean_ref), dtype=torch.float32,
                 scale=STAT_SCALE)


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [50.0, 100.0])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
def test_gpu_genstats_far_channel_means(dtype, ratio):
    """A 1x1 identity convolution (c = x exactly) of inputs with channel means of 1000 and spreads of 1000/ratio
    × [0.5, 2], over several tiles: every channel is ill-conditioned for fp32 Σ / Σ² (variance below 2^-5 of the
    mean square) and recomputed, and genstats_mean_var's statistics match fp64 statistics of c at the float32
    tolerance."""
    _require_gpu_engine()
    torch.manual_seed(3)
    n, ch, h, offset = 8, 64, 20, 1000.0
    spread = torch.linspace(0.5, 2.0, ch, device="cuda").view(1, -1, 1, 1) * (offset / ratio)
    x = _cl((torch.randn(n, ch, h, h, device="cuda") * spread + offset).to(dtype))
    w = _cl(torch.eye(ch, device="cuda").view(ch, ch, 1, 1).to(dtype))
    c = torch.empty_like(x)
    total, sq_total = torch.empty(ch, device="cuda"), torch.empty(ch, device="cuda")
    _ok(_ops().conv_genstats(x, w, None, None, c, total, sq_total, [1, 1], [0, 0], [1, 1], 1),
        _no_engine_anywhere("conv_genstats", dtype))
    assert torch.equal(c, x)
    mean, var = torch.empty_like(total), torch.empty_like(total)
    recomputed = _ops().genstats_mean_var(c, total, sq_total, mean, var)
    var_ref, mean_ref = torch.var_mean(c.double(), dim=(0, 2, 3), unbiased=False)
    assert recomputed == ch
    assert_close(var.double(), var_ref, dtype=torch.float32)
    assert_close(mean.double(), mean_ref, dtype=torch.float32, scale=0.1)


def _dgrad(x, w, dy, stride, padding):
    return torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), stride, padding)


@pytest.mark.gpu
@pytest.mark.parametrize("vec", ["fp32", "io", "none"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("conv", INNER_CONVS)
def test_gpu_conv_dgrad_drelu(conv, dtype, vec):
    """dx = dgrad(dy, w)·[z > 0], z = x·s + t or x; elements whose z is within 1e-3 of the ReLU's kink (where fp32 and
    fp64 may disagree on the sign) are left out of the comparison."""
    _require_gpu_engine()
    torch.manual_seed(4)
    x, w, out, stride, padding = _conv_case(conv, dtype)
    # Exact zeros: PyTorch's ReLU backward passes no gradient where the ReLU's input is exactly 0.
    x = _cl(x.masked_fill(torch.rand(x.shape, device="cuda") < 0.01, 0))
    dy = _randn(*out, dtype=dtype)
    s = t = None
    z = x.double()
    if vec != "none":
        vdt = torch.float32 if vec == "fp32" else dtype
        s, t = _vec(x.shape[1], vdt, positive=True), _vec(x.shape[1], vdt)
        z = x.double() * s.double().view(1, -1, 1, 1) + t.double().view(1, -1, 1, 1)
    dx = torch.empty_like(x)
    _ok(_ops().conv_dgrad_drelu(dy, w, x, s, t, dx, stride, padding, [1, 1], 1),
        _may_refuse("conv_dgrad_drelu", conv, dtype, vec))
    ref = _dgrad(x, w, dy, stride, padding) * (z > 0)
    far = z.abs() > 1e-3
    _close(dx.double()[far], ref[far], dtype)
    if vec == "none":
        assert (dx[x == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("conv", INNER_CONVS)
def test_gpu_conv_dgrad_drelu_bn(conv, dtype):
    """Against autograd through fp64 training-mode BatchNorm → ReLU → conv: g, dγ, dβ, and dx rebuilt from the
    equivalent scale / bias coefficients."""
    _require_gpu_engine()
    torch.manual_seed(5)
    x, w, out, stride, padding = _conv_case(conv, dtype)
    ch = x.shape[1]
    # Channel means away from zero in x and dy, so that the mean terms of BN's backward (eq_bias) weigh in.
    x = _cl((x.double() + torch.linspace(-1.0, 2.0, ch, device="cuda").view(1, -1, 1, 1)).to(dtype))
    dy = _randn(*out, dtype=dtype, offset=0.5)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    mean, invstd = mean64.float(), (var64 + EPS).rsqrt().float()
    gamma, beta = _vec(ch, torch.float32, positive=True), _vec(ch, torch.float32)
    g = torch.empty_like(x)
    coeffs = [torch.empty(ch, device="cuda") for _ in range(5)]
    _ok(_ops().conv_dgrad_drelu_bn(dy, w, x, mean, invstd, gamma, beta, g, *coeffs, stride, padding, [1, 1], 1),
        _may_refuse("conv_dgrad_drelu_bn", conv, dtype, "none"))
    dgamma, dbeta, eq_dy, eq_x, eq_b = coeffs

    x64 = x.double().requires_grad_()
    g64, b64 = gamma.double().requires_grad_(), beta.double().requires_grad_()
    bn = F.batch_norm(x64, None, None, g64, b64, training=True, eps=EPS)
    bn.retain_grad()
    a = bn.relu()
    F.conv2d(a, w.double(), None, stride, padding).backward(dy.double())
    far = bn.detach().abs() > 1e-3
    _close(g.double()[far], bn.grad[far], dtype)
    _close(dgamma, g64.grad, dtype)
    _close(dbeta, b64.grad, dtype)
    m = x.numel() // ch
    ga, iv, mu = gamma.double(), invstd.double(), mean.double()
    _close(eq_dy, ga * iv, dtype)
    _close(eq_x, -ga * iv * iv * g64.grad / m, dtype)
    _close(eq_b, ga * iv * (mu * iv * g64.grad - b64.grad) / m, dtype)
    dx = eq_dy.double().view(1, -1, 1, 1) * g.double() + eq_x.double().view(1, -1, 1, 1) * x.double() \
        + eq_b.double().view(1, -1, 1, 1)
    _close(dx, x64.grad, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("conv,vec", PROLOGUE_CASES)
def test_gpu_conv_wgrad(conv, dtype, vec):
    """dw = wgrad(dy, relu(x·s + t) or x) against fp64."""
    _require_gpu_engine()
    torch.manual_seed(6)
    x, w, out, stride, padding = _conv_case(conv, dtype)
    dy = _randn(*out, dtype=dtype)
    s = t = None
    if vec != "none":
        vdt = torch.float32 if vec == "fp32" else dtype
        s, t = _vec(x.shape[1], vdt, positive=True), _vec(x.shape[1], vdt)
    dw = torch.empty_like(w)
    _ok(_ops().conv_wgrad(dy, x, s, t, dw, stride, padding, [1, 1], 1), _may_refuse("conv_wgrad", conv, dtype, vec))
    ref = torch.nn.grad.conv2d_weight(_operand(x, s, t), w.shape, dy.double(), stride, padding)
    _close(dw, ref, dtype)


@pytest.mark.gpu
def test_gpu_nchw_is_right_or_refused():
    """NCHW tensors: cuDNN runs the graph correctly, or refuses it with a reason where the support report shows no
    engine for it; never a wrong answer."""
    _require_gpu_engine()
    torch.manual_seed(7)
    x, w, out, stride, padding = _conv_case("3x3_64", torch.bfloat16)
    x, w = x.contiguous(), w.contiguous()
    scale, shift = _vec(out[1], torch.float32, positive=True), _vec(out[1], torch.float32)
    y = torch.empty(out, device="cuda", dtype=torch.bfloat16)
    ok, reason = _ops().conv_scale_bias_act(x, w, scale, shift, None, y, stride, padding, [1, 1], 1, True)
    if not ok:
        assert reason, "a refusal must say why"
        allowed = _may_refuse("conv_scale_bias_act", "3x3_64", torch.bfloat16, "fp32", layout="nchw")
        assert allowed is not None, f"the support report shows an engine for this graph: {reason}"
        return
    ref = (F.conv2d(x.double(), w.double(), None, stride, padding) * scale.double().view(1, -1, 1, 1)
           + shift.double().view(1, -1, 1, 1)).relu()
    assert_close(y.double(), ref, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_fp32_follows_torchs_tf32_flag():
    _require_gpu_engine()
    x, w, out, stride, padding = _conv_case("3x3_64", torch.float32)
    scale, shift = _vec(out[1], torch.float32, positive=True), _vec(out[1], torch.float32)
    y = _cl(torch.empty(out, device="cuda"))
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        ok, reason = _ops().conv_scale_bias_act(x, w, scale, shift, None, y, stride, padding, [1, 1], 1, True)
        assert not ok and "TF32" in reason, reason
    finally:
        torch.backends.cudnn.allow_tf32 = before


@pytest.mark.gpu
def test_gpu_graph_cache_builds_once_per_key():
    _require_gpu_engine()
    _ops().cache_clear()
    x, w, out, stride, padding = _conv_case("1x1_64_256", torch.bfloat16)
    scale, shift = _vec(out[1], torch.float32, positive=True), _vec(out[1], torch.float32)
    y = _cl(torch.empty(out, device="cuda", dtype=torch.bfloat16))
    for _ in range(3):
        _ok(_ops().conv_scale_bias_act(x, w, scale, shift, None, y, stride, padding, [1, 1], 1, True))
    assert _ops().cache_size() == 1
    _ok(_ops().conv_scale_bias_act(x, w, scale, shift, None, y, stride, padding, [1, 1], 1, False))
    assert _ops().cache_size() == 2


@pytest.mark.gpu
def test_gpu_autotune_and_cache_bound_in_a_fresh_process():
    """RESNET_FUSED_CUDNN_AUTOTUNE=1 and RESNET_FUSED_CUDNN_CACHE_SIZE are read once per process, so in a fresh one:
    the autotuned first calls (every plan timed by cuDNN) give right results, and the cache keeps 2 of 3 graphs."""
    _require_gpu_engine()
    code = """
import sys
sys.path.insert(0, "tests")
import torch
import torch.nn.functional as F
from tolerances import assert_close
from resnet_fused.backends import cuda
cuda.build_info()
ops = torch.ops.resnet_fused_cudnn
torch.manual_seed(0)
cl = torch.channels_last
x = torch.randn(4, 64, 14, 14, device="cuda").to(torch.bfloat16).contiguous(memory_format=cl)
w = (torch.randn(64, 64, 3, 3, device="cuda") / 24).to(torch.bfloat16).contiguous(memory_format=cl)
scale, shift = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
y = torch.empty_like(x)
ref = F.conv2d(x.double(), w.double(), None, 1, 1) * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
for relu, residual in ((True, None), (False, None), (True, x)):
    ok, reason = ops.conv_scale_bias_act(x, w, scale, shift, residual, y, [1, 1], [1, 1], [1, 1], 1, relu)
    assert ok, reason
    expected = ref if residual is None else ref + x.double()
    assert_close(y.double(), expected.relu() if relu else expected, dtype=torch.bfloat16)
assert (ops.cache_capacity(), ops.cache_size()) == (2, 2), (ops.cache_capacity(), ops.cache_size())
print("ok")
"""
    env = dict(os.environ, RESNET_FUSED_CUDNN_AUTOTUNE="1", RESNET_FUSED_CUDNN_CACHE_SIZE="2")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0 and run.stdout.split()[-1] == "ok", run.stderr


@pytest.mark.gpu
def test_gpu_output_aliasing_an_input_is_refused():
    """y written over the residual it reads: refused with a reason (the caller falls back), not run."""
    _require_gpu_engine()
    x, w, out, stride, padding = _conv_case("3x3_64", torch.bfloat16)
    scale, shift = _vec(out[1], torch.float32, positive=True), _vec(out[1], torch.float32)
    res = _randn(*out, dtype=torch.bfloat16)
    before = res.clone()
    ok, reason = _ops().conv_scale_bias_act(x, w, scale, shift, res, res, stride, padding, [1, 1], 1, True)
    assert not ok and "overlaps" in reason, reason
    assert torch.equal(res, before)
