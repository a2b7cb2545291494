"""BatchNorm as per-channel ``scale``/``shift`` vectors: eval form, batch-statistics finalize, SyncBN.

The fused ops never see a BatchNorm module. They see ``y = x*scale + shift`` per channel, where

* in eval (running statistics; always for torchvision's ``FrozenBatchNorm2d``, in training too):
  ``scale = γ/√(σ²+ε)``, ``shift = β − μ·scale``. The one-launch eval path gets
  the module's live tensors (:func:`eval_bn`) and applies ``scale``/``shift`` in its convolution's epilogue in
  fp32, computing them on every call: nothing is folded into or cached beside the weights, so no edit of a
  weight or buffer (an optimizer step, ``load_state_dict``, an in-place write through ``.data``, which bumps no
  version counter) can ever be missed;
* in training (batch statistics): the convolution's epilogue produced the batch mean and biased variance; the
  finalize step here turns them into ``scale``/``shift``, updates ``running_mean``/``running_var`` (unbiased
  variance, ``momentum=None`` = cumulative average) and ``num_batches_tracked`` exactly as
  ``torch.nn.BatchNorm2d`` does, and — for ``torch.nn.SyncBatchNorm`` modules — combines the statistics of
  every process of the group first.

Everything here is differentiable w.r.t. γ, β and the batch statistics, so gradients flow to every weight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backends.reference import EvalBN, TrainBN, acc_dtype, check_batch_size, eval_scale_shift


def is_frozen(bn: nn.Module) -> bool:
    """Whether ``bn`` is torchvision's ``FrozenBatchNorm2d`` (which timm uses too): ``weight``, ``bias``,
    ``running_mean`` and ``running_var`` are buffers, the statistics are always the running ones and are never
    updated, in eval and in training alike. (Matched by name, so torchvision need not be imported.)"""
    cls = type(bn)
    return cls.__name__ == "FrozenBatchNorm2d" and cls.__module__ == "torchvision.ops.misc"


def channels(bn: nn.Module) -> int:
    """The number of channels a BatchNorm (or ``FrozenBatchNorm2d``) normalizes."""
    return bn.running_mean.shape[0] if getattr(bn, "running_mean", None) is not None else bn.num_features


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether ``bn`` normalizes with batch statistics, by the rule ``nn.BatchNorm2d.forward`` applies; never
    for a ``FrozenBatchNorm2d``, whose training mode is its eval mode."""
    if is_frozen(bn):
        return False
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _affine_params(bn: nn.BatchNorm2d, acc: torch.dtype | None) -> tuple[Tensor | None, Tensor | None]:
    """(γ, β) in dtype ``acc`` (None: the parameters themselves), (None, None) without affine."""
    if not bn.affine:
        return None, None
    if acc is None:
        return bn.weight, bn.bias
    return bn.weight.to(acc), bn.bias.to(acc)


def eval_bn(bn: nn.Module) -> EvalBN:
    """The live tensors of an eval-mode BatchNorm (``BatchNorm2d``, ``SyncBatchNorm`` or torchvision's
    ``FrozenBatchNorm2d``) as an :class:`EvalBN`: the module's own parameters and buffers, never copies."""
    weight = getattr(bn, "weight", None)
    bias = getattr(bn, "bias", None)
    if getattr(bn, "affine", True) is False:
        weight = bias = None
    return EvalBN(weight, bias, bn.running_mean, bn.running_var, float(bn.eps))


def running_scale_shift(bn: nn.Module, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``scale = γ/√(σ²+ε)``, ``shift = β − μ·scale`` from the running statistics, in dtype ``acc``."""
    return eval_scale_shift(eval_bn(bn), acc)


def _sync_stats(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, int]:
    """Combine per-process (mean, biased var, count) over ``group`` (Chan et al.'s parallel variance).

    Each process writes its row of a [world, 2C+1] table that one differentiable all-reduce fills in; the
    all-reduce's backward sums the statistics' gradients over the group, as SyncBatchNorm's backward does.
    """
    import torch.distributed.nn.functional as dist_fn

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    row = torch.cat([mean, var, mean.new_tensor([float(count)])])
    table = torch.stack([row if r == rank else torch.zeros_like(row) for r in range(world)])
    table = dist_fn.all_reduce(table, group=group)
    c = mean.numel()
    means, variances, counts = table[:, :c], table[:, c:2 * c], table[:, 2 * c:]
    total = counts.sum()
    g_mean = (means * counts).sum(0) / total
    g_var = ((variances + (means - g_mean) ** 2) * counts).sum(0) / total
    return g_mean, g_var, int(total.item())


def _sync_group(bn: nn.BatchNorm2d):
    """The process group a SyncBatchNorm reduces over, or None when there is nothing to synchronize."""
    if not isinstance(bn, nn.SyncBatchNorm) or not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _momentum_factor(bn: nn.BatchNorm2d) -> float:
    """Counts this batch in ``num_batches_tracked`` and returns the weight of the batch statistics in the running
    averages: ``momentum``, or ``1/num_batches_tracked`` (cumulative average) for ``momentum=None``."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    factor = _momentum_factor(bn)
    if bn.running_mean is None:
        return
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        bn.running_mean.mul_(1.0 - factor).add_(mean.to(bn.running_mean.dtype) * factor)
        bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype) * factor)


def batch_scale_shift(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int, shape: torch.Size,
                      finalize=None) -> tuple[Tensor, Tensor]:
    """Finalize: batch statistics -> ``(scale, shift)``, updating ``bn``'s running statistics in place.

    ``mean``/``var`` are the per-channel batch mean and biased variance of a tensor of ``shape`` holding
    ``count`` values per channel (``shape`` only feeds the error message PyTorch gives for ``count == 1``).

    ``finalize`` is a backend's fused version of the arithmetic (``finalize(mean, var, γ, β, running_mean,
    running_var, count, momentum_factor, eps) -> (scale, shift)``, updating the running statistics it is given);
    SyncBN's combination of the statistics, the batch-size check and ``num_batches_tracked`` stay here.
    """
    acc = mean.dtype
    group = _sync_group(bn) if bn.training else None
    if group is not None:
        mean, var, count = _sync_stats(mean, var, count, group)
    check_batch_size(count, shape)
    update = bn.training and bn.track_running_stats
    gamma, beta = _affine_params(bn, acc)
    if finalize is not None:
        factor = _momentum_factor(bn) if update else 0.0
        running = (bn.running_mean, bn.running_var) if update and bn.running_mean is not None else (None, None)
        return finalize(mean, var, gamma, beta, *running, count, factor, bn.eps)
    if update:
        _update_running_stats(bn, mean.detach(), var.detach(), count)
    invstd = torch.rsqrt(var + bn.eps)
    scale = invstd if gamma is None else gamma * invstd
    shift = -mean * scale
    return scale, (shift if beta is None else shift + beta)


def train_bn(bn: nn.BatchNorm2d) -> TrainBN | None:
    """``bn``, which normalizes with batch statistics, as the :class:`TrainBN` a backend finalizes inside its
    convolution's launch (``conv_bn_train``), with exactly the updates :func:`batch_scale_shift` makes: running
    statistics and ``num_batches_tracked`` only when ``bn.training and bn.track_running_stats``, the weight
    ``momentum`` or (``momentum=None``) 1/num_batches_tracked after counting the batch. None where only
    :func:`batch_scale_shift` can finalize it: a SyncBatchNorm that synchronizes (its statistics are combined
    over the group first), or buffers that are not plain contiguous vectors."""
    if bn.training and _sync_group(bn) is not None:
        return None
    update = bn.training and bn.track_running_stats
    running = (bn.running_mean, bn.running_var) if update and bn.running_mean is not None else (None, None)
    nbt = bn.num_batches_tracked if update else None
    weight, bias = _affine_params(bn, None)
    if any(t is not None and (t.dim() != 1 or not t.is_contiguous()) for t in (weight, bias, *running)):
        return None
    momentum = bn.momentum if bn.momentum is not None or nbt is not None else 0.0
    return TrainBN(weight, bias, *running, nbt, momentum, float(bn.eps))


def scale_shift(bn: nn.BatchNorm2d, stats: tuple[Tensor, Tensor, Tensor], finalize=None) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` for ``bn`` applied to the conv output ``c`` of ``stats = (c, mean, var)``; ``finalize``: a
    backend's fused batch-statistics finalize (see :func:`batch_scale_shift`), or None."""
    c, mean, var = stats
    if uses_batch_stats(bn):
        return batch_scale_shift(bn, mean, var, c.numel() // max(c.shape[1], 1), c.shape, finalize)
    return running_scale_shift(bn, mean.dtype)
