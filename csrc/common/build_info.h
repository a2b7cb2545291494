// Build facts of resnet_fused._C, in plain C++ types so the pybind11 translation unit needs no torch headers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace resnet_fused {

struct BuildInfo {
  bool with_cuda;                // CUDA kernels compiled in (RESNET_FUSED_WITH_CUDA)
  int cuda_runtime_version;      // CUDART_VERSION compiled against (e.g. 13000), 0 without CUDA
  std::vector<int> cuda_archs;   // SM versions with device code (e.g. {80, 90}), empty without CUDA
  std::string torch_version;     // TORCH_VERSION of the headers compiled against
  std::string cutlass_version;   // CUTLASS version compiled against (e.g. "4.2.0"), empty without CUTLASS
  std::string cudnn_frontend;    // cuDNN graph engine: "frontend 1.32.0, cuDNN 9.24.0", empty without it
};

// Defined in build_info.cpp.
BuildInfo build_info();

#ifdef RESNET_FUSED_WITH_CUDA
// Defined in cuda/eval_ops.cu (what nvcc actually compiled).
int cuda_runtime_version();
std::vector<int> cuda_archs();
#endif

#ifdef RESNET_FUSED_WITH_CUTLASS
// Defined in cutlass/fprop.cu: the CUTLASS version its kernels were compiled against ("4.2.0"), how many
// CUTLASS convolution kernels this process has launched, and which fprop configuration ran last (test hooks: they
// show which path an op took).
std::string cutlass_version();
int64_t cutlass_conv_launches();
// The tile configuration and swizzle width of this thread's last CUTLASS fprop kernel (conv_cutlass.h).
std::string cutlass_last_config();
#endif

#ifdef RESNET_FUSED_WITH_CUDNN_FRONTEND
// Defined in cudnn/cudnn_graph.cpp: cudnn_graph::version().
std::string cudnn_frontend_version();
#endif

}  // namespace resnet_fused
