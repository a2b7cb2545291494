// Per-channel passes over a dense [N, C, H, W] tensor (NHWC or NCHW): elementwise work with per-channel
// coefficients, optionally fused with per-channel reductions, for the memory-bound kernels of the training path
// (train_ops.cu) and the eval epilogue (eval_ops.cu).
//
// A pass is a functor `Op` with
//   State                          per-lane accumulator: NoState (pure elementwise pass), Sums<K> (K running sums)
//                                  or Welford (count, mean, M2); each has zero() and combine(a, b)
//   Coef<VEC>, coef<VEC, PER_LANE>(k0)
//                                  the per-channel coefficients of a pack whose lane j has channel k0 + j
//                                  (PER_LANE, NHWC) or k0 (NCHW)
//   apply<VEC>(i, coef, st)        computes pack i (elements [i*VEC, (i+1)*VEC)) of every operand and folds lane j's
//                                  values into st[j]
//   finish(k, state)               (reducing passes) writes channel k's total
//
// Every operand is dense in the launch's layout, so one linear element index addresses all of them. Threads
// move VEC consecutive elements with one 16-byte access per operand when the layout keeps a pack inside one row of
// channels (NHWC: C % VEC == 0) or one channel plane (NCHW: H*W % VEC == 0) and every pointer is 16-byte
// aligned; otherwise VEC = 1 (scalar accesses).
//
//   NHWC: the tensor is N*H*W rows of C/VEC packs. Thread (x, y) of a 2-D block owns channel pack x and walks
//         rows y, y + gridDim.y*blockDim.y, ...: its coefficients are loaded once, consecutive x are consecutive
//         packs (coalesced). A block's threads of one column are tree-combined per lane.
//   NCHW: block (k, p) owns channel k (coefficients loaded once) and the p-th slice of its N planes.
//
// Reductions are deterministic: every block writes its partial State per channel to a [blocks along the rows,
// C] buffer, and a merge kernel combines them in a fixed order (no atomics); the grid depends on the shape only.
// Math is fp32.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace resnet_fused {
namespace channel_pass {

constexpr int kThreads = 256;
// Packs each thread handles at least (rows in NHWC, packs of its channel in NCHW) before the grid grows: more
// work per thread amortizes the coefficient loads and the reduction at the end of a block.
constexpr int kPacksPerThread = 8;
// Blocks a pass aims for (about one wave of 256-thread blocks on an H100/H200); the reduction partials per
// channel grow with it.
constexpr int64_t kTargetBlocks = 1024;
// Merge kernel: channels per block x partial lanes per channel (each lane combines every kMergeLanes-th partial).
constexpr int kMergeChannels = 32;
constexpr int kMergeLanes = 32;

// VEC elements moved with one aligned 16-byte (or, for VEC = 1, scalar) memory transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// ReLU that propagates NaN like torch.relu.
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// The accumulator of a pass without a reduction.
struct NoState {
  __device__ static NoState zero() { return {}; }
};

// K running fp32 sums.
template <int K>
struct Sums {
  float v[K];

  __device__ static Sums zero() {
    Sums s;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      s.v[j] = 0.f;
    }
    return s;
  }

  __device__ static Sums combine(const Sums& a, const Sums& b) {
    Sums s;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      s.v[j] = a.v[j] + b.v[j];
    }
    return s;
  }
};

// Count, mean and sum of squared deviations (M2) of a set of values: Welford's update for one value, Chan et
// al.'s merge for two sets.
struct Welford {
  float n, mean, m2;

  __device__ static Welford zero() { return {0.f, 0.f, 0.f}; }

  __device__ __forceinline__ void push(float x) {
    n += 1.f;
    const float d = x - mean;
    mean += __fdividef(d, n);
    m2 = fmaf(d, x - mean, m2);
  }

  __device__ static Welford combine(const Welford& a, const Welford& b) {
    if (b.n == 0.f) {
      return a;
    }
    if (a.n == 0.f) {
      return b;
    }
    const float n = a.n + b.n;
    const float w = b.n / n;
    const float d = b.mean - a.mean;
    return {n, fmaf(d, w, a.mean), a.m2 + b.m2 + d * d * a.n * w};
  }
};

template <typename Op>
constexpr bool reduces() {
  return !std::is_same_v<typename Op::State, NoState>;
}

// Tree-combines the states v of the `count` threads t = 0..count-1 of a group (thread t's slot in smem is
// base + t*stride), in a fixed order; the group's total is returned to every thread of the block. Every thread
// of the block must call it (it synchronizes).
template <typename State>
__device__ State tree_combine(const State& v, State* smem, int base, int t, int count, int stride) {
  const int slot = base + t * stride;
  smem[slot] = v;
  __syncthreads();
  int half = 1;
  while (half < count) {
    half <<= 1;
  }
  for (half >>= 1; half > 0; half >>= 1) {
    if (t < half && t + half < count) {
      smem[slot] = State::combine(smem[slot], smem[slot + half * stride]);
    }
    __syncthreads();
  }
  const State total = smem[base];
  __syncthreads();
  return total;
}

// NHWC: `rows` (= N*H*W) rows of `packs_per_row` (= C / VEC) packs; see the file comment. Reducing passes write
// block row blockIdx.y's partial of every channel to partials[blockIdx.y * C + channel].
template <typename Op, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
nhwc_pass_kernel(Op op, index_t rows, index_t packs_per_row, typename Op::State* __restrict__ partials) {
  using State = typename Op::State;
  const index_t cp = static_cast<index_t>(blockIdx.x * blockDim.x + threadIdx.x);
  const bool active = cp < packs_per_row;
  if constexpr (!reduces<Op>()) {
    if (!active) {
      return;
    }
  }
  State st[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    st[j] = State::zero();
  }
  if (active) {
    const auto q = op.template coef<VEC, true>(cp * VEC);
    const index_t step = static_cast<index_t>(gridDim.y * blockDim.y);
    for (index_t r = static_cast<index_t>(blockIdx.y * blockDim.y + threadIdx.y); r < rows; r += step) {
      op.template apply<VEC>(r * packs_per_row + cp, q, st);
    }
  }
  if constexpr (reduces<Op>()) {
    __shared__ State smem[kThreads];
    const int64_t C = static_cast<int64_t>(packs_per_row) * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const State total = tree_combine(st[j], smem, threadIdx.x, threadIdx.y, blockDim.y, blockDim.x);
      if (active && threadIdx.y == 0) {
        partials[blockIdx.y * C + static_cast<int64_t>(cp) * VEC + j] = total;
      }
    }
  }
}

// NCHW: block (k, p) covers packs [p*packs_per_block, (p+1)*packs_per_block) of channel k's N planes of
// `packs_per_plane` (= H*W / VEC) packs. Reducing passes write partials[p * C + k].
template <typename Op, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
nchw_pass_kernel(Op op, index_t C, index_t packs_per_plane, index_t packs_per_channel, index_t packs_per_block,
                 typename Op::State* __restrict__ partials) {
  using State = typename Op::State;
  const index_t k = static_cast<index_t>(blockIdx.x);
  const auto q = op.template coef<VEC, false>(k);
  State st[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    st[j] = State::zero();
  }
  const index_t begin = static_cast<index_t>(blockIdx.y) * packs_per_block;
  const index_t end = begin + packs_per_block < packs_per_channel ? begin + packs_per_block : packs_per_channel;
  for (index_t p = begin + static_cast<index_t>(threadIdx.x); p < end; p += static_cast<index_t>(blockDim.x)) {
    const index_t n = p / packs_per_plane;
    op.template apply<VEC>((n * C + k) * packs_per_plane + (p - n * packs_per_plane), q, st);
  }
  if constexpr (reduces<Op>()) {
    __shared__ State smem[kThreads];
    State s = st[0];
#pragma unroll
    for (int j = 1; j < VEC; ++j) {
      s = State::combine(s, st[j]);
    }
    const State total = tree_combine(s, smem, 0, threadIdx.x, blockDim.x, 1);
    if (threadIdx.x == 0) {
      partials[static_cast<int64_t>(blockIdx.y) * C + k] = total;
    }
  }
}

// Combines the [n_partials, C] partial states of a reducing pass per channel in a fixed order and hands each
// channel's total to op.finish. Block: kMergeChannels channels x kMergeLanes lanes, lane y takes partials
// y, y + kMergeLanes, ...
template <typename Op>
__global__ void __launch_bounds__(kMergeChannels * kMergeLanes)
merge_partials_kernel(Op op, const typename Op::State* __restrict__ partials, int64_t n_partials, int64_t C) {
  using State = typename Op::State;
  __shared__ State smem[kMergeChannels * kMergeLanes];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kMergeChannels + threadIdx.x;
  State s = State::zero();
  if (k < C) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < n_partials; p += kMergeLanes) {
      s = State::combine(s, partials[p * C + k]);
    }
  }
  const State total = tree_combine(s, smem, threadIdx.x, threadIdx.y, kMergeLanes, kMergeChannels);
  if (k < C && threadIdx.y == 0) {
    op.finish(k, total);
  }
}

#define RESNET_FUSED_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline void check_cuda_dtype(const char* op, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op,
              " on CUDA supports float32/float16/bfloat16, got ", s);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename Op, int VEC, typename index_t>
void launch_pass_indexed(const Op& op, int64_t N, int64_t C, int64_t HW, bool channels_last,
                         const at::TensorOptions& float_options, cudaStream_t stream) {
  using State = typename Op::State;
  static_assert(!reduces<Op>() || sizeof(State) % sizeof(float) == 0, "partial states are stored in a float buffer");
  at::Tensor partial_buffer;
  State* partials = nullptr;
  int64_t n_partials = 0;
  const auto allocate_partials = [&](int64_t n) {
    if constexpr (reduces<Op>()) {
      n_partials = n;
      partial_buffer = at::empty({n * C * static_cast<int64_t>(sizeof(State) / sizeof(float))},
                                 float_options.dtype(at::kFloat));
      partials = reinterpret_cast<State*>(partial_buffer.mutable_data_ptr<float>());
    }
  };
  if (channels_last) {
    const int64_t packs_per_row = C / VEC, rows = N * HW;
    const int bx = static_cast<int>(std::min<int64_t>(packs_per_row, kThreads));
    const int by = kThreads / bx;
    const int64_t gx = ceil_div(packs_per_row, bx);
    TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max(), "resnet_fused: too many channels for one launch (", C,
                ")");
    const int64_t gy = std::clamp<int64_t>(
        std::min(ceil_div(rows, int64_t{by} * kPacksPerThread), ceil_div(kTargetBlocks, gx)), 1, 65535);
    allocate_partials(gy);
    nhwc_pass_kernel<Op, VEC, index_t>
        <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(bx, by), 0, stream>>>(
            op, static_cast<index_t>(rows), static_cast<index_t>(packs_per_row), partials);
  } else {
    const int64_t packs_per_plane = HW / VEC, packs_per_channel = N * packs_per_plane;
    TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), "resnet_fused: too many channels for one launch (", C,
                ")");
    int64_t gp = std::clamp<int64_t>(
        std::min(ceil_div(packs_per_channel, int64_t{kThreads} * kPacksPerThread), ceil_div(kTargetBlocks, C)), 1,
        65535);
    const int64_t packs_per_block = ceil_div(packs_per_channel, gp);
    gp = ceil_div(packs_per_channel, packs_per_block);
    allocate_partials(gp);
    nchw_pass_kernel<Op, VEC, index_t>
        <<<dim3(static_cast<unsigned>(C), static_cast<unsigned>(gp)), kThreads, 0, stream>>>(
            op, static_cast<index_t>(C), static_cast<index_t>(packs_per_plane),
            static_cast<index_t>(packs_per_channel), static_cast<index_t>(packs_per_block), partials);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (reduces<Op>()) {
    merge_partials_kernel<Op>
        <<<static_cast<unsigned>(ceil_div(C, kMergeChannels)), dim3(kMergeChannels, kMergeLanes), 0, stream>>>(
            op, partials, n_partials, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Runs pass `op` over a non-empty dense 4-D tensor of `sizes` in layout `mf` on the current stream: 16-byte packs
// when the layout allows it and `all_aligned` (every operand pointer is 16-byte aligned), else scalar; int32
// indices below 2^30 elements (headroom for the row loop's increments). `float_options` place the reduction
// partials (the operands' device).
template <typename scalar_t, typename Op>
void launch_pass(const Op& op, at::IntArrayRef sizes, at::MemoryFormat mf, bool all_aligned,
                 const at::TensorOptions& float_options) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t N = sizes[0], C = sizes[1], HW = sizes[2] * sizes[3];
  const bool channels_last = mf == at::MemoryFormat::ChannelsLast;
  const bool vec = all_aligned && (channels_last ? C % kVec == 0 : HW % kVec == 0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool small = N * C * HW < (int64_t{1} << 30);
  if (vec && small) {
    launch_pass_indexed<Op, kVec, int32_t>(op, N, C, HW, channels_last, float_options, stream);
  } else if (vec) {
    launch_pass_indexed<Op, kVec, int64_t>(op, N, C, HW, channels_last, float_options, stream);
  } else if (small) {
    launch_pass_indexed<Op, 1, int32_t>(op, N, C, HW, channels_last, float_options, stream);
  } else {
    launch_pass_indexed<Op, 1, int64_t>(op, N, C, HW, channels_last, float_options, stream);
  }
}

}  // namespace channel_pass
}  // namespace resnet_fused
