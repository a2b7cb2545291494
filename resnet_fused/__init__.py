"""resnet_fused: fused residual-block kernels for PyTorch.

Drop-in replacements for torchvision's ResNet blocks and models whose convolutions, BatchNorms, ReLUs and
skip additions run as fused kernels — exact against torchvision in eval and in training, forward and
backward. ``fuse(model)`` converts an existing model in place — torchvision's classifiers, detection and
segmentation backbones, timm's ResNets — and ``explain(model)`` reports which blocks run fused and why not.
The default backend, ``auto``, races every way of running each block — torchvision's own forward included —
after checking each against a float64 reference (:mod:`resnet_fused.dispatch`); ``tune(model, *inputs)`` does
that for every block now and prints the table.
"""

from .backends import available_backends
from .dispatch import TuneRow, tune
from .report import BlockReport, explain
from .models import (BasicBlock, Bottleneck, ResNet, convert_sync_batchnorm, fuse, resnet18, resnet34, resnet50,
                     resnet101, resnet152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2,
                     wide_resnet101_2)

__version__ = "0.1.0"

__all__ = ["BasicBlock", "BlockReport", "Bottleneck", "ResNet", "available_backends", "convert_sync_batchnorm",
           "explain", "fuse",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
           "resnext101_64x4d", "tune", "TuneRow", "wide_resnet50_2", "wide_resnet101_2"]
