"""C++/CUDA backend: the ops of the ``resnet_fused._C`` extension (sources in ``csrc/``).

What is fused, and why:

* ``conv_bn_act`` — the inference conv with its BatchNorm(s) applied from the live BN tensors on every call
  (``s = γ/√(σ²+ε)``, ``t = β − μ·s`` in fp32; never a folded or cached copy). float16 / bfloat16 channels_last
  calls that the CUTLASS kernels cover (groups 1, C and K multiples of 8, dense 16-byte aligned operands, compute
  capability >= 8.0, extension built with the CUTLASS headers: ``build_info()["cutlass"]``): one tiny launch
  computing the (s, t) pairs, then an implicit-GEMM conv on tensor cores with ``acc·s + t`` + residual + ReLU in
  its epilogue (two conv launches with a downsample shortcut: the 1x1 shortcut conv with its BN plus the residual
  into a temporary, then the main conv adding it). Everything else (float32, NCHW, other channel counts, groups >
  1): cuDNN (``at::convolution``) for the main and the 1x1 shortcut convolution, then ONE channel pass that
  computes both BNs' (s, t) from their tensors and applies them, the residual and the ReLU. Backward: the
  reference backend's :func:`~resnet_fused.backends.reference.conv_bn_act_grads` (shared by every backend).
  NCHW filters are copied to KRSC for the CUTLASS kernels on every call (no weight cache: an in-place edit
  through ``.data`` bumps no version counter, so any cache could serve stale weights); a channels_last model
  (``model.to(memory_format=torch.channels_last)``) already holds KRSC filters and pays nothing.
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
statistics), then ``conv_stats_backward_conv`` (the convolution's backward: dW with the activated input recomputed
— by an ``affine_relu`` pass, or on load inside cuDNN's wgrad graph — and dgrad followed by ``affine_relu_backward``,
dx with Σ g·x and Σ g in one pass, the ReLU mask fused into cuDNN's dgrad graph on the cudnn engine), and
``scale_bias_add_relu_backward`` (ReLU mask recomputed from the inputs, dc, didn and the per-channel sums in one
pass).

Engines: ``conv_bn_act``, ``conv_stats`` and ``conv_stats_backward_conv`` on CUDA tensors each have several
implementations — ``cudnn`` (cuDNN's fusion graphs, csrc/cudnn/, when built with the cuDNN frontend; for
``conv_stats`` the genstats graph, every channel whose variance its fp32 sums cannot resolve recomputed exactly),
``cutlass`` (the CUTLASS kernels above; forward only) and ``plain`` (cuDNN's convolution plus the fused passes above;
runs everything). The op
tries them in the order its ``engines`` argument gives, an engine that cannot run a call declining with its reason.
The order is chosen per (op, shape, dtype): ``forced_engine(name)`` or ``RESNET_FUSED_CUDA_ENGINE=name`` forces one
(a call it cannot run raises ``RuntimeError`` with its reason); otherwise each engine is timed on the key's first
eager call on the GPU and the fastest goes first, remembered in memory and on disk (``cuda_engines.json`` beside
``dispatch.json``, the measured choices of ``auto``, :mod:`resnet_fused.dispatch`); :func:`engine_choices` reports
what was chosen and what ran.

The extension registers the ops with the dispatcher (``torch.ops.resnet_fused.*``, CPU and CUDA kernels). This
module loads it lazily and adds the Python halves of each op: a fake kernel (so ``torch.compile`` traces it) and
autograd (``torch.library.register_autograd``; an ``autograd.Function`` for ``bn_finalize``, which mutates the
running statistics).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import dispatch
from ..dispatch import ENGINES, ENV_ENGINE, forced, forced_engine  # noqa: F401 (cuda.forced_engine: public API)
from . import reference

NAME = "cuda"

_NOT_BUILT = "resnet_fused._C is not built: reinstall with CUDA_HOME set (pip install --no-build-isolation -e .)"
_NO_CUDA = ("resnet_fused._C was built without CUDA (no CUDA toolkit or RESNET_FUSED_FORCE_CPU_EXT at build "
            "time): reinstall with CUDA_HOME set (pip install --no-build-isolation -e .)")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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


def conv_bn_act(x: Tensor, weight: Tensor, bn: reference.EvalBN, stride=1, padding=0, dilation=1, groups=1,
                residual: Tensor | None = None, shortcut: reference.Shortcut | None = None,
                relu: bool = True) -> Tensor:
    """The eval conv with its BatchNorm applied from the live BN tensors (see
    :func:`resnet_fused.backends.reference.conv_bn_act`): ``torch.ops.resnet_fused.conv_bn_act``, differentiable
    in every tensor argument (backward: :func:`reference.conv_bn_act_grads`)."""
    _require()
    (x, weight, bn_w, bn_b, bn_mean, bn_var, residual, sx, sw, sbn_w, sbn_b, sbn_mean, sbn_var,
     conf) = reference.conv_bn_act_args(x, weight, bn, stride, padding, dilation, groups, residual, shortcut, relu,
                                        "cuda conv_bn_act")
    _, _, _, _, eps, s_eps, s_stride, relu = conf
    args = (x, weight, bn_w, bn_b, bn_mean, bn_var, eps, _pair(stride), _pair(padding), _pair(dilation), int(groups),
            residual, sx, sw, sbn_w, sbn_b, sbn_mean, sbn_var, s_eps, _pair(s_stride), relu)
    key = _shape_key("conv_bn_act", x, weight, *args[7:11], residual is not None, sx, s_stride, relu)
    engines = _engines_for(x, key, lambda engine: torch.ops.resnet_fused.conv_bn_act(*_detached(args), engine))
    y = torch.ops.resnet_fused.conv_bn_act(*args, engines)
    _record_ran(x, key)
    return y


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
    args = (x, weight, _pair(stride), _pair(padding), _pair(dilation), int(groups), in_scale, in_shift)
    key = _shape_key("conv_stats", x, weight, *args[2:6], in_scale is not None)
    engines = _engines_for(x, key, lambda engine: torch.ops.resnet_fused.conv_stats(*_detached(args), engine))
    out = torch.ops.resnet_fused.conv_stats(*args, engines)
    _record_ran(x, key)
    return out


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


# Engines. conv_bn_act and conv_stats each have several CUDA implementations ("engines"): the cuDNN fusion graphs
# (csrc/cudnn/, when built with the frontend), the CUTLASS kernels, and "plain" (cuDNN's convolution plus this
# extension's fused passes, which runs everything). The C++ ops take the engines to try, in order, as a string
# ("auto": cudnn, cutlass, plain); an engine that cannot run a call declines with its reason and the next one
# runs it; when none of them can (a single forced engine), the op raises a RuntimeError with the reasons.
# Which order a call gets is decided here, per (op, shape, dtype) key:
#   * forced: ``forced_engine(name)`` (innermost first), else ``RESNET_FUSED_CUDA_ENGINE``: that engine only;
#   * measured: on the key's first eager call on a GPU (never while torch.compile traces or a CUDA graph is
#     captured) each engine runs the call alone and is timed; the fastest goes first, then the default order.
#     The result is kept for the process and on disk, in ``cuda_engines.json`` beside ``auto``'s choices
#     (``RESNET_FUSED_CACHE_DIR``), under the environment key of :func:`dispatch.env_key` (GPU, versions) so a
#     new GPU, driver stack or build measures again; ``auto`` itself races each engine per block (it forces one
#     at a time), so this order serves ``backend="cuda"``;
#   * otherwise (CPU tensors, tracing or capturing with nothing stored): "auto".

ENGINE_CACHE_FILE = "cuda_engines.json"
_DECLINED = "cannot run this call"  # in the C++ ops' error when the one engine they were given declines
_MEASURE_REPS = 5

# device-qualified op key -> {"engine", "ms", "declined", "errors"}; op key -> what ran its last eager call
_engine_memory: dict[str, dict] = {}
_engine_ran: dict[str, str] = {}


def engine_choices() -> dict:
    """What this process decided and ran, per op key (the benchmark's provenance):
    ``{key: {"engine": the measured fastest or None, "ms": {engine: median ms}, "declined": {engine: reason},
    "errors": {engine: error}, "ran": what ran the key's last eager call, e.g. "cutlass 128x64x64/3 swizzle 1"}}``.
    A key run only under a forced engine, or without a measurement, has only ``"ran"``."""
    out: dict[str, dict] = {}
    for key, entry in _engine_memory.items():
        out[key.split("|", 1)[1]] = dict(entry)
    for key, ran in _engine_ran.items():
        out.setdefault(key, {})["ran"] = ran
    return out


def clear_engine_memory() -> None:
    """Forget this process's measured engine choices and what ran (the disk cache stays)."""
    _engine_memory.clear()
    _engine_ran.clear()


def engine_cache_path() -> Path:
    """The JSON file of measured engine choices: ``cuda_engines.json`` beside ``auto``'s ``auto_backend.json``."""
    return dispatch.cache_path(ENGINE_CACHE_FILE)


def _read_engine_disk() -> dict:
    return dispatch.read_table(engine_cache_path())


def _write_engine_disk(env: str, key: str, entry: dict) -> None:
    """Stored under the file lock, merged with other processes' entries (:func:`dispatch.store`)."""
    dispatch.store(engine_cache_path(), env, key, entry)


def _cuda_time(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` over _MEASURE_REPS CUDA-event-timed calls, after one untimed call (which raises
    if the engine declines): ``auto``'s timer."""
    return dispatch.cuda_timer(fn, _MEASURE_REPS)


def measure_engines(run: Callable[[str], object], timer: Callable[[Callable[[], object]], float] = _cuda_time,
                    engines: tuple[str, ...] = ENGINES) -> dict:
    """Time ``run(engine)`` (one op call on that engine alone) for every engine; returns ``{"engine": fastest or
    None, "ms": {engine: ms}, "declined": {engine: reason}, "errors": {engine: error}}``. An engine that declines
    the call (the op's "cannot run this call" error) or fails is left out of the race, with its reason."""
    ms, declined, errors = {}, {}, {}
    with torch.no_grad():
        for engine in engines:
            try:
                ms[engine] = round(timer(lambda engine=engine: run(engine)), 5)
            except RuntimeError as err:
                message = str(err).split("\n")[0]
                if _DECLINED in message:
                    declined[engine] = message.split(f"{_DECLINED}: ", 1)[-1]
                else:  # a failing engine must not take the call down: the others still run it
                    errors[engine] = f"{type(err).__name__}: {message}"
                    warnings.warn(f"resnet_fused: cuda engine {engine!r} failed while being measured ({message})",
                                  RuntimeWarning, stacklevel=3)
    best = min(ms, key=ms.get) if ms else None
    return {"engine": best, "ms": ms, "declined": declined, "errors": errors}


def _measuring_allowed() -> bool:
    return not dispatch.tracing()


def _order(best: str | None) -> str:
    """The engine argument of the ops for a measured fastest engine: it first, then the default order."""
    return "auto" if best is None else ",".join((best,) + tuple(e for e in ENGINES if e != best))


def _engines_for(x: Tensor, key: str, run: Callable[[str], object],
                 measure: Callable[..., dict] | None = None) -> str:
    """The engine argument for one call of the op of ``key`` on input ``x`` (see the comment above ENGINES); CPU
    tensors (the extension's CPU kernels, one implementation) always get "auto"."""
    if x.device.type != "cuda":
        return "auto"
    if reference.is_tracing(x):
        return _traced_order(x.device, x.dtype, key)
    engine = forced()
    if engine is not None:
        return engine
    device = dispatch.indexed(x.device)
    return _measured_order(f"{device}|{key}", lambda: dispatch.env_key(device), key, run,
                           measure or measure_engines)


@torch.compiler.assume_constant_result
def _traced_order(device: torch.device, dtype: torch.dtype, key: str) -> str:
    """The order while torch.compile traces a call: the forced engine, else the stored choice, else "auto"; never a
    measurement. A constant of the compiled graph: the engine is fixed when it is traced."""
    engine = forced()
    if engine is not None:
        return engine
    device = dispatch.indexed(device)
    entry = _engine_memory.get(f"{device}|{key}")
    if entry is None:
        entry = _read_engine_disk().get(dispatch.env_key(device), {}).get(key)
    return "auto" if entry is None else _order(entry.get("engine"))


def _measured_order(memory_key: str, env_key: Callable[[], str], key: str, run: Callable[[str], object],
                    measure: Callable[..., dict]) -> str:
    """The order for ``key`` from this process's memory, else the disk cache under ``env_key()``, else a fresh
    measurement (stored in both) when measuring is allowed, else "auto"."""
    entry = _engine_memory.get(memory_key)
    if entry is None:
        env = env_key()
        entry = _read_engine_disk().get(env, {}).get(key)
        if entry is None:
            if not _measuring_allowed():
                return "auto"
            entry = measure(run)
            if entry["engine"] is not None:
                _write_engine_disk(env, key, entry)
        _engine_memory[memory_key] = entry
    return _order(entry.get("engine"))


def _record_ran(x: Tensor, key: str) -> None:
    """Note which engine ran the op call that just returned (eager CUDA calls; nothing while tracing)."""
    if x.device.type == "cuda" and not reference.is_tracing(x):
        _engine_ran[key] = _ext.last_engine()


def _shape_key(*parts) -> str:
    """An op key: the op name and every argument that shapes the call, as text."""
    out = []
    for p in parts:
        if isinstance(p, Tensor):
            fmt = "cl" if reference.memory_format(p) == torch.channels_last else "c"
            out.append("x".join(map(str, p.shape)) + f":{fmt}:{str(p.dtype).removeprefix('torch.')}")
        elif p is None:
            out.append("-")
        else:
            out.append(str(p))
    return "|".join(out)


def _detached(args: tuple) -> tuple:
    """``args`` with every tensor detached (the measurement's calls build no autograd graph)."""
    return tuple(a.detach() if isinstance(a, Tensor) else a for a in args)


# Fake (meta) kernels: output shape, dtype and strides exactly as the C++ kernels produce them (dense in the
# input's suggested memory format, which torch's suggest_memory_format mirrors).

def _conv_out(x, weight, stride, padding, dilation) -> Tensor:
    """An empty conv output of x and weight: PyTorch's output size and PyTorch's error for a window larger than the
    padded input (as the C++ checks), dense in x's suggested memory format (as the C++ kernels allocate it)."""
    padded = [x.shape[2 + d] + 2 * padding[d] for d in (0, 1)]
    window = [dilation[d] * (weight.shape[2 + d] - 1) + 1 for d in (0, 1)]
    if padded[0] < window[0] or padded[1] < window[1]:
        raise RuntimeError(f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
                           f"({window[0]} x {window[1]}). Kernel size can't be greater than actual input size")
    p, q = ((padded[d] - window[d]) // stride[d] + 1 for d in (0, 1))
    return torch.empty((x.shape[0], weight.shape[0], p, q), dtype=x.dtype, device=x.device,
                       memory_format=suggest_memory_format(x))


def _conv_bn_act_fake(x, weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, stride, padding, dilation, groups,
                      residual, shortcut_x, shortcut_weight, shortcut_bn_weight, shortcut_bn_bias, shortcut_bn_mean,
                      shortcut_bn_var, shortcut_bn_eps, shortcut_stride, relu, engines="auto"):
    return _conv_out(x, weight, stride, padding, dilation)


def _scale_bias_add_relu_fake(c, scale, shift, idn, idn_scale, idn_shift):
    return _like(c)


def _like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A new tensor of t's shape, dense in t's suggested memory format (as the C++ kernels allocate it)."""
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device, memory_format=suggest_memory_format(t))


def _channel_vec(t: Tensor, size: int | None = None) -> Tensor:
    """A per-channel vector of activation t in its op-math dtype (float64 for float64 t, else float32)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.new_empty((t.shape[1] if size is None else size,), dtype=acc)


def _conv_stats_fake(x, weight, stride, padding, dilation, groups, in_scale, in_shift, engines="auto"):
    c = _conv_out(x, weight, stride, padding, dilation)
    return c, _channel_vec(c), _channel_vec(c)


def _affine_relu_fake(x, scale, shift):
    return _like(x)


def _conv_stats_backward_input_fake(c, mean, dc, dmean, dvar):
    return _like(c)


def _conv_stats_backward_conv_fake(g, x, weight, stride, padding, dilation, groups, in_scale, in_shift, output_mask,
                                   engines="auto"):
    side, wgrad = output_mask
    sums = side and in_scale is not None
    dx = _like(x) if side else x.new_empty((0,))
    dw = _like(weight) if wgrad else weight.new_empty((0,))
    return dx, dw, _channel_vec(x, None if sums else 0), _channel_vec(x, None if sums else 0)


def _affine_relu_backward_fake(da, x, scale, shift):
    return _like(x), _channel_vec(x), _channel_vec(x)


def _scale_bias_add_relu_backward_fake(dout, c, scale, shift, idn, idn_scale, idn_shift):
    didn_scale = _channel_vec(c, None if idn_scale is not None else 0)
    return _like(c), _like(c, idn.dtype), _channel_vec(c), _channel_vec(c), didn_scale


def _bn_finalize_fake(mean, var, weight, bias, running_mean, running_var, count, momentum_factor, eps):
    return mean.new_empty(mean.shape), mean.new_empty(mean.shape)


# Autograd. For y = act(z): dz = threshold_backward(dy, y, 0) = dy * [y > 0] (as torch.relu's backward).

# conv_bn_act's argument positions of the 13 tensor inputs of reference.conv_bn_act_grads, in its order
# (x, W, γ, β, μ, σ², residual, x_d, W_d, γ_d, β_d, μ_d, σ²_d).
_CONV_BN_ACT_TENSORS = (0, 1, 2, 3, 4, 5, 11, 12, 13, 14, 15, 16, 17)
_CONV_BN_ACT_ARGS = 21


def _conv_bn_act_setup_context(ctx, inputs, output):
    """Saves what :func:`reference.conv_bn_act_save` saves: the tensors of both branches and the output y."""
    (x, weight, bn_w, bn_b, bn_mean, bn_var, eps, stride, padding, dilation, groups, _residual, sx, sw, sbn_w, sbn_b,
     sbn_mean, sbn_var, s_eps, s_stride, relu) = inputs[:_CONV_BN_ACT_ARGS]
    ctx.conf = (list(stride), list(padding), list(dilation), groups, eps, s_eps, list(s_stride), relu)
    ctx.save_for_backward(x, weight, bn_w, bn_b, bn_mean, bn_var, sx, sw, sbn_w, sbn_b, sbn_mean, sbn_var, output)


def _conv_bn_act_backward(ctx, grad):
    """The 13 tensor inputs' gradients by :func:`reference.conv_bn_act_grads` (the backward every backend shares),
    placed at their argument positions; None for the rest."""
    need = tuple(ctx.needs_input_grad[i] for i in _CONV_BN_ACT_TENSORS)
    grads = reference.conv_bn_act_grads(grad, ctx.saved_tensors, ctx.conf, need)
    out = [None] * len(ctx.needs_input_grad)
    for pos, g in zip(_CONV_BN_ACT_TENSORS, grads):
        out[pos] = g
    return tuple(out)


def _conv_stats_setup_context(ctx, inputs, output):
    x, weight, stride, padding, dilation, groups, in_scale, in_shift = inputs[:8]
    c, mean, _ = output
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.save_for_backward(x, weight, in_scale, in_shift, c, mean)
    ctx.set_materialize_grads(False)


def _conv_stats_backward(ctx, dc, dmean, dvar):
    """dc' = dc + dmean/n + dvar·2(c − mean)/n (one pass); then ``conv_stats_backward_conv``: dW with the activated
    input a = relu(x*s + t) recomputed (on load by the cudnn engine), and through the prologue: g = dgrad(dc', W)·
    [x*s + t > 0], dx = g*s, ds = Σ g·x, dt = Σ g. Its engine is chosen like the forward's (own key)."""
    x, weight, in_scale, in_shift, c, mean = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    need = ctx.needs_input_grad
    none = (None,) * 9
    prologue = in_scale is not None
    need_a = need[0] or (prologue and (need[6] or need[7]))
    if (dc is None and dmean is None and dvar is None) or not (need_a or need[1]):
        return none
    g = torch.ops.resnet_fused.conv_stats_backward_input(c, mean, dc, dmean, dvar)
    args = (g, x, weight, stride, padding, dilation, groups, in_scale, in_shift, [need_a, need[1]])
    key = _shape_key("conv_stats_backward_conv", x, weight, stride, padding, dilation, groups, prologue, need_a,
                     need[1])
    engines = _engines_for(x, key, lambda engine: torch.ops.resnet_fused.conv_stats_backward_conv(*args, engine))
    if engines == "cutlass":  # a forward-only engine: forcing it leaves the backward to plain
        engines = "plain"
    dx, dw, ds, dt = torch.ops.resnet_fused.conv_stats_backward_conv(*args, engines)
    _record_ran(x, key)
    del g
    return ((dx if need[0] else None), (dw if need[1] else None), None, None, None, None,
            (ds if prologue and need[6] else None), (dt if prologue and need[7] else None), None)


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
    for name, fake in (("conv_bn_act", _conv_bn_act_fake), ("scale_bias_add_relu", _scale_bias_add_relu_fake),
                       ("conv_stats", _conv_stats_fake), ("affine_relu", _affine_relu_fake),
                       ("conv_stats_backward_input", _conv_stats_backward_input_fake),
                       ("affine_relu_backward", _affine_relu_backward_fake),
                       ("conv_stats_backward_conv", _conv_stats_backward_conv_fake),
                       ("scale_bias_add_relu_backward", _scale_bias_add_relu_backward_fake),
                       ("bn_finalize", _bn_finalize_fake)):
        torch.library.register_fake(f"resnet_fused::{name}")(fake)
    for name, backward, setup_context in (
            ("conv_bn_act", _conv_bn_act_backward, _conv_bn_act_setup_context),
            ("scale_bias_add_relu", _scale_bias_add_relu_backward, _scale_bias_add_relu_setup_context),
            ("conv_stats", _conv_stats_backward, _conv_stats_setup_context),
            ("affine_relu", _affine_relu_backward, _affine_relu_setup_context)):
        torch.library.register_autograd(f"resnet_fused::{name}", backward, setup_context=setup_context)
