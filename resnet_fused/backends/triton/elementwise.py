"""Fused per-channel elementwise and reduction kernels of the Triton training path.

The NormConv training scheme (DESIGN.md) keeps only raw conv outputs and per-channel statistics for
backward and recomputes every normalized/activated tensor on the fly. What remains around the convolutions
is elementwise work with per-channel parameters and per-channel reductions; each of those is one pass here:

- ``tail_fwd``: ``out = relu(c*scale + shift + idn)`` or the dual form with a normalized downsample branch
  ``relu(c*scale + shift + cd*sd + td)`` (BN2 + add + ReLU in one read of each operand).
- ``tail_bwd``: the backward of the tail in ONE pass: the ReLU mask is recomputed from the inputs (the
  output is never saved), ``g = dout*mask``, ``dc = g*scale``, ``d(idn) = g`` (``dcd = g*sd``), and the
  per-channel sums ``Σg``, ``Σg·c`` (``Σg·cd``) that give ``dshift``, ``dscale`` (``dtd``, ``dsd``).
- ``affine_relu_fwd``: ``a = relu(x*scale + shift)``, the BN+ReLU prologue of a conv recomputed into a
  temporary for the weight gradient.
- ``affine_relu_bwd``: its backward in ONE pass: ``g = grad_a·[x*scale + shift > 0]``, ``dx = g*scale``,
  ``dscale = Σg·x``, ``dshift = Σg``.
- ``stats_bwd``: the gradient flowing into a conv output through its batch statistics,
  ``dc_total = dc + dmean/M + dvar·2(c − mean)/M`` (M = elements per channel).
- ``bn_train_bwd``: the same with the BatchNorm finalize backward folded in (dmean, dvar and dγ from the
  gradients of scale and shift, per channel in every program), and optionally, in the same launch, the
  ``affine_relu_fwd`` recompute of another tensor (two jobs on one 1-D grid).

Tensors are [N, C, H, W] viewed as ``rows × C`` (rows = N·H·W). channels_last tensors are addressed as a
plain row-major [rows, C] matrix; NCHW tensors through ``(row // HW)·C·HW + ch·HW + row % HW``. All operands
of one call are brought to the memory format of the first tensor argument. Math is fp32; outputs take the
dtype of the tensor they are the value or gradient of; per-channel results are fp32. Reductions write
per-program partials ``[programs, C]`` (written once, never zero-filled); the last program of each channel block
to finish (an arrival counter, :func:`.stats.arrive`) adds them up in row order and stores the per-channel
result itself, so results are deterministic and need no further launch.

Each pass is a registered torch op (``resnet_fused::triton_*``) so ``torch.compile`` traces the training
path without graph breaks; the public functions check their operands and call those ops.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import memory_format
from . import _launch
from .stats import arrive, finalize_bwd_channels, sum_rows

SUM_BLOCK_P = 32  # partial rows per step of the last program's fixed-order sum


@triton.jit
def _tile_offsets(rows, chans, C, HW, CHANNELS_LAST: tl.constexpr):
    """Element offsets of the tile rows × chans of an [N, C, H, W] tensor (rows = n·HW + h·W + w)."""
    rows = rows.to(tl.int64)
    chans = chans.to(tl.int64)
    if CHANNELS_LAST:
        offs = rows[:, None] * C + chans[None, :]
    else:
        offs = ((rows // HW) * C * HW + rows % HW)[:, None] + chans[None, :] * HW
    return offs


@triton.jit
def _channel_block(pid_c, C, BLOCK_C: tl.constexpr):
    """The channel indices of channel program ``pid_c`` and their in-bounds mask."""
    chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return chans, chans < C


@triton.jit
def _per_channel(ptr, chans, cmask):
    """A per-channel fp32 vector as a [1, BLOCK_C] row that broadcasts over a tile."""
    return tl.load(ptr + chans, mask=cmask, other=0.0)[None, :]


@triton.jit
def _row_tile(pid_r, r0, chans, cmask, R, C, HW, ROWS_PER_PROG, CHANNELS_LAST: tl.constexpr,
              BLOCK_R: tl.constexpr):
    """Offsets and mask of the tile at row r0 of row program ``pid_r``'s ROWS_PER_PROG rows × chans."""
    rows = pid_r * ROWS_PER_PROG + r0 + tl.arange(0, BLOCK_R)
    mask = (rows < R)[:, None] & cmask[None, :]
    return _tile_offsets(rows, chans, C, HW, CHANNELS_LAST), mask


@triton.jit
def _store_partial(psum_ptr, pid_r, acc, C, chans, cmask):
    """Row ``pid_r`` of the [row programs, C] fp32 partials ``psum_ptr``: the column sums of ``acc``."""
    tl.store(psum_ptr + pid_r * C + chans, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _store_total(psum_ptr, out_ptr, rows, C, chans, cmask, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[chans] = Σ of the ``rows`` partial rows of ``psum_ptr``, in row order (by the program that arrived
    last at its channel block's counter, :func:`.stats.arrive`, so every partial row is written)."""
    tl.store(out_ptr + chans, sum_rows(psum_ptr, rows, C, chans, cmask, BLOCK_P, BLOCK_C), mask=cmask)


@triton.jit
def _tail_fwd_kernel(
    c_ptr,  # [N, C, H, W] main-branch conv output
    scale_ptr,  # [C] fp32
    shift_ptr,  # [C] fp32
    idn_ptr,  # [N, C, H, W] identity, or the downsample conv output cd when HAS_IDN_AFFINE
    idn_scale_ptr,  # [C] fp32, read when HAS_IDN_AFFINE
    idn_shift_ptr,  # [C] fp32, read when HAS_IDN_AFFINE
    out_ptr,  # [N, C, H, W] output, dtype of c
    R,  # rows = N*H*W
    C,  # channels
    HW,  # H*W (NCHW addressing)
    ROWS_PER_PROG,  # rows handled by one program (multiple of BLOCK_R)
    HAS_IDN_AFFINE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out = relu(c*scale + shift + idn'), idn' = idn*idn_scale + idn_shift if HAS_IDN_AFFINE else idn (fp32)."""
    pid_r = tl.program_id(0)
    chans, cmask = _channel_block(tl.program_id(1), C, BLOCK_C)
    s = _per_channel(scale_ptr, chans, cmask)
    t = _per_channel(shift_ptr, chans, cmask)
    if HAS_IDN_AFFINE:
        sd = _per_channel(idn_scale_ptr, chans, cmask)
        td = _per_channel(idn_shift_ptr, chans, cmask)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        offs, mask = _row_tile(pid_r, r0, chans, cmask, R, C, HW, ROWS_PER_PROG, CHANNELS_LAST, BLOCK_R)
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        idn = tl.load(idn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_IDN_AFFINE:
            idn = idn * sd + td
        z = c * s + t + idn
        out = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tail_bwd_kernel(
    dout_ptr,  # [N, C, H, W] gradient of the tail output
    c_ptr,  # [N, C, H, W] main-branch conv output
    scale_ptr,  # [C] fp32
    shift_ptr,  # [C] fp32
    idn_ptr,  # [N, C, H, W] identity, or cd when HAS_IDN_AFFINE
    idn_scale_ptr,  # [C] fp32, read when HAS_IDN_AFFINE
    idn_shift_ptr,  # [C] fp32, read when HAS_IDN_AFFINE
    dc_ptr,  # [N, C, H, W] out: g*scale, dtype of c
    didn_ptr,  # [N, C, H, W] out: g (or g*idn_scale), dtype of idn
    psum_g_ptr,  # [programs_r, C] fp32 scratch: partial Σg
    psum_gc_ptr,  # [programs_r, C] fp32 scratch: partial Σg·c
    psum_gidn_ptr,  # [programs_r, C] fp32 scratch: partial Σg·cd, written when HAS_IDN_AFFINE
    sum_g_ptr,  # [C] fp32 out: Σg
    sum_gc_ptr,  # [C] fp32 out: Σg·c
    sum_gidn_ptr,  # [C] fp32 out: Σg·cd, written when HAS_IDN_AFFINE
    sum_g_idn_ptr,  # [C] fp32 out: Σg again (the gradient of idn_shift, its own tensor), when HAS_IDN_AFFINE
    counter_ptr,  # [programs_c] int32 arrival counters, zero on entry and on exit
    R,  # rows = N*H*W
    C,  # channels
    HW,  # H*W (NCHW addressing)
    ROWS_PER_PROG,  # rows handled by one program (multiple of BLOCK_R)
    HAS_IDN_AFFINE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Backward of out = relu(c*s + t + idn'), in one pass.

    z = c*s + t + idn' is recomputed, g = dout·[z > 0]; dc = g*s; d(idn) = g, or dcd = g*sd for
    idn' = cd*sd + td; per-channel sums Σg (= dt = dtd), Σg·c (= ds), Σg·cd (= dsd): each program stores its
    partial row, the last of a channel block's row programs adds the rows up in row order.
    """
    pid_r = tl.program_id(0)
    chans, cmask = _channel_block(tl.program_id(1), C, BLOCK_C)
    s = _per_channel(scale_ptr, chans, cmask)
    t = _per_channel(shift_ptr, chans, cmask)
    if HAS_IDN_AFFINE:
        sd = _per_channel(idn_scale_ptr, chans, cmask)
        td = _per_channel(idn_shift_ptr, chans, cmask)
    acc_g = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_gc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_gidn = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        offs, mask = _row_tile(pid_r, r0, chans, cmask, R, C, HW, ROWS_PER_PROG, CHANNELS_LAST, BLOCK_R)
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        idn = tl.load(idn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_IDN_AFFINE:
            z = c * s + t + (idn * sd + td)
        else:
            z = c * s + t + idn
        g = tl.where(z > 0.0, dout, 0.0)
        tl.store(dc_ptr + offs, (g * s).to(dc_ptr.dtype.element_ty), mask=mask)
        if HAS_IDN_AFFINE:
            tl.store(didn_ptr + offs, (g * sd).to(didn_ptr.dtype.element_ty), mask=mask)
            acc_gidn += g * idn
        else:
            tl.store(didn_ptr + offs, g.to(didn_ptr.dtype.element_ty), mask=mask)
        acc_g += g
        acc_gc += g * c
    _store_partial(psum_g_ptr, pid_r, acc_g, C, chans, cmask)
    _store_partial(psum_gc_ptr, pid_r, acc_gc, C, chans, cmask)
    if HAS_IDN_AFFINE:
        _store_partial(psum_gidn_ptr, pid_r, acc_gidn, C, chans, cmask)
    rows_p = tl.num_programs(0)
    if arrive(counter_ptr + tl.program_id(1), rows_p):
        _store_total(psum_g_ptr, sum_g_ptr, rows_p, C, chans, cmask, BLOCK_P, BLOCK_C)
        _store_total(psum_gc_ptr, sum_gc_ptr, rows_p, C, chans, cmask, BLOCK_P, BLOCK_C)
        if HAS_IDN_AFFINE:
            _store_total(psum_gidn_ptr, sum_gidn_ptr, rows_p, C, chans, cmask, BLOCK_P, BLOCK_C)
            _store_total(psum_g_ptr, sum_g_idn_ptr, rows_p, C, chans, cmask, BLOCK_P, BLOCK_C)


@triton.jit
def _affine_relu_rows(pid_r, pid_c, x_ptr, scale_ptr, shift_ptr, a_ptr, R, C, HW, ROWS_PER_PROG,
                      CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """a = relu(x*scale + shift) over the tile of row program ``pid_r`` and channel program ``pid_c``."""
    chans, cmask = _channel_block(pid_c, C, BLOCK_C)
    s = _per_channel(scale_ptr, chans, cmask)
    t = _per_channel(shift_ptr, chans, cmask)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        offs, mask = _row_tile(pid_r, r0, chans, cmask, R, C, HW, ROWS_PER_PROG, CHANNELS_LAST, BLOCK_R)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.maximum(x * s + t, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_relu_fwd_kernel(
    x_ptr,  # [N, C, H, W] input
    scale_ptr,  # [C] fp32
    shift_ptr,  # [C] fp32
    a_ptr,  # [N, C, H, W] out, dtype of x
    R,  # rows = N*H*W
    C,  # channels
    HW,  # H*W (NCHW addressing)
    ROWS_PER_PROG,  # rows handled by one program (multiple of BLOCK_R)
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """a = relu(x*scale + shift), fp32 math, stored in x's dtype."""
    _affine_relu_rows(tl.program_id(0), tl.program_id(1), x_ptr, scale_ptr, shift_ptr, a_ptr, R, C, HW,
                      ROWS_PER_PROG, CHANNELS_LAST, BLOCK_R, BLOCK_C)


@triton.jit
def _affine_relu_bwd_kernel(
    grad_a_ptr,  # [N, C, H, W] gradient of a = relu(x*scale + shift)
    x_ptr,  # [N, C, H, W] input
    scale_ptr,  # [C] fp32
    shift_ptr,  # [C] fp32
    dx_ptr,  # [N, C, H, W] out, dtype of x
    psum_gx_ptr,  # [programs_r, C] fp32 scratch: partial Σg·x
    psum_g_ptr,  # [programs_r, C] fp32 scratch: partial Σg
    sum_gx_ptr,  # [C] fp32 out: Σg·x
    sum_g_ptr,  # [C] fp32 out: Σg
    counter_ptr,  # [programs_c] int32 arrival counters, zero on entry and on exit
    R,  # rows = N*H*W
    C,  # channels
    HW,  # H*W (NCHW addressing)
    ROWS_PER_PROG,  # rows handled by one program (multiple of BLOCK_R)
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """g = grad_a·[x*scale + shift > 0]; dx = g*scale; sums Σg·x (= dscale) and Σg (= dshift), the last row
    program of a channel block adding up the partial rows in row order."""
    pid_r = tl.program_id(0)
    chans, cmask = _channel_block(tl.program_id(1), C, BLOCK_C)
    s = _per_channel(scale_ptr, chans, cmask)
    t = _per_channel(shift_ptr, chans, cmask)
    acc_gx = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        offs, mask = _row_tile(pid_r, r0, chans, cmask, R, C, HW, ROWS_PER_PROG, CHANNELS_LAST, BLOCK_R)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad_a = tl.load(grad_a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(x * s + t > 0.0, grad_a, 0.0)
        tl.store(dx_ptr + offs, (g * s).to(dx_ptr.dtype.element_ty), mask=mask)
        acc_gx += g * x
        acc_g += g
    _store_partial(psum_gx_ptr, pid_r, acc_gx, C, chans, cmask)
    _store_partial(psum_g_ptr, pid_r, acc_g, C, chans, cmask)
    rows_p = tl.num_programs(0)
    if arrive(counter_ptr + tl.program_id(1), rows_p):
        _store_total(psum_gx_ptr, sum_gx_ptr, rows_p, C, chans, cmask, BLOCK_P, BLOCK_C)
        _store_total(psum_g_ptr, sum_g_ptr, rows_p, C, chans, cmask, BLOCK_P, BLOCK_C)


@triton.jit
def _stats_bwd_rows(pid_r, chans, cmask, c_ptr, dc_ptr, out_ptr, mean, dmean, dvar2, R, C, HW, ROWS_PER_PROG,
                    HAS_DC: tl.constexpr, HAS_DMEAN: tl.constexpr, HAS_DVAR: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = dc + dmean + dvar2·(c − mean) over row program ``pid_r``'s rows × chans (mean, dmean = dmean/M
    and dvar2 = dvar·2/M: [1, BLOCK_C] fp32 rows), each term present only when its flag is."""
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        offs, mask = _row_tile(pid_r, r0, chans, cmask, R, C, HW, ROWS_PER_PROG, CHANNELS_LAST, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        if HAS_DC:
            acc += tl.load(dc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DMEAN:
            acc += dmean
        if HAS_DVAR:
            c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc += dvar2 * (c - mean)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stats_bwd_kernel(
    c_ptr,  # [N, C, H, W] conv output whose batch statistics were taken
    mean_ptr,  # [C] fp32 batch mean of c
    dc_ptr,  # [N, C, H, W] gradient of c itself, read when HAS_DC
    dmean_ptr,  # [C] fp32 gradient of mean, read when HAS_DMEAN
    dvar_ptr,  # [C] fp32 gradient of the biased variance, read when HAS_DVAR
    out_ptr,  # [N, C, H, W] out: total gradient of c, dtype of c
    R,  # rows = N*H*W (= M, elements per channel)
    C,  # channels
    HW,  # H*W (NCHW addressing)
    ROWS_PER_PROG,  # rows handled by one program (multiple of BLOCK_R)
    inv_m,  # 1/M
    HAS_DC: tl.constexpr,
    HAS_DMEAN: tl.constexpr,
    HAS_DVAR: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dc_total = dc + dmean/M + dvar·2(c − mean)/M, each term present only when its gradient is."""
    chans, cmask = _channel_block(tl.program_id(1), C, BLOCK_C)
    mean = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    dmean = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    dvar2 = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    if HAS_DMEAN:
        dmean = _per_channel(dmean_ptr, chans, cmask) * inv_m
    if HAS_DVAR:
        mean = _per_channel(mean_ptr, chans, cmask)
        dvar2 = _per_channel(dvar_ptr, chans, cmask) * (2.0 * inv_m)
    _stats_bwd_rows(tl.program_id(0), chans, cmask, c_ptr, dc_ptr, out_ptr, mean, dmean, dvar2, R, C, HW,
                    ROWS_PER_PROG, HAS_DC, HAS_DMEAN, HAS_DVAR, CHANNELS_LAST, BLOCK_R, BLOCK_C)


@triton.jit
def _bn_train_bwd_kernel(
    c_ptr,  # [N, C, H, W] conv output whose batch statistics the BatchNorm used
    mean_ptr,  # [C] fp32 batch mean of c
    var_ptr,  # [C] fp32 biased batch variance of c
    w_ptr,  # [C] fp32 γ, read when AFFINE
    dc_ptr,  # [N, C, H, W] gradient of c itself, read when HAS_DC
    dscale_ptr,  # [C] fp32 gradient of scale, read when HAS_DSCALE
    dshift_ptr,  # [C] fp32 gradient of shift, read when HAS_DSHIFT
    out_ptr,  # [N, C, H, W] out: total gradient of c, dtype of c
    dw_ptr,  # [C] fp32 out: gradient of γ, written when AFFINE
    R,  # rows of c = N*H*W (= M, elements per channel)
    C,  # channels of c
    HW,  # H*W of c (NCHW addressing)
    ROWS_PER_PROG,  # rows of c handled by one program (multiple of BLOCK_R)
    PROGS_R,  # row programs of the BatchNorm job
    BN_PROGRAMS,  # programs of the BatchNorm job (PROGS_R × channel programs; 0 without it): the first ones
    inv_m,  # 1/M
    eps,  # the BatchNorm's ε
    x_ptr,  # [N', C', H', W'] input of the recompute, read when RECOMPUTE
    x_scale_ptr,  # [C'] fp32
    x_shift_ptr,  # [C'] fp32
    a_ptr,  # [N', C', H', W'] out: relu(x*x_scale + x_shift), dtype of x
    XR,  # rows of x
    XC,  # channels of x
    XHW,  # H'*W'
    X_ROWS_PER_PROG,  # rows of x handled by one program (multiple of X_BLOCK_R)
    X_PROGS_R,  # row programs of the recompute job
    HAS_BN: tl.constexpr,
    AFFINE: tl.constexpr,
    HAS_DC: tl.constexpr,
    HAS_DSCALE: tl.constexpr,
    HAS_DSHIFT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    X_CHANNELS_LAST: tl.constexpr,
    X_BLOCK_R: tl.constexpr,
    X_BLOCK_C: tl.constexpr,
):
    """Two jobs on one 1-D grid. Programs [0, BN_PROGRAMS): the backward of a conv output c normalized with its
    batch statistics, the finalize backward folded in — per channel (in every program; the first row program
    of a channel block stores dγ) invstd = 1/√(var + ε), ds' = dscale − mean·dshift, dmean = −γ·invstd·dshift,
    dvar = −½·ds'·γ·invstd³, dγ = ds'·invstd; per element dc_total = dc + dmean/M + dvar·2(c − mean)/M. The
    programs after them: a = relu(x*x_scale + x_shift) over another tensor x. Each job's programs are numbered
    row program first, as a 2-D grid (row programs, channel programs) would be."""
    pid = tl.program_id(0)
    if pid < BN_PROGRAMS:
        if HAS_BN:
            pid_r = pid % PROGS_R
            chans, cmask = _channel_block(pid // PROGS_R, C, BLOCK_C)
            dmean, dvar, dw = finalize_bwd_channels(mean_ptr, var_ptr, w_ptr, dscale_ptr, dshift_ptr, chans, cmask,
                                                    eps, AFFINE, HAS_DSCALE, HAS_DSHIFT, BLOCK_C)
            if AFFINE:
                tl.store(dw_ptr + chans, dw, mask=cmask & (pid_r == 0))
            mean = tl.load(mean_ptr + chans, mask=cmask, other=0.0)
            _stats_bwd_rows(pid_r, chans, cmask, c_ptr, dc_ptr, out_ptr, mean[None, :], (dmean * inv_m)[None, :],
                            (dvar * (2.0 * inv_m))[None, :], R, C, HW, ROWS_PER_PROG, HAS_DC,
                            HAS_DSCALE or HAS_DSHIFT, HAS_DSCALE or HAS_DSHIFT, CHANNELS_LAST, BLOCK_R, BLOCK_C)
    else:
        if RECOMPUTE:
            q = pid - BN_PROGRAMS
            _affine_relu_rows(q % X_PROGS_R, q // X_PROGS_R, x_ptr, x_scale_ptr, x_shift_ptr, a_ptr, XR, XC, XHW,
                              X_ROWS_PER_PROG, X_CHANNELS_LAST, X_BLOCK_R, X_BLOCK_C)


def _dense(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return t.contiguous(memory_format=fmt)


def _like(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return torch.empty_like(t, memory_format=fmt)


def _channel_vec(t: Tensor) -> Tensor:
    return t.new_empty((t.shape[1],), dtype=torch.float32)


def _check_act(name: str, t: Tensor, like: Optional[Tensor] = None) -> None:
    """An activation operand: a floating [N, C, H, W] tensor (same shape/device as ``like`` when given)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device}, expected {like.device}")


def _check_vec(name: str, t: Tensor, like: Tensor) -> None:
    """A per-channel parameter: fp32 [C] on the device of ``like``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    channels = like.shape[1]
    if t.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device}")


def _check_tail(c, scale, shift, idn, idn_scale, idn_shift) -> bool:
    """Validates the operands of the tail; returns whether idn carries its own scale/shift."""
    _check_act("c", c)
    _check_act("idn", idn, c)
    _check_vec("scale", scale, c)
    _check_vec("shift", shift, c)
    if (idn_scale is None) != (idn_shift is None):
        raise ValueError("idn_scale and idn_shift must be given together")
    if idn_scale is None:
        return False
    _check_vec("idn_scale", idn_scale, c)
    _check_vec("idn_shift", idn_shift, c)
    return True


def _check_affine(x, scale, shift) -> None:
    _check_act("x", x)
    _check_vec("scale", scale, x)
    _check_vec("shift", shift, x)


class _Plan(NamedTuple):
    """How a rows × channels pass over one [N, C, H, W] layout is launched."""

    grid: Tuple[int, int]  # (programs along rows, programs along channels)
    sizes: Tuple[int, int, int, int]  # kernel arguments R, C, HW, ROWS_PER_PROG
    meta: dict  # kernel constexprs CHANNELS_LAST, BLOCK_R, BLOCK_C


def _plan(t: Tensor, fmt: torch.memory_format) -> _Plan:
    """Launch plan for a pass over t (in memory format fmt).

    On a GPU a program walks ROWS_PER_PROG rows in BLOCK_R steps so that a few programs per SM carry the
    reduction partials; the interpreter runs each program serially, so there a few big tiles win.
    """
    n, channels, h, w = t.shape
    rows = n * h * w
    block_c = min(triton.next_power_of_2(channels), 128 if _launch.INTERPRET else 64)
    block_r = min(triton.next_power_of_2(max(rows, 1)), (16384 if _launch.INTERPRET else 2048) // block_c)
    target_programs = 4 if _launch.INTERPRET else 1024
    rows_per_prog = max(1, triton.cdiv(triton.cdiv(rows, block_r), target_programs)) * block_r
    return _Plan(
        grid=(triton.cdiv(rows, rows_per_prog), triton.cdiv(channels, block_c)),
        sizes=(rows, channels, h * w, rows_per_prog),
        meta={"CHANNELS_LAST": fmt == torch.channels_last, "BLOCK_R": block_r, "BLOCK_C": block_c},
    )


def _reduction(t: Tensor, plan: _Plan, count: int) -> Tuple[list, list, Optional[Tensor]]:
    """What a pass with ``count`` per-channel sums over t's rows needs besides its tensors: the fp32
    [programs along rows, C] scratch of per-program partial rows (written once: every program stores its row for
    every channel of its block, so no zero fill), the fp32 [C] results (separate tensors: they must not alias
    each other) and one arrival counter per channel program (from the zero-once workspace). An empty t launches
    nothing: zeros, and no counters."""
    channels = t.shape[1]
    if not t.numel():
        zeros = [torch.zeros(channels, dtype=torch.float32, device=t.device) for _ in range(count)]
        return list(zeros), zeros, None
    partials = t.new_empty((count, plan.grid[0], channels), dtype=torch.float32).unbind(0)
    totals = [_channel_vec(t) for _ in range(count)]
    return list(partials), totals, _launch.counters(t, plan.grid[1])


# ------------------------------------------------------------------------------------------------------------
# Registered ops: allocation and launch only (the public functions below check the operands first).
# ------------------------------------------------------------------------------------------------------------


def _tail_fwd_impl(c: Tensor, scale: Tensor, shift: Tensor, idn: Tensor, idn_scale: Optional[Tensor],
                   idn_shift: Optional[Tensor]) -> Tensor:
    dual = idn_scale is not None
    fmt = memory_format(c)
    c, idn = _dense(c, fmt), _dense(idn, fmt)
    out = _like(c, fmt)
    if out.numel():
        plan = _plan(c, fmt)
        _launch.record()
        _launch.wrap(_tail_fwd_kernel)[plan.grid](
            c, scale, shift, idn, idn_scale if dual else scale, idn_shift if dual else shift, out,
            *plan.sizes, HAS_IDN_AFFINE=dual, **plan.meta,
        )
    return out


def _tail_fwd_fake(c, scale, shift, idn, idn_scale, idn_shift):
    return _like(c, memory_format(c))


def _tail_bwd_impl(dout: Tensor, c: Tensor, scale: Tensor, shift: Tensor, idn: Tensor, idn_scale: Optional[Tensor],
                   idn_shift: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dual = idn_scale is not None
    fmt = memory_format(c)
    c, idn, dout = _dense(c, fmt), _dense(idn, fmt), _dense(dout, fmt)
    dc, didn = _like(c, fmt), _like(idn, fmt)
    plan = _plan(c, fmt)
    partials, totals, counters = _reduction(c, plan, 3 if dual else 2)
    # Σg again for idn_shift, written by the kernel (zeros like the other sums when there is nothing to launch)
    sum_g_idn = (_channel_vec(c) if c.numel() else totals[0].clone()) if dual else totals[0].new_empty((0,))
    if not dual:  # not written without idn_scale
        partials.append(partials[1])
        totals.append(totals[1])
    if c.numel():
        _launch.record()
        _launch.wrap(_tail_bwd_kernel)[plan.grid](
            dout, c, scale, shift, idn, idn_scale if dual else scale, idn_shift if dual else shift,
            dc, didn, *partials, *totals, sum_g_idn if dual else totals[0], counters,
            *plan.sizes, HAS_IDN_AFFINE=dual, BLOCK_P=SUM_BLOCK_P, **plan.meta,
        )
    sum_g, sum_gc, sum_gidn = totals
    return dc, didn, sum_gc, sum_g, sum_gidn if dual else sum_g.new_empty((0,)), sum_g_idn


def _tail_bwd_fake(dout, c, scale, shift, idn, idn_scale, idn_shift):
    fmt = memory_format(c)
    dual = idn_scale is not None

    def idn_sum():
        return _channel_vec(c) if dual else c.new_empty((0,), dtype=torch.float32)

    return _like(c, fmt), _like(idn, fmt), _channel_vec(c), _channel_vec(c), idn_sum(), idn_sum()


def _affine_relu_fwd_impl(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    fmt = memory_format(x)
    x = _dense(x, fmt)
    a = _like(x, fmt)
    if a.numel():
        plan = _plan(x, fmt)
        _launch.record()
        _launch.wrap(_affine_relu_fwd_kernel)[plan.grid](x, scale, shift, a, *plan.sizes, **plan.meta)
    return a


def _affine_relu_fwd_fake(x, scale, shift):
    return _like(x, memory_format(x))


def _affine_relu_bwd_impl(grad_a: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    fmt = memory_format(x)
    x, grad_a = _dense(x, fmt), _dense(grad_a, fmt)
    dx = _like(x, fmt)
    plan = _plan(x, fmt)
    partials, totals, counters = _reduction(x, plan, 2)
    if x.numel():
        _launch.record()
        _launch.wrap(_affine_relu_bwd_kernel)[plan.grid](grad_a, x, scale, shift, dx, *partials, *totals, counters,
                                                         *plan.sizes, BLOCK_P=SUM_BLOCK_P, **plan.meta)
    sum_gx, sum_g = totals
    return dx, sum_gx, sum_g


def _affine_relu_bwd_fake(grad_a, x, scale, shift):
    return _like(x, memory_format(x)), _channel_vec(x), _channel_vec(x)


def _stats_bwd_impl(c: Tensor, mean: Tensor, dc: Optional[Tensor], dmean: Optional[Tensor],
                    dvar: Optional[Tensor]) -> Tensor:
    fmt = memory_format(c)
    c = _dense(c, fmt)
    dc = _dense(dc, fmt) if dc is not None else None
    out = _like(c, fmt)
    if out.numel():
        plan = _plan(c, fmt)
        _launch.record()
        _launch.wrap(_stats_bwd_kernel)[plan.grid](
            c, mean, dc if dc is not None else c, dmean if dmean is not None else mean,
            dvar if dvar is not None else mean, out, *plan.sizes, 1.0 / plan.sizes[0],
            HAS_DC=dc is not None, HAS_DMEAN=dmean is not None, HAS_DVAR=dvar is not None, **plan.meta,
        )
    return out


def _stats_bwd_fake(c, mean, dc, dmean, dvar):
    return _like(c, memory_format(c))


def _bn_train_bwd_impl(c: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], eps: float,
                       dc: Optional[Tensor], dscale: Optional[Tensor], dshift: Optional[Tensor], x: Optional[Tensor],
                       x_scale: Optional[Tensor], x_shift: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    bn = dc is not None or dscale is not None or dshift is not None
    dc_total, dweight, a = (mean.new_empty((0,)) for _ in range(3))  # absent outputs
    vec = [v.contiguous() if v is not None else None for v in (mean, var, weight, dscale, dshift, x_scale, x_shift)]
    mean, var, weight, dscale, dshift, x_scale, x_shift = vec
    # out, dw, R, C, HW, ROWS_PER_PROG, PROGS_R, BN_PROGRAMS, inv_m and the constexprs of each job (unused
    # placeholders for an absent one)
    bn_programs, bn_args, bn_meta = 0, (c, mean, 0, 0, 0, 1, 1, 0, 1.0), {"CHANNELS_LAST": False, "BLOCK_R": 1,
                                                                          "BLOCK_C": 1}
    if bn:
        fmt = memory_format(c)
        c = _dense(c, fmt)
        dc = _dense(dc, fmt) if dc is not None else None
        dc_total = _like(c, fmt)
        if weight is not None:
            dweight = _channel_vec(c)
        plan = _plan(c, fmt)
        rows, channels, hw, rows_per_prog = plan.sizes
        progs_r = max(plan.grid[0], 1)  # an empty batch still gets its per-channel terms (dγ)
        bn_programs = progs_r * plan.grid[1]
        bn_args = (dc_total, dweight if weight is not None else mean, rows, channels, hw, rows_per_prog, progs_r,
                   bn_programs, 1.0 / max(rows, 1))
        bn_meta = plan.meta
    x_programs, x_args, x_meta = 0, (c, mean, mean, c, 0, 0, 0, 1, 1), {"X_CHANNELS_LAST": False, "X_BLOCK_R": 1,
                                                                        "X_BLOCK_C": 1}
    if x is not None:
        xfmt = memory_format(x)
        x = _dense(x, xfmt)
        a = _like(x, xfmt)
        xplan = _plan(x, xfmt)
        x_programs = xplan.grid[0] * xplan.grid[1]
        x_args = (x, x_scale, x_shift, a, *xplan.sizes, xplan.grid[0])
        x_meta = {"X_" + k: v for k, v in xplan.meta.items()}
    if bn_programs + x_programs:
        _launch.record()
        _launch.wrap(_bn_train_bwd_kernel)[(bn_programs + x_programs,)](
            c, mean, var, weight if weight is not None else mean, dc if dc is not None else c,
            dscale if dscale is not None else mean, dshift if dshift is not None else mean, *bn_args, float(eps),
            *x_args,
            HAS_BN=bn, AFFINE=weight is not None, HAS_DC=dc is not None, HAS_DSCALE=dscale is not None,
            HAS_DSHIFT=dshift is not None, RECOMPUTE=x is not None and x_programs > 0, **bn_meta, **x_meta,
        )
    return dc_total, dweight, a


def _bn_train_bwd_fake(c, mean, var, weight, eps, dc, dscale, dshift, x, x_scale, x_shift):
    bn = dc is not None or dscale is not None or dshift is not None
    dc_total = _like(c, memory_format(c)) if bn else mean.new_empty((0,))
    dweight = _channel_vec(c) if bn and weight is not None else mean.new_empty((0,))
    a = _like(x, memory_format(x)) if x is not None else mean.new_empty((0,))
    return dc_total, dweight, a


_tail_fwd_op = _launch.register_op("triton_tail_fwd", _tail_fwd_impl, _tail_fwd_fake)
_tail_bwd_op = _launch.register_op("triton_tail_bwd", _tail_bwd_impl, _tail_bwd_fake)
_affine_relu_fwd_op = _launch.register_op("triton_affine_relu_fwd", _affine_relu_fwd_impl, _affine_relu_fwd_fake)
_affine_relu_bwd_op = _launch.register_op("triton_affine_relu_bwd", _affine_relu_bwd_impl, _affine_relu_bwd_fake)
_stats_bwd_op = _launch.register_op("triton_stats_bwd", _stats_bwd_impl, _stats_bwd_fake)
_bn_train_bwd_op = _launch.register_op("triton_bn_train_bwd", _bn_train_bwd_impl, _bn_train_bwd_fake)


# ------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------


def tail_fwd(c, scale, shift, idn, idn_scale=None, idn_shift=None):
    """relu(c*scale + shift + idn) or, with idn_scale/idn_shift, relu(c*scale + shift + idn*idn_scale +
    idn_shift); fp32 math, result in c's dtype and memory format."""
    _check_tail(c, scale, shift, idn, idn_scale, idn_shift)
    return _tail_fwd_op(c, scale, shift, idn, idn_scale, idn_shift)


def tail_bwd(dout, c, scale, shift, idn, idn_scale=None, idn_shift=None):
    """One-pass backward of ``tail_fwd``.

    Returns ``(dc, didn, dscale, dshift, didn_scale, didn_shift)``: dc in c's dtype, didn in idn's dtype (both in
    c's memory format), fp32 [C] sums; ``didn_scale`` and ``didn_shift`` are None without idn_scale;
    ``didn_shift`` equals ``dshift`` in a tensor of its own (the two feed different BatchNorms' gradients).
    """
    dual = _check_tail(c, scale, shift, idn, idn_scale, idn_shift)
    _check_act("dout", dout, c)
    dc, didn, dscale, dshift, didn_scale, didn_shift = _tail_bwd_op(dout, c, scale, shift, idn, idn_scale, idn_shift)
    return dc, didn, dscale, dshift, didn_scale if dual else None, didn_shift if dual else None


def affine_relu_fwd(x, scale, shift):
    """relu(x*scale + shift) per channel, fp32 math, result in x's dtype and memory format."""
    _check_affine(x, scale, shift)
    return _affine_relu_fwd_op(x, scale, shift)


def affine_relu_bwd(grad_a, x, scale, shift):
    """One-pass backward of ``affine_relu_fwd``: returns ``(dx, dscale, dshift)``, dx in x's dtype and
    memory format, dscale/dshift fp32 [C]."""
    _check_affine(x, scale, shift)
    _check_act("grad_a", grad_a, x)
    return _affine_relu_bwd_op(grad_a, x, scale, shift)


def stats_bwd(c, mean, dc=None, dmean=None, dvar=None):
    """Total gradient of a conv output c whose per-channel mean and biased variance were also outputs:
    ``dc + dmean/M + dvar·2(c − mean)/M`` (absent gradients count as zero), in c's dtype and memory
    format. Returns None when all three gradients are None."""
    if dc is None and dmean is None and dvar is None:
        return None
    _check_act("c", c)
    _check_vec("mean", mean, c)
    if dc is not None:
        _check_act("dc", dc, c)
    if dmean is not None:
        _check_vec("dmean", dmean, c)
    if dvar is not None:
        _check_vec("dvar", dvar, c)
    return _stats_bwd_op(c, mean, dc, dmean, dvar)


def bn_train_bwd(c, mean, var, weight, eps, dc=None, dscale=None, dshift=None, recompute=None):
    """Backward of a conv output c normalized by a training BatchNorm (batch statistics), the finalize backward
    folded in, in ONE launch (the forward: mean, var = per-channel batch mean and biased variance of c,
    invstd = 1/√(var + ε), scale = γ·invstd (γ = 1 when ``weight`` is None), shift = β − mean·scale).

    ``dc`` is the gradient of c itself ([N, C, H, W], any float dtype), ``dscale``/``dshift`` those of scale and
    shift (fp32 [C]); each may be None (zero). ``recompute=(x, in_scale, in_shift)`` has the same launch also
    compute ``relu(x*in_scale + in_shift)`` (as :func:`affine_relu_fwd`) for another tensor x of any shape and
    channel count on c's device.

    Returns ``(dc_total, dweight, a)``: ``dc_total = dc + dmean/M + dvar·2(c − mean)/M`` in c's dtype and memory
    format (M = N·H·W, dmean = −scale·dshift, dvar = −½·(dscale − mean·dshift)·γ·invstd³); ``dweight`` = dγ =
    (dscale − mean·dshift)·invstd, fp32 [C]; ``a`` in x's dtype and memory format. ``dc_total`` and ``dweight``
    are None when dc, dscale and dshift all are, ``dweight`` also without ``weight``, ``a`` without
    ``recompute``. dβ = dshift needs no kernel."""
    _check_act("c", c)
    _check_vec("mean", mean, c)
    _check_vec("var", var, c)
    if weight is not None:
        _check_vec("weight", weight, c)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if dc is not None:
        _check_act("dc", dc, c)
    if dscale is not None:
        _check_vec("dscale", dscale, c)
    if dshift is not None:
        _check_vec("dshift", dshift, c)
    x = in_scale = in_shift = None
    if recompute is not None:
        if not isinstance(recompute, (tuple, list)) or len(recompute) != 3:
            raise TypeError("recompute must be None or a tuple (x, in_scale, in_shift)")
        x, in_scale, in_shift = recompute
        _check_act("x", x)
        _check_vec("in_scale", in_scale, x)
        _check_vec("in_shift", in_shift, x)
        if x.device != c.device:
            raise ValueError(f"x is on {x.device}, expected {c.device}")
    dc_total, dweight, a = _bn_train_bwd_op(c, mean, var, weight, float(eps), dc, dscale, dshift, x, in_scale,
                                            in_shift)
    bn = dc is not None or dscale is not None or dshift is not None
    return (dc_total if bn else None, dweight if bn and weight is not None else None,
            a if recompute is not None else None)
