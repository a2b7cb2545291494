// build_info(): what this extension was compiled with (declared in build_info.h). Plain C++ apart from the version
// macro of torch's headers, so it needs none of ATen.
#include "build_info.h"

#include <torch/version.h>

namespace resnet_fused {

BuildInfo build_info() {
  BuildInfo info;
#ifdef RESNET_FUSED_WITH_CUDA
  info.with_cuda = true;
  info.cuda_runtime_version = cuda_runtime_version();
  info.cuda_archs = cuda_archs();
#else
  info.with_cuda = false;
  info.cuda_runtime_version = 0;
#endif
  info.torch_version = TORCH_VERSION;
#ifdef RESNET_FUSED_WITH_CUTLASS
  info.cutlass_version = cutlass_version();
#endif
#ifdef RESNET_FUSED_WITH_CUDNN_FRONTEND
  info.cudnn_frontend = cudnn_frontend_version();
#endif
  return info;
}

}  // namespace resnet_fused
