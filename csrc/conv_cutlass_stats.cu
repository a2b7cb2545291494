// CUTLASS implicit-GEMM convolution whose epilogue also makes per-output-channel batch statistics, for the
// training path (interface and coverage rules in conv_cutlass.h).
//
// cutlass_conv_stats:  c = conv2d(x, W);  mean[k], var[k] (biased) of the stored c over its N*P*Q pixels.
//   Mainloop and tiles as cutlass_conv_fprop (conv_cutlass_common.h), fp16 or bf16, fp32 accumulation.
//   Epilogue: EpilogueWithStats below, written for this kernel on CUTLASS's epilogue building blocks after the
//   pattern of cutlass::epilogue::threadblock::EpilogueWithReduction. Each output tile goes through shared
//   memory as usual, is rounded to the output dtype and stored. Every thread keeps, per column it owns, shifted
//   sums Σy, Σy² of y = v - pivot over the values v it stored (converted back to fp32), pivot = its first
//   stored value in that column, and a count of the rows it stored (rows at or past N*P*Q are neither stored
//   nor counted). At the end each thread turns them into (n, pivot, mean - pivot, M2); these are gathered in
//   shared memory and merged per column in a fixed order with Chan's formula (fp32, means about a reference
//   value ref, the first pivot), and the tile writes (n, ref) and (dmean = mean - ref, M2) per column to a
//   workspace [tiles_m, 2K] of float pairs (row = tile row of the implicit GEMM).
//   Merge: two small kernels with a fixed order (bitwise reproducible results, no atomics): Chan's formula in
//   fp64 over the tile rows in chunks (tile mean = ref + dmean, exact in fp64), then over the chunks;
//   var = max(M2/n, 0) (biased), n = Σ tile counts = N*P*Q.
//   Precision: nothing is summed about zero, so the error does not depend on how far the mean is from zero.
//   A thread's pivot is one of its n <= 16 values, so n*(mean - pivot)² <= (n-1)*M2 (Samuelson) and Σy² <= n*M2:
//   the fp32 cancellation M2 = Σy² - (Σy)²/n and the summation cost at most ~n² ulps (worst case ~2e-5
//   relative, typically ~1e-6). Chan's merges add non-negative terms and differences of means of the order
//   of the spread of the values (O(ulp) relative each); the tile merges are fp64. The variance is therefore
//   accurate to ~1e-6 relative (worst case ~2e-5) of the stored c's variance whatever mean²/var, the mean to
//   fp32 rounding; the statistics are of the stored (rounded) c, as BatchNorm sees it.
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

// Count, mean and sum of squared deviations (M2) of a set of values, and Chan et al.'s merge of a second set
// into it (the merge of channel_pass.cuh's Welford, here templated: float for the gather inside a tile, double
// for the merge of the tiles). Merging an empty set changes nothing; every M2 term it adds is >= 0.
template <typename T>
struct Moments {
  T n, mean, m2;

  __device__ __forceinline__ void merge(T n_b, T mean_b, T m2_b) {
    if (n_b == T(0)) {
      return;
    }
    if (n == T(0)) {
      n = n_b;
      mean = mean_b;
      m2 = m2_b;
      return;
    }
    const T total = n + n_b;
    const T w = n_b / total;
    const T d = mean_b - mean;
    mean += d * w;
    m2 += m2_b + d * d * n * w;
    n = total;
  }
};

// Two floats of a tile's statistics workspace row (see EpilogueWithStats).
struct alignas(8) TileStatsPair {
  float first, second;
};

// Threadblock epilogue: stores the output tile (output op applied to the accumulators) and writes the tile's
// per-column statistics of the stored values: count n, a reference value ref (one of the values), the mean's
// offset from it dmean (mean = ref + dmean) and M2 = Σ(v - mean)². Interface of the epilogues that
// cutlass::conv::kernel::ImplicitGemmConvolutionWithFusedEpilogue runs: the "vector" pointer it passes is this
// tile's row of the workspace, already advanced to the tile's first column, in units of TileStatsPair (row
// stride ldr = 2K pairs); (n, ref) go to pairs [0, K), (dmean, M2) to pairs [K, 2K) of that row. The source
// tensor C and the auxiliary tensor are not used.
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
  using ElementVector = TileStatsPair;  // the workspace of tile statistics
  using AccumulatorTile = typename Base::AccumulatorTile;
  using ThreadMap = typename OutputTileIterator::ThreadMap;

  static int const kThreads = 32 * Base::WarpCount::kCount;
  static int const kElementsPerAccess = OutputTileIterator::kElementsPerAccess;
  // Each thread covers the same columns in every row it stores: Iterations::kColumn vectors per row.
  static int const kColumnsPerThread = ThreadMap::Iterations::kColumn * kElementsPerAccess;
  static int const kRowsPerThread = ThreadMap::Iterations::kCount / ThreadMap::Iterations::kColumn;
  // Threads' statistics are gathered in [kThreadRows, Shape::kN] grids: thread t fills row t / kThreadsPerRow at
  // its own columns (check_thread_map() verifies on the host that this places every thread's column in its own
  // cell).
  static int const kThreadsPerRow = Shape::kN / kColumnsPerThread;
  static int const kThreadRows = kThreads / kThreadsPerRow;
  // The gather grids, in this order: n, pivot, mean - pivot, M2.
  static int const kGatherGrids = 4;

  using ColumnStats = cutlass::Array<float, kColumnsPerThread>;

  static_assert(kPartitionsK == 1, "EpilogueWithStats expects one warp along the GEMM K dimension");
  static_assert(SharedLoadIterator::Fragment::kElements == OutputTileIterator::Fragment::kElements,
                "shared load and output fragments must match");
  static_assert(OutputTileIterator::Fragment::kElements == kRowsPerThread * kColumnsPerThread,
                "an output fragment is kRowsPerThread rows of the thread's columns");
  static_assert(kThreadsPerRow * kColumnsPerThread == Shape::kN && kThreadRows * kThreadsPerRow == kThreads,
                "the threads' column statistics must tile the gather grid exactly");

  struct SharedStorage {
    union {
      typename Base::SharedStorage base;
      cutlass::AlignedArray<float, kGatherGrids * kThreadRows * Shape::kN, 16> stats;
    };

    CUTLASS_HOST_DEVICE
    SharedStorage() {}
  };

  // Offset of fragment row r (of an OutputTileIterator fragment) from the iterator's thread_start_row(): the
  // row arithmetic of PredicatedTileIterator's store, whose guard row_offset + thread_start_row < extent_row
  // decides whether the row is stored.
  CUTLASS_HOST_DEVICE
  static constexpr int fragment_row_offset(int r) {
    return (r % ThreadMap::Iterations::kRow) * ThreadMap::Delta::kRow +
           (r / ThreadMap::Iterations::kRow % ThreadMap::Iterations::kGroup) * ThreadMap::Delta::kGroup +
           (r / (ThreadMap::Iterations::kRow * ThreadMap::Iterations::kGroup)) * ThreadMap::Delta::kCluster;
  }

  // Host check of the gather-grid placement: every (thread, column) lands in a distinct cell whose column is
  // the output column it belongs to.
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
        stats_(shared_storage.stats.data()),
        thread_idx_(thread_idx) {}

  CUTLASS_DEVICE
  void operator()(OutputOp const& output_op, ElementVector* tile_stats, OutputTileIterator destination_iterator,
                  AccumulatorTile const& accumulators, OutputTileIterator, TensorTileIterator,
                  cutlass::MatrixCoord const& problem_size, cutlass::MatrixCoord const& threadblock_offset) {
    // Per column the thread owns: shifted sums of y = v - pivot over the rows it stored, pivot = its first
    // stored value in that column (set at the first stored row; count, the number of stored rows, is the same
    // for all of the thread's columns). Rows at or past N*P*Q are not stored and not counted.
    float count = 0.f;
    ColumnStats pivot, sum, sum_sq;
    pivot.clear();
    sum.clear();
    sum_sq.clear();
    const int extent_row = destination_iterator.extent_row();

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
      const int start_row = destination_iterator.thread_start_row();
      destination_iterator.store(output);
      ++destination_iterator;

      // Statistics of the values as stored.
      cutlass::NumericArrayConverter<float, ElementOutput, OutputTileIterator::Fragment::kElements> to_float;
      const auto stored = to_float(output);
      CUTLASS_PRAGMA_UNROLL
      for (int row = 0; row < kRowsPerThread; ++row) {
        if (start_row + fragment_row_offset(row) >= extent_row) {
          continue;
        }
        if (count == 0.f) {
          CUTLASS_PRAGMA_UNROLL
          for (int column = 0; column < kColumnsPerThread; ++column) {
            pivot[column] = stored[row * kColumnsPerThread + column];
          }
        }
        count += 1.f;
        CUTLASS_PRAGMA_UNROLL
        for (int column = 0; column < kColumnsPerThread; ++column) {
          const float y = stored[row * kColumnsPerThread + column] - pivot[column];
          sum[column] += y;
          sum_sq[column] = fmaf(y, y, sum_sq[column]);
        }
      }
    }

    if (tile_stats != nullptr) {
      write_tile_stats(tile_stats, count, pivot, sum, sum_sq, threadblock_offset.column(), problem_size.column());
    }
  }

 private:
  // Gathers the threads' (n, pivot, mean - pivot, M2) per column in shared memory and writes the tile's
  // (n, ref) and (dmean, M2) per column (the problem's columns only: tile_column + column < K =
  // problem_columns). Per column, the gather rows are merged in order with Chan's formula in fp32, about
  // ref = the pivot of the first gather row with n > 0 (every tile has a stored row, so one exists).
  CUTLASS_DEVICE
  void write_tile_stats(ElementVector* tile_stats, float count, ColumnStats const& pivot, ColumnStats const& sum,
                        ColumnStats const& sum_sq, int tile_column, int problem_columns) {
    constexpr int kGrid = kThreadRows * Shape::kN;
    __syncthreads();  // the shared memory of the tile slices is reused
    const int first = ThreadMap::initial_offset(thread_idx_).column();
    const int cell_row = (thread_idx_ / kThreadsPerRow) * Shape::kN;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < ThreadMap::Iterations::kColumn; ++c) {
      CUTLASS_PRAGMA_UNROLL
      for (int e = 0; e < kElementsPerAccess; ++e) {
        const int i = c * kElementsPerAccess + e;
        const int cell = cell_row + first + c * ThreadMap::Delta::kColumn + e;
        // n * shifted mean² <= Σy² when the pivot is one of the n values, so the cancellation below costs at
        // most a factor n (kRowsPerThread * kIterations) of fp32 rounding.
        const float mean = count > 0.f ? sum[i] / count : 0.f;
        stats_[cell] = count;
        stats_[kGrid + cell] = pivot[i];
        stats_[2 * kGrid + cell] = mean;
        stats_[3 * kGrid + cell] = count > 0.f ? fmaxf(fmaf(-sum[i], mean, sum_sq[i]), 0.f) : 0.f;
      }
    }
    __syncthreads();

    for (int column = thread_idx_; column < Shape::kN; column += kThreads) {
      if (tile_column + column >= problem_columns) {
        continue;
      }
      Moments<float> total{0.f, 0.f, 0.f};
      float ref = 0.f;
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kThreadRows; ++r) {
        const int cell = r * Shape::kN + column;
        const float n = stats_[cell];
        if (n == 0.f) {
          continue;
        }
        if (total.n == 0.f) {
          ref = stats_[kGrid + cell];
        }
        // The cell's mean about ref: pivot - ref is a difference of two stored values (exact, or rounded
        // relative to itself), dmean is of the order of the spread of the values.
        total.merge(n, (stats_[kGrid + cell] - ref) + stats_[2 * kGrid + cell], stats_[3 * kGrid + cell]);
      }
      tile_stats[column] = {total.n, ref};
      tile_stats[problem_columns + column] = {total.mean, total.m2};
    }
  }

  SharedLoadIterator shared_load_iterator_;
  float* stats_;
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

// Merge of the tile statistics: 32 channels x 8 rows per block, Chan's formula in fp64.
constexpr int kMergeChannels = 32;
constexpr int kMergeRows = 8;
// Tile rows are merged in at most this many chunks (one block row each) before the final pass.
constexpr int kMaxChunks = 128;

// Merges the 8 row-partials of channel threadIdx.x held in `part` (fp64, [3][kMergeRows][kMergeChannels]:
// n, mean, M2) in row order.
__device__ __forceinline__ Moments<double> merge_rows(double (&part)[3][kMergeRows][kMergeChannels]) {
  Moments<double> total{0.0, 0.0, 0.0};
#pragma unroll
  for (int r = 0; r < kMergeRows; ++r) {
    total.merge(part[0][r][threadIdx.x], part[1][r][threadIdx.x], part[2][r][threadIdx.x]);
  }
  return total;
}

// chunk_stats[g] = the (n, mean, M2) of channel k over the tile rows t of chunk g, merged in fp64; a tile's
// mean is ref + dmean (exact in fp64).
//   tile_stats  [tiles, 2K] pairs: (n, ref) at [0, K), (dmean, M2) at [K, 2K)
//   chunk_stats [gridDim.y, 3K] fp64: n at [0, K), mean at [K, 2K), M2 at [2K, 3K)
// Thread (x, y) merges rows y, y + 8, ... of its chunk for channel k; the 8 partials are then merged in order.
__global__ void __launch_bounds__(kMergeChannels* kMergeRows)
    stats_chunk_kernel(const TileStatsPair* __restrict__ tile_stats, int tiles, int tiles_per_chunk, int K,
                       double* __restrict__ chunk_stats) {
  __shared__ double part[3][kMergeRows][kMergeChannels];
  const int k = blockIdx.x * kMergeChannels + threadIdx.x;
  const int begin = blockIdx.y * tiles_per_chunk;
  const int end = min(begin + tiles_per_chunk, tiles);
  Moments<double> m{0.0, 0.0, 0.0};
  if (k < K) {
    for (int t = begin + threadIdx.y; t < end; t += kMergeRows) {
      const TileStatsPair* row = tile_stats + static_cast<int64_t>(t) * 2 * K;
      const TileStatsPair n_ref = row[k], dmean_m2 = row[K + k];
      m.merge(n_ref.first, static_cast<double>(n_ref.second) + static_cast<double>(dmean_m2.first),
              dmean_m2.second);
    }
  }
  part[0][threadIdx.y][threadIdx.x] = m.n;
  part[1][threadIdx.y][threadIdx.x] = m.mean;
  part[2][threadIdx.y][threadIdx.x] = m.m2;
  __syncthreads();
  if (threadIdx.y == 0 && k < K) {
    const Moments<double> total = merge_rows(part);
    double* out = chunk_stats + static_cast<int64_t>(blockIdx.y) * 3 * K;
    out[k] = total.n;
    out[K + k] = total.mean;
    out[2 * K + k] = total.m2;
  }
}

// mean[k], var[k] = max(M2/n, 0) (biased) from the chunk statistics (merged like the tile rows above).
__global__ void __launch_bounds__(kMergeChannels* kMergeRows)
    stats_finalize_kernel(const double* __restrict__ chunk_stats, int chunks, int K, float* __restrict__ mean,
                          float* __restrict__ var) {
  __shared__ double part[3][kMergeRows][kMergeChannels];
  const int k = blockIdx.x * kMergeChannels + threadIdx.x;
  Moments<double> m{0.0, 0.0, 0.0};
  if (k < K) {
    for (int g = threadIdx.y; g < chunks; g += kMergeRows) {
      const double* row = chunk_stats + static_cast<int64_t>(g) * 3 * K;
      m.merge(row[k], row[K + k], row[2 * K + k]);
    }
  }
  part[0][threadIdx.y][threadIdx.x] = m.n;
  part[1][threadIdx.y][threadIdx.x] = m.mean;
  part[2][threadIdx.y][threadIdx.x] = m.m2;
  __syncthreads();
  if (threadIdx.y == 0 && k < K) {
    const Moments<double> total = merge_rows(part);
    mean[k] = static_cast<float>(total.mean);
    var[k] = static_cast<float>(fmax(total.m2 / total.n, 0.0));
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

  // Workspace: the chunk statistics (fp64, 3K per chunk) first, then the tile statistics (2K pairs of fp32
  // per tile row; the kernel's ldr = 2K counts pairs); both written before they are read. The epilogue's
  // gather shares the kernel's shared memory with the mainloop (a union) and must not enlarge it.
  static_assert(sizeof(typename ConvStats<Element>::Epilogue::SharedStorage) <=
                    sizeof(typename ConvStats<Element>::Base::Mma::SharedStorage),
                "the statistics gather must fit in the mainloop's shared memory");
  const size_t chunk_bytes = sizeof(double) * static_cast<size_t>(chunks) * 3 * K;
  const size_t tile_bytes = sizeof(TileStatsPair) * static_cast<size_t>(tiles) * 2 * K;
  const auto args = stats_arguments<Element>(p, x, w, c, nullptr);
  const size_t cutlass_bytes = Conv::get_workspace_size(args);
  const size_t cutlass_offset = (chunk_bytes + tile_bytes + 255) / 256 * 256;
  const c10::DataPtr workspace = c10::cuda::CUDACachingAllocator::get()->allocate(cutlass_offset + cutlass_bytes);
  auto* base = static_cast<char*>(workspace.get());
  auto* chunk_stats = reinterpret_cast<double*>(base);
  auto* tile_stats = reinterpret_cast<TileStatsPair*>(base + chunk_bytes);
  auto* tile_sums = reinterpret_cast<float*>(tile_stats);  // the same, as stats_arguments' ptr_Vector
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
      tile_stats, tiles, tiles_per_chunk, K, chunk_stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  stats_finalize_kernel<<<channel_blocks, block, 0, stream>>>(chunk_stats, chunks, K, mean, var);
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
