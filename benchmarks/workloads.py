"""Benchmark workloads: every distinct residual block of ResNet-18 and ResNet-50, and the whole models.

Shapes are not hand-written: a forward of torchvision's own model on the meta device records each block's
input shape and each convolution's output shape, so strides, widths and FLOP counts follow torchvision
exactly at any batch and image size. A stage contributes its first block (stride and downsample, when it
has them) and its identity block; a first block that equals the identity block (ResNet-18 layer1) is
listed once, as the identity block.

The modules to time come from one torchvision model per (arch, image size) whose BatchNorm layers carry
random affine parameters and running statistics calibrated on a random batch, so that no BN is an
identity and eval activations stay in range through the whole network (fp16 included).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

ARCHS = ("resnet18", "resnet50")
LAYERS = ("layer1", "layer2", "layer3", "layer4")
_SHORT = {"resnet18": "r18", "resnet50": "r50"}

# Run order: the headline (whole ResNet-50 and ResNet-18), then the blocks of DESIGN.md's measured baseline
# table, then every other block in stage order — so that a run cut short by its time budget has measured what
# matters most.
HEADLINE = ("resnet50", "resnet18")
BASELINE_BLOCKS = ("r18.layer1.identity", "r18.layer2.first", "r50.layer1.identity", "r50.layer2.first")

# (workload, mode) pairs that torch.compile runs on under --quick, each costing seconds (a block) to a
# minute (a whole model, train) of warm-up: the two models' inference and the baseline blocks in both modes.
QUICK_COMPILE = frozenset(
    [(name, mode) for name in BASELINE_BLOCKS for mode in ("eval", "train")]
    + [(name, "eval") for name in HEADLINE]
)

# The CPU smoke run: a BasicBlock without and with downsample, a Bottleneck with downsample, ResNet-18 and
# ResNet-50 (rf-auto vs eager on the whole models: auto must not be slower than torchvision on a CPU either).
SMOKE = ("r18.layer1.identity", "r18.layer2.first", "r50.layer2.first", "resnet18", "resnet50")
SMOKE_BATCH = 2
SMOKE_IMAGE_SIZE = 64  # ResNet-18 layer1 then runs at 16x16


@dataclass(frozen=True)
class Workload:
    """One benchmarked module: a residual block of a torchvision ResNet, or the whole model."""

    name: str  # "r50.layer2.first", "r18.layer1.identity", "resnet50"
    arch: str  # "resnet18" | "resnet50"
    layer: str | None  # "layer1".."layer4"; None for a whole model
    index: int | None  # block index inside the layer; None for a whole model
    description: str  # "Bottleneck 256->128->512 s2 +downsample @56x56"
    input_shape: tuple[int, int, int, int]  # N, C, H, W of the module's input
    output_shape: tuple[int, ...]  # N, K, P, Q of a block's output; N, classes of a model's logits
    image_size: int  # the network's input resolution the shapes were derived from
    fwd_flops: int  # 2 * multiply-accumulates of the convolutions (and the fc layer of a whole model)
    stem_flops: int = 0  # a whole model's stem convolution, whose input gradient a training step never computes

    @property
    def is_model(self) -> bool:
        return self.layer is None

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    def flops(self, mode: str) -> int:
        """FLOPs of one step: forward for "eval"; forward + backward (dgrad + wgrad: 3x) for "train", less the
        stem's dgrad for a whole model (its input needs no gradient; a block's input gets one)."""
        if mode != "train":
            return self.fwd_flops
        return 3 * self.fwd_flops - self.stem_flops

    def build(self) -> nn.Module:
        """A fresh fp32 CPU copy of the torchvision module, in eval mode, with calibrated BatchNorm."""
        model = _calibrated_model(self.arch, self.image_size)
        module = model if self.is_model else getattr(model, self.layer)[self.index]
        return copy.deepcopy(module)


def _count_flops(flops: dict[str, int], name: str, module: nn.Module, inputs, output: torch.Tensor) -> None:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        flops[name] = 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
    else:
        flops[name] = 2 * output.numel() * module.in_features


@functools.lru_cache(maxsize=None)
def _trace(arch: str, batch: int, image_size: int):
    """Meta-device forward of torchvision's `arch`: (model, FLOPs per conv/linear name, block shapes, logits shape).

    Block shapes map (layer, index) to the block's (input shape, output shape).
    """
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    flops: dict[str, int] = {}
    block_shapes: dict[tuple[str, int], tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(functools.partial(_count_flops, flops, name)))
    for layer in LAYERS:
        for index, block in enumerate(getattr(model, layer)):

            def record(mod, args, output, key=(layer, index)):
                block_shapes[key] = (tuple(args[0].shape), tuple(output.shape))

            handles.append(block.register_forward_hook(record))
    with torch.no_grad():
        logits = model.eval()(torch.empty(batch, 3, image_size, image_size, device="meta"))
    for handle in handles:
        handle.remove()
    return model, flops, block_shapes, tuple(logits.shape)


def _describe(block: nn.Module, shape: tuple[int, ...]) -> str:
    at = f"@{shape[2]}x{shape[3]}"
    kind = type(block).__name__
    if hasattr(block, "conv3"):
        chans = f"{block.conv1.in_channels}->{block.conv1.out_channels}->{block.conv3.out_channels}"
        stride = block.conv2.stride[0]
    elif block.downsample is None:
        return f"{kind} {block.conv1.in_channels} {at}"
    else:
        chans = f"{block.conv1.in_channels}->{block.conv2.out_channels}"
        stride = block.conv1.stride[0]
    if block.downsample is None:
        return f"{kind} {chans} {at}"
    return f"{kind} {chans} s{stride} +downsample {at}"


def _signature(block: nn.Module, shape: tuple[int, ...]) -> tuple:
    convs = tuple(
        (tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups)
        for m in block.modules()
        if isinstance(m, nn.Conv2d)
    )
    return type(block).__name__, shape, convs


def workloads(batch: int = 256, image_size: int = 224, archs: tuple[str, ...] = ARCHS) -> list[Workload]:
    """The distinct blocks of each arch (stage order, first block before identity block), then the model."""
    result = []
    for arch in archs:
        model, flops, block_shapes, logits_shape = _trace(arch, batch, image_size)
        seen = set()
        for layer in LAYERS:
            blocks = getattr(model, layer)
            for index in (0, 1):
                block, (shape, out_shape) = blocks[index], block_shapes[(layer, index)]
                signature = _signature(block, shape)
                if index == 0 and signature == _signature(blocks[1], block_shapes[(layer, 1)][0]):
                    continue  # listed once, as the identity block
                if signature in seen:
                    continue
                seen.add(signature)
                role = "first" if block.downsample is not None else "identity"
                prefix = f"{layer}.{index}."
                result.append(
                    Workload(
                        name=f"{_SHORT[arch]}.{layer}.{role}",
                        arch=arch,
                        layer=layer,
                        index=index,
                        description=_describe(block, shape),
                        input_shape=shape,
                        output_shape=out_shape,
                        image_size=image_size,
                        fwd_flops=sum(f for n, f in flops.items() if n.startswith(prefix)),
                    )
                )
        result.append(
            Workload(
                name=arch,
                arch=arch,
                layer=None,
                index=None,
                description=f"{arch} {image_size}x{image_size}",
                input_shape=(batch, 3, image_size, image_size),
                output_shape=logits_shape,
                image_size=image_size,
                fwd_flops=sum(flops.values()),
                stem_flops=flops["conv1"],
            )
        )
    return result


def run_order(chosen: list[Workload]) -> list[Workload]:
    """``chosen`` in run order: the headline models, the baseline blocks, then the rest as listed."""
    first = HEADLINE + BASELINE_BLOCKS
    rank = {name: i for i, name in enumerate(first)}
    return sorted(chosen, key=lambda w: (rank.get(w.name, len(first)), chosen.index(w)))


@functools.lru_cache(maxsize=2)
def _calibrated_model(arch: str, image_size: int) -> nn.Module:
    """torchvision `arch` (seeded init) with random BN affine params and BN statistics of a random batch."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) + 0.5)
            bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=generator))
            bn.momentum = None  # cumulative average: one batch sets the running stats to its statistics
        model.train()(torch.randn(4, 3, image_size, image_size, generator=generator))
    for bn in bns:
        bn.momentum = 0.1
        bn.num_batches_tracked.zero_()
    return model.eval()


def select(all_workloads: list[Workload], patterns: list[str] | None) -> list[Workload]:
    """Workloads whose name equals or contains one of `patterns` (all of them when `patterns` is empty)."""
    if not patterns:
        return list(all_workloads)
    chosen = [w for w in all_workloads if any(p == w.name or p in w.name for p in patterns)]
    if not chosen:
        names = ", ".join(w.name for w in all_workloads)
        raise ValueError(f"no workload matches {patterns}; known: {names}")
    return chosen
