"""cuDNN support report: every fusion graph resnet_fused's cudnn engine builds, planned by cuDNN for an H100 without
a GPU. ``python -m benchmarks.cudnn_report [--quick] [--out DIR] [--site SITE_PACKAGES ...] [--batch N]``.

``graph.validate()`` (all the CPU tests can run) checks only shapes and types; whether cuDNN has an engine for a graph
is known only after its heuristics, support check and plan build. cudnn-frontend 1.32 runs those "deviceless": a
device-properties description of the target (H100 SXM: sm_90, 132 SMs, 227 KB opt-in shared memory per block, 50 MB
L2) set on the graph in place of a handle. This report compiles the project's own ``csrc/cudnn/graphs.cpp`` —
unchanged, the code the engine runs — with a small driver (``benchmarks/cudnn/driver.cpp``) against each cuDNN given,
and calls its ``plan_deviceless``: the same nodes, steps and engine filters as a GPU call. cuDNN's runtime-compiled
engines still load the CUDA driver library: a stand-in (``benchmarks/cudnn/stub_libcuda.c``, built here with ``cc``)
answers the calls a plan build makes and fails any launch; NVRTC really compiles the sm_90 kernels.

Cases: each convolution of ResNet-18's and ResNet-50's residual blocks (shapes traced from torchvision's models on
the meta device, batch ``--batch``), bf16 / fp16 / fp32 (TF32, torch's default), NHWC and NCHW, with the graphs the
engine builds for it and the per-channel vectors production passes (fp32):

* eval: conv·scale+shift [+residual] [ReLU] (``conv_bn_act``; the downsample conv as its own graph without ReLU);
* train forward: conv [with the previous BN+ReLU as prologue] → genstats (``conv_stats``);
* train backward (``conv_stats_backward_conv``): wgrad [prologue], and with a prologue dgrad + ReLU backward.

and, for the convs with a prologue, the alternative formulations the engine could use instead ("formulation"
column): the prologue vectors in the io dtype, and the prologue as an explicit BN+ReLU pass before a graph without
one (genstats / wgrad on the activated input, dgrad's ReLU mask from it). ``conv_dgrad_drelu_bn`` (a test hook, not
run by the engine) is planned too in the full report.

Rows: graph, case, mode, dtype, layout, vector dtype, formulation, cuDNN version, status ("built" or "no engine"),
the step that refused and cuDNN's own message (condensed: its distinct reasons), the engine name and workspace.
Output: ``cudnn[-quick].json`` (rows and a summary per cuDNN) and ``.md`` under ``--out`` (default
``benchmarks/results/local/cudnn/``, git-ignored; the committed full report is ``benchmarks/results/cudnn/``).
Exit code 1 when the driver could not be built or run, 0 otherwise (a refusal is a finding, not a failure).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "benchmarks" / "cudnn"
RESULTS = REPO / "benchmarks" / "results" / "cudnn"
LOCAL = REPO / "benchmarks" / "results" / "local" / "cudnn"
SOURCES = (REPO / "csrc" / "cudnn" / "graphs.cpp", REPO / "csrc" / "cudnn" / "graph_spec.h", HERE / "driver.cpp")

# The target: an H100 SXM5 (80 GB HBM3) as cudnnGetDeviceProperties would describe it (the keys of cuDNN's
# CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION; smCountOrigin 0 = the full device).
H100 = {
    "deviceVer": 900, "driverVer": 13000, "cudaDeviceId": 0, "deviceName": "NVIDIA H100 80GB HBM3",
    "totalGlobalMem": 84929347584, "maxGridSize": [2147483647, 65535, 65535], "maxBlockSize": [1024, 1024, 64],
    "regsPerBlock": 65536, "multiProcessorCount": 132, "smCountOrigin": 0, "warpSize": 32,
    "maxSharedMemoryPerBlock": 49152, "maxSharedMemoryPerBlockOptin": 232448, "reservedSharedMemoryPerBlock": 1024,
    "maxRegistersPerSM": 65536, "maxCtasPerSM": 32, "maxThreadsPerBlock": 1024, "maxThreadsPerSM": 2048,
    "pciDeviceId": 0, "isTccDriver": 0, "supportCoopLaunch": 1, "smClockRateKHz": 1980000, "memClockRateKHz": 2619000,
    "l2CacheSize": 52428800,
}

DTYPES = ("bf16", "fp16", "fp32")
LAYOUTS = ("nhwc", "nchw")
PRODUCTION = "production"
IO_VECTORS = "io-dtype vectors"
EXPLICIT_PASS = "explicit BN+ReLU pass"
GPU_TEST = "gpu test"
ENGINE_CHOICE = "engine's choice (per conv)"
QUICK_CONVS = ("r50.layer1.0.conv2", "r50.layer2.0.conv2")
# The shapes of tests/test_cudnn_graph.py's GPU tests (its GPU_CONVS): name -> (N, C, H, K, R, stride, padding). The
# report plans every graph those GPU tests call (formulation "gpu test"), and a GPU test may accept a refusal only
# where the report shows one.
GPU_TEST_CONVS = {
    "3x3_64": (4, 64, 14, 64, 3, 1, 1),
    "3x3_128_s2": (4, 128, 14, 128, 3, 2, 1),
    "1x1_64_256": (4, 64, 14, 256, 1, 1, 0),
    "1x1_256_512_s2": (2, 256, 14, 512, 1, 2, 0),
    "7x7_stem_s2": (2, 3, 32, 64, 7, 2, 3),
    "3x3_odd_24_40": (3, 24, 11, 40, 3, 1, 1),
}
# cuDNN's generic trailers, which say where a refusal surfaced, not why.
_GENERIC = re.compile(r"^(finalize_internal\(\)|engine\.finalize\(\)|status|ptr->isSupported\(\)|"
                      r"engine_iface->getStatus\(\)|status == .*|.*\.load\(\)|rtk\(\)->loadDLL\(\))$")


@dataclass(frozen=True)
class Conv:
    """One convolution of a residual block and what the engine does around it."""

    name: str  # "r50.layer2.0.conv2"
    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    stride: int
    pad: int
    prologue: bool  # training: the previous conv's BN+ReLU applied on load
    residual: bool  # eval: the block's residual added before the ReLU
    relu: bool  # eval: ReLU at the end (not on the downsample shortcut)

    def shape(self) -> str:
        return f"{self.c}x{self.h}x{self.w} -> {self.k}, {self.r}x{self.r} s{self.stride}"


@dataclass
class Case:
    graph: str
    mode: str  # eval | train
    dtype: str
    layout: str
    vec: str
    formulation: str
    conv: Conv
    prologue: bool
    residual: bool = False
    relu: bool = False
    convs: list[str] = field(default_factory=list)  # every conv this case covers (identical shapes)

    def key(self) -> tuple:
        c = self.conv
        return (self.graph, self.formulation, self.dtype, self.layout, self.vec, c.n, c.c, c.h, c.w, c.k, c.r,
                c.stride, c.pad, self.prologue, self.residual, self.relu)

    def line(self, ident: str) -> str:
        c = self.conv
        return " ".join(str(v) for v in (ident, self.graph, self.dtype, self.vec, self.layout, c.n, c.c, c.h, c.w, c.k,
                                          c.r, c.r, c.stride, c.pad, int(self.prologue), int(self.residual),
                                          int(self.relu), 0))


def resnet_convs(batch: int) -> list[Conv]:
    """The convolutions of ResNet-18's and ResNet-50's residual blocks, shapes traced on the meta device."""
    import torch
    import torchvision

    convs: list[Conv] = []
    for arch, short in (("resnet18", "r18"), ("resnet50", "r50")):
        model = getattr(torchvision.models, arch)().to("meta")
        shapes: dict[str, tuple[int, ...]] = {}
        hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(inp[0].shape)))
                 for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            model(torch.empty(batch, 3, 224, 224, device="meta"))
        for h in hooks:
            h.remove()
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.Conv2d) or not name.startswith("layer"):
                continue
            parts = name.split(".")  # layerL.B.convJ | layerL.B.downsample.0
            block = model.get_submodule(".".join(parts[:2]))
            last = "conv3" if hasattr(block, "conv3") else "conv2"
            n, c, h, w = shapes[name]
            downsample = parts[2] == "downsample"
            convs.append(Conv(
                name=f"{short}.{name}", n=n, c=c, h=h, w=w, k=m.out_channels, r=m.kernel_size[0], stride=m.stride[0],
                pad=m.padding[0], prologue=not downsample and parts[2] != "conv1", residual=parts[2] == last,
                relu=not downsample))
    return convs


def cases(convs: list[Conv], quick: bool) -> list[Case]:
    """The graphs the engine builds for each conv (production), and the alternative formulations for the convs with
    a prologue; identical cases (the same shapes in several layers or models) once, naming every conv."""
    out: dict[tuple, Case] = {}

    def add(case: Case) -> None:
        existing = out.setdefault(case.key(), case)
        existing.convs.append(case.conv.name)

    chosen = [c for c in convs if c.name in QUICK_CONVS] if quick else convs
    dtypes = ("bf16", "fp16") if quick else DTYPES
    layouts = ("nhwc",) if quick else LAYOUTS
    for conv in chosen:
        for dtype in dtypes:
            for layout in layouts:
                base = dict(dtype=dtype, layout=layout, conv=conv)
                add(Case("conv_scale_bias_act", "eval", vec="fp32", formulation=PRODUCTION, prologue=False,
                         residual=conv.residual, relu=conv.relu, **base))
                add(Case("conv_genstats", "train", vec="fp32", formulation=PRODUCTION, prologue=conv.prologue, **base))
                add(Case("conv_wgrad", "train", vec="fp32", formulation=PRODUCTION, prologue=conv.prologue, **base))
                if not conv.prologue:
                    continue  # the engine's dgrad is then cuDNN's plain convolution backward, no graph
                add(Case("conv_dgrad_drelu", "train", vec="fp32", formulation=PRODUCTION, prologue=True, **base))
                if dtype != "fp32":
                    for graph in ("conv_genstats", "conv_wgrad", "conv_dgrad_drelu"):
                        add(Case(graph, "train", vec=dtype, formulation=IO_VECTORS, prologue=True, **base))
                for graph in ("conv_genstats", "conv_wgrad", "conv_dgrad_drelu"):
                    add(Case(graph, "train", vec="fp32", formulation=EXPLICIT_PASS, prologue=False, **base))
                if not quick:
                    add(Case("conv_dgrad_drelu_bn", "train", vec="fp32", formulation="test hook", prologue=False,
                             **base))
    if not quick:
        for case in gpu_test_cases():
            add(case)
    return list(out.values())


def gpu_test_cases() -> list[Case]:
    """Every graph call of tests/test_cudnn_graph.py's GPU tests (channels_last, bf16 / fp16): eval with fp32 or
    io-dtype vectors and each (ReLU, residual) variant; genstats and wgrad with fp32 / io-dtype prologue vectors or
    none (the stem without a prologue only); dgrad + dReLU and dgrad + dReLU + dBN on the inner convs; and the NCHW
    bf16 eval graph of test_gpu_nchw_is_right_or_refused."""
    out = []
    for name, (n, c, h, k, r, stride, pad) in GPU_TEST_CONVS.items():
        conv = Conv(f"test.{name}", n, c, h, h, k, r, stride, pad, prologue=False, residual=False, relu=True)
        inner = not name.startswith("7x7")
        for dtype in ("bf16", "fp16"):
            base = dict(mode="test", dtype=dtype, layout="nhwc", formulation=GPU_TEST, conv=conv)
            vecs = ("fp32", dtype)
            for vec in vecs:
                for relu, residual in ((True, True), (True, False), (False, False)):
                    out.append(Case("conv_scale_bias_act", vec=vec, prologue=False, residual=residual, relu=relu,
                                    **base))
            for graph in ("conv_genstats", "conv_wgrad"):
                out.append(Case(graph, vec="fp32", prologue=False, **base))
                if inner:
                    out += [Case(graph, vec=vec, prologue=True, **base) for vec in vecs]
            if inner:
                out.append(Case("conv_dgrad_drelu", vec="fp32", prologue=False, **base))
                out += [Case("conv_dgrad_drelu", vec=vec, prologue=True, **base) for vec in vecs]
                out.append(Case("conv_dgrad_drelu_bn", vec="fp32", prologue=False, **base))
        if name == "3x3_64":
            out.append(Case("conv_scale_bias_act", mode="test", dtype="bf16", layout="nchw", formulation=GPU_TEST,
                            conv=conv, vec="fp32", prologue=False, relu=True))
    return out


# ---- building the driver and the stand-in driver library ----


@dataclass
class Cudnn:
    """A cuDNN to plan with: a site-packages holding nvidia/cudnn (headers, libcudnn.so.9), nvidia/cu13 (NVRTC,
    cudart) and the cudnn-frontend headers (include/cudnn_frontend.h)."""

    site: Path
    version: str = ""

    def check(self) -> str:
        for rel in ("nvidia/cudnn/include/cudnn_version.h", "nvidia/cudnn/lib/libcudnn.so.9", "include/cudnn_frontend.h"):
            if not (self.site / rel).is_file():
                return f"{self.site}: no {rel} (pip install --no-deps nvidia-cudnn-frontend==1.32.0 for the headers)"
        if not list((self.site / "nvidia").glob("cu*/lib/libnvrtc.so.*")):
            return f"{self.site}: no NVRTC (nvidia/cu*/lib/libnvrtc.so.*)"
        text = (self.site / "nvidia/cudnn/include/cudnn_version.h").read_text()
        parts = [re.search(rf"#define CUDNN_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCHLEVEL")]
        self.version = ".".join(p.group(1) for p in parts if p)
        return ""


def cuda_include() -> Path | None:
    """The CUDA toolkit's include/ (cuda_runtime.h): $CUDA_HOME, else the one nvcc on PATH belongs to."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and Path(root, "include", "cuda_runtime.h").is_file():
            return Path(root, "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60).stderr
            top = re.search(r"^#\$ TOP=(.*)$", out, re.M)
            if top and Path(top.group(1), "include", "cuda_runtime.h").is_file():
                return Path(top.group(1), "include").resolve()
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")


def build_stub(build: Path) -> Path:
    """libcuda.so.1 from stub_libcuda.c, in its own folder (the one put on LD_LIBRARY_PATH)."""
    src = HERE / "stub_libcuda.c"
    out = build / f"stub-{hashlib.sha256(src.read_bytes()).hexdigest()[:12]}" / "libcuda.so.1"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "cc")
        _run([cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(src), "-ldl"], "building the stand-in libcuda")
    return out.parent


def build_driver(cudnn: Cudnn, build: Path, cuda_inc: Path) -> Path:
    """The driver compiled with graphs.cpp against this cuDNN (cached by the sources and the cuDNN)."""
    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(src.read_bytes())
    digest.update(str(cudnn.site.resolve()).encode())
    out = build / f"driver-{cudnn.version}-{digest.hexdigest()[:12]}"
    if out.is_file():
        return out
    site = cudnn.site
    cu_lib = next((site / "nvidia").glob("cu*/lib/libnvrtc.so.*")).parent
    includes = ["-isystem", str(site / "include"), "-isystem", str(site / "nvidia/cudnn/include"),
                "-isystem", str(cuda_inc), "-isystem", str(cu_lib.parent / "include")]
    cxx = os.environ.get("CXX", "c++")
    objs = []
    build.mkdir(parents=True, exist_ok=True)
    for src in (REPO / "csrc/cudnn/graphs.cpp", HERE / "driver.cpp"):
        obj = build / f"{src.stem}-{cudnn.version}-{digest.hexdigest()[:12]}.o"
        if not obj.is_file():  # written under another name first: an interrupted compile leaves no object
            tmp = obj.with_suffix(f".{os.getpid()}.tmp")
            _run([cxx, "-std=c++17", "-O1", *includes, "-c", str(src), "-o", str(tmp)], f"compiling {src.name}")
            tmp.replace(obj)
        objs.append(str(obj))
    nvrtc = sorted(p.name for p in cu_lib.glob("libnvrtc.so.*") if "alt" not in p.name and
                   re.fullmatch(r"libnvrtc\.so\.\d+", p.name))[0]
    cudart = sorted(p.name for p in cu_lib.glob("libcudart.so.*") if re.fullmatch(r"libcudart\.so\.\d+", p.name))[0]
    cudnn_lib = site / "nvidia/cudnn/lib"
    _run([cxx, *objs, "-o", str(out), f"-L{cudnn_lib}", "-l:libcudnn.so.9", f"-L{cu_lib}", f"-l:{cudart}",
          f"-l:{nvrtc}", f"-Wl,-rpath,{cudnn_lib}:{cu_lib}"], "linking the driver")
    return out


# ---- running it ----


def condense(reason: str) -> str:
    """cuDNN's message without its repetition: the first line, then each distinct reason once."""
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    if not lines:
        return ""
    kept: list[str] = [lines[0]]
    for ln in lines[1:]:
        m = re.match(r"Warning: (\S+); Reason: (.*?)(?: at: .*)?$", ln)
        if m:
            if _GENERIC.match(m.group(2).strip()):
                continue
            ln = f"{m.group(1)}: {m.group(2).strip()}"
        elif ln.startswith("{") or ln.startswith("Plan at index"):
            if ln.startswith("Plan at index"):
                ln = re.sub(r"^Plan at index \d+: ", "", ln)
            else:
                continue
        if ln not in kept:
            kept.append(ln)
    return "\n".join(kept)[:2000]


def run_cases(driver: Path, lib_dirs: list[Path], todo: list[Case], timeout: float) -> list[dict]:
    """Plans every case with the driver (one process; restarted past a case that kills it). lib_dirs go first on
    the loader path: the stand-in libcuda.so.1, and the folder of NVRTC, which loads libnvrtc-builtins by name."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([*(str(d) for d in lib_dirs), *filter(None, [env.get("LD_LIBRARY_PATH")])])
    results: dict[int, dict] = {}
    pending = list(range(len(todo)))
    while pending:
        payload = json.dumps(H100) + "\n" + "".join(todo[i].line(str(i)) + "\n" for i in pending)
        try:
            proc = subprocess.run([str(driver)], input=payload, capture_output=True, text=True, env=env,
                                  timeout=timeout)
            stdout, stderr, crashed = proc.stdout, proc.stderr, proc.returncode != 0
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr, crashed = f"timed out after {timeout:.0f} s", True
        for line in stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                results[int(r["id"])] = r
        pending = [i for i in pending if i not in results]
        if pending and crashed:
            first = pending.pop(0)
            results[first] = {"ok": False, "step": "driver", "permanent": False, "engine": "", "workspace": 0,
                              "reason": f"the driver died on this case: {stderr.strip()[-500:]}", "spec": ""}
        elif pending:
            raise RuntimeError(f"the driver answered {len(results)} of {len(todo)} cases: {stderr[-2000:]}")
    return [results[i] for i in range(len(todo))]


def row(case: Case, result: dict, version: str) -> dict:
    return {
        "graph": case.graph, "case": case.conv.shape() + (" +prologue" if case.prologue else "")
        + (" +residual" if case.residual else "") + (" relu" if case.graph == "conv_scale_bias_act" and case.relu else ""),
        "convs": case.convs, "prologue": case.prologue, "residual": case.residual, "relu": case.relu, "mode": case.mode, "dtype": case.dtype,
        "layout": case.layout, "vec_dtype": case.vec, "formulation": case.formulation, "cudnn": version,
        "status": "built" if result["ok"] else "no engine", "step": result.get("step", ""),
        "reason": condense(result.get("reason", "")), "engine": result.get("engine", ""),
        "workspace": result.get("workspace", 0), "spec": result.get("spec", ""),
    }


# ---- summary ----


def formulations(rows: list[dict]) -> list[dict]:
    """Per cuDNN, dtype and layout: which training formulation has an engine for every graph it needs on every conv.

    production: genstats [prologue, fp32 vectors] + wgrad [prologue] + dgrad+dReLU [prologue];
    io-dtype vectors: the same graphs with the prologue's vectors in the io dtype;
    explicit BN+ReLU pass: an affine_relu pass materializes the activated input, then genstats / wgrad / dgrad+dReLU
    without a prologue (convs without a prologue run their production graphs in every formulation);
    engine's choice: what the cudnn engine runs, per conv and graph the production graph where it is built, else
    the explicit pass's. Counts are (conv, graph) pairs for the last one, distinct cases for the others.
    """
    out = []
    keys = sorted({(r["cudnn"], r["dtype"], r["layout"]) for r in rows if r["mode"] == "train"})
    for version, dtype, layout in keys:
        sel = [r for r in rows if (r["cudnn"], r["dtype"], r["layout"]) == (version, dtype, layout)
               and r["mode"] == "train" and r["formulation"] in (PRODUCTION, IO_VECTORS, EXPLICIT_PASS)]
        # A conv without a prologue runs its production graphs in every formulation.
        plain = [r for r in sel if r["formulation"] == PRODUCTION and not r["prologue"]]
        for form in (PRODUCTION, IO_VECTORS, EXPLICIT_PASS):
            if form == IO_VECTORS and dtype == "fp32":
                continue
            if form == PRODUCTION:
                mine = plain + [r for r in sel if r["formulation"] == PRODUCTION and r["prologue"]]
            else:
                mine = plain + [r for r in sel if r["formulation"] == form]
            out.append(_tally(version, dtype, layout, form, [(r["graph"], r["status"] == "built") for r in mine]))
        # What the cudnn engine runs: per conv and graph, the fused prologue where it is built, else the explicit
        # pass (csrc/cuda/cudnn_engine.cpp); per conv and graph one outcome.
        explicit = {(r["graph"], conv): r["status"] == "built" for r in sel if r["formulation"] == EXPLICIT_PASS
                    for conv in r["convs"]}
        choice = [(r["graph"], r["status"] == "built") for r in plain for _ in r["convs"]]
        choice += [(r["graph"], r["status"] == "built" or explicit.get((r["graph"], conv), False))
                   for r in sel if r["formulation"] == PRODUCTION and r["prologue"] for conv in r["convs"]]
        out.append(_tally(version, dtype, layout, ENGINE_CHOICE, choice))
    return out


def _tally(version: str, dtype: str, layout: str, form: str, outcomes: list[tuple[str, bool]]) -> dict:
    by_graph: dict[str, list[int]] = {}
    for graph, built in outcomes:
        stat = by_graph.setdefault(graph, [0, 0])
        stat[0] += built
        stat[1] += 1
    return {"cudnn": version, "dtype": dtype, "layout": layout, "formulation": form,
            "all_built": all(b == n for b, n in by_graph.values()),
            "graphs": {g: f"{b}/{n}" for g, (b, n) in sorted(by_graph.items())}}


def summary(rows: list[dict]) -> dict:
    groups: dict[str, dict] = {}
    for r in rows:
        key = f"{r['cudnn']} {r['mode']} {r['graph']} {r['dtype']} {r['layout']} {r['vec_dtype']} {r['formulation']}"
        g = groups.setdefault(key, {"built": 0, "cases": 0, "reasons": []})
        g["cases"] += 1
        g["built"] += r["status"] == "built"
        if r["status"] != "built":
            first = r["reason"].splitlines()[1:2] or r["reason"].splitlines()[:1]
            if first and first[0] not in g["reasons"]:
                g["reasons"].append(first[0])
    return {"groups": groups, "formulations": formulations(rows)}


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# cuDNN support report{' (quick)' if meta['quick'] else ''}", "",
             f"Deviceless plans (heuristics A + FALLBACK, support check, plan build) of resnet_fused's own "
             f"`csrc/cudnn/graphs.cpp` for an H100 profile (sm_90, 132 SMs, 227 KB opt-in shared memory, 50 MB L2), "
             f"batch {meta['batch']}, cudnn-frontend {meta['frontend']}; cuDNN {', '.join(meta['cudnn'])}. "
             f"Generated {meta['generated']} by `python -m benchmarks.cudnn_report"
             f"{' --quick' if meta['quick'] else ''}`. Plans built with a stand-in driver library: NVRTC compiled "
             f"each kernel, nothing was loaded on or run by a GPU.", "",
             "## Training formulations (every graph on every conv has an engine?)", "",
             "| cuDNN | dtype | layout | formulation | all built | genstats | wgrad | dgrad+dReLU |",
             "|---|---|---|---|---|---|---|---|"]
    for f in report["summary"]["formulations"]:
        g = f["graphs"]
        lines.append(f"| {f['cudnn']} | {f['dtype']} | {f['layout']} | {f['formulation']} | "
                     f"{'yes' if f['all_built'] else 'no'} | {g.get('conv_genstats', '-')} | {g.get('conv_wgrad', '-')} "
                     f"| {g.get('conv_dgrad_drelu', '-')} |")
    lines += ["", "## Per graph", "",
              "| cuDNN | mode | graph | dtype | layout | vectors | formulation | built | cuDNN's reason (first) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, g in report["summary"]["groups"].items():
        version, mode, graph, dtype, layout, vec, form = key.split(" ", 6)
        reason = (g["reasons"][0] if g["reasons"] else "").replace("|", "\\|")[:200]
        lines.append(f"| {version} | {mode} | {graph} | {dtype} | {layout} | {vec} | {form} | "
                     f"{g['built']}/{g['cases']} | {reason} |")
    lines += ["", "## Rows", "", "| cuDNN | graph | case | dtype | layout | vectors | formulation | status | engine "
              "| workspace | convs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['cudnn']} | {r['graph']} | {r['case']} | {r['dtype']} | {r['layout']} | {r['vec_dtype']} "
                     f"| {r['formulation']} | {r['status']}{' (' + r['step'] + ')' if r['step'] else ''} | "
                     f"{r['engine']} | {r['workspace']} | {', '.join(r['convs'])} |")
    return "\n".join(lines) + "\n"


def frontend_version(site: Path) -> str:
    text = (site / "include" / "cudnn_frontend_version.h").read_text()
    parts = [re.search(rf"#define CUDNN_FRONTEND_{k}_VERSION\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(p.group(1) for p in parts if p)


def render(report: dict, path: Path) -> None:
    """The summary of the report's rows into its JSON at `path`, and the Markdown next to it."""
    report["summary"] = summary(report["rows"])
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two ResNet-50 convs, bf16/fp16 NHWC (the CI gate)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {LOCAL.relative_to(REPO)})")
    parser.add_argument("--site", type=Path, action="append", default=None,
                        help="a site-packages with nvidia/cudnn and the cudnn-frontend headers (repeatable; default: "
                             "this interpreter's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per driver process")
    parser.add_argument("--jobs", type=int, default=2, help="cuDNN versions planned side by side")
    parser.add_argument("--rerender", type=Path, default=None, help="recompute the summary and Markdown of a report")
    args = parser.parse_args(argv)
    if args.rerender is not None:
        render(json.loads(args.rerender.read_text()), args.rerender)
        return 0

    out_dir = args.out or LOCAL
    build = LOCAL / "build"
    sites = args.site or [Path(sysconfig.get_paths()["purelib"])]
    cudnns = [Cudnn(Path(s)) for s in sites]
    for c in cudnns:
        why = c.check()
        if why:
            print(f"cudnn_report: {why}", file=sys.stderr)
            return 1
    cuda_inc = cuda_include()
    if cuda_inc is None:
        print("cudnn_report: no CUDA toolkit headers (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 1
    todo = cases(resnet_convs(args.batch), args.quick)
    print(f"cudnn_report: {len(todo)} cases x {len(cudnns)} cuDNN ({', '.join(c.version for c in cudnns)})")
    stub_dir = build_stub(build)

    def one(c: Cudnn) -> list[dict]:
        t0 = time.time()
        driver = build_driver(c, build, cuda_inc)
        t1 = time.time()
        nvrtc_dir = next((c.site / "nvidia").glob("cu*/lib/libnvrtc.so.*")).parent
        results = run_cases(driver, [stub_dir, nvrtc_dir], todo, args.timeout)
        print(f"cudnn_report: cuDNN {c.version}: {sum(r['ok'] for r in results)}/{len(results)} built "
              f"(driver {t1 - t0:.0f} s, plans {time.time() - t1:.0f} s)", flush=True)
        return [row(case, r, c.version) for case, r in zip(todo, results)]

    rows: list[dict] = []
    # One driver process per cuDNN, side by side (each plans its cases in order).
    with ThreadPoolExecutor(max_workers=max(1, min(args.jobs, len(cudnns)))) as pool:
        futures = [pool.submit(one, c) for c in cudnns]
        try:
            for f in futures:
                rows += f.result()
        except RuntimeError as e:
            print(f"cudnn_report: {e}", file=sys.stderr)
            return 1
    report = {
        "meta": {"quick": args.quick, "batch": args.batch, "cudnn": [c.version for c in cudnns],
                 "frontend": frontend_version(cudnns[0].site), "device": H100,
                 "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "summary": {},
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "cudnn-quick" if args.quick else "cudnn"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")  # the rows first, whatever follows
    render(report, out_dir / f"{stem}.json")
    for f in report["summary"]["formulations"]:
        print(f"  cuDNN {f['cudnn']} {f['dtype']} {f['layout']} {f['formulation']}: "
              f"{'all built' if f['all_built'] else 'NOT all built'} {f['graphs']}")
    print(f"cudnn_report: wrote {out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
