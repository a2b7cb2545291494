"""Triton backend: the three fused ops of resnet_fused on Triton kernels.

* ``conv_bn_act`` (eval path): ONE launch of the implicit-GEMM kernel of :mod:`.conv` per convolution — the
  BatchNorm (scale and shift computed in the kernel from the BN's live tensors, applied in fp32), residual, a
  strided 1x1 downsample conv with its own BN and ReLU all happen in that launch, so a block's tail
  ``relu(bn3(conv3(h)) + bn_d(conv_d(x)))`` never materialises its two branches. Backward: the reference
  backend's (:func:`~resnet_fused.backends.reference.conv_bn_act_backward`).
* ``conv_bn_train`` (training path, NormConv scheme): a convolution with its BatchNorm finalized from the batch
  statistics inside the same launch (scale/shift, running statistics, ``num_batches_tracked``);
  ``conv_stats``, ``scale_bias_add_relu``: see :mod:`.train`; ``finalize``, the BatchNorm finalize
  :mod:`resnet_fused.norm` calls after ``conv_stats`` (SyncBN: after its all-reduce; one launch): see :mod:`.stats`.
* ``tile_configs()``: the tile config each convolution shape ran with (benchmark provenance); convolutions run
  one fixed config per shape, bit-reproducible across runs and ranks, under ``RESNET_FUSED_DETERMINISTIC=1`` or
  ``torch.use_deterministic_algorithms(True)`` (:func:`.conv.deterministic`).

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

__all__ = ["NAME", "unsupported", "conv_bn_act"]
if _IMPORT_ERROR is None:
    from ._launch import launch_count, reset_launch_count
    from .conv import SUPPORTED_DTYPES, conv2d_fused, deterministic, tile_configs
    from .stats import finalize
    from .train import bn_relu, conv_bn_train, conv_stats, scale_bias_add_relu

    __all__ += ["bn_relu", "conv_stats", "conv_bn_train", "scale_bias_add_relu", "finalize", "conv2d_fused", "tile_configs",
                "deterministic", "launch_count", "reset_launch_count"]


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


class ConvBnActFunction(reference.ConvBnActFunction):
    """``y = act(bn(conv(x, W)) + residual + bn_d(conv1x1(x_d, W_d)))`` in one kernel launch; backward is the
    reference backend's (same saved tensors)."""

    @staticmethod
    def forward(ctx, x, weight, bn_w, bn_b, bn_mean, bn_var, residual, sx, sw, sbn_w, sbn_b, sbn_mean, sbn_var,
                conf):
        stride, padding, dilation, groups, eps, s_eps, s_stride, relu = conf
        shortcut_bn = reference.EvalBN(sbn_w, sbn_b, sbn_mean, sbn_var, s_eps) if sx is not None else None
        y = conv2d_fused(x, weight, reference.EvalBN(bn_w, bn_b, bn_mean, bn_var, eps), stride, padding, dilation,
                         groups, residual=residual, shortcut_x=sx, shortcut_weight=sw, shortcut_bn=shortcut_bn,
                         shortcut_stride=s_stride, relu=relu)
        reference.conv_bn_act_save(ctx, x, weight, bn_w, bn_b, bn_mean, bn_var, residual, sx, sw, sbn_w, sbn_b,
                                   sbn_mean, sbn_var, conf, y)
        return y


def conv_bn_act(x: Tensor, weight: Tensor, bn: reference.EvalBN, stride=1, padding=0, dilation=1, groups: int = 1,
                residual: Tensor | None = None, shortcut: reference.Shortcut | None = None,
                relu: bool = True) -> Tensor:
    """``act(bn(conv2d(x, weight)) + residual + shortcut.bn(conv1x1(shortcut.x, shortcut.weight)))`` with
    ``act = relu`` if ``relu`` else identity and each BN applied from its live tensors in the epilogue; one
    kernel launch, differentiable in every tensor argument. Output in x's dtype and memory format."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"resnet_fused triton backend: {_IMPORT_ERROR}")
    args = reference.conv_bn_act_args(x, weight, bn, stride, padding, dilation, groups, residual, shortcut, relu,
                                      "triton conv_bn_act")
    return ConvBnActFunction.apply(*args)
