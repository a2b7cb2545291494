"""Fused implicit-GEMM convolution for the Triton backend.

One kernel computes a whole residual-block convolution with everything around it fused, so that a ResNet block
costs one launch per convolution in inference and no extra elementwise/reduction passes in training:

* prologue (``IN_AFFINE_RELU``): the previous layer's BN+ReLU, ``relu(x*in_scale[c] + in_shift[c])``, applied
  to every loaded input element in registers — the activated tensor never exists in memory;
* main loop: implicit GEMM over NHWC activations, ``M = N·P·Q`` output pixels × ``K`` output channels with
  reduction ``R·S·C`` (channels innermost, so loads are contiguous along C), fp32 accumulation;
* ``HAS_SHORTCUT``: a second reduction, over the ``C_s`` channels of a strided 1x1 shortcut convolution, in the
  same launch into a second accumulator (the two branches carry different BN scales), so
  ``relu(bn3(conv3(h)) + bn_d(conv_d(x)))`` is a single launch;
* epilogue: with ``HAS_BN``, the eval BatchNorm ``acc·s[k] + t[k]`` (and ``acc_d·s_d[k] + t_d[k]`` for the
  shortcut) with ``s = γ/√(σ²+ε)``, ``t = β − μ·s`` computed in fp32 from the BN's live tensors in every tile (no
  folded weights, nothing cached: an edit of any of them is seen by the next launch), ``+ residual``, ReLU,
  store in the input dtype and, with ``STATS``, per-tile
  count/mean/M2 partial statistics of the stored output, merged with Chan's parallel formula by
  ``_stats_merge_kernel`` into the per-channel mean and biased variance (numerically stable, deterministic,
  no atomics).

Grouped convolutions run as ``groups`` independent GEMMs in one launch; dilation is a stride on the filter
taps. ``conv2d_fused`` is the checked launcher of the op ``resnet_fused::triton_conv2d_fused``, registered with
``torch.library.triton_op`` so ``torch.compile`` traces into the kernels (as an opaque custom op with a fake
kernel under the interpreter). One call is one conv launch, plus two tiny merge launches with ``stats``
(more only for very large N·P·Q), all counted by :mod:`._launch`.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import EvalBN, check_eval_bn, memory_format
from . import _launch

INTERPRET = _launch.INTERPRET

# Rows of output pixels per statistics slot: every BLOCK_M is a multiple of it, so the size of the partial
# statistics buffers does not depend on the tile the autotuner picks.
STATS_ROWS = 32

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _configs() -> list[triton.Config]:
    """Tile configurations. Hopper-fit tiles on a GPU (BLOCK_M=128, BLOCK_N=64..128, BLOCK_K=64, 3 stages,
    8 warps measured best on ResNet shapes, plus smaller ones for narrow/grouped layers); a single large tile
    under the interpreter, where autotuning would take far too long and the cost is per tile operation, not
    per element (a 64-channel 3x3 conv runs ~25x faster with 128x64x64 than with 64x16x16 tiles)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8})]

    def cfg(bm, bn, bk, stages, warps):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                             num_stages=stages, num_warps=warps)

    if os.environ.get("RESNET_FUSED_AUTOTUNE", "1") == "0":  # one compile per shape: quick correctness runs
        return [cfg(128, 64, 64, 3, 8)]
    return [
        cfg(128, 128, 64, 3, 8),
        cfg(128, 64, 64, 3, 8),
        cfg(128, 64, 64, 4, 4),
        cfg(128, 128, 32, 4, 8),
        cfg(64, 128, 64, 3, 4),
        cfg(64, 64, 64, 4, 4),
        cfg(64, 64, 32, 4, 4),
        cfg(64, 32, 32, 4, 4),
    ]


@triton.jit
def _bn_scale_shift(w_ptr, b_ptr, mean_ptr, var_ptr, eps, k, k_ok, AFFINE: tl.constexpr):
    """Per-channel ``(s, t)`` of an eval BatchNorm for channels ``k``, in fp32 from its live tensors (any float
    dtype): ``s = γ/√(σ²+ε)`` (γ = 1 without AFFINE), ``t = β − μ·s`` (β = 0), correctly rounded sqrt and
    division as PyTorch's eager BatchNorm."""
    var = tl.load(var_ptr + k, mask=k_ok, other=1.0).to(tl.float32)
    mean = tl.load(mean_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    scale = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    if AFFINE:
        scale = tl.load(w_ptr + k, mask=k_ok, other=0.0).to(tl.float32) * scale
    shift = -mean * scale
    if AFFINE:
        shift = shift + tl.load(b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def _mma(a, b, acc, TRANSPOSED: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc += a·b ([BLOCK_M, BLOCK_K]·[BLOCK_K, BLOCK_N]), or acc += bᵀ·aᵀ into a transposed accumulator
    [BLOCK_N, BLOCK_M] when TRANSPOSED. The transposed form is used when ``a`` was computed in registers (the
    BN+ReLU prologue): as wgmma's A operand it would have to come from registers, which serializes the
    asynchronous MMAs on Hopper; as the B operand it is staged through shared memory."""
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if TRANSPOSED:
        acc = tl.dot(tl.trans(b), tl.trans(a), acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


# Tuned per problem shape and per feature set (the prologue and statistics change register and shared-memory
# use, so a tile that fits without them need not fit with them); triton adds the tensor dtypes to the key.
@triton.autotune(configs=_configs(), key=["M_BUCKET", "K", "C", "CS", "R", "S", "STRIDE_H", "STRIDE_W", "GROUPS",
                                          "HAS_RESIDUAL", "HAS_SHORTCUT", "IN_AFFINE_RELU", "STATS"])
@triton.jit
def _conv_fwd_kernel(
    x_ptr,            # input activations [N, C, H, W], any strides (NHWC-contiguous is the fast case)
    w_ptr,            # weight [K, C/GROUPS, R, S], any strides (channel stride 1 is the fast case)
    bn_w_ptr,         # eval BN of the output: weight γ [K] (HAS_BN and BN_AFFINE), any float dtype
    bn_b_ptr,         # ... bias β [K] (HAS_BN and BN_AFFINE)
    bn_mean_ptr,      # ... running mean μ [K] (HAS_BN)
    bn_var_ptr,       # ... running variance σ² [K] (HAS_BN)
    res_ptr,          # residual [N, K, P, Q] (HAS_RESIDUAL)
    sx_ptr,           # shortcut input [N, CS, HS, WS] (HAS_SHORTCUT)
    sw_ptr,           # shortcut 1x1 weight [K, CS, 1, 1] (HAS_SHORTCUT)
    sbn_w_ptr,        # the shortcut's eval BN: γ_d [K] (HAS_SHORTCUT and SBN_AFFINE)
    sbn_b_ptr,        # ... β_d [K] (HAS_SHORTCUT and SBN_AFFINE)
    sbn_mean_ptr,     # ... μ_d [K] (HAS_SHORTCUT)
    sbn_var_ptr,      # ... σ²_d [K] (HAS_SHORTCUT)
    scale_ptr,        # prologue scale [C], fp32 (IN_AFFINE_RELU)
    shift_ptr,        # prologue shift [C], fp32 (IN_AFFINE_RELU)
    y_ptr,            # output [N, K, P, Q], dtype of x
    part_cnt_ptr,     # [cdiv(M, STATS_ROWS)] fp32 rows per statistics slot (STATS)
    part_mean_ptr,    # [cdiv(M, STATS_ROWS), K] fp32 per-slot channel means (STATS)
    part_m2_ptr,      # [cdiv(M, STATS_ROWS), K] fp32 per-slot sums of squared deviations (STATS)
    N, C, H, W, K, P, Q, CS, HS, WS,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_rn, stride_rc, stride_rh, stride_rw,
    stride_sxn, stride_sxc, stride_sxh, stride_sxw,
    stride_swk, stride_swc,
    stride_yn, stride_yc, stride_yh, stride_yw,
    bn_eps, sbn_eps,  # the two BNs' ε (fp32)
    M_BUCKET,         # next power of two of N*P*Q: autotune key only
    R: tl.constexpr, S: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    GROUPS: tl.constexpr, SC_STRIDE: tl.constexpr,
    HAS_BN: tl.constexpr, BN_AFFINE: tl.constexpr, SBN_AFFINE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_SHORTCUT: tl.constexpr, RELU: tl.constexpr,
    IN_AFFINE_RELU: tl.constexpr, STATS: tl.constexpr, STATS_ROWS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[m, k] = act(bn(Σ_{r,s,c} a[n, c, p·sh − ph + r·dh, q·sw − pw + s·dw] · w[k, c, r, s])
                     + bn_d(Σ_{c'} sx[n, c', p·ss, q·ss] · sw[k, c']) + res[m, k])

    with bn(v) = v·s[k] + t[k] (HAS_BN; identity otherwise), s and t of the eval BatchNorm computed from its
    tensors here (see _bn_scale_shift), m = (n, p, q), a = relu(x·in_scale[c] + in_shift[c]) (IN_AFFINE_RELU) or
    x, a = 0 at padding
    positions, act = relu (RELU) or identity, and the reduction restricted to the input channels of k's group.
    DOT_IN_FP32 upcasts the operands before tl.dot (exact for bf16 products); it is set only under the
    interpreter, whose tl.dot multiplies the raw bit patterns of bfloat16 operands (triton issue #11584).
    STATS: each BLOCK_M row tile writes, per channel, its row count n_t, mean μ_t and M2_t = Σ (y − μ_t)² of
    the stored y (in slot pid_m·BLOCK_M/STATS_ROWS; the tile's other slots get n = μ = M2 = 0).
    """
    pid = tl.program_id(0)
    M = N * P * Q
    C_G = C // GROUPS
    K_G = K // GROUPS
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K_G, BLOCK_N)
    pids_per_group = num_pid_m * num_pid_n
    g = pid // pids_per_group
    pid_in = pid % pids_per_group
    # Grouped ordering: GROUP_M row tiles share their weight columns while they are hot in L2.
    pids_per_band = GROUP_M * num_pid_n
    first_m = (pid_in // pids_per_band) * GROUP_M
    band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid_in % pids_per_band) % band_m
    pid_n = (pid_in % pids_per_band) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n_img = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    offs_kg = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_kg < K_G
    k = g * K_G + offs_kg
    offs_c = tl.arange(0, BLOCK_K)

    x_row = n_img.to(tl.int64) * stride_xn
    h0 = p * STRIDE_H - PAD_H
    w0 = q * STRIDE_W - PAD_W
    num_cb = tl.cdiv(C_G, BLOCK_K)
    if IN_AFFINE_RELU:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (r, s, channel block) so the compiler can software-pipeline it even when C fits
    # in a single block.
    for it in range(0, R * S * num_cb):
        rs = it // num_cb
        cb = it - rs * num_cb
        r = rs // S
        s = rs - r * S
        h = h0 + r * DIL_H
        w = w0 + s * DIL_W
        pix_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        c = cb * BLOCK_K + offs_c
        c_ok = c < C_G
        a_mask = pix_ok[:, None] & c_ok[None, :]
        a_ptrs = x_ptr + (x_row + h * stride_xh + w * stride_xw)[:, None] + ((g * C_G + c) * stride_xc)[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if IN_AFFINE_RELU:
            sc = tl.load(scale_ptr + g * C_G + c, mask=c_ok, other=0.0)
            sh = tl.load(shift_ptr + g * C_G + c, mask=c_ok, other=0.0)
            act = tl.maximum(a.to(tl.float32) * sc[None, :] + sh[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
            a = tl.where(a_mask, act, 0.0).to(x_ptr.dtype.element_ty)
        b_ptrs = w_ptr + (k * stride_wk)[None, :] + (c * stride_wc)[:, None] + r * stride_wr + s * stride_ws
        b = tl.load(b_ptrs, mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, IN_AFFINE_RELU, DOT_IN_FP32, INPUT_PRECISION)

    if IN_AFFINE_RELU:
        acc = tl.trans(acc)
    if HAS_BN:
        scale, shift = _bn_scale_shift(bn_w_ptr, bn_b_ptr, bn_mean_ptr, bn_var_ptr, bn_eps, k, k_ok, BN_AFFINE)
        acc = acc * scale[None, :] + shift[None, :]
    if HAS_SHORTCUT:
        # The shortcut's own accumulator (its BN scale differs from the main branch's; the launcher never
        # combines it with the prologue).
        acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sx_row = n_img.to(tl.int64) * stride_sxn + (p * SC_STRIDE) * stride_sxh + (q * SC_STRIDE) * stride_sxw
        for c0 in range(0, CS, BLOCK_K):
            c = c0 + offs_c
            c_ok = c < CS
            a = tl.load(sx_ptr + sx_row[:, None] + (c * stride_sxc)[None, :],
                        mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(sw_ptr + (k * stride_swk)[None, :] + (c * stride_swc)[:, None],
                        mask=c_ok[:, None] & k_ok[None, :], other=0.0)
            acc_d = _mma(a, b, acc_d, False, DOT_IN_FP32, INPUT_PRECISION)
        scale_d, shift_d = _bn_scale_shift(sbn_w_ptr, sbn_b_ptr, sbn_mean_ptr, sbn_var_ptr, sbn_eps, k, k_ok,
                                           SBN_AFFINE)
        acc += acc_d * scale_d[None, :] + shift_d[None, :]

    out_mask = m_ok[:, None] & k_ok[None, :]
    if HAS_RESIDUAL:
        r_ptrs = (res_ptr + (n_img.to(tl.int64) * stride_rn + p * stride_rh + q * stride_rw)[:, None]
                  + (k * stride_rc)[None, :])
        acc += tl.load(r_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    out = acc.to(y_ptr.dtype.element_ty)
    y_ptrs = (y_ptr + (n_img.to(tl.int64) * stride_yn + p * stride_yh + q * stride_yw)[:, None]
              + (k * stride_yc)[None, :])
    tl.store(y_ptrs, out, mask=out_mask)

    if STATS:
        v = tl.where(out_mask, out.to(tl.float32), 0.0)
        cnt = tl.sum(m_ok.to(tl.float32), axis=0)
        mean = tl.sum(v, axis=0) / cnt
        d = tl.where(out_mask, v - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        sub = tl.arange(0, BLOCK_M // STATS_ROWS)
        slot = pid_m * (BLOCK_M // STATS_ROWS) + sub
        slot_ok = slot < tl.cdiv(M, STATS_ROWS)
        first = sub == 0
        tl.store(part_cnt_ptr + slot, tl.where(first, cnt, 0.0), mask=slot_ok)
        part_off = slot[:, None] * K + k[None, :]
        part_mask = slot_ok[:, None] & k_ok[None, :]
        tl.store(part_mean_ptr + part_off, tl.where(first[:, None], mean[None, :], 0.0), mask=part_mask)
        tl.store(part_m2_ptr + part_off, tl.where(first[:, None], m2[None, :], 0.0), mask=part_mask)


@triton.jit
def _stats_merge_kernel(
    cnt_ptr,          # [ROWS] fp32 counts of the input partials (shared by all channels)
    mean_ptr,         # [ROWS, K] fp32 partial means
    m2_ptr,           # [ROWS, K] fp32 partial sums of squared deviations
    out_cnt_ptr,      # [cdiv(ROWS, rows_per_prog)] fp32 merged counts (not FINAL)
    out_mean_ptr,     # [cdiv(ROWS, rows_per_prog), K] merged means; [K] means when FINAL
    out_m2_ptr,       # [cdiv(ROWS, rows_per_prog), K] merged M2 (not FINAL); [K] biased variances when FINAL
    ROWS, K, rows_per_prog,
    FINAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the partial statistics rows [j·rows_per_prog, (j+1)·rows_per_prog) into one (Chan et al.):
    for a block B of rows, n_B = Σ n_i, μ_B = Σ n_i μ_i / n_B, M2_B = Σ M2_i + Σ n_i (μ_i − μ_B)²; then the
    running (n, μ, M2) absorbs B by δ = μ_B − μ, μ += δ·n_B/(n + n_B), M2 += M2_B + δ²·n·n_B/(n + n_B).
    FINAL writes mean μ and biased variance M2/n per channel instead of a merged row."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < K
    row0 = pid_r * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, ROWS)
    n_run = 0.0
    mean_run = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2_run = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(row0, row_end, BLOCK_P):
        rows = r0 + tl.arange(0, BLOCK_P)
        r_ok = rows < row_end
        mask = r_ok[:, None] & c_ok[None, :]
        cnt = tl.load(cnt_ptr + rows, mask=r_ok, other=0.0)
        mu = tl.load(mean_ptr + rows[:, None] * K + offs_c[None, :], mask=mask, other=0.0)
        m2 = tl.load(m2_ptr + rows[:, None] * K + offs_c[None, :], mask=mask, other=0.0)
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
    if FINAL:
        tl.store(out_mean_ptr + offs_c, mean_run, mask=c_ok)
        tl.store(out_m2_ptr + offs_c, m2_run / n_run, mask=c_ok)
    else:
        tl.store(out_cnt_ptr + pid_r, n_run)
        tl.store(out_mean_ptr + pid_r * K + offs_c, mean_run, mask=c_ok)
        tl.store(out_m2_ptr + pid_r * K + offs_c, m2_run, mask=c_ok)


MERGE_BLOCK_P = 64
MERGE_BLOCK_C = 32


def merge_partial_stats(cnt: Tensor, mean: Tensor, m2: Tensor, rows_per_prog: int = 8 * MERGE_BLOCK_P
                        ) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) from partial statistics ``cnt[ROWS]``, ``mean/m2[ROWS, K]``
    (fp32, contiguous). Many rows are first merged in parallel chunks of ``rows_per_prog``, then once more
    into the result; each stage is one launch of ``_stats_merge_kernel``."""
    rows, k = mean.shape
    grid_c = triton.cdiv(k, MERGE_BLOCK_C)
    while rows > rows_per_prog:
        chunks = triton.cdiv(rows, rows_per_prog)
        n_cnt = torch.empty(chunks, device=mean.device, dtype=torch.float32)
        n_mean = torch.empty(chunks, k, device=mean.device, dtype=torch.float32)
        n_m2 = torch.empty(chunks, k, device=mean.device, dtype=torch.float32)
        _launch.wrap(_stats_merge_kernel)[(grid_c, chunks)](
            cnt, mean, m2, n_cnt, n_mean, n_m2, rows, k, rows_per_prog,
            FINAL=False, BLOCK_P=MERGE_BLOCK_P, BLOCK_C=MERGE_BLOCK_C)
        _launch.record()
        cnt, mean, m2, rows = n_cnt, n_mean, n_m2, chunks
    out_mean = torch.empty(k, device=mean.device, dtype=torch.float32)
    out_var = torch.empty(k, device=mean.device, dtype=torch.float32)
    _launch.wrap(_stats_merge_kernel)[(grid_c, 1)](
        cnt, mean, m2, cnt, out_mean, out_var, rows, k, max(rows, 1),
        FINAL=True, BLOCK_P=MERGE_BLOCK_P, BLOCK_C=MERGE_BLOCK_C)
    _launch.record()
    return out_mean, out_var


def _pair(v, name: str) -> List[int]:
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) for e in v):
        return [int(v[0]), int(v[1])]
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: tf32 for fp32 inputs only when cuDNN convolutions may use it, else exact IEEE."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def _output_hw(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int]
               ) -> Tuple[int, int]:
    """The convolution's output height and width (P, Q)."""
    _, _, h, w = x.shape
    _, _, r, s = weight.shape
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def _output(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int]) -> Tensor:
    """Uninitialised output [N, K, P, Q] in x's dtype and memory format."""
    n, k = x.shape[0], weight.shape[0]
    p, q = _output_hw(x, weight, stride, padding, dilation)
    return torch.empty((n, k, p, q), device=x.device, dtype=x.dtype, memory_format=memory_format(x))


def _conv2d_fused_impl(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                       bn_mean: Optional[Tensor], bn_var: Optional[Tensor], bn_eps: float, stride: List[int],
                       padding: List[int], dilation: List[int], groups: int, residual: Optional[Tensor],
                       shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor],
                       sbn_weight: Optional[Tensor], sbn_bias: Optional[Tensor], sbn_mean: Optional[Tensor],
                       sbn_var: Optional[Tensor], sbn_eps: float, shortcut_stride: int, relu: bool,
                       in_scale: Optional[Tensor], in_shift: Optional[Tensor], stats: bool
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """Allocate and launch (inputs already checked by :func:`conv2d_fused`); returns (y, mean, var) with
    empty mean/var when ``stats`` is False."""
    y = _output(x, weight, stride, padding, dilation)
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    p, q = y.shape[2], y.shape[3]
    m = n * p * q
    if m == 0 or k == 0:
        nan = torch.full((k if stats else 0,), float("nan"), device=x.device, dtype=torch.float32)
        return y, nan, nan.clone()
    xc = x.contiguous(memory_format=torch.channels_last)
    wc = weight.contiguous(memory_format=torch.channels_last)
    f32 = dict(device=x.device, dtype=torch.float32)
    slots = triton.cdiv(m, STATS_ROWS) if stats else 1
    part_cnt = torch.empty(slots, **f32)
    part_mean = torch.empty(slots, k if stats else 1, **f32)
    part_m2 = torch.empty_like(part_mean)
    has_sc = shortcut_x is not None
    sx = shortcut_x.contiguous(memory_format=torch.channels_last) if has_sc else xc
    sw = shortcut_weight.contiguous(memory_format=torch.channels_last) if has_sc else wc
    # Absent operands are stood in for by read-only inputs the kernel never dereferences (never by an
    # output, which would make the kernel look like it aliased a mutated buffer when traced).
    res = residual if residual is not None else xc

    def present(t: Optional[Tensor]) -> Tensor:
        return t if t is not None else wc

    cs, hs, ws = (sx.shape[1], sx.shape[2], sx.shape[3]) if has_sc else (0, 0, 0)
    k_g = k // groups

    def grid(meta):
        return (groups * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k_g, meta["BLOCK_N"]),)

    _launch.wrap(_conv_fwd_kernel)[grid](
        xc, wc, present(bn_weight), present(bn_bias), present(bn_mean), present(bn_var), res, sx, sw,
        present(sbn_weight), present(sbn_bias), present(sbn_mean), present(sbn_var),
        present(in_scale), present(in_shift),
        y, part_cnt, part_mean, part_m2,
        n, c, h, w, k, p, q, cs, hs, ws,
        xc.stride(0), xc.stride(1), xc.stride(2), xc.stride(3),
        wc.stride(0), wc.stride(1), wc.stride(2), wc.stride(3),
        res.stride(0), res.stride(1), res.stride(2), res.stride(3),
        sx.stride(0), sx.stride(1), sx.stride(2), sx.stride(3),
        sw.stride(0), sw.stride(1),
        y.stride(0), y.stride(1), y.stride(2), y.stride(3),
        float(bn_eps), float(sbn_eps),
        triton.next_power_of_2(m),
        R=r, S=s, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1], GROUPS=groups, SC_STRIDE=shortcut_stride,
        HAS_BN=bn_mean is not None, BN_AFFINE=bn_weight is not None, SBN_AFFINE=sbn_weight is not None,
        HAS_RESIDUAL=residual is not None, HAS_SHORTCUT=has_sc, RELU=relu,
        IN_AFFINE_RELU=in_scale is not None, STATS=stats, STATS_ROWS=STATS_ROWS,
        INPUT_PRECISION=_input_precision(x.dtype), DOT_IN_FP32=INTERPRET and x.dtype == torch.bfloat16,
    )
    _launch.record()
    if not stats:
        empty = torch.empty(0, **f32)
        return y, empty, empty.clone()
    mean, var = merge_partial_stats(part_cnt, part_mean, part_m2)
    return y, mean, var


def _conv2d_fused_fake(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                       bn_mean: Optional[Tensor], bn_var: Optional[Tensor], bn_eps: float, stride: List[int],
                       padding: List[int], dilation: List[int], groups: int, residual: Optional[Tensor],
                       shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor],
                       sbn_weight: Optional[Tensor], sbn_bias: Optional[Tensor], sbn_mean: Optional[Tensor],
                       sbn_var: Optional[Tensor], sbn_eps: float, shortcut_stride: int, relu: bool,
                       in_scale: Optional[Tensor], in_shift: Optional[Tensor], stats: bool
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """Output metadata of :func:`_conv2d_fused_impl` without running it."""
    stat_shape = (weight.shape[0] if stats else 0,)
    return (_output(x, weight, stride, padding, dilation),
            x.new_empty(stat_shape, dtype=torch.float32), x.new_empty(stat_shape, dtype=torch.float32))


_conv2d_fused_op = _launch.register_op("triton_conv2d_fused", _conv2d_fused_impl, _conv2d_fused_fake)


def _check_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _bn_args(bn: Optional[EvalBN]) -> tuple:
    """``(γ, β, μ, σ², ε)`` of ``bn`` as the op's arguments: contiguous vectors (None without one)."""
    if bn is None:
        return None, None, None, None, 0.0
    vecs = tuple(None if t is None else t.contiguous() for t in (bn.weight, bn.bias, bn.mean, bn.var))
    return (*vecs, float(bn.eps))


def conv2d_fused(x: Tensor, weight: Tensor, bn: Optional[EvalBN] = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, residual: Optional[Tensor] = None, shortcut_x: Optional[Tensor] = None,
                 shortcut_weight: Optional[Tensor] = None, shortcut_bn: Optional[EvalBN] = None,
                 shortcut_stride: int = 1, relu: bool = False, in_scale: Optional[Tensor] = None,
                 in_shift: Optional[Tensor] = None, stats: bool = False):
    """``y = act(bn(conv2d(a, weight, stride, padding, dilation, groups)) + residual
    + shortcut_bn(conv2d(shortcut_x, shortcut_weight, stride=shortcut_stride)))`` in one kernel launch.

    ``bn``/``shortcut_bn`` are eval BatchNorms (:class:`~resnet_fused.backends.reference.EvalBN`, live tensors)
    applied as ``v·s + t`` in fp32 in the epilogue, ``s`` and ``t`` computed in the kernel; ``bn=None`` means
    none. A shortcut needs both BNs and no prologue. ``a = relu(x*in_scale[c] + in_shift[c])`` (fp32, cast to
    x's dtype, zero padding after the activation) when ``in_scale``/``in_shift`` are given, else ``x``; act =
    ReLU when ``relu``. ``x`` may be NCHW or channels-last; ``y`` has x's dtype and memory format.
    ``in_scale`` and ``in_shift`` are fp32. With ``stats=True`` returns ``(y, mean, var)``: per-output-channel
    fp32 mean and biased variance of the stored ``y`` (two extra tiny merge launches). Not differentiable by
    itself: the backend's autograd functions wrap it.
    """
    op = "triton conv2d_fused"
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("x and weight must be tensors")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [K, C/groups, R, S], got shape {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; the Triton conv supports float16, bfloat16 and float32")
    if x.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("the triton backend runs CPU tensors only under TRITON_INTERPRET=1 (set it before "
                           "importing resnet_fused)")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"need stride >= 1, dilation >= 1, padding >= 0; got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    n, c, h, w = x.shape
    k, c_g, r, s = weight.shape
    if c % groups or k % groups:
        raise ValueError(f"in_channels={c} and out_channels={k} must both be divisible by groups={groups}")
    if c_g != c // groups:
        raise ValueError(f"weight expects {c_g * groups} input channels (shape {tuple(weight.shape)}, "
                         f"groups={groups}) but x has {c}")
    if h + 2 * padding[0] < dilation[0] * (r - 1) + 1 or w + 2 * padding[1] < dilation[1] * (s - 1) + 1:
        raise ValueError(f"the {r}x{s} kernel (dilation {dilation}, padding {padding}) does not fit the "
                         f"{h}x{w} input")
    p, q = _output_hw(x, weight, stride, padding, dilation)
    _check_device("weight", weight, x)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bn is not None:
        check_eval_bn(op, "bn", bn, k, x.device)
    if residual is not None:
        _check_device("residual", residual, x)
        if residual.shape != (n, k, p, q):
            raise ValueError(f"residual must have the output shape {(n, k, p, q)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    if (shortcut_x is None) != (shortcut_weight is None):
        raise ValueError("shortcut_x and shortcut_weight must be given together")
    if shortcut_x is not None:
        if bn is None or shortcut_bn is None:
            raise ValueError("a shortcut needs bn and shortcut_bn (each branch is scaled by its own BatchNorm)")
        if in_scale is not None:
            raise ValueError("a shortcut cannot be combined with the BN+ReLU prologue")
        check_eval_bn(op, "shortcut_bn", shortcut_bn, k, x.device)
        _check_device("shortcut_x", shortcut_x, x)
        _check_device("shortcut_weight", shortcut_weight, x)
        if shortcut_x.dtype != x.dtype or shortcut_weight.dtype != x.dtype:
            raise ValueError(f"shortcut_x ({shortcut_x.dtype}) and shortcut_weight ({shortcut_weight.dtype}) "
                             f"must have x's dtype {x.dtype}")
        if shortcut_x.dim() != 4 or shortcut_x.shape[0] != n:
            raise ValueError(f"shortcut_x must be 4-D with batch {n}, got shape {tuple(shortcut_x.shape)}")
        cs = shortcut_x.shape[1]
        if shortcut_weight.shape != (k, cs, 1, 1):
            raise ValueError(f"shortcut_weight must have shape {(k, cs, 1, 1)} (a 1x1 conv from shortcut_x's "
                             f"{cs} channels), got {tuple(shortcut_weight.shape)}")
        if not isinstance(shortcut_stride, int) or shortcut_stride < 1:
            raise ValueError(f"shortcut_stride must be a positive int, got {shortcut_stride!r}")
        ps = (shortcut_x.shape[2] - 1) // shortcut_stride + 1
        qs = (shortcut_x.shape[3] - 1) // shortcut_stride + 1
        if (ps, qs) != (p, q):
            raise ValueError(f"the shortcut conv (stride {shortcut_stride}) of a {tuple(shortcut_x.shape[2:])} "
                             f"input gives {ps}x{qs} outputs, the main conv {p}x{q}")
    else:
        shortcut_stride, shortcut_bn = 1, None
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    if in_scale is not None:
        for name, t in (("in_scale", in_scale), ("in_shift", in_shift)):
            _check_device(name, t, x)
            if t.shape != (c,) or t.dtype != torch.float32:
                raise ValueError(f"{name} must be float32 of shape [{c}], got {t.dtype} {tuple(t.shape)}")
        in_scale, in_shift = in_scale.contiguous(), in_shift.contiguous()
    y, mean, var = _conv2d_fused_op(x, weight, *_bn_args(bn), stride, padding, dilation, groups, residual,
                                    shortcut_x, shortcut_weight, *_bn_args(shortcut_bn), shortcut_stride,
                                    bool(relu), in_scale, in_shift, bool(stats))
    return (y, mean, var) if stats else y
