"""Benchmark providers: the ways one workload is run, all on the same weights and inputs.

- "eager": the torchvision module as is.
- "compile": torch.compile of it, default mode (eval: with inductor freezing, under torch.no_grad).
- "compile-max": torch.compile with mode "max-autotune-no-cudagraphs" (eval: with freezing) — inductor's
  autotuned GEMM/conv templates, the strongest compiled baseline without CUDA graphs.
- "cudnn-convs": eval only — the module's convolutions alone (``F.conv2d``, cuDNN on a GPU) with its weights, on
  inputs of the shapes they see, and no epilogue: no BatchNorm, ReLU or residual pass. A reference point, not a
  floor: a fused kernel may beat it (its own tiles can beat cuDNN's pick, and the Triton tail computes the 1x1
  shortcut in the same launch as the last convolution), so a ratio below 1.0 is legitimate.
- "rf-<backend>": a copy converted by ``resnet_fused.fuse(copy, backend=<backend>)``: ``rf-auto`` (what a user
  gets by default), ``rf-reference``, ``rf-triton``, ``rf-cuda``. ``rf-auto`` measures each block on its first
  (warm-up) call, as a user's first call does, and its row carries the per-block choice table
  (:func:`auto_blocks`: the candidate that runs each block, its margin over eager, every candidate's time and
  error); it runs on every device, so each workload has an ``rf-auto`` vs ``eager`` row on CPUs too.
- "rf-cuda-<engine>": ``rf-cuda`` with one engine forced for every call (``cudnn``, ``cutlass``, ``plain``),
  through ``resnet_fused.backends.cuda.forced_engine`` where the build has it.

A step is one timed iteration. Eval: forward under torch.no_grad, module and input in the benchmark dtype.
Train: fp32 parameters, autocast to bf16/fp16 (plain fp32 for fp32), grads reset with set_to_none; a
block's step is forward + backward of a fixed dense random output gradient (the backward of sum(out * g),
as a block inside a network receives it, rather than the stride-0 gradient of a plain sum); a whole
model's step is an SGD step on a cross-entropy loss.

``Step.check()`` runs one more step for the error columns, after timing: the module's initial weights and
buffers restored (a model's timed SGD steps changed them), no optimizer step; it returns the output and, in
training, every gradient (input and parameters). :func:`reference_result` computes the same in fp32 (fp64 for
an fp32 benchmark) with eager torchvision, TF32 off.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .workloads import Workload

EAGER = "eager"
COMPILE = "compile"
COMPILE_MAX = "compile-max"
CONVS = "cudnn-convs"
CONVS_LABEL = "cuDNN convs, no epilogue"
RF_PREFIX = "rf-"
BASE_PROVIDERS = (EAGER, COMPILE, COMPILE_MAX, CONVS)
RF_BACKENDS = ("auto", "reference", "triton", "cuda")
CUDA_ENGINES = ("cudnn", "cutlass", "plain")
RF_PROVIDERS = tuple(RF_PREFIX + b for b in RF_BACKENDS) + tuple(f"{RF_PREFIX}cuda-{e}" for e in CUDA_ENGINES)
COMPILE_MODES = {COMPILE: "default", COMPILE_MAX: "max-autotune-no-cudagraphs"}
ALIASES = {"convs": CONVS, "floor": CONVS}

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
    base = list(BASE_PROVIDERS) if device.type == "cuda" else [EAGER, CONVS]
    rf = [RF_PREFIX + "auto"] if backends else []
    rf += [RF_PREFIX + b for b in backends]
    if "cuda" in backends:
        rf += [f"{RF_PREFIX}cuda-{e}" for e in CUDA_ENGINES]
    return base + rf


def normalize(name: str) -> str:
    """Provider name from user input: "triton" and "rf-triton" both mean the resnet_fused triton backend."""
    name = ALIASES.get(name, name)
    if name in BASE_PROVIDERS or name in RF_PROVIDERS:
        return name
    if RF_PREFIX + name in RF_PROVIDERS:
        return RF_PREFIX + name
    known = ", ".join(BASE_PROVIDERS + RF_PROVIDERS)
    raise ValueError(f"unknown provider {name!r}: choose from {known} (backends also without the rf- prefix)")


def backend_of(provider: str) -> tuple[str, str | None]:
    """(resnet_fused backend, forced cuda engine or None) of an ``rf-`` provider."""
    rest = provider[len(RF_PREFIX):]
    if rest.startswith("cuda-"):
        return "cuda", rest[len("cuda-"):]
    return rest, None


def unsupported(provider: str, mode: str) -> str | None:
    """Why `provider` has no row in `mode` (None when it has one)."""
    if provider == CONVS and mode != "eval":
        return f"{CONVS_LABEL}: measured for eval only"
    if provider.startswith(RF_PREFIX) and backend_of(provider)[1] is not None:
        return _forced_engine_missing()
    return None


def _forced_engine_missing() -> str | None:
    try:
        from resnet_fused.backends import cuda
    except Exception as error:
        return f"resnet_fused.backends.cuda does not import: {error}"
    if getattr(cuda, "forced_engine", None) is None:
        return "this build of resnet_fused.backends.cuda has no forced_engine(): no per-engine rows"
    return None


class Inputs:
    """The tensors every provider of one (workload, mode, dtype) group runs on."""

    def __init__(self, x: torch.Tensor, grad_out: torch.Tensor | None, labels: torch.Tensor | None) -> None:
        self.x = x  # channels_last input; requires grad for a train block
        self.grad_out = grad_out  # train block: dense random gradient of the output
        self.labels = labels  # train model: class labels


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
            labels = torch.randint(0, workload.output_shape[1], (workload.batch,), generator=generator, device=device)
        else:
            x.requires_grad_(True)
            grad_out = torch.randn(workload.output_shape, generator=generator, device=device, dtype=dtype)
            grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    return Inputs(x, grad_out, labels)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype in (torch.float32, torch.float64):
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


def _compile(module: nn.Module, provider: str, mode: str) -> nn.Module:
    options = dict(torch._inductor.list_mode_options(COMPILE_MODES[provider])) if provider == COMPILE_MAX else {}
    if mode == "eval":
        options["freezing"] = True
    return torch.compile(module, dynamic=False, options=options or None)


def no_recompiles():
    """A context in which a compiled module that would recompile raises instead (after its warm-up)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is not None:
        return set_stance("fail_on_recompile")
    return torch._dynamo.config.patch(error_on_recompile=True)


class Step:
    """One provider's prepared module: ``step()`` runs one timed iteration and returns the output;
    ``check()`` is the error measurement described in the module docstring."""

    def __init__(self, provider: str, workload: Workload, module: nn.Module, mode: str, dtype: torch.dtype,
                 inputs: Inputs, run: Callable[[], torch.Tensor], context=None) -> None:
        self.provider, self.workload, self.module, self.mode, self.dtype = provider, workload, module, mode, dtype
        self.inputs = inputs
        self._run = run
        self._context = context or contextlib.nullcontext
        inner = getattr(module, "_orig_mod", module)
        self._initial = {k: v.detach().clone() for k, v in inner.state_dict().items()} if mode == "train" else None
        self.warm = False  # set after the warm-up calls: a compiled module must not recompile from then on

    def _guard(self):
        if self.warm and self.provider in COMPILE_MODES:
            return no_recompiles()
        return contextlib.nullcontext()

    def __call__(self) -> torch.Tensor:
        with self._context(), self._guard():
            return self._run()

    def release_grads(self) -> None:
        """Free the gradients the last call left (a step allocates its own)."""
        getattr(self.module, "_orig_mod", self.module).zero_grad(set_to_none=True)
        self.inputs.x.grad = None

    def check(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(output, gradients by name) of one step on the initial weights, without an optimizer step."""
        if self.provider == CONVS:
            raise ValueError(f"{CONVS_LABEL} has no output to check")
        inner = getattr(self.module, "_orig_mod", self.module)
        if self._initial is not None:
            with torch.no_grad():
                inner.load_state_dict(self._initial)
        with self._context(), self._guard():
            return _forward_backward(self.module, inner, self.workload, self.mode, self.dtype, self.inputs)


def _forward_backward(module: nn.Module, inner: nn.Module, workload: Workload, mode: str, dtype: torch.dtype,
                      inputs: Inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients (input and every parameter, train only) of one step in ``dtype``."""
    if mode == "eval":
        with torch.no_grad():
            return module(inputs.x).detach(), {}
    inner.zero_grad(set_to_none=True)
    x = inputs.x.detach().requires_grad_(not workload.is_model)
    with _autocast(x.device, dtype):
        out = module(x)
    if workload.is_model:
        F.cross_entropy(out if out.dtype == torch.float64 else out.float(), inputs.labels).backward()
    else:
        out.backward(inputs.grad_out.to(out.dtype))
    grads = {"input": x.grad} if x.grad is not None else {}
    grads.update({name: p.grad for name, p in inner.named_parameters() if p.grad is not None})
    return out.detach(), {k: v.detach() for k, v in grads.items()}


def reference_result(workload: Workload, base: nn.Module, mode: str, dtype: torch.dtype,
                     inputs: Inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eager torchvision in fp32 (fp64 when ``dtype`` is fp32) on the same weights and inputs, TF32 off: the
    reference of the error columns."""
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    device = inputs.x.device
    module = copy.deepcopy(base).to(device=device, dtype=ref_dtype, memory_format=torch.channels_last)
    module.train(mode == "train")
    ref_inputs = Inputs(inputs.x.detach().to(ref_dtype), None if inputs.grad_out is None else
                        inputs.grad_out.to(ref_dtype), inputs.labels)
    with _exact_fp32():
        return _forward_backward(module, module, workload, mode, ref_dtype, ref_inputs)


@contextlib.contextmanager
def _exact_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def prepare(provider: str, workload: Workload, base: nn.Module, mode: str, dtype: torch.dtype,
            inputs: Inputs) -> Step:
    """A step running `provider` on its own copy of `base` (the fp32 CPU torchvision module)."""
    device = inputs.x.device
    module = copy.deepcopy(base).to(device=device, memory_format=torch.channels_last)
    if mode == "eval":
        module = module.to(dtype).eval()
    else:
        module.train()
    context = None
    if provider == CONVS:
        run = _convs_step(module, inputs.x)
        return Step(provider, workload, module, mode, dtype, inputs, run)
    if provider in COMPILE_MODES:
        module = _compile(module, provider, mode)
    elif provider.startswith(RF_PREFIX):
        import resnet_fused

        backend, engine = backend_of(provider)
        module = resnet_fused.fuse(module, backend=backend)
        if engine is not None:
            from resnet_fused.backends import cuda

            def context(engine=engine):
                return cuda.forced_engine(engine)
    elif provider != EAGER:
        raise ValueError(f"unknown provider {provider!r}")

    x = inputs.x
    amp = _autocast(device, dtype)
    if mode == "eval":

        def run() -> torch.Tensor:
            with torch.no_grad():
                return module(x)

    elif workload.is_model:
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

        def run() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with amp:
                logits = module(x)
            F.cross_entropy(logits.float(), inputs.labels).backward()
            optimizer.step()
            return logits

    else:

        def run() -> torch.Tensor:
            module.zero_grad(set_to_none=True)
            x.grad = None
            with amp:
                out = module(x)
            out.backward(inputs.grad_out.to(out.dtype))  # a no-op unless autocast left the output in fp32
            return out

    return Step(provider, workload, module, mode, dtype, inputs, run, context)


def auto_blocks(step: Step) -> list[dict]:
    """An ``rf-auto`` row's per-block choice table: for every block (and stem) of the module that ``auto``
    measured or looked up, its path, the candidate that runs it, eager's time over that candidate's, and per
    candidate the median ms, the max error against the float64 reference and why it was excluded."""
    try:
        from resnet_fused import dispatch
    except Exception as error:  # an older package: no per-block dispatcher
        return [{"error": f"{type(error).__name__}: {error}"}]
    inner = getattr(step.module, "_orig_mod", step.module)
    table = []
    for path, m in inner.named_modules():
        for kind, (sig, entry) in sorted(dispatch.chosen(m).items()):
            ms, choice = entry.get("ms", {}), entry.get("choice")
            eager = ms.get(dispatch.EAGER)
            table.append({
                "block": path if kind == "block" else (f"{path}.conv1" if path else "conv1"),
                "signature": sig,
                "choice": choice,
                "vs_eager": round(eager / ms[choice], 4) if eager and ms.get(choice) else None,
                "ms": ms,
                "max_error": entry.get("max_error", {}),
                "errors": entry.get("errors", {}),
            })
    return table


def release_memory() -> None:
    """Return cached device memory (after a provider failed; other providers of the group stay compiled)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release() -> None:
    """Drop compiled graphs (freezing holds weight copies) and cached device memory between groups."""
    torch._dynamo.reset()
    release_memory()
