// CUDA implementation of the resnet_fused eval op conv_bn_act (fp32 / fp16 / bf16 activations, fp32 math).
//
// (scale_bias_add_relu, the training tail, lives with its backward in train_ops.cu.)
//
// conv_bn_act: y = act(conv(x, W)·s + t [+ conv1x1(x_d, W_d)·s_d + t_d] [+ residual]), each BN's (s, t) computed
// from its live tensors on every call (eval_bn.cuh), applied in fp32 to the fp32 accumulator or conv output, one
// rounding to x's dtype. The engines, tried in the order the op's `engines` argument gives (common/engine.h):
//   cudnn    one launch computing both BNs' (s, t), then cuDNN's fusion graphs conv -> ×s -> +t [-> +residual] ->
//            ReLU (cudnn_engine.h; with a downsample shortcut its graph first, into a temporary). Declines in a
//            build without the cuDNN frontend, and wherever cuDNN refuses a graph (its message).
//   cutlass  float16 / bfloat16 channels_last calls the CUTLASS kernels cover (cutlass/conv_cutlass.h: groups 1, C
//            and K multiples of 8, dense 16-byte aligned NHWC operands, compute capability >= 8.0, extension built
//            with the CUTLASS headers): one tiny launch computing the (s, t) pairs of both BNs, then each
//            convolution as an implicit GEMM on tensor cores with BN, residual and ReLU in its epilogue: one launch,
//            or two with a downsample shortcut (the 1x1 shortcut conv with its BN plus the residual into a temporary
//            in x's dtype, then the main conv with its BN plus that temporary, then ReLU). Sharing one accumulator
//            between the two (DESIGN.md's single-launch tail) is not done: the temporary costs one write and one
//            read of the block's output and one extra rounding.
//   plain    every call: the convolution(s) with at::convolution (cuDNN), then ONE channel pass that computes
//            (s, t) and (s_d, t_d) from the BN tensors for its channels and applies both BNs, the residual and the
//            ReLU, instead of separate BN, add and ReLU passes.
// An engine that cannot run a call says why and launches nothing; the next one runs it (engine::decline when none).
//
// The channel pass is channel_pass.cuh's (shared with the training kernels of train_ops.cu): elementwise over a
// dense NCHW or NHWC tensor, every operand made dense in the output's memory format, 16-byte packs where layout and
// alignment allow, NHWC threads keeping one channel pack's coefficients while they walk the pixels.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/build_info.h"
#include "../common/checks.h"
#include "../common/engine.h"
#include "../cutlass/conv_cutlass.h"
#include "channel_pass.cuh"
#include "cudnn_engine.h"
#include "eval_bn.cuh"

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

// The epilogue below is an elementwise pass of channel_pass.cuh (State = NoState): coef<VEC, PER_LANE>(k0) computes
// the per-channel coefficients of a pack from the BN tensors, apply<VEC>(i, coef, st) computes pack i of every
// operand.

// conv_bn_act epilogue:  out[e] = act(y[e]·s[k] + t[k] + (sc[e]·s_d[k] + t_d[k]) + res[e])  (summed in this order;
// absent terms skipped), act = relu or identity, k = channel(e); (s, t) and (s_d, t_d) from the BN tensors
// (eval_bn.cuh), fp32 math, one rounding at the store. The optional-term branches are uniform across the grid.
template <typename scalar_t>
struct BnAct {
  using State = NoState;
  const scalar_t* y;                  // conv output [N, K, P, Q], dense in the launch's layout (may alias out)
  const scalar_t* __restrict__ sc;    // shortcut conv output, same shape and layout as y, or nullptr
  const scalar_t* __restrict__ res;   // residual, same shape and layout as y, or nullptr
  scalar_t* out;                      // same shape and layout as y
  BnRef bn;                           // the main conv's BN
  BnRef sc_bn;                        // the shortcut's BN (read only with sc)
  bool with_relu;                     // act = relu, else identity

  template <int VEC>
  struct Coef {
    float s[VEC], t[VEC], sd[VEC], td[VEC];
  };

  template <int VEC, bool PER_LANE, typename index_t>
  __device__ __forceinline__ Coef<VEC> coef(index_t k0) const {
    Coef<VEC> q;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t k = PER_LANE ? static_cast<int64_t>(k0) + j : static_cast<int64_t>(k0);
      bn_scale_shift(bn, k, q.s[j], q.t[j]);
      if (sc != nullptr) {
        bn_scale_shift(sc_bn, k, q.sd[j], q.td[j]);
      } else {
        q.sd[j] = q.td[j] = 0.f;
      }
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
      acc[j] = fmaf(static_cast<float>(yv.v[j]), q.s[j], q.t[j]);
    }
    if (sc != nullptr) {
      const P sv = reinterpret_cast<const P*>(sc)[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] += fmaf(static_cast<float>(sv.v[j]), q.sd[j], q.td[j]);
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

// The (s, t) of channel k of BN b (b = 0: the main conv's, b = 1: the shortcut's when present), fp32, written
// interleaved, out[b][k] = (s, t) ([n_bn, K, 2]: what the CUTLASS epilogue reads), or planar, out[b][0][k] = s,
// out[b][1][k] = t ([n_bn, 2, K]: two [K] vectors, what the cuDNN graphs take).
__global__ void bn_scale_shift_kernel(BnRef bn, BnRef sc_bn, int64_t K, bool planar, float* __restrict__ out) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) {
    return;
  }
  for (int b = 0; b < 2; ++b) {
    const BnRef& r = b == 0 ? bn : sc_bn;
    if (r.mean.data == nullptr) {
      break;
    }
    float s, t;
    bn_scale_shift(r, k, s, t);
    float* o = out + 2 * K * b;
    o[planar ? k : 2 * k] = s;
    o[planar ? K + k : 2 * k + 1] = t;
  }
}

// The (s, t) of the BN of `a` and, with a shortcut, of the shortcut's BN, computed from their live tensors: one
// launch; fp32 [n_bn, K, 2] (interleaved) or [n_bn, 2, K] (planar).
at::Tensor bn_scale_shift(const ConvBnActArgs& a, int64_t K, bool planar) {
  const int64_t n_bn = a.shortcut_x.defined() ? 2 : 1;
  at::Tensor out = at::empty(planar ? at::IntArrayRef({n_bn, 2, K}) : at::IntArrayRef({n_bn, K, 2}),
                             a.x.options().dtype(at::kFloat));
  constexpr int kThreads = 128;
  bn_scale_shift_kernel<<<static_cast<unsigned>(channel_pass::ceil_div(K, kThreads)), kThreads, 0,
                          at::cuda::getCurrentCUDAStream()>>>(
      bn_ref(a.bn), a.shortcut_x.defined() ? bn_ref(a.shortcut_bn) : BnRef{}, K, planar,
      out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Engine "cutlass": the (s, t) pairs, then one conv launch, or with a downsample shortcut two (the 1x1 shortcut
// conv with its BN plus the residual into a temporary, then the main conv with its BN plus that temporary, then
// ReLU). Returns "" having run, or why not, having launched nothing (any of the convolutions not covered).
std::string conv_bn_act_cutlass(const ConvBnActArgs& a, at::IntArrayRef out_sizes, at::MemoryFormat mf,
                                at::Tensor& out) {
  const int64_t K = out_sizes[1];
  // The cheap refusals first, before the weight copy below.
  if (!cutlass_built()) {
    return kNoCutlass;
  }
  if (mf != at::MemoryFormat::ChannelsLast || (a.x.scalar_type() != at::kHalf && a.x.scalar_type() != at::kBFloat16)) {
    return "the CUTLASS kernels run float16 / bfloat16 channels_last inputs only";
  }
  // Filters in the kernels' KRSC layout: a copy of the small weight tensor on every call when it is NCHW (no cache
  // of it: an in-place edit through .data bumps no version counter); channels_last models pay nothing.
  const at::Tensor w = a.weight.contiguous(at::MemoryFormat::ChannelsLast);
  out = empty_in_format(out_sizes, a.x.options(), mf);
  const std::array<int64_t, 2> no_padding{0, 0}, no_dilation{1, 1};
  if (!a.shortcut_x.defined()) {
    std::string why = cutlass_conv_fprop_uncovered(a.x, w, a.residual, out, a.stride, a.padding, a.dilation,
                                                   a.groups);
    if (!why.empty()) {
      return why;
    }
    const at::Tensor pairs = bn_scale_shift(a, K, /*planar=*/false);
    const bool ran = cutlass_conv_fprop(a.x, w, pairs[0], a.residual, out, a.stride, a.padding, a.dilation, a.groups,
                                        a.relu, &why);
    TORCH_CHECK(ran, "resnet_fused::conv_bn_act: a CUTLASS convolution checked as covered declined: ", why);
    return "";
  }
  const at::Tensor sw = a.shortcut_weight.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor sc = empty_in_format(out_sizes, a.x.options(), mf);
  std::string why = cutlass_conv_fprop_uncovered(a.shortcut_x, sw, a.residual, sc, a.shortcut_stride, no_padding,
                                                 no_dilation, 1);
  if (!why.empty()) {
    return "the shortcut conv: " + why;
  }
  why = cutlass_conv_fprop_uncovered(a.x, w, sc, out, a.stride, a.padding, a.dilation, a.groups);
  if (!why.empty()) {
    return why;
  }
  const at::Tensor pairs = bn_scale_shift(a, K, /*planar=*/false);
  const bool ran = cutlass_conv_fprop(a.shortcut_x, sw, pairs[1], a.residual, sc, a.shortcut_stride, no_padding,
                                      no_dilation, 1, /*relu=*/false, &why) &&
                   cutlass_conv_fprop(a.x, w, pairs[0], sc, out, a.stride, a.padding, a.dilation, a.groups, a.relu,
                                      &why);
  TORCH_CHECK(ran, "resnet_fused::conv_bn_act: a CUTLASS convolution checked as covered declined: ", why);
  return "";
}

// Engine "cudnn": the (s, t) of both BNs as planar vectors, then cuDNN's fusion graphs (cuda/cudnn_engine.h).
// Returns "" having run, or why not.
std::string conv_bn_act_cudnn(const ConvBnActArgs& a, at::IntArrayRef out_sizes, at::MemoryFormat mf,
                              at::Tensor& out) {
  std::string why = cudnn_engine::conv_bn_act_declines(a, out_sizes, mf);  // every graph planned first
  if (!why.empty()) {
    return why;
  }
  const at::Tensor scale_shift = bn_scale_shift(a, out_sizes[1], /*planar=*/true);
  out = empty_in_format(out_sizes, a.x.options(), mf);
  return cudnn_engine::conv_bn_act(a, scale_shift, out);
}

// conv_bn_act with cuDNN (at::convolution) for the convolution(s) and ONE channel pass for everything else.
at::Tensor conv_bn_act_plain(const ConvBnActArgs& a, at::IntArrayRef out_sizes, at::MemoryFormat mf) {
  constexpr const char* op = "resnet_fused::conv_bn_act";
  const ConvParts parts = conv_parts(a, mf);
  const at::Tensor& y = parts.main;
  // The epilogue runs in place on the (fresh) conv output when it already has the output's exact strides.
  at::Tensor out = has_format_strides(y, mf) ? y : empty_in_format(out_sizes, a.x.options(), mf);
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor res_d = a.residual.defined() ? a.residual.contiguous(mf) : at::Tensor();
  const at::Tensor& sc_d = parts.shortcut;
  const bool all_aligned = aligned16(y.data_ptr()) && aligned16(out.data_ptr()) &&
                           (!res_d.defined() || aligned16(res_d.data_ptr())) &&
                           (!sc_d.defined() || aligned16(sc_d.data_ptr()));
  RESNET_FUSED_DISPATCH_CUDA_TYPES(a.x.scalar_type(), op, [&] {
    const BnAct<scalar_t> epi{y.const_data_ptr<scalar_t>(),
                              sc_d.defined() ? sc_d.const_data_ptr<scalar_t>() : nullptr,
                              res_d.defined() ? res_d.const_data_ptr<scalar_t>() : nullptr,
                              out.mutable_data_ptr<scalar_t>(),
                              bn_ref(a.bn),
                              sc_d.defined() ? bn_ref(a.shortcut_bn) : BnRef{},
                              a.relu};
    launch_pass<scalar_t>(epi, out.sizes(), mf, all_aligned, out.options());
  });
  return out;
}

at::Tensor conv_bn_act_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& bn_mean, const at::Tensor& bn_var, double bn_eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shortcut_x,
    const std::optional<at::Tensor>& shortcut_weight, const std::optional<at::Tensor>& shortcut_bn_weight,
    const std::optional<at::Tensor>& shortcut_bn_bias, const std::optional<at::Tensor>& shortcut_bn_mean,
    const std::optional<at::Tensor>& shortcut_bn_var, double shortcut_bn_eps, at::IntArrayRef shortcut_stride,
    bool relu, c10::string_view engines) {
  constexpr const char* op = "resnet_fused::conv_bn_act";
  const ConvBnActArgs a = conv_bn_act_args(
      x, weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, stride, padding, dilation, groups, residual, shortcut_x,
      shortcut_weight, shortcut_bn_weight, shortcut_bn_bias, shortcut_bn_mean, shortcut_bn_var, shortcut_bn_eps,
      shortcut_stride, relu);
  const auto out_sizes = check_conv_bn_act(a);
  const engine::Order order = engine::parse(op, std::string_view(engines.data(), engines.size()));
  check_cuda_dtype(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat mf = x.suggest_memory_format();
  return engine::run_first<at::Tensor>(
      op, order,
      [&](engine::Engine e, at::Tensor& out) -> std::string {
        switch (e) {
          case engine::Engine::kCudnn:
            return conv_bn_act_cudnn(a, out_sizes, mf, out);
          case engine::Engine::kCutlass:
            return conv_bn_act_cutlass(a, out_sizes, mf, out);
          case engine::Engine::kPlain:
            break;
        }
        out = conv_bn_act_plain(a, out_sizes, mf);
        return "";
      },
      [](engine::Engine e) { return e == engine::Engine::kCutlass ? cutlass_last_config() : std::string(); });
}

// Test hook for cutlass_conv_stats (cutlass/conv_cutlass.h), which the conv_stats op tries first: runs it on fresh
// outputs (c dense channels_last) and returns (c, mean, var, ran); when ran is false nothing was launched and
// the tensors are uninitialized. Registered in the separate library resnet_fused_debug (schema in ops/eval_ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> cutlass_conv_stats_debug(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "resnet_fused_debug::cutlass_conv_stats";
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, op, ": x and weight must be 4-D");
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  const std::vector<int64_t> out_sizes = conv_output_size(op, x.sizes(), weight.sizes(), stride, padding, dilation);
  const int64_t K = out_sizes[1];
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor c = empty_in_format(out_sizes, x.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({K}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({K}, x.options().dtype(at::kFloat));
  const bool ran = cutlass_conv_stats(x, weight, in_scale.value_or(at::Tensor()), in_shift.value_or(at::Tensor()),
                                      c, mean, var, stride, padding, dilation, groups);
  return {c, mean, var, ran};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bn_act", &conv_bn_act_cuda);
}

TORCH_LIBRARY_IMPL(resnet_fused_debug, CUDA, m) {
  m.impl("cutlass_conv_stats", &cutlass_conv_stats_debug);
}

}  // namespace resnet_fused
