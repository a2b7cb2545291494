// CUTLASS implicit-GEMM convolution whose epilogue also makes per-output-channel batch statistics, for the
// training path (interface and coverage rules in conv_cutlass.h).
//
// cutlass_conv_stats:  c = conv2d(x, W);  mean[k], var[k] (biased) of the stored c over its N*P*Q pixels.
//   Mainloop and tiles as cutlass_conv_fprop (conv_cutlass_common.h), fp16 or bf16, fp32 accumulation.
//   Epilogue: EpilogueWithStats below, written for this kernel on CUTLASS's epilogue building blocks after the
//   pattern of cutlass::epilogue::threadblock::EpilogueWithReduction. Each output tile goes through shared
//   memory as usual, is rounded to the output dtype and stored; every thread adds the values it stored
//   (converted back to fp32) and their squares into per-column sums; at the end the threads' sums are
//   gathered in shared memory and added per column in a fixed order, and the tile writes one (Σ, Σ²) pair
//   per column to a workspace [tiles_m, 2K] (row = tile row of the implicit GEMM). Rows past N*P*Q have zero
//   accumulators (the mainloop zero-fills out-of-bounds loads), so they add nothing.
//   Merge: two small kernels with a fixed summation order (bitwise reproducible results): fp64 sums of the
//   tile rows in chunks, then over the chunks; mean = Σ/n, var = max(Σ²/n - mean², 0), n = N*P*Q.
//   Precision: the fp32 tile sums bound the variance's relative error by roughly 1e-7 * (1 + mean²/var), the
//   usual cost of Σ/Σ² statistics (cuDNN's fused conv + stats kernels also produce fp32 Σ and Σ²).
//   Not implemented: the BN+ReLU prologue on load (CUTLASS example 25's mainloop fusion; its scale-bias-ReLU
//   transform is fp16-only and pads with a value that must come out as 0 after the activation, so bf16 needs
//   its own transform). Calls with in_scale / in_shift return false.
#include "conv_cutlass.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#ifdef RESNET_FUSED_WITH_CUTLASS
#include "cutlass/array.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop.h"
#include "cutlass/conv/kernel/implicit_gemm_convolution_with_fused_epilogue.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/epilogue/threadblock/default_epilogue_tensor_op.h"
#include "cutlass/epilogue/threadblock/epilogue_base.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/numeric_types.h"

#include "conv_cutlass_common.h"
#endif

namespace resnet_fused {

#ifndef RESNET_FUSED_WITH_CUTLASS

bool cutlass_conv_stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                        at::Tensor&, at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t) {
  return false;
}

#else

namespace {

// Threadblock epilogue: stores the output tile (output op applied to the accumulators) and writes the tile's
// per-column sums of the stored values and of their squares. Interface of the epilogues that
// cutlass::conv::kernel::ImplicitGemmConvolutionWithFusedEpilogue runs: the "vector" pointer it passes is this
// tile's row of the workspace, already advanced to the tile's first column; Σ goes to [0, K), Σ² to [K, 2K)
// of that row. The source tensor C and the auxiliary tensor are not used.
template <typename Shape_, typename WarpMmaOperator_, int PartitionsK, typename OutputTileIterator_,
          typename AccumulatorFragmentIterator_, typename WarpTileIterator_, typename SharedLoadIterator_,
          typename OutputOp_, typename Padding_>
class EpilogueWithStats
    : public cutlass::epilogue::threadblock::EpilogueBase<Shape_, typename WarpMmaOperator_::Shape, PartitionsK,
                                                          AccumulatorFragmentIterator_, WarpTileIterator_,
                                                          Padding_> {
 public:
  using Base = cutlass::epilogue::threadblock::EpilogueBase<Shape_, typename WarpMmaOperator_::Shape, PartitionsK,
                                                            AccumulatorFragmentIterator_, WarpTileIterator_,
                                                            Padding_>;
  using Shape = Shape_;
  using WarpMmaOperator = WarpMmaOperator_;
  static int const kPartitionsK = PartitionsK;
  using OutputTileIterator = OutputTileIterator_;
  using TensorTileIterator = OutputTileIterator_;  // required by the kernel; never used
  using AccumulatorFragmentIterator = AccumulatorFragmentIterator_;
  using WarpTileIterator = WarpTileIterator_;
  using SharedLoadIterator = SharedLoadIterator_;
  using OutputOp = OutputOp_;
  using Padding = Padding_;

  using ElementOutput = typename OutputTileIterator::Element;
  using ElementTensor = typename TensorTileIterator::Element;
  using ElementVector = float;  // the workspace of tile sums
  using AccumulatorTile = typename Base::AccumulatorTile;
  using ThreadMap = typename OutputTileIterator::ThreadMap;

  static int const kThreads = 32 * Base::WarpCount::kCount;
  static int const kElementsPerAccess = OutputTileIterator::kElementsPerAccess;
  // Each thread covers the same columns in every row it stores: Iterations::kColumn vectors per row.
  static int const kColumnsPerThread = ThreadMap::Iterations::kColumn * kElementsPerAccess;
  static int const kRowsPerThread = ThreadMap::Iterations::kCount / ThreadMap::Iterations::kColumn;
  // Threads' sums are gathered in a [kThreadRows, Shape::kN] grid: thread t fills row t / kThreadsPerRow at its
  // own columns (check_thread_map() verifies on the host that this places every sum in its own cell).
  static int const kThreadsPerRow = Shape::kN / kColumnsPerThread;
  static int const kThreadRows = kThreads / kThreadsPerRow;

  using ColumnSums = cutlass::Array<float, kColumnsPerThread>;

  static_assert(kPartitionsK == 1, "EpilogueWithStats expects one warp along the GEMM K dimension");
  static_assert(SharedLoadIterator::Fragment::kElements == OutputTileIterator::Fragment::kElements,
                "shared load and output fragments must match");
  static_assert(OutputTileIterator::Fragment::kElements == kRowsPerThread * kColumnsPerThread,
                "an output fragment is kRowsPerThread rows of the thread's columns");
  static_assert(kThreadsPerRow * kColumnsPerThread == Shape::kN && kThreadRows * kThreadsPerRow == kThreads,
                "the threads' column sums must tile the gather grid exactly");

  struct SharedStorage {
    union {
      typename Base::SharedStorage base;
      cutlass::AlignedArray<float, 2 * kThreadRows * Shape::kN, 16> sums;  // Σ rows, then Σ² rows
    };

    CUTLASS_HOST_DEVICE
    SharedStorage() {}
  };

  // Host check of the gather-grid placement: every (thread, column) sum lands in a distinct cell whose column
  // is the output column it belongs to.
  static bool check_thread_map() {
    bool used[kThreadRows][Shape::kN] = {};
    for (int t = 0; t < kThreads; ++t) {
      const int first = ThreadMap::initial_offset(t).column();
      if (first != (t % kThreadsPerRow) * kElementsPerAccess) {
        return false;
      }
      for (int c = 0; c < ThreadMap::Iterations::kColumn; ++c) {
        for (int e = 0; e < kElementsPerAccess; ++e) {
          const int column = first + c * ThreadMap::Delta::kColumn + e;
          if (column >= Shape::kN || used[t / kThreadsPerRow][column]) {
            return false;
          }
          used[t / kThreadsPerRow][column] = true;
        }
      }
    }
    return true;
  }

  CUTLASS_DEVICE
  EpilogueWithStats(SharedStorage& shared_storage, int thread_idx, int warp_idx, int lane_idx)
      : Base(shared_storage.base, thread_idx, warp_idx, lane_idx),
        shared_load_iterator_(shared_storage.base.reference(), thread_idx),
        sums_(shared_storage.sums.data()),
        thread_idx_(thread_idx) {}

  CUTLASS_DEVICE
  void operator()(OutputOp const& output_op, ElementVector* tile_sums, OutputTileIterator destination_iterator,
                  AccumulatorTile const& accumulators, OutputTileIterator, TensorTileIterator,
                  cutlass::MatrixCoord const& problem_size, cutlass::MatrixCoord const& threadblock_offset) {
    ColumnSums sum, sum_sq;
    sum.clear();
    sum_sq.clear();

    using AccumulatorAccess = cutlass::Array<typename WarpTileIterator::Element, kElementsPerAccess>;
    using OutputAccess = cutlass::Array<ElementOutput, kElementsPerAccess>;
    constexpr int kAccesses = OutputTileIterator::Fragment::kElements / kElementsPerAccess;

    AccumulatorFragmentIterator accum_fragment_iterator(accumulators);

    // Fully unrolled, so the accumulator fragments are indexed statically (they stay in registers).
    CUTLASS_PRAGMA_UNROLL
    for (int iter = 0; iter < OutputTileIterator::kIterations; ++iter) {
      typename AccumulatorFragmentIterator::Fragment accum_fragment;
      accum_fragment_iterator.load(accum_fragment);
      ++accum_fragment_iterator;

      __syncthreads();  // every thread has read the previous tile slice from shared memory
      this->warp_tile_iterator_.store(accum_fragment);
      __syncthreads();

      typename SharedLoadIterator::Fragment aligned_accum;
      shared_load_iterator_.load(aligned_accum);

      typename OutputTileIterator::Fragment output;
      auto const* accum_ptr = reinterpret_cast<AccumulatorAccess const*>(&aligned_accum);
      auto* output_ptr = reinterpret_cast<OutputAccess*>(&output);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kAccesses; ++i) {
        output_ptr[i] = output_op(accum_ptr[i]);
      }
      destination_iterator.store(output);
      ++destination_iterator;

      // Statistics of the values as stored.
      cutlass::NumericArrayConverter<float, ElementOutput, OutputTileIterator::Fragment::kElements> to_float;
      const auto stored = to_float(output);
      CUTLASS_PRAGMA_UNROLL
      for (int row = 0; row < kRowsPerThread; ++row) {
        CUTLASS_PRAGMA_UNROLL
        for (int column = 0; column < kColumnsPerThread; ++column) {
          const float v = stored[row * kColumnsPerThread + column];
          sum[column] += v;
          sum_sq[column] = fmaf(v, v, sum_sq[column]);
        }
      }
    }

    if (tile_sums != nullptr) {
      write_tile_sums(tile_sums, sum, sum_sq, threadblock_offset.column(), problem_size.column());
    }
  }

 private:
  // Gathers the threads' column sums in shared memory and writes the tile's Σ and Σ² per column (the
  // problem's columns only: tile_column + column < K = problem_columns), each added over the gather rows in
  // order.
  CUTLASS_DEVICE
  void write_tile_sums(float* tile_sums, ColumnSums const& sum, ColumnSums const& sum_sq, int tile_column,
                       int problem_columns) {
    __syncthreads();  // the shared memory of the tile slices is reused
    const int first = ThreadMap::initial_offset(thread_idx_).column();
    const int gather_row = thread_idx_ / kThreadsPerRow;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < ThreadMap::Iterations::kColumn; ++c) {
      CUTLASS_PRAGMA_UNROLL
      for (int e = 0; e < kElementsPerAccess; ++e) {
        const int column = first + c * ThreadMap::Delta::kColumn + e;
        sums_[gather_row * Shape::kN + column] = sum[c * kElementsPerAccess + e];
        sums_[(kThreadRows + gather_row) * Shape::kN + column] = sum_sq[c * kElementsPerAccess + e];
      }
    }
    __syncthreads();

    for (int column = thread_idx_; column < Shape::kN; column += kThreads) {
      if (tile_column + column >= problem_columns) {
        continue;
      }
      float s = 0.f, s2 = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kThreadRows; ++r) {
        s += sums_[r * Shape::kN + column];
        s2 += sums_[(kThreadRows + r) * Shape::kN + column];
      }
      tile_sums[column] = s;
      tile_sums[problem_columns + column] = s2;
    }
  }

  SharedLoadIterator shared_load_iterator_;
  float* sums_;
  int thread_idx_;
};

// The conv + stats kernel per dtype: DefaultConv2dFprop's mainloop (tiles in conv_cutlass_common.h) with
// EpilogueWithStats assembled from the default tensor-op epilogue's iterators; the output op rounds the
// accumulators to the output dtype (no scaling, no source).
template <typename Element>
struct ConvStats {
  static constexpr int kAccess = 128 / cutlass::sizeof_bits<Element>::value;  // 8 elements = 16 bytes
  using OutputOp = cutlass::epilogue::thread::LinearCombination<Element, kAccess, float, float,
                                                                cutlass::epilogue::thread::ScaleType::Nothing>;
  using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>;
  using Base = typename cutlass::conv::kernel::DefaultConv2dFprop<
      Element, cutlass::layout::TensorNHWC, Element, cutlass::layout::TensorNHWC, Element,
      cutlass::layout::TensorNHWC, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass_conv::ThreadblockShape, cutlass_conv::WarpShape, cutlass_conv::InstructionShape, OutputOp, Swizzle,
      cutlass_conv::kStages, cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  using Defaults = cutlass::epilogue::threadblock::DefaultEpilogueTensorOp<
      typename Base::Epilogue::Shape, typename Base::Epilogue::WarpMmaOperator, Base::Epilogue::kPartitionsK,
      OutputOp, kAccess>;
  using Epilogue = EpilogueWithStats<typename Base::Epilogue::Shape, typename Base::Epilogue::WarpMmaOperator,
                                     Base::Epilogue::kPartitionsK, typename Defaults::OutputTileIterator,
                                     typename Defaults::AccumulatorFragmentIterator,
                                     typename Defaults::WarpTileIterator, typename Defaults::SharedLoadIterator,
                                     OutputOp, typename Defaults::Padding>;
  using Kernel = cutlass::conv::kernel::ImplicitGemmConvolutionWithFusedEpilogue<typename Base::Mma, Epilogue, Swizzle,
                                                                                 cutlass::conv::Operator::kFprop>;
  using Conv = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

// Merge of the tile sums: 32 channels x 8 rows per block.
constexpr int kMergeChannels = 32;
constexpr int kMergeRows = 8;
// Tile rows are summed in at most this many chunks (one block row each) before the final pass.
constexpr int kMaxChunks = 128;

// Adds the 8 row-partials of each channel held in `part` (fp64, [2][kMergeRows][kMergeChannels]) in row order.
__device__ __forceinline__ void add_rows(double (&part)[2][kMergeRows][kMergeChannels], double& s, double& s2) {
  s = 0.0;
  s2 = 0.0;
#pragma unroll
  for (int r = 0; r < kMergeRows; ++r) {
    s += part[0][r][threadIdx.x];
    s2 += part[1][r][threadIdx.x];
  }
}

// chunk_sums[g] = Σ over tile rows t in chunk g of tile_sums[t] (both halves: Σ and Σ²), in fp64.
//   tile_sums   [tiles, 2K] fp32        chunk_sums  [gridDim.y, 2K] fp64
// Thread (x, y) adds rows y, y + 8, ... of its chunk for channel k; the 8 partials are then added in order.
__global__ void __launch_bounds__(kMergeChannels* kMergeRows)
    stats_chunk_kernel(const float* __restrict__ tile_sums, int tiles, int tiles_per_chunk, int K,
                       double* __restrict__ chunk_sums) {
  __shared__ double part[2][kMergeRows][kMergeChannels];
  const int k = blockIdx.x * kMergeChannels + threadIdx.x;
  const int begin = blockIdx.y * tiles_per_chunk;
  const int end = min(begin + tiles_per_chunk, tiles);
  double s = 0.0, s2 = 0.0;
  if (k < K) {
    for (int t = begin + threadIdx.y; t < end; t += kMergeRows) {
      const float* row = tile_sums + static_cast<int64_t>(t) * 2 * K;
      s += row[k];
      s2 += row[K + k];
    }
  }
  part[0][threadIdx.y][threadIdx.x] = s;
  part[1][threadIdx.y][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y == 0 && k < K) {
    add_rows(part, s, s2);
    double* out = chunk_sums + static_cast<int64_t>(blockIdx.y) * 2 * K;
    out[k] = s;
    out[K + k] = s2;
  }
}

// mean[k] = S/n, var[k] = max(S2/n - mean², 0) from the chunk sums (added like the tile rows above).
__global__ void __launch_bounds__(kMergeChannels* kMergeRows)
    stats_finalize_kernel(const double* __restrict__ chunk_sums, int chunks, int K, double n,
                          float* __restrict__ mean, float* __restrict__ var) {
  __shared__ double part[2][kMergeRows][kMergeChannels];
  const int k = blockIdx.x * kMergeChannels + threadIdx.x;
  double s = 0.0, s2 = 0.0;
  if (k < K) {
    for (int g = threadIdx.y; g < chunks; g += kMergeRows) {
      const double* row = chunk_sums + static_cast<int64_t>(g) * 2 * K;
      s += row[k];
      s2 += row[K + k];
    }
  }
  part[0][threadIdx.y][threadIdx.x] = s;
  part[1][threadIdx.y][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y == 0 && k < K) {
    add_rows(part, s, s2);
    const double m = s / n;
    mean[k] = static_cast<float>(m);
    var[k] = static_cast<float>(fmax(s2 / n - m * m, 0.0));
  }
}

template <typename Element>
typename ConvStats<Element>::Conv::Arguments stats_arguments(const cutlass::conv::Conv2dProblemSize& p, void* x,
                                                             void* w, void* c, float* tile_sums) {
  using Layout = cutlass::layout::TensorNHWC;
  const Layout c_layout = Layout::packed({p.N, p.P, p.Q, p.K});
  auto* c_ptr = static_cast<Element*>(c);
  return typename ConvStats<Element>::Conv::Arguments(
      p, {static_cast<Element*>(x), Layout::packed({p.N, p.H, p.W, p.C})},
      {static_cast<Element*>(w), Layout::packed({p.K, p.R, p.S, p.C})}, {c_ptr, c_layout}, {c_ptr, c_layout},
      typename ConvStats<Element>::OutputOp::Params(), cutlass::conv::SplitKMode::kSerial,
      /*ptr_Vector=*/tile_sums, /*ptr_Tensor=*/nullptr, /*ldr=*/2 * p.K, /*ldt=*/0);
}

template <typename Element>
bool stats_can_implement(const cutlass::conv::Conv2dProblemSize& p) {
  static const bool thread_map_ok = ConvStats<Element>::Epilogue::check_thread_map();
  TORCH_CHECK(thread_map_ok, "resnet_fused::cutlass_conv_stats: unexpected CUTLASS epilogue thread map");
  return ConvStats<Element>::Conv::can_implement(stats_arguments<Element>(p, nullptr, nullptr, nullptr, nullptr)) ==
         cutlass::Status::kSuccess;
}

template <typename Element>
void run_stats(const cutlass::conv::Conv2dProblemSize& p, void* x, void* w, void* c, float* mean, float* var,
               c10::DeviceIndex device) {
  using Conv = typename ConvStats<Element>::Conv;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const cutlass::gemm::GemmCoord tiled = typename ConvStats<Element>::Swizzle().get_tiled_shape(
      cutlass::conv::Operator::kFprop, p,
      {cutlass_conv::ThreadblockShape::kM, cutlass_conv::ThreadblockShape::kN, cutlass_conv::ThreadblockShape::kK},
      1);
  const int tiles = tiled.m();
  const int chunks_wanted = std::min(tiles, kMaxChunks);
  const int tiles_per_chunk = (tiles + chunks_wanted - 1) / chunks_wanted;
  const int chunks = (tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  const int K = p.K;

  // Workspace: the chunk sums (fp64) first, then the tile sums (fp32); both written before they are read.
  const size_t chunk_bytes = sizeof(double) * static_cast<size_t>(chunks) * 2 * K;
  const size_t tile_bytes = sizeof(float) * static_cast<size_t>(tiles) * 2 * K;
  const auto args = stats_arguments<Element>(p, x, w, c, nullptr);
  const size_t cutlass_bytes = Conv::get_workspace_size(args);
  const size_t cutlass_offset = (chunk_bytes + tile_bytes + 255) / 256 * 256;
  const c10::DataPtr workspace = c10::cuda::CUDACachingAllocator::get()->allocate(cutlass_offset + cutlass_bytes);
  auto* base = static_cast<char*>(workspace.get());
  auto* chunk_sums = reinterpret_cast<double*>(base);
  auto* tile_sums = reinterpret_cast<float*>(base + chunk_bytes);
  void* cutlass_workspace = cutlass_bytes > 0 ? base + cutlass_offset : nullptr;

  Conv conv;
  cutlass::Status status =
      conv.initialize(stats_arguments<Element>(p, x, w, c, tile_sums), cutlass_workspace, stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "resnet_fused: CUTLASS conv+stats initialize failed: ",
              cutlass::cutlassGetStatusString(status));
  status = conv.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "resnet_fused: CUTLASS conv+stats launch failed: ",
              cutlass::cutlassGetStatusString(status));
  cutlass_conv::count_launch();

  const dim3 block(kMergeChannels, kMergeRows);
  const unsigned channel_blocks = static_cast<unsigned>((K + kMergeChannels - 1) / kMergeChannels);
  stats_chunk_kernel<<<dim3(channel_blocks, static_cast<unsigned>(chunks)), block, 0, stream>>>(
      tile_sums, tiles, tiles_per_chunk, K, chunk_sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const double n = static_cast<double>(p.N) * p.P * p.Q;
  stats_finalize_kernel<<<channel_blocks, block, 0, stream>>>(chunk_sums, chunks, K, n, mean, var);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool cutlass_conv_stats(const at::Tensor& x, const at::Tensor& w, const at::Tensor& in_scale,
                        const at::Tensor& in_shift, at::Tensor& c, at::Tensor& mean, at::Tensor& var,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* fn = "resnet_fused::cutlass_conv_stats";
  cutlass::conv::Conv2dProblemSize problem;
  if (!cutlass_conv::conv_problem(fn, x, w, c, stride, padding, dilation, groups, problem)) {
    return false;
  }
  const int64_t K = w.size(0);
  for (const at::Tensor* t : {&mean, &var}) {
    TORCH_CHECK(t->defined() && t->dim() == 1 && t->size(0) == K && t->scalar_type() == at::kFloat, fn,
                ": mean and var must be float32 of shape [K = ", K, "]");
    if (t->device() != x.device() || !t->is_contiguous()) {
      return false;
    }
  }
  if (in_scale.defined() || in_shift.defined()) {
    return false;  // the BN+ReLU prologue is not implemented
  }
  const bool half = x.scalar_type() == at::kHalf;
  if (!(half ? stats_can_implement<cutlass::half_t>(problem) : stats_can_implement<cutlass::bfloat16_t>(problem))) {
    return false;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  void* x_ptr = const_cast<void*>(x.const_data_ptr());
  void* w_ptr = const_cast<void*>(w.const_data_ptr());
  void* c_ptr = c.mutable_data_ptr();
  float* mean_ptr = mean.mutable_data_ptr<float>();
  float* var_ptr = var.mutable_data_ptr<float>();
  if (half) {
    run_stats<cutlass::half_t>(problem, x_ptr, w_ptr, c_ptr, mean_ptr, var_ptr, x.get_device());
  } else {
    run_stats<cutlass::bfloat16_t>(problem, x_ptr, w_ptr, c_ptr, mean_ptr, var_ptr, x.get_device());
  }
  return true;
}

#endif  // RESNET_FUSED_WITH_CUTLASS

}  // namespace resnet_fused
