"""Benchmark sweep and command line: `python -m benchmarks` (or `python benchmarks/run.py`).

For every selected workload x mode x dtype, each provider gets its own copy of the same torchvision module
and the same inputs; its first output is compared with eager's (relative L2 error), then its peak memory
over one step and its median time are measured. A provider that fails records the error in its row and the
sweep goes on. Without a CUDA GPU the sweep is a small CPU smoke run of eager and the reference backend.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import providers as P
from benchmarks import report, timing
from benchmarks.workloads import QUICK_COMPILE, SMOKE, SMOKE_BATCH, SMOKE_IMAGE_SIZE, Workload, select, workloads

NO_GPU_MESSAGE = "No CUDA GPU found: running a CPU smoke run of the reference backend"
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="bf16 only, fewer repetitions, torch.compile on a "
                        "few workloads, a soft time budget (about 3 minutes on an H100)")
    parser.add_argument("--dtype", help="comma-separated: bf16,fp16,fp32 (GPU default: all; --quick: bf16)")
    parser.add_argument("--mode", help="comma-separated: eval,train (default: both)")
    parser.add_argument("--providers", help="comma-separated: eager,compile,convs and backend names "
                        "(reference, triton, cuda or rf-<name>); default: all available")
    parser.add_argument("--workloads", help="comma-separated workload names or substrings (r50, layer2, resnet18)")
    parser.add_argument("--batch", type=int, help=f"batch size (GPU default 256, CPU smoke {SMOKE_BATCH})")
    parser.add_argument("--image-size", type=int, help=f"network input resolution the block shapes derive from "
                        f"(GPU default 224, CPU smoke {SMOKE_IMAGE_SIZE})")
    parser.add_argument("--out", type=Path, help=f"output folder (GPU default {RESULTS}, CPU smoke {RESULTS}/local)")
    parser.add_argument("--time-budget", type=float, help="seconds after which remaining rows are skipped "
                        "(torch.compile rows once 70%% is spent); --quick default 170")
    parser.add_argument("--warmup-ms", type=float, help="do_bench warm-up per row (default 25, --quick 10)")
    parser.add_argument("--rep-ms", type=float, help="do_bench timed repetitions per row (default 100, --quick 40)")
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
    # --quick leaves out the reference backend (plain PyTorch, the oracle) unless asked for by name
    provider_list = requested or [
        p for p in P.default_providers(device, backends) if not (quick and p == P.RF_PREFIX + "reference")
    ]
    order = [P.EAGER, P.COMPILE, P.CONVS]
    provider_list = sorted(dict.fromkeys(provider_list), key=lambda p: order.index(p) if p in order else len(order))
    batch = args.batch or (SMOKE_BATCH if smoke else 256)
    image_size = args.image_size or (SMOKE_IMAGE_SIZE if smoke else 224)
    patterns = _split(args.workloads) or (list(SMOKE) if smoke else [])
    chosen = select(workloads(batch, image_size), patterns)
    return {
        "smoke": smoke,
        "quick": quick,
        "device": device.type,
        "batch": batch,
        "image_size": image_size,
        "dtypes": dtypes,
        "modes": modes,
        "providers": provider_list,
        "workloads": [w.name for w in chosen],
        "compile_workloads": sorted(f"{name} {mode}" for name, mode in QUICK_COMPILE) if quick else "all",
        "time_budget_s": args.time_budget if args.time_budget is not None else (170.0 if quick else None),
        "warmup_ms": args.warmup_ms or (10.0 if quick else 25.0),
        "rep_ms": args.rep_ms or (40.0 if quick else 100.0),
        "cpu_reps": 10,
        "cpu_max_seconds": 1.0,
        "cpu_threads": torch.get_num_threads() if smoke else None,
        "out": str(args.out or (RESULTS / "local" if smoke else RESULTS)),
        "_workloads": chosen,
    }


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
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu"),
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count if cuda else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        **versions,
        "git_sha": sha,
        "git_dirty": dirty,
        "resnet_fused_backends": backends,
        "resnet_fused_import_error": import_error,
        "argv": sys.argv[1:],
        "config": {k: v for k, v in config.items() if not k.startswith("_")},
    }


def auto_choices(device: torch.device, dtypes: list[str]) -> dict:
    """The backend ``auto`` runs first for each benchmark dtype, with the probe timings it was chosen by."""
    from resnet_fused import backends

    choices = {}
    for name in dtypes:
        x = torch.empty(1, 8, 1, 1, device=device, dtype=P.DTYPES[name])
        try:
            chosen = backends.resolve("auto", x).NAME
            entry = backends.autoselect.stored(device, x.dtype) or {}
            choices[name] = {"backend": chosen, **{k: v for k, v in entry.items() if k != "backend"}}
        except Exception as error:  # the sweep does not need it
            choices[name] = {"error": f"{type(error).__name__}: {error}"}
    return choices


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
        "ms": None,
        "ms_p20": None,
        "ms_p80": None,
        "tflops": None,
        "pct_peak": None,
        "img_per_s": None,
        "speedup_vs_eager": None,
        "speedup_vs_compile": None,
        "floor_ratio": None,
        "peak_mem_mib": None,
        "step_mem_mib": None,
        "rel_err": None,
        "warmup_s": None,
        "error": None,
        "traceback": None,
    }


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32 (inf on a shape mismatch)."""
    if out.shape != ref.shape:
        return float("inf")
    ref32 = ref.float()
    return (torch.linalg.vector_norm(out.float() - ref32) / torch.linalg.vector_norm(ref32)).item()


class Sweep:
    """Runs the groups of one configuration and collects rows."""

    def __init__(self, config: dict, device: torch.device, gemm_tflops: float | None):
        self.config = config
        self.device = device
        self.gemm_tflops = gemm_tflops  # the card's measured bf16 GEMM rate (None off the GPU)
        self.rows: list[dict] = []
        self.start = time.perf_counter()
        self.broken: str | None = None  # set when the CUDA context is unusable

    def plan(self) -> list[tuple[Workload, str, str, list[str]]]:
        """(workload, mode, dtype, providers) groups, in run order."""
        groups = []
        compile_on = self.config["compile_workloads"]
        for workload in self.config["_workloads"]:
            for mode in self.config["modes"]:
                for dtype in self.config["dtypes"]:
                    names = [
                        p for p in self.config["providers"]
                        if P.unsupported(p, mode) is None
                        and (p != P.COMPILE or compile_on == "all" or f"{workload.name} {mode}" in compile_on)
                    ]
                    groups.append((workload, mode, dtype, names))
        return groups

    def _skip_reason(self, provider: str) -> str | None:
        if self.broken:
            return f"skipped: CUDA context unusable after {self.broken}"
        budget = self.config["time_budget_s"]
        if budget is None:
            return None
        elapsed = time.perf_counter() - self.start
        if elapsed > budget:
            return f"skipped: time budget of {budget:.0f}s spent"
        if provider == P.COMPILE and elapsed > 0.7 * budget:
            return f"skipped: under 30% of the {budget:.0f}s time budget left for a compile"
        return None

    def run_group(self, workload: Workload, mode: str, dtype_name: str, names: list[str], advance) -> None:
        dtype = P.DTYPES[dtype_name]
        rows = [new_row(workload, mode, dtype_name, p) for p in names]
        self.rows.extend(rows)
        base = inputs = ref = None
        for row in rows:
            reason = self._skip_reason(row["provider"])
            if reason:
                row["error"] = reason
                advance(row)
                continue
            try:
                if base is None:
                    base = workload.build()
                    inputs = P.make_inputs(workload, mode, dtype, self.device)
                first = self.measure(row, workload, base, mode, dtype, inputs, ref)
                if row["provider"] == P.EAGER:
                    ref = first
                del first
            except Exception as error:  # one provider failing must not end the sweep
                row["error"] = f"{type(error).__name__}: {error}".strip().splitlines()[0][:500]
                row["traceback"] = traceback.format_exc()[-4000:]
                self._check_context(row["error"])
            finally:
                P.release()
            self.speedups(rows, mode)
            advance(row)
        del base, inputs, ref
        gc.collect()
        P.release()

    def measure(self, row, workload, base, mode, dtype, inputs, ref) -> torch.Tensor | None:
        """Fill `row` for its provider; returns eager's first output (the group's reference), else None.

        Exactly one output-sized tensor besides the provider's own is alive while memory is measured:
        eager's first output (for eager itself too), so peak memory compares across providers.
        """
        device, config = self.device, self.config
        t0 = time.perf_counter()
        step = P.prepare(row["provider"], workload, base, mode, dtype, inputs)
        out = step().detach()
        timing.synchronize(device)
        t1 = time.perf_counter()
        step()
        timing.synchronize(device)
        call_ms = (time.perf_counter() - t1) * 1e3
        row["warmup_s"] = time.perf_counter() - t0
        if ref is not None and row["provider"] != P.CONVS:
            row["rel_err"] = rel_err(out, ref)
        if row["provider"] != P.EAGER:
            out = None
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            row["peak_mem_mib"] = timing.peak_memory_mib(step, device)
            row["step_mem_mib"] = row["peak_mem_mib"] - before / 2**20
            # at least 10 timed repetitions, also for a step longer than rep_ms / 10
            result = timing.bench_gpu(step, config["warmup_ms"], max(config["rep_ms"], 10 * call_ms))
        else:
            result = timing.bench_cpu(step, config["cpu_reps"], config["cpu_max_seconds"])
        row["ms"], row["ms_p20"], row["ms_p80"] = result.median_ms, result.p20_ms, result.p80_ms
        row["tflops"] = workload.flops(mode) / (result.median_ms * 1e-3) / 1e12
        if self.gemm_tflops and dtype in (torch.bfloat16, torch.float16):
            row["pct_peak"] = 100 * row["tflops"] / self.gemm_tflops
        if workload.is_model:
            row["img_per_s"] = workload.batch / (result.median_ms * 1e-3)
        return out

    def _check_context(self, error: str) -> None:
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
        except Exception:  # a sticky CUDA error: every later call on this context fails
            self.broken = error

    @staticmethod
    def speedups(rows: list[dict], mode: str) -> None:
        """Fill the speedup and floor columns of a group's rows from the times measured so far."""
        by_provider = {r["provider"]: r["ms"] for r in rows}
        eager, compiled, floor = by_provider.get(P.EAGER), by_provider.get(P.COMPILE), by_provider.get(P.CONVS)
        for row in rows:
            if row["ms"] is None:
                continue
            row["speedup_vs_eager"] = eager / row["ms"] if eager else None
            row["speedup_vs_compile"] = compiled / row["ms"] if compiled else None
            row["floor_ratio"] = row["ms"] / floor if floor and mode == "eval" else None


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


def _row_line(row: dict) -> str:
    head = f"{row['workload']} {row['mode']} {row['dtype']} {row['provider']}:"
    if row["error"]:
        return f"{head} {row['error'][:160]}"
    vs = f", x{row['speedup_vs_eager']:.2f} eager" if row["speedup_vs_eager"] else ""
    err = f", rel err {row['rel_err']:.1e}" if row["rel_err"] is not None else ""
    return f"{head} {row['ms']:.3f} ms{vs}, {row['tflops']:.3g} TFLOP/s{err}, warm-up {row['warmup_s']:.1f}s"


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # lets the finally block write what was measured


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        print(NO_GPU_MESSAGE, flush=True)
        # one thread: on a small shared machine, idle-spinning OpenMP threads make timings 100x slower
        torch.set_num_threads(1)
    else:
        torch.backends.cudnn.benchmark = True
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
        if not import_error:
            meta["auto_backend"] = auto_choices(device, config["dtypes"])
    out_dir = Path(config["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _output_stem(meta)
    json_path = out_dir / f"{stem}.json"
    console = _console()
    sweep = Sweep(config, device, meta.get("ceilings", {}).get("bf16_gemm_tflops"))
    plan = sweep.plan()
    total = sum(len(names) for *_, names in plan)
    print(f"{meta['device_name']}: {len(plan)} groups, {total} rows -> {out_dir}", flush=True)
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
                    report.write_json(json_path, meta, sweep.rows)
        else:
            for done, (workload, mode, dtype, names) in enumerate(plan):
                print(f"[{done + 1}/{len(plan)}] {workload.name} {mode} {dtype}", flush=True)
                sweep.run_group(workload, mode, dtype, names, lambda row: print("  " + _row_line(row), flush=True))
                report.write_json(json_path, meta, sweep.rows)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the writing short
        meta["elapsed_s"] = round(time.perf_counter() - sweep.start, 1)
        for row in sweep.rows:
            if row["ms"] is None and row["error"] is None:
                row["error"] = "not run: the sweep was interrupted"
        report.write_json(json_path, meta, sweep.rows)
        report.print_table(sweep.rows, console)
        (out_dir / f"{stem}.md").write_text(report.markdown(sweep.rows, meta))
        title = f"{meta['device_name']} ({'CPU smoke' if meta['smoke'] else 'batch ' + str(config['batch'])}), " \
                f"torch {meta['torch']}, git {meta['git_sha'][:10]}"
        png = report.plot(sweep.rows, out_dir / f"{stem}.png", title)
        print(f"wrote {json_path}" + (f", {png}" if png else " (no plot: matplotlib missing)")
              + f", {stem}.md in {meta['elapsed_s']}s", flush=True)
    failed = sum(1 for r in sweep.rows if r["error"] and not r["error"].startswith("skipped"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
