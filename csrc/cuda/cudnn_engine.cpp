// The cuDNN graph engine's slot (cudnn_engine.h). Without the cuDNN frontend headers the engine declines every call.
#include "cudnn_engine.h"

#include <ATen/ops/empty.h>

#include <array>

#ifdef RESNET_FUSED_WITH_CUDNN_FRONTEND
#include "../cudnn/cudnn_graph.h"
#endif

namespace resnet_fused {
namespace cudnn_engine {

#ifndef RESNET_FUSED_WITH_CUDNN_FRONTEND

std::string unavailable() { return "the extension was built without the cuDNN frontend headers"; }

std::string conv_bn_act(const ConvBnActArgs&, const at::Tensor&, at::Tensor&) { return unavailable(); }

#else

std::string unavailable() {
  return cudnn_graph::available() ? "" : "the cuDNN graph engine is unavailable (no cuDNN handle could be made)";
}

std::string conv_bn_act(const ConvBnActArgs& a, const at::Tensor& scale_shift, at::Tensor& out) {
  const at::MemoryFormat mf = a.x.suggest_memory_format();
  const at::Tensor w = a.weight.contiguous(mf);
  at::Tensor residual = a.residual.defined() ? a.residual.contiguous(mf) : at::Tensor();
  if (a.shortcut_x.defined()) {
    const std::array<int64_t, 2> no_padding{0, 0}, no_dilation{1, 1};
    at::Tensor sc = at::empty(out.sizes(), out.options().memory_format(mf));
    const cudnn_graph::Result r = cudnn_graph::conv_scale_bias_act(
        a.shortcut_x, a.shortcut_weight.contiguous(mf), scale_shift[1][0], scale_shift[1][1], residual, sc,
        a.shortcut_stride, no_padding, no_dilation, /*groups=*/1, /*relu=*/false);
    if (!r.ok) {
      return "shortcut conv: " + r.reason;
    }
    residual = sc;
  }
  const cudnn_graph::Result r =
      cudnn_graph::conv_scale_bias_act(a.x, w, scale_shift[0][0], scale_shift[0][1], residual, out, a.stride,
                                       a.padding, a.dilation, a.groups, a.relu);
  return r.ok ? "" : r.reason;
}

#endif  // RESNET_FUSED_WITH_CUDNN_FRONTEND

}  // namespace cudnn_engine
}  // namespace resnet_fused
