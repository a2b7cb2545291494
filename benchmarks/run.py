"""Benchmark sweep and command line: `python -m benchmarks` (or `python benchmarks/run.py`).

Groups run in order of importance: the headline (whole ResNet-50 and ResNet-18, eval then train), DESIGN.md's
baseline blocks, then every other block. In each (workload, mode, dtype) group every provider gets its own copy
of the same torchvision module and the same inputs, and the group runs in three phases:

1. warm-up, one provider after the other: preparation (compilation, autotuning, cuDNN's algorithm search) and two
   calls, then the memory a step allocates;
2. three (``--rounds``) interleaved timing rounds (each round visits every provider, starting one further along
   each time): a row's time is the median of its round medians, with their spread;
3. errors, after timing: one more step of each provider on the initial weights, its output (and in training
   every gradient) against eager torchvision in fp32 (fp64 for an fp32 benchmark), eager's own error beside it.

A time budget counts from the benchmark's start (this module's first line, before torch is imported; not the
process's birth, which may be a shell's that ran a setup first): no row starts after it, compile rows none after
70% of it, and every phase of a row has a time limit (--row-limit, never past the budget plus a grace period). The
JSON is rewritten after every row and round, so whatever stops the run, what was measured is on disk. A provider
that fails records its error and the sweep goes on. Without a CUDA GPU the sweep is a small CPU smoke run.
"""

from __future__ import annotations

import time

_LOADED_AT = time.monotonic()  # the benchmark's clock starts here (see main)

import argparse
import gc
import hashlib
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import providers as P
from benchmarks import report, timing
from benchmarks.workloads import (HEADLINE, QUICK_COMPILE, SMOKE, SMOKE_BATCH, SMOKE_IMAGE_SIZE, Workload, run_order,
                                  select, workloads)

NO_GPU_MESSAGE = "No CUDA GPU found: this is a CPU smoke run (eager and the reference backend, tiny shapes)"
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3
# Provider order inside a group: the baseline, what the project delivers, then the slow-to-warm compilers.
PROVIDER_ORDER = [P.EAGER, *P.RF_PROVIDERS, P.CONVS, P.COMPILE, P.COMPILE_MAX]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="bf16 only, fewer repetitions, torch.compile on a "
                        "few workloads, one Triton tile per shape, a time budget (GPU: about 3 minutes)")
    parser.add_argument("--dtype", help="comma-separated: bf16,fp16,fp32 (GPU default: all; --quick: bf16)")
    parser.add_argument("--mode", help="comma-separated: eval,train (default: both)")
    parser.add_argument("--providers", help="comma-separated: eager, compile, compile-max, cudnn-convs and "
                        "resnet_fused backends (auto, reference, triton, cuda, cuda-cudnn, cuda-cutlass, "
                        "cuda-plain, or rf-<name>); default: all available")
    parser.add_argument("--workloads", help="comma-separated workload names or substrings (r50, layer2, resnet18)")
    parser.add_argument("--batch", type=int, help=f"batch size (GPU default 256, CPU smoke {SMOKE_BATCH})")
    parser.add_argument("--image-size", type=int, help=f"network input resolution the block shapes derive from "
                        f"(GPU default 224, CPU smoke {SMOKE_IMAGE_SIZE})")
    parser.add_argument("--out", type=Path, help=f"output folder (GPU default {RESULTS}, CPU smoke {RESULTS}/local)")
    parser.add_argument("--time-budget", type=float, help="seconds from the benchmark's start after which no row starts "
                        "(compile rows none after 70%%); --quick default 170")
    parser.add_argument("--row-limit", type=float, help="seconds each phase of a row may take (default 900, "
                        "--quick 60)")
    parser.add_argument("--warmup-ms", type=float, help="do_bench warm-up per round (default 25, --quick 10)")
    parser.add_argument("--rep-ms", type=float, help="do_bench timed repetitions per round (default 100, --quick 40)")
    parser.add_argument("--rounds", type=int, help=f"interleaved timing rounds (default {ROUNDS}); more for a "
                        "steadier median on a noisy machine")
    return parser.parse_args(argv)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def build_config(args: argparse.Namespace, device: torch.device, backends: list[str]) -> dict:
    """Every setting of the sweep, defaults resolved (goes into the JSON)."""
    smoke = device.type != "cuda"
    quick = args.quick and not smoke
    dtypes = _split(args.dtype) or (["fp32"] if smoke else ["bf16"] if quick else list(P.DTYPES))
    modes = _split(args.mode) or list(P.MODES)
    for name, chosen, known in (("dtype", dtypes, P.DTYPES), ("mode", modes, P.MODES)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise SystemExit(f"unknown {name} {unknown}: choose from {', '.join(known)}")
    try:
        requested = [P.normalize(p) for p in _split(args.providers)]
    except ValueError as error:
        raise SystemExit(str(error)) from None
    # --quick leaves out the reference backend (plain PyTorch, the oracle), the per-engine rows and max-autotune
    # compilation (minutes per model) unless asked for by name.
    quick_off = {P.RF_PREFIX + "reference", P.COMPILE_MAX, *(f"{P.RF_PREFIX}cuda-{e}" for e in P.CUDA_ENGINES)}
    provider_list = requested or [p for p in P.default_providers(device, backends) if not (quick and p in quick_off)]
    provider_list = sorted(dict.fromkeys(provider_list), key=PROVIDER_ORDER.index)
    batch = args.batch or (SMOKE_BATCH if smoke else 256)
    image_size = args.image_size or (SMOKE_IMAGE_SIZE if smoke else 224)
    patterns = _split(args.workloads) or (list(SMOKE) if smoke else [])
    chosen = run_order(select(workloads(batch, image_size), patterns))
    return {
        "smoke": smoke,
        "quick": bool(args.quick),
        "device": device.type,
        "batch": batch,
        "image_size": image_size,
        "dtypes": dtypes,
        "modes": modes,
        "providers": provider_list,
        "workloads": [w.name for w in chosen],
        "compile_workloads": sorted(f"{name} {mode}" for name, mode in QUICK_COMPILE) if quick else "all",
        "compile_max_workloads": "all" if P.COMPILE_MAX in requested else list(HEADLINE),
        "rounds": args.rounds or ROUNDS,
        "time_budget_s": args.time_budget if args.time_budget is not None else (170.0 if quick else None),
        "budget_clock": "benchmark start",
        "row_limit_s": args.row_limit or (60.0 if quick else 900.0),
        "warmup_ms": args.warmup_ms or (10.0 if quick else 25.0),
        "rep_ms": args.rep_ms or (40.0 if quick else 100.0),
        "cpu_reps": 5,
        "cpu_max_seconds": 0.3,
        "cpu_threads": torch.get_num_threads() if smoke else None,
        "out": str(args.out or (RESULTS / "local" if smoke else RESULTS)),
        "_workloads": chosen,
    }


# ------------------------------------------------------------------------------------------------ provenance


def git_sha() -> tuple[str, bool | None]:
    """HEAD's sha and whether the tree has changes; RESNET_FUSED_GIT_SHA overrides (a copy without .git)."""
    if os.environ.get("RESNET_FUSED_GIT_SHA"):
        return os.environ["RESNET_FUSED_GIT_SHA"], None
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return sha, bool(dirty)


def sources_hash() -> str:
    """sha256 over the library's sources (resnet_fused/*.py, csrc/, setup.py, pyproject.toml): path and bytes."""
    digest = hashlib.sha256()
    files = [p for pattern in ("resnet_fused/**/*.py", "csrc/**/*", "setup.py", "pyproject.toml")
             for p in REPO.glob(pattern) if p.is_file()]
    for path in sorted(set(files)):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# nvidia-smi --query-gpu fields: the driver, the clocks the card runs at and may reach, its power cap and what
# holds its clocks down. Asked one by one: a field this driver does not know must not lose the others.
GPU_FIELDS = ("driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "clocks.applications.graphics", "power.limit", "power.default_limit", "power.max_limit", "power.draw",
              "persistence_mode", "compute_mode", "pstate", "temperature.gpu", "clocks_event_reasons.active")


def gpu_state(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    ident = f"GPU-{props.uuid}" if getattr(props, "uuid", None) else str(device.index or 0)
    state: dict = {"uuid": ident}
    for field in GPU_FIELDS:
        try:
            out = subprocess.run(["nvidia-smi", f"--id={ident}", f"--query-gpu={field}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            value = out.stdout.strip()
            state[field] = value if out.returncode == 0 and value and "not a valid field" not in value else None
        except (OSError, subprocess.SubprocessError) as error:
            state[field] = f"nvidia-smi failed: {error}"
    return state


def precision_policies() -> dict:
    """TF32 and reduced-precision switches of matmul and cuDNN convolutions, by the old and new APIs."""
    policies = {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "matmul_allow_bf16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "matmul_allow_fp16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }
    for name, obj in (("matmul_fp32_precision", torch.backends.cuda.matmul),
                      ("cudnn_conv_fp32_precision", getattr(torch.backends.cudnn, "conv", None))):
        value = getattr(obj, "fp32_precision", None) if obj is not None else None
        if value is not None:
            policies[name] = value
    return policies


def library_state() -> dict:
    """resnet_fused's build and switches: ``build_info()`` of the extension, every RESNET_FUSED_* variable."""
    state: dict = {"switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RESNET_FUSED_")}}
    try:
        from resnet_fused import backends

        cuda = backends.load("cuda")
        state["build_info"] = cuda if isinstance(cuda, str) else cuda.build_info()
    except Exception as error:
        state["build_info"] = f"{type(error).__name__}: {error}"
    return state


def environment(device: torch.device, backends: list[str], import_error: str | None, config: dict) -> dict:
    cuda = device.type == "cuda"
    versions = {}
    for module in ("torchvision", "triton"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    sha, dirty = git_sha()
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": config["smoke"],
        "quick": config["quick"],
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu"),
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count if cuda else None,
        "gpu": gpu_state(device) if cuda else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "precision": precision_policies(),
        **versions,
        "git_sha": sha,
        "git_dirty": dirty,
        "sources_sha256": sources_hash(),
        "resnet_fused_backends": backends,
        "resnet_fused_import_error": import_error,
        **library_state(),
        "argv": sys.argv[1:],
        "config": {k: v for k, v in config.items() if not k.startswith("_")},
    }


def auto_choices() -> dict:
    """Every per-block choice ``auto`` made in this process (nothing is measured here: the rf-auto rows made them
    as a user's first call does), keyed by device and block signature."""
    try:
        from resnet_fused import dispatch
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return dispatch.measured()


def row_engines(provider: str) -> dict:
    """What a resnet_fused row ran: the cuda backend's engine choices and the Triton tile configs so far (each
    where this build reports them), or why not."""
    out: dict = {}
    for backend, fn in (("cuda", "engine_choices"), ("triton", "tile_configs")):
        if provider not in (P.RF_PREFIX + "auto", P.RF_PREFIX + backend) and not provider.startswith(
                f"{P.RF_PREFIX}{backend}-"):
            continue
        try:
            from resnet_fused import backends

            mod = backends.load(backend)
            report_fn = None if isinstance(mod, str) else getattr(mod, fn, None)
            out[fn] = report_fn() if report_fn is not None else f"{backend} backend has no {fn}()"
        except Exception as error:
            out[fn] = f"{type(error).__name__}: {error}"
    return out


# ------------------------------------------------------------------------------------------------------ rows


def new_row(workload: Workload, mode: str, dtype: str, provider: str) -> dict:
    return {
        "workload": workload.name,
        "description": workload.description,
        "arch": workload.arch,
        "kind": "model" if workload.is_model else "block",
        "input_shape": list(workload.input_shape),
        "mode": mode,
        "dtype": dtype,
        "provider": provider,
        "gflop": workload.flops(mode) / 1e9,
        "ms": None,  # median of the round medians
        "ms_rounds": [],
        "spread": None,  # (max - min) / median of the round medians
        "ms_p20": None,
        "ms_p80": None,
        "tflops": None,
        "pct_peak": None,
        "img_per_s": None,
        "speedup_vs_eager": None,
        "speedup_vs_compile": None,
        "convs_ratio": None,
        "peak_mem_mib": None,
        "step_mem_mib": None,
        "err": None,
        "eager_err": None,
        "grad_err": None,
        "eager_grad_err": None,
        "grad_err_worst": None,
        "warmup_s": None,
        "graphs_compiled": None,
        "note": None,
        "err_note": None,
        "engines": None,
        "error": None,
        "traceback": None,
    }


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (inf on a shape mismatch, nan for a non-finite output)."""
    if out.shape != ref.shape:
        return float("inf")
    ref64 = ref.double()
    norm = torch.linalg.vector_norm(ref64)
    diff = torch.linalg.vector_norm(out.double() - ref64)
    return (diff / norm).item() if norm > 0 else diff.item()


def errors(result, reference) -> dict:
    """The error columns of one checked step against the reference: output, and the worst gradient."""
    (out, grads), (ref_out, ref_grads) = result, reference
    fields = {"err": rel_err(out, ref_out)}
    if ref_grads:
        worst, worst_err = None, -1.0
        for name, ref in ref_grads.items():
            err = rel_err(grads[name], ref) if name in grads else float("inf")
            if not err <= worst_err:  # nan and inf win
                worst, worst_err = name, err
        fields.update(grad_err=worst_err, grad_err_worst=worst)
    return fields


class Sweep:
    """Runs the groups of one configuration, collecting rows and rewriting the JSON after every row and round."""

    def __init__(self, config: dict, device: torch.device, gemm_tflops: float | None, write=lambda: None,
                 log=print):
        self.config = config
        self.device = device
        self.gemm_tflops = gemm_tflops  # the card's measured bf16 GEMM rate (None off the GPU)
        self.rows: list[dict] = []
        self.write = write
        self.log = log
        self.broken: str | None = None  # set when the CUDA context is unusable
        budget = config["time_budget_s"]
        self.deadline = None if budget is None else budget + max(10.0, 0.15 * budget)

    def plan(self) -> list[tuple[Workload, str, str, list[str]]]:
        """(workload, mode, dtype, providers) groups, in run order."""
        groups = []
        compile_on, max_on = self.config["compile_workloads"], self.config["compile_max_workloads"]
        for workload in self.config["_workloads"]:
            for mode in self.config["modes"]:
                for dtype in self.config["dtypes"]:
                    names = [
                        p for p in self.config["providers"]
                        if not (p == P.CONVS and mode != "eval")
                        and (p != P.COMPILE or compile_on == "all" or f"{workload.name} {mode}" in compile_on)
                        and (p != P.COMPILE_MAX or max_on == "all" or workload.name in max_on)
                    ]
                    groups.append((workload, mode, dtype, names))
        return groups

    # ------------------------------------------------------------------------------------------ limits

    def _skip_reason(self, provider: str) -> str | None:
        if self.broken:
            return f"skipped: CUDA context unusable after {self.broken}"
        reason = P.unsupported(provider, "eval")
        if reason:
            return f"skipped: {reason}"
        budget = self.config["time_budget_s"]
        if budget is None:
            return None
        elapsed = timing.elapsed_s()
        if elapsed > budget:
            return f"skipped: time budget of {budget:.0f}s (from the benchmark's start) spent"
        if provider in P.COMPILE_MODES and elapsed > 0.7 * budget:
            return f"skipped: under 30% of the {budget:.0f}s time budget left for a compile"
        return None

    def _limit(self) -> float:
        """Seconds the next phase of a row may take: the row limit, cut at the budget's grace deadline."""
        limit = self.config["row_limit_s"]
        if self.deadline is not None:
            limit = min(limit, self.deadline - timing.elapsed_s())
        return limit

    def _fail(self, row: dict, error: BaseException) -> None:
        row["error"] = f"{type(error).__name__}: {error}".strip().splitlines()[0][:500]
        row["traceback"] = traceback.format_exc()[-4000:]
        self._check_context(row["error"])

    def _check_context(self, error: str) -> None:
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
        except Exception:  # a sticky CUDA error: every later call on this context fails
            self.broken = error

    # ------------------------------------------------------------------------------------------ phases

    def run_group(self, workload: Workload, mode: str, dtype_name: str, names: list[str], advance) -> None:
        dtype = P.DTYPES[dtype_name]
        rows = [new_row(workload, mode, dtype_name, p) for p in names]
        self.rows.extend(rows)
        steps: dict[int, P.Step] = {}
        base = inputs = None
        try:
            for i, row in enumerate(rows):
                reason = self._skip_reason(row["provider"])
                if reason:
                    row["error"] = reason
                    continue
                try:
                    if base is None:
                        base = workload.build()
                        inputs = P.make_inputs(workload, mode, dtype, self.device)
                    with timing.time_limit(self._limit(), f"{row['provider']} warm-up"):
                        steps[i] = self.warm_up(row, workload, base, mode, dtype, inputs)
                except Exception as error:  # one provider failing must not end the sweep
                    self._fail(row, error)
                    P.release_memory()
                self.write()
            self.time_rounds(rows, steps, mode, dtype)
            self.check_errors(rows, steps, workload, base, mode, dtype, inputs)
        finally:
            for row in rows:
                advance(row)
            steps.clear()
            del base, inputs
            gc.collect()
            P.release()
            self.write()

    def warm_up(self, row, workload, base, mode, dtype, inputs) -> P.Step:
        """Prepare the provider, run it twice, measure the memory of one step."""
        device = self.device
        graphs = _unique_graphs()
        t0 = time.perf_counter()
        step = P.prepare(row["provider"], workload, base, mode, dtype, inputs)
        for _ in range(2):
            step()
        timing.synchronize(device)
        row["warmup_s"] = time.perf_counter() - t0
        if row["provider"] in P.COMPILE_MODES:
            row["graphs_compiled"] = _unique_graphs() - graphs
            if row["graphs_compiled"] == 0:
                raise RuntimeError("torch.compile compiled no graph of its own (it reused another provider's)")
        step.warm = True
        step.release_grads()
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            row["peak_mem_mib"] = timing.peak_memory_mib(step, device)
            row["step_mem_mib"] = row["peak_mem_mib"] - before / 2**20
            step.release_grads()
        if row["provider"].startswith(P.RF_PREFIX):
            row["engines"] = row_engines(row["provider"])
        if row["provider"] == P.RF_PREFIX + "auto":
            row["auto_blocks"] = P.auto_blocks(step)
        return step

    def time_rounds(self, rows: list[dict], steps: dict[int, P.Step], mode: str, dtype: torch.dtype) -> None:
        """The config's interleaved rounds over the warmed-up providers, each starting one provider further
        along."""
        order = sorted(steps)
        rounds = self.config["rounds"]
        for rnd in range(rounds):
            live = [i for i in order if i in steps]
            if not live:
                return
            for i in live[rnd % len(live):] + live[: rnd % len(live)]:
                row = rows[i]
                if rnd > 0 and self._limit() <= 0:
                    row["note"] = f"{len(row['ms_rounds'])} of {rounds} rounds: time budget spent"
                    continue
                try:
                    with timing.time_limit(self._limit(), f"{row['provider']} timing"):
                        result = self.time_once(steps[i])
                except Exception as error:
                    self._fail(row, error)
                    del steps[i]
                    continue
                row["ms_rounds"].append(result.median_ms)
                row["ms_p20"] = min(filter(None, [row["ms_p20"], result.p20_ms]))
                row["ms_p80"] = max(filter(None, [row["ms_p80"], result.p80_ms]))
                self.summarize(row, dtype)
                self.speedups(rows, mode)
                self.write()

    def time_once(self, step: P.Step) -> timing.Timing:
        config = self.config
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            step()
            timing.synchronize(self.device)
            call_ms = (time.perf_counter() - t0) * 1e3
            # at least 10 timed repetitions, also for a step longer than rep_ms / 10
            return timing.bench_gpu(step, config["warmup_ms"], max(config["rep_ms"], 10 * call_ms))
        return timing.bench_cpu(step, config["cpu_reps"], config["cpu_max_seconds"])

    def summarize(self, row: dict, dtype: torch.dtype) -> None:
        rounds = row["ms_rounds"]
        ms = statistics.median(rounds)
        row["ms"] = ms
        row["spread"] = (max(rounds) - min(rounds)) / ms if len(rounds) > 1 else None
        row["tflops"] = row["gflop"] / ms
        if self.gemm_tflops and dtype in (torch.bfloat16, torch.float16):
            row["pct_peak"] = 100 * row["tflops"] / self.gemm_tflops
        if row["kind"] == "model":
            row["img_per_s"] = row["input_shape"][0] / (ms * 1e-3)

    def check_errors(self, rows, steps, workload, base, mode, dtype, inputs) -> None:
        """Each timed provider's output (and gradients) against the fp32/fp64 reference, after timing."""
        checked = [i for i in sorted(steps) if rows[i]["provider"] != P.CONVS and rows[i]["error"] is None]
        if not checked or self.broken:
            return
        try:
            with timing.time_limit(self._limit(), "reference"):
                reference = P.reference_result(workload, base, mode, dtype, inputs)
        except Exception as error:
            for i in checked:
                rows[i]["err_note"] = f"no reference: {type(error).__name__}: {error}"[:300]
            self._check_context(str(error))
            return
        for i in checked:
            row = rows[i]
            try:
                with timing.time_limit(self._limit(), f"{row['provider']} check"):
                    row.update(errors(steps[i].check(), reference))
            except Exception as error:
                row["err_note"] = f"check failed: {type(error).__name__}: {error}"[:300]
                self._check_context(str(error))
            self.write()
        eager = next((r for r in rows if r["provider"] == P.EAGER and r["err"] is not None), None)
        if eager is not None:
            for row in rows:
                row["eager_err"], row["eager_grad_err"] = eager["err"], eager.get("grad_err")
        del reference

    @staticmethod
    def speedups(rows: list[dict], mode: str) -> None:
        """Fill the speedup and cuDNN-convs columns of a group's rows from the times measured so far."""
        by_provider = {r["provider"]: r["ms"] for r in rows}
        eager, compiled, convs = by_provider.get(P.EAGER), by_provider.get(P.COMPILE), by_provider.get(P.CONVS)
        for row in rows:
            if row["ms"] is None:
                continue
            row["speedup_vs_eager"] = eager / row["ms"] if eager else None
            row["speedup_vs_compile"] = compiled / row["ms"] if compiled else None
            row["convs_ratio"] = row["ms"] / convs if convs and mode == "eval" else None


def _unique_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------------------------------ main


def _output_stem(meta: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device_name"].lower()).strip("-") or meta["device"]
    stamp = meta["timestamp"].replace("-", "").replace(":", "").replace("+0000", "Z")
    return f"{'smoke' if meta['smoke'] else 'bench'}_{slug}_{stamp}"


def _console():
    try:
        from rich.console import Console
    except ImportError:
        return None
    console = Console()
    return console if console.is_terminal else Console(width=200)


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _row_line(row: dict) -> str:
    head = f"{row['workload']} {row['mode']} {row['dtype']} {row['provider']}:"
    if row["ms"] is None:
        return f"{head} {(row['error'] or row.get('note') or 'no time')[:160]}"
    vs = f", x{row['speedup_vs_eager']:.2f} eager" if row["speedup_vs_eager"] else ""
    spread = f" ±{100 * row['spread'] / 2:.1f}%" if row["spread"] is not None else ""
    err = f", err {_fmt(row['err'], '.1e')} (eager {_fmt(row['eager_err'], '.1e')})" if row["err"] is not None else ""
    if row.get("grad_err") is not None:
        err += f", grad err {row['grad_err']:.1e} (eager {_fmt(row['eager_grad_err'], '.1e')})"
    late = f"; {row['error']}" if row["error"] else ""
    return (f"{head} {row['ms']:.3f} ms{spread}{vs}, {row['tflops']:.3g} TFLOP/s{err}, "
            f"warm-up {row['warmup_s']:.1f}s{late}")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # lets the finally block write what was measured


def main(argv: list[str] | None = None) -> int:
    global _LOADED_AT
    # The first run of this process counts from this module's loading (torch's import included); a later one
    # (main called again, e.g. from a test) from its own call.
    timing.start_clock(_LOADED_AT)
    _LOADED_AT = None
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        print(NO_GPU_MESSAGE, flush=True)
        # one thread: on a small shared machine, idle-spinning OpenMP threads make timings 100x slower
        torch.set_num_threads(1)
    else:
        torch.backends.cudnn.benchmark = True
        if args.quick:  # one Triton tile per shape: autotuning every ResNet shape would take the whole budget
            os.environ.setdefault("RESNET_FUSED_AUTOTUNE", "0")
    backends, import_error = P.resnet_fused_backends()
    if import_error:
        print(f"resnet_fused not importable, benchmarking without it: {import_error}", flush=True)
    config = build_config(args, device, backends)
    meta = environment(device, backends, import_error, config)
    if device.type == "cuda":
        try:
            meta["ceilings"] = timing.ceilings(device)
            print(f"ceilings: {meta['ceilings']['copy_gbps']:,.0f} GB/s copy, "
                  f"{meta['ceilings']['bf16_gemm_tflops']:.0f} TFLOP/s bf16 GEMM", flush=True)
        except Exception as error:  # the sweep does not need them
            meta["ceilings_error"] = f"{type(error).__name__}: {error}"
    out_dir = Path(config["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _output_stem(meta)
    json_path = out_dir / f"{stem}.json"
    console = _console()
    sweep = Sweep(config, device, meta.get("ceilings", {}).get("bf16_gemm_tflops"),
                  write=lambda: report.write_json(json_path, meta, sweep.rows))
    plan = sweep.plan()
    total = sum(len(names) for *_, names in plan)
    kind = "CPU smoke run" if config["smoke"] else f"batch {config['batch']}"
    print(f"{meta['device_name']} ({kind}): {len(plan)} groups, {total} rows, {config['rounds']} interleaved rounds "
          f"-> {out_dir}", flush=True)
    try:
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("sweep", total=total)
                for workload, mode, dtype, names in plan:
                    progress.update(task, description=f"{workload.name} {mode} {dtype}")

                    def advance(row):
                        progress.console.print(_row_line(row), highlight=False, markup=False)
                        progress.advance(task)

                    sweep.run_group(workload, mode, dtype, names, advance)
        else:
            for done, (workload, mode, dtype, names) in enumerate(plan):
                print(f"[{done + 1}/{len(plan)}] {workload.name} {mode} {dtype}", flush=True)
                sweep.run_group(workload, mode, dtype, names, lambda row: print("  " + _row_line(row), flush=True))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the writing short
        meta["elapsed_s"] = round(timing.elapsed_s(), 1)
        if not import_error:
            meta["auto_choices"] = auto_choices()
        for row in sweep.rows:
            if row["ms"] is None and row["error"] is None:
                row["error"] = "not run: the sweep was interrupted"
        report.write_json(json_path, meta, sweep.rows)
        report.print_table(sweep.rows, console)
        md_path = out_dir / f"{stem}.md"
        md_path.write_text(report.markdown(sweep.rows, meta))
        title = f"{meta['device_name']} ({kind}), torch {meta['torch']}, git {meta['git_sha'][:10]}"
        png = report.plot(sweep.rows, out_dir / f"{stem}.png", title)
        print(f"wrote {json_path}, {md_path}" + (f", {png}" if png else " (no plot: matplotlib missing)")
              + f"; {kind} finished {meta['elapsed_s']}s after the benchmark's start", flush=True)
    failed = sum(1 for r in sweep.rows if r["error"] and not r["error"].startswith("skipped"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
