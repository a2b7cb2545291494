"""Running a torchvision module and its fused copy the same way, with torchvision in float64 as the oracle.

:func:`check_against_torchvision` runs one forward and the backward of a fixed output gradient three times —
torchvision in float64 (the oracle), torchvision in the precision under test (the measure of normal rounding)
and the fused module in that precision — and holds every result of the fused run (output, input gradient, each
parameter gradient, the BatchNorm buffers after a training step) to the rule of tolerances.py.

The output gradient is dense and random — of positive mean in eval (``1 + N(0, 1/4)``: per-channel sums then
carry a coherent signal that a few ReLU-kink flips inside the block do not drown), zero-mean in training (BN's
backward removes the mean, and a large one would cancel catastrophically in half precision) — and zero where the
oracle's final ReLU input lies within rounding of 0 for the precision under test: there a half-precision run may
take either side of the kink, which moves single gradient entries by the full upstream gradient — a difference
of ReLU's derivative, not of the computation under test.
"""

import contextlib
import copy

import torch
from torch import nn

import resnet_fused
from resnet_fused import backends
from tolerances import assert_close_to_oracle

# name: (dtype of the module and its input, autocast dtype or None)
PRECISIONS = {
    "fp64": (torch.float64, None),
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "amp-bf16": (torch.float32, torch.bfloat16),
    "amp-fp16": (torch.float32, torch.float16),
}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the convolutions run in, whose row of the tolerance table applies."""
    dtype, amp = PRECISIONS[precision]
    return amp or dtype


def randomize_bn(model: nn.Module, seed: int = 3) -> None:
    """Non-trivial BN parameters and running statistics, so that no BN is an identity (affine and tracked
    tensors only: a BN without them keeps its Nones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            c = m.num_features
            if m.affine:
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(0.5 * torch.randn(c, generator=gen))
            if m.running_mean is not None:
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)


def why_backend_cannot_run(backend: str, device, dtype: torch.dtype = torch.float32) -> str | None:
    """Why ``backend`` cannot run a block on ``device`` in ``dtype`` (it is not installed, or its ``unsupported``
    refuses such a tensor), or None when it can."""
    mod = backends.load(backend)
    return mod if isinstance(mod, str) else mod.unsupported(torch.empty(1, 1, 1, 1, device=device, dtype=dtype), 1, 1)


def forbid_eager_fallback(model: nn.Module) -> nn.Module:
    """Every fused block's eager fallback (torchvision's or timm's forward) raises, so a test of the fused path
    tests the fused path. ``model`` may itself be a fused block."""
    def no_eager(x):
        raise AssertionError("a fused block fell back to its eager forward")

    for m in model.modules():
        if isinstance(m, resnet_fused.models._FusedBlock):
            m._eager_forward = no_eager
    return model


def fused_copy(model: nn.Module, backend: str) -> nn.Module:
    """``resnet_fused.fuse`` of a copy of a torchvision model, its fallback forbidden."""
    return forbid_eager_fallback(resnet_fused.fuse(copy.deepcopy(model), backend=backend))


# Half-width of the band around a ReLU's kink, in units of the largest |input| of that ReLU, where the output
# gradient is zeroed: 16 unit roundoffs of the precision under test.
KINK_BAND = {dtype: 16 * torch.finfo(dtype).eps / 2 for dtype in (torch.float64, torch.float32, torch.bfloat16,
                                                                    torch.float16)}


def _output_grad(y: torch.Tensor, pre: torch.Tensor | None, training: bool,
                 kink_dtype: torch.dtype) -> torch.Tensor:
    """N(0, 1) in training, ``1 + N(0, 1/4)`` in eval, of y's shape, zero where the final ReLU's fp64 input ``pre``
    lies within ``kink_dtype``'s kink band (see the module docstring)."""
    grad = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    if not training:
        grad = 1.0 + 0.5 * grad
    if pre is not None and pre.shape == y.shape and torch.equal(torch.relu(pre), y.detach()):
        band = KINK_BAND[kink_dtype] * pre.abs().max()
        grad[(pre.abs() < band).cpu()] = 0.0
    return grad


def kink_free_input(model: nn.Module, shape: tuple[int, ...], precision: str, tries: int = 20) -> torch.Tensor:
    """A float64 N(0, 1) input of ``shape`` for which no ReLU of ``model`` (a whole network, in its mode) sees a
    nonzero float64 input within twice the kink band of ``precision``. The output gradient is zeroed only around
    the final ReLU's kinks (:func:`_output_grad`); behind a pooling and a classifier a flip at any inner ReLU
    moves whole gradient entries, by chance of the rounding order (e.g. the thread count). Exact zeros are left
    alone: they come from a branch that is exactly zero (``zero_init_residual``) on an identity, which the fused
    path reproduces exactly. Seeds 0, 1, ... are tried in turn; AssertionError if none of ``tries`` qualifies."""
    band = 2 * KINK_BAND[compute_dtype(precision)]
    probe = copy.deepcopy(model).double()
    margins: list[float] = []

    def margin(mod, args):
        a = args[0].abs()
        margins.append((a[a > 0].min() / a.max()).item())

    hooks = [m.register_forward_pre_hook(margin) for m in probe.modules() if isinstance(m, nn.ReLU)]
    try:
        for seed in range(tries):
            x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            margins.clear()
            with torch.no_grad():
                probe(x)
            if min(margins) > band:
                return x
    finally:
        for hook in hooks:
            hook.remove()
    raise AssertionError(f"no kink-free input of shape {shape} in {tries} seeds")


def results(model: nn.Module, x: torch.Tensor, precision: str, device, grad: torch.Tensor | None = None,
            input_grad: bool = True, kink_dtype: torch.dtype | None = None,
            backward: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One forward and the backward of ``grad`` in ``precision`` (the model converted in place, input
    channels_last): output, input gradient (when ``input_grad``), every parameter gradient and, in training, the
    floating-point buffers, all in float64; and the gradient used. Without ``grad`` (the oracle's run) it is made
    here, with the kink band of ``kink_dtype``; ``backward=False``: the output alone. A compiled model's parameters
    carry the names of the module it compiled."""
    dtype, amp = PRECISIONS[precision]
    device = torch.device(device)
    model.to(device, dtype)
    inner = getattr(model, "_orig_mod", model)
    xi = x.to(device, dtype).contiguous(memory_format=torch.channels_last).requires_grad_(input_grad and backward)
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().double().clone()))
             for m in inner.modules() if isinstance(m, nn.ReLU)] if grad is None and backward else []
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with autocast, torch.set_grad_enabled(backward):
        y = model(xi)
    for hook in hooks:
        hook.remove()
    if amp is not None:
        assert y.dtype == amp, f"autocast to {amp} returned {y.dtype}"
    out = {"output": y}
    if backward:
        if grad is None:
            grad = _output_grad(y.double(), seen[-1] if seen else None, inner.training, kink_dtype or dtype)
        y.backward(grad.to(device, y.dtype))
        if input_grad:
            out["input grad"] = xi.grad
        out.update({f"grad of {n}": p.grad for n, p in inner.named_parameters()})
    if inner.training:
        out.update({n: b for n, b in inner.named_buffers() if b.is_floating_point()})
    return {k: v.detach().double() for k, v in out.items()}, grad


def by_stage(name: str) -> str:
    """Group key of a result of a whole model: its stage (``grad of layer3.0.bn1.bias`` -> ``grad of layer3``)."""
    what, _, path = name.rpartition(" ")
    return f"{what} {path.split('.')[0]}".strip()


def _grouped(res: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    if group is None:
        return res
    out: dict[str, list[torch.Tensor]] = {}
    for name, t in res.items():
        out.setdefault(group(name), []).append(t.flatten())
    return {k: torch.cat(v) for k, v in out.items()}


def check_against_torchvision(model: nn.Module, fused: nn.Module, x: torch.Tensor, precision: str,
                              device, group=None, input_grad: bool = True, backward: bool = True) -> None:
    """Each result of ``fused`` in ``precision`` is within twice the error of torchvision's ``model`` in the same
    precision, against torchvision in float64 (``model`` itself is not changed). ``group`` maps a result's name to
    a group key; the results of a group are compared as one tensor (e.g. :func:`by_stage` for a whole model in
    bf16 training, where single small tensors' gradients are as uncertain in PyTorch's own run as they are
    large). ``input_grad=False``: the input needs no gradient (a whole model's, as in training);
    ``backward=False``: outputs only."""
    kink = compute_dtype(precision)
    oracle, grad = results(copy.deepcopy(model), x, "fp64", device, None, input_grad, kink, backward)
    eager, _ = results(copy.deepcopy(model), x, precision, device, grad, input_grad, kink, backward)
    actual, _ = results(fused, x, precision, device, grad, input_grad, kink, backward)
    oracle, eager, actual = (_grouped(r, group) for r in (oracle, eager, actual))
    assert actual.keys() == oracle.keys()
    for name, want in oracle.items():
        assert_close_to_oracle(actual[name], eager[name], want, compute_dtype(precision), what=name)
