"""C++/CUDA backend: the ops of the ``resnet_fused._C`` extension (sources in ``csrc/``).

What is fused, and why:

* ``conv_bias_act`` — the inference conv. float16 / bfloat16 channels_last calls that the CUTLASS kernels cover
  (groups 1, C and K multiples of 8, dense 16-byte aligned operands, compute capability >= 8.0, extension built
  with the CUTLASS headers: ``build_info()["cutlass"]``): an implicit-GEMM conv on tensor cores with bias +
  residual + ReLU in its epilogue, one launch (two with a downsample shortcut: the 1x1 shortcut conv plus the
  residual into a temporary, then the main conv adding it). Everything else (float32, NCHW, other channel counts,
  groups > 1): cuDNN (``at::convolution``) for the main and the 1x1 shortcut convolution, then ONE epilogue kernel
  for bias + shortcut + residual + ReLU (instead of separate bias, add and ReLU passes).
* ``conv_stats`` — the training conv (NormConv, DESIGN.md). Calls the CUTLASS kernels cover (as above): an
  implicit-GEMM conv on tensor cores whose epilogue also writes per-tile Σ/Σ² of the stored output, merged per
  channel in a fixed order (deterministic). The previous BN+ReLU is applied on load for float16; for bfloat16 it
  is one exact vectorized pass before the kernel, because the on-load version rounds scale and shift to bfloat16
  (``RESNET_FUSED_BF16_PROLOGUE_ON_LOAD=1`` opts in to it). Everything else: that pass, cuDNN, then the
  per-channel batch mean and biased variance in ONE read of the output (Welford per thread, a deterministic merge
  of per-block partials) — instead of eager's BN-apply, ReLU and two-pass statistics.
* ``finalize`` (``bn_finalize``) — BN's batch statistics to per-channel ``scale``/``shift`` and the running-statistics
  update in one launch instead of about ten tiny ones; :mod:`resnet_fused.norm` calls it (SyncBN's all-reduce,
  ``num_batches_tracked`` and ``momentum=None`` stay there).
* ``bn_relu`` (``affine_relu``) — a BatchNorm + ReLU on its own (the ResNet stem's in training): one pass, and
  one pass back with the ReLU mask recomputed from the saved input.
* ``scale_bias_add_relu`` — the training tail ``relu(c*s + t + idn)`` (or ``+ idn*s_d + t_d`` with a downsample
  branch) is one vectorized memory pass over c and idn instead of eager's chain of elementwise kernels.

Backward keeps what NormConv keeps: ``conv_stats`` saves x, W, in_scale, in_shift, c and mean; the tail saves its
inputs, not its output. Its passes are fused kernels too: ``conv_stats_backward_input`` (the gradient through the
statistics), ``affine_relu`` (the activated input recomputed for the weight gradient), ``affine_relu_backward``
(dx with Σ g·x and Σ g in one pass) and ``scale_bias_add_relu_backward`` (ReLU mask recomputed from the inputs, dc,
didn and the per-channel sums in one pass), around ``aten.convolution_backward`` for the convolutions.

The extension registers the ops with the dispatcher (``torch.ops.resnet_fused.*``, CPU and CUDA kernels). This
module loads it lazily and adds the Python halves of each op: a fake kernel (so ``torch.compile`` traces it) and
autograd (``torch.library.register_autograd``; an ``autograd.Function`` for ``bn_finalize``, which mutates the
running statistics).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import reference

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


def conv_bn_act(x: Tensor, weight: Tensor, bn: reference.EvalBN, stride=1, padding=0, dilation=1, groups=1,
                residual: Tensor | None = None, shortcut: reference.Shortcut | None = None,
                relu: bool = True) -> Tensor:
    """The eval conv with its BatchNorm applied from the live BN tensors (see
    :func:`resnet_fused.backends.reference.conv_bn_act`).

    Composed from this extension's ops: the convolution(s) by ``conv_bias_act`` without epilogue, then one fused
    per-channel pass (``scale_bias_add_relu`` or ``affine_relu``) applying each BN's scale and shift in fp32, the
    residual or the shortcut branch and the ReLU; the per-channel ``s``/``t`` come from the BN tensors on every
    call. Differentiable in every tensor argument through those ops' autograd.
    """
    _require()
    reference.conv_bn_act_args(x, weight, bn, stride, padding, dilation, groups, residual, shortcut, relu,
                               "cuda conv_bn_act")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale, shift = reference.eval_scale_shift(bn, acc)
    c = conv_bias_act(x, weight, None, stride, padding, dilation, groups, relu=False)
    if shortcut is not None:
        c_d = conv_bias_act(shortcut.x, shortcut.weight, None, shortcut.stride, 0, relu=False)
        s_d, t_d = reference.eval_scale_shift(shortcut.bn, acc)
        if relu:
            return scale_bias_add_relu(c, scale, shift, c_d, s_d, t_d)
        residual = reference.affine(c_d, s_d, t_d) if residual is None else residual + reference.affine(c_d, s_d,
                                                                                                          t_d)
    if relu and residual is not None:
        return scale_bias_add_relu(c, scale, shift, residual)
    if relu:
        return bn_relu(c, scale, shift)
    y = reference.affine(c, scale, shift)
    return y if residual is None else (y + residual).to(x.dtype)


def scale_bias_add_relu(c: Tensor, scale: Tensor, shift: Tensor, idn: Tensor, idn_scale: Tensor | None = None,
                        idn_shift: Tensor | None = None) -> Tensor:
    """``relu(c*scale + shift + (idn*idn_scale + idn_shift or idn))``: ``ops.resnet_fused.scale_bias_add_relu``."""
    _require()
    return torch.ops.resnet_fused.scale_bias_add_relu(c, scale, shift, idn, idn_scale, idn_shift)


def bn_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``relu(x*scale + shift)`` in one pass, differentiable, saving only its inputs (a BatchNorm + ReLU on its
    own, like the ResNet stem's): ``torch.ops.resnet_fused.affine_relu``."""
    _require()
    return torch.ops.resnet_fused.affine_relu(x, scale, shift)


def conv_stats(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups=1,
               in_scale: Tensor | None = None, in_shift: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(c, mean, var)``: ``c = conv2d(relu(x*in_scale + in_shift) or x, W)`` and its per-channel batch mean and
    biased variance: ``torch.ops.resnet_fused.conv_stats``."""
    _require()
    return torch.ops.resnet_fused.conv_stats(x, weight, _pair(stride), _pair(padding), _pair(dilation), int(groups),
                                             in_scale, in_shift)


def finalize(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
             running_var: Tensor | None, count: int, momentum_factor: float, eps: float) -> tuple[Tensor, Tensor]:
    """BN finalize hook of :func:`resnet_fused.norm.batch_scale_shift`: ``(scale, shift)`` from the batch statistics,
    updating ``running_mean``/``running_var`` in place with ``momentum_factor`` (when given).

    Differentiable in mean, var, weight and bias. Running statistics of another dtype than ``mean`` (a half
    model's buffers) are updated through temporaries in ``mean``'s dtype.
    """
    _require()
    temporaries = running_mean is not None and running_mean.dtype != mean.dtype
    rm, rv = (running_mean.to(mean.dtype), running_var.to(mean.dtype)) if temporaries else (running_mean, running_var)
    scale, shift = _BnFinalize.apply(mean, var, weight, bias, rm, rv, float(count), float(momentum_factor),
                                     float(eps))
    if temporaries:
        running_mean.copy_(rm)
        running_var.copy_(rv)
    return scale, shift


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
    return _like(c)


def _like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A new tensor of t's shape, dense in t's suggested memory format (as the C++ kernels allocate it)."""
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device, memory_format=suggest_memory_format(t))


def _channel_vec(t: Tensor, size: int | None = None) -> Tensor:
    """A per-channel vector of activation t in its op-math dtype (float64 for float64 t, else float32)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.new_empty((t.shape[1] if size is None else size,), dtype=acc)


def _conv_stats_fake(x, weight, stride, padding, dilation, groups, in_scale, in_shift):
    c = _conv_bias_act_fake(x, weight, None, stride, padding, dilation, groups, None, None, None, None, False)
    return c, _channel_vec(c), _channel_vec(c)


def _affine_relu_fake(x, scale, shift):
    return _like(x)


def _conv_stats_backward_input_fake(c, mean, dc, dmean, dvar):
    return _like(c)


def _affine_relu_backward_fake(da, x, scale, shift):
    return _like(x), _channel_vec(x), _channel_vec(x)


def _scale_bias_add_relu_backward_fake(dout, c, scale, shift, idn, idn_scale, idn_shift):
    didn_scale = _channel_vec(c, None if idn_scale is not None else 0)
    return _like(c), _like(c, idn.dtype), _channel_vec(c), _channel_vec(c), didn_scale


def _bn_finalize_fake(mean, var, weight, bias, running_mean, running_var, count, momentum_factor, eps):
    return mean.new_empty(mean.shape), mean.new_empty(mean.shape)


# Autograd. For y = act(z): dz = threshold_backward(dy, y, 0) = dy * [y > 0] (as torch.relu's backward).

def _conv_bias_act_setup_context(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, groups, _residual, shortcut_x, shortcut_weight, shortcut_stride,
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


def _conv_stats_setup_context(ctx, inputs, output):
    x, weight, stride, padding, dilation, groups, in_scale, in_shift = inputs
    c, mean, _ = output
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.save_for_backward(x, weight, in_scale, in_shift, c, mean)
    ctx.set_materialize_grads(False)


def _conv_stats_backward(ctx, dc, dmean, dvar):
    """dc' = dc + dmean/n + dvar·2(c − mean)/n (one pass); (da, dW) = convolution_backward(dc', a, W), where the
    weight gradient recomputes a = relu(x*s + t); then through the prologue in one pass: g = da·[x*s + t > 0],
    dx = g*s, ds = Σ g·x, dt = Σ g."""
    x, weight, in_scale, in_shift, c, mean = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    need = ctx.needs_input_grad
    none = (None,) * 8
    prologue = in_scale is not None
    need_a = need[0] or (prologue and (need[6] or need[7]))
    if (dc is None and dmean is None and dvar is None) or not (need_a or need[1]):
        return none
    g = torch.ops.resnet_fused.conv_stats_backward_input(c, mean, dc, dmean, dvar)
    # the weight gradient needs the activated input; the input gradient only its shape
    a = torch.ops.resnet_fused.affine_relu(x, in_scale, in_shift) if prologue and need[1] else x
    da, dw, _ = torch.ops.aten.convolution_backward(g, a, weight, None, stride, padding, dilation, False, [0, 0],
                                                    groups, [need_a, need[1], False])
    del a, g
    if da is None or not prologue:
        return da, dw, None, None, None, None, None, None
    dx, ds, dt = torch.ops.resnet_fused.affine_relu_backward(da, x, in_scale, in_shift)
    return (dx if need[0] else None), dw, None, None, None, None, (ds if need[6] else None), (dt if need[7] else None)


def _scale_bias_add_relu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _scale_bias_add_relu_backward(ctx, grad):
    """One pass: g = dout·[z > 0] with z recomputed from the saved inputs; dc = g*s, ds = Σ g·c, dt = Σ g,
    didn = g (or g*s_d, with ds_d = Σ g·idn and dt_d = Σ g)."""
    c, scale, shift, idn, idn_scale, idn_shift = ctx.saved_tensors
    need = ctx.needs_input_grad
    dc, didn, ds, dt, dsd = torch.ops.resnet_fused.scale_bias_add_relu_backward(grad, c, scale, shift, idn,
                                                                                idn_scale, idn_shift)
    dual = idn_scale is not None
    # dt_d equals dt: a copy, so the two gradients never share storage
    return ((dc if need[0] else None), (ds if need[1] else None), (dt if need[2] else None),
            (didn if need[3] else None), (dsd if dual and need[4] else None),
            (dt.clone() if dual and need[5] else None))


def _affine_relu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _affine_relu_backward(ctx, grad):
    """One pass: g = da·[x*s + t > 0] with the mask recomputed; dx = g*s, ds = Σ g·x, dt = Σ g."""
    dx, ds, dt = torch.ops.resnet_fused.affine_relu_backward(grad, *ctx.saved_tensors)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), (ds if need[1] else None), (dt if need[2] else None)


class _BnFinalize(torch.autograd.Function):
    """``(scale, shift) = bn_finalize(mean, var, γ, β, ...)`` with the running-statistics update as a side effect.

    Backward (tiny per-channel vectors, PyTorch ops), invstd = 1/√(var + eps): with ``ds' = dscale − mean·dshift``:
    ``dγ = ds'·invstd``, ``dβ = dshift``, ``dmean = −scale·dshift``, ``dvar = −½·ds'·γ·invstd³``.
    """

    @staticmethod
    def forward(ctx, mean, var, weight, bias, running_mean, running_var, count, momentum_factor, eps):
        scale, shift = torch.ops.resnet_fused.bn_finalize(mean, var, weight, bias, running_mean, running_var, count,
                                                          momentum_factor, eps)
        ctx.eps = eps
        ctx.save_for_backward(mean, var, weight, scale)
        ctx.set_materialize_grads(False)
        return scale, shift

    @staticmethod
    def backward(ctx, dscale, dshift):
        mean, var, weight, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        invstd = torch.rsqrt(var + ctx.eps)
        ds = dscale
        if dshift is not None:
            ds = -mean * dshift if ds is None else ds - mean * dshift
        dmean = -scale * dshift if need[0] and dshift is not None else None
        dvar = dweight = None
        if ds is not None:
            dweight = ds * invstd if need[2] else None
            if need[1]:
                dinvstd = ds if weight is None else ds * weight
                dvar = dinvstd * (-0.5) * invstd.pow(3)
        dbias = dshift if need[3] else None
        return dmean, dvar, dweight, dbias, None, None, None, None, None


def _register() -> None:
    """Attach the fake and autograd kernels to the ops that loading ``resnet_fused._C`` defined."""
    for name, fake in (("conv_bias_act", _conv_bias_act_fake), ("scale_bias_add_relu", _scale_bias_add_relu_fake),
                       ("conv_stats", _conv_stats_fake), ("affine_relu", _affine_relu_fake),
                       ("conv_stats_backward_input", _conv_stats_backward_input_fake),
                       ("affine_relu_backward", _affine_relu_backward_fake),
                       ("scale_bias_add_relu_backward", _scale_bias_add_relu_backward_fake),
                       ("bn_finalize", _bn_finalize_fake)):
        torch.library.register_fake(f"resnet_fused::{name}")(fake)
    for name, backward, setup_context in (
            ("conv_bias_act", _conv_bias_act_backward, _conv_bias_act_setup_context),
            ("scale_bias_add_relu", _scale_bias_add_relu_backward, _scale_bias_add_relu_setup_context),
            ("conv_stats", _conv_stats_backward, _conv_stats_setup_context),
            ("affine_relu", _affine_relu_backward, _affine_relu_setup_context)):
        torch.library.register_autograd(f"resnet_fused::{name}", backward, setup_context=setup_context)
