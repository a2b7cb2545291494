"""Benchmark providers: the ways one workload is run, all on the same weights and inputs.

- "eager": the torchvision module as is.
- "compile": torch.compile of it (eval: inductor freezing under torch.no_grad; train: default mode).
- "convs": eval only, the module's F.conv2d calls alone with its weights (cuDNN on a GPU) — the floor a
  fused block competes with, since every block must at least run its convolutions.
- "rf-<backend>": a copy converted by resnet_fused.fuse(copy, backend=<backend>), one per available backend.

A step is one timed iteration. Eval: forward under torch.no_grad, module and input in the benchmark dtype.
Train: fp32 parameters, autocast to bf16/fp16 (plain fp32 for fp32), grads reset with set_to_none; a
block's step is forward + backward of a fixed dense random output gradient (the backward of sum(out * g),
as a block inside a network receives it, rather than the stride-0 gradient of a plain sum); a whole
model's step is an SGD step on a cross-entropy loss.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .workloads import Workload

EAGER = "eager"
COMPILE = "compile"
CONVS = "convs"
RF_PREFIX = "rf-"
BASE_PROVIDERS = (EAGER, COMPILE, CONVS)
RF_BACKENDS = ("reference", "triton", "cuda")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("eval", "train")


def resnet_fused_backends() -> tuple[list[str], str | None]:
    """resnet_fused's backends usable here, and why the package could not be imported (None if it could)."""
    try:
        import resnet_fused
    except Exception as error:  # a broken or missing package must not stop the eager/compile rows
        return [], f"{type(error).__name__}: {error}"
    return list(resnet_fused.available_backends()), None


def default_providers(device: torch.device, backends: list[str]) -> list[str]:
    """Every provider that runs on `device`: on a CPU, torch.compile is left out (ask for it by name)."""
    base = [EAGER, COMPILE, CONVS] if device.type == "cuda" else [EAGER, CONVS]
    return base + [RF_PREFIX + b for b in backends]


def normalize(name: str) -> str:
    """Provider name from user input: "triton" and "rf-triton" both mean the resnet_fused triton backend."""
    if name in BASE_PROVIDERS:
        return name
    backend = name[len(RF_PREFIX) :] if name.startswith(RF_PREFIX) else name
    if backend in RF_BACKENDS:
        return RF_PREFIX + backend
    known = ", ".join(BASE_PROVIDERS + RF_BACKENDS)
    raise ValueError(f"unknown provider {name!r}: choose from {known} (backends also as rf-<name>)")


def unsupported(provider: str, mode: str) -> str | None:
    """Why `provider` has no row in `mode` (None when it has one)."""
    if provider == CONVS and mode != "eval":
        return "the convolutions-alone floor is measured for eval only"
    return None


@dataclass
class Inputs:
    """The tensors every provider of one (workload, mode, dtype) group runs on."""

    x: torch.Tensor  # channels_last input; requires grad for a train block
    grad_out: torch.Tensor | None  # train block: dense random gradient of the output
    labels: torch.Tensor | None  # train model: class labels


def make_inputs(workload: Workload, mode: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs (never zeros). A block's input is post-ReLU, as inside the network."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(workload.input_shape, generator=generator, device=device, dtype=dtype)
    if not workload.is_model:
        x = x.relu()
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = labels = None
    if mode == "train":
        if workload.is_model:
            labels = torch.randint(0, 1000, (workload.batch,), generator=generator, device=device)
        else:
            x.requires_grad_(True)
            grad_out = torch.randn(workload.output_shape, generator=generator, device=device, dtype=dtype)
            grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    return Inputs(x, grad_out, labels)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _convs_step(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The module's convolutions alone: each F.conv2d on a random input of the shape it sees in the forward."""
    seen: list[tuple[nn.Conv2d, torch.Size]] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].shape)))
        for m in module.modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        module(x)
    for handle in handles:
        handle.remove()
    by_shape: dict[torch.Size, torch.Tensor] = {}
    for _, shape in seen:
        if shape not in by_shape:
            a = torch.randn(shape, device=x.device, dtype=x.dtype).relu()
            by_shape[shape] = a.contiguous(memory_format=torch.channels_last)
    calls = [(by_shape[shape], m.weight, m.stride, m.padding, m.dilation, m.groups) for m, shape in seen]

    def step() -> torch.Tensor:
        with torch.no_grad():
            for a, weight, stride, padding, dilation, groups in calls:
                out = F.conv2d(a, weight, None, stride, padding, dilation, groups)
        return out

    return step


def prepare(
    provider: str,
    workload: Workload,
    base: nn.Module,
    mode: str,
    dtype: torch.dtype,
    inputs: Inputs,
) -> Callable[[], torch.Tensor]:
    """A step running `provider` on its own copy of `base` (the fp32 CPU torchvision module)."""
    device = inputs.x.device
    module = copy.deepcopy(base).to(device=device, memory_format=torch.channels_last)
    if mode == "eval":
        module = module.to(dtype).eval()
    else:
        module.train()
    if provider == CONVS:
        return _convs_step(module, inputs.x)
    if provider == COMPILE:
        torch._dynamo.reset()  # fresh caches: one compile per module, no recompile limit, no dynamic shapes
        options = {"freezing": True} if mode == "eval" else None
        module = torch.compile(module, dynamic=False, options=options)
    elif provider.startswith(RF_PREFIX):
        import resnet_fused

        module = resnet_fused.fuse(module, backend=provider[len(RF_PREFIX) :])
    elif provider != EAGER:
        raise ValueError(f"unknown provider {provider!r}")

    x = inputs.x
    amp = _autocast(device, dtype)
    if mode == "eval":

        def step() -> torch.Tensor:
            with torch.no_grad():
                return module(x)

        return step

    if workload.is_model:
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

        def step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with amp:
                logits = module(x)
            F.cross_entropy(logits.float(), inputs.labels).backward()
            optimizer.step()
            return logits

        return step

    def step() -> torch.Tensor:
        module.zero_grad(set_to_none=True)
        x.grad = None
        with amp:
            out = module(x)
        out.backward(inputs.grad_out.to(out.dtype))  # a no-op unless autocast left the output in fp32
        return out

    return step


def release() -> None:
    """Drop compiled graphs (freezing holds weight copies) and cached device memory between providers."""
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
