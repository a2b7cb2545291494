"""C++/CUDA backend: the ops of the ``resnet_fused._C`` extension (sources in ``csrc/``).

What is fused, and why:

* ``scale_bias_add_relu`` — the training tail ``relu(c*s + t + idn)`` (or ``+ idn*s_d + t_d`` with a downsample
  branch) is one vectorized memory pass over c and idn instead of eager's chain of elementwise kernels.
* ``conv_bias_act`` — the inference conv. float16 / bfloat16 channels_last calls that the CUTLASS kernels cover
  (groups 1, C and K multiples of 8, dense 16-byte aligned operands, compute capability >= 8.0, extension built
  with the CUTLASS headers: ``build_info()["cutlass"]``): an implicit-GEMM conv on tensor cores with bias +
  residual + ReLU in its epilogue, one launch (two with a downsample shortcut: the 1x1 shortcut conv plus the
  residual into a temporary, then the main conv adding it). Everything else (float32, NCHW, other channel counts,
  groups > 1): cuDNN (``at::convolution``) for the main and the 1x1 shortcut convolution, then ONE epilogue kernel
  for bias + shortcut + residual + ReLU (instead of separate bias, add and ReLU passes).
* ``conv_stats`` — no CUDA version yet: delegates to the reference backend.

The extension registers the ops with the dispatcher (``torch.ops.resnet_fused.*``, CPU and CUDA kernels). This
module loads it lazily and adds the Python halves of each op: a fake kernel (so ``torch.compile`` traces it) and
autograd. Backward is written in PyTorch ops: ReLU mask from the saved output, per-channel sums for bias /
scale / shift, ``aten.convolution_backward`` for the convolutions.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

NAME = "cuda"

_NOT_BUILT = "resnet_fused._C is not built: reinstall with CUDA_HOME set (pip install --no-build-isolation -e .)"
_NO_CUDA = ("resnet_fused._C was built without CUDA (no CUDA toolkit or RESNET_FUSED_FORCE_CPU_EXT at build "
            "time): reinstall with CUDA_HOME set (pip install --no-build-isolation -e .)")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CHANNEL_DIMS = (0, 2, 3)

_ext: ModuleType | None = None
_ext_info: dict | None = None
_load_error: str | None = None


def _load() -> ModuleType | None:
    """Import ``resnet_fused._C`` once and register its fake and autograd kernels; None if it is not built."""
    global _ext, _ext_info, _load_error
    if _ext is None and _load_error is None:
        try:
            ext = importlib.import_module("resnet_fused._C")
        except ImportError as err:
            _load_error = f"{_NOT_BUILT} [{err}]"
            return None
        _register()
        _ext, _ext_info = ext, ext.build_info()
    return _ext


def is_built() -> bool:
    """Whether the extension ``resnet_fused._C`` can be imported."""
    return _load() is not None


def build_info() -> dict | None:
    """``resnet_fused._C.build_info()`` (with_cuda, cuda_version, archs as SM numbers, torch_version, and cutlass:
    the CUTLASS version of the tensor-core conv kernels, e.g. "4.2.0", or None when built without them), or None
    when the extension is not built."""
    return None if _load() is None else dict(_ext_info)


def unsupported(x: Tensor, groups: int = 1, dilation: int = 1) -> str | None:
    """Why this backend cannot run input ``x`` (None when it can); groups and dilation are all supported."""
    if _load() is None:
        return _load_error
    if not _ext_info["with_cuda"]:
        return _NO_CUDA
    if x.device.type != "cuda":
        return f"the cuda backend runs CUDA tensors only, got a tensor on {x.device}"
    if x.dtype not in _DTYPES:
        return f"the cuda backend supports float32, float16 and bfloat16, got {x.dtype}"
    return None


def _require() -> None:
    if _load() is None:
        raise RuntimeError(_load_error)


def _pair(v) -> list[int]:
    return [int(i) for i in v] if isinstance(v, (tuple, list)) else [int(v), int(v)]


def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor | None, stride=1, padding=0, dilation=1, groups=1,
                  residual: Tensor | None = None, shortcut_x: Tensor | None = None,
                  shortcut_weight: Tensor | None = None, shortcut_stride=1, relu: bool = True) -> Tensor:
    """``act(conv2d(x, W) + bias + conv1x1(shortcut_x, W_s) + residual)``: ``torch.ops.resnet_fused.conv_bias_act``."""
    _require()
    return torch.ops.resnet_fused.conv_bias_act(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation),
                                                int(groups), residual, shortcut_x, shortcut_weight,
                                                _pair(shortcut_stride), bool(relu))


def scale_bias_add_relu(c: Tensor, scale: Tensor, shift: Tensor, idn: Tensor, idn_scale: Tensor | None = None,
                        idn_shift: Tensor | None = None) -> Tensor:
    """``relu(c*scale + shift + (idn*idn_scale + idn_shift or idn))``: ``ops.resnet_fused.scale_bias_add_relu``."""
    _require()
    return torch.ops.resnet_fused.scale_bias_add_relu(c, scale, shift, idn, idn_scale, idn_shift)


def conv_stats(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups=1,
               in_scale: Tensor | None = None, in_shift: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Training-path conv with BN+ReLU prologue and per-channel stats.

    No CUDA kernel exists for it yet: this delegates to :func:`resnet_fused.backends.reference.conv_stats`.
    """
    from . import reference

    return reference.conv_stats(x, weight, stride, padding, dilation, groups, in_scale, in_shift)


# Fake (meta) kernels: output shape, dtype and strides exactly as the C++ kernels produce them (dense in the
# input's suggested memory format, which torch's suggest_memory_format mirrors).

def _conv_bias_act_fake(x, weight, bias, stride, padding, dilation, groups, residual, shortcut_x, shortcut_weight,
                        shortcut_stride, relu):
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return torch.empty((n, k, p, q), dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


def _scale_bias_add_relu_fake(c, scale, shift, idn, idn_scale, idn_shift):
    return torch.empty(c.shape, dtype=c.dtype, device=c.device, memory_format=suggest_memory_format(c))


# Autograd. For y = act(z): dz = threshold_backward(dy, y, 0) = dy * [y > 0] (as torch.relu's backward).

def _conv_bias_act_setup_context(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, groups, residual, shortcut_x, shortcut_weight, shortcut_stride,
     relu) = inputs
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.shortcut_stride = list(shortcut_stride)
    ctx.relu = relu
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, shortcut_x, shortcut_weight, output if relu else None)


def _conv_bias_act_backward(ctx, grad):
    """dz = dy*[y>0]; db = Σ_{n,h,w} dz; d(residual) = dz; (dx, dW), (dx_s, dW_s) = convolution_backward(dz, ...)."""
    x, weight, shortcut_x, shortcut_weight, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    need = ctx.needs_input_grad
    g = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.relu else grad
    gx = gw = gb = gres = gsx = gsw = None
    if need[0] or need[1]:
        gx, gw, _ = torch.ops.aten.convolution_backward(g, x, weight, None, stride, padding, dilation, False, [0, 0],
                                                        groups, [need[0], need[1], False])
    if need[2]:
        gb = g.sum(_CHANNEL_DIMS, dtype=torch.promote_types(g.dtype, torch.float32)).to(ctx.bias_dtype)
    if need[7]:
        gres = g
    if shortcut_x is not None and (need[8] or need[9]):
        gsx, gsw, _ = torch.ops.aten.convolution_backward(g, shortcut_x, shortcut_weight, None, ctx.shortcut_stride,
                                                          [0, 0], [1, 1], False, [0, 0], 1, [need[8], need[9], False])
    return gx, gw, gb, None, None, None, None, gres, gsx, gsw, None, None


def _scale_bias_add_relu_setup_context(ctx, inputs, output):
    c, scale, shift, idn, idn_scale, idn_shift = inputs
    ctx.save_for_backward(c, scale, idn, idn_scale, output)
    ctx.param_dtypes = (scale.dtype, shift.dtype, None if idn_scale is None else idn_scale.dtype,
                        None if idn_shift is None else idn_shift.dtype)


def _scale_bias_add_relu_backward(ctx, grad):
    """g = dout*[out>0] (fp32); dc = g*s; ds = Σ g*c; dt = Σ g; didn = g*s_d or g; ds_d = Σ g*idn; dt_d = Σ g."""
    c, scale, idn, idn_scale, out = ctx.saved_tensors
    scale_dtype, shift_dtype, idn_scale_dtype, idn_shift_dtype = ctx.param_dtypes
    need = ctx.needs_input_grad
    acc = torch.promote_types(c.dtype, torch.float32)
    g = torch.ops.aten.threshold_backward(grad, out, 0).to(acc)
    gc = (g * scale.to(acc).view(1, -1, 1, 1)).to(c.dtype) if need[0] else None
    gs = (g * c.to(acc)).sum(_CHANNEL_DIMS).to(scale_dtype) if need[1] else None
    gt = g.sum(_CHANNEL_DIMS).to(shift_dtype) if need[2] else None
    if idn_scale is None:
        gidn = g.to(idn.dtype) if need[3] else None
        return gc, gs, gt, gidn, None, None
    gidn = (g * idn_scale.to(acc).view(1, -1, 1, 1)).to(idn.dtype) if need[3] else None
    gis = (g * idn.to(acc)).sum(_CHANNEL_DIMS).to(idn_scale_dtype) if need[4] else None
    gish = g.sum(_CHANNEL_DIMS).to(idn_shift_dtype) if need[5] else None
    return gc, gs, gt, gidn, gis, gish


def _register() -> None:
    """Attach the fake and autograd kernels to the ops that loading ``resnet_fused._C`` defined."""
    torch.library.register_fake("resnet_fused::conv_bias_act")(_conv_bias_act_fake)
    torch.library.register_fake("resnet_fused::scale_bias_add_relu")(_scale_bias_add_relu_fake)
    torch.library.register_autograd("resnet_fused::conv_bias_act", _conv_bias_act_backward,
                                    setup_context=_conv_bias_act_setup_context)
    torch.library.register_autograd("resnet_fused::scale_bias_add_relu", _scale_bias_add_relu_backward,
                                    setup_context=_scale_bias_add_relu_setup_context)
