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

std::string conv_bn_act_declines(const ConvBnActArgs&, at::IntArrayRef, at::MemoryFormat) { return unavailable(); }

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

namespace {

using Op3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// resnet_fused::affine_relu: a = relu(x·scale + shift), the prologue as its own pass (the explicit formulation).
at::Tensor affine_relu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resnet_fused::affine_relu", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, scale, shift);
}

Op3 affine_relu_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resnet_fused::affine_relu_backward", "")
          .typed<Op3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(g, x, scale, shift);
}

// `t` when it is dense in `mf` (the call passes it as is), else a stand-in with the strides of the copy the call will
// make: a graph is planned on what it will run with, alignment included, without copying anything.
at::Tensor as_passed(const at::Tensor& t, at::MemoryFormat mf) {
  if (!t.defined() || t.is_contiguous(mf)) {
    return t;
  }
  return empty_in_format(t.sizes(), t.options(), mf);
}

// A per-channel fp32 vector of `n` to plan a graph with (allocated, never written or read).
at::Tensor plan_vector(const at::Tensor& like, int64_t n) {
  return at::empty({n}, like.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

std::string conv_bn_act_declines(const ConvBnActArgs& a, at::IntArrayRef out_sizes, at::MemoryFormat mf) {
  if (std::string why = unavailable(); !why.empty()) {
    return why;
  }
  // Every graph of the call, planned on stand-ins of the shapes, strides and dtypes the call will pass.
  const int64_t k = out_sizes[1];
  const at::Tensor s = plan_vector(a.x, k), t = plan_vector(a.x, k);
  at::Tensor y = empty_in_format(out_sizes, a.x.options(), mf);
  const at::Tensor residual = as_passed(a.residual, mf);
  if (a.shortcut_x.defined()) {
    const std::array<int64_t, 2> no_padding{0, 0}, no_dilation{1, 1};
    const cudnn_graph::Result r = cudnn_graph::conv_scale_bias_act(
        a.shortcut_x, as_passed(a.shortcut_weight, mf), s, t, residual, y, a.shortcut_stride, no_padding, no_dilation,
        /*groups=*/1, /*relu=*/false, /*plan_only=*/true);
    if (!r.ok) {
      return "shortcut conv: " + r.reason;
    }
  }
  at::Tensor main_residual = a.shortcut_x.defined() ? empty_in_format(out_sizes, a.x.options(), mf) : residual;
  const cudnn_graph::Result r =
      cudnn_graph::conv_scale_bias_act(a.x, as_passed(a.weight, mf), s, t, main_residual, y, a.stride, a.padding,
                                       a.dilation, a.groups, a.relu, /*plan_only=*/true);
  return r.ok ? "" : r.reason;
}

std::string conv_bn_act(const ConvBnActArgs& a, const at::Tensor& scale_shift, at::Tensor& out) {
  const at::MemoryFormat mf = a.x.suggest_memory_format();
  if (std::string why = conv_bn_act_declines(a, out.sizes(), mf); !why.empty()) {
    return why;  // (a cache lookup when the caller asked first)
  }
  const at::Tensor w = a.weight.contiguous(mf);
  at::Tensor residual = a.residual.defined() ? a.residual.contiguous(mf) : at::Tensor();
  if (a.shortcut_x.defined()) {
    const std::array<int64_t, 2> no_padding{0, 0}, no_dilation{1, 1};
    at::Tensor sc = at::empty(out.sizes(), out.options().memory_format(mf));
    const cudnn_graph::Result r = cudnn_graph::conv_scale_bias_act(
        a.shortcut_x, a.shortcut_weight.contiguous(mf), scale_shift[1][0], scale_shift[1][1], residual, sc,
        a.shortcut_stride, no_padding, no_dilation, /*groups=*/1, /*relu=*/false);
    if (!r.ok) {
      return "shortcut conv (planned, then refused at run time): " + r.reason;
    }
    residual = sc;
  }
  const cudnn_graph::Result r =
      cudnn_graph::conv_scale_bias_act(a.x, w, scale_shift[0][0], scale_shift[0][1], residual, out, a.stride,
                                       a.padding, a.dilation, a.groups, a.relu);
  return r.ok ? "" : "planned, then refused at run time: " + r.reason;
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
  const at::Tensor xd = x.contiguous(mf), w = weight.contiguous(mf);
  at::Tensor c = at::empty(out_sizes, x.options().memory_format(mf));
  const at::TensorOptions fp32 = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor sum = at::empty({K}, fp32), sq_sum = at::empty({K}, fp32);
  const at::Tensor none;
  // The formulation: the BN+ReLU prologue inside the graph when cuDNN has an engine for it, else (cuDNN on Hopper
  // has none for a prologue with fp32 vectors: benchmarks/results/cudnn/) the prologue as one affine_relu pass and
  // the graph without it. Both planned before anything runs.
  bool fused = in_scale.has_value();
  cudnn_graph::Result plan = cudnn_graph::conv_genstats(xd, w, in_scale.value_or(none), in_shift.value_or(none), c,
                                                        sum, sq_sum, stride, padding, dilation, groups, true);
  if (!plan.ok && fused) {
    const cudnn_graph::Result split = cudnn_graph::conv_genstats(xd, w, none, none, c, sum, sq_sum, stride, padding,
                                                                 dilation, groups, true);
    if (!split.ok) {
      return "with the prologue: " + plan.reason + "; after an explicit BN+ReLU pass: " + split.reason;
    }
    fused = false;
    plan = split;
  }
  if (!plan.ok) {
    return plan.reason;
  }
  // Whether cuDNN's genstats accumulates into SUM / SQ_SUM or overwrites them is not documented (NVIDIA's own
  // samples zero them first): zeroed here.
  sum.zero_();
  sq_sum.zero_();
  const at::Tensor a = in_scale.has_value() && !fused ? affine_relu(xd, *in_scale, *in_shift).contiguous(mf) : xd;
  const cudnn_graph::Result r =
      cudnn_graph::conv_genstats(a, w, fused ? *in_scale : none, fused ? *in_shift : none, c, sum, sq_sum, stride,
                                 padding, dilation, groups);
  if (!r.ok) {
    return "planned, then refused at run time: " + r.reason;
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
  const at::MemoryFormat mf = x.suggest_memory_format();
  const at::Tensor xd = x.contiguous(mf), gd = g.contiguous(mf), w = weight.contiguous(mf);
  const at::TensorOptions per_channel = x.options().dtype(at::kFloat);
  at::Tensor dx = not_computed(x.options()), dw = not_computed(weight.options());
  at::Tensor dscale = not_computed(per_channel), dshift = not_computed(per_channel);
  const bool prologue = in_scale.has_value();
  const at::Tensor none;
  const at::Tensor s = in_scale.value_or(none), t = in_shift.value_or(none);
  // Every graph planned before anything runs. With a prologue, each graph takes it fused when cuDNN has an engine
  // for that, else the activated input a = affine_relu(x) (one pass, made once) without it: the dgrad graph's ReLU
  // mask [a > 0] is [x·in_scale + in_shift > 0], and wgrad(dy, a) is the same weight gradient.
  at::Tensor gz, dw_out;
  bool dgrad_fused = prologue, wgrad_fused = prologue;
  if (output_mask[0] && prologue) {
    gz = empty_in_format(x.sizes(), x.options(), mf);
    cudnn_graph::Result r = cudnn_graph::conv_dgrad_drelu(gd, w, xd, s, t, gz, stride, padding, dilation, groups, true);
    if (!r.ok) {
      const cudnn_graph::Result split =
          cudnn_graph::conv_dgrad_drelu(gd, w, xd, none, none, gz, stride, padding, dilation, groups, true);
      if (!split.ok) {
        return "dgrad with the prologue: " + r.reason + "; after an explicit BN+ReLU pass: " + split.reason;
      }
      dgrad_fused = false;
    }
  }
  if (output_mask[1]) {
    dw_out = empty_in_format(weight.sizes(), weight.options(), weight.suggest_memory_format());
    cudnn_graph::Result r = cudnn_graph::conv_wgrad(gd, xd, s, t, dw_out, stride, padding, dilation, groups, true);
    if (!r.ok && prologue) {
      const cudnn_graph::Result split =
          cudnn_graph::conv_wgrad(gd, xd, none, none, dw_out, stride, padding, dilation, groups, true);
      if (!split.ok) {
        return "wgrad with the prologue: " + r.reason + "; after an explicit BN+ReLU pass: " + split.reason;
      }
      wgrad_fused = false;
    } else if (!r.ok) {
      return "wgrad: " + r.reason;
    }
  }
  at::Tensor a;
  if (prologue && ((output_mask[0] && !dgrad_fused) || (output_mask[1] && !wgrad_fused))) {
    a = affine_relu(xd, s, t).contiguous(mf);
  }
  if (output_mask[0] && !prologue) {
    // No ReLU to fuse: the data gradient is cuDNN's own dgrad.
    dx = with_format_strides(std::get<0>(at::convolution_backward(gd, xd, weight, std::nullopt, stride, padding,
                                                                  dilation, /*transposed=*/false, {0, 0}, groups,
                                                                  {true, false, false})),
                             mf);  // the layout the op promises
  } else if (output_mask[0]) {
    const cudnn_graph::Result r = dgrad_fused ? cudnn_graph::conv_dgrad_drelu(gd, w, xd, s, t, gz, stride, padding,
                                                                             dilation, groups)
                                              : cudnn_graph::conv_dgrad_drelu(gd, w, a, none, none, gz, stride,
                                                                             padding, dilation, groups);
    if (!r.ok) {
      return "dgrad (planned, then refused at run time): " + r.reason;
    }
    // gz is zero wherever the ReLU was off; the pass recomputes that mask (the same one) with dx and the sums.
    std::tie(dx, dscale, dshift) = affine_relu_backward(gz, xd, s, t);
  }
  if (output_mask[1]) {
    const cudnn_graph::Result r =
        wgrad_fused ? cudnn_graph::conv_wgrad(gd, xd, s, t, dw_out, stride, padding, dilation, groups)
                    : cudnn_graph::conv_wgrad(gd, prologue ? a : xd, none, none, dw_out, stride, padding, dilation,
                                              groups);
    if (!r.ok) {
      return "wgrad (planned, then refused at run time; the input side's work is discarded): " + r.reason;
    }
    dw = dw_out;
  }
  out = {dx, dw, dscale, dshift};
  return "";
}

#endif  // RESNET_FUSED_WITH_CUDNN_FRONTEND

}  // namespace cudnn_engine
}  // namespace resnet_fused
