"""Benchmark output: console table (rich when installed, plain text otherwise), JSON, Markdown and a PNG plot.

rich and matplotlib are optional: without rich the table is plain text, without matplotlib there is no plot.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# (row key, column header, format); a row lacking a key or holding None shows "-".
COLUMNS = (
    ("workload", "workload", "{}"),
    ("provider", "provider", "{}"),
    ("ms", "ms", "{:.3f}"),
    ("spread", "spread", "{:.1%}"),
    ("tflops", "TFLOP/s", "{:.3g}"),
    ("pct_peak", "% peak", "{:.0f}"),
    ("img_per_s", "img/s", "{:,.0f}"),
    ("speedup_vs_eager", "x eager", "{:.2f}"),
    ("speedup_vs_compile", "x compile", "{:.2f}"),
    ("convs_ratio", "/ cuDNN convs", "{:.2f}"),
    ("step_mem_mib", "step MiB", "{:,.0f}"),
    ("err", "err", "{:.1e}"),
    ("eager_err", "eager err", "{:.1e}"),
    ("grad_err", "grad err", "{:.1e}"),
    ("eager_grad_err", "eager grad err", "{:.1e}"),
    ("error", "error", "{}"),
)
_ERROR_WIDTH = 60


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-" if value is None else "nan"
    text = fmt.format(value)
    if key == "error" and len(text) > _ERROR_WIDTH:
        text = text[: _ERROR_WIDTH - 3] + "..."
    return text


def groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows by (mode, dtype), in sweep order."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["mode"], row["dtype"]), []).append(row)
    return grouped


def _columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The columns that hold a value in at least one row (workload and provider always)."""
    return [c for c in COLUMNS if c[0] in ("workload", "provider") or any(r.get(c[0]) is not None for r in rows)]


def print_table(rows: list[dict], console=None) -> None:
    """One table per (mode, dtype)."""
    for (mode, dtype), group in groups(rows).items():
        columns = _columns(group)
        title = f"{mode} {dtype}"
        if console is not None:
            from rich.table import Table

            table = Table(title=title, show_lines=False)
            for key, header, _ in columns:
                table.add_column(header, justify="left" if key in ("workload", "provider", "error") else "right")
            previous = None
            for row in group:
                if previous is not None and row["workload"] != previous:
                    table.add_section()
                previous = row["workload"]
                table.add_row(*(_cell(row, key, fmt) for key, _, fmt in columns))
            console.print(table)
        else:
            print(plain_table(group, columns, title))
            sys.stdout.flush()


def plain_table(rows: list[dict], columns, title: str) -> str:
    cells = [[header for _, header, _ in columns]] + [[_cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [f"== {title} =="]
    for line in cells:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(lines)


def _provenance(meta: dict) -> list[str]:
    """Markdown lines: the card's state, precision policy, the library's build and switches."""
    gpu = meta.get("gpu") or {}
    policy = meta.get("precision") or {}
    lines = []
    if gpu:
        lines.append(f"driver {gpu.get('driver_version')}, SM clock {gpu.get('clocks.sm')} (max "
                     f"{gpu.get('clocks.max.sm')}), power limit {gpu.get('power.limit')} (default "
                     f"{gpu.get('power.default_limit')}), {gpu.get('pstate')}, clock limits: "
                     f"{gpu.get('clocks_event_reasons.active')}")
    lines.append(f"TF32: matmul {policy.get('matmul_allow_tf32')}, cuDNN {policy.get('cudnn_allow_tf32')}; "
                 f"cudnn.benchmark {policy.get('cudnn_benchmark')}")
    lines.append(f"resnet_fused switches {meta.get('switches') or {}}, build {meta.get('build_info')}, "
                 f"sources sha256 {str(meta.get('sources_sha256'))[:16]}")
    return lines


LEGEND = ("ms: median of the round medians (spread: their max - min over that median); / cuDNN convs: this row's "
          "time over the module's convolutions alone (cuDNN, no BN/ReLU/residual epilogue) — a reference point, not "
          "a floor, so values below 1.0 are legitimate; step MiB: memory one step allocates above what was resident; "
          "err / grad err: relative L2 error of the output / the worst gradient against eager torchvision in fp32 "
          "(fp64 for an fp32 run), measured after timing, beside eager's own.")


def markdown(rows: list[dict], meta: dict) -> str:
    """The tables as Markdown, headed by the device, versions and provenance (for committed results)."""
    out = [
        f"# {meta.get('device_name')} — {meta.get('timestamp')}",
        "",
        f"torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, cuDNN "
        f"{meta.get('cudnn')}, git {meta.get('git_sha')}, batch {meta['config'].get('batch')}, "
        f"smoke {meta.get('smoke')}, quick {meta.get('quick')}",
        "",
        *(line + "  " for line in _provenance(meta)),
        "",
        LEGEND,
    ]
    for (mode, dtype), group in groups(rows).items():
        columns = _columns(group)
        out += ["", f"## {mode} {dtype}", ""]
        out.append("| " + " | ".join(h for _, h, _ in columns) + " |")
        out.append("|" + "---|" * len(columns))
        for row in group:
            out.append("| " + " | ".join(_cell(row, k, f).replace("|", "/") for k, _, f in columns) + " |")
    return "\n".join(out) + "\n"


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    tmp.replace(path)


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Horizontal bars of speedup vs eager, one panel per (mode, dtype), one bar per non-eager provider.

    A provider keeps its color across panels; a row without a time is marked "failed" or "skipped".
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    grouped = {k: v for k, v in groups(rows).items() if any(r.get("speedup_vs_eager") for r in v)}
    if not grouped:
        return None
    providers = list(dict.fromkeys(r["provider"] for g in grouped.values() for r in g if r["provider"] != "eager"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {p: colors[i % len(colors)] for i, p in enumerate(providers)}
    panels = []
    for key, group in grouped.items():
        workloads = list(dict.fromkeys(r["workload"] for r in group))
        present = [p for p in providers if any(r["provider"] == p for r in group)]
        panels.append((key, group, workloads, present))
    heights = [max(2.8, 0.16 * len(w) * max(1, len(p)) + 1.2) for _, _, w, p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.5), height_ratios=heights,
                             squeeze=False, layout="constrained")
    for ax, ((mode, dtype), group, workloads, present) in zip(axes[:, 0], panels):
        bar = 0.8 / max(1, len(present))
        lookup = {(r["workload"], r["provider"]): r for r in group}
        for j, provider in enumerate(present):
            ys, xs = [], []
            for i, workload in enumerate(workloads):
                row = lookup.get((workload, provider))
                if row is None:
                    continue
                y = i - 0.4 + bar * (j + 0.5)
                if row.get("speedup_vs_eager"):
                    ys.append(y)
                    xs.append(row["speedup_vs_eager"])
                    ax.text(row["speedup_vs_eager"], y, f" {row['speedup_vs_eager']:.2f}", va="center", fontsize=7)
                elif row.get("error"):
                    word = "skipped" if row["error"].startswith(("skipped", "not run")) else "failed"
                    ax.text(0.01, y, f"{provider} {word}", va="center", fontsize=7, color=color[provider])
            ax.barh(ys, xs, height=bar, label=provider, color=color[provider])
        ax.axvline(1.0, color="black", linewidth=0.8)
        fastest = max((r["speedup_vs_eager"] for r in group if r.get("speedup_vs_eager")), default=1.0)
        ax.set_xlim(0, 1.15 * max(1.0, fastest))
        ax.set_yticks(range(len(workloads)), workloads, fontsize=8)
        ax.set_ylim(len(workloads) - 0.5, -0.5)
        ax.set_xlabel("speedup vs eager (higher is better)")
        ax.set_title(f"{mode} {dtype}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
