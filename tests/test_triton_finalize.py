"""The Triton training convolution that finalizes its BatchNorm in its own launch (``conv2d_bn_train`` /
``conv_bn_train``): batch statistics, scale/shift, running statistics and ``num_batches_tracked`` against
``torch.nn.BatchNorm2d`` on the fp64 convolution computed here; the two-level merge of last-arriving programs
with several merge groups; the arrival counters left at zero; bit-reproducibility; gradients against autograd
of the same formula; bad input; opcheck; torch.compile. CPU runs use the Triton interpreter (tiny shapes)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_fused.backends.reference import TrainBN
from resnet_fused.backends.triton import _launch, conv, train
from tolerances import assert_close, assert_close_at_scale

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SUM_SCALE = 10.0  # per-channel sums over N·H·W values round differently from PyTorch's reduction order


def _counters_clear():
    return all(int(buf.abs().max()) == 0 for buf in _launch._COUNTERS.values())


def _reference_bn(k, momentum, affine, track, running_dtype, nbt=3):
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(k, momentum=momentum, affine=affine, track_running_stats=track).to(DEVICE)
    if affine:
        bn.weight.data = torch.rand(k, device=DEVICE) + 0.5
        bn.bias.data = torch.randn(k, device=DEVICE)
    if track:
        bn.running_mean.copy_(torch.randn(k, device=DEVICE))
        bn.running_var.copy_(torch.rand(k, device=DEVICE) + 0.5)
        bn.num_batches_tracked.fill_(nbt)
        bn.running_mean.data = bn.running_mean.to(running_dtype)
        bn.running_var.data = bn.running_var.to(running_dtype)
    return bn


def _spec(bn):
    update = bn.training and bn.track_running_stats
    return TrainBN(bn.weight if bn.affine else None, bn.bias if bn.affine else None,
                   bn.running_mean if update else None, bn.running_var if update else None,
                   bn.num_batches_tracked if update else None, bn.momentum, bn.eps)


def _inputs(prologue, n=4, c=4, hw=12, k=8, fmt=torch.channels_last, dtype=torch.float32):
    torch.manual_seed(2)
    # channels whose mean is several times their spread: the merge must not lose the variance
    x = (torch.randn(n, c, hw, hw, device=DEVICE) * 2 + 3).to(dtype=dtype, memory_format=fmt)
    w = torch.randn(k, c, 3, 3, device=DEVICE).to(dtype)
    s_in = torch.rand(c, device=DEVICE) + 0.5 if prologue else None
    t_in = torch.randn(c, device=DEVICE) if prologue else None
    return x, w, s_in, t_in


def _conv_ref(x, w, s_in, t_in, stride=1):
    a = x.double()
    if s_in is not None:
        a = torch.relu(a * s_in.double().view(1, -1, 1, 1) + t_in.double().view(1, -1, 1, 1))
    return F.conv2d(a, w.double(), stride=stride, padding=1)


@pytest.mark.parametrize("merge_tiles", [32, 2, 1], ids=["one-group", "groups-of-2", "groups-of-1"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn_relu_prologue"])
def test_matches_batchnorm(merge_tiles, momentum, prologue, monkeypatch):
    """c, mean, var, scale, shift and the running statistics and num_batches_tracked after one training step
    equal BatchNorm2d's on the fp64 convolution; 5 row tiles merged in one group or in groups of 2 and 1 (the
    second-level merge then combines 3 or 5 groups, the last one partial)."""
    monkeypatch.setattr(conv, "MERGE_TILES", merge_tiles)
    x, w, s_in, t_in = _inputs(prologue)  # 4·12·12 = 576 rows: 5 tiles of 128
    bn = _reference_bn(8, momentum, True, True, torch.float32)
    ref_bn = _reference_bn(8, momentum, True, True, torch.float32).double()
    c, mean, var, scale, shift = conv.conv2d_bn_train(x, w, _spec(bn), 1, 1, in_scale=s_in, in_shift=t_in)
    ref = _conv_ref(x, w, s_in, t_in)
    expected = ref_bn(ref)

    assert_close(c, ref.to(c.dtype))
    assert_close(mean, ref.mean((0, 2, 3)).float(), scale=SUM_SCALE)
    assert_close(var, ref.var((0, 2, 3), unbiased=False).float(), scale=SUM_SCALE)
    assert_close(c.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1),
                 expected, torch.float32, scale=SUM_SCALE)
    assert_close(bn.running_mean, ref_bn.running_mean.float(), scale=SUM_SCALE)
    assert_close(bn.running_var, ref_bn.running_var.float(), scale=SUM_SCALE)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 4
    assert _counters_clear()


@pytest.mark.parametrize("affine,track,running_dtype", [(False, True, torch.float32), (True, False, None),
                                                        (True, True, torch.bfloat16)],
                         ids=["no-affine", "no-running-stats", "bf16-running-stats"])
def test_batchnorm_variants(affine, track, running_dtype):
    x, w, s_in, t_in = _inputs(True, n=2, hw=7)
    bn = _reference_bn(8, 0.1, affine, track, running_dtype)
    # torch's BatchNorm takes no bf16 running statistics with fp32 input: the reference keeps them in fp32, from
    # the same (bf16-representable) starting values
    ref_bn = _reference_bn(8, 0.1, affine, track, running_dtype)
    if track:
        ref_bn.running_mean.data = ref_bn.running_mean.float()
        ref_bn.running_var.data = ref_bn.running_var.float()
    c, mean, var, scale, shift = conv.conv2d_bn_train(x, w, _spec(bn), 1, 1, in_scale=s_in, in_shift=t_in)
    ref = _conv_ref(x, w, s_in, t_in)
    expected = ref_bn(ref.float())
    assert_close(c.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1),
                 expected.double(), torch.float32, scale=SUM_SCALE)
    if track:
        assert bn.running_mean.dtype == running_dtype
        assert_close(bn.running_mean.float(), ref_bn.running_mean, running_dtype, scale=SUM_SCALE)
        assert_close(bn.running_var.float(), ref_bn.running_var, running_dtype, scale=SUM_SCALE)
        assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype, interpreter_rounds_bf16_to_nearest):
    x, w, s_in, t_in = _inputs(True, n=2, hw=7, dtype=dtype)
    bn = _reference_bn(8, 0.1, True, True, torch.float32)
    ref_bn = _reference_bn(8, 0.1, True, True, torch.float32).double()
    c, mean, var, scale, shift = conv.conv2d_bn_train(x, w, _spec(bn), 1, 1, in_scale=s_in, in_shift=t_in)
    assert c.dtype == dtype and scale.dtype == torch.float32
    ref = _conv_ref(x, w, s_in, t_in)
    assert_close(c, ref.to(dtype))
    # the statistics are those of the fp32 accumulator c rounds from: the fp64 convolution's up to fp32 summation
    ref_bn(ref)
    assert_close(mean, ref.mean((0, 2, 3)).float(), scale=SUM_SCALE)
    assert_close(var, ref.var((0, 2, 3), unbiased=False).float(), scale=SUM_SCALE)
    assert_close(bn.running_var, ref_bn.running_var.float(), scale=SUM_SCALE)


def test_bit_reproducible():
    """The merges run in row order whichever program arrives last: two runs give the same bits."""
    x, w, s_in, t_in = _inputs(True)
    outs = []
    for _ in range(2):
        bn = _reference_bn(8, 0.1, True, True, torch.float32)
        outs.append(conv.conv2d_bn_train(x, w, _spec(bn), 1, 1, in_scale=s_in, in_shift=t_in)
                    + (bn.running_mean.clone(), bn.running_var.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_gradients_match_autograd(momentum):
    """conv_bn_train's gradients in x, weight, in_scale, in_shift, γ and β through c, scale and shift equal
    autograd of the fp64 formula."""
    x, w, s_in, t_in = _inputs(True, n=2, hw=7, fmt=torch.contiguous_format)
    bn = _reference_bn(8, momentum, True, True, torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, s_in, t_in, bn.weight, bn.bias)]
    spec = _spec(bn)._replace(weight=leaves[4], bias=leaves[5])
    c, scale, shift = train.conv_bn_train(leaves[0], leaves[1], spec, 1, 1, in_scale=leaves[2], in_shift=leaves[3])
    torch.manual_seed(3)
    gc, gs, gt = torch.randn_like(c), torch.randn_like(scale), torch.randn_like(shift)
    grads = torch.autograd.grad((c * gc).sum() + (scale * gs).sum() + (shift * gt).sum(), leaves)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rw, rs, rt, rg, rb = ref_leaves
    rc = _conv_ref(rx, rw, rs, rt)
    rc = F.conv2d(torch.relu(rx * rs.view(1, -1, 1, 1) + rt.view(1, -1, 1, 1)), rw, padding=1)
    mean, var = rc.mean((0, 2, 3)), rc.var((0, 2, 3), unbiased=False)
    rscale = rg / torch.sqrt(var + bn.eps)
    rshift = rb - mean * rscale
    expected = torch.autograd.grad((rc * gc.double()).sum() + (rscale * gs.double()).sum()
                                   + (rshift * gt.double()).sum(), ref_leaves)
    for g, e in zip(grads, expected):
        assert_close_at_scale(g, e.to(g.dtype), factor=SUM_SCALE)
    assert _counters_clear()


def test_one_value_per_channel_raises_before_updating():
    x = torch.randn(1, 4, 1, 1, device=DEVICE)
    w = torch.randn(8, 4, 1, 1, device=DEVICE)
    bn = _reference_bn(8, 0.1, True, True, torch.float32)
    before = bn.running_mean.clone()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        with torch.no_grad():
            nn.BatchNorm2d(8).to(DEVICE).train()(torch.randn(1, 8, 1, 1, device=DEVICE))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        train.conv_bn_train(x, w, _spec(bn), 1, 0)
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 3


def test_bad_inputs():
    x, w, _, _ = _inputs(False, n=2, hw=5)
    bn = _spec(_reference_bn(8, 0.1, True, True, torch.float32))
    with pytest.raises(TypeError, match="TrainBN"):
        conv.conv2d_bn_train(x, w, object(), 1, 1)
    with pytest.raises(ValueError, match="running_mean must be a contiguous floating-point vector of 8"):
        conv.conv2d_bn_train(x, w, bn._replace(running_mean=torch.zeros(7, device=DEVICE)), 1, 1)
    with pytest.raises(ValueError, match="go together"):
        conv.conv2d_bn_train(x, w, bn._replace(bias=None), 1, 1)
    with pytest.raises(ValueError, match="num_batches_tracked must be one int64"):
        conv.conv2d_bn_train(x, w, bn._replace(num_batches_tracked=torch.zeros(1, dtype=torch.int32,
                                                                                device=DEVICE)), 1, 1)
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        conv.conv2d_bn_train(x, w, bn._replace(momentum=None, num_batches_tracked=None), 1, 1)
    with pytest.raises(ValueError, match="weight expects"):
        conv.conv2d_bn_train(x, w[:, :3], bn, 1, 1)


def test_op_passes_opcheck():
    x, w, s_in, t_in = _inputs(True, n=2, hw=5)
    for momentum, cumulative in ((0.1, False), (0.0, True)):
        bn = _reference_bn(8, 0.1, True, True, torch.float32)
        torch.library.opcheck(torch.ops.resnet_fused.triton_conv2d_bn_train.default,
                              (x, w, [1, 1], [1, 1], [1, 1], 1, s_in, t_in, bn.weight.detach(), bn.bias.detach(),
                               bn.running_mean, bn.running_var, bn.num_batches_tracked, momentum, cumulative, 1e-5))


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces conv_bn_train (a mutating op) with the tail, forward and backward: the
    same output, gradients and running statistics as eager."""
    x, w, s_in, t_in = _inputs(True, n=2, hw=5)
    results = []
    for compiled in (False, True):
        bn = _reference_bn(8, None, True, True, torch.float32)
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, s_in, t_in)]
        idn = torch.randn(2, 8, 5, 5, device=DEVICE)

        def step(x, w, s, t):
            c, scale, shift = train.conv_bn_train(x, w, _spec(bn), 1, 1, in_scale=s, in_shift=t)
            return train.scale_bias_add_relu(c, scale, shift, idn)

        fn = torch.compile(step, fullgraph=True) if compiled else step
        out = fn(*leaves)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        results.append((out, *grads, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()))
    for a, b in zip(*results):
        if a.is_floating_point():
            assert_close(a, b, scale=SUM_SCALE)
        else:
            assert torch.equal(a, b)
