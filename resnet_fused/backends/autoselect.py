"""``auto`` on a GPU: which of the ``triton`` and ``cuda`` backends goes first, measured once per device and dtype.

The two backends implement the same ops, and which one is faster depends on the card, the dtype and the
versions of torch/triton/the extension. Rather than a fixed order, ``auto`` times both on a few ResNet-shaped
calls the first time it meets a (GPU, dtype) pair and keeps the winner:

* in memory for the process, and
* on disk, in ``$RESNET_FUSED_CACHE_DIR`` (default ``$XDG_CACHE_HOME/resnet_fused`` or ``~/.cache/resnet_fused``),
  file ``auto_backend.json``, keyed on the GPU name and capability, the dtype and the torch, triton,
  resnet_fused and extension versions, so a driver, library or package upgrade measures again.

The probe (:data:`PROBES`) runs each backend's eval op (conv + bias + ReLU, with a residual) and training forward
(conv with BN+ReLU prologue and statistics, then the BN-add-ReLU tail) on three ResNet convolutions at batch 32;
the first call of each shape is excluded (Triton's autotuning happens there), then CUDA-event medians are
summed. It takes a few seconds, once.

No measurement happens while ``torch.compile`` traces or a CUDA graph is being captured: ``auto`` then uses
the stored choice if there is one, else :data:`DEFAULT_ORDER`. ``RESNET_FUSED_AUTO_BACKEND=triton`` (or
``cuda``) fixes the preference without measuring.
"""

from __future__ import annotations

import json
import os
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import reference

CANDIDATES = ("triton", "cuda")
DEFAULT_ORDER = ("triton", "cuda", "reference")
ENV_FORCE = "RESNET_FUSED_AUTO_BACKEND"
ENV_CACHE_DIR = "RESNET_FUSED_CACHE_DIR"
CACHE_FILE = "auto_backend.json"

# (N, C, H, W, K, R, stride): ResNet-50's 3x3 and 1x1 convolutions of layer1 and a layer2 3x3, at batch 32.
PROBES = ((32, 64, 56, 56, 64, 3, 1), (32, 256, 56, 56, 64, 1, 1), (32, 128, 28, 28, 128, 3, 1))

# (device, dtype) -> entry, for this process; the disk cache is keyed by cache_key().
_memory: dict[tuple[torch.device, torch.dtype], dict] = {}


def cache_path() -> Path:
    """The JSON file holding the measured choices."""
    root = os.environ.get(ENV_CACHE_DIR)
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet_fused"
    return Path(root) / CACHE_FILE


def cache_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a measurement depends on: the GPU, the dtype, and the versions of everything that runs the ops."""
    from .. import __version__
    from . import cuda

    props = torch.cuda.get_device_properties(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    info = cuda.build_info() or {}
    ext = f"{info.get('cuda_version')}-{info.get('cutlass')}-{info.get('torch_version')}"
    return (f"{props.name}|sm{props.major}{props.minor}|{str(dtype).removeprefix('torch.')}|torch {torch.__version__}"
            f"|triton {triton_version}|resnet_fused {__version__}|ext {ext}")


def _read_disk() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_disk(key: str, entry: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = _read_disk()
        table[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as err:  # a read-only home must not break inference: the choice stays in memory
        warnings.warn(f"resnet_fused: could not store the auto backend choice in {path} ({err})",
                      RuntimeWarning, stacklevel=4)


def _cuda_timer(fn: Callable[[], object], reps: int = 10) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event-timed calls, after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def probe_calls(backend, device: torch.device, dtype: torch.dtype) -> list[Callable[[], object]]:
    """The calls the measurement times for one backend module: per probe shape, eval then training forward."""
    gen = torch.Generator(device=device).manual_seed(0)
    calls = []
    for n, c, h, w, k, r, stride in PROBES:
        def rand(*shape, dt=dtype):
            return torch.randn(shape, generator=gen, device=device, dtype=dt)

        x = rand(n, c, h, w).contiguous(memory_format=torch.channels_last)
        weight = (rand(k, c, r, r) * (c * r * r) ** -0.5).contiguous(memory_format=torch.channels_last)
        scale, shift = rand(c, dt=torch.float32), rand(c, dt=torch.float32)
        bn = reference.EvalBN(rand(k, dt=torch.float32), rand(k, dt=torch.float32), rand(k, dt=torch.float32),
                              rand(k, dt=torch.float32).abs() + 0.5, 1e-5)
        p = (h + 2 * (r // 2) - r) // stride + 1
        res = rand(n, k, p, p).contiguous(memory_format=torch.channels_last)
        c_scale, c_shift = rand(k, dt=torch.float32), rand(k, dt=torch.float32)

        def eval_call(x=x, weight=weight, bn=bn, res=res, stride=stride, pad=r // 2):
            return backend.conv_bn_act(x, weight, bn, stride, pad, residual=res, relu=True)

        def train_call(x=x, weight=weight, scale=scale, shift=shift, res=res, c_scale=c_scale, c_shift=c_shift,
                       stride=stride, pad=r // 2):
            out, _, _ = backend.conv_stats(x, weight, stride, pad, in_scale=scale, in_shift=shift)
            return backend.scale_bias_add_relu(out, c_scale, c_shift, res)

        calls += [eval_call, train_call]
    return calls


def measure(modules: dict, device: torch.device, dtype: torch.dtype,
            timer: Callable[[Callable[[], object]], float] = _cuda_timer) -> dict:
    """Time every backend module of ``modules`` (name -> module) on the probes.

    Returns ``{"backend": fastest, "ms": {name: total ms}, "errors": {name: message}}``; a backend whose probe
    raises is left out of the race with its error recorded, and ``backend`` is None if none ran.
    """
    totals, errors = {}, {}
    with torch.no_grad():
        for name, mod in modules.items():
            try:
                totals[name] = round(sum(timer(call) for call in probe_calls(mod, device, dtype)), 4)
            except Exception as err:  # a backend that fails here must not take inference down with it
                errors[name] = f"{type(err).__name__}: {err}"
    best = min(totals, key=totals.get) if totals else None
    return {"backend": best, "ms": totals, "errors": errors}


def _measuring_allowed() -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def choice(device: torch.device, dtype: torch.dtype, runnable: dict,
           measure_fn: Callable[..., dict] = measure) -> dict | None:
    """The stored or freshly measured choice for (``device``, ``dtype``), or None when there is none to use.

    ``runnable`` maps the candidate backends that can run this input (name -> module). With fewer than two,
    there is nothing to race and nothing is stored.
    """
    if len(runnable) < 2:
        return None
    device = _indexed(device)
    entry = _memory.get((device, dtype))
    if entry is None:
        key = cache_key(device, dtype)
        entry = _read_disk().get(key)
        if entry is None:
            if not _measuring_allowed():
                return None
            entry = measure_fn(runnable, device, dtype)
            if entry["backend"] is not None:
                _write_disk(key, entry)
        _memory[(device, dtype)] = entry
    return entry


def order(device: torch.device, dtype: torch.dtype, runnable: dict) -> tuple[str, ...]:
    """The order in which ``auto`` tries backends for a CUDA input of ``dtype`` on ``device``."""
    forced = os.environ.get(ENV_FORCE)
    if forced:
        if forced not in CANDIDATES:
            raise ValueError(f"{ENV_FORCE}={forced!r}: choose one of {', '.join(CANDIDATES)}")
        first = forced
    else:
        entry = choice(device, dtype, runnable)
        first = DEFAULT_ORDER[0] if entry is None or entry["backend"] is None else entry["backend"]
    return (first,) + tuple(b for b in DEFAULT_ORDER if b != first)


def stored(device: torch.device, dtype: torch.dtype) -> dict | None:
    """The choice this process made for (``device``, ``dtype``), if it made one."""
    return _memory.get((_indexed(device), dtype))


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index ("cuda" -> "cuda:<current>"), the key of the in-memory choices."""
    return device if device.index is not None else torch.device(device.type, torch.cuda.current_device())


def clear_memory() -> None:
    """Forget the choices made in this process (the disk cache stays)."""
    _memory.clear()
