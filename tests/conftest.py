"""Test configuration: the Triton interpreter without a GPU, GPU marks, per-test time limits, build checks.

* ``TRITON_INTERPRET`` must be set before any Triton kernel is defined, so it is set here, before the test
  modules import resnet_fused (only on a machine without a GPU).
* ``gpu``: tests that need a CUDA GPU; they skip without one.
* ``cuda_device``: added here to every test of a module whose ``DEVICE`` is CUDA — the tests that run on the CPU
  in CI and switch to the GPU when there is one (blocks, models, training, autocast, compile on each backend).
  ``pytest -m "gpu or cuda_device"`` selects everything that runs on a GPU (``benchmarks/gpu_check.sh``).
* ``RESNET_FUSED_TEST_TIMEOUT=<seconds>`` (or ``--per-test-timeout``): each test's setup, call and teardown get
  that long; then SIGALRM fails the test with its traceback. A test stuck in C code (a hung kernel) cannot be
  interrupted that way: 30 s later faulthandler dumps every thread's stack and ends the process, so a step with
  a time limit still gets a log saying where it hung.
* ``interpreter_rounds_bf16_to_nearest``: a fixture for tests whose bf16 reference needs the GPU's rounding.
* ``RESNET_FUSED_REQUIRE_EXTENSION=1`` (set by ``gpu_check.sh`` on a GPU machine): a missing or CPU-only build of
  ``resnet_fused._C``, or a build without the CUTLASS kernels or the cuDNN frontend engine, fails the session
  (reported at the end; the tests still run) — instead of turning hundreds of tests into skips that exit 0.
  ``RESNET_FUSED_ALLOW_NO_CUTLASS=1`` / ``RESNET_FUSED_ALLOW_NO_CUDNN_FRONTEND=1`` accept a build without them.
"""

import faulthandler
import os
import signal
import sys
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# auto's measured choices (resnet_fused.dispatch) go to a folder of this session, not the user's cache.
os.environ.setdefault("RESNET_FUSED_CACHE_DIR", tempfile.mkdtemp(prefix="resnet_fused_cache_"))

HARD_LIMIT_GRACE_S = 30.0


def _is_cuda(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


def pytest_addoption(parser):
    parser.addoption("--per-test-timeout", type=float, default=None,
                     help="seconds per test (setup + call + teardown); default: $RESNET_FUSED_TEST_TIMEOUT or none")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_device: runs on the GPU when there is one (module DEVICE is cuda); "
                                       "added by tests/conftest.py")
    config._build_problems = build_problems() if os.environ.get("RESNET_FUSED_REQUIRE_EXTENSION") == "1" else []


def pytest_collection_modifyitems(config, items):
    """``cuda_device`` on the tests of modules whose DEVICE is CUDA; ``gpu`` tests skip without a GPU."""
    for item in items:
        if _is_cuda(getattr(item.module, "DEVICE", None)):
            item.add_marker(pytest.mark.cuda_device)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------------- time limits


class TestTimeout(Exception):
    """A test ran past its per-test time limit."""


def _limit(config) -> float | None:
    value = config.getoption("--per-test-timeout")
    if value is None and os.environ.get("RESNET_FUSED_TEST_TIMEOUT"):
        value = float(os.environ["RESNET_FUSED_TEST_TIMEOUT"])
    return value if value and value > 0 else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    limit = _limit(item.config)
    if limit is None or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TestTimeout(f"{item.nodeid} ran past its {limit:g} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    faulthandler.dump_traceback_later(limit + HARD_LIMIT_GRACE_S, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------ required build (GPU)


def build_problems() -> list[str]:
    """What is missing from this machine's build of ``resnet_fused._C`` for a GPU test run (empty: nothing)."""
    from resnet_fused.backends import cuda

    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible to torch")
    info = cuda.build_info()
    if info is None:
        return problems + [f"the extension is not importable: {cuda.unsupported(torch.empty(0))}"]
    if not info.get("with_cuda"):
        problems.append(f"the extension was built without CUDA: {info}")
    if info.get("cutlass") is None and os.environ.get("RESNET_FUSED_ALLOW_NO_CUTLASS") != "1":
        problems.append("the extension was built without the CUTLASS kernels (carry the nvidia-cutlass wheel in "
                        ".whl/, or set RESNET_FUSED_ALLOW_NO_CUTLASS=1 to accept that)")
    # A build that predates the cuDNN engine has no such key; one that has the engine reports None without it.
    if "cudnn_frontend" in info and info["cudnn_frontend"] is None \
            and os.environ.get("RESNET_FUSED_ALLOW_NO_CUDNN_FRONTEND") != "1":
        problems.append("the extension was built without the cuDNN frontend engine (carry the "
                        "nvidia-cudnn-frontend wheel in .whl/, or set RESNET_FUSED_ALLOW_NO_CUDNN_FRONTEND=1)")
    return problems


def pytest_report_header(config):
    if os.environ.get("RESNET_FUSED_REQUIRE_EXTENSION") == "1":
        return [f"required build: {'; '.join(config._build_problems) or 'ok'}"]
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for problem in config._build_problems:
        terminalreporter.write_line(f"BUILD CHECK FAILED: {problem}", red=True, bold=True)


def pytest_sessionfinish(session, exitstatus):
    if session.config._build_problems and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def interpreter_rounds_bf16_to_nearest(monkeypatch):
    """Under TRITON_INTERPRET=1, make fp32 -> bf16 casts round to nearest even as GPUs do.

    The interpreter truncates those casts (triton 3.6 and 3.8, whatever ``fp_downcast_rounding`` says), which
    biases every bf16 value a kernel stores or feeds its MMA (the BN+ReLU prologue's activated tile) and puts the
    Triton backend's bf16 results twice as far from float64 as PyTorch's on CPU. With rounding to nearest, the
    Triton and reference backends agree bit for bit under autocast, and the bf16 prologue's statistics match
    those of the float64 convolution of the rounded activations.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    import numpy as np
    import triton.language as tl

    truncating = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return truncating(data, src, dst, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)
