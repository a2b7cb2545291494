// CUTLASS implicit-GEMM convolution whose epilogue also makes per-output-channel batch statistics, for the
// training path (interface and coverage rules in conv_cutlass.h).
//
// cutlass_conv_stats:  c = conv2d(x, W);  mean[k], var[k] (biased) of the stored c over its N*P*Q pixels.
//   Mainloop as cutlass_conv_fprop's, one tile configuration (Tile128x128 of conv_cutlass_common.h), fp16 or bf16,
//   fp32 accumulation; the same threadblock swizzle rule (1x1 convs) and direct launch (cutlass_conv::launch).
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
//
// cutlass_conv_stats with in_scale / in_shift (the BN+ReLU prologue, "mainloop fusion"):
//   c = conv2d(relu(x * in_scale[ch] + in_shift[ch]), W) and its statistics, in one conv launch (plus a tiny
//   launch converting in_scale / in_shift, and the two merge launches). Mainloop: CUTLASS's fprop-fusion mainloop
//   (cutlass::conv::threadblock::ImplicitGemmFpropFusionMultistage, the technique of CUTLASS example 25) with the
//   components of DefaultConv2dFpropFusion and the tiles of the plain kernel: each stage also copies the stage's
//   64 channels of scale and shift into shared memory; after a warp loads its activation fragment from shared
//   memory, the transform applies relu(x * scale + shift) per channel in registers before the MMAs. Epilogue:
//   EpilogueWithStats, unchanged. Kernel: ConvStatsPrologueKernel below, one instantiation per dtype.
//   Padding: an activation vector outside x (spatial padding, rows past N*P*Q, channels past C) reads nothing of
//   x: it is filled with a marker bit pattern, and the transform turns a marked pair into +0 AFTER the activation,
//   so padding contributes 0 to conv(relu(bn(x))) exactly as in the reference.
//     fp16: CUTLASS's fill (the fp16 NaN 0x7eff) and CUTLASS's transform (fma.rn.f16x2.relu).
//     bf16: 0x7eff is a finite bf16 (1.6948e38), so the bf16 kernel never uses CUTLASS's fill: its activation
//     iterator points out-of-bounds loads at a 16-byte vector of the bf16 NaN 0x7fa5 (Bf16PaddedActivationIterator)
//     and this file's transform (fma.rn.relu.bf16x2, sm_80+) tests for that marker.
//     Either way an input pair of channels whose bits equal the marker pair (a NaN with that exact payload in
//     both channels) is read as padding: 0 instead of NaN.
//   Precision: the fusion mainloop keeps scale and shift in the activation dtype (its shared-memory and warp
//   iterators move 16-bit vectors), so the fp32 in_scale / in_shift are rounded to x's dtype (round to nearest)
//   before the conv: relative error up to 2^-11 (fp16) or 2^-8 (bf16) in each, i.e. the prologue computes
//   relu(x * rd(s) + rd(t)) with one rounding (fused multiply-add) where the reference computes
//   rd(relu(x * s + t)) in fp32; where x*s and t nearly cancel the activation's error is relative to |t|, not
//   to the result. fp16 scale or shift beyond +-65504 become +-inf (the caller keeps them in range; bf16 has
//   fp32's range).
#include "conv_cutlass.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifdef RESNET_FUSED_WITH_CUTLASS
#include "cutlass/array.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_fusion.h"
#include "cutlass/conv/kernel/implicit_gemm_convolution_with_fused_epilogue.h"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/epilogue/threadblock/default_epilogue_tensor_op.h"
#include "cutlass/epilogue/threadblock/epilogue_base.h"
#include "cutlass/epilogue/threadblock/output_iterator_parameter.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/numeric_types.h"

#include "conv_cutlass_common.h"

namespace resnet_fused {
namespace cutlass_conv {

// Out-of-bounds marker of the bf16 BN+ReLU prologue (see Bf16PaddedActivationIterator below): the bf16 NaN
// 0x7fa5, a payload that neither PyTorch (0x7fc0, 0xffc0) nor the hardware's canonical NaN (0x7fff) produces.
// CUTLASS's fp16 marker 0x7eff cannot serve bf16: as a bf16 it is the finite value 1.6948e38.
constexpr uint32_t kBf16PadBits = 0x7fa5;
constexpr uint32_t kBf16PadBitsX2 = (kBf16PadBits << 16) | kBf16PadBits;

}  // namespace cutlass_conv
}  // namespace resnet_fused

// The BN+ReLU transform of CUTLASS's fprop-fusion mainloop (cutlass::conv::threadblock::
// ImplicitGemmFpropFusionMultistage names cutlass::conv::warp::FpropScaleBiasReluTransform) for bf16 fragments.
// CUTLASS's own transform is fp16 PTX (fma.rn.f16x2.relu); this specialization, defined before the bf16
// prologue kernel is instantiated, is the only one of this translation unit (no other unit instantiates the
// transform). Per pair of activations of one MMA operand register: a = relu(x * scale + shift) with one
// fma.rn.relu.bf16x2 (sm_80+: the product is exact, the sum rounded once to bf16, ReLU keeps NaN as NaN); a pair
// whose bits are the prologue's out-of-bounds marker (two kBf16PadBits halves; markers fill whole 16-byte
// vectors, so the two halves of a pair are marked together) becomes +0, AFTER the activation, as CUTLASS does
// for fp16. Scale and shift are bf16 here (the caller rounds the fp32 vectors).
// Fragment layout as CUTLASS's fp16 transform: the scale/bias fragment of a k-group holds 4 registers {scale,
// shift} of the low 8 k-columns, then {scale, shift} of the high 8; activation pair i belongs to the low or high
// half by (i / 2) % 2 (m16n8k16 A operand: a0a1 / a2a3 low columns of rows g / g+8, a4a5 / a6a7 high columns).
namespace cutlass {
namespace conv {
namespace warp {

template <int kActivations, int kScaleBias>
struct FpropScaleBiasReluTransform<cutlass::Array<cutlass::bfloat16_t, kActivations, false>,
                                   cutlass::Array<cutlass::bfloat16_t, kScaleBias, false>> {
  static_assert(kActivations % 4 == 0 && kScaleBias == 8, "unexpected bf16 fragment shapes");
  // Checked by the kernel configuration, so a bf16 kernel can never run the fp16 PTX of the primary template.
  static constexpr uint32_t kOutOfBoundsBits = resnet_fused::cutlass_conv::kBf16PadBitsX2;

  CUTLASS_DEVICE
  static uint32_t bn_relu_pair(uint32_t x, uint32_t scale, uint32_t shift) {
    uint32_t a = 0;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm(
        "{\n\t"
        " .reg .pred p;\n\t"
        " .reg .b32 t;\n\t"
        " setp.eq.u32 p, %1, %4;\n\t"
        " fma.rn.relu.bf16x2 t, %1, %2, %3;\n\t"
        " selp.b32 %0, 0, t, p;\n\t"
        "}\n"
        : "=r"(a)
        : "r"(x), "r"(scale), "r"(shift), "n"(kOutOfBoundsBits));
#else
    assert(0);
#endif
    return a;
  }

  CUTLASS_DEVICE
  void operator()(cutlass::Array<cutlass::bfloat16_t, kActivations, false>& activations,
                  cutlass::Array<cutlass::bfloat16_t, kScaleBias, false> const& scale_bias) {
    uint32_t* pairs = reinterpret_cast<uint32_t*>(&activations);
    uint32_t const* sb = reinterpret_cast<uint32_t const*>(&scale_bias);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kActivations / 2; ++i) {
      const int half = (i / 2) % 2;
      pairs[i] = bn_relu_pair(pairs[i], sb[2 * half], sb[2 * half + 1]);
    }
  }
};

}  // namespace warp
}  // namespace conv
}  // namespace cutlass
#endif

namespace resnet_fused {

#ifndef RESNET_FUSED_WITH_CUTLASS

bool cutlass_conv_stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                        at::Tensor&, at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                        std::string* why) {
  if (why != nullptr) {
    *why = kNoCutlass;
  }
  return false;
}

std::string cutlass_conv_stats_uncovered(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                         at::IntArrayRef, at::IntArrayRef, int64_t) {
  return kNoCutlass;
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
  using Swizzle = cutlass_conv::Swizzle;  // width chosen per call (cutlass_conv::swizzle_log_tile)
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
  // Only for its static can_implement(): the kernel is launched directly (cutlass_conv::launch).
  using Conv = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

// ---------------------------------------------------------------------------------- BN+ReLU prologue kernel

// bf16 activations have no spare finite bit pattern, and the fusion mainloop fills every out-of-bounds activation
// vector with CUTLASS's fp16 marker 0x7eff (cutlass::arch::cp_async_nan), a finite bf16. So the bf16 kernel never
// lets the mainloop predicate an activation load off: this iterator (CUTLASS's optimized fprop activation iterator
// underneath) reports every access valid and points out-of-bounds ones (spatial padding, rows past N*P*Q,
// channels past C) at bf16_pad_vector, 16 bytes of the bf16 NaN kBf16PadBits in global memory, which the
// mainloop's cp.async copies into shared memory where the fp16 kernel would have its 0x7eff fill. Those loads
// all hit the same 16 bytes (L1-resident).
__device__ __align__(16) uint32_t bf16_pad_vector[4] = {cutlass_conv::kBf16PadBitsX2, cutlass_conv::kBf16PadBitsX2,
                                                        cutlass_conv::kBf16PadBitsX2, cutlass_conv::kBf16PadBitsX2};

template <typename Base_>
class Bf16PaddedActivationIterator : public Base_ {
 public:
  using Base = Base_;
  using AccessType = typename Base::AccessType;
  static_assert(sizeof(AccessType) == sizeof(bf16_pad_vector), "one 16-byte vector per access");

  CUTLASS_HOST_DEVICE
  Bf16PaddedActivationIterator(typename Base::Params const& params,
                               cutlass::conv::Conv2dProblemSize const& problem_size,
                               typename Base::Element const* ptr, int thread_idx,
                               cutlass::MatrixCoord const& threadblock_offset)
      : Base(params, problem_size, ptr, thread_idx, threadblock_offset) {}

  CUTLASS_DEVICE
  AccessType const* get() {
    return Base::valid() ? Base::get() : reinterpret_cast<AccessType const*>(bf16_pad_vector);
  }

  CUTLASS_HOST_DEVICE
  bool valid() { return true; }
};

// Kernel: conv2d(relu(x * scale + shift), W) with the stats epilogue, written for this file after the pattern of
// cutlass::conv::kernel::ImplicitGemmConvolutionFusion (its mainloop) and ImplicitGemmConvolutionWithFusedEpilogue
// (how EpilogueWithStats is called): fprop only, no split-K, no source tensor. Launched through cutlass::Kernel.
template <typename Mma_, typename Epilogue_, typename Swizzle_>
struct ConvStatsPrologueKernel {
  using Mma = Mma_;
  using Epilogue = Epilogue_;
  using Swizzle = Swizzle_;
  using OutputOp = typename Epilogue::OutputOp;
  using ElementA = typename Mma::IteratorA::Element;
  using ElementB = typename Mma::IteratorB::Element;
  using ElementScaleBias = typename Mma::IteratorScaleBias::Element;
  using ElementC = typename Epilogue::OutputTileIterator::Element;
  using Layout = cutlass::layout::TensorNHWC;
  using TensorRefC = cutlass::TensorRef<ElementC, Layout>;
  using OutputParameter =
      cutlass::epilogue::threadblock::ConvOutputIteratorParameter<Layout,
                                                                  typename Epilogue::OutputTileIterator::Layout,
                                                                  TensorRefC, cutlass::conv::Operator::kFprop,
                                                                  cutlass::conv::Conv2dProblemSize>;
  using Shape = typename Mma::Shape;
  static int const kThreadCount = 32 * Mma::WarpCount::kCount;

  struct Params {
    cutlass::conv::Conv2dProblemSize problem_size{};
    cutlass::gemm::GemmCoord grid_tiled_shape{};
    int swizzle_log_tile{0};
    int gemm_k_iterations{0};
    typename Mma::IteratorA::Params iterator_A{};
    ElementA const* ptr_A = nullptr;
    typename Mma::IteratorB::Params iterator_B{};
    ElementB const* ptr_B = nullptr;
    typename Mma::IteratorScaleBias::Params iterator_scale_bias{};
    ElementScaleBias const* ptr_scale = nullptr;
    ElementScaleBias const* ptr_shift = nullptr;
    typename Epilogue::OutputTileIterator::Params iterator_D{};
    ElementC* ptr_D = nullptr;
    typename OutputOp::Params output_op{};
    TileStatsPair* tile_stats = nullptr;  // [grid_tiled_shape.m(), 2K]: the epilogue's statistics per tile row

    Params() = default;

    // x, w, c dense NHWC / KRSC / NPQK; scale and shift [C] in the activation dtype.
    Params(cutlass::conv::Conv2dProblemSize const& p, ElementA const* x, ElementB const* w,
           ElementScaleBias const* scale, ElementScaleBias const* shift, ElementC* c, TileStatsPair* tile_stats_)
        : problem_size(p),
          iterator_A(Mma::IteratorA::getParams(p, Layout::packed({p.N, p.H, p.W, p.C}))),
          ptr_A(x),
          iterator_B(p, Layout::packed({p.K, p.R, p.S, p.C})),
          ptr_B(w),
          iterator_scale_bias(p, typename Mma::IteratorScaleBias::Layout()),
          ptr_scale(scale),
          ptr_shift(shift),
          iterator_D(OutputParameter::layout(TensorRefC(c, Layout::packed({p.N, p.P, p.Q, p.K})))),
          ptr_D(c),
          tile_stats(tile_stats_) {
      gemm_k_iterations = cutlass::conv::implicit_gemm_k_iterations(cutlass::conv::Operator::kFprop, Shape::kK, p);
      Swizzle swizzle;
      grid_tiled_shape = swizzle.get_tiled_shape(
          cutlass::conv::implicit_gemm_problem_size(cutlass::conv::Operator::kFprop, p),
          {Shape::kM, Shape::kN, Shape::kK}, p.split_k_slices);
      swizzle_log_tile = swizzle.get_log_tile(grid_tiled_shape);
    }
  };

  union SharedStorage {
    typename Mma::SharedStorage main_loop;
    typename Epilogue::SharedStorage epilogue;
  };

  // What the kernel covers beyond conv_problem's rules (as cutlass::conv::device::ImplicitGemmConvolutionFusion
  // checks it, for one k slice).
  static bool can_implement(cutlass::conv::Conv2dProblemSize const& p) {
    if (p.split_k_slices != 1 || Mma::IteratorA::can_implement(p) != cutlass::Status::kSuccess ||
        Mma::IteratorB::can_implement(p) != cutlass::Status::kSuccess) {
      return false;
    }
    const Params params(p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    const dim3 grid = Swizzle().get_grid_shape(params.grid_tiled_shape);
    return grid.y <= 65535 && grid.z <= 65535;
  }

  CUTLASS_DEVICE
  void operator()(Params const& params, SharedStorage& shared_storage) {
    Swizzle swizzle;
    const cutlass::gemm::GemmCoord tile = swizzle.get_tile_offset(params.swizzle_log_tile);
    if (params.grid_tiled_shape.m() <= tile.m() || params.grid_tiled_shape.n() <= tile.n()) {
      return;
    }
    const int thread_idx = threadIdx.x;
    typename Mma::IteratorA iterator_A(params.iterator_A, params.problem_size, params.ptr_A, thread_idx,
                                       cutlass::MatrixCoord(tile.m() * Shape::kM, tile.k() * Shape::kK));
    typename Mma::IteratorB iterator_B(params.iterator_B, params.problem_size, params.ptr_B, thread_idx,
                                       cutlass::MatrixCoord(tile.k() * Shape::kK, tile.n() * Shape::kN));
    typename Mma::IteratorScaleBias iterator_scale_bias(params.iterator_scale_bias, params.problem_size,
                                                        params.ptr_scale, params.ptr_shift, thread_idx,
                                                        cutlass::MatrixCoord(0, tile.k() * Shape::kK));
    const int warp_idx = cutlass::canonical_warp_idx_sync();
    const int lane_idx = threadIdx.x % 32;

    Mma mma(shared_storage.main_loop, thread_idx, warp_idx, lane_idx);
    typename Mma::FragmentC accumulators;
    accumulators.clear();
    mma(params.gemm_k_iterations, accumulators, iterator_A, iterator_B, iterator_scale_bias, accumulators);

    const cutlass::MatrixCoord threadblock_offset(tile.m() * Shape::kM, tile.n() * Shape::kN);
    const cutlass::MatrixCoord extent = OutputParameter::extent(params.problem_size);
    typename Epilogue::OutputTileIterator iterator_D(params.iterator_D, params.ptr_D, extent, thread_idx,
                                                     threadblock_offset);
    // This tile's row of the workspace, advanced to its first column (what EpilogueWithStats expects).
    TileStatsPair* tile_stats = params.tile_stats == nullptr
                                    ? nullptr
                                    : params.tile_stats + threadblock_offset.column() +
                                          static_cast<int64_t>(tile.m()) * 2 * params.problem_size.K;
    Epilogue epilogue(shared_storage.epilogue, thread_idx, warp_idx, lane_idx);
    // The source and auxiliary-tensor iterators are unused by EpilogueWithStats.
    epilogue(OutputOp(params.output_op), tile_stats, iterator_D, accumulators, iterator_D, iterator_D, extent,
             threadblock_offset);
  }
};

// kOutOfBoundsBits of a transform that has one (this file's bf16 transform), else 0.
template <typename T, typename = void>
struct OutOfBoundsBits {
  static constexpr uint32_t value = 0;
};
template <typename T>
struct OutOfBoundsBits<T, std::void_t<decltype(T::kOutOfBoundsBits)>> {
  static constexpr uint32_t value = T::kOutOfBoundsBits;
};

// The prologue kernel per dtype: the components of CUTLASS's DefaultConv2dFpropFusion (tiles of
// conv_cutlass_common.h; scale / shift vectors in the activation dtype, row-major [1, C]) assembled into its
// fusion mainloop, with the bf16 activation iterator above for bf16, and ConvStats' EpilogueWithStats.
template <typename Element>
struct ConvStatsPrologue {
  static constexpr bool kBf16 = std::is_same<Element, cutlass::bfloat16_t>::value;
  using Stats = ConvStats<Element>;
  using Swizzle = typename Stats::Swizzle;
  using Default = cutlass::conv::kernel::DefaultConv2dFpropFusion<
      Element, cutlass::layout::TensorNHWC, Element, cutlass::layout::TensorNHWC, Element, cutlass::layout::RowMajor,
      Element, cutlass::layout::TensorNHWC, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass_conv::ThreadblockShape, cutlass_conv::WarpShape, cutlass_conv::InstructionShape,
      typename Stats::OutputOp, Swizzle, cutlass_conv::kStages, cutlass::arch::OpMultiplyAdd,
      cutlass::conv::IteratorAlgorithm::kOptimized>;
  using IteratorA = typename std::conditional<kBf16, Bf16PaddedActivationIterator<typename Default::IteratorA>,
                                              typename Default::IteratorA>::type;
  using Mma = cutlass::conv::threadblock::ImplicitGemmFpropFusionMultistage<
      cutlass_conv::ThreadblockShape, IteratorA, typename Default::SmemIteratorA,
      cutlass::arch::CacheOperation::Always, typename Default::IteratorB, typename Default::SmemIteratorB,
      cutlass::arch::CacheOperation::Global, typename Default::IteratorScaleBias,
      typename Default::SmemIteratorScaleBias, cutlass::arch::CacheOperation::Always, typename Default::MmaPolicy,
      typename Default::WarpIteratorScaleBias, cutlass_conv::kStages>;
  using Kernel = ConvStatsPrologueKernel<Mma, typename Stats::Epilogue, Swizzle>;

  // The bf16 kernel must run this file's bf16 transform (marker kBf16PadBitsX2), the fp16 one CUTLASS's.
  using Transform = cutlass::conv::warp::FpropScaleBiasReluTransform<typename Mma::Operator::TransformedFragmentA,
                                                                     typename Default::WarpIteratorScaleBias::Fragment>;
  static_assert(kBf16 == (OutOfBoundsBits<Transform>::value == cutlass_conv::kBf16PadBitsX2),
                "the bf16 kernel must use this file's bf16 transform, the fp16 kernel CUTLASS's");
  // The warp-level scale/shift iterator puts shift one warp K-extent after scale in each stage, and the smem
  // iterator one threadblock K-extent: they agree only with one warp along K.
  static_assert(cutlass_conv::WarpShape::kK == cutlass_conv::ThreadblockShape::kK,
                "the scale/shift iterators need one warp along the threadblock's K");
  // EpilogueWithStats was assembled for the warp MMA of the plain conv: same accumulator fragment layout.
  static_assert(std::is_same<typename Default::WarpMmaTensorOp, typename Stats::Epilogue::WarpMmaOperator>::value,
                "the prologue mainloop and the stats epilogue must share the warp-level MMA");
};

// Merge of the tile statistics: 32 channels x 8 rows per block, Chan's formula in fp64.
constexpr int kMergeChannels = 32;
constexpr int kMergeRows = 8;
// Tile rows are merged in at most this many chunks (one block row each) before the final pass.
constexpr int kMaxChunks = 128;

// Merges the block's kMergeRows partials of channel threadIdx.x (one per thread row) in row order through shared
// memory. Every thread of the block calls it; the total is that of row threadIdx.y == 0.
__device__ __forceinline__ Moments<double> merge_block_rows(const Moments<double>& m) {
  __shared__ double part[3][kMergeRows][kMergeChannels];
  part[0][threadIdx.y][threadIdx.x] = m.n;
  part[1][threadIdx.y][threadIdx.x] = m.mean;
  part[2][threadIdx.y][threadIdx.x] = m.m2;
  __syncthreads();
  Moments<double> total{0.0, 0.0, 0.0};
  if (threadIdx.y == 0) {
#pragma unroll
    for (int r = 0; r < kMergeRows; ++r) {
      total.merge(part[0][r][threadIdx.x], part[1][r][threadIdx.x], part[2][r][threadIdx.x]);
    }
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
  const Moments<double> total = merge_block_rows(m);
  if (threadIdx.y == 0 && k < K) {
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
  const int k = blockIdx.x * kMergeChannels + threadIdx.x;
  Moments<double> m{0.0, 0.0, 0.0};
  if (k < K) {
    for (int g = threadIdx.y; g < chunks; g += kMergeRows) {
      const double* row = chunk_stats + static_cast<int64_t>(g) * 3 * K;
      m.merge(row[k], row[K + k], row[2 * K + k]);
    }
  }
  const Moments<double> total = merge_block_rows(m);
  if (threadIdx.y == 0 && k < K) {
    mean[k] = static_cast<float>(total.mean);
    var[k] = static_cast<float>(fmax(total.m2 / total.n, 0.0));
  }
}

template <typename Element>
typename ConvStats<Element>::Conv::Arguments stats_arguments(const cutlass::conv::Conv2dProblemSize& p, void* x,
                                                             void* w, void* c, TileStatsPair* tile_stats) {
  using Layout = cutlass::layout::TensorNHWC;
  const Layout c_layout = Layout::packed({p.N, p.P, p.Q, p.K});
  auto* c_ptr = static_cast<Element*>(c);
  return typename ConvStats<Element>::Conv::Arguments(
      p, {static_cast<Element*>(x), Layout::packed({p.N, p.H, p.W, p.C})},
      {static_cast<Element*>(w), Layout::packed({p.K, p.R, p.S, p.C})}, {c_ptr, c_layout}, {c_ptr, c_layout},
      typename ConvStats<Element>::OutputOp::Params(), cutlass::conv::SplitKMode::kSerial,
      // The kernel indexes ptr_Vector as the epilogue's ElementVector (TileStatsPair): ldr counts pairs.
      /*ptr_Vector=*/tile_stats, /*ptr_Tensor=*/nullptr, /*ldr=*/2 * p.K, /*ldt=*/0);
}

template <typename Element>
bool stats_can_implement(const cutlass::conv::Conv2dProblemSize& p) {
  static const bool thread_map_ok = ConvStats<Element>::Epilogue::check_thread_map();
  TORCH_CHECK(thread_map_ok, "resnet_fused::cutlass_conv_stats: unexpected CUTLASS epilogue thread map");
  return ConvStats<Element>::Conv::can_implement(stats_arguments<Element>(p, nullptr, nullptr, nullptr, nullptr)) ==
         cutlass::Status::kSuccess;
}

template <typename Element>
bool prologue_can_implement(const cutlass::conv::Conv2dProblemSize& p) {
  static const bool thread_map_ok = ConvStats<Element>::Epilogue::check_thread_map();
  TORCH_CHECK(thread_map_ok, "resnet_fused::cutlass_conv_stats: unexpected CUTLASS epilogue thread map");
  return ConvStatsPrologue<Element>::Kernel::can_implement(p);
}

// The statistics part of the workspace: the chunk statistics (fp64 n, mean, M2: 3K per chunk) first, then the
// tile statistics the conv's epilogue writes (2K TileStatsPair per tile row); both written before they are read.
// `bytes` is rounded up to 256 so more can follow.
struct TileStatsPlan {
  int tiles = 0, tiles_per_chunk = 0, chunks = 0;
  size_t chunk_bytes = 0, tile_bytes = 0, bytes = 0;

  explicit TileStatsPlan(const cutlass::conv::Conv2dProblemSize& p) {
    // Tile rows do not depend on the swizzle width.
    const cutlass::gemm::GemmCoord tiled = cutlass_conv::Swizzle().get_tiled_shape(
        cutlass::conv::Operator::kFprop, p,
        {cutlass_conv::ThreadblockShape::kM, cutlass_conv::ThreadblockShape::kN, cutlass_conv::ThreadblockShape::kK},
        1);
    tiles = tiled.m();
    const int chunks_wanted = std::min(tiles, kMaxChunks);
    tiles_per_chunk = (tiles + chunks_wanted - 1) / chunks_wanted;
    chunks = (tiles + tiles_per_chunk - 1) / tiles_per_chunk;
    chunk_bytes = sizeof(double) * static_cast<size_t>(chunks) * 3 * p.K;
    tile_bytes = sizeof(TileStatsPair) * static_cast<size_t>(tiles) * 2 * p.K;
    bytes = (chunk_bytes + tile_bytes + 255) / 256 * 256;
  }
  double* chunk_stats(char* base) const { return reinterpret_cast<double*>(base); }
  TileStatsPair* tile_stats(char* base) const { return reinterpret_cast<TileStatsPair*>(base + chunk_bytes); }
};

// mean / var from the tile statistics the conv wrote (two launches, fixed merge order).
void merge_tile_stats(const TileStatsPlan& plan, char* base, const cutlass::conv::Conv2dProblemSize& p,
                      float* mean, float* var, cudaStream_t stream) {
  const int K = p.K;
  const dim3 block(kMergeChannels, kMergeRows);
  const unsigned channel_blocks = static_cast<unsigned>((K + kMergeChannels - 1) / kMergeChannels);
  stats_chunk_kernel<<<dim3(channel_blocks, static_cast<unsigned>(plan.chunks)), block, 0, stream>>>(
      plan.tile_stats(base), plan.tiles, plan.tiles_per_chunk, K, plan.chunk_stats(base));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  stats_finalize_kernel<<<channel_blocks, block, 0, stream>>>(plan.chunk_stats(base), plan.chunks, K, mean, var);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Element>
void run_stats(const cutlass::conv::Conv2dProblemSize& p, void* x, void* w, void* c, float* mean, float* var,
               c10::DeviceIndex device) {
  using Kernel = typename ConvStats<Element>::Kernel;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const TileStatsPlan plan(p);

  // Workspace: the statistics part (CUTLASS needs none for one k slice). The epilogue's gather shares the kernel's
  // shared memory with the mainloop (a union) and must not enlarge it.
  static_assert(sizeof(typename ConvStats<Element>::Epilogue::SharedStorage) <=
                    sizeof(typename ConvStats<Element>::Base::Mma::SharedStorage),
                "the statistics gather must fit in the mainloop's shared memory");
  const c10::DataPtr workspace = c10::cuda::CUDACachingAllocator::get()->allocate(plan.bytes);
  auto* base = static_cast<char*>(workspace.get());

  typename Kernel::Params params(stats_arguments<Element>(p, x, w, c, plan.tile_stats(base)), /*semaphore=*/nullptr);
  cutlass_conv::launch_swizzled<Kernel>("CUTLASS conv+stats", params, p, stream, device);
  merge_tile_stats(plan, base, p, mean, var, stream);
}

// out[0, C) = scale, out[C, 2C) = shift, rounded to nearest in the activation dtype.
template <typename Element>
__global__ void scale_shift_to_activation_dtype(const float* __restrict__ scale, const float* __restrict__ shift,
                                                int C, Element* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < C) {
    const cutlass::NumericConverter<Element, float, cutlass::FloatRoundStyle::round_to_nearest> convert;
    out[i] = convert(scale[i]);
    out[C + i] = convert(shift[i]);
  }
}

template <typename Element>
void run_stats_prologue(const cutlass::conv::Conv2dProblemSize& p, const void* x, const void* w,
                        const float* in_scale, const float* in_shift, void* c, float* mean, float* var,
                        c10::DeviceIndex device) {
  using Kernel = typename ConvStatsPrologue<Element>::Kernel;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const TileStatsPlan plan(p);

  // Workspace: the statistics part, then scale and shift in the activation dtype ([2, C], 16-byte aligned
  // halves: C is a multiple of 8).
  const c10::DataPtr workspace =
      c10::cuda::CUDACachingAllocator::get()->allocate(plan.bytes + sizeof(Element) * 2 * static_cast<size_t>(p.C));
  auto* base = static_cast<char*>(workspace.get());
  auto* scale_shift = reinterpret_cast<Element*>(base + plan.bytes);

  constexpr int kConvertThreads = 256;
  scale_shift_to_activation_dtype<Element><<<(p.C + kConvertThreads - 1) / kConvertThreads, kConvertThreads, 0,
                                              stream>>>(in_scale, in_shift, p.C, scale_shift);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  typename Kernel::Params params(p, static_cast<const Element*>(x), static_cast<const Element*>(w), scale_shift,
                                 scale_shift + p.C, static_cast<Element*>(c), plan.tile_stats(base));
  cutlass_conv::launch_swizzled<Kernel>("CUTLASS conv+stats with the BN+ReLU prologue", params, p, stream, device);
  merge_tile_stats(plan, base, p, mean, var, stream);
}

// The reason cutlass_conv_stats declines a call (for its *why), or nullptr when it runs it.
const char* stats_uncovered(const char* fn, const at::Tensor& x, const at::Tensor& w, const at::Tensor& in_scale,
                            const at::Tensor& in_shift, const at::Tensor& c, const at::Tensor& mean,
                            const at::Tensor& var, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, cutlass::conv::Conv2dProblemSize& problem) {
  const bool prologue = in_scale.defined() || in_shift.defined();
  if (prologue) {
    TORCH_CHECK(in_scale.defined() && in_shift.defined(), fn, ": in_scale and in_shift must be given together");
    TORCH_CHECK(x.dim() == 4, fn, ": x must be 4-D, got ", x.sizes());
    const int64_t C = x.size(1);
    TORCH_CHECK(in_scale.dim() == 1 && in_scale.size(0) == C && in_shift.dim() == 1 && in_shift.size(0) == C, fn,
                ": in_scale and in_shift must have shape [C = ", C, "], got ", in_scale.sizes(), " and ",
                in_shift.sizes());
  }
  if (const char* why = cutlass_conv::conv_problem(fn, x, w, c, stride, padding, dilation, groups, problem)) {
    return why;
  }
  const int64_t K = w.size(0);
  for (const at::Tensor* t : {&mean, &var}) {
    TORCH_CHECK(t->defined() && t->dim() == 1 && t->size(0) == K && t->scalar_type() == at::kFloat, fn,
                ": mean and var must be float32 of shape [K = ", K, "]");
    if (t->device() != x.device() || !t->is_contiguous()) {
      return "mean and var are not contiguous on x's device";
    }
  }
  if (prologue) {
    for (const at::Tensor* t : {&in_scale, &in_shift}) {
      if (t->scalar_type() != at::kFloat || t->device() != x.device() || !t->is_contiguous()) {
        return "in_scale and in_shift are not contiguous float32 on x's device";
      }
    }
  }
  const bool half = x.scalar_type() == at::kHalf;
  const bool covered = prologue ? (half ? prologue_can_implement<cutlass::half_t>(problem)
                                        : prologue_can_implement<cutlass::bfloat16_t>(problem))
                                : (half ? stats_can_implement<cutlass::half_t>(problem)
                                        : stats_can_implement<cutlass::bfloat16_t>(problem));
  return covered ? nullptr : "CUTLASS's can_implement refused the problem";
}

}  // namespace

std::string cutlass_conv_stats_uncovered(const at::Tensor& x, const at::Tensor& w, const at::Tensor& in_scale,
                                         const at::Tensor& in_shift, const at::Tensor& c, const at::Tensor& mean,
                                         const at::Tensor& var, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups) {
  cutlass::conv::Conv2dProblemSize problem;
  const char* why = stats_uncovered("resnet_fused::cutlass_conv_stats", x, w, in_scale, in_shift, c, mean, var,
                                    stride, padding, dilation, groups, problem);
  return why != nullptr ? why : "";
}

bool cutlass_conv_stats(const at::Tensor& x, const at::Tensor& w, const at::Tensor& in_scale,
                        const at::Tensor& in_shift, at::Tensor& c, at::Tensor& mean, at::Tensor& var,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        std::string* why) {
  constexpr const char* fn = "resnet_fused::cutlass_conv_stats";
  cutlass::conv::Conv2dProblemSize problem;
  if (const char* reason = stats_uncovered(fn, x, w, in_scale, in_shift, c, mean, var, stride, padding, dilation,
                                           groups, problem)) {
    if (why != nullptr) {
      *why = reason;
    }
    return false;
  }
  const bool prologue = in_scale.defined();
  const bool half = x.scalar_type() == at::kHalf;
  const c10::cuda::CUDAGuard guard(x.device());
  void* x_ptr = const_cast<void*>(x.const_data_ptr());
  void* w_ptr = const_cast<void*>(w.const_data_ptr());
  void* c_ptr = c.mutable_data_ptr();
  float* mean_ptr = mean.mutable_data_ptr<float>();
  float* var_ptr = var.mutable_data_ptr<float>();
  if (prologue) {
    const float* scale_ptr = in_scale.const_data_ptr<float>();
    const float* shift_ptr = in_shift.const_data_ptr<float>();
    if (half) {
      run_stats_prologue<cutlass::half_t>(problem, x_ptr, w_ptr, scale_ptr, shift_ptr, c_ptr, mean_ptr, var_ptr,
                                          x.get_device());
    } else {
      run_stats_prologue<cutlass::bfloat16_t>(problem, x_ptr, w_ptr, scale_ptr, shift_ptr, c_ptr, mean_ptr, var_ptr,
                                              x.get_device());
    }
  } else if (half) {
    run_stats<cutlass::half_t>(problem, x_ptr, w_ptr, c_ptr, mean_ptr, var_ptr, x.get_device());
  } else {
    run_stats<cutlass::bfloat16_t>(problem, x_ptr, w_ptr, c_ptr, mean_ptr, var_ptr, x.get_device());
  }
  return true;
}

#endif  // RESNET_FUSED_WITH_CUTLASS

}  // namespace resnet_fused
