// The cuDNN graph engine's slot (cudnn_engine.h). Without the cuDNN frontend headers the engine declines every call.
#include "cudnn_engine.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>

#include "../common/checks.h"
#include "../ops/train_ops.h"

#ifdef RESNET_FUSED_WITH_CUDNN_FRONTEND
#include "../cudnn/cudnn_graph.h"
#endif

namespace resnet_fused {
namespace cudnn_engine {

namespace {

// Whether ``stream`` is capturing a CUDA graph. CUDAStream::is_capturing() is not in every torch this project
// supports (torch 2.11 lacks it); the runtime's own query is.
[[maybe_unused]] bool stream_is_capturing(const c10::cuda::CUDAStream& stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace

#ifndef RESNET_FUSED_WITH_CUDNN_FRONTEND

std::string unavailable() { return "the extension was built without the cuDNN frontend headers"; }

std::string conv_bn_act(const ConvBnActArgs&, const at::Tensor&, at::Tensor&) { return unavailable(); }

std::string conv_stats(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                       int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, at::IntArrayRef,
                       at::MemoryFormat, std::tuple<at::Tensor, at::Tensor, at::Tensor>&) {
  return unavailable();
}

std::string conv_stats_backward_conv(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                     at::IntArrayRef, at::IntArrayRef, int64_t, const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&, std::array<bool, 2>,
                                     std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>&) {
  return unavailable();
}

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

std::string conv_stats(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
                       const std::optional<at::Tensor>& in_shift, at::IntArrayRef out_sizes, at::MemoryFormat mf,
                       std::tuple<at::Tensor, at::Tensor, at::Tensor>& out) {
  if (std::string why = unavailable(); !why.empty()) {
    return why;
  }
  if (stream_is_capturing(c10::cuda::getCurrentCUDAStream(x.device().index()))) {
    return "the exact variance check of cuDNN's statistics synchronizes with the host, which a CUDA graph capture "
           "does not allow";
  }
  const int64_t K = out_sizes[1];
  at::Tensor c = at::empty(out_sizes, x.options().memory_format(mf));
  const at::TensorOptions fp32 = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor sum = at::empty({K}, fp32), sq_sum = at::empty({K}, fp32);
  const at::Tensor none;
  const cudnn_graph::Result r =
      cudnn_graph::conv_genstats(x, weight.contiguous(mf), in_scale.value_or(none), in_shift.value_or(none), c, sum,
                                 sq_sum, stride, padding, dilation, groups);
  if (!r.ok) {
    return r.reason;
  }
  at::Tensor mean = at::empty({K}, fp32), var = at::empty({K}, fp32);
  cudnn_graph::genstats_mean_var(c, sum, sq_sum, mean, var);
  out = {c, mean, var};
  return "";
}

std::string conv_stats_backward_conv(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, const std::optional<at::Tensor>& in_scale,
                                     const std::optional<at::Tensor>& in_shift, std::array<bool, 2> output_mask,
                                     std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>& out) {
  if (std::string why = unavailable(); !why.empty()) {
    return why;
  }
  static const auto affine_relu_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resnet_fused::affine_relu_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&)>();
  const at::MemoryFormat mf = x.suggest_memory_format();
  const at::Tensor xd = x.contiguous(mf), gd = g.contiguous(mf);
  const at::TensorOptions per_channel = x.options().dtype(at::kFloat);
  at::Tensor dx = not_computed(x.options()), dw = not_computed(weight.options());
  at::Tensor dscale = not_computed(per_channel), dshift = not_computed(per_channel);
  const bool prologue = in_scale.has_value();
  if (output_mask[0] && !prologue) {
    // No ReLU to fuse: the data gradient is cuDNN's own dgrad.
    dx = with_format_strides(std::get<0>(at::convolution_backward(gd, xd, weight, std::nullopt, stride, padding,
                                                                  dilation, /*transposed=*/false, {0, 0}, groups,
                                                                  {true, false, false})),
                             mf);  // the layout the op promises
  } else if (output_mask[0]) {
    at::Tensor gz = empty_in_format(x.sizes(), x.options(), mf);
    const cudnn_graph::Result r = cudnn_graph::conv_dgrad_drelu(gd, weight.contiguous(mf), xd, *in_scale, *in_shift,
                                                                gz, stride, padding, dilation, groups);
    if (!r.ok) {
      return "dgrad: " + r.reason;
    }
    // gz is zero wherever the ReLU was off; the pass recomputes that mask (the same one) with dx and the sums.
    std::tie(dx, dscale, dshift) = affine_relu_backward.call(gz, xd, *in_scale, *in_shift);
  }
  if (output_mask[1]) {
    dw = empty_in_format(weight.sizes(), weight.options(), weight.suggest_memory_format());
    const cudnn_graph::Result r =
        cudnn_graph::conv_wgrad(gd, xd, in_scale.value_or(at::Tensor()), in_shift.value_or(at::Tensor()), dw, stride,
                                padding, dilation, groups);
    if (!r.ok) {
      return "wgrad: " + r.reason;
    }
  }
  out = {dx, dw, dscale, dshift};
  return "";
}

#endif  // RESNET_FUSED_WITH_CUDNN_FRONTEND

}  // namespace cudnn_engine
}  // namespace resnet_fused
