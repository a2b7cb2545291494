"""The launches the compile report compiles: every Triton launch a ResNet-18/50 (and a ResNeXt grouped layer)
makes at batch 256, per convolution and per block, in eval and in training, run on ``meta`` tensors.

A case is one call of a public launcher of :mod:`resnet_fused.backends.triton` (the same call the fused blocks
make) with the shapes of one layer, in one dtype and input layout; :func:`record` returns the launches it made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from resnet_fused.backends.reference import EvalBN

BATCH = 256
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("nhwc", "nchw")


@dataclass(frozen=True)
class Conv:
    """One convolution of a network: ``c`` → ``k`` channels, ``r``x``r`` kernel, on an ``h``x``h`` input."""

    c: int
    k: int
    h: int
    r: int
    stride: int = 1
    groups: int = 1

    @property
    def pad(self) -> int:
        return self.r // 2

    @property
    def out(self) -> int:
        return (self.h + 2 * self.pad - self.r) // self.stride + 1


@dataclass(frozen=True)
class Block:
    """A residual block: its convolutions in order, and its 1x1 downsample (None: identity shortcut)."""

    net: str
    name: str
    convs: tuple[Conv, ...]
    down: Conv | None


def _resnet18() -> list[Block]:
    blocks = []
    cin, h = 64, 56
    for i, planes in enumerate((64, 128, 256, 512)):
        s = 1 if i == 0 else 2
        ho = h // s
        down = Conv(cin, planes, h, 1, s) if s != 1 or cin != planes else None
        blocks.append(Block("r18", f"layer{i + 1}.0", (Conv(cin, planes, h, 3, s), Conv(planes, planes, ho, 3)), down))
        if i:
            blocks.append(Block("r18", f"layer{i + 1}.1", (Conv(planes, planes, ho, 3), Conv(planes, planes, ho, 3)),
                                None))
        cin, h = planes, ho
    return blocks


def _bottlenecks(net: str, groups: int = 1, width_per_group: int = 64, layers=(1, 2, 3, 4)) -> list[Block]:
    blocks = []
    cin, h = 64, 56
    for i, planes in enumerate((64, 128, 256, 512)):
        s = 1 if i == 0 else 2
        width = planes * width_per_group // 64 * groups
        out, ho = planes * 4, h // s
        if i + 1 in layers:
            blocks.append(Block(net, f"layer{i + 1}.0", (Conv(cin, width, h, 1), Conv(width, width, h, 3, s, groups),
                                                         Conv(width, out, ho, 1)), Conv(cin, out, h, 1, s)))
            blocks.append(Block(net, f"layer{i + 1}.1", (Conv(out, width, ho, 1), Conv(width, width, ho, 3, 1, groups),
                                                         Conv(width, out, ho, 1)), None))
        cin, h = out, ho
    return blocks


STEM = Conv(3, 64, 224, 7, 2)


def blocks() -> list[Block]:
    """ResNet-18 and ResNet-50 (every distinct block: the first of each stage and an identity block), ResNeXt
    grouped layers: resnext50_32x4d's and resnext101_32x8d's first stage (4 and 8 channels per group)."""
    return (_resnet18() + _bottlenecks("r50") + _bottlenecks("rx50_32x4d", 32, 4, layers=(1,))
            + _bottlenecks("rx101_32x8d", 32, 8, layers=(1,)))


def _meta(shape, dtype, layout="nchw"):
    t = torch.empty(shape, device="meta", dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" and t.dim() == 4 else t


def _bn(k, dtype):
    return EvalBN(*(_meta((k,), dtype) for _ in range(4)), 1e-5)


def _act(conv: Conv, dtype, layout, out=False):
    h = conv.out if out else conv.h
    return _meta((BATCH, conv.k if out else conv.c, h, h), dtype, layout)


def _weight(conv: Conv, dtype):
    return _meta((conv.k, conv.c // conv.groups, conv.r, conv.r), dtype)  # a parameter: NCHW-contiguous


@dataclass(frozen=True)
class Case:
    """One launcher call: ``run(dtype, layout)`` makes it on meta tensors."""

    name: str  # e.g. "r50.layer2.0.conv3+shortcut"
    mode: str  # eval | train | train-bwd
    kind: str  # conv | elementwise
    run: Callable[[torch.dtype, str], None]
    resnet: bool  # a ResNet-18/50 shape (where the report's targets apply)
    stem: bool = False


def _eval_conv(conv, residual=False, shortcut: Conv | None = None):
    def run(dtype, layout):
        from resnet_fused.backends.triton import conv as tconv

        kw = {}
        if residual:
            kw["residual"] = _act(conv, dtype, layout, out=True)
        if shortcut is not None:
            kw.update(shortcut_x=_act(shortcut, dtype, layout), shortcut_weight=_weight(shortcut, dtype),
                      shortcut_bn=_bn(conv.k, dtype), shortcut_stride=shortcut.stride)
        tconv.conv2d_fused(_act(conv, dtype, layout), _weight(conv, dtype), _bn(conv.k, dtype), conv.stride, conv.pad,
                           1, conv.groups, relu=True, **kw)
    return run


def _train_conv(conv, prologue):
    """A training conv as the fused blocks run it: its BatchNorm finalized in the same launch
    (``conv2d_bn_train``: fp32 γ/β and running statistics, ``momentum=None`` for the num_batches_tracked path)."""
    def run(dtype, layout):
        from resnet_fused.backends.reference import TrainBN
        from resnet_fused.backends.triton import conv as tconv

        kw = {}
        if prologue:
            kw = dict(in_scale=_meta((conv.c,), torch.float32), in_shift=_meta((conv.c,), torch.float32))
        bn = TrainBN(*(_meta((conv.k,), torch.float32) for _ in range(4)), _meta((), torch.int64), None, 1e-5)
        tconv.conv2d_bn_train(_act(conv, dtype, layout), _weight(conv, dtype), bn, conv.stride, conv.pad, 1,
                              conv.groups, **kw)
    return run


def _train_conv_stats(conv, prologue):
    """A training conv whose BatchNorm norm.py finalizes itself (a SyncBatchNorm that combines its statistics over
    the group first): the conv with its statistics partials, their merge, the BatchNorm finalize."""
    def run(dtype, layout):
        from resnet_fused.backends.triton import conv as tconv
        from resnet_fused.backends.triton import stats

        kw = {}
        if prologue:
            kw = dict(in_scale=_meta((conv.c,), torch.float32), in_shift=_meta((conv.c,), torch.float32))
        _, mean, var = tconv.conv2d_fused(_act(conv, dtype, layout), _weight(conv, dtype), None, conv.stride,
                                          conv.pad, 1, conv.groups, stats=True, **kw)
        vk = [_meta((conv.k,), torch.float32) for _ in range(4)]
        stats.finalize(mean, var, *vk, BATCH * conv.out * conv.out, 0.1, 1e-5)
    return run


def _tail(conv, dual, backward):
    def run(dtype, layout):
        from resnet_fused.backends.triton import elementwise

        c = _act(conv, dtype, layout, out=True)
        vec = [_meta((conv.k,), torch.float32) for _ in range(4)]
        extra = vec[2:] if dual else []
        if backward:
            elementwise.tail_bwd(c, c, vec[0], vec[1], c, *extra)
        else:
            elementwise.tail_fwd(c, vec[0], vec[1], c, *extra)
    return run


def _prologue_bwd(conv):
    """The training backward's passes around a conv with the BN+ReLU prologue: the BatchNorm's backward through
    the statistics and the finalize with the activated input recomputed for the weight gradient (one launch),
    the prologue's backward."""
    def run(dtype, layout):
        from resnet_fused.backends.triton import elementwise

        c = _act(conv, dtype, layout, out=True)
        x = _act(conv, dtype, layout)
        vk = _meta((conv.k,), torch.float32)
        vc = _meta((conv.c,), torch.float32)
        elementwise.bn_train_bwd(c, vk, vk, vk, 1e-5, c, vk, vk, recompute=(x, vc, vc))
        elementwise.affine_relu_bwd(x, x, vc, vc)
    return run


def cases() -> list[Case]:
    """Every case of the full report, in network order."""
    out = [Case("stem.conv1", "eval", "conv", _eval_conv(STEM), True, stem=True),
           Case("stem.conv1", "train", "conv", _train_conv(STEM, False), True, stem=True)]
    seen = set()
    for b in blocks():
        resnet = b.net in ("r18", "r50")
        last = len(b.convs) - 1
        for i, conv in enumerate(b.convs):
            tail = ""
            if i == last:
                tail = "+shortcut" if b.down is not None else "+residual"
            name = f"{b.net}.{b.name}.conv{i + 1}{tail}"
            key = (conv, tail, b.down)
            if key in seen:
                continue
            seen.add(key)
            out.append(Case(name, "eval", "conv", _eval_conv(conv, tail == "+residual",
                                                              b.down if tail == "+shortcut" else None), resnet))
            out.append(Case(f"{b.net}.{b.name}.conv{i + 1}", "train", "conv", _train_conv(conv, i > 0), resnet))
            if i > 0:
                out.append(Case(f"{b.net}.{b.name}.conv{i + 1}", "train-bwd", "elementwise", _prologue_bwd(conv),
                                resnet))
            if b.net == "r50" and b.name.endswith(".0") and i == 1:
                out.append(Case(f"{b.net}.{b.name}.conv{i + 1}+syncbn", "train", "conv",
                                _train_conv_stats(conv, True), resnet))
        if b.down is not None:
            out.append(Case(f"{b.net}.{b.name}.downsample", "train", "conv", _train_conv(b.down, False), resnet))
        if resnet:
            out.append(Case(f"{b.net}.{b.name}.tail", "train", "elementwise", _tail(b.convs[-1], b.down is not None,
                                                                                     False), resnet))
            out.append(Case(f"{b.net}.{b.name}.tail", "train-bwd", "elementwise",
                            _tail(b.convs[-1], b.down is not None, True), resnet))
    return out


# The --quick subset (and the CI test's): one case per code path that matters on Hopper, bf16 channels_last
# unless named otherwise; small enough for a 2-core CI machine.
QUICK = [
    ("stem.conv1", "eval", "bf16", "nhwc"),
    ("r18.layer1.0.conv2+residual", "eval", "bf16", "nhwc"),
    ("r50.layer1.1.conv1", "eval", "fp16", "nchw"),
    ("r50.layer2.0.conv3+shortcut", "eval", "bf16", "nhwc"),
    ("r50.layer2.0.conv2", "train", "bf16", "nhwc"),
    ("r50.layer2.0.conv3", "train", "bf16", "nhwc"),
    ("r18.layer1.0.conv1", "train", "fp16", "nhwc"),  # fp16 statistics without the prologue (C7514 until fixed)
    ("rx50_32x4d.layer1.0.conv2", "eval", "bf16", "nhwc"),
    ("r50.layer2.0.conv2", "train-bwd", "bf16", "nhwc"),
    ("r50.layer2.0.tail", "train-bwd", "bf16", "nhwc"),
]
