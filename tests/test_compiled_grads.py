"""Compiled fused blocks against torchvision: output, input gradient, every parameter gradient, running statistics.

``torch.compile(fullgraph=True)`` traces each backend's ``autograd.Function``s and custom ops. torch 2.11's dynamo
returns wrong gradients (O(1) and more, input and every parameter) for a forward whose output was last written
in place or is the same tensor as another value of the forward (a no-op ``.to(dtype)``), so these tests compile
a plain BasicBlock, a BasicBlock with a strided downsample and a Bottleneck with a downsample, in eval and in
training, under ``aot_eager`` (every backend that runs on this machine's CPU) and ``inductor`` (the reference
backend), and hold every result to the project's rule (tolerances.py) against torchvision in float64: the
reference backend and the extension's CPU kernels run float64 themselves (so agree to ~1e-9 relative), the
Triton interpreter float32 (its widest dtype).
"""

import pytest
import torch
import torchvision.models.resnet as tv
from torch import nn

from resnet_fused import backends
from torchvision_oracle import check_against_torchvision, fused_copy, randomize_bn, why_backend_cannot_run

# The three blocks in a row, so that one compiled graph holds every fused epilogue of both block types (a
# compile costs seconds): a plain BasicBlock (identity residual), a BasicBlock with a strided downsample, a
# Bottleneck with a 1x1 downsample (its own BN in the tail). (kind, inplanes, planes, stride, downsample)
BLOCKS = [("BasicBlock", 8, 8, 1, False), ("BasicBlock", 8, 16, 2, True), ("Bottleneck", 16, 8, 1, True)]
# backend: the precision it runs in (the widest it supports)
PRECISION = {"reference": "fp64", "cuda": "fp64", "triton": "fp32"}


def _blocks() -> nn.Sequential:
    torch.manual_seed(0)
    blocks = []
    for kind, inplanes, planes, stride, downsample in BLOCKS:
        cls = getattr(tv, kind)
        out = planes * cls.expansion
        ds = nn.Sequential(tv.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out)) if downsample else None
        blocks.append(cls(inplanes, planes, stride, ds))
    model = nn.Sequential(*blocks)
    randomize_bn(model)
    return model


def _input() -> torch.Tensor:
    return torch.randn(2, BLOCKS[0][1], 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _use(backend: str, monkeypatch) -> None:
    """Skip unless ``backend`` runs on this machine's CPU; the cuda backend is routed to the extension's CPU
    kernels (it refuses CPU tensors otherwise). Loads the backend first: its import cannot be traced."""
    mod = backends.load(backend)
    if backend == "cuda" and not isinstance(mod, str) and mod.is_built():
        monkeypatch.setattr(mod, "unsupported", lambda x, groups=1, dilation=1: None)
    reason = why_backend_cannot_run(backend, "cpu", torch.float32)
    if reason is not None:
        pytest.skip(reason)


def _check_compiled(backend: str, compiler: str, mode: str) -> None:
    model = _blocks().train(mode == "train")
    fused = fused_copy(model, backend)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fused, fullgraph=True, backend=compiler)
        check_against_torchvision(model, compiled, _input(), PRECISION[backend], "cpu")
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", ["reference", "cuda", pytest.param("triton", marks=pytest.mark.slow)])
def test_aot_eager_block_grads(backend, mode, monkeypatch):
    """aot_eager (AOTAutograd's joint graph, run eagerly): every backend that runs on the CPU."""
    _use(backend, monkeypatch)
    _check_compiled(backend, "aot_eager", mode)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_inductor_block_grads(mode, monkeypatch):
    """inductor (C++ kernels for the reference backend's PyTorch ops, float64)."""
    _use("reference", monkeypatch)
    _check_compiled("reference", "inductor", mode)


_FRESH = """
import torch, torchvision
import resnet_fused
block = resnet_fused.fuse(torchvision.models.resnet.BasicBlock(8, 8), backend="triton").eval()
out = torch.compile(block, backend="aot_eager", fullgraph=True)(torch.randn(2, 8, 6, 6))
print("compiled first call:", tuple(out.shape))
"""


@pytest.mark.slow
def test_compile_is_the_first_call_in_a_fresh_process():
    """A block's backend is imported when the block is set to it, not on its first call: dynamo cannot trace an
    import, so ``torch.compile(fullgraph=True)`` of a block never called eagerly failed in a new process."""
    import os
    import subprocess
    import sys

    if why_backend_cannot_run("triton", "cpu", torch.float32) is not None:
        pytest.skip("the Triton interpreter does not run here")
    env = dict(os.environ, TRITON_INTERPRET="1", RESNET_FUSED_AUTOTUNE="0")
    done = subprocess.run([sys.executable, "-c", _FRESH], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled first call: (2, 8, 6, 6)" in done.stdout
