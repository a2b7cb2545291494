// Python module object of resnet_fused._C: plain helpers only (the ops themselves are registered with the
// dispatcher by TORCH_LIBRARY in ops/*.cpp as a side effect of loading this shared library).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/build_info.h"
#include "common/engine.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resnet_fused C++/CUDA ops (torch.ops.resnet_fused.*) and build information";
  m.def(
      "build_info",
      []() {
        const resnet_fused::BuildInfo info = resnet_fused::build_info();
        py::dict d;
        d["with_cuda"] = info.with_cuda;
        if (info.with_cuda) {
          const int v = info.cuda_runtime_version;
          d["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
        } else {
          d["cuda_version"] = py::none();
        }
        d["archs"] = info.cuda_archs;
        d["torch_version"] = info.torch_version;
        if (info.cutlass_version.empty()) {
          d["cutlass"] = py::none();
        } else {
          d["cutlass"] = info.cutlass_version;
        }
        d["cudnn_frontend"] = info.cudnn_frontend.empty() ? py::object(py::none()) : py::str(info.cudnn_frontend);
        return d;
      },
      "dict(with_cuda: bool, cuda_version: str | None, archs: list[int] (SM versions), torch_version: str, "
      "cutlass: str | None (CUTLASS version of the tensor-core conv kernels, None when built without them), "
      "cudnn_frontend: str | None (cuDNN graph engine: frontend and cuDNN versions, None when built without it))");
  m.def("last_engine", &resnet_fused::engine::last_engine,
        "The engine (and for CUTLASS its tile configuration) that ran this thread's last CUDA conv_bn_act / "
        "conv_stats call, e.g. 'cutlass 128x64x64/3 swizzle 1' or 'plain'; '' before any");
#ifdef RESNET_FUSED_WITH_CUTLASS
  m.def("cutlass_conv_launches", &resnet_fused::cutlass_conv_launches,
        "Number of CUTLASS convolution kernels launched by this process (test hook: which path an op took)");
  m.def("cutlass_last_config", &resnet_fused::cutlass_last_config,
        "Tile configuration and swizzle width of this thread's last CUTLASS fprop kernel, e.g. "
        "'128x64x64/3 swizzle 1' (test hook: which kernel a covered conv_bn_act ran)");
#endif
}
