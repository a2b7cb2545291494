// Internals shared by the CUTLASS units (fprop.cu, fprop_stats.cu): the tile configuration of
// their kernels and the host-side checks deciding whether a call is covered. Included only when the extension
// is built with CUTLASS (RESNET_FUSED_WITH_CUTLASS); the public interface is conv_cutlass.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/gemm/gemm.h"

namespace resnet_fused {
namespace cutlass_conv {

// Tile configuration of every kernel: sm80 tensor-op mainloop (mma.sync m16n8k16, also what runs on sm90),
// threadblock 128x128x64, warps 64x64x64 (4 warps), 3-stage cp.async pipeline: 96 KiB of shared memory.
using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 64>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 64>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
constexpr int kStages = 3;

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

inline bool compute_capability_8_plus(c10::DeviceIndex device) {
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 8;
}

// Checks the shape rules every caller must keep (TORCH_CHECK: errors, not coverage questions) and returns
// true, filling `problem`, when the kernels are enabled() and x, w and out are operands they cover: CUDA, fp16 or bf16, dense NHWC /
// KRSC and 16-byte aligned, groups 1, C and K multiples of 8, nothing empty, each tensor under 2 GiB, a device
// of compute capability >= 8.0.
inline bool conv_problem(const char* fn, const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         cutlass::conv::Conv2dProblemSize& problem) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && out.dim() == 4, fn, ": x, w and out must be 4-D, got ", x.sizes(),
              ", ", w.sizes(), ", ", out.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, fn,
              ": stride, padding and dilation must have 2 elements");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              fn, ": invalid stride ", stride, ", padding ", padding, " or dilation ", dilation);
  const int64_t P = (x.size(2) + 2 * padding[0] - dilation[0] * (w.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t Q = (x.size(3) + 2 * padding[1] - dilation[1] * (w.size(3) - 1) - 1) / stride[1] + 1;
  const std::vector<int64_t> want{x.size(0), w.size(0), P, Q};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(want), fn, ": out must have shape ", at::IntArrayRef(want), ", got ",
              out.sizes());

  const auto dtype = x.scalar_type();
  if (!enabled() || !x.is_cuda() || (dtype != at::kHalf && dtype != at::kBFloat16) || groups != 1) {
    return false;
  }
  if (!dense_nhwc(x) || !aligned(x.const_data_ptr(), kTensorAlignment) || !like_x(w, x) || !like_x(out, x)) {
    return false;
  }
  const int64_t C = x.size(1), K = w.size(0);
  if (w.size(1) != C || C % kChannelMultiple != 0 || K % kChannelMultiple != 0 || x.numel() == 0 ||
      w.numel() == 0 || out.numel() == 0) {
    return false;
  }
  if (!under_2gb(x) || !under_2gb(w) || !under_2gb(out)) {
    return false;
  }
  for (int64_t v : {stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]}) {
    if (v > std::numeric_limits<int>::max()) {
      return false;
    }
  }
  if (!compute_capability_8_plus(x.get_device())) {
    return false;
  }
  // Every size fits int: each tensor has fewer than 2^31 elements.
  problem = cutlass::conv::Conv2dProblemSize(
      static_cast<int>(x.size(0)), static_cast<int>(x.size(2)), static_cast<int>(x.size(3)), static_cast<int>(C),
      static_cast<int>(K), static_cast<int>(w.size(2)), static_cast<int>(w.size(3)), static_cast<int>(P),
      static_cast<int>(Q), static_cast<int>(padding[0]), static_cast<int>(padding[1]),
      static_cast<int>(stride[0]), static_cast<int>(stride[1]), static_cast<int>(dilation[0]),
      static_cast<int>(dilation[1]), cutlass::conv::Mode::kCrossCorrelation, /*split_k_slices=*/1,
      /*groups=*/1);
  return true;
}

// Adds one to the count _C.cutlass_conv_launches() reports (defined in fprop.cu).
void count_launch();

}  // namespace cutlass_conv
}  // namespace resnet_fused
