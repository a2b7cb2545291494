// CUDA implementations of the resnet_fused ops (fp32 / fp16 / bf16, fp32 math).
//
// (scale_bias_add_relu, the training tail, lives with its backward in train_cuda.cu.)
//
// conv_bias_act on float16 / bfloat16 channels_last tensors that the CUTLASS kernels cover (conv_cutlass.h:
// groups 1, C and K multiples of 8, dense 16-byte aligned NHWC operands, compute capability >= 8.0, extension
// built with the CUTLASS headers) runs each convolution as an implicit GEMM on tensor cores with bias, residual
// and ReLU in its epilogue: one launch, or two with a downsample shortcut (the 1x1 shortcut conv plus the
// residual into a temporary, then the main conv plus bias plus that temporary, then ReLU). Sharing one
// accumulator between the two (DESIGN.md's single-launch tail) is not done yet.
// Everything else (float32, NCHW, other channel counts, groups > 1, a call that any of its launches does not
// cover) runs the convolution(s) with at::convolution (cuDNN) and then ONE fused epilogue kernel for bias +
// shortcut-conv output + residual + ReLU, instead of separate bias, add and ReLU passes.
//
// The epilogue is a per-channel pass of channel_pass.cuh (shared with the training kernels of train_cuda.cu):
// elementwise over a dense NCHW or NHWC tensor, every operand made dense in the output's memory format, 16-byte
// packs where layout and alignment allow, NHWC threads keeping one channel pack's coefficients while they walk
// the pixels.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <tuple>

#include "build_info.h"
#include "channel_pass.cuh"
#include "conv_cutlass.h"
#include "ops.h"

namespace resnet_fused {

int cuda_runtime_version() { return CUDART_VERSION; }

std::vector<int> cuda_archs() {
  // __CUDA_ARCH_LIST__ is the comma-separated list of virtual architectures nvcc compiled for (e.g. 800,900).
  const int list[] = {__CUDA_ARCH_LIST__};
  std::vector<int> archs;
  for (int a : list) {
    archs.push_back(a / 10);
  }
  return archs;
}

namespace {

using channel_pass::aligned16;
using channel_pass::check_cuda_dtype;
using channel_pass::launch_pass;
using channel_pass::NoState;
using channel_pass::Pack;
using channel_pass::relu;

// The epilogue below is an elementwise pass of channel_pass.cuh (State = NoState): coef<VEC, PER_LANE>(k0) loads
// the per-channel coefficients of a pack, apply<VEC>(i, coef, st) computes pack i of every operand.

// conv_bias_act epilogue:  out[e] = act(y[e] + bias[k] + sc[e] + res[e])  (summed in this order; absent terms
// skipped, bias 0 when absent), act = relu or identity, k = channel(e); fp32 math, one rounding at the store.
// The optional-term branches are uniform across the grid.
template <typename scalar_t>
struct BiasAct {
  using State = NoState;
  const scalar_t* y;                  // conv output [N, K, P, Q], dense in the launch's layout (may alias out)
  const float* __restrict__ bias;     // [K] in fp32, or nullptr
  const scalar_t* __restrict__ sc;    // shortcut conv output, same shape and layout as y, or nullptr
  const scalar_t* __restrict__ res;   // residual, same shape and layout as y, or nullptr
  scalar_t* out;                      // same shape and layout as y
  bool with_relu;                     // act = relu, else identity

  template <int VEC>
  struct Coef {
    float b[VEC];
  };

  template <int VEC, bool PER_LANE, typename index_t>
  __device__ __forceinline__ Coef<VEC> coef(index_t k0) const {
    Coef<VEC> q;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      q.b[j] = bias != nullptr ? bias[PER_LANE ? k0 + j : k0] : 0.f;
    }
    return q;
  }

  template <int VEC, typename index_t>
  __device__ __forceinline__ void apply(index_t i, const Coef<VEC>& q, State (&)[VEC]) const {
    using P = Pack<scalar_t, VEC>;
    const P yv = reinterpret_cast<const P*>(y)[i];
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc[j] = static_cast<float>(yv.v[j]) + q.b[j];
    }
    if (sc != nullptr) {
      const P sv = reinterpret_cast<const P*>(sc)[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] += static_cast<float>(sv.v[j]);
      }
    }
    if (res != nullptr) {
      const P rv = reinterpret_cast<const P*>(res)[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] += static_cast<float>(rv.v[j]);
      }
    }
    P ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      ov.v[j] = static_cast<scalar_t>(with_relu ? relu(acc[j]) : acc[j]);
    }
    reinterpret_cast<P*>(out)[i] = ov;
  }
};

// conv_bias_act on the CUTLASS kernels (conv_cutlass.h): one launch, or with a downsample shortcut two (the 1x1
// shortcut conv plus the residual into a temporary, then the main conv plus bias plus that temporary, then
// ReLU). `bias_f32` is the bias in fp32 (or undefined). Returns an undefined tensor, having launched nothing
// (apart from copying a misaligned bias), when any of the launches is not covered.
at::Tensor conv_bias_act_cutlass(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias_f32, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& shortcut_x, const std::optional<at::Tensor>& shortcut_weight,
    at::IntArrayRef shortcut_stride, bool relu, at::IntArrayRef out_sizes, at::MemoryFormat mf) {
  // The kernels read the bias as 32-byte vectors.
  const at::Tensor bias_d =
      bias_f32.defined() && reinterpret_cast<std::uintptr_t>(bias_f32.data_ptr()) % 32 != 0 ? bias_f32.clone()
                                                                                            : bias_f32;
  const at::Tensor res = residual.has_value() ? *residual : at::Tensor();
  // Filters in the kernels' KRSC layout (a copy of the small weight tensor only when it is NCHW); activations
  // are taken as they are.
  const at::Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor sw = shortcut_weight.has_value() ? shortcut_weight->contiguous(at::MemoryFormat::ChannelsLast)
                                                    : at::Tensor();
  at::Tensor out = empty_in_format(out_sizes, x.options(), mf);
  if (!shortcut_x.has_value()) {
    const bool ran = cutlass_conv_fprop(x, w, bias_d, res, out, stride, padding, dilation, groups, relu);
    return ran ? out : at::Tensor();
  }
  at::Tensor sc = empty_in_format(out_sizes, x.options(), mf);
  const std::array<int64_t, 2> no_padding{0, 0}, no_dilation{1, 1};
  if (!cutlass_conv_fprop_supported(*shortcut_x, sw, at::Tensor(), res, sc, shortcut_stride,
                                    no_padding, no_dilation, 1) ||
      !cutlass_conv_fprop_supported(x, w, bias_d, sc, out, stride, padding, dilation, groups)) {
    return at::Tensor();
  }
  const bool ran = cutlass_conv_fprop(*shortcut_x, sw, at::Tensor(), res, sc, shortcut_stride,
                                      no_padding, no_dilation, 1, /*relu=*/false) &&
                   cutlass_conv_fprop(x, w, bias_d, sc, out, stride, padding, dilation, groups, relu);
  TORCH_CHECK(ran, "resnet_fused::conv_bias_act: a CUTLASS convolution checked as supported did not run");
  return out;
}

at::Tensor conv_bias_act_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& shortcut_x, const std::optional<at::Tensor>& shortcut_weight,
    at::IntArrayRef shortcut_stride, bool relu) {
  constexpr const char* op = "resnet_fused::conv_bias_act";
  const auto out_sizes = check_conv_bias_act(x, weight, bias, stride, padding, dilation, groups, residual,
                                             shortcut_x, shortcut_weight, shortcut_stride);
  check_cuda_dtype(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat mf = x.suggest_memory_format();
  const at::Tensor bias_d = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  if (mf == at::MemoryFormat::ChannelsLast && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16)) {
    at::Tensor out = conv_bias_act_cutlass(x, weight, bias_d, stride, padding, dilation, groups, residual,
                                           shortcut_x, shortcut_weight, shortcut_stride, relu, out_sizes, mf);
    if (out.defined()) {
      return out;
    }
  }
  const ConvParts parts = conv_parts(x, weight, stride, padding, dilation, groups, shortcut_x, shortcut_weight,
                                     shortcut_stride, mf);
  const at::Tensor& y = parts.main;
  // The epilogue runs in place on the (fresh) conv output when it already has the output's exact strides.
  const bool in_place = has_format_strides(y, mf);
  const bool nothing_to_fuse = !bias.has_value() && !residual.has_value() && !parts.shortcut.defined() && !relu;
  if (nothing_to_fuse && in_place) {
    return y;
  }
  at::Tensor out = in_place ? y : empty_in_format(out_sizes, x.options(), mf);
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor res_d = residual.has_value() ? residual->contiguous(mf) : at::Tensor();
  const at::Tensor& sc_d = parts.shortcut;
  const bool all_aligned = aligned16(y.data_ptr()) && aligned16(out.data_ptr()) &&
                           (!res_d.defined() || aligned16(res_d.data_ptr())) &&
                           (!sc_d.defined() || aligned16(sc_d.data_ptr()));
  RESNET_FUSED_DISPATCH_CUDA_TYPES(x.scalar_type(), op, [&] {
    const BiasAct<scalar_t> epi{
        y.const_data_ptr<scalar_t>(),
        bias_d.defined() ? bias_d.const_data_ptr<float>() : nullptr,
        sc_d.defined() ? sc_d.const_data_ptr<scalar_t>() : nullptr,
        res_d.defined() ? res_d.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(),
        relu};
    launch_pass<scalar_t>(epi, out.sizes(), mf, all_aligned, out.options());
  });
  return out;
}

// Test hook for cutlass_conv_stats (conv_cutlass.h), which the conv_stats op tries first: runs it on fresh
// outputs (c dense channels_last) and returns (c, mean, var, ran); when ran is false nothing was launched and
// the tensors are uninitialized. Registered in the separate library resnet_fused_debug.
std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> cutlass_conv_stats_debug(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "resnet_fused_debug::cutlass_conv_stats";
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, op, ": x and weight must be 4-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && stride[0] >= 1 &&
                  stride[1] >= 1,
              op, ": stride, padding and dilation must have 2 elements, stride >= 1");
  const int64_t K = weight.size(0);
  const int64_t P = (x.size(2) + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t Q = (x.size(3) + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(P >= 1 && Q >= 1, op, ": empty output");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor c = empty_in_format({x.size(0), K, P, Q}, x.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({K}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({K}, x.options().dtype(at::kFloat));
  const bool ran = cutlass_conv_stats(x, weight, in_scale.value_or(at::Tensor()), in_shift.value_or(at::Tensor()),
                                      c, mean, var, stride, padding, dilation, groups);
  return {c, mean, var, ran};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bias_act", &conv_bias_act_cuda);
}

TORCH_LIBRARY(resnet_fused_debug, m) {
  m.def(
      "cutlass_conv_stats(Tensor x, Tensor weight, Tensor? in_scale, Tensor? in_shift, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor, Tensor, bool)");
}

TORCH_LIBRARY_IMPL(resnet_fused_debug, CUDA, m) {
  m.impl("cutlass_conv_stats", &cutlass_conv_stats_debug);
}

}  // namespace resnet_fused
