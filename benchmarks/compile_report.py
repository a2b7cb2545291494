"""Compile report: every Triton kernel of resnet_fused compiled for Hopper (sm_90a) without a GPU, and what the
compiler did with it. ``python -m benchmarks.compile_report [--quick] [--jobs N]``.

Each case of :mod:`benchmarks.compile.cases` (the ResNet-18/50 layers at batch 256 and ResNeXt grouped layers, in
eval and training, bf16/fp16/fp32 channels_last and bf16 NCHW input) runs its public launcher on ``meta`` tensors;
every launch it makes is compiled for every config its autotuner may choose (after pruning), through the JIT's
own argument binding (:mod:`benchmarks.compile.aot`). One row per (kernel, case, config): shared memory,
registers, spill bytes, stack, every ptxas info/warning line (its ``(C75xx)`` performance notes apart), and from
the SASS of the binary the MMA kind, the wgmma wait depth inside the K loop (``WARPGROUP.DEPBAR.LE gsb0, 0xN``)
and whether ptxas serialized the wgmma pipeline (``wgmma_serialized``); from the TTGIR whether every operand tile
is loaded with a 16-byte asynchronous copy or TMA; for convolutions the useful fraction of the MACs the MMA tiles
issue. Identical specializations compile once.

Output: ``triton-<version>[-quick].json`` (rows and a summary) and ``.md`` in ``--out`` (default
``benchmarks/results/local/compile/``, which git ignores; the committed full report lives in
``benchmarks/results/compile/``: regenerate it with ``--out benchmarks/results/compile``), and a rich table of the
summary and of every row that misses a target (:func:`violations`). Exit code 1 when a row misses a target. Runs
on a machine without a GPU; needs ``TRITON_INTERPRET`` unset (it is cleared here before triton is imported).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the launchers must bind for a real launch, not the interpreter

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.compile import aot  # noqa: E402
from benchmarks.compile.cases import DTYPES, LAYOUTS, QUICK, cases  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "compile"  # the committed reports
LOCAL = REPO / "benchmarks" / "results" / "local" / "compile"  # the default output (git-ignored)
CACHE = LOCAL / "cache"
STEM_MAC_TARGET = 0.40

FIELDS = ("kernel", "case", "mode", "dtype", "layout", "config", "ok", "shared_bytes", "registers", "spill_bytes",
          "spill_load_bytes", "stack_bytes", "mma", "wgmma_wait_in_loop", "wgmma_serialized", "ptx_wait_in_loop",
          "operand_loads_async", "mac_util", "sass_loop_loads", "sass_loop_unrolled", "loop_loads", "operand_loads",
          "ptxas_warnings", "ptxas_c75", "ptxas_info", "arrive_sites", "target", "configs_all", "configs_kept",
          "error")


def targeted(row: dict) -> bool:
    """Whether the report's targets apply: a ResNet-18/50 shape in bf16 or fp16."""
    return bool(row.get("target"))


def violations(row: dict) -> list[str]:
    """The targets a row misses (issues 10 and 18): it compiles and fits in shared memory; on ResNet-18/50 shapes
    in bf16/fp16, 0 spill bytes, no ptxas ``(C75xx)`` performance note and, for convolutions, wgmma in the SASS
    of the K loop with >= 1 group in flight (not serialized by ptxas), every operand tile loaded asynchronously,
    and the stem's useful MACs >= 40% of those issued."""
    if not row["ok"]:
        return [f"does not compile: {row['error']}"]
    out = []
    if row["shared_bytes"] > aot.HOPPER_SMEM:
        out.append(f"shared {row['shared_bytes']} B > {aot.HOPPER_SMEM} B")
    if not targeted(row):
        return out
    if row["spill_bytes"]:
        out.append(f"spills {row['spill_bytes']} B")
    for note in row.get("ptxas_c75") or ():
        out.append(note.split(":", 1)[1].strip()[:60])
    if row["kind"] == "conv" and row["kernel"] == "_conv_fwd_kernel":
        if row["mma"] != "wgmma":
            out.append(f"mma {row['mma']} (SASS)")
        if row["wgmma_serialized"]:
            out.append(f"wgmma serialized (SASS: WARPGROUP.DEPBAR.LE gsb0, {row['wgmma_wait_in_loop']} in the K loop)")
        if not row["operand_loads_async"]:
            out.append(f"operand loads not all 16-byte async: {row['operand_loads']}")
        if row.get("stem") and row["mac_util"] is not None and row["mac_util"] < STEM_MAC_TARGET:
            out.append(f"stem MAC utilization {row['mac_util']:.1%} < {STEM_MAC_TARGET:.0%}")
    return out


def _selected(quick: bool):
    """(case, dtype, layout) triples of the run."""
    all_cases = cases()
    if not quick:
        # NCHW input in bf16 only: the launcher takes x to channels_last, so the kernels differ from the
        # channels_last ones in the output's strides alone
        return [(c, d, lay) for c in all_cases for d in DTYPES for lay in LAYOUTS if lay == "nhwc" or d == "bf16"]
    by_key = {(c.name, c.mode): c for c in all_cases}
    missing = [q for q in QUICK if (q[0], q[1]) not in by_key]
    if missing:
        raise KeyError(f"quick cases not in the case list: {missing}")
    return [(by_key[(n, m)], d, lay) for n, m, d, lay in QUICK]


def plan(quick: bool):
    """Rows to fill (without compiler facts yet) and the distinct variants to compile, keyed by binary."""
    from resnet_fused.backends.triton import _launch, conv

    rows, todo = [], {}
    for case, dname, layout in _selected(quick):
        base = dict(case=case.name, mode=case.mode, kind=case.kind, dtype=dname, layout=layout, stem=case.stem,
                    target=case.resnet and dname in ("bf16", "fp16"))
        try:
            with _launch.capture() as launches:
                case.run(DTYPES[dname], layout)
        except Exception as err:  # a launcher that cannot run a case is a row, not a crash
            rows.append(dict(base, kernel="?", config="-", ok=False, error=f"launcher: {err!r}"))
            continue
        for launch in launches:
            for v in aot.variants(launch):
                row = dict(base, kernel=v.jit.fn.__name__, config=v.config, ok=None, error=None, mac_util=None,
                           configs_all=v.configs_all, configs_kept=v.configs_kept)
                if row["kernel"] == "_conv_fwd_kernel":
                    useful, issued = conv.mma_macs({**dict(zip(v.jit.arg_names, v.args)), **v.kwargs})
                    row["mac_util"] = round(useful / issued, 4)
                try:
                    key = aot.cache_key(v)
                except Exception as err:
                    row.update(ok=False, error=f"binding: {err!r}")
                    rows.append(row)
                    continue
                todo.setdefault(key, v)
                row["_key"] = key
                rows.append(row)
    return rows, todo


_PENDING: list = []
_STATS: dict = {"from_cache": 0}


def _facts_key(key: str, v) -> str:
    """The cache file name of a binary's facts: its specialization, the kernel's source with everything it calls
    (the JIT's own hash), the Triton version and the analysis code (:mod:`benchmarks.compile.aot`)."""
    import hashlib

    text = "\n".join([key, v.jit.cache_key, triton.__version__, Path(aot.__file__).read_text()])
    return hashlib.sha256(text.encode()).hexdigest()[:32] + ".json"


def _compile_at(i: int) -> dict:
    try:
        return {"ok": True, "error": None, **aot.compile_variant(_PENDING[i])}
    except Exception as err:
        return {"ok": False, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}",
                "trace": traceback.format_exc(limit=3)}


def compile_all(todo: dict, jobs: int, progress: bool, cache: Path | None = None) -> dict:
    """Compile every distinct variant (``jobs`` processes); returns key -> facts. With ``cache``, facts of a
    binary compiled before by the same Triton, kernel source and report code are read from there (and new ones
    written), so a rerun after a change in pruning compiles only what changed."""
    global _PENDING
    results = {}
    files = {}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for k, v in todo.items():
            files[k] = cache / _facts_key(k, v)
            if files[k].exists():
                results[k] = json.loads(files[k].read_text())
        if progress and results:
            print(f"  {len(results)}/{len(todo)} binaries' facts from {cache}", file=sys.stderr, flush=True)
    keys = [k for k in todo if k not in results]
    _PENDING = [todo[k] for k in keys]
    _STATS["from_cache"] = len(results)
    t0 = time.time()
    if jobs > 1 and len(keys) > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for n, (i, facts) in enumerate(zip(range(len(keys)), pool.imap(_compile_at, range(len(keys))))):
                results[keys[i]] = facts
                if facts["ok"] and keys[i] in files:
                    files[keys[i]].write_text(json.dumps(facts))
                if progress and (n + 1) % 20 == 0:
                    print(f"  compiled {n + 1}/{len(keys)} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    else:
        for i, k in enumerate(keys):
            results[k] = _compile_at(i)
            if results[k]["ok"] and k in files:
                files[k].write_text(json.dumps(results[k]))
            if progress and (i + 1) % 20 == 0:
                print(f"  compiled {i + 1}/{len(keys)} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return results


def build(quick: bool, jobs: int = 1, progress: bool = False, cache: Path | None = None) -> dict:
    """The whole report as a dict: ``meta``, ``summary`` and ``rows`` (schema: :data:`FIELDS`)."""
    t0 = time.time()
    rows, todo = plan(quick)
    facts = compile_all(todo, jobs, progress, cache)
    for row in rows:
        key = row.pop("_key", None)
        if key is not None:
            f = facts[key]
            row.update({k: v for k, v in f.items() if k != "trace"})
    for row in rows:
        row["violations"] = violations(row)
    meta = {
        "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "target": f"{aot.TARGET.backend} sm_{aot.TARGET.arch}a, warp {aot.TARGET.warp_size}",
        "git_sha": _git_sha(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": quick,
        "distinct_binaries": len(todo), "binaries_from_cache": _STATS["from_cache"],
        "seconds": round(time.time() - t0, 1),
        "env": {k: v for k, v in os.environ.items() if k.startswith("RESNET_FUSED_")},
    }
    return {"meta": meta, "summary": summarize(rows), "rows": rows}


def _git_sha() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarize(rows: list[dict]) -> dict:
    """Headline numbers: rows whose wgmma pipeline ptxas serialized (all, targeted) or that carry a C75xx note;
    over the targeted rows of each mode, the worst registers and spills, how many configs keep no wgmma group in
    flight, are serialized, load synchronously or miss wgmma; the stem's worst MAC utilization."""
    out = {"rows": len(rows), "failed": sum(1 for r in rows if not r["ok"]),
           "violating_rows": sum(1 for r in rows if r["violations"]),
           "serialized_rows": sum(1 for r in rows if r["ok"] and r.get("wgmma_serialized")),
           "serialized_rows_targeted": sum(1 for r in rows if r["ok"] and r.get("wgmma_serialized") and targeted(r)),
           "c75_rows": sum(1 for r in rows if r["ok"] and r.get("ptxas_c75"))}
    for mode in sorted({r["mode"] for r in rows}):
        sel = [r for r in rows if r["mode"] == mode and targeted(r) and r["ok"]]
        convs = [r for r in sel if r["kernel"] == "_conv_fwd_kernel"]
        if not sel:
            continue
        out[mode] = {
            "rows": len(sel),
            "max_registers": max(r["registers"] for r in sel),
            "rows_spilling": sum(1 for r in sel if r["spill_bytes"]),
            "max_spill_bytes": max(r["spill_bytes"] for r in sel),
            "conv_rows": len(convs),
            "conv_rows_wgmma": sum(1 for r in convs if r["mma"] == "wgmma"),
            "conv_rows_wait0_in_loop": sum(1 for r in convs if r["wgmma_wait_in_loop"] == 0),
            "conv_rows_serialized": sum(1 for r in convs if r["wgmma_serialized"]),
            "rows_c75": sum(1 for r in sel if r.get("ptxas_c75")),
            "conv_rows_async_loads": sum(1 for r in convs if r["operand_loads_async"]),
        }
        shortcut = [r for r in convs if "+shortcut" in r["case"]]
        if shortcut:
            out[mode]["shortcut_max_registers"] = max(r["registers"] for r in shortcut)
            out[mode]["shortcut_max_spill_bytes"] = max(r["spill_bytes"] for r in shortcut)
    stem = [r for r in rows if r.get("stem") and r["mac_util"] is not None]
    if stem:
        out["stem_mac_util_min"] = min(r["mac_util"] for r in stem)
        out["stem_mac_util_max"] = max(r["mac_util"] for r in stem)
    return out


def markdown(report: dict) -> str:
    meta, summary = report["meta"], report["summary"]
    lines = [f"# Compile report: Triton {meta['triton']} for {meta['target']}", "",
             f"git {meta['git_sha']}, {meta['time']}, torch {meta['torch']}, quick={meta['quick']}, "
             f"{meta['distinct_binaries']} distinct binaries in {meta['seconds']} s "
             f"({meta.get('binaries_from_cache', 0)} of them compiled before, their facts read from --cache). "
             f"Generated by `python -m benchmarks.compile_report --out benchmarks/results/compile`; targets: "
             f"issues 10 and 18. mma, wait (SASS) and serialized are read from the SASS; PTX wait is the PTX's "
             f"`wgmma.wait_group` depth; C75xx: ptxas's performance notes.", "", "## Summary", "",
             "```json", json.dumps(summary, indent=1), "```", "", "## Rows", "",
             "| kernel | case | mode | dtype | layout | config | smem B | regs | spill B | stack B | mma "
             "| wait (SASS) | serialized | PTX wait | async loads | MAC util | loop loads (TTGIR, SASS) | C75xx "
             "| missed targets |", "|" + "---|" * 19]
    for r in report["rows"]:
        if not r["ok"]:
            lines.append(f"| {r['kernel']} | {r['case']} | {r['mode']} | {r['dtype']} | {r['layout']} | {r['config']} "
                         f"| | | | | | | | | | | | | {'; '.join(r['violations'])} |")
            continue
        mac = "" if r["mac_util"] is None else f"{r['mac_util']:.1%}"
        loads = ", ".join(f"{k}×{v}" for k, v in {**r["operand_loads"], **r["sass_loop_loads"]}.items())
        c75 = ", ".join(sorted({n.split("(", 1)[1].split(")", 1)[0] for n in r["ptxas_c75"]}))
        lines.append(f"| {r['kernel']} | {r['case']} | {r['mode']} | {r['dtype']} | {r['layout']} | {r['config']} | "
                     f"{r['shared_bytes']} | {r['registers']} | {r['spill_bytes']} | {r['stack_bytes']} | {r['mma']} | "
                     f"{r['wgmma_wait_in_loop']} | {r['wgmma_serialized']} | {r['ptx_wait_in_loop']} | "
                     f"{r['operand_loads_async']} | {mac} | {loads} | {c75} | {'; '.join(r['violations'])} |")
    return "\n".join(lines) + "\n"


def print_tables(report: dict, show_all: bool) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(json.dumps(report["summary"], indent=1))
        for r in report["rows"]:
            if show_all or r["violations"]:
                print(r["kernel"], r["case"], r["mode"], r["dtype"], r["layout"], r["config"], r["violations"])
        return
    console = Console(width=200)
    head = Table(title=f"Triton {report['meta']['triton']} → {report['meta']['target']}: summary")
    head.add_column("mode")
    keys = ["rows", "max_registers", "rows_spilling", "max_spill_bytes", "conv_rows", "conv_rows_wgmma",
            "conv_rows_wait0_in_loop", "conv_rows_serialized", "rows_c75", "conv_rows_async_loads",
            "shortcut_max_registers", "shortcut_max_spill_bytes"]
    for k in keys:
        head.add_column(k.replace("_", " "), justify="right")
    for mode, s in report["summary"].items():
        if isinstance(s, dict):
            head.add_row(mode, *(str(s.get(k, "")) for k in keys))
    console.print(head)
    s = report["summary"]
    console.print(f"rows {s['rows']}, failed {s['failed']}, missing a target {s['violating_rows']}, wgmma "
                  f"serialized {s['serialized_rows']} ({s['serialized_rows_targeted']} targeted); stem MAC "
                  f"utilization {s.get('stem_mac_util_min', 0):.1%}..{s.get('stem_mac_util_max', 0):.1%}")
    rows = [r for r in report["rows"] if show_all or r["violations"]]
    if not rows:
        return
    table = Table(title="rows" if show_all else "rows missing a target")
    for col in ("kernel", "case", "mode", "dtype", "layout", "config", "regs", "spill", "smem", "mma", "wait",
                "serialized", "async", "MAC", "missed"):
        table.add_column(col)
    for r in rows:
        mac = "" if r.get("mac_util") is None else f"{r['mac_util']:.0%}"
        table.add_row(r["kernel"], r["case"], r["mode"], r["dtype"], r["layout"], r["config"],
                      str(r.get("registers")), str(r.get("spill_bytes")), str(r.get("shared_bytes")),
                      str(r.get("mma")), str(r.get("wgmma_wait_in_loop")), str(r.get("wgmma_serialized")),
                      str(r.get("operand_loads_async")), mac,
                      "; ".join(r["violations"]))
    console.print(table)


def write(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"triton-{report['meta']['triton']}" + ("-quick" if report["meta"]["quick"] else "")
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    jpath.write_text(json.dumps(report, indent=1) + "\n")
    mpath.write_text(markdown(report))
    return jpath, mpath


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI subset: one case per code path")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--out", type=Path, default=LOCAL,
                        help=f"output folder (default: %(default)s; the committed reports: {RESULTS})")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"reuse the facts of binaries compiled before, kept in this folder (e.g. {CACHE})")
    parser.add_argument("--all", action="store_true", help="print every row, not only those missing a target")
    args = parser.parse_args(argv)
    report = build(args.quick, args.jobs, progress=True, cache=args.cache)
    print_tables(report, args.all)
    if not args.no_write:
        for p in write(report, args.out):
            print(f"wrote {p}")
    return 1 if report["summary"]["violating_rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
