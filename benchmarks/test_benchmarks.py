"""pytest-benchmark view of the benchmark workloads and providers: `pytest benchmarks/test_benchmarks.py`.

The same workload definitions and step functions as `python -m benchmarks`. On a GPU: batch 256, bf16,
every workload. On a CPU: the smoke workloads (batch 2, 64x64 images) in fp32, and the GPU-only providers
(torch.compile, backends not available here) skip. Each test first checks the provider's output (and in
training every gradient) against eager torchvision in fp32 (fp64 for an fp32 run): its relative error may be at
most twice eager's own plus a small slack, so a fast wrong result fails instead of timing well.
"""

from __future__ import annotations

import gc

import pytest
import torch

from benchmarks import providers as P
from benchmarks import timing
from benchmarks.run import errors
from benchmarks.workloads import SMOKE, SMOKE_BATCH, SMOKE_IMAGE_SIZE, select, workloads

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
WORKLOADS = workloads() if GPU else select(workloads(SMOKE_BATCH, SMOKE_IMAGE_SIZE), list(SMOKE))
PROVIDERS = list(P.BASE_PROVIDERS) + list(P.RF_PROVIDERS)
BACKENDS, _ = P.resnet_fused_backends()
ROUNDS = 20 if GPU else 5

# Relative L2 error allowed beyond twice eager's own (output, worst gradient).
SLACK = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    gc.collect()
    P.release()


@pytest.mark.parametrize("mode", P.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_step(benchmark, workload, provider, mode):
    reason = P.unsupported(provider, mode)
    if reason:
        pytest.skip(reason)
    if provider in P.COMPILE_MODES and not GPU:
        pytest.skip("torch.compile is benchmarked on a GPU only")
    if provider.startswith(P.RF_PREFIX) and P.backend_of(provider)[0] not in BACKENDS + ["auto"]:
        pytest.skip(f"resnet_fused backend {P.backend_of(provider)[0]!r} is not available here")

    base = workload.build()
    inputs = P.make_inputs(workload, mode, DTYPE, DEVICE)
    step = P.prepare(provider, workload, base, mode, DTYPE, inputs)
    step()
    step.warm = True
    if provider != P.CONVS:
        reference = P.reference_result(workload, base, mode, DTYPE, inputs)
        got = errors(step.check(), reference)
        eager = errors(P.prepare(P.EAGER, workload, base, mode, DTYPE, inputs).check(), reference)
        for key in ("err", "grad_err"):
            if key in eager:
                assert got[key] <= 2 * eager[key] + SLACK[DTYPE], (key, got, eager)
        del reference

    def run():
        step()
        timing.synchronize(DEVICE)

    benchmark.extra_info.update(workload=workload.description, gflop=workload.flops(mode) / 1e9, mode=mode)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
