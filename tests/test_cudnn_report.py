"""The cuDNN support report's quick set (``python -m benchmarks.cudnn_report --quick``), run on the CPU.

It builds the project's own csrc/cudnn/graphs.cpp into the report's driver against this interpreter's cuDNN and
cudnn-frontend headers, and has cuDNN plan two ResNet-50 convolutions' graphs (eval, and training in every
formulation) in bf16 and fp16 channels_last for an H100 without a GPU (heuristics, support check, plan build, with
the report's stand-in driver library). The gate: every graph the cudnn engine runs has an engine — the eval graph,
and for training the formulation the engine picks (the fused prologue where cuDNN has an engine for it, else the
explicit BN+ReLU pass) — except the forward statistics graph in bf16, which cuDNN 9.19 / 9.24 have no engine for on
Hopper (the engine then declines conv_stats before doing any work); every refusal carries cuDNN's reason.
Skipped where the frontend headers, cuDNN, NVRTC, a C/C++ compiler or the CUDA headers are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import cudnn_report  # noqa: E402


def test_condense_keeps_cudnns_reasons_once():
    msg = ("heuristics: No valid engine configs for ____\n{\"engineId\":-1}\n"
           "Warning: CUDNN_STATUS_NOT_SUPPORTED; Reason: The specified engine with global index -1 is not found for "
           "SCALE_BIAS_ADD_RELU_WGRAD(13) at: CUDNN_INVALID_PLACE_HOLDER_ENGINE == name\n"
           "Warning: CUDNN_STATUS_NOT_SUPPORTED; Reason: finalize_internal()\n"
           "Warning: CUDNN_STATUS_NOT_SUPPORTED; Reason: The specified engine with global index -1 is not found for "
           "SCALE_BIAS_ADD_RELU_WGRAD(13) at: CUDNN_INVALID_PLACE_HOLDER_ENGINE == name\n")
    assert cudnn_report.condense(msg).splitlines() == [
        "heuristics: No valid engine configs for ____",
        "CUDNN_STATUS_NOT_SUPPORTED: The specified engine with global index -1 is not found for "
        "SCALE_BIAS_ADD_RELU_WGRAD(13)"]


def _engine_formulation_built(rows, graph, dtype):
    """Per conv, whether the graph the engine would run has an engine: its fused prologue form, else the explicit
    pass form (convs without a prologue: their one graph)."""
    out = {}
    for conv in cudnn_report.QUICK_CONVS:
        mine = [r for r in rows if r["graph"] == graph and r["dtype"] == dtype and conv in r["convs"]
                and r["mode"] == "train"]
        production = [r for r in mine if r["formulation"] == cudnn_report.PRODUCTION]
        explicit = [r for r in mine if r["formulation"] == cudnn_report.EXPLICIT_PASS]
        out[conv] = any(r["status"] == "built" for r in production) or any(r["status"] == "built" for r in explicit)
    return out


def test_quick_report(tmp_path):
    cudnn = cudnn_report.Cudnn(Path(cudnn_report.sysconfig.get_paths()["purelib"]))
    why = cudnn.check()
    if why:
        pytest.skip(why)
    if cudnn_report.cuda_include() is None:
        pytest.skip("no CUDA toolkit headers")
    run = subprocess.run([sys.executable, "-m", "benchmarks.cudnn_report", "--quick", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "cudnn-quick.json").read_text())
    rows = report["rows"]
    cases = cudnn_report.cases(cudnn_report.resnet_convs(32), quick=True)
    assert len(rows) == len(cases) and {r["cudnn"] for r in rows} == {cudnn.version}
    assert (tmp_path / "cudnn-quick.md").read_text().startswith("# cuDNN support report (quick)")
    for r in rows:
        assert r["status"] in ("built", "no engine")
        if r["status"] == "built":
            assert r["engine"], r
        else:
            assert r["step"] and r["reason"], r
    assert all(r["status"] == "built" for r in rows if r["mode"] == "eval"), "an eval graph has no engine"
    for dtype in ("bf16", "fp16"):
        for graph in ("conv_wgrad", "conv_dgrad_drelu"):
            assert all(_engine_formulation_built(rows, graph, dtype).values()), (graph, dtype)
    assert all(_engine_formulation_built(rows, "conv_genstats", "fp16").values())
