"""Timers, clocks and memory probes: triton.testing.do_bench on a GPU, time.perf_counter medians on a CPU; the
benchmark's own clock (its time budget counts from the moment the benchmark's code starts, not from its process's
birth: a shell that execs it would otherwise charge its own setup to the budget) and a per-row time limit."""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_started_at = time.monotonic()


def start_clock(at: float | None = None) -> None:
    """Start the benchmark's clock at ``at`` (a ``time.monotonic()`` reading; default: now)."""
    global _started_at
    _started_at = time.monotonic() if at is None else at


def elapsed_s() -> float:
    """Seconds since :func:`start_clock` (or since this module was imported, before any call)."""
    return time.monotonic() - _started_at


class RowTimeout(Exception):
    """A benchmark row ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "row"):
    """Raise :class:`RowTimeout` in the main thread once ``seconds`` have passed (SIGALRM; no limit when None or
    off the main thread). Python code — compilation, autotuning, the timing loop — is interrupted; a call blocked
    in C (a hung kernel) is not: the caller's outer ``timeout`` handles that."""
    if seconds is None or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    if seconds <= 0:
        raise RowTimeout(f"no time left for the {what}")

    def expire(signum, frame):
        raise RowTimeout(f"{what} time limit of {seconds:.3g}s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_gpu(step: Callable[[], object], warmup_ms: float, rep_ms: float) -> Timing:
    """CUDA-event timing of `step` by do_bench (L2 flushed between repetitions): median and 20/80th percentiles."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, p20, p80)


def bench_cpu(step: Callable[[], object], reps: int, max_seconds: float) -> Timing:
    """Host-clock timing of `step`: `reps` calls, fewer (at least 3) if they would pass `max_seconds`."""
    times = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    quantiles = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), quantiles[1], quantiles[7])


def peak_memory_mib(step: Callable[[], object], device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated over one call of `step`, after a reset (None off the GPU).

    Counts everything alive during the call: the provider's weights and inputs, its activations and
    saved tensors, gradients (train) and workspaces.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def ceilings(device: torch.device) -> dict[str, float]:
    """This card's measured ceilings: device-to-device copy GB/s (bytes read + written, 1 GiB) and dense
    bf16 GEMM TFLOP/s (8192^3 on random data), each a do_bench median."""
    from triton.testing import do_bench

    src = torch.randn(2**29, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda src=src, dst=dst: dst.copy_(src), return_mode="median")
    copy_gbps = 2 * src.numel() * src.element_size() / (copy_ms * 1e-3) / 1e9
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm_ms = do_bench(lambda a=a, b=b: a @ b, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "bf16_gemm_tflops": 2 * n**3 / (gemm_ms * 1e-3) / 1e12}
