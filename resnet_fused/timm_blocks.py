"""timm's ResNet blocks (``timm.models.resnet.BasicBlock``/``Bottleneck``) with the fused forward.

timm's blocks compute what torchvision's do when their activations (``act1``, ``act2``[, ``act3``]) are ReLUs and
their optional modules — anti-aliasing ``aa``, attention ``se``, ``drop_block``, ``drop_path`` — are absent or the
identity: that is timm's ``resnet*``, ``resnext*`` and ``wide_resnet*`` families, ``d`` variants included (their
deep stem is outside the blocks; their avg-pool downsample ``Sequential(AvgPool2d(2, s, ceil_mode=True,
count_include_pad=False), conv1x1, BN)`` is the fused tail's shortcut: ATen's ``avg_pool2d`` with the pool's own
arguments, then the 1x1 conv with its BN in the tail's launch, so odd sizes are exact too). The one difference from
torchvision's layout, a dilated ``conv1`` in a BasicBlock (``first_dilation``), is read from the convolution like
every other parameter.

The classes here subclass timm's, so ``isinstance`` checks, ``state_dict`` keys and parameters stay timm's; they
only name timm's modules for the driver shared with torchvision's blocks
(:class:`resnet_fused.fused._FusedBlock`). A block that is not torchvision-shaped (SE, anti-aliasing, another
activation or norm layer, DropBlock/DropPath while training) runs timm's own forward, unchanged.

This module imports timm; :func:`resnet_fused.fuse` imports it only when it meets a timm block, so timm stays
an optional dependency.
"""

from __future__ import annotations

from timm.models import resnet as timm_resnet
from torch import Tensor

from .fused import _FusedBlock, register

__all__ = ["TimmBasicBlock", "TimmBottleneck", "FUSED"]

_IDENTITIES = ("drop_block", "aa", "se", "drop_path")


class TimmBasicBlock(_FusedBlock, timm_resnet.BasicBlock):
    """timm's ``BasicBlock``: ``act2(bn2(conv2(act1(bn1(conv1(x))))) + downsample(x))``, fused."""

    _STAGES = (("conv1", "bn1"), ("conv2", "bn2"))
    _ACTS = ("act1", "act2")
    _IDENTITIES = _IDENTITIES

    def _eager_forward(self, x: Tensor) -> Tensor:
        return timm_resnet.BasicBlock.forward(self, x)


class TimmBottleneck(_FusedBlock, timm_resnet.Bottleneck):
    """timm's ``Bottleneck`` (stride in the 3x3, groups = cardinality): three conv+BN stages, fused."""

    _STAGES = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _ACTS = ("act1", "act2", "act3")
    _IDENTITIES = _IDENTITIES

    def _eager_forward(self, x: Tensor) -> Tensor:
        return timm_resnet.Bottleneck.forward(self, x)


# timm's class -> the fused class fuse() gives its instances.
FUSED = {timm_resnet.BasicBlock: TimmBasicBlock, timm_resnet.Bottleneck: TimmBottleneck}
for _original, _fused_cls in FUSED.items():
    register(_original.__module__, _original.__qualname__, _fused_cls)
