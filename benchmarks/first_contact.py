"""First contact with a GPU: every op of resnet_fused on every engine, once, in about a minute.

`python -m benchmarks.first_contact --out FILE` runs each op — the eval convolution (alone, with an identity
residual, with the downsample branch as a second convolution in the same op), the training convolution with its
statistics, the training stage with its BatchNorm finalize, the finalize alone, the training tails, the BN+ReLU,
and a whole downsample Bottleneck in eval and in training — on every engine: ``triton``; the ``cuda`` backend's
``cudnn``, ``cutlass`` and ``plain`` engines, each forced (:func:`resnet_fused.backends.cuda.forced_engine`) for the
ops that have engines, the backend itself for those that have none; and ``reference``, on one real ResNet-50 shape
in bf16, fp16 and fp32 (channels_last, batch 4; training ops forward and backward). It writes ONE line per
(op, engine, dtype), flushed as soon as it is known, so a run cut short still says what it reached::

    conv_bn_act+shortcut         cuda-cutlass bf16  ran       within err=3.9e-03 pytorch=3.9e-03 allowed=1.2e-01 ...
    conv_bn_act                  cuda-cutlass fp32  declined  conv_bn_act: engine 'cutlass' cannot run this call: ...
    block_train                  triton       fp16  failed    RuntimeError: ...

* ``ran``: ``within`` or ``BEYOND`` the tests' tolerance rule (tests/tolerances.py) — the error against an fp64
  oracle at most twice PyTorch's own error in that dtype plus the dtype's tolerance — on every result (outputs,
  every gradient, updated running statistics); ``err``/``pytorch``/``allowed`` are those of the worst result. The
  oracle is the reference backend (ops) or torchvision (blocks, as tests/torchvision_oracle.py runs them) in
  float64 on the same inputs, PyTorch's own error that of the same code in the row's dtype; TF32 is off. A block
  trained in half precision is judged on its parameter gradients as one tensor (see :func:`_run_block`).
* ``declined``: the engine says it cannot run the call (its reason); ``failed``: any other error (one line of it);
  ``skipped``: not run — the process's CUDA context was unusable after an earlier fault (a CUDA fault is sticky
  for its process), or the time budget ran out before the op began; a ``failed`` op that never finished was
  still running when the budget ran out (a hang, or a slow compile).

On a GPU each engine, dtype and group of ops (eval convolutions, training convolutions, the other passes) runs in
its own process, up to ``--jobs`` at a time, so one engine's fault cannot take another's verdict with it and the
Triton compiles and cuDNN graph builds run in parallel; at ``--budget`` seconds, or when the run is stopped
(SIGTERM), the processes still running are killed and every line not written yet is written as not finished.
Without a GPU the reference backend runs here (on the shapes with channels / 8 at 8x8, batch 2) and every GPU path
gets a ``declined`` line saying there is no GPU. The exit status is 1 when a line says ``failed`` or ``BEYOND``,
else 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))  # the tests' tolerance rule and torchvision oracle

import torch  # noqa: E402
from torch import nn  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUDA_ENGINES = ("cudnn", "cutlass", "plain")
ENGINES = ("triton", *(f"cuda-{e}" for e in CUDA_ENGINES), "cuda", "reference")
STATUSES = ("ran", "declined", "failed", "skipped")
LINE = re.compile(r"^(?P<op>\S+) +(?P<engine>\S+) +(?P<dtype>bf16|fp16|fp32) +(?P<status>ran|declined|failed|skipped)"
                  r" +(?P<detail>\S.*)$")
NO_GPU = "no CUDA GPU here (torch.cuda.is_available() is False)"
_DECLINED = ("cannot run this call", "cannot run this input")  # the cuda ops' and the backend registry's refusals
_BEGIN = "@begin "  # a worker's marker: the op it starts now


@dataclass(frozen=True)
class Op:
    name: str
    phase: str  # "eval" or "train"
    engines: bool  # whether the cuda backend chooses an engine for it (else one "cuda" line)
    group: str  # ops of one group share a worker process on a GPU: "eval", "train" (convolutions), "pass"


OPS = (
    Op("conv_bn_act", "eval", True, "eval"),
    Op("conv_bn_act+residual", "eval", True, "eval"),
    Op("conv_bn_act+shortcut", "eval", True, "eval"),
    Op("block_eval", "eval", True, "eval"),
    Op("conv_stats", "train", True, "train"),
    Op("conv_bn_train", "train", True, "train"),
    Op("block_train", "train", True, "train"),
    Op("finalize", "train", False, "pass"),
    Op("bn_relu", "train", False, "pass"),
    Op("scale_bias_add_relu", "train", False, "pass"),
    Op("scale_bias_add_relu+shortcut", "train", False, "pass"),
)
GROUPS = ("train", "eval", "pass")


def engines_of(op: Op) -> tuple[str, ...]:
    """The engines an op gets a line for: the cuda engines one by one where the backend chooses among them."""
    return tuple(e for e in ENGINES if not e.startswith("cuda") or (e == "cuda") != op.engines)


def expected_rows() -> list[tuple[str, str, str]]:
    """Every (op, engine, dtype) a run writes one line for."""
    return [(op.name, e, d) for d in DTYPES for op in OPS for e in engines_of(op)]


def format_line(op: str, engine: str, dtype: str, status: str, detail: str) -> str:
    assert status in STATUSES, status
    detail = " ".join(str(detail).split()) or "-"  # one line
    return f"{op:<28} {engine:<12} {dtype:<4}  {status:<8}  {detail[:400]}"


# ------------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Shapes:
    """ResNet-50's layer1 (64 channels at 56x56, 256 outside the bottleneck), layer2's first block (stride 2,
    downsample 256 -> 512), and the stem's BN+ReLU (64 channels at 112x112); ``tiny``: channels / 8, 8x8."""

    batch: int
    tiny: bool = False

    def c(self, channels: int) -> int:
        return channels // 8 if self.tiny else channels

    def hw(self, size: int) -> int:
        return max(2, size * 8 // 56) if self.tiny else size


class Case:
    """Inputs of one op, made once in float64 (rounded to the row's dtype where the op takes them in it, so the oracle
    sees exactly the values the op sees) and handed out in the dtype of each run."""

    def __init__(self, dtype: torch.dtype, device: torch.device, seed: int):
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator().manual_seed(seed)
        self.master: dict[str, tuple[torch.Tensor, bool, bool]] = {}  # name -> (fp64 values, activation?, grad?)

    def _add(self, name: str, values: torch.Tensor, in_dtype: bool, grad: bool) -> None:
        self.master[name] = ((values.to(self.dtype) if in_dtype else values.float()).double(), in_dtype, grad)

    def act(self, name: str, shape: tuple, scale: float = 1.0, grad: bool = False) -> None:
        """An activation (channels_last when 4-D) in the run's dtype, N(0, scale²)."""
        self._add(name, torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale, True, grad)

    def weight(self, name: str, shape: tuple, grad: bool = False) -> None:
        fan_in = shape[1] * shape[2] * shape[3]
        self.act(name, shape, fan_in ** -0.5, grad)

    def vec(self, name: str, n: int, low: float | None = None, grad: bool = False, in_dtype: bool = False) -> None:
        """A per-channel vector, in fp32 (``in_dtype``: in the run's dtype, a model's BN of that dtype): uniform in
        [low, low + 1) when ``low`` is given, else N(0, 1/4)."""
        t = torch.rand(n, generator=self.gen, dtype=torch.float64) + low if low is not None \
            else 0.5 * torch.randn(n, generator=self.gen, dtype=torch.float64)
        self._add(name, t, in_dtype, grad)

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Fresh leaf tensors: activations in ``dtype``, vectors in fp32 (both float64 for the oracle)."""
        out = {}
        for name, (t, is_act, grad) in self.master.items():
            dt = dtype if is_act or dtype == torch.float64 else torch.float32
            v = t.to(self.device, dt)
            if v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
            out[name] = v.requires_grad_(grad)
        return out


def _grads(outputs: dict[str, torch.Tensor], upstream: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]):
    """``outputs`` plus the gradient of Σ out·upstream w.r.t. every input that requires one (``grad:<name>``)."""
    need = {k: v for k, v in inputs.items() if v.requires_grad}
    outs = [outputs[k] for k in upstream]
    grads = torch.autograd.grad(outs, list(need.values()), [upstream[k].to(outputs[k].dtype) for k in upstream],
                                allow_unused=True)
    result = {k: v.detach() for k, v in outputs.items()}
    result.update({f"grad:{k}": g for k, g in zip(need, grads) if g is not None})
    return result


def _upstream(outputs: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A fixed random float64 output gradient for every differentiable output."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.device)
            for k, v in outputs.items() if v.requires_grad}


class OpCase:
    """One op on the reference backend's oracle: ``build`` fills a :class:`Case`, ``run(be, tensors)`` returns the
    op's outputs (a dict); training ops are differentiated against a fixed random output gradient."""

    def __init__(self, op: Op, shapes: Shapes, dtype: torch.dtype, device: torch.device):
        self.op, self.shapes, self.dtype = op, shapes, dtype
        self.case = Case(dtype, device, seed=sum(map(ord, op.name)))
        getattr(self, "_build_" + op.name.replace("+", "_"))()

    def results(self, be, dtype: torch.dtype, upstream: dict | None = None) -> dict[str, torch.Tensor]:
        t = self.case.tensors(dtype)
        run = getattr(self, "_run_" + self.op.name.replace("+", "_"))
        if self.op.phase == "eval":
            with torch.no_grad():
                return {k: v.detach() for k, v in run(be, t).items()}
        out = run(be, t)
        if upstream is None:
            upstream = _upstream(out, seed=7)
        self.upstream = upstream
        return _grads(out, upstream, t)

    # Eval: ResNet-50's layer1 3x3, its identity tail (1x1 64 -> 256 + residual), layer2.0's dual tail (1x1 128 -> 512
    # at 28x28 + the downsample 1x1 stride 2 from 256 channels at 56x56, with its own BN, in the same op).

    def _eval_bn(self, prefix: str, k: int, in_dtype: bool = False) -> None:
        self.case.vec(prefix + "w", k, low=0.5, in_dtype=in_dtype)
        self.case.vec(prefix + "b", k, in_dtype=in_dtype)
        self.case.vec(prefix + "mean", k, in_dtype=in_dtype)
        self.case.vec(prefix + "var", k, low=0.5, in_dtype=in_dtype)

    @staticmethod
    def _bn(t, prefix: str):
        from resnet_fused.backends.reference import EvalBN

        return EvalBN(t[prefix + "w"], t[prefix + "b"], t[prefix + "mean"], t[prefix + "var"], 1e-5)

    def _build_conv_bn_act(self) -> None:
        s = self.shapes
        self.case.act("x", (s.batch, s.c(64), s.hw(56), s.hw(56)))
        self.case.weight("w", (s.c(64), s.c(64), 3, 3))
        self._eval_bn("bn_", s.c(64))

    def _run_conv_bn_act(self, be, t):
        return {"output": be.conv_bn_act(t["x"], t["w"], self._bn(t, "bn_"), 1, 1, 1, 1, relu=True)}

    def _build_conv_bn_act_residual(self) -> None:
        s = self.shapes
        self.case.act("x", (s.batch, s.c(64), s.hw(56), s.hw(56)))
        self.case.weight("w", (s.c(256), s.c(64), 1, 1))
        self._eval_bn("bn_", s.c(256))
        self.case.act("residual", (s.batch, s.c(256), s.hw(56), s.hw(56)))

    def _run_conv_bn_act_residual(self, be, t):
        return {"output": be.conv_bn_act(t["x"], t["w"], self._bn(t, "bn_"), 1, 0, 1, 1, residual=t["residual"],
                                         relu=True)}

    def _build_conv_bn_act_shortcut(self) -> None:
        s = self.shapes
        self.case.act("x", (s.batch, s.c(128), s.hw(28), s.hw(28)))
        self.case.weight("w", (s.c(512), s.c(128), 1, 1))
        self._eval_bn("bn_", s.c(512))
        self.case.act("sx", (s.batch, s.c(256), s.hw(56), s.hw(56)))
        self.case.weight("sw", (s.c(512), s.c(256), 1, 1))
        self._eval_bn("sbn_", s.c(512))

    def _run_conv_bn_act_shortcut(self, be, t):
        from resnet_fused.backends.reference import Shortcut

        shortcut = Shortcut(t["sx"], t["sw"], self._bn(t, "sbn_"), 2)
        return {"output": be.conv_bn_act(t["x"], t["w"], self._bn(t, "bn_"), 1, 0, 1, 1, shortcut=shortcut,
                                         relu=True)}

    # Training: layer1's 3x3 with the previous BN+ReLU on load; layer2.0's strided 3x3 as a training stage (the conv,
    # its statistics and its BN's finalize, running statistics included); the finalize alone; the stem's BN+ReLU;
    # layer1's identity tail and layer2.0's tail with the downsample branch's BN.

    def _build_conv_stats(self) -> None:
        s = self.shapes
        self.case.act("x", (s.batch, s.c(64), s.hw(56), s.hw(56)), grad=True)
        self.case.weight("w", (s.c(64), s.c(64), 3, 3), grad=True)
        self.case.vec("in_scale", s.c(64), low=0.5, grad=True)
        self.case.vec("in_shift", s.c(64), grad=True)

    def _run_conv_stats(self, be, t):
        c, mean, var = be.conv_stats(t["x"], t["w"], 1, 1, 1, 1, in_scale=t["in_scale"], in_shift=t["in_shift"])
        return {"c": c, "mean": mean, "var": var}

    def _build_conv_bn_train(self) -> None:
        s = self.shapes
        self.case.act("x", (s.batch, s.c(128), s.hw(56), s.hw(56)), grad=True)
        self.case.weight("w", (s.c(128), s.c(128), 3, 3), grad=True)
        self.case.vec("in_scale", s.c(128), low=0.5, grad=True)
        self.case.vec("in_shift", s.c(128), grad=True)
        self._eval_bn("bn_", s.c(128))  # γ, β and the running statistics before the step

    def _train_bn(self, t, prefix: str, dtype: torch.dtype) -> nn.BatchNorm2d:
        """A training BatchNorm2d whose γ, β are the case's (differentiable through the module's parameters being
        the case's leaves) and whose running statistics are fresh copies."""
        k = t[prefix + "w"].shape[0]
        bn = nn.BatchNorm2d(k, device=t[prefix + "w"].device, dtype=dtype).train()
        bn.weight, bn.bias = nn.Parameter(t[prefix + "w"].to(dtype)), nn.Parameter(t[prefix + "b"].to(dtype))
        with torch.no_grad():
            bn.running_mean.copy_(t[prefix + "mean"])
            bn.running_var.copy_(t[prefix + "var"])
        t[prefix + "w"], t[prefix + "b"] = bn.weight, bn.bias  # their gradients are the op's
        return bn

    def _run_conv_bn_train(self, be, t):
        from resnet_fused import fused

        x = t["x"]
        conv = nn.Conv2d(x.shape[1], t["w"].shape[0], 3, stride=2, padding=1, bias=False)
        conv.weight = nn.Parameter(t["w"])
        t["w"] = conv.weight
        bn = self._train_bn(t, "bn_", torch.float64 if x.dtype == torch.float64 else torch.float32)
        c, scale, shift = fused.conv_bn_train(be, conv, bn, x, x.dtype, t["in_scale"], t["in_shift"])
        return {"c": c, "scale": scale, "shift": shift, "running_mean": bn.running_mean.clone(),
                "running_var": bn.running_var.clone()}

    def _build_finalize(self) -> None:
        s = self.shapes
        self.count = s.batch * s.hw(56) * s.hw(56)
        self.case.vec("mean", s.c(256), grad=True)
        self.case.vec("var", s.c(256), low=0.25, grad=True)
        self._eval_bn("bn_", s.c(256), in_dtype=True)

    def _run_finalize(self, be, t):
        """A model of the row's dtype: its BN's parameters and buffers in it (the fp32 statistics' finalize updates
        them through temporaries)."""
        from resnet_fused import norm

        dtype = self.dtype if t["mean"].dtype != torch.float64 else torch.float64
        bn = self._train_bn(t, "bn_", dtype)
        shape = torch.Size((self.shapes.batch, t["mean"].shape[0], self.shapes.hw(56), self.shapes.hw(56)))
        scale, shift = norm.batch_scale_shift(bn, t["mean"], t["var"], self.count, shape,
                                              getattr(be, "finalize", None))
        return {"scale": scale, "shift": shift, "running_mean": bn.running_mean.clone(),
                "running_var": bn.running_var.clone()}

    def _build_bn_relu(self) -> None:
        s = self.shapes
        self.case.act("x", (s.batch, s.c(64), s.hw(112), s.hw(112)), grad=True)
        self.case.vec("scale", s.c(64), low=0.5, grad=True)
        self.case.vec("shift", s.c(64), grad=True)

    def _run_bn_relu(self, be, t):
        return {"output": be.bn_relu(t["x"], t["scale"], t["shift"])}

    def _build_scale_bias_add_relu(self) -> None:
        s = self.shapes
        for name in ("c", "idn"):
            self.case.act(name, (s.batch, s.c(256), s.hw(56), s.hw(56)), grad=True)
        self.case.vec("scale", s.c(256), low=0.5, grad=True)
        self.case.vec("shift", s.c(256), grad=True)

    def _run_scale_bias_add_relu(self, be, t):
        return {"output": be.scale_bias_add_relu(t["c"], t["scale"], t["shift"], t["idn"])}

    def _build_scale_bias_add_relu_shortcut(self) -> None:
        s = self.shapes
        for name in ("c", "c_d"):
            self.case.act(name, (s.batch, s.c(512), s.hw(28), s.hw(28)), grad=True)
        for suffix in ("", "_d"):
            self.case.vec("scale" + suffix, s.c(512), low=0.5, grad=True)
            self.case.vec("shift" + suffix, s.c(512), grad=True)

    def _run_scale_bias_add_relu_shortcut(self, be, t):
        return {"output": be.scale_bias_add_relu(t["c"], t["scale"], t["shift"], t["c_d"], t["scale_d"],
                                                 t["shift_d"])}


def _block(shapes: Shapes) -> tuple[nn.Module, torch.Tensor]:
    """torchvision's layer2.0 of ResNet-50 (Bottleneck 256 -> 512, stride 2 in the 3x3, conv1x1 + BN downsample) with
    random BN parameters and statistics, and its input."""
    from torchvision.models.resnet import Bottleneck

    import torchvision_oracle

    torch.manual_seed(5)
    s = shapes
    downsample = nn.Sequential(nn.Conv2d(s.c(256), s.c(512), 1, stride=2, bias=False), nn.BatchNorm2d(s.c(512)))
    block = Bottleneck(s.c(256), s.c(128), stride=2, downsample=downsample)
    torchvision_oracle.randomize_bn(block)
    x = torch.randn(s.batch, s.c(256), s.hw(56), s.hw(56), generator=torch.Generator().manual_seed(6))
    return block, x


# ------------------------------------------------------------------------------------------------ one row


class Declined(Exception):
    """The engine cannot run this call; the message is its reason."""


def _backend(engine: str, probe: torch.Tensor):
    """The backend module of ``engine`` and the cuda engine to force (or None); raises :class:`Declined` with the
    backend's reason when it cannot run a tensor like ``probe``."""
    from resnet_fused import backends

    name = "cuda" if engine.startswith("cuda") else engine
    mod = backends.load(name)
    reason = mod if isinstance(mod, str) else mod.unsupported(probe, 1, 1)
    if reason is not None:
        raise Declined(reason)
    return mod, (engine.split("-", 1)[1] if "-" in engine else None)


def _verdict(actual: dict, eager: dict, oracle: dict, dtype: torch.dtype) -> str:
    """The tests' rule (tolerances.py) on every result; the worst result's numbers (highest error / allowed)."""
    import tolerances

    if actual.keys() != oracle.keys():
        raise AssertionError(f"results {sorted(actual)} differ from the oracle's {sorted(oracle)}")
    rtol, atol = tolerances.TOL[dtype]
    worst, beyond, ill = None, [], 0
    for name, want in oracle.items():
        err, eager_err, size = tolerances.oracle_errors(actual[name], eager[name], want)
        allowed = tolerances.ORACLE_FACTOR * eager_err + atol + rtol * size
        ratio = err / allowed if allowed > 0 else float("inf")
        if worst is None or ratio > worst[0]:
            worst = (ratio, name, err, eager_err, allowed)
        try:
            tolerances.assert_oracle_errors(err, eager_err, size, dtype, what=name)
        except AssertionError as error:
            if "cannot fail" in str(error):
                ill += 1  # PyTorch's own error is as large as the result: no verdict from this one
            else:
                beyond.append(name)
    _, name, err, eager_err, allowed = worst
    word = "within" if not beyond else "BEYOND"
    text = f"{word} err={err:.1e} pytorch={eager_err:.1e} allowed={allowed:.1e} worst={name.replace(' ', '_')}"
    if beyond:
        text += f" beyond={','.join(n.replace(' ', '_') for n in beyond)}"
    if ill:
        text += f" ill_conditioned={ill}"
    return text + f" results={len(oracle)}"


def _cuda_ran() -> dict[str, str]:
    from resnet_fused.backends import cuda

    return {k: v["ran"] for k, v in cuda.engine_choices().items() if "ran" in v}


def run_row(op: Op, engine: str, dtype_name: str, shapes: Shapes, device: torch.device) -> tuple[str, str]:
    """Run one (op, engine, dtype) and return its (status, detail); never raises for the op's own errors."""
    dtype = DTYPES[dtype_name]
    t0 = time.perf_counter()
    try:
        mod, forced = _backend(engine, torch.empty(1, 1, 1, 1, device=device, dtype=dtype))
        from resnet_fused.backends import cuda, reference

        force = cuda.forced_engine(forced) if forced else contextlib.nullcontext()
        before = _cuda_ran() if engine.startswith("cuda") else {}
        if op.name.startswith("block_"):
            text = _run_block(op, mod.NAME, force, dtype_name, shapes, device)
        else:
            case = OpCase(op, shapes, dtype, device)
            oracle = case.results(reference, torch.float64)
            eager = case.results(reference, dtype, case.upstream if op.phase == "train" else None)
            with force:
                actual = eager if mod is reference else case.results(mod, dtype,
                                                                     getattr(case, "upstream", None))
            text = _verdict(actual, eager, oracle, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ran = sorted({v for k, v in _cuda_ran().items() if before.get(k) != v}) if engine.startswith("cuda") else []
        if ran:
            text += " engine=" + "+".join(r.replace(" ", "_") for r in ran)
        return "ran", f"{text} t={time.perf_counter() - t0:.1f}s"
    except Declined as why:
        return "declined", str(why)
    except Exception as error:  # noqa: BLE001 - every failure is a verdict, the next op still runs
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if isinstance(error, RuntimeError) and any(d in message for d in _DECLINED):
            return "declined", message
        return "failed", f"{type(error).__name__}: {message}"


def _run_block(op: Op, backend: str, force, dtype_name: str, shapes: Shapes, device: torch.device) -> str:
    """torchvision's block in float64 (oracle), in the row's precision (PyTorch's error) and fused on the backend,
    as tests/torchvision_oracle.py runs them: eval in the dtype (output), training with fp32 parameters under
    autocast (fp32: plain) — output, input gradient, every parameter gradient, the running statistics.

    Half-precision training is judged on the parameter gradients as one tensor and the running statistics as one,
    as the tests judge a model's per stage: a ReLU inside the block whose input lies within rounding of its kink
    takes either side in a half-precision run, which moves one channel's BN gradient by a whole term — a single
    small gradient is then as uncertain in PyTorch's own run as it is large. A zeroed, doubled or halved gradient
    still lands far outside."""
    import torchvision_oracle as tvo

    block, x = _block(shapes)
    train = op.phase == "train"
    block.train(train)
    precision = dtype_name if not train or dtype_name == "fp32" else f"amp-{dtype_name}"
    kink = tvo.compute_dtype(precision)
    oracle, grad = tvo.results(copy.deepcopy(block), x, "fp64", device, None, True, kink, train)
    eager, _ = tvo.results(copy.deepcopy(block), x, precision, device, grad, True, kink, train)
    with force:
        actual, _ = tvo.results(tvo.fused_copy(block, backend), x, precision, device, grad, True, kink, train)
    if train and kink != torch.float32:
        oracle, eager, actual = (_grouped(r) for r in (oracle, eager, actual))
    return _verdict(actual, eager, oracle, kink)


def _grouped(results: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The output and the input gradient as they are; every parameter gradient as one tensor, every running
    statistic as another."""
    out: dict[str, list[torch.Tensor]] = {}
    for name, t in results.items():
        key = name if name in ("output", "input grad") else "parameter grads" if name.startswith("grad of ") \
            else "running statistics"
        out.setdefault(key, []).append(t.flatten())
    return {k: torch.cat(v) for k, v in out.items()}


def _cuda_fault(device: torch.device) -> str | None:
    """The error that makes this process's CUDA context unusable, or None while it still works."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
    except Exception as error:  # noqa: BLE001
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def run_unit(engine: str, dtype_name: str, groups: tuple[str, ...], shapes: Shapes, device: torch.device,
             emit, deadline: float = float("inf")) -> None:
    """Every op of ``groups`` on one engine and dtype, in order; ``emit(line)`` each result (and ``@begin op``
    markers, which a worker's stdout passes on); after ``deadline`` (``time.monotonic()``) no op starts."""
    broken = None
    for op in OPS:
        if op.group not in groups or engine not in engines_of(op):
            continue
        emit(_BEGIN + op.name, marker=True)
        if broken is not None:
            status, detail = "skipped", f"CUDA context unusable after {broken} (a CUDA fault is sticky for a process)"
        elif time.monotonic() > deadline:
            status, detail = "skipped", "not reached: the time budget ran out"
        else:
            status, detail = run_row(op, engine, dtype_name, shapes, device)
            if status == "failed":
                fault = _cuda_fault(device)
                if fault is not None:
                    broken = f"{op.name}'s fault"
                    detail += f" [CUDA context now unusable: {fault}]"
        emit(format_line(op.name, engine, dtype_name, status, detail))


# --------------------------------------------------------------------------------------------- the driver


def _units(gpu: bool) -> list[tuple[str, str, tuple[str, ...]]]:
    """(engine, dtype, op groups) of each worker process on a GPU — one per group of ops an engine has, the
    training convolutions (most kernels to compile or cuDNN graphs to build) first — and of the in-process run
    without one (the reference backend, every group)."""
    units = []
    for group in GROUPS if gpu else ():
        for engine in ENGINES[:-1]:
            if any(op.group == group and engine in engines_of(op) for op in OPS):
                units += [(engine, dtype, (group,)) for dtype in DTYPES]
    return units + [("reference", dtype, GROUPS) for dtype in DTYPES]


class Writer:
    """Writes lines to the output file and stdout as they come, each flushed; remembers which rows it wrote."""

    def __init__(self, path: Path | None):
        self.file = open(path, "w", buffering=1) if path else None  # noqa: SIM115
        self.rows: dict[tuple[str, str, str], tuple[str, str]] = {}

    def __call__(self, line: str, marker: bool = False) -> None:
        if marker:
            return
        m = LINE.match(line)
        if m:
            key = (m["op"], m["engine"], m["dtype"])
            if key in self.rows:
                return  # a row is written once
            self.rows[key] = (m["status"], m["detail"])
        for stream in (self.file, sys.stdout):
            if stream is not None:
                stream.write(line + "\n")
                stream.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _header(gpu: bool, args) -> list[str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not importable"
    try:
        from resnet_fused.backends import cuda

        info = cuda.build_info()
    except Exception as error:  # noqa: BLE001
        info = f"resnet_fused not importable: {error}"
    device = torch.cuda.get_device_name() if gpu else NO_GPU
    return [f"# first contact: {device} | torch {torch.__version__} | triton {triton_version} | cuDNN "
            f"{torch.backends.cudnn.version()} | extension {info}",
            f"# {args.shapes} shapes, batch {args.batch}, channels_last, fp64 oracle, TF32 off; "
            f"budget {args.budget:g} s; {len(expected_rows())} lines: op engine dtype status detail"]


def _summary(writer: Writer, seconds: float) -> str:
    counts = collections.Counter(status for status, _ in writer.rows.values())
    beyond = sum(1 for status, detail in writer.rows.values() if status == "ran" and detail.startswith("BEYOND"))
    parts = [f"{counts[s]} {s}" for s in STATUSES] + [f"{beyond} BEYOND tolerance"]
    return f"# first contact done in {seconds:.1f} s: " + ", ".join(parts)


def _pump(proc: subprocess.Popen, key, lines: queue.Queue) -> None:
    for line in proc.stdout:
        lines.put((key, line.rstrip("\n")))
    lines.put((key, None))


def _drain_stderr(proc: subprocess.Popen, tail: collections.deque) -> None:
    for line in proc.stderr:
        if line.strip():
            tail.append(line.strip())


def run_workers(units, args, writer: Writer, deadline: float) -> None:
    """One process per unit, ``args.jobs`` at a time; at ``deadline``, or when this process is stopped (SIGTERM,
    Ctrl-C), the workers still running are killed and every row they did not write is written."""
    pending = list(units)
    running: dict[tuple, tuple[subprocess.Popen, collections.deque]] = {}
    begun: dict[tuple, str] = {}
    lines: queue.Queue = queue.Queue()

    def start(unit) -> None:
        engine, dtype, groups = unit
        cmd = [sys.executable, "-m", "benchmarks.first_contact", "--worker", f"{engine}:{dtype}:{','.join(groups)}",
               "--batch", str(args.batch), "--shapes", args.shapes]
        # Same process group: an outer `timeout` that stops this process stops the workers too.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        tail: collections.deque = collections.deque(maxlen=6)
        running[unit] = (proc, tail)
        threading.Thread(target=_pump, args=(proc, unit, lines), daemon=True).start()
        threading.Thread(target=_drain_stderr, args=(proc, tail), daemon=True).start()

    def take(unit, line) -> None:
        if line is None:  # the worker's stdout closed: it ended
            proc, tail = running.pop(unit)
            rc = proc.wait()
            why = f"its process ended (exit status {rc}) before this op" + (f": {tail[-1]}" if tail else "")
            _fill(writer, unit, why, begun.get(unit), "skipped")
        elif line.startswith(_BEGIN):
            begun[unit] = line[len(_BEGIN):]
        elif LINE.match(line):
            writer(line)
        elif unit in running:  # something a library printed: kept with the worker's stderr
            running[unit][1].append(line)

    def stop(why: str) -> None:
        for proc, _ in running.values():
            proc.kill()
        while not lines.empty():  # what the workers wrote before they were stopped still counts
            unit, line = lines.get()
            if line is not None:
                take(unit, line)
        for unit in running:
            _fill(writer, unit, why, begun.get(unit), "skipped")
        for unit in pending:
            _fill(writer, unit, why, None, "skipped")
        running.clear()
        pending.clear()

    try:
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                start(pending.pop(0))
            with contextlib.suppress(queue.Empty):
                take(*lines.get(timeout=max(0.05, min(1.0, deadline - time.monotonic()))))
            if time.monotonic() >= deadline and (pending or running):
                stop(f"the {args.budget:g} s budget ran out")
    except BaseException as error:  # SIGTERM (SystemExit), Ctrl-C
        stop(f"first contact was stopped ({type(error).__name__})")
        raise


def _fill(writer: Writer, unit, why: str, begun_op: str | None, status: str) -> None:
    """Lines for the rows of ``unit`` not written yet: the op that had begun did not finish (failed), the rest
    were not reached (``status``)."""
    engine, dtype, groups = unit
    for op in OPS:
        if op.group not in groups or engine not in engines_of(op) or (op.name, engine, dtype) in writer.rows:
            continue
        if op.name == begun_op:
            writer(format_line(op.name, engine, dtype, "failed", f"did not finish: {why}"))
        else:
            writer(format_line(op.name, engine, dtype, status, f"not reached: {why}"))


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # runs the finally blocks: the workers are stopped, every row still written


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.first_contact", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="file for the lines (they go to stdout too)")
    parser.add_argument("--budget", type=float, default=85.0, help="seconds after which the workers still running "
                        "are stopped and the rows they did not write are written as not finished (default 85)")
    parser.add_argument("--batch", type=int, help="batch size (default 4 on a GPU, 2 without one)")
    parser.add_argument("--shapes", choices=("real", "tiny"), help="ResNet-50's, or its channels / 8 at 8x8 "
                        "(default: real on a GPU, tiny without one)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes at a time on a GPU (default: the CPU count)")
    parser.add_argument("--processes", action="store_true", help="without a GPU too, run each unit in its own "
                        "process (as on a GPU) instead of in this one")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # engine:dtype:phases, one unit in this process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    os.environ.setdefault("RESNET_FUSED_AUTOTUNE", "0")  # one Triton tile per shape (read when resnet_fused imports)
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    args.batch = args.batch or (4 if gpu else 2)
    args.shapes = args.shapes or ("real" if gpu else "tiny")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda" if gpu else "cpu")
    shapes = Shapes(args.batch, args.shapes == "tiny")
    if args.worker:
        engine, dtype, groups = args.worker.split(":")

        def emit(line: str, marker: bool = False) -> None:
            print(line, flush=True)

        run_unit(engine, dtype, tuple(groups.split(",")), shapes, device, emit)
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    writer = Writer(args.out)
    try:
        for line in _header(gpu, args):
            writer(line)
        if not gpu:
            torch.set_num_threads(min(torch.get_num_threads(), 4))
            for op, engine, dtype in expected_rows():
                if engine != "reference":
                    writer(format_line(op, engine, dtype, "declined", NO_GPU))
        if gpu or args.processes:
            run_workers(_units(gpu), args, writer, started + args.budget)
        else:
            for engine, dtype, groups in _units(gpu):
                run_unit(engine, dtype, groups, shapes, device, writer, started + args.budget)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the last lines short
        for op, engine, dtype in expected_rows():  # nothing may go without a line
            if (op, engine, dtype) not in writer.rows:
                writer(format_line(op, engine, dtype, "skipped", "not reached: first contact was stopped"))
        writer(_summary(writer, time.monotonic() - started))
        writer.close()
    bad = [s for s, d in writer.rows.values() if s == "failed" or (s == "ran" and d.startswith("BEYOND"))]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
