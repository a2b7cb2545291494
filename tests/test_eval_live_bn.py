"""Eval never serves stale weights: every fused eval forward computes its BatchNorms' scale and shift from the
live tensors, so edits that bump no version counter (``.data`` writes, as old-style init, pruning and EMA code
makes), ``load_state_dict(assign=True)`` and parametrized weights are all seen by the next call.

Each case edits a torchvision model and the fused model the same way and compares them, on every backend this
machine runs (CPU: reference and the Triton interpreter; GPU: also cuda).
"""

import copy

import pytest
import torch
import torchvision.models.resnet as tv
from torch import nn
from torch.nn.utils import parametrize

import resnet_fused
from resnet_fused import backends
from tolerances import assert_close
from torchvision_oracle import fused_copy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in backends.BACKENDS if b in resnet_fused.available_backends()]


def _randomize_bn(model: nn.Module) -> None:
    """Random affine parameters and running statistics, so that no BN is the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def _pair(kind: str, backend: str):
    """(torchvision block, fused copy) with a downsample, in eval mode, on DEVICE."""
    torch.manual_seed(0)
    if kind == "basic":
        ref = tv.BasicBlock(8, 16, 2, nn.Sequential(tv.conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
    else:
        ref = tv.Bottleneck(8, 4, 2, nn.Sequential(tv.conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
    _randomize_bn(ref)
    ref = ref.to(DEVICE).eval()
    fused = fused_copy(ref, backend)
    return ref, fused


def _x():
    return torch.randn(2, 8, 7, 7, device=DEVICE)


def _edit_both(ref, fused, edit):
    for m in (ref, fused):
        edit(m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_data_edits_of_weights_buffers_and_shortcut(kind, backend):
    ref, fused = _pair(kind, backend)
    x = _x()
    edits = [
        lambda m: m.conv1.weight.data.mul_(2.0),
        lambda m: m.bn2.running_var.data.mul_(3.0),
        lambda m: m.bn1.weight.data.neg_(),
        lambda m: m.bn1.bias.data.add_(0.5),
        lambda m: m.bn2.running_mean.data.add_(1.0),
        lambda m: m.downsample[0].weight.data.mul_(-0.5),
        lambda m: m.downsample[1].running_mean.data.sub_(0.7),
        lambda m: m.downsample[1].weight.data.mul_(4.0),
    ]
    with torch.no_grad():
        before = fused(x)
        assert_close(before, ref(x))
        for edit in edits:
            _edit_both(ref, fused, edit)
            out = fused(x)
            assert_close(out, ref(x))
        assert (out - before).abs().max() > 0.1  # the edits changed the answer, and it was seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_updated_the_old_way_is_seen_after_every_update(backend):
    """An EMA model updated through .data (no version bump) and evaluated after each update."""
    ref, ema = _pair("basic", backend)
    torch.manual_seed(1)
    online = copy.deepcopy(ref).train()
    x = _x()
    decay = 0.5
    opt = torch.optim.SGD(online.parameters(), lr=0.5)
    for step in range(3):
        online(torch.randn(4, 8, 7, 7, device=DEVICE)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        for model in (ref, ema):
            for p_ema, p in zip(model.parameters(), online.parameters()):
                p_ema.data.mul_(decay).add_(p.data, alpha=1 - decay)
            for b_ema, b in zip(model.buffers(), online.buffers()):
                b_ema.data.copy_(b.data)
        with torch.no_grad():
            assert_close(ema(x), ref(x), msg=f"step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_with_assign(backend):
    ref, fused = _pair("bottleneck", backend)
    x = _x()
    with torch.no_grad():
        fused(x)
        torch.manual_seed(2)
        other = tv.Bottleneck(8, 4, 2, nn.Sequential(tv.conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
        _randomize_bn(other)
        state = {k: v.to(DEVICE) for k, v in other.state_dict().items()}
        ref.load_state_dict(state, assign=True)
        fused.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        assert fused.conv2.weight.data_ptr() != ref.conv2.weight.data_ptr()
        assert_close(fused(x), ref(x))


class _Scaled(nn.Module):
    """A parametrization ``W -> W·factor`` whose factor can change between calls."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("factor", torch.tensor(1.0))

    def forward(self, w):
        return w * self.factor


@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrized_conv_weight_is_fused_and_live(backend):
    ref, fused = _pair("basic", backend)
    x = _x()
    for m in (ref, fused):
        parametrize.register_parametrization(m.conv2, "weight", _Scaled().to(DEVICE))
    with torch.no_grad():
        assert_close(fused(x), ref(x))
        for m in (ref, fused):
            m.conv2.parametrizations.weight[0].factor.fill_(-1.5)
        assert_close(fused(x), ref(x))
    # gradients reach the original weight through the parametrization
    x_r, x_f = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x_r).square().sum().backward()
    fused(x_f).square().sum().backward()
    assert_close(x_f.grad, x_r.grad, scale=10)
    assert_close(fused.conv2.parametrizations.weight.original.grad,
                 ref.conv2.parametrizations.weight.original.grad, scale=10)

