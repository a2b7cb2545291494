"""Training-path ops of the Triton backend: NormConv ``conv_bn_train``/``conv_stats`` and the BN-add-ReLU tail.

``conv_bn_train`` is what the fused blocks run: ONE launch per convolution, whose input may carry the previous
BN+ReLU as a prologue and whose epilogue takes the output's per-channel batch statistics and — the last programs
to arrive merging them (:func:`.conv._merge_and_finalize`) — finalizes its BatchNorm: scale/shift for the next
launch, running statistics and ``num_batches_tracked`` updated as ``torch.nn.BatchNorm2d`` updates them.
``conv_stats`` returns the batch mean and variance instead (one conv launch plus a merge), for a BatchNorm that
:mod:`resnet_fused.norm` finalizes itself (a SyncBatchNorm combining its statistics over the group first).
``scale_bias_add_relu`` is the block tail ``relu(c*scale + shift + idn)`` (or with a normalized downsample
branch) in one pass; ``bn_relu`` is a BatchNorm + ReLU on its own in one pass each way.

Memory is where training gains most: backward keeps only the op inputs, the raw conv output c and its
statistics (the NormConv scheme of DESIGN.md) and recomputes every activated tensor — the prologue activation
``relu(x*in_scale + in_shift)`` for the weight gradient, the tail's ReLU mask from its inputs. The backward
passes are fused one-pass kernels (``elementwise.py``, each finishing its own per-channel sums) around
``torch.ops.aten.convolution_backward`` for the data and weight gradients of the convolution: a Bottleneck's
backward is 6 launches (7 with a downsample) plus the convolution gradients and autograd's one accumulation.
"""

import torch
from torch.nn.modules.utils import _pair

from ..reference import TrainBN
from .conv import conv2d_bn_train, conv2d_fused
from .elementwise import affine_relu_bwd, affine_relu_fwd, bn_train_bwd, stats_bwd, tail_bwd, tail_fwd


class ConvStatsFunction(torch.autograd.Function):
    """c = conv2d(a, weight), a = relu(x*in_scale + in_shift) or x; returns (c, mean(c), var(c))."""

    @staticmethod
    def forward(ctx, x, weight, in_scale, in_shift, stride, padding, dilation, groups):
        c, mean, var = conv2d_fused(
            x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups,
            in_scale=in_scale, in_shift=in_shift, stats=True,
        )
        ctx.save_for_backward(x, weight, in_scale, in_shift, c, mean)
        ctx.conv_args = (_pair(stride), _pair(padding), _pair(dilation), groups)
        ctx.set_materialize_grads(False)
        return c, mean, var

    @staticmethod
    def backward(ctx, dc, dmean, dvar):
        x, weight, in_scale, in_shift, c, mean = ctx.saved_tensors
        dc = stats_bwd(c, mean, dc, dmean, dvar)
        if dc is None:
            return (None,) * 8
        stride, padding, dilation, groups = ctx.conv_args
        prologue = in_scale is not None
        need_a = ctx.needs_input_grad[0] or (prologue and any(ctx.needs_input_grad[2:4]))
        # the weight gradient needs the activated input; the input gradient only its shape
        a = affine_relu_fwd(x, in_scale, in_shift) if prologue and ctx.needs_input_grad[1] else x
        da, dweight, _ = torch.ops.aten.convolution_backward(
            dc, a, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [need_a, ctx.needs_input_grad[1], False],
        )
        del a
        if da is None or not prologue:
            return da, dweight, None, None, None, None, None, None
        dx, dscale, dshift = affine_relu_bwd(da, x, in_scale, in_shift)
        return dx, dweight, dscale, dshift, None, None, None, None


class ConvBnTrainFunction(torch.autograd.Function):
    """(c, scale, shift): c = conv2d(a, weight), a = relu(x*in_scale + in_shift) or x, and the (scale, shift) of
    c's BatchNorm from c's batch statistics, its running statistics updated — one launch
    (:func:`.conv.conv2d_bn_train`). Backward: the BatchNorm's backward through the statistics and the finalize,
    fused with the recompute of ``a`` for the weight gradient (one launch, :func:`.elementwise.bn_train_bwd`), the
    convolution's gradients, and the prologue's one-pass backward (one launch)."""

    @staticmethod
    def forward(ctx, x, weight, in_scale, in_shift, bn_weight, bn_bias, bn, conv_args):
        bn = bn._replace(weight=bn_weight, bias=bn_bias)
        c, mean, var, scale, shift = conv2d_bn_train(x, weight, bn, *conv_args, in_scale=in_scale, in_shift=in_shift)
        ctx.save_for_backward(x, weight, in_scale, in_shift, c, mean, var, bn_weight)
        ctx.conv_args = conv_args
        ctx.eps = bn.eps
        ctx.set_materialize_grads(False)
        return c, scale, shift

    @staticmethod
    def backward(ctx, dc, dscale, dshift):
        x, weight, in_scale, in_shift, c, mean, var, gamma = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dc is None and dscale is None and dshift is None:
            return (None,) * 8
        stride, padding, dilation, groups = ctx.conv_args
        prologue = in_scale is not None
        need_a = need[0] or (prologue and (need[2] or need[3]))
        dc, dgamma, a = bn_train_bwd(c, mean, var, gamma, ctx.eps, dc, dscale, dshift,
                                     recompute=(x, in_scale, in_shift) if prologue and need[1] else None)
        da, dweight, _ = torch.ops.aten.convolution_backward(
            dc, a if a is not None else x, weight, None, list(_pair(stride)), list(_pair(padding)),
            list(_pair(dilation)), False, [0, 0], groups, [need_a, need[1], False],
        )
        del a
        dx = din_scale = din_shift = None
        if da is not None:
            dx, din_scale, din_shift = affine_relu_bwd(da, x, in_scale, in_shift) if prologue else (da, None, None)
        return (dx if need[0] else None, dweight, din_scale if need[2] else None, din_shift if need[3] else None,
                dgamma if need[4] else None, dshift if need[5] else None, None, None)


class ScaleBiasAddReluFunction(torch.autograd.Function):
    """out = relu(c*scale + shift + idn'), idn' = idn*idn_scale + idn_shift or idn."""

    @staticmethod
    def forward(ctx, c, scale, shift, idn, idn_scale, idn_shift):
        out = tail_fwd(c, scale, shift, idn, idn_scale, idn_shift)
        ctx.save_for_backward(c, scale, shift, idn, idn_scale, idn_shift)
        return out

    @staticmethod
    def backward(ctx, dout):
        c, scale, shift, idn, idn_scale, idn_shift = ctx.saved_tensors
        dc, didn, dscale, dshift, didn_scale, didn_shift = tail_bwd(dout, c, scale, shift, idn, idn_scale, idn_shift)
        return dc, dscale, dshift, didn, didn_scale, didn_shift


class BnReluFunction(torch.autograd.Function):
    """a = relu(x*scale + shift) in one pass; saves x, scale, shift; backward is one pass too."""

    @staticmethod
    def forward(ctx, x, scale, shift):
        ctx.save_for_backward(x, scale, shift)
        return affine_relu_fwd(x, scale, shift)

    @staticmethod
    def backward(ctx, da):
        dx, dscale, dshift = affine_relu_bwd(da, *ctx.saved_tensors)
        need = ctx.needs_input_grad
        return dx if need[0] else None, dscale if need[1] else None, dshift if need[2] else None


def bn_relu(x, scale, shift):
    """relu(x*scale + shift) per channel (fp32 math, x's dtype), differentiable in all three, saving only its
    inputs: a BatchNorm + ReLU on its own, like the ResNet stem's."""
    return BnReluFunction.apply(x, scale, shift)


def conv_stats(x, weight, stride, padding, dilation=1, groups=1, in_scale=None, in_shift=None):
    """(c, mean, var): c = conv2d(relu(x*in_scale + in_shift) if in_scale is given else x, weight) in x's
    dtype, mean/var its per-output-channel fp32 batch mean and biased variance. Differentiable in x,
    weight, in_scale, in_shift through all three outputs."""
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    return ConvStatsFunction.apply(x, weight, in_scale, in_shift, stride, padding, dilation, groups)


def scale_bias_add_relu(c, scale, shift, idn, idn_scale=None, idn_shift=None):
    """relu(c*scale + shift + (idn*idn_scale + idn_shift if idn_scale is given else idn)), fp32 math,
    result in c's dtype. Differentiable in every tensor argument."""
    return ScaleBiasAddReluFunction.apply(c, scale, shift, idn, idn_scale, idn_shift)


def conv_bn_train(x, weight, bn: TrainBN, stride, padding, dilation=1, groups=1, in_scale=None, in_shift=None):
    """(c, scale, shift): the training conv ``c = conv2d(relu(x*in_scale + in_shift) if in_scale is given else x,
    weight)`` and its BatchNorm ``bn`` (:class:`~resnet_fused.backends.reference.TrainBN`) finalized from c's
    batch statistics — scale/shift fp32, the running statistics and ``num_batches_tracked`` updated as
    ``torch.nn.BatchNorm2d`` updates them — in ONE launch. Differentiable in x, weight, in_scale, in_shift,
    ``bn.weight`` and ``bn.bias``. A batch of one value per channel raises PyTorch's error, before anything is
    updated."""
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    return ConvBnTrainFunction.apply(x, weight, in_scale, in_shift, bn.weight, bn.bias, bn,
                                     (stride, padding, dilation, groups))
