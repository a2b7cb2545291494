"""Triton backend: the three fused ops of resnet_fused on Triton kernels.

* ``conv_bias_act`` (eval path, BN folded into the weights): ONE launch of the implicit-GEMM kernel of
  :mod:`.conv` per convolution — bias, residual, a strided 1x1 downsample conv and ReLU all happen in that
  launch, so a block's tail ``relu(bn3(conv3(h)) + bn_d(conv_d(x)))`` never materialises its two branches.
  Backward: ReLU mask from the saved output, bias gradient Σ, data/weight gradients of both convolutions by
  ``torch.ops.aten.convolution_backward``.
* ``conv_stats``, ``scale_bias_add_relu`` (training path, NormConv scheme): see :mod:`.train`.

CUDA tensors run natively; CPU tensors only under ``TRITON_INTERPRET=1`` (set before importing triton), which
is how the test-suite runs the kernels on machines without a GPU.
"""

from __future__ import annotations

import os

from torch import Tensor

from .. import reference

NAME = "triton"

try:
    import triton  # noqa: F401
except ImportError as err:
    _IMPORT_ERROR: str | None = f"triton is not importable ({err})"
else:
    _IMPORT_ERROR = None

__all__ = ["NAME", "unsupported", "conv_bias_act"]
if _IMPORT_ERROR is None:
    from ._launch import launch_count, reset_launch_count
    from .conv import SUPPORTED_DTYPES, conv2d_fused
    from .train import bn_relu, conv_stats, scale_bias_add_relu

    __all__ += ["bn_relu", "conv_stats", "scale_bias_add_relu", "conv2d_fused", "launch_count", "reset_launch_count"]


def unsupported(x: Tensor, groups: int = 1, dilation: int = 1) -> str | None:
    """Why this backend cannot run input ``x`` (of a conv with ``groups``/``dilation``), or None.

    Grouped and dilated convolutions are supported; the limits are the device and the dtype."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("the triton backend runs CPU tensors only under TRITON_INTERPRET=1 (set it before "
                    "importing resnet_fused)")
    elif x.device.type != "cuda":
        return f"the triton backend runs CUDA tensors, got a {x.device.type} tensor"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"the triton backend supports float16, bfloat16 and float32 inputs, got {x.dtype}"
    return None


class ConvBiasActFunction(reference.ConvBiasActFunction):
    """``y = act(conv(x, W) + b + residual + conv1x1(shortcut_x, W_d))`` in one kernel launch.

    Backward is the reference backend's: with ``g = dy·[y > 0]`` (ReLU) or ``dy``: ``db = Σ_{n,p,q} g``,
    ``dresidual = g``, ``(dx, dW) = conv_backward(g, x, W)``, ``(dshortcut_x, dW_d) = conv_backward(g,
    shortcut_x, W_d)``. Saves x, W, shortcut_x, W_d and y.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding, dilation,
                groups, shortcut_stride, relu):
        y = conv2d_fused(x, weight, bias, stride, padding, dilation, groups, residual=residual,
                         shortcut_x=shortcut_x, shortcut_weight=shortcut_weight,
                         shortcut_stride=shortcut_stride, relu=relu)
        ctx.conf = (stride, padding, dilation, groups, shortcut_stride, relu)
        ctx.save_for_backward(x, weight, shortcut_x, shortcut_weight, y)
        return y


def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation=1, groups: int = 1,
                  residual: Tensor | None = None, shortcut_x: Tensor | None = None,
                  shortcut_weight: Tensor | None = None, shortcut_stride: int = 1, relu: bool = True) -> Tensor:
    """``act(conv2d(x, weight) + bias + residual + conv2d(shortcut_x, shortcut_weight, stride=shortcut_stride))``
    with ``act = relu`` if ``relu`` else identity; one kernel launch, differentiable in every tensor argument.
    Output in x's dtype and memory format."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"resnet_fused triton backend: {_IMPORT_ERROR}")
    return ConvBiasActFunction.apply(x, weight, bias, residual, shortcut_x, shortcut_weight, stride, padding,
                                     dilation, groups, shortcut_stride, relu)
