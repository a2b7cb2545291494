"""Per-channel batch statistics of the Triton training path: the merge of a conv's per-tile partials and the
BatchNorm finalize, one launch each.

* ``merge_partial_stats``: the training conv's epilogue (``conv2d_fused(..., stats=True)``) leaves, per row tile
  of the output and per channel, the tile's mean and M2 = Σ (y − mean)²; ONE launch of ``_stats_merge_kernel``
  merges them (Chan et al.'s parallel formula: stable for channels whose mean is far from zero, deterministic,
  no atomics) into the per-channel mean and biased variance.
* ``finalize``: the hook :func:`resnet_fused.norm.batch_scale_shift` calls — ``scale = γ/√(var+ε)``,
  ``shift = β − mean·scale`` and the running-statistics update (unbiased variance, the momentum factor norm.py
  gives, ``momentum=None`` included) in ONE launch of ``_bn_finalize_kernel`` instead of about fourteen tiny
  PyTorch ops. SyncBN's all-reduce and ``num_batches_tracked`` stay in norm.py, which calls this afterwards, as
  it calls the cuda backend's ``finalize``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch

MERGE_BLOCK_P = 128  # partial rows per step of the merge loop
MERGE_BLOCK_C = 16  # channels per merge program: K/16 programs, each streaming every row of its channels
FINALIZE_BLOCK_C = 256  # channels per finalize program


@triton.jit
def arrive(counter_ptr, expected):
    """Whether this program is the last of ``expected`` programs to arrive at the int32 counter ``counter_ptr``
    (each arrives once); the last one resets it to zero for the next launch. Every store this program made
    before arriving is visible to the last one, which reads them with ``cache_modifier=".cg"`` (past the
    non-coherent L1): the barrier orders all of this program's threads' stores before the release of the
    acq_rel atomic, and the last program's acquire orders its reads after every other program's release."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == expected - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def chan_merge(mean_ptr, m2_ptr, row0, rows, unit, M, K, offs_c, c_ok, BLOCK_P: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """``(n, mean, M2)`` per channel ``offs_c`` of rows ``[row0, row0 + rows)`` of the [*, K] fp32 partials
    ``mean_ptr``/``m2_ptr``, row i holding n_i = min(unit, M − i·unit) values, merged in row order (Chan et
    al.'s parallel formula: stable for channels whose mean is far from zero; the same order, so the same bits,
    whichever program merges). For a block B of BLOCK_P rows: n_B = Σ n_i, μ_B = Σ n_i μ_i / n_B,
    M2_B = Σ M2_i + Σ n_i (μ_i − μ_B)²; the running (n, μ, M2) absorbs B by δ = μ_B − μ, μ += δ·n_B/(n + n_B),
    M2 += M2_B + δ²·n·n_B/(n + n_B)."""
    n_run = 0.0
    mean_run = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2_run = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_P):
        i = r0 + tl.arange(0, BLOCK_P)
        r_ok = i < rows
        row = row0 + i
        mask = r_ok[:, None] & c_ok[None, :]
        cnt = tl.where(r_ok, tl.minimum(M - row * unit, unit), 0).to(tl.float32)
        off = row.to(tl.int64)[:, None] * K + offs_c[None, :]
        mu = tl.load(mean_ptr + off, mask=mask, other=0.0, cache_modifier=".cg")
        m2 = tl.load(m2_ptr + off, mask=mask, other=0.0, cache_modifier=".cg")
        n_blk = tl.sum(cnt, axis=0)
        mean_blk = tl.sum(cnt[:, None] * mu, axis=0) / tl.maximum(n_blk, 1.0)
        dev = mu - mean_blk[None, :]
        m2_blk = tl.sum(m2, axis=0) + tl.sum(cnt[:, None] * dev * dev, axis=0)
        n_new = n_run + n_blk
        frac = n_blk / tl.maximum(n_new, 1.0)
        delta = mean_blk - mean_run
        mean_run = mean_run + delta * frac
        m2_run = m2_run + m2_blk + delta * delta * n_run * frac
        n_run = n_new
    return n_run, mean_run, m2_run


@triton.jit
def sum_rows(ptr, rows, C, offs_c, c_ok, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ over rows ``[0, rows)`` of the [rows, C] fp32 partials ``ptr`` for channels ``offs_c``, in a fixed
    order (deterministic whichever program sums), read past L1 (see :func:`arrive`)."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_P):
        row = r0 + tl.arange(0, BLOCK_P)
        mask = (row < rows)[:, None] & c_ok[None, :]
        acc += tl.load(ptr + row.to(tl.int64)[:, None] * C + offs_c[None, :], mask=mask, other=0.0,
                       cache_modifier=".cg")
    return tl.sum(acc, axis=0)


@triton.jit
def finalize_channels(mean, var, k, ok, w_ptr, b_ptr, rmean_ptr, rvar_ptr, scale_ptr, shift_ptr, factor, unbias,
                      eps, AFFINE: tl.constexpr, UPDATE: tl.constexpr):
    """The BatchNorm finalize of channels ``k`` from their batch mean and biased variance (fp32): stores
    scale = γ·(1/√(var + ε)), shift = β − mean·scale; with UPDATE, running_mean ← (1−f)·running_mean + f·mean,
    running_var ← (1−f)·running_var + f·var·unbias, in fp32 and stored in the buffers' dtype."""
    scale = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    if AFFINE:
        scale = scale * tl.load(w_ptr + k, mask=ok, other=0.0).to(tl.float32)
    shift = -mean * scale
    if AFFINE:
        shift = shift + tl.load(b_ptr + k, mask=ok, other=0.0).to(tl.float32)
    tl.store(scale_ptr + k, scale, mask=ok)
    tl.store(shift_ptr + k, shift, mask=ok)
    if UPDATE:
        rm = tl.load(rmean_ptr + k, mask=ok, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + k, mask=ok, other=0.0).to(tl.float32)
        rm = rm * (1.0 - factor) + mean * factor
        rv = rv * (1.0 - factor) + (var * unbias) * factor
        tl.store(rmean_ptr + k, rm.to(rmean_ptr.dtype.element_ty), mask=ok)
        tl.store(rvar_ptr + k, rv.to(rvar_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _stats_merge_kernel(
    rows_ptr,         # [1] int32: the row-tile height (BLOCK_M) of the conv launch that wrote the partials
    mean_ptr,         # [>= cdiv(M, block_m), K] fp32 per-tile means
    m2_ptr,           # [>= cdiv(M, block_m), K] fp32 per-tile sums of squared deviations
    out_mean_ptr,     # [K] fp32 out: per-channel mean
    out_var_ptr,      # [K] fp32 out: per-channel biased variance
    M, K,             # rows of the conv output (N·P·Q), channels
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the tiles' (n_i, μ_i, M2_i) per channel (:func:`chan_merge`), n_i = min(block_m, M − i·block_m).
    Writes μ and M2/n."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < K
    block_m = tl.load(rows_ptr)
    n, mean, m2 = chan_merge(mean_ptr, m2_ptr, 0, tl.cdiv(M, block_m), block_m, M, K, offs_c, c_ok, BLOCK_P,
                             BLOCK_C)
    tl.store(out_mean_ptr + offs_c, mean, mask=c_ok)
    tl.store(out_var_ptr + offs_c, m2 / n, mask=c_ok)


def merge_partial_stats(rows: Tensor, mean: Tensor, m2: Tensor, m: int) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance), fp32 [K], of the ``m`` output rows whose per-tile partials ``mean``
    and ``m2`` (fp32 [>= cdiv(m, block_m), K], contiguous) a conv launch wrote with tile height ``rows[0]``
    (int32); one launch."""
    k = mean.shape[1]
    out_mean = torch.empty(k, device=mean.device, dtype=torch.float32)
    out_var = torch.empty(k, device=mean.device, dtype=torch.float32)
    _launch.wrap(_stats_merge_kernel)[(triton.cdiv(k, MERGE_BLOCK_C),)](
        rows, mean, m2, out_mean, out_var, m, k, BLOCK_P=MERGE_BLOCK_P, BLOCK_C=MERGE_BLOCK_C)
    _launch.record()
    return out_mean, out_var


@triton.jit
def _bn_finalize_kernel(
    mean_ptr,         # [K] fp32 batch mean
    var_ptr,          # [K] fp32 biased batch variance
    w_ptr,            # [K] γ (AFFINE), fp32
    b_ptr,            # [K] β (AFFINE), fp32
    rmean_ptr,        # [K] running mean, updated in place in its own dtype (UPDATE)
    rvar_ptr,         # [K] running variance, updated in place in its own dtype (UPDATE)
    scale_ptr,        # [K] fp32 out: γ/√(var+ε)
    shift_ptr,        # [K] fp32 out: β − mean·scale
    K,
    factor,           # weight of the batch statistics in the running averages (fp32)
    unbias,           # count/(count − 1): biased to unbiased variance (fp32)
    eps,              # the BatchNorm's ε (fp32)
    AFFINE: tl.constexpr, UPDATE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The finalize of :func:`finalize_channels` for BLOCK_C channels."""
    k = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = k < K
    mean = tl.load(mean_ptr + k, mask=ok, other=0.0)
    var = tl.load(var_ptr + k, mask=ok, other=1.0)
    finalize_channels(mean, var, k, ok, w_ptr, b_ptr, rmean_ptr, rvar_ptr, scale_ptr, shift_ptr, factor, unbias, eps,
                      AFFINE, UPDATE)


@triton.jit
def finalize_bwd_channels(mean_ptr, var_ptr, w_ptr, dscale_ptr, dshift_ptr, k, ok, eps, AFFINE: tl.constexpr,
                          HAS_DSCALE: tl.constexpr, HAS_DSHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(dmean, dvar, dγ)`` of channels ``k`` for the finalize scale = γ·invstd, shift = β − mean·scale,
    invstd = 1/√(var + ε), from the gradients of scale and shift (zero where absent): with
    ds' = dscale − mean·dshift, dmean = −γ·invstd·dshift, dvar = −½·ds'·γ·invstd³, dγ = ds'·invstd."""
    mean = tl.load(mean_ptr + k, mask=ok, other=0.0)
    var = tl.load(var_ptr + k, mask=ok, other=1.0)
    invstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    gamma = tl.full((BLOCK_C,), 1.0, tl.float32)
    if AFFINE:
        gamma = tl.load(w_ptr + k, mask=ok, other=0.0)
    ds = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_DSCALE:
        ds = tl.load(dscale_ptr + k, mask=ok, other=0.0)
    dt = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_DSHIFT:
        dt = tl.load(dshift_ptr + k, mask=ok, other=0.0)
    ds = ds - mean * dt
    return -(gamma * invstd) * dt, ds * gamma * (-0.5) * invstd * invstd * invstd, ds * invstd


@triton.jit
def _bn_finalize_bwd_kernel(
    mean_ptr,         # [K] fp32 batch mean
    var_ptr,          # [K] fp32 biased batch variance
    w_ptr,            # [K] fp32 γ (AFFINE)
    dscale_ptr,       # [K] fp32 gradient of scale (HAS_DSCALE)
    dshift_ptr,       # [K] fp32 gradient of shift (HAS_DSHIFT)
    dmean_ptr,        # [K] fp32 out: gradient of mean
    dvar_ptr,         # [K] fp32 out: gradient of var
    dw_ptr,           # [K] fp32 out: gradient of γ (AFFINE)
    K, eps,
    AFFINE: tl.constexpr, HAS_DSCALE: tl.constexpr, HAS_DSHIFT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward of scale = γ·invstd, shift = β − mean·scale, invstd = 1/√(var + ε): with
    ds' = dscale − mean·dshift, dγ = ds'·invstd, dmean = −scale·dshift, dvar = −½·ds'·γ·invstd³ (dβ = dshift)."""
    k = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = k < K
    dmean, dvar, dw = finalize_bwd_channels(mean_ptr, var_ptr, w_ptr, dscale_ptr, dshift_ptr, k, ok, eps, AFFINE,
                                            HAS_DSCALE, HAS_DSHIFT, BLOCK_C)
    tl.store(dmean_ptr + k, dmean, mask=ok)
    tl.store(dvar_ptr + k, dvar, mask=ok)
    if AFFINE:
        tl.store(dw_ptr + k, dw, mask=ok)


def _finalize_bwd_impl(mean: Tensor, var: Tensor, weight: Optional[Tensor], dscale: Optional[Tensor],
                       dshift: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    k = mean.shape[0]
    dmean, dvar = torch.empty_like(mean), torch.empty_like(mean)
    dweight = torch.empty_like(mean) if weight is not None else mean.new_empty(0)
    if k:
        _launch.wrap(_bn_finalize_bwd_kernel)[(triton.cdiv(k, FINALIZE_BLOCK_C),)](
            mean, var, weight if weight is not None else mean, dscale if dscale is not None else mean,
            dshift if dshift is not None else mean, dmean, dvar, dweight if weight is not None else dmean, k,
            float(eps), AFFINE=weight is not None, HAS_DSCALE=dscale is not None, HAS_DSHIFT=dshift is not None,
            BLOCK_C=FINALIZE_BLOCK_C)
        _launch.record()
    return dmean, dvar, dweight


def _finalize_bwd_fake(mean, var, weight, dscale, dshift, eps):
    return torch.empty_like(mean), torch.empty_like(mean), mean.new_empty(mean.shape if weight is not None else 0)


def _finalize_impl(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], count: int, momentum_factor: float,
                   eps: float) -> Tuple[Tensor, Tensor]:
    k = mean.shape[0]
    scale = torch.empty_like(mean)
    shift = torch.empty_like(mean)
    if k == 0:
        return scale, shift
    update = running_mean is not None
    unbias = count / (count - 1) if count > 1 else float("inf")
    _launch.wrap(_bn_finalize_kernel)[(triton.cdiv(k, FINALIZE_BLOCK_C),)](
        mean, var, weight if weight is not None else mean, bias if bias is not None else mean,
        running_mean if update else mean, running_var if update else var, scale, shift,
        k, float(momentum_factor), float(unbias), float(eps),
        AFFINE=weight is not None, UPDATE=update, BLOCK_C=FINALIZE_BLOCK_C)
    _launch.record()
    return scale, shift


def _finalize_fake(mean, var, weight, bias, running_mean, running_var, count, momentum_factor, eps):
    return torch.empty_like(mean), torch.empty_like(mean)


_finalize_op = _launch.register_op("triton_bn_finalize", _finalize_impl, _finalize_fake,
                                   mutates_args=("running_mean", "running_var"))
_finalize_bwd_op = _launch.register_op("triton_bn_finalize_bwd", _finalize_bwd_impl, _finalize_bwd_fake)


class _BnFinalize(torch.autograd.Function):
    """``(scale, shift)`` of the batch statistics, the running statistics updated as a side effect; backward is
    one launch of ``_bn_finalize_bwd_kernel`` (dβ = dshift needs none)."""

    @staticmethod
    def forward(ctx, mean, var, weight, bias, running_mean, running_var, count, momentum_factor, eps):
        scale, shift = _finalize_op(mean, var, weight, bias, running_mean, running_var, count, momentum_factor, eps)
        ctx.eps = eps
        ctx.save_for_backward(mean, var, weight)
        ctx.set_materialize_grads(False)
        return scale, shift

    @staticmethod
    def backward(ctx, dscale, dshift):
        mean, var, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dscale is None and dshift is None:
            return (None,) * 9
        dscale = dscale.contiguous() if dscale is not None else None
        dshift = dshift.contiguous() if dshift is not None else None
        dmean, dvar, dweight = _finalize_bwd_op(mean, var, weight, dscale, dshift, ctx.eps)
        return (dmean if need[0] else None, dvar if need[1] else None, dweight if need[2] else None,
                dshift if need[3] else None, None, None, None, None, None)


def finalize(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor], count: int, momentum_factor: float,
             eps: float) -> Tuple[Tensor, Tensor]:
    """BN finalize hook of :func:`resnet_fused.norm.batch_scale_shift` (the cuda backend's signature):
    ``(scale, shift)`` in fp32 from the batch mean and biased variance (fp32 [K]), updating ``running_mean`` /
    ``running_var`` in place (any float dtype) with ``momentum_factor`` when they are given; one launch.
    Differentiable in mean, var, weight and bias."""
    for name, t in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or t.shape != mean.shape or t.device != mean.device):
            raise ValueError(f"finalize: {name} must be float32 of shape {tuple(mean.shape)} on {mean.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if (weight is None) != (bias is None) or (running_mean is None) != (running_var is None):
        raise ValueError("finalize: weight and bias, running_mean and running_var are given together")
    if running_mean is not None:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t.shape != mean.shape or t.device != mean.device or not t.is_contiguous():
                raise ValueError(f"finalize: {name} must be a contiguous vector like mean, got {tuple(t.shape)}")
    return _BnFinalize.apply(mean.contiguous(), var.contiguous(), weight, bias, running_mean, running_var, int(count),
                             float(momentum_factor), float(eps))
