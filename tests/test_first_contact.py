"""benchmarks/first_contact.py: one line per (op, engine, dtype) whatever happens — ran with its error against the
fp64 oracle under the tests' tolerance rule, declined with the engine's reason, failed with the error — on a machine
without a GPU too (the reference backend runs, every GPU path says there is no GPU), and when its time budget
stops it."""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import first_contact as fc
from resnet_fused.backends import reference

ROOT = Path(__file__).resolve().parent.parent
TINY = fc.Shapes(batch=1, tiny=True)
OPS = {op.name: op for op in fc.OPS}


def _run(tmp_path, *args) -> tuple[subprocess.CompletedProcess, list[str]]:
    out = tmp_path / "first_contact.txt"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.first_contact", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc, out.read_text().splitlines()


def _rows(lines: list[str]) -> dict[tuple[str, str, str], tuple[str, str]]:
    """{(op, engine, dtype): (status, detail)}; every line is a comment or a row, and no row comes twice."""
    rows = {}
    for line in lines:
        if line.startswith("#"):
            continue
        m = fc.LINE.match(line)
        assert m, f"not a first-contact line: {line!r}"
        key = (m["op"], m["engine"], m["dtype"])
        assert key not in rows, f"two lines for {key}"
        rows[key] = (m["status"], m["detail"])
    return rows


def test_every_op_engine_and_dtype_has_a_row():
    rows = fc.expected_rows()
    assert len(rows) == len(set(rows))
    for op in fc.OPS:
        engines = {e for o, e, _ in rows if o == op.name}
        cuda = {f"cuda-{e}" for e in fc.CUDA_ENGINES} if op.engines else {"cuda"}
        assert engines == {"triton", "reference"} | cuda, (op.name, engines)
    assert {d for *_, d in rows} == {"bf16", "fp16", "fp32"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the run without a GPU")
def test_run_without_gpu_answers_every_row(tmp_path):
    proc, lines = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines() == lines  # the same lines on stdout, as they come
    rows = _rows(lines)
    assert set(rows) == set(fc.expected_rows())
    for (op, engine, dtype), (status, detail) in rows.items():
        if engine == "reference":
            assert status == "ran" and detail.startswith("within err="), (op, dtype, detail)
        else:
            assert (status, detail) == ("declined", fc.NO_GPU), (op, engine, dtype)
    assert lines[0].startswith("# first contact: no CUDA GPU")
    assert lines[-1].startswith("# first contact done") and "33 ran, 108 declined, 0 failed" in lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the run without a GPU")
def test_a_run_cut_short_still_answers_every_row(tmp_path):
    """Worker processes stopped by the budget before they wrote anything: every row still gets its line."""
    proc, lines = _run(tmp_path, "--processes", "--budget", "0.5")
    rows = _rows(lines)
    assert set(rows) == set(fc.expected_rows())
    reference_rows = {k: v for k, v in rows.items() if k[1] == "reference"}
    assert all(status in ("skipped", "failed") and "0.5 s budget ran out" in detail
               for status, detail in reference_rows.values()), reference_rows
    assert proc.returncode == (1 if any(s == "failed" for s, _ in reference_rows.values()) else 0)


class _Engine(types.SimpleNamespace):
    """A stand-in backend: the reference backend's ops, one of them replaced."""

    NAME = "stand-in"

    def unsupported(self, x, groups=1, dilation=1):
        return None


def _engine(**ops) -> _Engine:
    names = ("conv_bn_act", "conv_stats", "bn_relu", "scale_bias_add_relu")
    return _Engine(**{**{n: getattr(reference, n) for n in names}, **ops})


def _row(monkeypatch, op: str, engine: _Engine, dtype: str = "fp32") -> tuple[str, str]:
    monkeypatch.setattr(fc, "_backend", lambda name, probe: (engine, None))
    return fc.run_row(OPS[op], "triton", dtype, TINY, torch.device("cpu"))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_correct_engine_is_within_tolerance(monkeypatch, dtype):
    for op in ("conv_bn_act+shortcut", "scale_bias_add_relu"):
        status, detail = _row(monkeypatch, op, _engine(), dtype)
        assert status == "ran" and detail.startswith("within"), (op, detail)


def test_a_wrong_output_or_gradient_is_beyond_tolerance(monkeypatch):
    doubled = _engine(conv_bn_act=lambda *a, **k: 2 * reference.conv_bn_act(*a, **k))
    status, detail = _row(monkeypatch, "conv_bn_act", doubled)
    assert status == "ran" and detail.startswith("BEYOND") and "worst=output" in detail, detail

    class WrongGrad(torch.autograd.Function):  # the right output, a gradient of x that is half the right one
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 0.5

    wrong = _engine(bn_relu=lambda x, s, t: reference.bn_relu(WrongGrad.apply(x), s, t))
    status, detail = _row(monkeypatch, "bn_relu", wrong)
    assert status == "ran" and detail.startswith("BEYOND") and "beyond=grad:x" in detail, detail


def test_failures_and_refusals_are_told_apart(monkeypatch):
    def fails(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore text")

    def declines(*a, **k):
        raise RuntimeError("conv_bn_act: engine 'cutlass' cannot run this call: float32 is not supported")

    assert _row(monkeypatch, "conv_bn_act", _engine(conv_bn_act=fails)) == (
        "failed", "RuntimeError: CUDA error: an illegal memory access was encountered")
    assert _row(monkeypatch, "conv_bn_act", _engine(conv_bn_act=declines)) == (
        "declined", "conv_bn_act: engine 'cutlass' cannot run this call: float32 is not supported")


def test_an_unusable_backend_is_declined_with_its_reason():
    status, detail = fc.run_row(OPS["conv_bn_act"], "cuda-cutlass", "bf16", TINY, torch.device("cpu"))
    assert status == "declined" and detail, detail
    line = fc.format_line("conv_bn_act", "cuda-cutlass", "bf16", status, detail + "\nsecond line")
    m = fc.LINE.match(line)
    assert m and m["status"] == "declined" and "\n" not in line
