"""benchmarks/gpu_check.sh fits one GPU window and everything it leaves comes back: at most 8 files in $OUT (the
device tool returns 8), named as that tool requires; a plan within 8.5 minutes; every test module that has something
to run on a GPU in one of its test groups, and only modules that exist: a GPU test outside its groups would never
run anywhere (CI has no GPU). Read from the script's own dry run (GPU_CHECK_DRY=1)."""

import fnmatch
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
# A gpu-marked test, or a module DEVICE that switches to CUDA on a GPU (conftest marks its tests cuda_device).
GPU_MODULE = re.compile(r"@pytest\.mark\.gpu\b|pytestmark\s*=.*\bgpu\b"
                        r"|^DEVICE = \"cuda\" if torch\.cuda\.is_available\(\)", re.MULTILINE)
MAX_FILES = 8
TOTAL_S = 510  # 8.5 minutes: a 15-minute window, 2-4 minutes of the machine's start, time to rerun a step
# What the device tool returns: files named in letters, digits, '.', '_' and '-' ('*': a pattern of the script's)
NAME = re.compile(r"^[A-Za-z0-9._*-]+$")


@pytest.fixture(scope="module")
def dry() -> dict:
    """The script's declared output files, plan and test groups ``{"out": [...], "plan": {...}, "groups": {...}}``."""
    proc = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "GPU_CHECK_DRY": "1"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out: dict = {"groups": {}}
    for line in proc.stdout.splitlines():
        kind, *words = line.split()
        if kind == "out":
            out["out"] = words
        elif kind == "plan":
            out["plan"] = {k: int(v) for k, v in zip(words[::2], words[1::2])}
        elif kind == "group":
            out["groups"][words[0]] = (int(words[1]), words[2:])
    return out


def test_gpu_check_leaves_at_most_8_files(dry):
    files = dry["out"]
    assert 0 < len(files) <= MAX_FILES, files
    assert all(NAME.match(f) for f in files), files
    # Everything the script writes under $OUT is one of them (the benchmark writes bench_<gpu>_<time>.{json,md,png}).
    written = set(re.findall(r"\$OUT/([A-Za-z0-9._-]+)", SCRIPT.read_text()))
    assert written, "the pattern for the script's $OUT files is stale"
    undeclared = [w for w in written if not any(fnmatch.fnmatch(w, f) for f in files)]
    assert not undeclared, f"gpu_check.sh writes {undeclared} to $OUT but does not count them"


def test_gpu_check_plan_fits_the_window(dry):
    plan, groups = dry["plan"], dry["groups"]
    assert plan["tests"] == sum(p for p, _ in groups.values())
    assert plan["total"] == sum(v for k, v in plan.items() if k not in ("total", "limit"))
    assert plan["total"] <= plan["limit"] <= TOTAL_S, plan


def test_gpu_check_runs_every_gpu_test_module(dry):
    groups = {g: files for g, (_, files) in dry["groups"].items()}
    assert set(groups) == {"cuda", "device", "triton"}, groups
    listed = [f for files in groups.values() for f in files]
    assert len(listed) == len(set(listed)), "a module listed in two groups runs twice"
    for f in listed:
        assert (ROOT / f).is_file(), f"gpu_check.sh lists {f}, which does not exist"
    gpu_modules = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if GPU_MODULE.search(p.read_text())}
    assert gpu_modules, "no GPU test module found: the pattern is stale"
    assert gpu_modules <= set(listed), f"GPU tests that gpu_check.sh never runs: {sorted(gpu_modules - set(listed))}"
