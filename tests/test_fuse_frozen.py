"""Frozen BatchNorms fused: torchvision's FrozenBatchNorm2d, and BatchNorm2d in eval mode with frozen parameters.

Both are a constant per-channel scale/shift, so a block whose norms all use running statistics takes the one-launch
eval path in training too, and its convolutions keep training: gradients reach the input and the conv weights, and
nothing frozen receives one or is updated. Every case is compared with torchvision computing the same thing
(float64 on the reference backend; float32 on the Triton interpreter, one tiny block) — outputs, input and weight
gradients — and the fused path is asserted to have run (the eager forward is made to fail). The eval form is read
from the live tensors on every call, so it follows ``load_state_dict`` and in-place edits at once.
"""

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused
from resnet_fused import backends, norm
from tolerances import assert_close
from torchvision_oracle import forbid_eager_fallback

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in backends.BACKENDS if b in resnet_fused.available_backends()]


def _randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial affine parameters and running statistics in every (frozen) BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                for t, (lo, hi) in ((m.weight, (0.5, 1.5)), (m.bias, (-0.5, 0.5)), (m.running_mean, (-0.3, 0.3)),
                                    (m.running_var, (0.5, 2.0))):
                    t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=gen))


def _frozen_block(kind: str, seed: int = 0) -> nn.Module:
    """A torchvision block with a stride-2 downsample, every norm a FrozenBatchNorm2d."""
    torch.manual_seed(seed)
    if kind == "basic":
        block = tv.BasicBlock(8, 16, 2, nn.Sequential(tv.conv1x1(8, 16, 2), FrozenBatchNorm2d(16)),
                              norm_layer=FrozenBatchNorm2d)
    else:
        block = tv.Bottleneck(8, 4, 2, nn.Sequential(tv.conv1x1(8, 16, 2), FrozenBatchNorm2d(16)),
                              norm_layer=FrozenBatchNorm2d)
    _randomize(block, seed)
    return block


def _train_step(model: nn.Module, x: torch.Tensor, lr: float = 0.1):
    """Forward in training mode, a weighted-sum loss, backward and one SGD step; returns (out, input grad)."""
    x = x.clone().requires_grad_()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)).sum().backward()
    opt.step()
    return out, x.grad


def test_frozen_batchnorm_never_uses_batch_statistics():
    bn = FrozenBatchNorm2d(4).train()
    assert not norm.uses_batch_stats(bn) and norm.is_frozen(bn) and norm.channels(bn) == 4
    assert norm.uses_batch_stats(nn.BatchNorm2d(4).train()) and not norm.uses_batch_stats(nn.BatchNorm2d(4).eval())

    class Subclass(FrozenBatchNorm2d):  # may change its forward: not the class fuse() knows
        pass

    assert not norm.is_frozen(Subclass(4))
    with pytest.warns(UserWarning, match="norm layer is a Subclass"):
        block = resnet_fused.fuse(tv.BasicBlock(4, 4, norm_layer=Subclass), backend="reference")
    assert "norm layer is a Subclass" in block._fusion_issue()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_frozen_block_matches_torchvision(kind, training):
    """Reference backend, float64: output, input and conv weight gradients, one SGD step; frozen buffers stay."""
    ref = _frozen_block(kind).double().train(training)
    fused = resnet_fused.fuse(copy.deepcopy(ref), backend="reference")
    forbid_eager_fallback(fused)
    buffers = {k: v.clone() for k, v in ref.named_buffers()}
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    out_ref, gx_ref = _train_step(ref, x)
    out, gx = _train_step(fused, x)
    assert_close(out, out_ref)
    assert_close(gx, gx_ref)
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        assert p.grad is not None, name
        assert_close(p.grad, p_ref.grad, msg=name)
        assert_close(p, p_ref, msg=name)  # after the step
    for name, b in fused.named_buffers():
        assert torch.equal(b, buffers[name]), f"{name} changed"
    with torch.no_grad():  # the trained conv weights are the ones the next call uses
        assert_close(fused(x), ref(x))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_frozen_block_on_the_fused_backends(backend):
    """The Triton interpreter on CPU (and the GPU backends on a GPU): one tiny frozen BasicBlock in training,
    forward and input/weight gradients against torchvision in float32."""
    ref = _frozen_block("basic").to(DEVICE).train()
    fused = resnet_fused.fuse(copy.deepcopy(ref), backend=backend)
    forbid_eager_fallback(fused)
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    scale = 1.0 if DEVICE == "cpu" else 100.0  # a GPU's convolutions round through TF32
    out_ref, gx_ref = _train_step(ref, x)
    out, gx = _train_step(fused, x)
    assert_close(out, out_ref, scale=scale)
    assert_close(gx, gx_ref, scale=scale)
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p.grad, p_ref.grad, scale=scale * 10, msg=name)


def test_batchnorm_in_eval_with_frozen_parameters_inside_a_training_model():
    """The fine-tuning recipe: model.train(), every BN put in eval and its parameters frozen. The blocks take the
    eval path; the convolutions train, the BNs get no gradient and their statistics stay."""
    torch.manual_seed(3)
    ref = tv.Bottleneck(8, 4, 2, nn.Sequential(tv.conv1x1(8, 16, 2), nn.BatchNorm2d(16))).double()
    with torch.no_grad():
        for bn in [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    ref.train()
    for bn in [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]:
        bn.eval().requires_grad_(False)
    fused = resnet_fused.fuse(copy.deepcopy(ref), backend="reference")
    forbid_eager_fallback(fused)
    buffers = {k: v.clone() for k, v in ref.named_buffers()}
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    out_ref, gx_ref = _train_step(ref, x)
    out, gx = _train_step(fused, x)
    assert_close(out, out_ref)
    assert_close(gx, gx_ref)
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        if ".bn" in f".{name}" or name.startswith("downsample.1"):
            assert p.grad is None and p_ref.grad is None, name
        else:
            assert_close(p.grad, p_ref.grad, msg=name)
    for name, b in fused.named_buffers():
        assert torch.equal(b, buffers[name]), f"{name} changed"


def test_frozen_resnet_trains_like_torchvision():
    """A whole frozen-BN ResNet (one BasicBlock per layer), stem included, fused: one SGD step, then eval."""
    torch.manual_seed(4)
    ref = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10, norm_layer=FrozenBatchNorm2d)
    _randomize(ref, 4)
    ref.double()
    fused = resnet_fused.fuse(copy.deepcopy(ref), backend="reference")
    forbid_eager_fallback(fused)
    assert fused._stem_issue() is None
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for model in (ref, fused):
        model.train()
    out_ref, gx_ref = _train_step(ref, x, lr=0.01)
    out, gx = _train_step(fused, x, lr=0.01)
    assert_close(out, out_ref)
    assert_close(gx, gx_ref, scale=10)
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p.grad, p_ref.grad, scale=max(1.0, p_ref.grad.abs().max().item()), msg=name)
    with torch.no_grad():
        assert_close(fused.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_eval_follows_load_state_dict_and_data_edits(backend):
    """No fold is ever stale: load_state_dict copies new values into the frozen buffers in place (no new
    tensors), .data edits bump no version counter; the next call sees both."""
    ref = _frozen_block("bottleneck").to(DEVICE).eval()
    fused = resnet_fused.fuse(copy.deepcopy(ref), backend=backend)
    forbid_eager_fallback(fused)
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    scale = 1.0 if DEVICE == "cpu" else 100.0
    with torch.no_grad():
        before = fused(x)
        assert_close(before, ref(x), scale=scale)
        other = _frozen_block("bottleneck", seed=1)
        state = {k: v.to(DEVICE) for k, v in other.state_dict().items()}
        buffer = fused.bn2.running_var
        for m in (ref, fused):
            m.load_state_dict(state)
        assert fused.bn2.running_var is buffer  # copied in place: the same tensor, new values
        after = fused(x)
        assert_close(after, ref(x), scale=scale)
        assert (after - before).abs().max() > 0.1
        for m in (ref, fused):
            m.bn3.running_mean.data.add_(0.5)
            m.downsample[1].weight.data.mul_(-2.0)
        assert_close(fused(x), ref(x), scale=scale)
