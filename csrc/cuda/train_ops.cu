// CUDA implementations of the training-path ops (fp32 / fp16 / bf16 activations; fp32 math and per-channel
// vectors). The formulas are in ops/train_ops.cpp; what each launch fuses:
//
//   conv_stats                    engines in the order of its `engines` argument (common/engine.h):
//                                 cutlass: float16 / bfloat16 channels_last calls the CUTLASS kernels cover: one
//                                 tensor-core implicit-GEMM launch whose epilogue writes per-tile statistics of c,
//                                 plus their merge (cutlass/conv_cutlass.h), the prologue applied on load or, where the
//                                 kernel cannot, as one vectorized pass first; plain: that pass (none without
//                                 in_scale), at::convolution (cuDNN), then ONE read of c for its per-channel mean
//                                 and biased variance (Welford per thread, Chan merge of per-block partials:
//                                 deterministic and robust to a large mean); cudnn: ONE cuDNN graph for the
//                                 prologue, the conv and per-channel Σc / Σc² (genstats), then the mean and
//                                 variance with every ill-conditioned channel recomputed exactly
//                                 (cudnn_engine.h; one host sync, so it declines under CUDA graph capture).
//   affine_relu                   one pass.
//   scale_bias_add_relu           one pass: relu(c*s + t + idn*s_d + t_d) (or + idn), the block tail.
//   conv_stats_backward_input     one pass: dc + dmean/n + dvar*2(c - mean)/n, reading dc and c once.
//   affine_relu_backward          one pass writing dx and the per-block sums of g*x and g, then their merge.
//   conv_stats_backward_conv      engines: cudnn (cudnn_engine.h: the wgrad graph recomputing the prologue on
//                                 load, the dgrad graph with the ReLU mask fused, then affine_relu_backward's pass);
//                                 plain (ops/train_ops.h: affine_relu, aten convolution_backward,
//                                 affine_relu_backward); cutlass declines.
//   scale_bias_add_relu_backward  one pass that recomputes the ReLU mask from c and idn (the forward saves no
//                                 output), writes dc and didn and the per-block sums of g*c, g (and g*idn), then
//                                 their merge.
//   bn_finalize                   one launch, one thread per channel: scale, shift and the running statistics.
//
// The per-channel passes are channel_pass.cuh's (16-byte packs where the layout and alignment allow, scalar
// otherwise; NHWC and NCHW). Every launch goes to the current stream of the operands' device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <array>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "../common/engine.h"
#include "../cutlass/conv_cutlass.h"
#include "../ops/train_ops.h"
#include "channel_pass.cuh"
#include "cudnn_engine.h"

namespace resnet_fused {

namespace {

using channel_pass::aligned16;
using channel_pass::check_cuda_dtype;
using channel_pass::launch_pass;
using channel_pass::NoState;
using channel_pass::Pack;
using channel_pass::relu;
using channel_pass::Sums;
using channel_pass::Welford;

// Lane j of a pack gets channel k0 + j (PER_LANE) or k0 of per-channel vector p, or `absent` when p is nullptr.
template <int VEC, bool PER_LANE, typename index_t>
__device__ __forceinline__ void load_coef(float (&dst)[VEC], const float* p, index_t k0, float absent) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    dst[j] = p != nullptr ? p[PER_LANE ? k0 + j : k0] : absent;
  }
}

// The per-channel (scale, shift) coefficients of a pass over relu(x*scale + shift).
template <int VEC>
struct AffineCoef {
  float s[VEC], t[VEC];
};

template <int VEC, bool PER_LANE, typename index_t>
__device__ __forceinline__ AffineCoef<VEC> load_affine(const float* scale, const float* shift, index_t k0) {
  AffineCoef<VEC> q;
  load_coef<VEC, PER_LANE>(q.s, scale, k0, 0.f);
  load_coef<VEC, PER_LANE>(q.t, shift, k0, 0.f);
  return q;
}

// a = relu(x*scale[k] + shift[k]).
template <typename scalar_t>
struct AffineRelu {
  using State = NoState;
  const scalar_t* __restrict__ x;   // [N, C, H, W] dense in the launch's layout
  const float* __restrict__ scale;  // [C]
  const float* __restrict__ shift;  // [C]
  scalar_t* __restrict__ a;         // same shape and layout as x

  template <int VEC>
  using Coef = AffineCoef<VEC>;

  template <int VEC, bool PER_LANE, typename index_t>
  __device__ __forceinline__ Coef<VEC> coef(index_t k0) const {
    return load_affine<VEC, PER_LANE>(scale, shift, k0);
  }

  template <int VEC, typename index_t>
  __device__ __forceinline__ void apply(index_t i, const Coef<VEC>& q, State (&)[VEC]) const {
    using P = Pack<scalar_t, VEC>;
    const P xv = reinterpret_cast<const P*>(x)[i];
    P av;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      av.v[j] = static_cast<scalar_t>(relu(fmaf(static_cast<float>(xv.v[j]), q.s[j], q.t[j])));
    }
    reinterpret_cast<P*>(a)[i] = av;
  }
};

// out = dc + dmean[k]/n + dvar[k]*2(c - mean[k])/n; absent terms are skipped (uniform branches).
template <typename scalar_t>
struct ConvStatsBackwardInput {
  using State = NoState;
  const scalar_t* __restrict__ c;   // [N, C, H, W] dense in the launch's layout; read when dvar is given
  const float* __restrict__ mean;   // [C]
  const scalar_t* __restrict__ dc;  // same shape and layout as c, or nullptr
  const float* __restrict__ dmean;  // [C], or nullptr
  const float* __restrict__ dvar;   // [C], or nullptr
  scalar_t* __restrict__ out;       // same shape and layout as c
  float inv_n;                      // 1 / (values per channel)

  template <int VEC>
  struct Coef {
    float m[VEC], dm[VEC], dv[VEC];  // mean, dmean/n, 2*dvar/n
  };

  template <int VEC, bool PER_LANE, typename index_t>
  __device__ __forceinline__ Coef<VEC> coef(index_t k0) const {
    Coef<VEC> q;
    load_coef<VEC, PER_LANE>(q.m, mean, k0, 0.f);
    load_coef<VEC, PER_LANE>(q.dm, dmean, k0, 0.f);
    load_coef<VEC, PER_LANE>(q.dv, dvar, k0, 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      q.dm[j] *= inv_n;
      q.dv[j] *= 2.f * inv_n;
    }
    return q;
  }

  template <int VEC, typename index_t>
  __device__ __forceinline__ void apply(index_t i, const Coef<VEC>& q, State (&)[VEC]) const {
    using P = Pack<scalar_t, VEC>;
    float acc[VEC];
    if (dc != nullptr) {
      const P gv = reinterpret_cast<const P*>(dc)[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] = static_cast<float>(gv.v[j]) + q.dm[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] = q.dm[j];
      }
    }
    if (dvar != nullptr) {
      const P cv = reinterpret_cast<const P*>(c)[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] = fmaf(q.dv[j], static_cast<float>(cv.v[j]) - q.m[j], acc[j]);
      }
    }
    P ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      ov.v[j] = static_cast<scalar_t>(acc[j]);
    }
    reinterpret_cast<P*>(out)[i] = ov;
  }
};

// g = da*[x*scale[k] + shift[k] > 0]; dx = g*scale[k]; per channel dscale = Σ g*x, dshift = Σ g.
template <typename scalar_t>
struct AffineReluBackward {
  using State = Sums<2>;              // Σ g*x, Σ g
  const scalar_t* __restrict__ da;    // [N, C, H, W] dense in the launch's layout
  const scalar_t* __restrict__ x;     // same shape and layout
  const float* __restrict__ scale;    // [C]
  const float* __restrict__ shift;    // [C]
  scalar_t* __restrict__ dx;          // same shape and layout as x
  float* __restrict__ dscale;         // [C] out
  float* __restrict__ dshift;         // [C] out

  template <int VEC>
  using Coef = AffineCoef<VEC>;

  template <int VEC, bool PER_LANE, typename index_t>
  __device__ __forceinline__ Coef<VEC> coef(index_t k0) const {
    return load_affine<VEC, PER_LANE>(scale, shift, k0);
  }

  template <int VEC, typename index_t>
  __device__ __forceinline__ void apply(index_t i, const Coef<VEC>& q, State (&st)[VEC]) const {
    using P = Pack<scalar_t, VEC>;
    const P xv = reinterpret_cast<const P*>(x)[i];
    const P gv = reinterpret_cast<const P*>(da)[i];
    P ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xf = static_cast<float>(xv.v[j]);
      const float g = fmaf(xf, q.s[j], q.t[j]) > 0.f ? static_cast<float>(gv.v[j]) : 0.f;
      ov.v[j] = static_cast<scalar_t>(g * q.s[j]);
      st[j].v[0] = fmaf(g, xf, st[j].v[0]);
      st[j].v[1] += g;
    }
    reinterpret_cast<P*>(dx)[i] = ov;
  }

  __device__ __forceinline__ void finish(int64_t k, const State& total) const {
    dscale[k] = total.v[0];
    dshift[k] = total.v[1];
  }
};

// The block tail out = relu(z), z = c*s[k] + t[k] + (idn*s_d[k] + t_d[k]), s_d = 1 and t_d = 0 without a
// downsample branch: its per-channel coefficients and z, shared by the forward and backward passes so that the
// backward's ReLU mask is exactly the forward's.
template <int VEC>
struct TailCoef {
  float s[VEC], t[VEC], sd[VEC], td[VEC];
};

template <int VEC, bool PER_LANE, typename index_t>
__device__ __forceinline__ TailCoef<VEC> load_tail(const float* scale, const float* shift, const float* idn_scale,
                                                  const float* idn_shift, index_t k0) {
  TailCoef<VEC> q;
  load_coef<VEC, PER_LANE>(q.s, scale, k0, 0.f);
  load_coef<VEC, PER_LANE>(q.t, shift, k0, 0.f);
  load_coef<VEC, PER_LANE>(q.sd, idn_scale, k0, 1.f);
  load_coef<VEC, PER_LANE>(q.td, idn_shift, k0, 0.f);
  return q;
}

template <int VEC>
__device__ __forceinline__ float tail_preact(float c, float idn, const TailCoef<VEC>& q, int j) {
  return fmaf(c, q.s[j], q.t[j]) + fmaf(idn, q.sd[j], q.td[j]);
}

// Forward: out = relu(z); fp32 math, one rounding at the store.
template <typename scalar_t>
struct ScaleBiasAddRelu {
  using State = NoState;
  const scalar_t* __restrict__ c;       // [N, C, H, W] dense in the launch's layout
  const scalar_t* __restrict__ idn;     // same shape and layout as c
  const float* __restrict__ scale;      // [C]
  const float* __restrict__ shift;      // [C]
  const float* __restrict__ idn_scale;  // [C], or nullptr: idn is added as is
  const float* __restrict__ idn_shift;  // [C], or nullptr together with idn_scale
  scalar_t* __restrict__ out;           // same shape and layout as c

  template <int VEC>
  using Coef = TailCoef<VEC>;

  template <int VEC, bool PER_LANE, typename index_t>
  __device__ __forceinline__ Coef<VEC> coef(index_t k0) const {
    return load_tail<VEC, PER_LANE>(scale, shift, idn_scale, idn_shift, k0);
  }

  template <int VEC, typename index_t>
  __device__ __forceinline__ void apply(index_t i, const Coef<VEC>& q, State (&)[VEC]) const {
    using P = Pack<scalar_t, VEC>;
    const P cv = reinterpret_cast<const P*>(c)[i];
    const P iv = reinterpret_cast<const P*>(idn)[i];
    P ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float z = tail_preact(static_cast<float>(cv.v[j]), static_cast<float>(iv.v[j]), q, j);
      ov.v[j] = static_cast<scalar_t>(relu(z));
    }
    reinterpret_cast<P*>(out)[i] = ov;
  }
};

// Backward of out = relu(z), z = c*s[k] + t[k] + (idn*s_d[k] + t_d[k] | idn), with z recomputed by the
// forward's tail_preact: g = dout*[z > 0]; dc = g*s; didn = g*s_d (g without idn_scale); per channel
// dscale = Σ g*c, dshift = Σ g, didn_scale = Σ g*idn.
template <typename scalar_t>
struct ScaleBiasAddReluBackward {
  using State = Sums<3>;                // Σ g*c, Σ g, Σ g*idn
  const scalar_t* __restrict__ dout;    // [N, C, H, W] dense in the launch's layout
  const scalar_t* __restrict__ c;       // same shape and layout
  const scalar_t* __restrict__ idn;     // same shape and layout
  const float* __restrict__ scale;      // [C]
  const float* __restrict__ shift;      // [C]
  const float* __restrict__ idn_scale;  // [C], or nullptr: idn was added as is
  const float* __restrict__ idn_shift;  // [C], or nullptr together with idn_scale
  scalar_t* __restrict__ dc;            // same shape and layout as c
  scalar_t* __restrict__ didn;          // same shape and layout as c
  float* __restrict__ dscale;           // [C] out
  float* __restrict__ dshift;           // [C] out
  float* __restrict__ didn_scale;       // [C] out, or nullptr together with idn_scale

  template <int VEC>
  using Coef = TailCoef<VEC>;

  template <int VEC, bool PER_LANE, typename index_t>
  __device__ __forceinline__ Coef<VEC> coef(index_t k0) const {
    return load_tail<VEC, PER_LANE>(scale, shift, idn_scale, idn_shift, k0);
  }

  template <int VEC, typename index_t>
  __device__ __forceinline__ void apply(index_t i, const Coef<VEC>& q, State (&st)[VEC]) const {
    using P = Pack<scalar_t, VEC>;
    const P cv = reinterpret_cast<const P*>(c)[i];
    const P iv = reinterpret_cast<const P*>(idn)[i];
    const P gv = reinterpret_cast<const P*>(dout)[i];
    P dcv, div;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float cf = static_cast<float>(cv.v[j]);
      const float idf = static_cast<float>(iv.v[j]);
      const float z = tail_preact(cf, idf, q, j);
      const float g = z > 0.f ? static_cast<float>(gv.v[j]) : 0.f;
      dcv.v[j] = static_cast<scalar_t>(g * q.s[j]);
      div.v[j] = static_cast<scalar_t>(g * q.sd[j]);
      st[j].v[0] = fmaf(g, cf, st[j].v[0]);
      st[j].v[1] += g;
      if (idn_scale != nullptr) {
        st[j].v[2] = fmaf(g, idf, st[j].v[2]);
      }
    }
    reinterpret_cast<P*>(dc)[i] = dcv;
    reinterpret_cast<P*>(didn)[i] = div;
  }

  __device__ __forceinline__ void finish(int64_t k, const State& total) const {
    dscale[k] = total.v[0];
    dshift[k] = total.v[1];
    if (didn_scale != nullptr) {
      didn_scale[k] = total.v[2];
    }
  }
};

// Per-channel mean and biased variance of c.
template <typename scalar_t>
struct ChannelStats {
  using State = Welford;
  const scalar_t* __restrict__ c;  // [N, C, H, W] dense in the launch's layout
  float* __restrict__ mean;        // [C] out
  float* __restrict__ var;         // [C] out

  template <int VEC>
  struct Coef {};

  template <int VEC, bool PER_LANE, typename index_t>
  __device__ __forceinline__ Coef<VEC> coef(index_t) const {
    return {};
  }

  template <int VEC, typename index_t>
  __device__ __forceinline__ void apply(index_t i, const Coef<VEC>&, State (&st)[VEC]) const {
    using P = Pack<scalar_t, VEC>;
    const P cv = reinterpret_cast<const P*>(c)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      st[j].push(static_cast<float>(cv.v[j]));
    }
  }

  __device__ __forceinline__ void finish(int64_t k, const State& total) const {
    mean[k] = total.mean;
    var[k] = total.m2 / total.n;
  }
};

// bn_finalize, channel k per thread: invstd = 1/√(var + eps), scale = γ·invstd (invstd without γ),
// shift = −mean·scale + β (without β: −mean·scale); with running statistics
//   running_mean = running_mean·keep + mean·factor,  running_var = running_var·keep + (var·unbias)·factor,
// keep = 1 − factor, unbias = count/(count − 1). Each product and sum is rounded on its own (no fused
// multiply-add), as BatchNorm's separate elementwise ops round them.
__global__ void bn_finalize_kernel(const float* __restrict__ mean, const float* __restrict__ var,
                                   const float* __restrict__ weight,  // [C] or nullptr
                                   const float* __restrict__ bias,    // [C] or nullptr
                                   float* __restrict__ running_mean,  // [C] in/out, or nullptr
                                   float* __restrict__ running_var,   // [C] in/out, or nullptr with running_mean
                                   float* __restrict__ scale, float* __restrict__ shift, int64_t C, float eps,
                                   float keep, float factor, float unbias) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= C) {
    return;
  }
  const float m = mean[k], v = var[k];
  const float invstd = 1.f / sqrtf(__fadd_rn(v, eps));
  const float s = weight != nullptr ? __fmul_rn(weight[k], invstd) : invstd;
  const float t = __fmul_rn(-m, s);
  scale[k] = s;
  shift[k] = bias != nullptr ? __fadd_rn(t, bias[k]) : t;
  if (running_mean != nullptr) {
    running_mean[k] = __fadd_rn(__fmul_rn(running_mean[k], keep), __fmul_rn(m, factor));
    running_var[k] = __fadd_rn(__fmul_rn(running_var[k], keep), __fmul_rn(__fmul_rn(v, unbias), factor));
  }
}

// ------------------------------------------------------------------------------------------------ host side

const float* float_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

float* mutable_float_ptr(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<float>() : nullptr; }

// A per-channel vector made contiguous, or an undefined tensor when absent.
at::Tensor dense_vec(const std::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); }

// An activation operand made dense in memory format mf, or an undefined tensor when absent.
at::Tensor dense_act(const std::optional<at::Tensor>& t, at::MemoryFormat mf) {
  return t.has_value() ? t->contiguous(mf) : at::Tensor();
}

bool all_aligned16(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->defined() && !aligned16(t->data_ptr())) {
      return false;
    }
  }
  return true;
}

at::Tensor channel_vec(const at::Tensor& like, int64_t C) { return at::empty({C}, like.options().dtype(at::kFloat)); }

at::Tensor affine_relu_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  constexpr const char* op = "resnet_fused::affine_relu";
  check_affine_relu(x, scale, shift);
  check_cuda_dtype(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat mf = x.suggest_memory_format();
  at::Tensor a = empty_in_format(x.sizes(), x.options(), mf);
  if (a.numel() == 0) {
    return a;
  }
  const at::Tensor x_d = x.contiguous(mf), scale_d = scale.contiguous(), shift_d = shift.contiguous();
  const bool aligned = all_aligned16({&x_d, &a});
  RESNET_FUSED_DISPATCH_CUDA_TYPES(x.scalar_type(), op, [&] {
    const AffineRelu<scalar_t> pass{x_d.const_data_ptr<scalar_t>(), float_ptr(scale_d), float_ptr(shift_d),
                                    a.mutable_data_ptr<scalar_t>()};
    launch_pass<scalar_t>(pass, a.sizes(), mf, aligned, x.options());
  });
  return a;
}

// Per-channel mean and biased variance of c (dense in mf); NaN for channels without values, as torch.var_mean.
std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& c, at::MemoryFormat mf) {
  const int64_t C = c.size(1);
  at::Tensor mean = channel_vec(c, C), var = channel_vec(c, C);
  if (c.numel() == 0) {
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {mean, var};
  }
  RESNET_FUSED_DISPATCH_CUDA_TYPES(c.scalar_type(), "resnet_fused::conv_stats", [&] {
    const ChannelStats<scalar_t> pass{c.const_data_ptr<scalar_t>(), mutable_float_ptr(mean), mutable_float_ptr(var)};
    launch_pass<scalar_t>(pass, c.sizes(), mf, aligned16(c.data_ptr()), c.options());
  });
  return {mean, var};
}

// Whether bfloat16 conv_stats may apply the BN+ReLU prologue on load with scale and shift rounded to bfloat16
// (environment RESNET_FUSED_BF16_PROLOGUE_ON_LOAD=1, read once): faster, less exact; see conv_stats_cuda.
bool fused_bf16_prologue() {
  static const bool on = [] {
    const char* v = std::getenv("RESNET_FUSED_BF16_PROLOGUE_ON_LOAD");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

// c = conv2d(a, weight) by cuDNN, made dense in `mf`, and its per-channel mean and biased variance (one read of c).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_then_stats(const at::Tensor& a, const at::Tensor& weight,
                                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                                               at::IntArrayRef dilation, int64_t groups,
                                                               at::MemoryFormat mf) {
  const at::Tensor c = with_format_strides(at::convolution(a, weight, std::nullopt, stride, padding, dilation,
                                                           /*transposed=*/false, /*output_padding=*/{0, 0}, groups),
                                           mf);
  auto [mean, var] = channel_stats(c, mf);
  return {c, mean, var};
}

using StatsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Engine "cutlass" of conv_stats: cutlass_conv_stats (cutlass/conv_cutlass.h) is one implicit-GEMM launch whose
// epilogue also writes per-tile statistics of c, plus their deterministic merge. The BN+ReLU prologue on load rounds
// scale and shift to the activation dtype (CUTLASS's fusion mainloop keeps them in it), an error relative to
// |x*s| + |t| rather than to the result. In float16 (2^-11) that is about the rounding c itself gets when stored;
// in bfloat16 (2^-8) it is several times that, so by default bfloat16 inputs get the activated input made exactly
// first (fp32 math, one rounding, as the reference) by one vectorized pass, and the same kernel runs on it;
// fused_bf16_prologue() opts in to the fused bfloat16 path. Returns "" having run (result in `out`), or why not,
// having launched nothing.
std::string conv_stats_cutlass(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
                               at::IntArrayRef out_sizes, at::MemoryFormat mf, StatsResult& out) {
  if (!cutlass_built()) {
    return kNoCutlass;
  }
  if (mf != at::MemoryFormat::ChannelsLast || (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16)) {
    return "the CUTLASS kernels run float16 / bfloat16 channels_last inputs only";
  }
  const at::Tensor no_vec;
  at::Tensor c = empty_in_format(out_sizes, x.options(), mf);
  at::Tensor mean = at::empty({out_sizes[1]}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty_like(mean);
  const at::Tensor w = weight.contiguous(mf);  // KRSC filters for the kernel (copied only when NCHW)
  std::string why;
  const bool fuse_prologue = !in_scale.has_value() || x.scalar_type() != at::kBFloat16 || fused_bf16_prologue();
  if (fuse_prologue) {
    if (!cutlass_conv_stats(x, w, in_scale.value_or(no_vec), in_shift.value_or(no_vec), c, mean, var, stride,
                            padding, dilation, groups, &why)) {
      return why;
    }
  } else {
    // Whether the kernel covers the activated input (a fresh tensor of x's shape, dtype and layout) before
    // making it.
    why = cutlass_conv_stats_uncovered(empty_in_format(x.sizes(), x.options(), mf), w, no_vec, no_vec, c, mean, var,
                                       stride, padding, dilation, groups);
    if (!why.empty()) {
      return why;
    }
    const at::Tensor a = affine_relu_cuda(x, *in_scale, *in_shift);
    TORCH_CHECK(cutlass_conv_stats(a, w, no_vec, no_vec, c, mean, var, stride, padding, dilation, groups, &why),
                "resnet_fused::conv_stats: the CUTLASS kernel checked as covered declined: ", why);
  }
  out = {c, mean, var};
  return "";
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_stats_cuda(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, c10::string_view engines) {
  constexpr const char* op = "resnet_fused::conv_stats";
  const std::vector<int64_t> out_sizes =
      check_conv_stats(x, weight, stride, padding, dilation, groups, in_scale, in_shift);
  const engine::Order order = engine::parse(op, std::string_view(engines.data(), engines.size()));
  check_cuda_dtype(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat mf = x.suggest_memory_format();
  return engine::run_first<StatsResult>(op, order, [&](engine::Engine e, StatsResult& out) -> std::string {
    switch (e) {
      case engine::Engine::kCudnn:
        return cudnn_engine::conv_stats(x, weight, stride, padding, dilation, groups, in_scale, in_shift, out_sizes,
                                        mf, out);
      case engine::Engine::kCutlass:
        return conv_stats_cutlass(x, weight, stride, padding, dilation, groups, in_scale, in_shift, out_sizes, mf,
                                  out);
      case engine::Engine::kPlain:
        break;
    }
    // The prologue as one pass (none without in_scale), cuDNN, then one read of c for its statistics.
    const at::Tensor a = in_scale.has_value() ? affine_relu_cuda(x, *in_scale, *in_shift) : x;
    out = conv_then_stats(a, weight, stride, padding, dilation, groups, mf);
    return "";
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_stats_backward_conv_cuda(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, std::array<bool, 2> output_mask, c10::string_view engines) {
  constexpr const char* op = "resnet_fused::conv_stats_backward_conv";
  check_conv_stats_backward_conv(g, x, weight, stride, padding, dilation, groups, in_scale, in_shift);
  const engine::Order order = engine::parse(op, std::string_view(engines.data(), engines.size()));
  check_cuda_dtype(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  return engine::run_first<Grads>(op, order, [&](engine::Engine e, Grads& out) -> std::string {
    switch (e) {
      case engine::Engine::kCudnn:
        return cudnn_engine::conv_stats_backward_conv(g, x, weight, stride, padding, dilation, groups, in_scale,
                                                      in_shift, output_mask, out);
      case engine::Engine::kCutlass:
        return "the CUTLASS kernels are forward convolutions only";
      case engine::Engine::kPlain:
        break;
    }
    out = conv_stats_backward_conv_composite(g, x, weight, stride, padding, dilation, groups, in_scale, in_shift,
                                             output_mask);
    return "";
  });
}

at::Tensor conv_stats_backward_input_cuda(const at::Tensor& c, const at::Tensor& mean,
                                          const std::optional<at::Tensor>& dc, const std::optional<at::Tensor>& dmean,
                                          const std::optional<at::Tensor>& dvar) {
  constexpr const char* op = "resnet_fused::conv_stats_backward_input";
  check_conv_stats_backward_input(c, mean, dc, dmean, dvar);
  check_cuda_dtype(op, c);
  const c10::cuda::CUDAGuard guard(c.device());
  const at::MemoryFormat mf = c.suggest_memory_format();
  at::Tensor out = empty_in_format(c.sizes(), c.options(), mf);
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor c_d = dvar.has_value() ? c.contiguous(mf) : at::Tensor();
  const at::Tensor dc_d = dense_act(dc, mf);
  const at::Tensor mean_d = mean.contiguous(), dmean_d = dense_vec(dmean), dvar_d = dense_vec(dvar);
  const bool aligned = all_aligned16({&c_d, &dc_d, &out});
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(out.numel() / out.size(1)));
  RESNET_FUSED_DISPATCH_CUDA_TYPES(c.scalar_type(), op, [&] {
    const ConvStatsBackwardInput<scalar_t> pass{
        c_d.defined() ? c_d.const_data_ptr<scalar_t>() : nullptr,
        float_ptr(mean_d),
        dc_d.defined() ? dc_d.const_data_ptr<scalar_t>() : nullptr,
        float_ptr(dmean_d),
        float_ptr(dvar_d),
        out.mutable_data_ptr<scalar_t>(),
        inv_n};
    launch_pass<scalar_t>(pass, out.sizes(), mf, aligned, c.options());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_relu_backward_cuda(
    const at::Tensor& da, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  constexpr const char* op = "resnet_fused::affine_relu_backward";
  check_affine_relu_backward(da, x, scale, shift);
  check_cuda_dtype(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat mf = x.suggest_memory_format();
  const int64_t C = x.size(1);
  at::Tensor dx = empty_in_format(x.sizes(), x.options(), mf);
  at::Tensor dscale = channel_vec(x, C), dshift = channel_vec(x, C);
  if (dx.numel() == 0) {
    dscale.zero_();
    dshift.zero_();
    return {dx, dscale, dshift};
  }
  const at::Tensor x_d = x.contiguous(mf), da_d = da.contiguous(mf);
  const at::Tensor scale_d = scale.contiguous(), shift_d = shift.contiguous();
  const bool aligned = all_aligned16({&x_d, &da_d, &dx});
  RESNET_FUSED_DISPATCH_CUDA_TYPES(x.scalar_type(), op, [&] {
    const AffineReluBackward<scalar_t> pass{
        da_d.const_data_ptr<scalar_t>(), x_d.const_data_ptr<scalar_t>(), float_ptr(scale_d), float_ptr(shift_d),
        dx.mutable_data_ptr<scalar_t>(), mutable_float_ptr(dscale),    mutable_float_ptr(dshift)};
    launch_pass<scalar_t>(pass, dx.sizes(), mf, aligned, x.options());
  });
  return {dx, dscale, dshift};
}

at::Tensor scale_bias_add_relu_cuda(
    const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& idn,
    const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift) {
  constexpr const char* op = "resnet_fused::scale_bias_add_relu";
  check_scale_bias_add_relu(c, scale, shift, idn, idn_scale, idn_shift);
  check_cuda_dtype(op, c);
  const c10::cuda::CUDAGuard guard(c.device());
  const at::MemoryFormat mf = c.suggest_memory_format();
  at::Tensor out = empty_in_format(c.sizes(), c.options(), mf);
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor c_d = c.contiguous(mf);
  const at::Tensor idn_d = idn.contiguous(mf);
  const at::Tensor scale_d = scale.contiguous();
  const at::Tensor shift_d = shift.contiguous();
  const at::Tensor idn_scale_d = idn_scale.has_value() ? idn_scale->contiguous() : at::Tensor();
  const at::Tensor idn_shift_d = idn_shift.has_value() ? idn_shift->contiguous() : at::Tensor();
  const bool all_aligned = aligned16(c_d.data_ptr()) && aligned16(idn_d.data_ptr()) && aligned16(out.data_ptr());
  RESNET_FUSED_DISPATCH_CUDA_TYPES(c.scalar_type(), op, [&] {
    const ScaleBiasAddRelu<scalar_t> epi{
        c_d.const_data_ptr<scalar_t>(),
        idn_d.const_data_ptr<scalar_t>(),
        scale_d.const_data_ptr<float>(),
        shift_d.const_data_ptr<float>(),
        idn_scale_d.defined() ? idn_scale_d.const_data_ptr<float>() : nullptr,
        idn_shift_d.defined() ? idn_shift_d.const_data_ptr<float>() : nullptr,
        out.mutable_data_ptr<scalar_t>()};
    launch_pass<scalar_t>(epi, out.sizes(), mf, all_aligned, out.options());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_bias_add_relu_backward_cuda(
    const at::Tensor& dout, const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& idn, const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift) {
  constexpr const char* op = "resnet_fused::scale_bias_add_relu_backward";
  check_scale_bias_add_relu_backward(dout, c, scale, shift, idn, idn_scale, idn_shift);
  check_cuda_dtype(op, c);
  const c10::cuda::CUDAGuard guard(c.device());
  const at::MemoryFormat mf = c.suggest_memory_format();
  const int64_t C = c.size(1);
  const bool dual = idn_scale.has_value();
  at::Tensor dc = empty_in_format(c.sizes(), c.options(), mf);
  at::Tensor didn = empty_in_format(c.sizes(), idn.options(), mf);
  at::Tensor dscale = channel_vec(c, C), dshift = channel_vec(c, C);
  at::Tensor didn_scale = channel_vec(c, dual ? C : 0);
  if (dc.numel() == 0) {
    dscale.zero_();
    dshift.zero_();
    didn_scale.zero_();
    return {dc, didn, dscale, dshift, didn_scale};
  }
  const at::Tensor c_d = c.contiguous(mf), idn_d = idn.contiguous(mf), dout_d = dout.contiguous(mf);
  const at::Tensor scale_d = scale.contiguous(), shift_d = shift.contiguous();
  const at::Tensor idn_scale_d = dense_vec(idn_scale), idn_shift_d = dense_vec(idn_shift);
  const bool aligned = all_aligned16({&c_d, &idn_d, &dout_d, &dc, &didn});
  RESNET_FUSED_DISPATCH_CUDA_TYPES(c.scalar_type(), op, [&] {
    const ScaleBiasAddReluBackward<scalar_t> pass{dout_d.const_data_ptr<scalar_t>(),
                                                  c_d.const_data_ptr<scalar_t>(),
                                                  idn_d.const_data_ptr<scalar_t>(),
                                                  float_ptr(scale_d),
                                                  float_ptr(shift_d),
                                                  float_ptr(idn_scale_d),
                                                  float_ptr(idn_shift_d),
                                                  dc.mutable_data_ptr<scalar_t>(),
                                                  didn.mutable_data_ptr<scalar_t>(),
                                                  mutable_float_ptr(dscale),
                                                  mutable_float_ptr(dshift),
                                                  dual ? mutable_float_ptr(didn_scale) : nullptr};
    launch_pass<scalar_t>(pass, dc.sizes(), mf, aligned, c.options());
  });
  return {dc, didn, dscale, dshift, didn_scale};
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cuda(
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double count, double momentum_factor, double eps) {
  constexpr const char* op = "resnet_fused::bn_finalize";
  check_bn_finalize(mean, var, weight, bias, running_mean, running_var, count);
  TORCH_CHECK(mean.scalar_type() == at::kFloat, op, " on CUDA supports float32 statistics, got ", mean.scalar_type());
  const c10::cuda::CUDAGuard guard(mean.device());
  const int64_t C = mean.size(0);
  at::Tensor scale = at::empty({C}, mean.options()), shift = at::empty({C}, mean.options());
  if (C == 0) {
    return {scale, shift};
  }
  const at::Tensor mean_d = mean.contiguous(), var_d = var.contiguous();
  const at::Tensor weight_d = dense_vec(weight), bias_d = dense_vec(bias);
  // The running statistics are contiguous (checked) and updated in place.
  const at::Tensor running_mean_d = running_mean.has_value() ? *running_mean : at::Tensor();
  const at::Tensor running_var_d = running_var.has_value() ? *running_var : at::Tensor();
  const bool update = running_mean_d.defined();
  constexpr int kThreads = 256;
  bn_finalize_kernel<<<static_cast<unsigned>(channel_pass::ceil_div(C, kThreads)), kThreads, 0,
                       at::cuda::getCurrentCUDAStream()>>>(
      float_ptr(mean_d), float_ptr(var_d), float_ptr(weight_d), float_ptr(bias_d), mutable_float_ptr(running_mean_d),
      mutable_float_ptr(running_var_d), mutable_float_ptr(scale), mutable_float_ptr(shift), C,
      static_cast<float>(eps), static_cast<float>(1.0 - momentum_factor), static_cast<float>(momentum_factor),
      update ? static_cast<float>(count / (count - 1)) : 0.f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scale, shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_stats", &conv_stats_cuda);
  m.impl("affine_relu", &affine_relu_cuda);
  m.impl("conv_stats_backward_input", &conv_stats_backward_input_cuda);
  m.impl("affine_relu_backward", &affine_relu_backward_cuda);
  m.impl("conv_stats_backward_conv", &conv_stats_backward_conv_cuda);
  m.impl("scale_bias_add_relu", &scale_bias_add_relu_cuda);
  m.impl("scale_bias_add_relu_backward", &scale_bias_add_relu_backward_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
}

}  // namespace resnet_fused
