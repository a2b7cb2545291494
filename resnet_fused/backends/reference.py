"""Reference backend: every fused op of resnet_fused in plain PyTorch.

This module is the oracle. Tests compare the Triton and CUDA backends against it, CPU tensors run through it,
and its backward passes spell out the math those kernels implement. Each op is a
``torch.autograd.Function`` that follows the NormConv scheme of the design notes: forward saves only the
op's inputs, the raw convolution output and per-channel statistics; backward recomputes every normalized or
activated tensor it needs instead of keeping it alive between forward and backward.

Ops (all differentiable w.r.t. every tensor argument):

* ``conv_bias_act``  eval path, BN folded into the weights:
  ``y = act(conv(x, W) + b [+ residual] [+ conv1x1(shortcut_x, W_d)])``
* ``conv_stats``  training path: ``c = conv(a, W)`` with ``a = relu(x*s + t)`` (the previous BN+ReLU,
  applied on load) or ``a = x``; returns ``c`` and its per-channel mean and biased variance.
* ``scale_bias_add_relu``  training tail: ``relu(c*s + t + idn)`` or ``relu(c*s + t + c_d*s_d + t_d)``.
* ``bn_relu``  a BatchNorm (as scale/shift) + ReLU on its own: ``relu(x*s + t)`` (the stem in training).

Per-channel vectors (bias, scale, shift, mean, var) are kept in the accumulation dtype: float32, or float64
for float64 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "reference"

_CHANNEL_DIMS = (0, 2, 3)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-channel statistics and epilogues are computed in for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def affine_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``relu(x*scale + shift)`` computed in the accumulation dtype, stored in x's dtype."""
    return torch.relu(x.to(acc_dtype(x.dtype)) * _chan(scale) + _chan(shift)).to(x.dtype)


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


class ConvBiasActFunction(torch.autograd.Function):
    """``y = act(conv(x, W) + b + residual + conv1x1(shortcut_x, W_d))``; saves x, W, shortcut_x, W_d, y."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation,
                groups, shortcut_stride, relu):
        acc = acc_dtype(x.dtype)
        if acc == x.dtype and (bias is None or bias.dtype == acc):
            y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        else:
            y = F.conv2d(x, weight, None, stride, padding, dilation, groups).to(acc)
            if bias is not None:
                y += _chan(bias.to(acc))
        # y is this op's own buffer: the epilogue runs in place on it.
        if shortcut_x is not None:
            y += F.conv2d(shortcut_x, shortcut_weight, None, shortcut_stride)
        if residual is not None:
            y += residual
        if relu:
            y.relu_()
        y = y.to(x.dtype)
        ctx.conf = (stride, padding, dilation, groups, shortcut_stride, relu)
        ctx.save_for_backward(x, weight, shortcut_x, shortcut_weight, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, shortcut_x, shortcut_weight, y = ctx.saved_tensors
        stride, padding, dilation, groups, shortcut_stride, relu = ctx.conf
        need = ctx.needs_input_grad
        g = grad_y * (y > 0) if relu else grad_y
        grad_bias = g.sum(_CHANNEL_DIMS, dtype=acc_dtype(g.dtype)) if need[2] else None
        grad_residual = g if need[3] else None
        gx, gw = _conv_grads(g, x, weight, stride, padding, dilation, groups, need[0], need[1])
        gsx = gsw = None
        if shortcut_x is not None:
            gsx, gsw = _conv_grads(g, shortcut_x, shortcut_weight, shortcut_stride, 0, 1, 1, need[4], need[5])
        return gx, gw, grad_bias, grad_residual, gsx, gsw, None, None, None, None, None, None


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
        var, mean = torch.var_mean(c.to(acc_dtype(c.dtype)), dim=_CHANNEL_DIMS, correction=0)
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
        return torch.relu(_tail_preact(c, scale, shift, idn, idn_scale, idn_shift)).to(c.dtype)

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
    z = c.to(acc) * _chan(scale) + _chan(shift)
    if idn_scale is None:
        return z + idn.to(acc)
    return z + idn.to(acc) * _chan(idn_scale) + _chan(idn_shift)


def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor | None, stride=1, padding=0, dilation=1, groups=1,
                  residual: Tensor | None = None, shortcut_x: Tensor | None = None,
                  shortcut_weight: Tensor | None = None, shortcut_stride=1, relu: bool = True) -> Tensor:
    """Eval-path convolution: ``act(conv(x, W) + b [+ residual] [+ conv1x1(shortcut_x, W_d)])``."""
    if (shortcut_x is None) != (shortcut_weight is None):
        raise ValueError("shortcut_x and shortcut_weight must be given together")
    return ConvBiasActFunction.apply(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding,
                                     dilation, groups, shortcut_stride, relu)


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
