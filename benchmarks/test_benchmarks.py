"""pytest-benchmark view of the benchmark workloads and providers: `pytest benchmarks/test_benchmarks.py`.

The same workload definitions and step functions as `python -m benchmarks`. On a GPU: batch 256, bf16,
every workload. On a CPU: the smoke workloads (batch 2, 64x64 images) in fp32, and the GPU-only providers
(torch.compile, backends not available here) skip. Each test first checks the provider's output against
eager's on the same weights and inputs, so a fast wrong result fails instead of timing well.
"""

from __future__ import annotations

import gc

import pytest
import torch

from benchmarks import providers as P
from benchmarks import timing
from benchmarks.run import rel_err
from benchmarks.workloads import SMOKE, SMOKE_BATCH, SMOKE_IMAGE_SIZE, select, workloads

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
WORKLOADS = workloads() if GPU else select(workloads(SMOKE_BATCH, SMOKE_IMAGE_SIZE), list(SMOKE))
PROVIDERS = list(P.BASE_PROVIDERS) + [P.RF_PREFIX + b for b in P.RF_BACKENDS]
BACKENDS, _ = P.resnet_fused_backends()
ROUNDS = 20 if GPU else 5

# Relative L2 error allowed against eager: bf16 rounding compounds over a whole network's depth.
TOLERANCE = {(torch.bfloat16, False): 2e-2, (torch.bfloat16, True): 6e-2, (torch.float32, False): 1e-4,
             (torch.float32, True): 1e-4}


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
    if provider == P.COMPILE and not GPU:
        pytest.skip("torch.compile is benchmarked on a GPU only")
    if provider.startswith(P.RF_PREFIX) and provider[len(P.RF_PREFIX) :] not in BACKENDS:
        pytest.skip(f"resnet_fused backend {provider[len(P.RF_PREFIX):]!r} is not available here")

    base = workload.build()
    inputs = P.make_inputs(workload, mode, DTYPE, DEVICE)
    step = P.prepare(provider, workload, base, mode, DTYPE, inputs)
    out = step().detach()
    if provider != P.CONVS:
        expected = P.prepare(P.EAGER, workload, base, mode, DTYPE, inputs)().detach()
        assert rel_err(out, expected) < TOLERANCE[(DTYPE, workload.is_model)]
    del out

    def run():
        step()
        timing.synchronize(DEVICE)

    benchmark.extra_info.update(workload=workload.description, gflop=workload.flops(mode) / 1e9, mode=mode)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
