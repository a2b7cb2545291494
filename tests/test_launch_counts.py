"""Kernel launches per block on the Triton backend, Triton and ATen together, in eval, training forward and
training backward (issue 10's launch targets), counted on the interpreter.

Triton launches are counted by the launchers (``_launch.record``). ATen launches are counted by a
``TorchDispatchMode`` that sees every ATen op the block, autograd and the launchers run (the launchers are
called directly, not through their registered ops, so their own ATen ops show; the interpreter's copies while
it runs a Triton kernel are not counted); ops that launch no kernel (views, allocations without a fill,
metadata) are not counted. ``aten.convolution_backward`` — the data and weight gradients of the convolutions,
which the Triton backend leaves to cuDNN — is counted on its own.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused
from resnet_fused.backends import load

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_triton = load("triton")
_reason = _triton if isinstance(_triton, str) else _triton.unsupported(torch.empty(1, 1, 1, 1, device=DEVICE))
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"triton backend unavailable: {_reason}")

# ATen ops that launch no kernel: views, allocations without a fill, metadata.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
         "size", "stride", "sym_size", "sym_stride", "sym_numel", "is_contiguous", "_to_copy_noop", "set_"}


class _AtenLaunches(TorchDispatchMode):
    """Counts the ATen ops that launch a kernel, by name (not while ``paused``: a Triton kernel is running)."""

    def __init__(self):
        super().__init__()
        self.aten: dict[str, int] = {}
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.paused and func.namespace in ("aten", "prims") and not func.is_view and name not in _FREE:
            self.aten[name] = self.aten.get(name, 0) + 1
        return out


def _count(fn, monkeypatch):
    """(result, Triton launches, ATen launches by op name) of ``fn()``."""
    from resnet_fused.backends.triton import _launch

    mode = _AtenLaunches()
    wrap = _launch.wrap

    class _Paused:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                mode.paused = True
                try:
                    return wrap(self.kernel)[grid](*args, **kwargs)
                finally:
                    mode.paused = False
            return run

    monkeypatch.setattr(_launch, "wrap", _Paused)
    _triton.reset_launch_count()
    try:
        with _launch.direct(), mode:
            out = fn()
    finally:
        monkeypatch.setattr(_launch, "wrap", wrap)
    return out, _triton.launch_count(), mode.aten


def _bottleneck(downsample: bool, momentum=0.1):
    torch.manual_seed(0)
    inplanes, planes, stride = (8, 4, 2) if downsample else (16, 4, 1)
    ds = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                       nn.BatchNorm2d(planes * 4, momentum=momentum)) if downsample else None
    # channels_last weights, as a model converted with .to(memory_format=torch.channels_last) has them (NCHW
    # 3x3 weights would cost a layout copy per call)
    block = resnet_fused.Bottleneck(inplanes, planes, stride, ds, backend="triton").to(
        DEVICE, memory_format=torch.channels_last)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return block, torch.randn(2, inplanes, 5, 5, device=DEVICE).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
def test_bottleneck_eval_is_three_launches(downsample, monkeypatch):
    block, x = _bottleneck(downsample)
    block.eval()
    with torch.no_grad():
        block(x)  # steady state: the absent-operand scratch is allocated (zeroed) once per device and dtype
        _, triton_launches, aten = _count(lambda: block(x), monkeypatch)
    assert triton_launches == 3 and aten == {}, (triton_launches, aten)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
def test_bottleneck_training_launches(downsample, momentum, monkeypatch):
    """Issue 10's targets: forward ≤ 5 launches in all (conv kernels, the tail, no PyTorch op between them),
    backward ≤ 8 besides the convolution gradients.

    Forward: per convolution ONE launch — its output's statistics merged and its BatchNorm finalized (scale,
    shift, running statistics, num_batches_tracked, momentum=None's factor) inside it — then ONE tail kernel.

    Backward: ONE tail-backward kernel (its per-channel sums finished in the kernel), per convolution ONE
    BatchNorm backward through the statistics and the finalize (with the prologue's activation recomputed for
    the weight gradient in the same launch), for each convolution with the BN+ReLU prologue its one-pass
    backward; ATen: the convolution gradients and autograd's accumulation of the gradient of x, which feeds two
    branches."""
    block, x = _bottleneck(downsample, momentum)
    block.train()
    x.requires_grad_()
    convs = 3 + downsample
    block(x).sum().backward()  # steady state: the arrival counters' workspace is allocated (zeroed) once
    block.zero_grad(set_to_none=True)
    x.grad = None
    y, fwd_triton, fwd_aten = _count(lambda: block(x), monkeypatch)
    assert fwd_triton == convs + 1, fwd_triton
    assert fwd_aten == {}, fwd_aten

    dy = torch.randn_like(y)
    from resnet_fused.backends.triton import _launch
    _launch.counters(y, 1)  # the backward kernels' arrival counters: a workspace zeroed once per device and stream
    _, bwd_triton, bwd_aten = _count(lambda: y.backward(dy), monkeypatch)
    prologue_convs = 2  # conv2 and conv3 load relu(bn(.)) of the previous conv's output
    assert bwd_triton == 1 + convs + prologue_convs, bwd_triton
    assert bwd_aten.pop("convolution_backward") == convs
    assert bwd_aten == {"add": 1}, bwd_aten  # x's gradient from the block's two branches
    assert bwd_triton + sum(bwd_aten.values()) <= 8
    for p in block.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
