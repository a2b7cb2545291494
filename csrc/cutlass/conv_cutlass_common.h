// Internals shared by the CUTLASS units (fprop.cu, fprop_stats.cu): the tile configurations of their kernels, the
// host-side checks deciding whether a call is covered, the threadblock swizzle rule, per-device facts and the
// launch with its per-device shared-memory attribute. Included only when the extension is built with CUTLASS
// (RESNET_FUSED_WITH_CUTLASS); the public interface is conv_cutlass.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "../common/conv_size.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/device_kernel.h"
#include "cutlass/gemm/gemm.h"

namespace resnet_fused {
namespace cutlass_conv {

// A tile configuration of the sm80 tensor-op kernels (mma.sync m16n8k16, also what runs on sm90): threadblock
// kM x kN x kK, warps kWarpM x kWarpN x kK (one warp along K), a kStages-deep cp.async pipeline whose shared
// memory is kStages * (kM + kN) * kK * 2 bytes.
template <int kM_, int kN_, int kK_, int kWarpM_, int kWarpN_, int kStages_>
struct TileConfig {
  using ThreadblockShape = cutlass::gemm::GemmShape<kM_, kN_, kK_>;
  using WarpShape = cutlass::gemm::GemmShape<kWarpM_, kWarpN_, kK_>;
  static constexpr int kStages = kStages_;
};

// 128x128x64, 4 warps of 64x64, 3 stages (96 KiB): every kernel's default.
using Tile128x128 = TileConfig<128, 128, 64, 64, 64, 3>;
// 128x64x64, 4 warps of 64x32, 3 stages (72 KiB): the eval conv of layers with K <= 64 output channels, where the
// 128-wide tile would leave half of every tile's columns (and its MMAs) empty.
using Tile128x64 = TileConfig<128, 64, 64, 64, 32, 3>;

// The training kernels' tiles (fprop_stats.cu: one configuration).
using ThreadblockShape = Tile128x128::ThreadblockShape;
using WarpShape = Tile128x128::WarpShape;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
constexpr int kStages = Tile128x128::kStages;

// Every kernel is instantiated with this swizzle; the swizzle width is chosen per call (swizzle_log_tile) and
// passed in the kernel's parameters, so one instantiation serves every width.
using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>;

// log2 of the number of consecutive threadblocks that take the same activation tile (tile row of the implicit
// GEMM) with neighbouring filter tiles. With width 1 (no swizzle) the grid walks every row tile for one filter
// tile before the next, so a layer whose activations do not fit in L2 re-reads them from DRAM once per filter
// tile: the 1x1 expansion convs (K = 256..2048, i.e. 2..16 column tiles) do that most. 1x1 convs take CUTLASS's
// width heuristic (8 for >= 6 column tiles, 4 for >= 3, 2 for 2); others none (their windows already share
// activation lines between neighbouring threadblocks, and no measurement has shown the swizzle pays there).
inline int swizzle_log_tile(const cutlass::conv::Conv2dProblemSize& p, const cutlass::gemm::GemmCoord& tiled) {
  if (p.R != 1 || p.S != 1) {
    return 0;
  }
  return Swizzle::get_log_tile(tiled);
}

// The grid of a kernel over `tiled` tiles (rows, columns, k slices) with swizzle width 2^log_tile: as
// GemmIdentityThreadblockSwizzle::get_grid_shape, for a width chosen at run time.
inline dim3 swizzled_grid(const cutlass::gemm::GemmCoord& tiled, int log_tile) {
  const int tile = 1 << log_tile;
  return dim3(static_cast<unsigned>(tiled.m() * tile), static_cast<unsigned>((tiled.n() + tile - 1) / tile),
              static_cast<unsigned>(tiled.k()));
}

// Activations, filters and outputs move as 16-byte vectors (8 fp16 / bf16 values).
constexpr std::uintptr_t kTensorAlignment = 16;
constexpr int64_t kChannelMultiple = 8;

inline bool aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

inline bool dense_nhwc(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Whether `t` can be read or written by the kernels next to x: same device and dtype, dense NHWC, aligned.
inline bool like_x(const at::Tensor& t, const at::Tensor& x) {
  return t.device() == x.device() && t.scalar_type() == x.scalar_type() && dense_nhwc(t) &&
         aligned(t.const_data_ptr(), kTensorAlignment);
}

// The kernels address every tensor with 32-bit offsets.
inline bool under_2gb(const at::Tensor& t) {
  return t.numel() < (int64_t{1} << 31) / static_cast<int64_t>(t.element_size());
}

// False when the environment variable RESNET_FUSED_CUTLASS is "0" (read once per process): every call then takes
// its cuDNN path, e.g. to tell a fault or a slowdown of these kernels from one elsewhere.
inline bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("RESNET_FUSED_CUTLASS");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
}

// The compute capability major of `device`, queried once per device (a per-device table; 0 when the query fails).
inline int compute_capability_major(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> known{};  // major + 1; 0: not queried yet
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "resnet_fused: bad CUDA device index ", device);
  int v = known[device].load(std::memory_order_acquire);
  if (v == 0) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      (void)cudaGetLastError();  // a failed query is not sticky: clear it so that no later check reports it
      major = 0;
    }
    v = major + 1;
    known[device].store(v, std::memory_order_release);
  }
  return v - 1;
}

// Sets cutlass::Kernel<Kernel>'s dynamic shared memory limit to `bytes` on `device` (the current device), once per
// kernel and device (a per-device table, instead of a driver call per launch).
template <typename Kernel>
void ensure_dynamic_smem(c10::DeviceIndex device, int bytes) {
  static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> done;
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "resnet_fused: bad CUDA device index ", device);
  std::call_once(done[device], [bytes] {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(cutlass::Kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  });
}

// Launches cutlass::Kernel<Kernel> with `params` over `grid` on `stream` (of the current device `device`), its
// shared memory being Kernel::SharedStorage. A failed launch raises with CUDA's own error text (what went wrong:
// too much shared memory, an invalid configuration, a sticky error from an earlier kernel), which CUTLASS's
// device-level run() reduces to kErrorInternal.
template <typename Kernel>
void launch(const char* what, const typename Kernel::Params& params, dim3 grid, cudaStream_t stream,
            c10::DeviceIndex device) {
  constexpr int smem_bytes = static_cast<int>(sizeof(typename Kernel::SharedStorage));
  // A copy: CUTLASS declares kThreadCount `static int const` without a definition, so it must not be bound to a
  // reference (TORCH_CHECK's message arguments are).
  const int threads = Kernel::kThreadCount;
  if (smem_bytes >= (48 << 10)) {
    ensure_dynamic_smem<Kernel>(device, smem_bytes);
  }
  cutlass::Kernel<Kernel><<<grid, dim3(threads, 1, 1), smem_bytes, stream>>>(params);
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "resnet_fused: ", what, " launch failed: ", cudaGetErrorString(err), " (",
              cudaGetErrorName(err), "; grid ", grid.x, "x", grid.y, "x", grid.z, ", ", threads, " threads, ",
              smem_bytes, " bytes of shared memory)");
}

// Checks the shape rules every caller must keep (TORCH_CHECK: errors, not coverage questions) and, when the kernels
// are enabled() and x, w and out are operands they cover (CUDA, fp16 or bf16, dense NHWC / KRSC and 16-byte
// aligned, groups 1, C and K multiples of 8, nothing empty, each tensor under 2 GiB, a device of compute
// capability >= 8.0), fills `problem` and returns nullptr; otherwise returns why not (a static string).
inline const char* conv_problem(const char* fn, const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, cutlass::conv::Conv2dProblemSize& problem) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && out.dim() == 4, fn, ": x, w and out must be 4-D, got ", x.sizes(),
              ", ", w.sizes(), ", ", out.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, fn,
              ": stride, padding and dilation must have 2 elements");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              fn, ": invalid stride ", stride, ", padding ", padding, " or dilation ", dilation);
  const std::vector<int64_t> want = conv_output_size(fn, x.sizes(), w.sizes(), stride, padding, dilation);
  TORCH_CHECK(out.sizes() == at::IntArrayRef(want), fn, ": out must have shape ", at::IntArrayRef(want), ", got ",
              out.sizes());

  if (!enabled()) {
    return "the CUTLASS kernels are turned off (RESNET_FUSED_CUTLASS=0)";
  }
  if (!x.is_cuda()) {
    return "x is not a CUDA tensor";
  }
  const auto dtype = x.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    return "the CUTLASS kernels run float16 and bfloat16 only";
  }
  if (groups != 1) {
    return "the CUTLASS kernels run groups = 1 only";
  }
  if (!dense_nhwc(x) || !aligned(x.const_data_ptr(), kTensorAlignment)) {
    return "x is not dense channels_last (NHWC) with 16-byte aligned data";
  }
  if (!like_x(w, x)) {
    return "the weight is not dense KRSC (channels_last) with 16-byte aligned data in x's dtype";
  }
  if (!like_x(out, x)) {
    return "the output is not dense channels_last with 16-byte aligned data";
  }
  const int64_t C = x.size(1), K = w.size(0);
  if (w.size(1) != C) {
    return "the weight's channels differ from x's";
  }
  if (C % kChannelMultiple != 0 || K % kChannelMultiple != 0) {
    return "C and K must be multiples of 8 (16-byte vectors)";
  }
  if (x.numel() == 0 || w.numel() == 0 || out.numel() == 0) {
    return "an empty tensor";
  }
  if (!under_2gb(x) || !under_2gb(w) || !under_2gb(out)) {
    return "a tensor of 2 GiB or more (the kernels use 32-bit offsets)";
  }
  for (int64_t v : {stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]}) {
    if (v > std::numeric_limits<int>::max()) {
      return "a stride, padding or dilation beyond int";
    }
  }
  if (compute_capability_major(x.get_device()) < 8) {
    return "the GPU's compute capability is below 8.0";
  }
  // Every size fits int: each tensor has fewer than 2^31 elements.
  problem = cutlass::conv::Conv2dProblemSize(
      static_cast<int>(x.size(0)), static_cast<int>(x.size(2)), static_cast<int>(x.size(3)), static_cast<int>(C),
      static_cast<int>(K), static_cast<int>(w.size(2)), static_cast<int>(w.size(3)), static_cast<int>(want[2]),
      static_cast<int>(want[3]), static_cast<int>(padding[0]), static_cast<int>(padding[1]),
      static_cast<int>(stride[0]), static_cast<int>(stride[1]), static_cast<int>(dilation[0]),
      static_cast<int>(dilation[1]), cutlass::conv::Mode::kCrossCorrelation, /*split_k_slices=*/1,
      /*groups=*/1);
  return nullptr;
}

// Adds one to the count _C.cutlass_conv_launches() reports (defined in fprop.cu).
void count_launch();

// Launches (launch()) and counts (count_launch()) a conv kernel of problem `p` with the swizzle width
// swizzle_log_tile() chooses, written into `params` so that the kernel's tile mapping and the grid agree.
template <typename Kernel>
void launch_swizzled(const char* what, typename Kernel::Params& params, const cutlass::conv::Conv2dProblemSize& p,
                     cudaStream_t stream, c10::DeviceIndex device) {
  params.swizzle_log_tile = swizzle_log_tile(p, params.grid_tiled_shape);
  launch<Kernel>(what, params, swizzled_grid(params.grid_tiled_shape, params.swizzle_log_tile), stream, device);
  count_launch();
}

}  // namespace cutlass_conv
}  // namespace resnet_fused
