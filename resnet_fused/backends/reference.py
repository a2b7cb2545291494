"""Reference backend: every fused op of resnet_fused in plain PyTorch.

This module is the oracle. Tests compare the Triton and CUDA backends against it, CPU tensors run through it,
and its backward passes spell out the math those kernels implement. Each op is a
``torch.autograd.Function`` that follows the NormConv scheme of the design notes: forward saves only the
op's inputs, the raw convolution output and per-channel statistics; backward recomputes every normalized or
activated tensor it needs instead of keeping it alive between forward and backward.

Ops (all differentiable w.r.t. every tensor argument):

* ``conv_bn_act``  eval path, BN applied in the epilogue from its live tensors (never a folded copy):
  ``y = act(conv(x, W)·s + t [+ residual] [+ conv1x1(x_d, W_d)·s_d + t_d])`` with ``s = γ/√(σ²+ε)``,
  ``t = β − μ·s`` computed in the accumulation dtype on every call (:class:`EvalBN`, :class:`Shortcut`)
* ``conv_stats``  training path: ``c = conv(a, W)`` with ``a = relu(x*s + t)`` (the previous BN+ReLU,
  applied on load) or ``a = x``; returns ``c`` and its per-channel mean and biased variance.
* ``scale_bias_add_relu``  training tail: ``relu(c*s + t + idn)`` or ``relu(c*s + t + c_d*s_d + t_d)``.
* ``bn_relu``  a BatchNorm (as scale/shift) + ReLU on its own: ``relu(x*s + t)`` (the stem in training).

Per-channel vectors (bias, scale, shift, mean, var) are kept in the accumulation dtype: float32, or float64
for float64 inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

NAME = "reference"

_CHANNEL_DIMS = (0, 2, 3)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-channel statistics and epilogues are computed in for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_tracing(x: Tensor) -> bool:
    """Whether a call on ``x`` is being traced, not run: under torch.compile, or on fake tensors (AOTAutograd
    tracing a backward, where some torch versions do not report compiling)."""
    return torch.compiler.is_compiling() or is_fake(x)


def check_batch_size(count: int, shape: torch.Size) -> None:
    """PyTorch's error for a training BatchNorm over ``count == 1`` value per channel (``shape``: its input's)."""
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")


def memory_format(t: Tensor) -> torch.memory_format:
    """channels_last when ``t`` is laid out so (and not also plain contiguous), else contiguous NCHW: the
    layout every fused op gives its output, as PyTorch's convolutions do."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def unsupported(x: Tensor, groups: int = 1, dilation: int = 1) -> str | None:
    """The reference backend runs every floating-point input on every device."""
    if not x.is_floating_point():
        return f"expected a floating-point input, got {x.dtype}"
    return None


def _chan(v: Tensor) -> Tensor:
    """View a per-channel vector [C] so it broadcasts over NCHW."""
    return v.view(1, -1, 1, 1)


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: ``t`` itself when it has that dtype, else a converted copy."""
    return t if t.dtype == dtype else t.to(dtype)


def fresh_output(z: Tensor, dtype: torch.dtype, relu: bool = False, mutated: bool = False) -> Tensor:
    """``relu(z)`` or ``z`` in ``dtype``, as a new tensor: what an ``autograd.Function``'s forward returns.
    ``mutated``: ``z`` was modified in place after it was made.

    Under ``torch.compile`` (torch 2.11's dynamo) a forward gets wrong gradients when an output was last written by
    an in-place op (``+=``, ``relu_``, ``copy_``, ``out=``) or is the same tensor as another value of the forward
    (a no-op ``.to``, of the output or to make it; an input). So every forward here makes its outputs with an
    out-of-place op as the last write, converts with :func:`cast` only, and keeps in-place ops for intermediates:
    the ReLU runs in place only where a real conversion follows, and a mutated ``z`` without either is copied."""
    if z.dtype != dtype:
        return (z.relu_() if relu else z).to(dtype)
    if relu:
        return torch.relu(z)
    return z.clone() if mutated else z


def affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x*scale + shift`` per channel, computed in the accumulation dtype, stored in x's dtype (a new tensor)."""
    return fresh_output(cast(x, acc_dtype(x.dtype)) * _chan(scale) + _chan(shift), x.dtype)


def affine_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``relu(x*scale + shift)`` computed in the accumulation dtype, stored in x's dtype (a new tensor)."""
    return fresh_output(cast(x, acc_dtype(x.dtype)) * _chan(scale) + _chan(shift), x.dtype, relu=True)


def _conv_grads(grad: Tensor, inp: Tensor, weight: Tensor, stride, padding, dilation, groups,
                need_input: bool, need_weight: bool):
    if not (need_input or need_weight):
        return None, None
    gi, gw, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight, None, _pair(stride), _pair(padding), _pair(dilation), False, [0, 0], groups,
        [need_input, need_weight, False])
    return gi, gw


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


class EvalBN(NamedTuple):
    """A BatchNorm in its eval form, as the live tensors of the module (never a copy):
    ``bn(c) = (c − mean)·weight/√(var + eps) + bias`` = ``c·s + t``; ``weight``/``bias`` None for
    ``affine=False``. Any dtype (a half model's buffers included); the ops compute ``s`` and ``t`` from these
    tensors in the accumulation dtype on every call, so an in-place edit (``.data`` included) is always seen."""

    weight: Tensor | None
    bias: Tensor | None
    mean: Tensor
    var: Tensor
    eps: float


class TrainBN(NamedTuple):
    """A BatchNorm normalizing with batch statistics, as a training convolution finalizes it in its own launch:
    γ, β (None for ``affine=False``; any float dtype), the running statistics and ``num_batches_tracked`` it
    updates as ``torch.nn.BatchNorm2d`` does (None: not updated), ``momentum`` (None: cumulative average,
    weight 1/num_batches_tracked after counting the batch) and ``eps``. The module's live tensors, never copies."""

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    momentum: float | None
    eps: float


class Shortcut(NamedTuple):
    """A block's downsample branch ``bn(conv1x1(x, weight, stride))``, added to its last convolution's output
    before the final ReLU (one launch with it on the fused backends)."""

    x: Tensor
    weight: Tensor
    bn: EvalBN
    stride: int


def eval_scale_shift(bn: EvalBN, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(s, t)`` of :class:`EvalBN` in dtype ``acc``: ``s = γ/√(σ²+ε)``, ``t = β − μ·s`` (differentiable)."""
    invstd = torch.rsqrt(cast(bn.var, acc) + bn.eps)
    scale = invstd if bn.weight is None else cast(bn.weight, acc) * invstd
    shift = -cast(bn.mean, acc) * scale
    return scale, (shift if bn.bias is None else shift + cast(bn.bias, acc))


def check_eval_bn(op: str, name: str, bn: EvalBN, channels: int, device: torch.device) -> None:
    """Validate the tensors of :class:`EvalBN` ``bn`` for ``channels`` output channels on ``device``."""
    if not isinstance(bn, EvalBN):
        raise TypeError(f"{op}: {name} must be an EvalBN, got {type(bn).__name__}")
    if (bn.weight is None) != (bn.bias is None):
        raise ValueError(f"{op}: {name}.weight and {name}.bias must be given together (affine) or both None")
    for field in ("weight", "bias", "mean", "var"):
        t = getattr(bn, field)
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != channels or not t.is_floating_point():
            raise ValueError(f"{op}: {name}.{field} must be a floating-point vector of {channels} channels, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{op}: {name}.{field} is on {t.device} but x is on {device}")
    if not isinstance(bn.eps, (int, float)) or not bn.eps >= 0:
        raise ValueError(f"{op}: {name}.eps must be a non-negative number, got {bn.eps!r}")


def _flat_bn(bn: EvalBN | None) -> tuple:
    """``(weight, bias, mean, var)`` of ``bn`` (all None without one): the tensor arguments of the ops."""
    return (None,) * 4 if bn is None else (bn.weight, bn.bias, bn.mean, bn.var)


def _bn_param_grads(ds: Tensor | None, dt: Tensor | None, bn: tuple, eps: float, scale: Tensor,
                    need: tuple) -> tuple:
    """Gradients of the BN tensors ``bn = (γ, β, μ, σ²)`` from those of ``s = γ·invstd`` and ``t = β − μ·s``
    (invstd = 1/√(σ²+ε)): ``dβ = dt``, ``ds' = ds − μ·dt``, ``dγ = ds'·invstd``, ``dμ = −s·dt``,
    ``dσ² = −½·ds'·γ·invstd³``; each in its tensor's dtype, None where ``need`` does not ask for it."""
    if not any(need):
        return None, None, None, None
    weight, bias, mean, var = bn
    acc = scale.dtype
    invstd = torch.rsqrt(var.to(acc) + eps)
    ds_total = ds - mean.to(acc) * dt
    gw = (ds_total * invstd).to(weight.dtype) if need[0] else None
    gb = dt.to(bias.dtype, copy=True) if need[1] else None  # never shared with the other branch's dβ
    gm = (-scale * dt).to(mean.dtype) if need[2] else None
    gv = None
    if need[3]:
        gamma = 1.0 if weight is None else weight.to(acc)
        gv = (-0.5 * ds_total * gamma * invstd.pow(3)).to(var.dtype)
    return gw, gb, gm, gv


def _branch_grads(g: Tensor, x: Tensor, weight: Tensor, bn: tuple, eps: float, scale: Tensor, dt: Tensor | None,
                  conv: tuple, need: tuple) -> tuple:
    """Gradients of one branch ``c·s + t`` with ``c = conv(x, W)`` given ``g = ∂L/∂(c·s + t)``:
    ``dx = dgrad(g·s, W)``; with ``G = wgrad(g, x)``: ``dW = G·s``, ``ds = Σ_{c,r,s} G·W`` (so the raw conv
    output is never needed), then the BN tensors' gradients by :func:`_bn_param_grads`. ``need`` is
    (x, W, γ, β, μ, σ²); returns those six gradients."""
    stride, padding, dilation, groups = conv
    need_x, need_w, need_bn = need[0], need[1], tuple(need[2:])
    acc = scale.dtype
    gx = G = None
    if need_x:
        gs = (g.to(acc) * _chan(scale)).to(g.dtype)
        gx, _ = _conv_grads(gs, x, weight, stride, padding, dilation, groups, True, False)
    if need_w or any(need_bn):
        _, G = _conv_grads(g, x, weight, stride, padding, dilation, groups, False, True)
    gw = (G.to(acc) * scale.view(-1, 1, 1, 1)).to(weight.dtype) if need_w else None
    ds = (G.to(acc) * weight.to(acc)).sum((1, 2, 3)) if any(need_bn) else None
    return (gx, gw) + _bn_param_grads(ds, dt, bn, eps, scale, need_bn)


class ConvBnActFunction(torch.autograd.Function):
    """``y = act(conv(x, W)·s + t + residual + conv1x1(x_d, W_d)·s_d + t_d)`` with (s, t), (s_d, t_d) computed
    from the live BN tensors (:class:`EvalBN`) in the accumulation dtype; saves x, W, x_d, W_d, y and the BN
    tensors (alive anyway). Backward (:func:`conv_bn_act_backward`) is shared by every backend."""

    @staticmethod
    def forward(ctx, x, weight, bn_w, bn_b, bn_mean, bn_var, residual, sx, sw, sbn_w, sbn_b, sbn_mean, sbn_var,
                conf):
        stride, padding, dilation, groups, eps, s_eps, s_stride, relu = conf
        acc = acc_dtype(x.dtype)
        scale, shift = eval_scale_shift(EvalBN(bn_w, bn_b, bn_mean, bn_var, eps), acc)
        z = cast(F.conv2d(x, weight, None, stride, padding, dilation, groups), acc) * _chan(scale) + _chan(shift)
        if sx is not None:
            s_scale, s_shift = eval_scale_shift(EvalBN(sbn_w, sbn_b, sbn_mean, sbn_var, s_eps), acc)
            z += cast(F.conv2d(sx, sw, None, s_stride), acc) * _chan(s_scale) + _chan(s_shift)
        if residual is not None:
            z += cast(residual, acc)
        y = fresh_output(z, x.dtype, relu, mutated=sx is not None or residual is not None)
        conv_bn_act_save(ctx, x, weight, bn_w, bn_b, bn_mean, bn_var, residual, sx, sw, sbn_w, sbn_b, sbn_mean,
                         sbn_var, conf, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return conv_bn_act_backward(ctx, grad_y)


def conv_bn_act_save(ctx, x, weight, bn_w, bn_b, bn_mean, bn_var, residual, sx, sw, sbn_w, sbn_b, sbn_mean,
                     sbn_var, conf, y) -> None:
    """What every backend's ``conv_bn_act`` saves for :func:`conv_bn_act_backward` (same arguments as the
    op's forward, plus its output ``y``)."""
    ctx.conf = conf
    ctx.save_for_backward(x, weight, bn_w, bn_b, bn_mean, bn_var, sx, sw, sbn_w, sbn_b, sbn_mean, sbn_var, y)


def conv_bn_act_backward(ctx, grad_y) -> tuple:
    """Backward of :class:`ConvBnActFunction` from what :func:`conv_bn_act_save` saved: the 13 tensor inputs'
    gradients by :func:`conv_bn_act_grads`, None for ``conf``."""
    return conv_bn_act_grads(grad_y, ctx.saved_tensors, ctx.conf, ctx.needs_input_grad[:13]) + (None,)


def conv_bn_act_grads(grad_y: Tensor, saved: tuple, conf: tuple, need: tuple) -> tuple:
    """The backward of ``conv_bn_act`` that every backend shares (its forward kernels differ, its math does not).

    ``saved = (x, W, γ, β, μ, σ², x_d, W_d, γ_d, β_d, μ_d, σ²_d, y)`` (None for what is absent), ``conf`` as in
    :func:`conv_bn_act_args`, ``need``: whether each of the 13 tensor inputs ``(x, W, γ, β, μ, σ², residual,
    x_d, W_d, γ_d, β_d, μ_d, σ²_d)`` needs its gradient; returns those 13 gradients (None where not needed).

    ``g = dy·[y > 0]`` (ReLU) or ``dy``; ``d residual = g``; ``dt = Σ_{n,p,q} g`` for both branches; each branch's
    input, weight and BN gradients by :func:`_branch_grads` (aten ``convolution_backward`` for the convolutions).
    """
    x, weight, bn_w, bn_b, bn_mean, bn_var, sx, sw, sbn_w, sbn_b, sbn_mean, sbn_var, y = saved
    stride, padding, dilation, groups, eps, s_eps, s_stride, relu = conf
    acc = acc_dtype(x.dtype)
    g = torch.ops.aten.threshold_backward(grad_y, y, 0) if relu else grad_y
    main_bn, sc_bn = (bn_w, bn_b, bn_mean, bn_var), (sbn_w, sbn_b, sbn_mean, sbn_var)
    dt = g.sum(_CHANNEL_DIMS, dtype=acc) if any(need[2:6]) or any(need[9:13]) else None
    with torch.no_grad():
        scale, _ = eval_scale_shift(EvalBN(*main_bn, eps), acc)
        main = _branch_grads(g, x, weight, main_bn, eps, scale, dt, (stride, padding, dilation, groups),
                             need[0:6])
        short = (None,) * 6
        if sx is not None:
            s_scale, _ = eval_scale_shift(EvalBN(*sc_bn, s_eps), acc)
            short = _branch_grads(g, sx, sw, sc_bn, s_eps, s_scale, dt, (s_stride, 0, 1, 1),
                                  (need[7], need[8]) + tuple(need[9:13]))
    return main + ((g if need[6] else None),) + short


def conv_bn_act_args(x: Tensor, weight: Tensor, bn: EvalBN, stride, padding, dilation, groups: int,
                     residual: Tensor | None, shortcut: Shortcut | None, relu: bool, op: str) -> tuple:
    """Validate the BN and shortcut arguments of ``conv_bn_act`` (the convolution's own are the kernels' to check)
    and flatten them into the positional arguments of :class:`ConvBnActFunction` and the backends' functions:
    ``(x, W, γ, β, μ, σ², residual, x_d, W_d, γ_d, β_d, μ_d, σ²_d, conf)`` with ``conf = (stride, padding,
    dilation, groups, eps, eps_d, stride_d, relu)``."""
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"{op}: weight must be a 4-D tensor [K, C/groups, R, S]")
    check_eval_bn(op, "bn", bn, weight.shape[0], x.device)
    s_eps, s_stride, sx, sw = 0.0, 1, None, None
    if shortcut is not None:
        if not isinstance(shortcut, Shortcut):
            raise TypeError(f"{op}: shortcut must be a Shortcut, got {type(shortcut).__name__}")
        check_eval_bn(op, "shortcut.bn", shortcut.bn, weight.shape[0], x.device)
        if not isinstance(shortcut.stride, int) or shortcut.stride < 1:
            raise ValueError(f"{op}: shortcut.stride must be a positive int, got {shortcut.stride!r}")
        sx, sw, s_eps, s_stride = shortcut.x, shortcut.weight, float(shortcut.bn.eps), shortcut.stride
    conf = (stride, padding, dilation, groups, float(bn.eps), s_eps, s_stride, bool(relu))
    return (x, weight, *_flat_bn(bn), residual, sx, sw, *_flat_bn(shortcut.bn if shortcut else None), conf)


class ConvStatsFunction(torch.autograd.Function):
    """``c = conv(relu(x*s + t) or x, W)`` with per-channel mean and biased variance of ``c``.

    Backward, for ``n`` values per channel:
    ``dc' = dc + dmean/n + dvar * 2(c - mean)/n``; ``(da, dW) = conv_backward(dc', a, W)`` with ``a``
    recomputed; then through the prologue ``g = da * [x*s + t > 0]``: ``dx = g*s``, ``ds = Σ g*x``,
    ``dt = Σ g``. Saves x, W, s, t, c and mean only.
    """

    @staticmethod
    def forward(ctx, x, weight, in_scale, in_shift, stride, padding, dilation, groups):
        a = x if in_scale is None else affine_relu(x, in_scale, in_shift)
        c = F.conv2d(a, weight, None, stride, padding, dilation, groups)
        var, mean = torch.var_mean(cast(c, acc_dtype(c.dtype)), dim=_CHANNEL_DIMS, correction=0)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, in_scale, in_shift, c, mean)
        return c, mean, var

    @staticmethod
    def backward(ctx, grad_c, grad_mean, grad_var):
        x, weight, in_scale, in_shift, c, mean = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need = ctx.needs_input_grad
        acc = acc_dtype(c.dtype)
        n = c.numel() // max(c.shape[1], 1)
        g = grad_c.to(acc) + _chan(grad_mean) / n + _chan(grad_var) * (2.0 / n) * (c.to(acc) - _chan(mean))
        g = g.to(c.dtype)
        prologue = in_scale is not None
        a = affine_relu(x, in_scale, in_shift) if prologue else x
        need_a = need[0] or (prologue and (need[2] or need[3]))
        ga, gw = _conv_grads(g, a, weight, stride, padding, dilation, groups, need_a, need[1])
        if not prologue or ga is None:
            return ga, gw, None, None, None, None, None, None
        gx, gs, gt = _affine_relu_grads(ga, x, in_scale, in_shift, (need[0], need[2], need[3]))
        return gx, gw, gs, gt, None, None, None, None


def _affine_relu_grads(grad_a: Tensor, x: Tensor, scale: Tensor, shift: Tensor, need) -> tuple:
    """Backward of ``a = relu(x*s + t)`` with the ReLU mask recomputed from the inputs: ``g = da*[x*s + t > 0]``,
    ``dx = g*s``, ``ds = Σ g*x``, ``dt = Σ g`` (each only where ``need`` asks for it, else None)."""
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    g = grad_a.to(acc) * (xa * _chan(scale) + _chan(shift) > 0)
    gx = (g * _chan(scale)).to(x.dtype) if need[0] else None
    gs = (g * xa).sum(_CHANNEL_DIMS) if need[1] else None
    gt = g.sum(_CHANNEL_DIMS) if need[2] else None
    return gx, gs, gt


class BnReluFunction(torch.autograd.Function):
    """``a = relu(x*s + t)``: a BatchNorm (as scale/shift) and its ReLU as one op that saves only its inputs.

    Autograd through the PyTorch ops of :func:`affine_relu` would keep fp32 copies of x and of the
    pre-activation alive until backward; this keeps x (already alive) and two per-channel vectors."""

    @staticmethod
    def forward(ctx, x, scale, shift):
        ctx.save_for_backward(x, scale, shift)
        return affine_relu(x, scale, shift)

    @staticmethod
    def backward(ctx, grad_a):
        return _affine_relu_grads(grad_a, *ctx.saved_tensors, ctx.needs_input_grad)


class ScaleBiasAddReluFunction(torch.autograd.Function):
    """``out = relu(c*s + t + idn)`` or, with a downsample branch, ``relu(c*s + t + c_d*s_d + t_d)``.

    Backward recomputes the ReLU mask from the inputs (the output is not saved):
    ``g = dout * [z > 0]``; ``dc = g*s``, ``ds = Σ g*c``, ``dt = Σ g``; ``didn = g`` or
    ``dc_d = g*s_d``, ``ds_d = Σ g*c_d``, ``dt_d = Σ g``.
    """

    @staticmethod
    def forward(ctx, c, scale, shift, idn, idn_scale, idn_shift):
        ctx.save_for_backward(c, scale, shift, idn, idn_scale, idn_shift)
        return fresh_output(_tail_preact(c, scale, shift, idn, idn_scale, idn_shift), c.dtype, relu=True)

    @staticmethod
    def backward(ctx, grad_out):
        c, scale, shift, idn, idn_scale, idn_shift = ctx.saved_tensors
        need = ctx.needs_input_grad
        acc = acc_dtype(c.dtype)
        g = grad_out.to(acc) * (_tail_preact(c, scale, shift, idn, idn_scale, idn_shift) > 0)
        gc = (g * _chan(scale)).to(c.dtype) if need[0] else None
        gs = (g * c.to(acc)).sum(_CHANNEL_DIMS) if need[1] else None
        gt = g.sum(_CHANNEL_DIMS) if need[2] else None
        if idn_scale is None:
            return gc, gs, gt, (g.to(idn.dtype) if need[3] else None), None, None
        gidn = (g * _chan(idn_scale)).to(idn.dtype) if need[3] else None
        gsd = (g * idn.to(acc)).sum(_CHANNEL_DIMS) if need[4] else None
        gtd = g.sum(_CHANNEL_DIMS) if need[5] else None
        return gc, gs, gt, gidn, gsd, gtd


def _tail_preact(c, scale, shift, idn, idn_scale, idn_shift) -> Tensor:
    acc = acc_dtype(c.dtype)
    z = cast(c, acc) * _chan(scale) + _chan(shift)
    if idn_scale is None:
        return z + cast(idn, acc)
    return z + cast(idn, acc) * _chan(idn_scale) + _chan(idn_shift)


def conv_bn_act(x: Tensor, weight: Tensor, bn: EvalBN, stride=1, padding=0, dilation=1, groups=1,
                residual: Tensor | None = None, shortcut: Shortcut | None = None, relu: bool = True) -> Tensor:
    """Eval-path convolution with its BatchNorm in the epilogue, from the live BN tensors:
    ``act(conv(x, W)·s + t [+ residual] [+ conv1x1(shortcut.x, shortcut.weight)·s_d + t_d])``."""
    args = conv_bn_act_args(x, weight, bn, stride, padding, dilation, groups, residual, shortcut, relu,
                            "conv_bn_act")
    return ConvBnActFunction.apply(*args)


def conv_stats(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups=1,
               in_scale: Tensor | None = None, in_shift: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Training-path convolution with the previous BN+ReLU on load; returns ``(c, mean, biased_var)``."""
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    return ConvStatsFunction.apply(x, weight, in_scale, in_shift, stride, padding, dilation, groups)


def bn_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``relu(x*scale + shift)``, differentiable in all three, saving only its inputs (the ResNet stem's BN+ReLU)."""
    return BnReluFunction.apply(x, scale, shift)


def scale_bias_add_relu(c: Tensor, scale: Tensor, shift: Tensor, idn: Tensor, idn_scale: Tensor | None = None,
                        idn_shift: Tensor | None = None) -> Tensor:
    """Training tail: ``relu(c*s + t + idn)``, or ``relu(c*s + t + idn*s_d + t_d)`` with a downsample branch."""
    if (idn_scale is None) != (idn_shift is None):
        raise ValueError("idn_scale and idn_shift must be given together")
    if idn.shape != c.shape:
        raise RuntimeError(f"the shortcut's shape {tuple(idn.shape)} does not match the block's output shape "
                           f"{tuple(c.shape)}")
    return ScaleBiasAddReluFunction.apply(c, scale, shift, idn, idn_scale, idn_shift)
