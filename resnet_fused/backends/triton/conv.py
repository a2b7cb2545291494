"""Fused implicit-GEMM convolution for the Triton backend.

One kernel computes a whole residual-block convolution with everything around it fused, so that a ResNet block
costs one launch per convolution in inference and no extra elementwise/reduction passes in training:

* prologue (``IN_AFFINE_RELU``): the previous layer's BN+ReLU, ``relu(x*in_scale[c] + in_shift[c])``, applied
  to every loaded input element in registers — the activated tensor never exists in memory; it is wgmma's
  register operand, so an MMA group stays in flight across K steps (``RESNET_FUSED_TRITON_PROLOGUE=smem``
  selects the form that stages it through shared memory instead, for a GPU run to compare);
* main loop: implicit GEMM over NHWC activations, ``M = N·P·Q`` output pixels × ``K`` output channels with
  reduction ``R·S·C`` (channels innermost, so loads are contiguous along C), fp32 accumulation; 16-byte
  asynchronous operand loads need every offset's alignment visible to the compiler, so size-1 dimensions get
  stride 0 (not the 1 they often carry) and a 1x1 filter has no tap arithmetic; small channel counts (the stem)
  reduce over each filter row's contiguous (s, c) run (``PACK_S``) instead of padding C to BLOCK_K;
* ``HAS_SHORTCUT``: a second reduction, over the ``C_s`` channels of a strided 1x1 shortcut convolution, in the
  same launch into a second accumulator (the two branches carry different BN scales), so
  ``relu(bn3(conv3(h)) + bn_d(conv_d(x)))`` is a single launch;
* epilogue: with ``HAS_BN``, the eval BatchNorm ``acc·s[k] + t[k]`` (and ``acc_d·s_d[k] + t_d[k]`` for the
  shortcut) with ``s = γ/√(σ²+ε)``, ``t = β − μ·s`` computed in fp32 from the BN's live tensors in every tile (no
  folded weights, nothing cached: an edit of any of them is seen by the next launch), ``+ residual``, ReLU,
  store in the input dtype and, with ``STATS``, one slot of mean/M2 partial statistics of the output in fp32
  (before its rounding to the input dtype) per row tile, merged with Chan's parallel formula into the
  per-channel mean and biased variance (numerically stable, deterministic): with ``FINALIZE`` inside the
  launch, by the last programs to arrive at self-resetting counters (:func:`_merge_and_finalize`), which also
  finalize the BatchNorm (scale/shift, running statistics, ``num_batches_tracked``: ``conv2d_bn_train``);
  otherwise by ``stats._stats_merge_kernel``, one more launch.

Tile configs are autotuned among those that fit the shape (``_prune``), or fixed per shape in deterministic mode.

Grouped convolutions run as ``groups`` independent GEMMs in one launch, or, with few channels per group
(ResNeXt's 3x3 convs), ``GROUP_PACK`` consecutive groups per tile against a block-diagonal weight tile (see
:func:`group_pack`); dilation is a stride on the filter taps. ``conv2d_fused`` is the checked launcher of the op
``resnet_fused::triton_conv2d_fused``, registered with ``torch.library.triton_op`` so ``torch.compile`` traces
into the kernels (as an opaque custom op with a fake kernel under the interpreter). One call is one conv launch,
plus one tiny merge launch with ``stats``, all counted by :mod:`._launch`; ``conv2d_bn_train`` (op
``triton_conv2d_bn_train``) is one launch in all.
"""

from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import EvalBN, TrainBN, check_batch_size, check_eval_bn, memory_format
from . import _launch
from .stats import arrive, chan_merge, finalize_channels, merge_partial_stats

INTERPRET = _launch.INTERPRET

# The smallest BLOCK_M of the configs: the partial statistics buffers have a row per tile of that height, so
# their size does not depend on the tile the autotuner picks (a larger tile fills fewer rows).
MIN_BLOCK_M = 64
# The (s, c)-packed reduction of small channel counts runs when a filter row holds at most this many values.
PACK_S_MAX = 64
# FINALIZE: row tiles per first-level merge group (see _merge_and_finalize): each merge reads at most this many
# rows, and the second level cdiv(tiles, MERGE_TILES) (196 at batch 256, 56x56, BLOCK_M=128).
MERGE_TILES = 32
# Large filters (5x5 and up) on at most this many channels (the stem: 7x7 on 3) run on copies zero-padded to it and
# spatially, for 16-byte loads (worth the copy only where the filter is large).
STEM_PAD_C = 4

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# GROUP_PACK: a tile's group block spans at most this many output and input channels.
GROUP_PACK_MAX = 64


def group_pack(groups: int, c_g: int, k_g: int) -> int:
    """How many consecutive groups one tile of a grouped conv covers (``GROUP_PACK``): 1 where a group's own
    channels fill the narrowest tile (32 output, 16 input channels) or there are no groups; else the fewest
    groups (a divisor of ``groups``) whose channels fill it, or failing that the most whose channels stay within
    GROUP_PACK_MAX (ResNeXt-50 32x4d: 8 groups of 4 channels, a 32x32 block-diagonal weight tile per tap)."""
    if groups == 1 or (k_g >= 32 and c_g >= 16):
        return 1
    fit = [d for d in range(2, groups + 1) if groups % d == 0 and d * max(k_g, c_g) <= GROUP_PACK_MAX]
    full = [d for d in fit if d * k_g >= 32 and d * c_g >= 16]
    return full[0] if full else (fit[-1] if fit else 1)


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
    return [  # in order of preference: deterministic mode takes the first one pruning keeps
        cfg(128, 128, 64, 3, 8),
        cfg(128, 64, 64, 3, 8),
        cfg(128, 128, 32, 4, 8),
        cfg(64, 128, 64, 3, 4),
        cfg(64, 64, 64, 4, 4),
        cfg(64, 64, 32, 4, 4),
        cfg(64, 32, 32, 4, 4),
        cfg(128, 64, 16, 4, 4),  # BLOCK_K=16: channel groups of fewer than 32 (the stem, grouped convs)
        cfg(64, 64, 16, 4, 4),
        cfg(64, 32, 16, 4, 4),
    ]


def _prune(configs: list, nargs: dict, **kwargs) -> list:
    """The configs that can serve a launch (``prune_configs_by``): a tile no wider than the output channels per
    group (next power of two, at least 32) nor deeper than the input channels per group (at least 16; BLOCK_K=16
    only below 32 channels per group; for the (s, c)-packed reduction, the values of a filter row; with
    GROUP_PACK, the output and input channels of a tile's GROUP_PACK groups), and whose operand tiles give every
    thread at least one 16-byte load (smaller shares load in pieces); with the shortcut's second accumulator or an
    NCHW output (whose epilogue converts the accumulator's layout to store along M), at most 32 fp32 accumulator
    registers per thread and accumulator (BLOCK_M·BLOCK_N ≤ 1024·num_warps; the compile report shows the wider
    ones spill); with the prologue staged through shared memory (PROLOGUE_SMEM), BLOCK_N >= 64 (the transposed
    MMA's M: below 64 it is no wgmma), in registers none of PROLOGUE_SERIALIZED (ptxas serializes their wgmma).
    Never empty: the last config if nothing fits."""
    groups, pack = kwargs["GROUPS"], kwargs.get("GROUP_PACK", 1)
    k_g, c_g = nargs["K"] // groups * pack, nargs["C"] // groups * pack  # a tile's group block (GROUP_PACK)
    if kwargs.get("PACK_S"):
        c_g = kwargs["S"] * (kwargs.get("PAD_C") or c_g)  # the reduction runs over a filter row's (s, c) values
    n_cap = max(32, triton.next_power_of_2(k_g))
    k_cap = max(16, triton.next_power_of_2(c_g))
    x = nargs.get("x_ptr")
    vec = 16 // (x.element_size() if x is not None else 2)  # elements of a 16-byte load
    nchw_out = nargs.get("stride_yc", 1) not in (0, 1)  # the epilogue stores along M: a layout conversion

    def fits(cfg):
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        if bn > n_cap or bk > k_cap or (bk == 16 and c_g >= 32):
            return False
        if min(bm, bn) * bk < vec * 32 * cfg.num_warps:  # a thread's share of a tile below 16 bytes
            return False
        if (kwargs["HAS_SHORTCUT"] or nchw_out) and bm * bn > 1024 * cfg.num_warps:
            return False
        staged, tile = kwargs["PROLOGUE_SMEM"], (bm, bn, bk, cfg.num_warps)
        return not (kwargs["IN_AFFINE_RELU"] and (bn < 64 if staged else tile in PROLOGUE_SERIALIZED))

    return [c for c in configs if fits(c)] or configs[-1:]


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
def _merge_and_finalize(part_mean_ptr, part_m2_ptr, grp_mean_ptr, grp_m2_ptr, cnt_ptr, out_mean_ptr, out_var_ptr,
                        out_scale_ptr, out_shift_ptr, nbt_ptr, w_ptr, b_ptr, rmean_ptr, rvar_ptr, eps, momentum,
                        unbias, M, K, k, k_ok, pid_m, num_pid_m, col, num_cols, AFFINE: tl.constexpr,
                        UPDATE: tl.constexpr, COUNT_BATCHES: tl.constexpr, CUMULATIVE: tl.constexpr,
                        MERGE_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """After a tile stored its statistics partial: the BatchNorm's whole finalize inside the conv launch, as a
    two-level tree of last-arriving programs (:func:`.stats.arrive`), so no program waits and no merge is serial
    over all the tiles of a column:

    1. the last of each group of MERGE_TILES row tiles of a column (BLOCK_N channels) merges their partials into
       the group's row of grp_mean/grp_m2;
    2. the last group of a column merges the groups' rows into the batch mean and biased variance of its
       channels and finalizes them (:func:`.stats.finalize_channels`: scale, shift, running statistics with
       the momentum factor, ``1/(num_batches_tracked + 1)`` when CUMULATIVE);
    3. the last column to finalize counts the batch in num_batches_tracked (COUNT_BATCHES) — after every column
       read it for its factor.

    Both merges run in row order (Chan's formula), so the bits do not depend on which program arrives last.
    Counters: [num_cols · groups] for level 1, then [num_cols] for level 2, then one."""
    MERGE_P: tl.constexpr = 16  # partial rows per merge step
    n_groups = tl.cdiv(num_pid_m, MERGE_TILES)
    grp = pid_m // MERGE_TILES
    in_grp = tl.minimum(MERGE_TILES, num_pid_m - grp * MERGE_TILES)
    if arrive(cnt_ptr + col * n_groups + grp, in_grp):
        _, g_mean, g_m2 = chan_merge(part_mean_ptr, part_m2_ptr, grp * MERGE_TILES, in_grp, BLOCK_M, M, K, k, k_ok,
                                     MERGE_P, BLOCK_N)
        tl.store(grp_mean_ptr + grp * K + k, g_mean, mask=k_ok)
        tl.store(grp_m2_ptr + grp * K + k, g_m2, mask=k_ok)
        if arrive(cnt_ptr + num_cols * n_groups + col, n_groups):
            n, mean, m2 = chan_merge(grp_mean_ptr, grp_m2_ptr, 0, n_groups, MERGE_TILES * BLOCK_M, M, K, k, k_ok,
                                     MERGE_P, BLOCK_N)
            var = m2 / n
            tl.store(out_mean_ptr + k, mean, mask=k_ok)
            tl.store(out_var_ptr + k, var, mask=k_ok)
            factor = momentum
            if CUMULATIVE:
                factor = tl.div_rn(1.0, (tl.load(nbt_ptr) + 1).to(tl.float32))
            finalize_channels(mean, var, k, k_ok, w_ptr, b_ptr, rmean_ptr, rvar_ptr, out_scale_ptr, out_shift_ptr,
                              factor, unbias, eps, AFFINE, UPDATE)
            if COUNT_BATCHES:
                if arrive(cnt_ptr + num_cols * (n_groups + 1), num_cols):
                    tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


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
    part_rows_ptr,    # [1] int32: BLOCK_M of this launch, written by its first tile (STATS)
    part_mean_ptr,    # [>= cdiv(M, BLOCK_M), K] fp32 per-row-tile channel means, row pid_m (STATS)
    part_m2_ptr,      # [>= cdiv(M, BLOCK_M), K] fp32 per-row-tile sums of squared deviations (STATS)
    grp_mean_ptr,     # [>= cdiv(cdiv(M, BLOCK_M), MERGE_TILES), K] fp32 per-group means (FINALIZE)
    grp_m2_ptr,       # [>= cdiv(cdiv(M, BLOCK_M), MERGE_TILES), K] fp32 per-group M2 (FINALIZE)
    cnt_ptr,          # int32 arrival counters, zero: per (column, group), per column, one (FINALIZE)
    out_mean_ptr,     # [K] fp32 out: batch mean (FINALIZE)
    out_var_ptr,      # [K] fp32 out: biased batch variance (FINALIZE)
    out_scale_ptr,    # [K] fp32 out: the BN's scale from the batch statistics (FINALIZE)
    out_shift_ptr,    # [K] fp32 out: ... and shift (FINALIZE)
    nbt_ptr,          # [1] int64 num_batches_tracked, += 1 (FINALIZE and COUNT_BATCHES)
    N, C, H, W, K, P, Q, CS, HS, WS,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_rn, stride_rc, stride_rh, stride_rw,
    stride_sxn, stride_sxc, stride_sxh, stride_sxw,
    stride_swk, stride_swc,
    stride_yn, stride_yc, stride_yh, stride_yw,
    bn_eps, sbn_eps,  # the two BNs' ε (fp32)
    momentum,         # FINALIZE: the weight of the batch statistics in the running ones (unless CUMULATIVE)
    unbias,           # FINALIZE: M/(M − 1)
    M_BUCKET,         # next power of two of N*P*Q: autotune key only
    R: tl.constexpr, S: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    GROUPS: tl.constexpr, GROUP_PACK: tl.constexpr, C_PER_GROUP: tl.constexpr, K_PER_GROUP: tl.constexpr,
    SC_STRIDE: tl.constexpr,
    HAS_BN: tl.constexpr, BN_AFFINE: tl.constexpr, SBN_AFFINE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_SHORTCUT: tl.constexpr, RELU: tl.constexpr,
    IN_AFFINE_RELU: tl.constexpr, PROLOGUE_SMEM: tl.constexpr, STATS: tl.constexpr, PACK_S: tl.constexpr,
    PAD_C: tl.constexpr, FINALIZE: tl.constexpr, BN_UPDATE: tl.constexpr, COUNT_BATCHES: tl.constexpr,
    CUMULATIVE: tl.constexpr, MERGE_TILES: tl.constexpr,
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
    STATS: each BLOCK_M row tile writes, per channel, the mean μ_t and M2_t = Σ (y − μ_t)² of y in fp32 (the
    accumulator the stored y rounds from) in row pid_m of the partial buffers (one slot per tile; its row count
    follows from BLOCK_M, which the first tile writes for the merge). Reading the rounded fp16 output instead
    makes ptxas serialize the wgmma pipeline of every convolution without the prologue (C7514).
    The prologue's activated tile is the MMA's register operand (wgmma's A from registers: the next K step's
    loads and MMA overlap the running one) unless PROLOGUE_SMEM, where it is staged through shared memory as the
    B operand of the transposed product (each K step then waits for its MMA).
    PACK_S (no groups, no prologue; the launcher sets it when S·C ≤ 64): the reduction of each filter row runs over
    its contiguous (s, c) run, so a 3-channel stem issues S·C/BLOCK_K of useful MMA work, not C/BLOCK_K; with
    PAD_C (the stem: C ≤ 4, filters of 5x5 and up, even stride) x and w are the launcher's padded copies
    described at that loop, and PAD_H = PAD_W = 0, H, W are the padded copy's.
    GROUP_PACK (grouped convs with few channels per group, GROUPS % GROUP_PACK == 0): a tile covers GROUP_PACK
    consecutive groups, i.e. the contiguous output channels [g·GP·K_G, (g+1)·GP·K_G) and input channels
    [g·GP·C_G, (g+1)·GP·C_G), and reduces over all those inputs against a block-diagonal weight tile
    (b[j, n] = w[k_n, j % C_G, r, s] where j // C_G == n // K_G, else 0), so an output channel still sees its
    own group's inputs only, while the MMA tiles and the contiguous activation runs are GROUP_PACK times wider;
    C_PER_GROUP and K_PER_GROUP (0 unless packed) are C_G and K_G as constants, so the block's offsets keep
    their alignment (16-byte runs) and the group arithmetic is shifts.
    """
    pid = tl.program_id(0)
    M = N * P * Q
    if GROUP_PACK > 1:
        C_G = C_PER_GROUP
        K_G = K_PER_GROUP
    else:
        C_G = C // GROUPS
        K_G = K // GROUPS
    # A tile's group block: GROUP_PACK consecutive groups (one unless packed), C_T inputs -> K_T outputs.
    C_T = C_G * GROUP_PACK
    K_T = K_G * GROUP_PACK
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K_T, BLOCK_N)
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
    k_ok = offs_kg < K_T
    k = g * K_T + offs_kg
    offs_c = tl.arange(0, BLOCK_K)

    x_row = n_img.to(tl.int64) * stride_xn
    h0 = p * STRIDE_H - PAD_H
    w0 = q * STRIDE_W - PAD_W
    num_cb = tl.cdiv(C_T, BLOCK_K)
    if GROUP_PACK > 1:
        n_grp = offs_kg // K_G  # each output column's group within the block
    TRANSPOSED: tl.constexpr = IN_AFFINE_RELU and PROLOGUE_SMEM
    if TRANSPOSED:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PACK_S and PAD_C > 0:
        # The stem on the launcher's zero-padded copies: x with PAD_C channels and its spatial padding in memory,
        # the filter as [K, R, S_PAD·PAD_C] rows (zeros beyond S, C): a filter row's values are the contiguous,
        # 16-byte aligned run x[n, h, w0 + j // PAD_C, j % PAD_C], so no mask but the row's and 16-byte
        # asynchronous copies on both operands.
        STEPS: tl.constexpr = (S * PAD_C + BLOCK_K - 1) // BLOCK_K
        for it in range(0, R * STEPS):
            r = it // STEPS
            j = (it - r * STEPS) * BLOCK_K + offs_c
            h = h0 + r * DIL_H
            a = tl.load(x_ptr + (x_row + h * stride_xh + w0 * PAD_C)[:, None] + j[None, :], mask=m_ok[:, None],
                        other=0.0)
            b = tl.load(w_ptr + (k * stride_wk)[None, :] + (r * stride_wr + j)[:, None], mask=k_ok[None, :],
                        other=0.0)
            acc = _mma(a, b, acc, False, DOT_IN_FP32, INPUT_PRECISION)
    elif PACK_S:
        # Small channel counts: the reduction runs over the contiguous (s, c) run of each filter row,
        # j = s·C_G + c < S·C_G, instead of padding every tap's C_G channels to BLOCK_K.
        num_jb = tl.cdiv(S * C_G, BLOCK_K)
        for it in range(0, R * num_jb):
            r = it // num_jb
            j = (it - r * num_jb) * BLOCK_K + offs_c
            s = j // C_G
            c = j - s * C_G
            j_ok = j < S * C_G
            h = h0 + r * DIL_H
            w = w0[:, None] + (s * DIL_W)[None, :]
            a_mask = (m_ok & (h >= 0) & (h < H))[:, None] & (w >= 0) & (w < W) & j_ok[None, :]
            a_ptrs = x_ptr + (x_row + h * stride_xh)[:, None] + w * stride_xw + ((g * C_G + c) * stride_xc)[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b_ptrs = (w_ptr + (k * stride_wk)[None, :] + (c * stride_wc + s * stride_ws)[:, None]
                      + r * stride_wr)
            b = tl.load(b_ptrs, mask=j_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, False, DOT_IN_FP32, INPUT_PRECISION)
    else:
        # One flat loop over (r, s, channel block) so the compiler can software-pipeline it even when C fits
        # in a single block. A 1x1 filter has no tap arithmetic at all (r = s = 0 known to the compiler, so the
        # offsets keep the alignment of the strides).
        for it in range(0, R * S * num_cb):
            if R * S == 1:
                cb = it
                r = 0
                s = 0
            else:
                rs = it // num_cb
                cb = it - rs * num_cb
                r = rs // S
                s = rs - r * S
            h = h0 + r * DIL_H
            w = w0 + s * DIL_W
            pix_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            c = cb * BLOCK_K + offs_c
            c_ok = c < C_T
            a_mask = pix_ok[:, None] & c_ok[None, :]
            a_ptrs = x_ptr + (x_row + h * stride_xh + w * stride_xw)[:, None] + ((g * C_T + c) * stride_xc)[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            if IN_AFFINE_RELU:
                sc = tl.load(scale_ptr + g * C_T + c, mask=c_ok, other=0.0)
                sh = tl.load(shift_ptr + g * C_T + c, mask=c_ok, other=0.0)
                act = tl.maximum(a.to(tl.float32) * sc[None, :] + sh[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
                a = tl.where(a_mask, act, 0.0).to(x_ptr.dtype.element_ty)
            if GROUP_PACK > 1:
                # The block-diagonal weight tile: input channel c of the block is channel c % C_G of group
                # c // C_G, zero against the other groups' output columns. The weight is the launcher's
                # channels_last copy, [K, R, S, C_G] in memory: its strides as constants keep the alignment
                # of each filter tap's C_G-channel run visible (vector loads).
                c_grp = c // C_G
                b_ptrs = w_ptr + (k * (R * S * C_G))[None, :] + (c % C_G)[:, None] + (r * S + s) * C_G
                b_mask = (c_ok[:, None] & k_ok[None, :]) & (c_grp[:, None] == n_grp[None, :])
            else:
                b_ptrs = w_ptr + (k * stride_wk)[None, :] + (c * stride_wc)[:, None] + r * stride_wr + s * stride_ws
                b_mask = c_ok[:, None] & k_ok[None, :]
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            acc = _mma(a, b, acc, TRANSPOSED, DOT_IN_FP32, INPUT_PRECISION)

    if TRANSPOSED:
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
        v = tl.where(out_mask, acc, 0.0)
        cnt = tl.sum(m_ok.to(tl.float32), axis=0)
        mean = tl.sum(v, axis=0) / cnt
        d = tl.where(out_mask, v - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        tl.store(part_mean_ptr + pid_m * K + k, mean, mask=k_ok)
        tl.store(part_m2_ptr + pid_m * K + k, m2, mask=k_ok)
        if pid == 0:
            tl.store(part_rows_ptr, BLOCK_M)
        if FINALIZE:
            _merge_and_finalize(part_mean_ptr, part_m2_ptr, grp_mean_ptr, grp_m2_ptr, cnt_ptr, out_mean_ptr,
                                out_var_ptr, out_scale_ptr, out_shift_ptr, nbt_ptr, bn_w_ptr, bn_b_ptr, bn_mean_ptr,
                                bn_var_ptr, bn_eps, momentum, unbias, M, K, k, k_ok, pid_m, num_pid_m,
                                g * num_pid_n + pid_n, GROUPS // GROUP_PACK * num_pid_n, BN_AFFINE, BN_UPDATE,
                                COUNT_BATCHES, CUMULATIVE, MERGE_TILES, BLOCK_M, BLOCK_N)


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) whose wgmma pipeline ptxas serializes with the register-operand
# BN+ReLU prologue: "wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator
# registers of a wgmma between start and end of the pipeline stage" (C7515; every K step then waits for its MMAs,
# WARPGROUP.DEPBAR.LE gsb0, 0x0 in the SASS), on every ResNet-18/50 prologue conv in bf16 and fp16 in the compile
# report (benchmarks/results/compile, triton 3.6: the lent GPUs'); the other tiles keep a group in flight there.
PROLOGUE_SERIALIZED = {(128, 128, 32, 8), (64, 32, 32, 4)}


# Tuned per problem shape and per feature set (the prologue and statistics change register and shared-memory
# use, so a tile that fits without them need not fit with them); triton adds the tensor dtypes to the key.
TUNE_KEY = ["M_BUCKET", "K", "C", "CS", "R", "S", "STRIDE_H", "STRIDE_W", "GROUPS", "GROUP_PACK", "HAS_RESIDUAL",
            "HAS_SHORTCUT", "IN_AFFINE_RELU", "PROLOGUE_SMEM", "STATS", "PACK_S", "PAD_C", "FINALIZE"]
_conv_fwd_tuned = triton.autotune(configs=_configs(), key=TUNE_KEY,
                                  prune_configs_by={"early_config_prune": _prune})(_conv_fwd_kernel)
# The launches that update running statistics (FINALIZE with BN_UPDATE or COUNT_BATCHES): the autotuner copies
# them before its timing runs and back after. Only these: a copy around every timed launch costs time, and bumps
# the version counter of whatever tensor it restores (an autograd error if that tensor was saved for backward).
_conv_fwd_tuned_update = triton.autotune(configs=_configs(), key=TUNE_KEY,
                                         restore_value=["bn_mean_ptr", "bn_var_ptr", "nbt_ptr"],
                                         prune_configs_by={"early_config_prune": _prune})(_conv_fwd_kernel)
_FIXED: dict = {}  # deterministic mode: tune key text -> the config it runs


def deterministic() -> bool:
    """Whether convolutions run one fixed config per shape (no autotuning), so that reruns and the ranks of a
    data-parallel job compute bit-identical results: ``RESNET_FUSED_DETERMINISTIC=1`` or
    ``torch.use_deterministic_algorithms(True)``. (Configs differ in BLOCK_K, i.e. in the order of the
    reduction, and in BLOCK_M, i.e. in how the statistics are merged; everything else is deterministic.)"""
    return os.environ.get("RESNET_FUSED_DETERMINISTIC", "0") == "1" or torch.are_deterministic_algorithms_enabled()


def prologue_smem() -> bool:
    """The BN+ReLU prologue's form: ``RESNET_FUSED_TRITON_PROLOGUE=smem`` stages the activated tile through
    shared memory as the transposed product's B operand; the default (``rs``) keeps it in registers as wgmma's
    A operand, which the compile report shows keeps an MMA group in flight across K steps."""
    form = os.environ.get("RESNET_FUSED_TRITON_PROLOGUE", "rs")
    if form not in ("rs", "smem"):
        raise ValueError(f"RESNET_FUSED_TRITON_PROLOGUE must be 'rs' or 'smem', got {form!r}")
    return form == "smem"


def _key_text(names, key) -> str:
    named = [f"{n}={v}" for n, v in zip(names, key)]
    return " ".join(named + [str(v) for v in key[len(names):]])


def _config_text(cfg) -> str:
    return " ".join([f"{k}={v}" for k, v in cfg.kwargs.items()] + [f"num_warps={cfg.num_warps}",
                                                                    f"num_stages={cfg.num_stages}"])


def tile_configs() -> dict:
    """The tile config each convolution shape ran with so far, as text: ``{key: config}``. Keys are the autotune
    key (:data:`TUNE_KEY` as ``NAME=value`` pairs, then the tensor dtypes triton appends), prefixed with
    ``autotune`` or ``fixed`` (deterministic mode)."""
    out = {f"autotune {_key_text(TUNE_KEY, k)}": _config_text(c)
           for tuner in (_conv_fwd_tuned, _conv_fwd_tuned_update) for k, c in tuner.cache.items()}
    out.update({f"fixed {k}": v for k, v in _FIXED.items()})
    return out


def mma_macs(args: dict) -> Tuple[int, int]:
    """``(useful, issued)`` multiply-adds of one ``_conv_fwd_kernel`` launch whose named arguments (the config's
    meta-parameters included) are ``args``: the convolution's own MACs, and those its MMA tiles issue (padding
    of partial M, N and reduction tiles counted, and with GROUP_PACK the zeros of the block-diagonal weight
    tiles), from the same tile arithmetic as the kernel's loops."""
    cdiv = triton.cdiv
    g, pack = args["GROUPS"], args.get("GROUP_PACK", 1)
    m = args["N"] * args["P"] * args["Q"]
    k_g, c_g = args["K"] // g, args["C"] // g
    bm, bn, bk = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
    m_pad, n_pad = cdiv(m, bm) * bm, cdiv(k_g * pack, bn) * bn  # a tile's group block: pack groups
    taps = args["R"] * args["S"]
    useful = m * args["K"] * taps * c_g
    if args.get("PACK_S"):
        issued = g * m_pad * n_pad * args["R"] * cdiv(args["S"] * (args.get("PAD_C") or c_g), bk) * bk
    else:
        issued = g // pack * m_pad * n_pad * taps * cdiv(c_g * pack, bk) * bk
    if args["HAS_SHORTCUT"]:
        useful += m * args["K"] * args["CS"]
        issued += m_pad * n_pad * cdiv(args["CS"], bk) * bk
    return useful, issued


def _pair(v, name: str) -> List[int]:
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) for e in v):
        return [int(v[0]), int(v[1])]
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: tf32 for fp32 inputs only when cuDNN convolutions may use it, else exact IEEE."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def _strides(t: Tensor) -> List[int]:
    """``t``'s strides with 0 for its size-1 dimensions. Those are only ever indexed at 0, but keep whatever
    stride the tensor has — often 1 (a [K, C, 1, 1] weight), which the JIT specializes to the constant 1, so
    ``r·stride_wr`` would hide the alignment of every weight offset and turn 16-byte loads into scalar ones."""
    return [st if sz > 1 else 0 for sz, st in zip(t.shape, t.stride())]


def _output_hw(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int]
               ) -> Tuple[int, int]:
    """The convolution's output height and width (P, Q)."""
    _, _, h, w = x.shape
    _, _, r, s = weight.shape
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def output_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> torch.Size:
    """The output shape [N, K, P, Q] of a valid 2-D convolution (int or pair stride, padding, dilation)."""
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    return torch.Size((x.shape[0], weight.shape[0], *_output_hw(x, weight, stride, padding, dilation)))


def _output(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int]) -> Tensor:
    """Uninitialised output [N, K, P, Q] in x's dtype and memory format."""
    n, k = x.shape[0], weight.shape[0]
    p, q = _output_hw(x, weight, stride, padding, dilation)
    return torch.empty((n, k, p, q), device=x.device, dtype=x.dtype, memory_format=memory_format(x))


_SCRATCH: dict = {}  # (device, dtype) -> the stand-in of absent pointer operands


def _scratch(like: Tensor) -> Tensor:
    """The stand-in for absent pointer operands on ``like``'s device and in its dtype (16 bytes, never read or
    written by a kernel): one per (device, dtype), a fresh one while tracing (fake tensors, torch.compile) or
    capturing a CUDA graph."""
    make = dict(device=like.device, dtype=like.dtype)
    if not _launch.cacheable(like):
        return torch.zeros(16 // like.element_size(), **make)
    key = (like.device, like.dtype)
    buf = _SCRATCH.get(key)
    if buf is None:
        buf = _SCRATCH[key] = torch.zeros(16 // like.element_size(), **make)
    return buf


class _Finalize(NamedTuple):
    """The BatchNorm a training conv finalizes in its own launch (``conv2d_bn_train``): γ, β (None without
    affine), the running statistics and ``num_batches_tracked`` it updates (None: not updated), the momentum
    (None: cumulative average) and ε."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    eps: float


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
    return _run(x, weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, stride, padding, dilation, groups, residual,
                shortcut_x, shortcut_weight, sbn_weight, sbn_bias, sbn_mean, sbn_var, sbn_eps, shortcut_stride, relu,
                in_scale, in_shift, stats, None)[:3]


def _conv2d_bn_train_impl(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                          groups: int, in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                          bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor], momentum: float,
                          cumulative: bool, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(c, mean, var, scale, shift) of :func:`conv2d_bn_train`, one launch (inputs already checked)."""
    fin = _Finalize(bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                    None if cumulative else momentum, eps)
    return _run(x, weight, None, None, None, None, 0.0, stride, padding, dilation, groups, None, None, None, None,
                None, None, None, 0.0, 1, False, in_scale, in_shift, True, fin)


def _run(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], bn_mean: Optional[Tensor],
         bn_var: Optional[Tensor], bn_eps: float, stride: List[int], padding: List[int], dilation: List[int],
         groups: int, residual: Optional[Tensor], shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor],
         sbn_weight: Optional[Tensor], sbn_bias: Optional[Tensor], sbn_mean: Optional[Tensor],
         sbn_var: Optional[Tensor], sbn_eps: float, shortcut_stride: int, relu: bool, in_scale: Optional[Tensor],
         in_shift: Optional[Tensor], stats: bool, fin: Optional[_Finalize]
         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Allocate and launch one conv; (y, mean, var, scale, shift): mean/var with ``stats`` (empty otherwise),
    scale/shift with ``fin`` (the BN finalized in the launch; empty otherwise)."""
    y = _output(x, weight, stride, padding, dilation)
    # An NCHW output with the BN+ReLU prologue: ptxas serializes the wgmma pipeline of every config that can
    # store it (C7515 in the compile report, triton 3.6), so the kernel stores channels_last, copied to NCHW
    # after (NCHW input is the slow path anyway: x is copied to channels_last for the kernel too).
    to_nchw = in_scale is not None and y.dim() == 4 and memory_format(y) != torch.channels_last and y.numel() > 0
    if to_nchw:
        y = torch.empty_like(y, memory_format=torch.channels_last)
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    p, q = y.shape[2], y.shape[3]
    m = n * p * q
    f32 = dict(device=x.device, dtype=torch.float32)
    if m == 0 or k == 0:
        nan = [torch.full((k if stats else 0,), float("nan"), **f32) for _ in range(2)]
        return (y, *nan, *[torch.full((k if fin else 0,), float("nan"), **f32) for _ in range(2)])
    xc = x.contiguous(memory_format=torch.channels_last)
    wc = weight.contiguous(memory_format=torch.channels_last)
    tiles = triton.cdiv(m, MIN_BLOCK_M) if stats else 1
    part_rows = torch.empty(1, device=x.device, dtype=torch.int32)
    part_mean = torch.empty(tiles, k if stats else 1, **f32)
    part_m2 = torch.empty_like(part_mean)
    # The finalize's buffers (a stand-in row without it): group partials, the outputs, the arrival counters for
    # the smallest tiles any config has (BLOCK_M >= MIN_BLOCK_M, BLOCK_N >= 32).
    n_grp = triton.cdiv(tiles, MERGE_TILES) if fin else 1
    grp_mean = torch.empty(n_grp, k if fin else 1, **f32)
    grp_m2 = torch.empty_like(grp_mean)
    fin_out = [torch.empty(k if fin else 0, **f32) for _ in range(4)]  # mean, var, scale, shift
    k_g = k // groups
    pack = group_pack(groups, c // groups, k_g)
    cols = groups // pack * triton.cdiv(pack * k_g, 32)  # FINALIZE's columns at the narrowest BLOCK_N (32)
    cnt = _launch.counters(x, cols * (n_grp + 1) + 1) if fin else part_rows
    has_sc = shortcut_x is not None
    sx = shortcut_x.contiguous(memory_format=torch.channels_last) if has_sc else xc
    sw = shortcut_weight.contiguous(memory_format=torch.channels_last) if has_sc else wc
    # Absent vector operands point at a scratch tensor the kernel never dereferences: never at an output (the
    # kernel would look like it aliased a mutated buffer when traced), nor at a user's tensor (e.g. a 1x1
    # weight, a Parameter, which something outside may have saved for backward).
    res = residual if residual is not None else xc
    absent = _scratch(x)

    def present(t: Optional[Tensor]) -> Tensor:
        return t if t is not None else absent

    if fin is not None:  # the BN tensors take the eval BN's places (HAS_BN is False: the output is raw)
        bn_weight, bn_bias, bn_mean, bn_var, bn_eps = fin.weight, fin.bias, fin.running_mean, fin.running_var, fin.eps
    update = fin is not None and fin.running_mean is not None
    count = fin is not None and fin.num_batches_tracked is not None
    nbt = fin.num_batches_tracked if count else part_rows

    cs, hs, ws = (sx.shape[1], sx.shape[2], sx.shape[3]) if has_sc else (0, 0, 0)
    pack_s = groups == 1 and in_scale is None and s > 1 and c * s <= PACK_S_MAX
    pad_c = 0
    x_strides, w_strides, pads = _strides(xc), _strides(wc), list(padding)
    if (pack_s and c <= STEM_PAD_C and min(r, s) >= 5 and dilation == [1, 1]
            and (stride[1] % 2 == 0 or x.element_size() == 4)):
        # The stem: zero-padded copies (see the kernel's PAD_C loop); the filter rows padded to whole steps of
        # any BLOCK_K (at most 64), the width so that every row's last step is in bounds, and to a multiple of
        # 4 pixels so that its row stride is 16-byte aligned.
        pad_c = STEM_PAD_C
        s_pad = triton.cdiv(s * pad_c, 64) * 64 // pad_c
        hp = h + 2 * padding[0]
        wp = triton.cdiv(max(w + 2 * padding[1], (q - 1) * stride[1] + s_pad), 4) * 4
        xp = torch.zeros((n, hp, wp, pad_c), device=x.device, dtype=x.dtype)
        xp[:, padding[0]:padding[0] + h, padding[1]:padding[1] + w, :c] = xc.permute(0, 2, 3, 1)
        wp_ = torch.zeros((k, r, s_pad, pad_c), device=x.device, dtype=x.dtype)
        wp_[:, :, :s, :c] = wc.permute(0, 2, 3, 1)
        xc, wc = xp.permute(0, 3, 1, 2), wp_
        h, w, pads = hp, wp, [0, 0]
        x_strides = [hp * wp * pad_c, 1, wp * pad_c, pad_c]
        w_strides = [r * s_pad * pad_c, 1, s_pad * pad_c, pad_c]
    args = (
        xc, wc, present(bn_weight), present(bn_bias), present(bn_mean), present(bn_var), res, sx, sw,
        present(sbn_weight), present(sbn_bias), present(sbn_mean), present(sbn_var),
        present(in_scale), present(in_shift),
        y, part_rows, part_mean, part_m2, grp_mean, grp_m2, cnt, *fin_out, nbt,
        n, c, h, w, k, p, q, cs, hs, ws,
        *x_strides, *w_strides, *_strides(res), *_strides(sx), *_strides(sw)[:2], *_strides(y),
        float(bn_eps), float(sbn_eps),
        float(fin.momentum or 0.0) if fin else 0.0, m / (m - 1) if m > 1 else float("inf"),
        triton.next_power_of_2(m),
    )
    consts = dict(
        R=r, S=s, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=pads[0], PAD_W=pads[1],
        DIL_H=dilation[0], DIL_W=dilation[1], GROUPS=groups, GROUP_PACK=pack,
        C_PER_GROUP=c // groups if pack > 1 else 0, K_PER_GROUP=k_g if pack > 1 else 0, SC_STRIDE=shortcut_stride,
        HAS_BN=bn_mean is not None and fin is None, BN_AFFINE=bn_weight is not None, SBN_AFFINE=sbn_weight is not None,
        HAS_RESIDUAL=residual is not None, HAS_SHORTCUT=has_sc, RELU=relu,
        IN_AFFINE_RELU=in_scale is not None, PROLOGUE_SMEM=prologue_smem(), STATS=stats,
        PACK_S=pack_s, PAD_C=pad_c, FINALIZE=fin is not None, BN_UPDATE=update, COUNT_BATCHES=count,
        CUMULATIVE=count and fin.momentum is None, MERGE_TILES=MERGE_TILES,
        INPUT_PRECISION=_input_precision(x.dtype), DOT_IN_FP32=INTERPRET and x.dtype == torch.bfloat16,
    )

    def grid(meta):
        return (groups // pack * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(pack * k_g, meta["BLOCK_N"]),)

    if deterministic():
        cfg = _prune(_conv_fwd_tuned.configs, dict(zip(_conv_fwd_tuned.arg_names, args)), **consts)[0]
        key = [dict(zip(_conv_fwd_tuned.arg_names, args), **consts)[name] for name in TUNE_KEY]
        _FIXED[_key_text(TUNE_KEY, key + [str(x.dtype)])] = _config_text(cfg)
        _launch.wrap(_conv_fwd_kernel)[grid(cfg.kwargs)](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps,
                                                         num_stages=cfg.num_stages)
    else:
        tuner = _conv_fwd_tuned_update if update or count else _conv_fwd_tuned
        _launch.wrap(tuner)[grid](*args, **consts)
    _launch.record()
    if to_nchw:
        y = y.contiguous()
    if fin is not None:
        return (y, *fin_out)
    if not stats:
        return y, torch.empty(0, **f32), torch.empty(0, **f32), *fin_out
    mean, var = merge_partial_stats(part_rows, part_mean, part_m2, m)
    return y, mean, var, *fin_out


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


def _conv2d_bn_train_fake(x, weight, stride, padding, dilation, groups, in_scale, in_shift, bn_weight, bn_bias,
                          running_mean, running_var, num_batches_tracked, momentum, cumulative, eps):
    """Output metadata of :func:`_conv2d_bn_train_impl` without running it."""
    return (_output(x, weight, stride, padding, dilation),
            *[x.new_empty((weight.shape[0],), dtype=torch.float32) for _ in range(4)])


_conv2d_fused_op = _launch.register_op("triton_conv2d_fused", _conv2d_fused_impl, _conv2d_fused_fake)
_conv2d_bn_train_op = _launch.register_op("triton_conv2d_bn_train", _conv2d_bn_train_impl, _conv2d_bn_train_fake,
                                          mutates_args=("running_mean", "running_var", "num_batches_tracked"))


def _check_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _bn_args(bn: Optional[EvalBN]) -> tuple:
    """``(γ, β, μ, σ², ε)`` of ``bn`` as the op's arguments: contiguous vectors (None without one)."""
    if bn is None:
        return None, None, None, None, 0.0
    vecs = tuple(None if t is None else t.contiguous() for t in (bn.weight, bn.bias, bn.mean, bn.var))
    return (*vecs, float(bn.eps))


def _checked(x: Tensor, weight: Tensor, bn: Optional[EvalBN], stride, padding, dilation, groups: int,
             residual: Optional[Tensor], shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor],
             shortcut_bn: Optional[EvalBN], shortcut_stride: int, in_scale: Optional[Tensor],
             in_shift: Optional[Tensor]) -> tuple:
    """Validate the arguments of :func:`conv2d_fused` (clear errors, never a bad launch); returns them normalized:
    ``(stride, padding, dilation, shortcut_bn, shortcut_stride, in_scale, in_shift)``."""
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
    return stride, padding, dilation, shortcut_bn, shortcut_stride, in_scale, in_shift


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
    fp32 mean and biased variance of ``y`` before its rounding to x's dtype, i.e. of the exact convolution up to
    fp32 accumulation (one extra tiny merge launch). Not differentiable by itself: the backend's autograd
    functions wrap it.
    """
    stride, padding, dilation, shortcut_bn, shortcut_stride, in_scale, in_shift = _checked(
        x, weight, bn, stride, padding, dilation, groups, residual, shortcut_x, shortcut_weight, shortcut_bn,
        shortcut_stride, in_scale, in_shift)
    y, mean, var = _conv2d_fused_op(x, weight, *_bn_args(bn), stride, padding, dilation, groups, residual,
                                    shortcut_x, shortcut_weight, *_bn_args(shortcut_bn), shortcut_stride,
                                    bool(relu), in_scale, in_shift, bool(stats))
    return (y, mean, var) if stats else y


def conv2d_bn_train(x: Tensor, weight: Tensor, bn: TrainBN, stride=1, padding=0, dilation=1, groups: int = 1,
                    in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A training convolution and its BatchNorm's whole finalize in ONE launch: ``c = conv2d(a, weight)`` with
    ``a`` as in :func:`conv2d_fused` (the BN+ReLU prologue when ``in_scale``/``in_shift`` are given), the batch
    mean and biased variance of ``c`` per channel (of its fp32 values before the rounding to x's dtype),
    ``scale = γ/√(var + ε)``, ``shift = β − mean·scale``, and ``bn``'s running statistics and
    ``num_batches_tracked`` updated in place as ``torch.nn.BatchNorm2d`` updates them. Returns
    ``(c, mean, var, scale, shift)``, the vectors fp32. Not differentiable by itself. A batch of one value per
    channel raises PyTorch's error, before anything is updated."""
    op = "triton conv2d_bn_train"
    stride, padding, dilation, _, _, in_scale, in_shift = _checked(x, weight, None, stride, padding, dilation, groups,
                                                                   None, None, None, None, 1, in_scale, in_shift)
    if not isinstance(bn, TrainBN):
        raise TypeError(f"{op}: bn must be a TrainBN, got {type(bn).__name__}")
    if (bn.weight is None) != (bn.bias is None) or (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(f"{op}: bn.weight and bn.bias, bn.running_mean and bn.running_var go together")
    k = weight.shape[0]
    for field in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, field)
        if t is not None and (t.shape != (k,) or not t.is_floating_point() or t.device != x.device
                              or not t.is_contiguous()):
            raise ValueError(f"{op}: bn.{field} must be a contiguous floating-point vector of {k} channels on "
                             f"{x.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    nbt = bn.num_batches_tracked
    if nbt is not None and (nbt.numel() != 1 or nbt.dtype != torch.int64 or nbt.device != x.device):
        raise ValueError(f"{op}: bn.num_batches_tracked must be one int64 on {x.device}, got {nbt.dtype} "
                         f"{tuple(nbt.shape)} on {nbt.device}")
    if bn.momentum is None and bn.running_mean is not None and nbt is None:
        raise ValueError(f"{op}: a cumulative average (momentum=None) needs num_batches_tracked")
    shape = torch.Size((x.shape[0], k, *_output_hw(x, weight, stride, padding, dilation)))
    check_batch_size(shape[0] * shape[2] * shape[3], shape)
    return _conv2d_bn_train_op(x, weight, stride, padding, dilation, groups, in_scale, in_shift, bn.weight, bn.bias,
                               bn.running_mean, bn.running_var, bn.num_batches_tracked,
                               float(bn.momentum or 0.0), bn.momentum is None, float(bn.eps))
