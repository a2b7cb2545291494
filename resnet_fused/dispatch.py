"""``auto``: every way the package can run a block, raced and checked per block, torchvision's own forward included.

A fused block (and a fused ResNet stem) with ``backend="auto"`` has several candidates:

* ``eager`` — the block's own torchvision/timm computation (always a candidate);
* ``reference`` — the fused ops in plain PyTorch;
* ``triton`` — the Triton kernels (CUDA tensors; never raced on a CPU, where Triton is only its interpreter);
* ``cuda:cudnn``, ``cuda:cutlass``, ``cuda:plain`` — the C++/CUDA extension with one engine forced
  (:func:`forced_engine`).

On the first eager call of a block **signature** (the block's class and modules — conv shapes, strides, padding,
dilation, groups, which norms use batch statistics —, the input's shape, strides and dtype, autocast's dtype,
eval or training, the device) each candidate that can run the input is

1. **validated**: run once on a copy of the input, its output — in training also its input and parameter
   gradients (for a fixed random output gradient, by ``torch.autograd.grad``, so no ``.grad`` changes) and the
   running statistics it leaves — compared with the block's own forward run on a copy of its modules in float64
   (float32 without TF32 for a float16/bfloat16 computation) under the project's tolerance rule
   (:mod:`resnet_fused.tolerances`: at most twice eager's own error plus the dtype's tolerance).
   A candidate that raises or disagrees is excluded and recorded with its error;
2. **timed**: the valid ones in interleaved rounds on the same inputs (forward, or forward + backward in
   training), CUDA events on a GPU, ``time.perf_counter`` on a CPU; the median counts.

The fastest valid candidate (by median) runs the call and every later call of the signature — eager unless the
other's median beats eager's fastest sample by more than :data:`EAGER_MARGIN` (3%), so noise keeps torchvision's
forward; if none is valid, ``eager`` runs.
The model's BatchNorm buffers are restored after the measurement, so the call itself updates the running
statistics exactly once.

The choices are kept in memory and in one JSON file, ``$RESNET_FUSED_CACHE_DIR/dispatch.json`` (default
``$XDG_CACHE_HOME/resnet_fused`` or ``~/.cache/resnet_fused``), under an environment key — device name and
capability (a CPU: its processor and thread count), torch, triton, cuDNN, the extension's ``build_info`` and
resnet_fused's versions — so any change of what runs the kernels measures again. Writes take a file lock
(``fcntl``), merge with what other processes stored meanwhile, and replace the file atomically, so DDP ranks on
one node may measure at once.

Without measuring:

* ``RESNET_FUSED_AUTO_BACKEND=eager|reference|triton|cuda`` runs that candidate wherever it can run the input;
  a forced cuda engine (:func:`forced_engine`, ``RESNET_FUSED_CUDA_ENGINE``) runs ``cuda`` with that engine;
* deterministic mode (``torch.use_deterministic_algorithms(True)`` or ``RESNET_FUSED_DETERMINISTIC=1``),
  tracing (``torch.compile``, ``torch.export``, fake tensors) and CUDA graph capture use the stored choice when
  there is one (not in deterministic mode), else :data:`STATIC_ORDER`: the first candidate that can run the input
  of ``triton``, ``cuda``, ``reference``, ``eager`` on a GPU, ``reference``, ``eager`` on a CPU;
* a training block with a ``SyncBatchNorm`` under ``torch.distributed`` uses the static order too (every rank
  must run the same collectives).

``resnet_fused.tune(model, *inputs)`` measures every block now and prints the table; calling it before
``torch.compile`` (or CUDA graph capture, or on each DDP rank) is how measured choices reach a traced model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the write stays atomic, concurrent writers may drop an entry
    fcntl = None

from . import backends, tolerances
from .backends import autoselect, reference
from .backends.autoselect import ENV_FORCE, forced_candidate  # noqa: F401 (ENV_FORCE: part of this module's API)

ENV_ENGINE = "RESNET_FUSED_CUDA_ENGINE"
ENV_CACHE_DIR = "RESNET_FUSED_CACHE_DIR"
ENV_DETERMINISTIC = "RESNET_FUSED_DETERMINISTIC"
CACHE_FILE = "dispatch.json"
ENGINES = ("cudnn", "cutlass", "plain")
EAGER = autoselect.EAGER
# The order used without a measurement (tracing with nothing stored, deterministic mode): the first that can run.
STATIC_ORDER = {"cuda": ("triton", "cuda", "reference", EAGER), "cpu": ("reference", EAGER)}
# Timed rounds after the validation call. On a GPU that call is the warm-up (Triton autotunes there) and is not
# counted; on a CPU its time is the first of the three samples.
REPS = {"cuda": 10, "cpu": 2}
# Another path replaces eager only when its median time beats eager's fastest sample by more than this fraction:
# a tie within the measurement's noise keeps the block's own forward.
EAGER_MARGIN = 0.03


# --------------------------------------------------------------------------------------------------- environment

def cache_dir() -> Path:
    """The folder of the measured choices: ``$RESNET_FUSED_CACHE_DIR``, else ``$XDG_CACHE_HOME/resnet_fused``."""
    root = os.environ.get(ENV_CACHE_DIR)
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet_fused"
    return Path(root)


def cache_path(name: str = CACHE_FILE) -> Path:
    return cache_dir() / name


def indexed(device: torch.device) -> torch.device:
    """``device`` with its index ("cuda" -> "cuda:<current>"); a CPU device unchanged."""
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device())


def build_info() -> dict | None:
    """The extension's ``build_info()``, or None when ``resnet_fused._C`` is not built (imported on its own: the
    cuda backend is not needed for the environment key)."""
    try:
        from . import _C
    except ImportError:
        return None
    return dict(_C.build_info())


_env_keys: dict[torch.device, str] = {}


def env_key(device: torch.device) -> str:
    """What every measurement on ``device`` depends on besides the call: the device and the versions of everything
    that runs a kernel."""
    device = indexed(device)
    if device not in _env_keys:
        from . import __version__

        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        info = build_info() or {}
        ext = "-".join(str(info.get(k)) for k in ("cuda_version", "cutlass", "cudnn_frontend", "torch_version"))
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            where = f"{props.name}|sm{props.major}{props.minor}|cudnn {torch.backends.cudnn.version()}"
        else:
            where = f"{device.type}|{_cpu_name()}|threads {torch.get_num_threads()}"
        _env_keys[device] = (f"{where}|torch {torch.__version__}|triton {triton_version}|resnet_fused {__version__}"
                             f"|ext {ext}")
    return _env_keys[device]


def _cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return " ".join(filter(None, (platform.machine(), platform.processor())))


def read_table(path: Path) -> dict:
    """The JSON table at ``path`` ({} when it is missing or unreadable)."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def store(path: Path, env: str, key: str, entry: dict) -> None:
    """Add ``entry`` under ``table[env][key]`` of the JSON file at ``path``: under an exclusive lock on
    ``<path>.lock``, merged into what is there now, written to a temporary file and moved into place (readers
    never see a partial file). A failure warns and keeps the choice in memory only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            table = read_table(path)
            table.setdefault(env, {})[key] = entry
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(table, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as err:  # a read-only cache folder must not break inference
        warnings.warn(f"resnet_fused: could not store a measured choice in {path} ({err})", RuntimeWarning,
                      stacklevel=3)


# ------------------------------------------------------------------------------------------------- modes, timers

@contextlib.contextmanager
def forced_engine(name: str):
    """Inside the block, every ``conv_bn_act`` / ``conv_stats`` call of the cuda backend on a CUDA tensor runs on
    engine ``name`` (``"cudnn"``, ``"cutlass"`` or ``"plain"``) only, like ``RESNET_FUSED_CUDA_ENGINE=name``: a
    call that engine cannot run raises ``RuntimeError`` with the engine's reason. Nests (the innermost wins) and
    takes precedence over the environment variable. Under ``torch.compile`` the engine is fixed at trace time."""
    if name not in ENGINES:
        raise ValueError(f"unknown cuda engine {name!r}: choose one of {', '.join(ENGINES)}")
    _forced_stack.append(name)
    try:
        yield
    finally:
        _forced_stack.pop()


_forced_stack: list[str] = []


def forced() -> str | None:
    """The engine forced by :func:`forced_engine` or ``RESNET_FUSED_CUDA_ENGINE`` (empty: none), else None."""
    if _forced_stack:
        return _forced_stack[-1]
    return autoselect.env_choice(ENV_ENGINE, ENGINES)


def deterministic() -> bool:
    """Deterministic mode: ``RESNET_FUSED_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``."""
    return os.environ.get(ENV_DETERMINISTIC, "0") == "1" or torch.are_deterministic_algorithms_enabled()


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tracing(x: Tensor | None = None) -> bool:
    """Whether nothing may be measured now: torch.compile/export tracing, fake tensors, CUDA graph capture (asked
    only for a CUDA input when there is one)."""
    if torch.compiler.is_compiling() or (x is not None and reference.is_tracing(x)):
        return True
    return capturing() if x is None else (x.is_cuda and torch.cuda.is_current_stream_capturing())


def cuda_timer(fn: Callable[[], object], reps: int = 10) -> float:
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


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn`` on ``device`` (CUDA events on a GPU, perf_counter on a CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def race(fns: Mapping[str, Callable[[], object]], device: torch.device, reps: int,
         first: Mapping[str, float] | None = None) -> dict[str, list[float]]:
    """Milliseconds of each of ``fns`` (already warmed up) in ``reps`` interleaved rounds (after the samples
    ``first`` holds): every round runs each once, so a drift of the machine's speed (other processes, clocks) hits
    them all alike."""
    times: dict[str, list[float]] = {name: [first[name]] if first and name in first else [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
    return times


# ---------------------------------------------------------------------------------------------------- candidates

def candidates(x: Tensor, groups: int = 1, dilation: int = 1) -> tuple[tuple[str, ...], dict[str, str]]:
    """(candidates that can run ``x``, {backend: why not} for the others), in :data:`STATIC_ORDER`'s order with
    each cuda engine as its own candidate. What can run depends on the device and dtype only (a constant of a
    traced graph: nothing is imported while torch.compile traces)."""
    found = _candidates(x.device, x.dtype, groups, dilation)
    return tuple(n for n, why in found if not why), {n: why for n, why in found if why}


@torch.compiler.assume_constant_result
def _candidates(device: torch.device, dtype: torch.dtype, groups: int, dilation: int) -> tuple:
    key = (device, dtype, groups, dilation)
    if key not in _candidate_memo:
        probe = torch.empty((1, 1, 1, 1), device=device, dtype=dtype)
        found = []
        for backend in backends.BACKENDS:
            if backend == "triton" and device.type != "cuda":
                found.append((backend, "the Triton interpreter is not raced on a CPU"))
                continue
            reason = backends._why_not(backends.load(backend), probe, groups, dilation)
            if reason is not None:
                found.append((backend, reason))
            elif backend == "cuda":
                found += [(f"cuda:{e}", "") for e in ENGINES]
            else:
                found.append((backend, ""))
        _candidate_memo[key] = tuple(found) + ((EAGER, ""),)
    return _candidate_memo[key]


_candidate_memo: dict[tuple, tuple] = {}


def _static(names: tuple[str, ...], device: torch.device) -> str:
    """The first of :data:`STATIC_ORDER` that can run ("cuda": the backend with its own engine order)."""
    for name in STATIC_ORDER["cuda" if device.type == "cuda" else "cpu"]:
        if name in names or (name == "cuda" and any(n.startswith("cuda:") for n in names)):
            return name
    return EAGER


def _runner(name: str, fused: Callable[[ModuleType, Tensor], Tensor],
            eager: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The callable running candidate ``name`` on an input."""
    if name == EAGER:
        return eager
    backend, _, engine = name.partition(":")
    be = backends.load(backend)
    if not engine:
        return lambda x: fused(be, x)

    def run(x: Tensor) -> Tensor:
        with forced_engine(engine):
            return fused(be, x)

    return run


# ---------------------------------------------------------------------------------------------------- signatures

def _describe(name: str, m: nn.Module) -> str:
    out = f"{name}:{type(m).__name__}"
    if isinstance(m, nn.Conv2d):
        out += (f"{tuple(m.weight.shape)}s{m.stride}p{m.padding}d{m.dilation}g{m.groups}"
                f"{'b' if m.bias is not None else ''}{str(m.weight.dtype).removeprefix('torch.')}")
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        out += "batch" if (m.training or m.running_mean is None) else "running"
    elif hasattr(m, "training") and type(m).__name__ in ("DropPath", "DropBlock2d"):
        out += "train" if m.training else "eval"
    return out


def _training(parts: Mapping[str, nn.Module], x: Tensor) -> bool:
    """Whether the call builds an autograd graph (gradients are part of what is validated and timed)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in parts.values()
                                                               for p in m.parameters()))


def signature(kind: str, parts: Mapping[str, nn.Module], x: Tensor) -> str:
    """The key of one measurement: the block's modules, the input's shape/strides/dtype, autocast's dtype,
    eval or training, the device."""
    mods = ";".join(_describe(f"{p}.{n}" if n else p, m) for p, part in parts.items()
                    for n, m in part.named_modules())
    amp = (str(torch.get_autocast_dtype(x.device.type)).removeprefix("torch.")
           if torch.is_autocast_enabled(x.device.type) else "-")
    mode = "train" if _training(parts, x) else "eval"
    return (f"{kind}|{mods}|x{tuple(x.shape)}@{tuple(x.stride())}:{str(x.dtype).removeprefix('torch.')}"
            f"|amp {amp}|{mode}|{indexed(x.device)}")


# --------------------------------------------------------------------------------------------------- measurement

def _buffers(parts: Mapping[str, nn.Module]) -> list[Tensor]:
    return [b for m in parts.values() for b in m.buffers()]


def _restore(buffers: list[Tensor], saved: list[Tensor]) -> None:
    with torch.no_grad():
        for b, s in zip(buffers, saved):
            b.copy_(s)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@contextlib.contextmanager
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _oracle(parts: Mapping[str, nn.Module], eager_fn: Callable[[Mapping[str, nn.Module], Tensor], Tensor],
            x: Tensor, grad_out_fn, training: bool, dtype: torch.dtype):
    """The block's own forward on a copy in float64 (float32 without TF32 for a float16/bfloat16 computation,
    whose tolerance is orders of magnitude above float32's rounding): (output, gradients or None, buffers)."""
    ref_dtype = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    ref = copy.deepcopy(nn.ModuleDict(dict(parts))).to(ref_dtype)
    x64 = x.detach().to(ref_dtype).requires_grad_(training and x.requires_grad)
    with torch.autocast(x.device.type, enabled=False), torch.set_grad_enabled(training), _no_tf32():
        out = eager_fn(ref, x64)
        grads = None
        if training:
            inputs = ([x64] if x64.requires_grad else []) + [p for p in ref.parameters() if p.requires_grad]
            grads = torch.autograd.grad(out, inputs, grad_out_fn(out), allow_unused=True)
    return out.detach(), grads, [b.detach().clone() for b in ref.buffers()]


def _check(what: str, got: Tensor | None, eager: Tensor | None, oracle: Tensor | None, dtype: torch.dtype,
           worst: list) -> str | None:
    """Compare one tensor with the oracle under the tolerance rule; updates worst = [max error, max ratio]."""
    if oracle is None:
        return None if got is None else f"{what}: a gradient where the reference has none"
    if got is None:
        return f"{what}: no gradient where the reference has one"
    if not oracle.is_floating_point():
        return None if torch.equal(got.cpu(), oracle.cpu()) else f"{what}: {got.tolist()} != {oracle.tolist()}"
    err = tolerances.max_error(got, oracle)
    eager_err = 0.0 if eager is None else tolerances.max_error(eager, oracle)
    size = oracle.abs().max().item() if oracle.numel() else 0.0
    allowed = tolerances.allowed_error(eager_err if math.isfinite(eager_err) else 0.0, size, dtype)
    worst[0] = max(worst[0], err)
    worst[1] = max(worst[1], err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf))
    if not err <= allowed:
        return (f"{what}: error {err:.3g} vs the float64 reference, allowed {allowed:.3g} (2 x eager's "
                f"{eager_err:.3g} + tolerance)")
    return None


def measure(parts: Mapping[str, nn.Module], x: Tensor, names: tuple[str, ...],
            fused: Callable[[ModuleType, Tensor], Tensor],
            eager_fn: Callable[[Mapping[str, nn.Module], Tensor], Tensor], reps: int | None = None) -> dict:
    """Validate and time every candidate of ``names`` on ``x`` (see the module docstring); the module's buffers are
    left as they were. Returns ``{"choice", "ms": {name: median ms}, "errors": {name: why excluded},
    "max_error": {name: max abs error of the output vs float64}, "ratio": {name: worst error / allowed over
    output, gradients and buffers}}`` (and ``"reference_error"`` when the float64 reference could not run: then
    only eager is trusted)."""
    device = x.device
    training = _training(parts, x)
    dtype = _compute_dtype(x)
    buffers = _buffers(parts)
    buffer_names = [f"{k}.{n}" for k, m in parts.items() for n, _ in m.named_buffers()]
    saved = [b.detach().clone() for b in buffers]
    named = [(f"{k}.{n}", p) for k, m in parts.items() for n, p in m.named_parameters() if p.requires_grad]
    params = [p for _, p in named] if training else []
    xin = x.detach().clone().requires_grad_(training and x.requires_grad)
    grad_names = (["input"] if xin.requires_grad else []) + [n for n, _ in named]
    gen = torch.Generator(device=device).manual_seed(0)
    grad_out: dict[str, Tensor] = {}

    def grad_out_fn(out: Tensor) -> Tensor:
        if "g" not in grad_out:
            grad_out["g"] = torch.randn(out.shape, generator=gen, device=device, dtype=torch.float64)
        return grad_out["g"].to(out.dtype)

    def call(name: str, run: Callable[[Tensor], Tensor]):
        with torch.set_grad_enabled(training):
            out = run(xin)
            grads = None
            if training:
                inputs = ([xin] if xin.requires_grad else []) + params
                grads = torch.autograd.grad(out, inputs, grad_out_fn(out), allow_unused=True)
        return out.detach(), grads

    runs = {name: _runner(name, fused, lambda t: eager_fn(parts, t)) for name in names}
    errors, max_err, ratio, ok = {}, {}, {}, {}
    oracle_error = None
    try:
        oracle = None
        try:
            oracle = _oracle(parts, eager_fn, x, grad_out_fn, training, dtype)
        except Exception as err:  # no float64 reference (an op without float64 support): only eager is trusted
            oracle_error = f"{type(err).__name__}: {err}"
        order = (EAGER,) + tuple(n for n in names if n != EAGER)
        eager_result = None
        first_ms: dict[str, float] = {}
        for name in order:
            _restore(buffers, saved)
            try:
                t0 = time.perf_counter()
                out, grads = call(name, runs[name])
                first_ms[name] = (time.perf_counter() - t0) * 1e3
            except Exception as err:  # a candidate that cannot run this block is left out, with its reason
                errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                continue
            after = [b.detach().clone() for b in buffers]
            if name == EAGER:
                eager_result = (out, grads, after)
            if oracle is None:
                if name == EAGER:
                    ok[name] = True
                continue
            worst = [0.0, 0.0]
            e_out, e_grads, e_after = eager_result or (None, None, None)
            problems = [_check("output", out, e_out, oracle[0], dtype, worst)]
            max_err[name] = worst[0]
            for i, g in enumerate(grads or ()):
                problems.append(_check(f"gradient of {grad_names[i]}", g, e_grads[i] if e_grads else None,
                                       oracle[1][i], dtype, worst))
            for i, (b_name, b) in enumerate(zip(buffer_names, after)):
                problems.append(_check(b_name, b, e_after[i] if e_after else None, oracle[2][i], dtype, worst))
            ratio[name] = round(worst[1], 4)
            problems = [p for p in problems if p]
            if problems:
                errors[name] = "; ".join(problems[:2])
            else:
                ok[name] = True
        valid = {n: runs[n] for n in order if ok.get(n)}
        ms, samples = {}, {}
        if len(valid) > 1:
            def timed(run: Callable[[Tensor], Tensor], name: str) -> Callable[[], object]:
                return lambda: call(name, run)

            samples = race({n: timed(r, n) for n, r in valid.items()}, device,
                           reps or REPS["cuda" if device.type == "cuda" else "cpu"],
                           None if device.type == "cuda" else first_ms)
            ms = {n: round(statistics.median(t), 5) for n, t in samples.items()}
        elif valid:
            ms = {next(iter(valid)): None}
    finally:
        _restore(buffers, saved)
    timed_ok = {n: t for n, t in ms.items() if t is not None}
    choice = min(timed_ok, key=timed_ok.get) if timed_ok else (next(iter(ms)) if ms else EAGER)
    if EAGER in samples and choice != EAGER and timed_ok[choice] > min(samples[EAGER]) * (1 - EAGER_MARGIN):
        choice = EAGER  # not faster than eager beyond the noise
    entry = {"choice": choice, "ms": ms, "errors": errors, "ratio": ratio,
             "max_error": {n: float(f"{e:.4g}") for n, e in max_err.items()}}
    if oracle_error is not None:
        entry["reference_error"] = oracle_error
    return entry


# ---------------------------------------------------------------------------------------------------- dispatching

_memory: dict[tuple[torch.device, str], dict] = {}
# owner module -> {quick key: choice}: the hot path, which skips building the signature (see _quick_key)
_fast: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_FAST_MAX = 64
# owner module -> {kind: (signature, entry)}: what the last eager call of each block chose (explain, tune)
_chosen: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# owner module -> the _pin_key of every call like which a decided call of owner ran eager (eager_memo)
_eager_pins: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()
_recorder: list[Callable[[nn.Module, str, str, dict], None]] = []
_warned: set[str] = set()


def clear_memory() -> None:
    """Forget this process's choices (the disk cache stays)."""
    _memory.clear()
    _env_keys.clear()
    _fast.clear()
    _eager_pins.clear()


def measured() -> dict[str, dict]:
    """Every choice this process made or read, keyed ``"<device>|<signature>"`` (the benchmark's provenance)."""
    return {f"{device}|{sig}": dict(entry) for (device, sig), entry in _memory.items()}


def chosen(owner: nn.Module) -> dict:
    """{kind ("block" or "stem"): (signature, entry)} of the last eager call of ``owner`` under ``auto``."""
    return dict(_chosen.get(owner, {}))


@torch.compiler.assume_constant_result
def _stored_choice(device: torch.device, sig: str) -> str:
    """The stored choice for ``sig`` ("" when there is none), without measuring: a constant of a traced graph."""
    entry = _memory.get((indexed(device), sig))
    if entry is None:
        entry = read_table(cache_path()).get(env_key(device), {}).get(sig)
    return "" if entry is None else entry.get("choice", "")


def _sync_bn_in_training(parts: Mapping[str, nn.Module]) -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and any(isinstance(m, nn.SyncBatchNorm) and m.training for p in parts.values() for m in p.modules()))


def _quick_key(kind: str, parts: Mapping[str, nn.Module], x: Tensor) -> tuple:
    """What decides the signature of a call of the same modules, without formatting it: the input's shape,
    strides, dtype and device, autocast, whether it trains, and each submodule (identity and mode)."""
    device = x.device.type
    amp = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
    mods: list = []
    for part in parts.values():
        _walk(part, mods)
    return (kind, tuple(x.shape), x.stride(), x.dtype, x.device, amp, _training(parts, x), tuple(mods))


def _walk(m: nn.Module, out: list) -> None:
    out.append((id(m), m.training))
    for child in m._modules.values():
        if child is not None:
            _walk(child, out)


def _pin_key(kind: str, owner: nn.Module, x: Tensor) -> tuple:
    """What a call must share with an earlier one to run eager as it did (:func:`eager_memo`): the input's shape,
    strides, dtype and device, the owner's mode, grad mode and autocast."""
    device = x.device
    return (kind, x.shape, x.stride(), x.dtype, device, owner.training, torch.is_grad_enabled(),
            torch.is_autocast_enabled(device.type))


def _overridden() -> bool:
    """Whether something other than the measurement decides calls now: a forced candidate or engine (set, valid
    or not), deterministic mode, or :func:`tune` recording."""
    env = os.environ
    return bool(_forced_stack or _recorder or env.get(ENV_FORCE) or env.get(ENV_ENGINE)) or deterministic()


def eager_memo(owner: nn.Module, kind: str, x: Tensor) -> bool:
    """Whether this call of ``owner`` runs the block's own forward because an earlier call like it (same
    :func:`_pin_key`) chose eager; the fused module then runs that forward at once.

    The hot path of ``auto`` on a CPU, where eager usually wins: a handful of C calls per block, where the full
    decision (hooks, fusability, the input check, the signature) costs some 90 Python calls — next to the
    convolutions (caches cold) that came to 150 µs per block, 2-3% of a ResNet-18 forward at batch 8. Nothing
    else needs checking: the block's own forward honours hooks, runs any module as it is and is always a valid
    answer; what a changed module (a replaced submodule, a BN frozen by itself) loses is only a new measurement.
    Never under ``torch.compile`` tracing, nor for tensor subclasses (fake, functional, DTensor), nor while
    something other than the measurement decides (:func:`_overridden`)."""
    if torch.compiler.is_compiling() or type(x) is not Tensor or owner.backend != "auto":
        return False
    pins = _eager_pins.get(owner)
    return pins is not None and _pin_key(kind, owner, x) in pins and not _overridden()


def choose(owner: nn.Module, kind: str, parts: Mapping[str, nn.Module], x: Tensor, groups: int, dilation: int,
           fused: Callable[[ModuleType, Tensor], Tensor],
           eager_fn: Callable[[Mapping[str, nn.Module], Tensor], Tensor]) -> str:
    """The candidate that runs this call (see the module docstring for the order of the rules)."""
    want = forced_candidate()
    engine = forced()
    if want is None and engine is not None:
        want = f"cuda:{engine}"
    traced = tracing(x)
    quick = None
    if want is None and not traced and not _recorder and not deterministic():
        quick = _quick_key(kind, parts, x)
        hit = _fast.get(owner, {}).get(quick)
        if hit is not None:
            return hit
    names, why = candidates(x, groups, dilation)
    device = x.device
    if want is not None:
        if want in names:
            return want
        if want == "cuda" and any(n.startswith("cuda:") for n in names):
            return "cuda"
        reason = why.get(want.partition(":")[0], "it cannot run this input")
        message = f"resnet_fused: {want!r} cannot run this input ({reason}); falling back"
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        return _static(names, device)
    if device.type == "cuda" and why.get(STATIC_ORDER["cuda"][0]) and not traced:
        reason = why[STATIC_ORDER["cuda"][0]]  # no fused GPU kernel of the first kind for this input: say so once
        if reason not in backends._warned:
            backends._warned.add(reason)
            warnings.warn(f"resnet_fused: backend {STATIC_ORDER['cuda'][0]!r} cannot run this input ({reason}); "
                          f"falling back", RuntimeWarning, stacklevel=4)
    if deterministic():
        return _static(names, device)
    sig = signature(kind, parts, x)
    if traced:
        stored = _stored_choice(device, sig)
        return stored if stored in names else _static(names, device)
    if _sync_bn_in_training(parts):
        return _static(names, device)
    key = (indexed(device), sig)
    entry = _memory.get(key)
    if entry is None:
        env = env_key(device)
        entry = read_table(cache_path()).get(env, {}).get(sig)
        if entry is None or entry.get("choice") not in names:
            entry = measure(parts, x, names, fused, eager_fn)
            entry["candidates"] = list(names)
            store(cache_path(), env, sig, entry)
        _memory[key] = entry
    _chosen.setdefault(owner, {})[kind] = (sig, entry)
    if quick is not None:
        fast = _fast.setdefault(owner, {})
        if len(fast) >= _FAST_MAX:
            fast.clear()
        fast[quick] = entry["choice"]
        if entry["choice"] == "eager" and type(x) is Tensor:
            pins = _eager_pins.setdefault(owner, set())
            if len(pins) >= _FAST_MAX:
                pins.clear()
            pins.add(_pin_key(kind, owner, x))
    for record in _recorder:
        record(owner, kind, sig, entry)
    return entry["choice"]


def run(owner: nn.Module, kind: str, parts: Mapping[str, nn.Module], x: Tensor, groups: int, dilation: int,
        fused: Callable[[ModuleType, Tensor], Tensor],
        eager_fn: Callable[[Mapping[str, nn.Module], Tensor], Tensor]) -> Tensor:
    """Run one call of a fused block (``kind`` "block") or stem (``kind`` "stem") of ``owner``: its backend when
    ``owner.backend`` names one, else the candidate :func:`choose` picks. ``parts`` are the modules the call uses
    (the block, or the stem's conv/norm/activation), ``fused(backend_module, x)`` the fused forward and
    ``eager_fn(parts, x)`` the original computation on any copy of ``parts``."""
    if owner.backend != "auto":
        return fused(backends.resolve(owner.backend, x, groups, dilation), x)
    name = choose(owner, kind, parts, x, groups, dilation, fused, eager_fn)
    if name == "cuda":
        return fused(backends.load("cuda"), x)
    return _runner(name, fused, lambda t: eager_fn(parts, t))(x)


# ---------------------------------------------------------------------------------------------------------- tune

@dataclass(frozen=True)
class TuneRow:
    """One candidate of one block, as :func:`tune` measured it (or found it stored)."""

    path: str                 # the block's name in the model ("layer1.0"; "conv1" for the stem)
    mode: str                 # "eval" or "train"
    signature: str            # the measurement's key
    candidate: str            # "eager", "reference", "triton", "cuda:cudnn", ...
    ms: float | None          # median milliseconds (None: not timed)
    max_error: float | None   # max |error| of its output vs the float64 reference
    valid: bool               # whether it agreed with the reference (and ran)
    chosen: bool              # whether it runs the block
    error: str | None = None  # why it was excluded


def _progress(total: int):
    """(advance(label), close()) of a progress bar: rich's when it is installed, else one line per step."""
    try:
        from rich.progress import Progress
    except ImportError:
        count = [0]

        def advance(label: str) -> None:
            count[0] += 1
            print(f"resnet_fused.tune: {count[0]}/{total} {label}", flush=True)

        return advance, lambda: None
    bar = Progress(transient=False)
    bar.start()
    task = bar.add_task("resnet_fused.tune", total=total)

    def advance(label: str) -> None:
        bar.update(task, advance=1, description=f"resnet_fused.tune {label}")

    return advance, bar.stop


def _auto_owners(model: nn.Module) -> dict[nn.Module, str]:
    from . import models

    owners = {}
    for name, m in model.named_modules():
        if isinstance(m, (models._FusedBlock, models.ResNet)) and m.backend == "auto":
            owners[m] = name
    return owners


def tune(model: nn.Module, *example_inputs, train: bool | None = None, show: bool = True) -> list[TuneRow]:
    """Measure every ``auto`` block of ``model`` now, on a forward of ``example_inputs``: in eval (``train=False``),
    in training (``train=True``: the measurement includes the backward), or both (None). The model's mode, weights,
    buffers and gradients are left as they were. Prints the table (``show``) and returns its rows. Stored choices
    are reused; clear them with :func:`clear_memory` and by removing :func:`cache_path`."""
    owners = _auto_owners(model)
    modes = (False, True) if train is None else (bool(train),)
    was_training = model.training
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    seen: dict[tuple[str, str, str], tuple[str, dict]] = {}
    total = len(owners) * len(modes)
    advance, close = _progress(total) if show and total else ((lambda label: None), (lambda: None))

    def record(owner: nn.Module, kind: str, sig: str, entry: dict) -> None:
        if owner in owners:
            path = owners[owner] if kind == "block" else (f"{owners[owner]}.conv1" if owners[owner] else "conv1")
            mode = sig.rsplit("|", 2)[-2]
            if (path, kind, mode) not in seen:
                advance(f"{path} ({mode})")
            seen[(path, kind, mode)] = (sig, entry)

    _recorder.append(record)
    try:
        for training in modes:
            model.train(training)
            with torch.set_grad_enabled(training):
                model(*example_inputs)
    finally:
        _recorder.remove(record)
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                v.copy_(state[k])
        close()
    rows = []
    for (path, _, mode), (sig, entry) in seen.items():
        names = entry.get("candidates") or list(entry["ms"]) + list(entry["errors"])
        for name in names:
            rows.append(TuneRow(path, mode, sig, name, entry["ms"].get(name), entry["max_error"].get(name),
                                name in entry["ms"], name == entry["choice"], entry["errors"].get(name)))
    if show:
        _print(rows)
    return rows


def _print(rows: list[TuneRow]) -> None:
    header = ("block", "mode", "candidate", "ms", "max error", "valid", "chosen")
    cells = [(r.path, r.mode, r.candidate, "-" if r.ms is None else f"{r.ms:.3f}",
              "-" if r.max_error is None else f"{r.max_error:.2e}", "yes" if r.valid else f"no: {r.error}",
              "*" if r.chosen else "") for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(" | ".join(header))
        for cell in cells:
            print(" | ".join(cell))
        return
    table = Table(title="resnet_fused.tune")
    for column in header:
        table.add_column(column, overflow="fold")
    for cell in cells:
        table.add_row(*(Text(c) for c in cell))
    Console().print(table)
