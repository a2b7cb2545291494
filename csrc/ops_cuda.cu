// CUDA implementations of the resnet_fused ops (fp32 / fp16 / bf16, fp32 math).
//
// scale_bias_add_relu is one memory-bound pass: it reads c and idn once and writes out once, instead of the
// four to six elementwise passes eager PyTorch makes for BN-apply + (BN-apply) + add + ReLU.
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
// Both epilogues are elementwise over a dense NCHW or NHWC tensor with per-channel coefficients. Every operand
// is made dense in the output's memory format, so one linear element index addresses all of them, and
//   NHWC: channel(e) = e % C          NCHW: channel(e) = (e / (H*W)) % C.
// Threads move VEC consecutive elements with one 16-byte load per operand and one 16-byte store when the layout
// keeps a pack inside one row of channels (NHWC: C % VEC == 0) or one channel plane (NCHW: H*W % VEC == 0) and
// every pointer is 16-byte aligned; otherwise a scalar kernel (VEC = 1) runs. In the NHWC vector kernel each
// thread keeps one channel pack and walks several pixels, so its VEC channels' coefficients are loaded once
// (loading them per pack would make the L1 traffic for coefficients exceed the DRAM traffic).
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

constexpr int kThreads = 256;
// Rows (pixels) of an NHWC tensor each thread of the channel-stationary kernel covers: its per-channel
// coefficients are loaded once and reused for all of them.
constexpr int kRowsPerThread = 4;

// VEC elements moved with one aligned 16-byte (or, for VEC = 1, scalar) memory transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Channel of element e (first element of a pack) in a dense NHWC or NCHW tensor.
template <bool CHANNELS_LAST, typename index_t>
__device__ __forceinline__ index_t channel_of(index_t e, index_t C, index_t HW) {
  if constexpr (CHANNELS_LAST) {
    return e % C;
  } else {
    return (e / HW) % C;
  }
}

// ReLU that propagates NaN like torch.relu.
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// Each epilogue below is a functor with
//   coef<VEC, PER_LANE>(k0): the per-channel coefficients of a pack whose lane j has channel k0 + j (PER_LANE,
//                            NHWC) or k0 (NCHW);
//   apply<VEC>(i, coef):     computes pack i (elements [i*VEC, (i+1)*VEC)) of every operand.
// The kernels further down only decide which pack and which channels a thread handles.

// scale_bias_add_relu:  out[e] = relu(c[e]*s[k] + t[k] + (idn[e]*s_d[k] + t_d[k])),  k = channel(e),
// with s_d = 1, t_d = 0 when no idn_scale / idn_shift are given; fp32 math, one rounding at the store.
template <typename scalar_t>
struct ScaleBiasAddRelu {
  const scalar_t* __restrict__ c;       // [N, C, H, W] dense in the launch's layout
  const scalar_t* __restrict__ idn;     // same shape and layout as c
  const float* __restrict__ scale;      // [C]
  const float* __restrict__ shift;      // [C]
  const float* __restrict__ idn_scale;  // [C], or nullptr: idn is added as is
  const float* __restrict__ idn_shift;  // [C], or nullptr together with idn_scale
  scalar_t* __restrict__ out;           // same shape and layout as c

  template <int VEC>
  struct Coef {
    float s[VEC], t[VEC], sd[VEC], td[VEC];
  };

  template <int VEC, bool PER_LANE, typename index_t>
  __device__ __forceinline__ Coef<VEC> coef(index_t k0) const {
    Coef<VEC> q;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const index_t k = PER_LANE ? k0 + j : k0;
      q.s[j] = scale[k];
      q.t[j] = shift[k];
      q.sd[j] = idn_scale != nullptr ? idn_scale[k] : 1.f;
      q.td[j] = idn_shift != nullptr ? idn_shift[k] : 0.f;
    }
    return q;
  }

  template <int VEC, typename index_t>
  __device__ __forceinline__ void apply(index_t i, const Coef<VEC>& q) const {
    using P = Pack<scalar_t, VEC>;
    const P cv = reinterpret_cast<const P*>(c)[i];
    const P iv = reinterpret_cast<const P*>(idn)[i];
    P ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float y = fmaf(static_cast<float>(cv.v[j]), q.s[j], q.t[j]);
      const float r = fmaf(static_cast<float>(iv.v[j]), q.sd[j], q.td[j]);
      ov.v[j] = static_cast<scalar_t>(relu(y + r));
    }
    reinterpret_cast<P*>(out)[i] = ov;
  }
};

// conv_bias_act epilogue:  out[e] = act(y[e] + bias[k] + sc[e] + res[e])  (summed in this order; absent terms
// skipped, bias 0 when absent), act = relu or identity, k = channel(e); fp32 math, one rounding at the store.
// The optional-term branches are uniform across the grid.
template <typename scalar_t>
struct BiasAct {
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
  __device__ __forceinline__ void apply(index_t i, const Coef<VEC>& q) const {
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

// One pack per thread, channel recomputed per pack: NCHW tensors (a pack lies in one channel plane, so its
// coefficients are warp-broadcast loads) and the scalar fallback (VEC = 1) for either layout.
template <typename Epi, int VEC, bool CHANNELS_LAST, typename index_t>
__global__ void __launch_bounds__(kThreads)
flat_epilogue_kernel(Epi epi, int64_t n_packs, index_t C, index_t HW) {
  const int64_t i64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i64 >= n_packs) {
    return;
  }
  const index_t i = static_cast<index_t>(i64);
  const index_t k0 = channel_of<CHANNELS_LAST>(i * VEC, C, HW);
  epi.template apply<VEC>(i, epi.template coef<VEC, CHANNELS_LAST>(k0));
}

// Channel-stationary NHWC kernel: the tensor is `rows` (= N*H*W) rows of `packs_per_row` (= C / VEC) packs.
// Thread (x, y) of the 2-D grid owns channel pack cp = x, loads its VEC channels' coefficients once, and walks
// rows y, y + gridDim.y*blockDim.y, ... Consecutive x are consecutive 16-byte packs, so loads coalesce.
template <typename Epi, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
nhwc_epilogue_kernel(Epi epi, index_t rows, index_t packs_per_row) {
  const index_t cp = static_cast<index_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (cp >= packs_per_row) {
    return;
  }
  const auto q = epi.template coef<VEC, true>(cp * VEC);
  const index_t step = static_cast<index_t>(gridDim.y * blockDim.y);
  for (index_t r = static_cast<index_t>(blockIdx.y * blockDim.y + threadIdx.y); r < rows; r += step) {
    epi.template apply<VEC>(r * packs_per_row + cp, q);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename scalar_t, typename index_t, typename Epi>
void launch_epilogue_indexed(const Epi& epi, int64_t N, int64_t C, int64_t HW, bool channels_last, bool vec,
                             cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (channels_last && vec) {
    const int64_t packs_per_row = C / kVec, rows = N * HW;
    const int bx = static_cast<int>(std::min<int64_t>(packs_per_row, kThreads));
    const int by = kThreads / bx;
    const int64_t gx = ceil_div(packs_per_row, bx);
    const int64_t gy = std::min<int64_t>(ceil_div(rows, int64_t{by} * kRowsPerThread), 65535);
    nhwc_epilogue_kernel<Epi, kVec, index_t>
        <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(bx, by), 0, stream>>>(
            epi, static_cast<index_t>(rows), static_cast<index_t>(packs_per_row));
  } else {
    const int64_t n_packs = N * C * HW / (vec ? kVec : 1);
    const int64_t blocks = ceil_div(n_packs, kThreads);
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "resnet_fused: tensor too large for one launch (",
                N * C * HW, " elements)");
    const dim3 grid(static_cast<unsigned>(blocks));
    const auto Ci = static_cast<index_t>(C), HWi = static_cast<index_t>(HW);
    if (vec) {
      flat_epilogue_kernel<Epi, kVec, false, index_t><<<grid, kThreads, 0, stream>>>(epi, n_packs, Ci, HWi);
    } else if (channels_last) {
      flat_epilogue_kernel<Epi, 1, true, index_t><<<grid, kThreads, 0, stream>>>(epi, n_packs, Ci, HWi);
    } else {
      flat_epilogue_kernel<Epi, 1, false, index_t><<<grid, kThreads, 0, stream>>>(epi, n_packs, Ci, HWi);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs epilogue `epi` over a dense 4-D tensor of `sizes` in layout `mf`: 16-byte packs when the layout keeps a
// pack in one channel row (NHWC: C % VEC == 0) or plane (NCHW: H*W % VEC == 0) and every operand is 16-byte
// aligned, else scalar; int32 indices below 2^30 elements (headroom for the row loop's increments).
template <typename scalar_t, typename Epi>
void launch_epilogue(const Epi& epi, at::IntArrayRef sizes, at::MemoryFormat mf, bool all_aligned,
                     cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t N = sizes[0], C = sizes[1], HW = sizes[2] * sizes[3];
  const bool channels_last = mf == at::MemoryFormat::ChannelsLast;
  const bool vec = all_aligned && (channels_last ? C % kVec == 0 : HW % kVec == 0);
  if (N * C * HW < (int64_t{1} << 30)) {
    launch_epilogue_indexed<scalar_t, int32_t>(epi, N, C, HW, channels_last, vec, stream);
  } else {
    launch_epilogue_indexed<scalar_t, int64_t>(epi, N, C, HW, channels_last, vec, stream);
  }
}

#define RESNET_FUSED_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void check_cuda_dtype(const char* op, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op,
              " on CUDA supports float32/float16/bfloat16, got ", s);
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
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  RESNET_FUSED_DISPATCH_CUDA_TYPES(c.scalar_type(), op, [&] {
    const ScaleBiasAddRelu<scalar_t> epi{
        c_d.const_data_ptr<scalar_t>(),
        idn_d.const_data_ptr<scalar_t>(),
        scale_d.const_data_ptr<float>(),
        shift_d.const_data_ptr<float>(),
        idn_scale_d.defined() ? idn_scale_d.const_data_ptr<float>() : nullptr,
        idn_shift_d.defined() ? idn_shift_d.const_data_ptr<float>() : nullptr,
        out.mutable_data_ptr<scalar_t>()};
    launch_epilogue<scalar_t>(epi, out.sizes(), mf, all_aligned, stream);
  });
  return out;
}

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
  at::Tensor out = empty_in_format(out_sizes, x.options(), mf);
  if (!shortcut_x.has_value()) {
    const bool ran = cutlass_conv_fprop(x, weight, bias_d, res, out, stride, padding, dilation, groups, relu);
    return ran ? out : at::Tensor();
  }
  at::Tensor sc = empty_in_format(out_sizes, x.options(), mf);
  const std::array<int64_t, 2> no_padding{0, 0}, no_dilation{1, 1};
  if (!cutlass_conv_fprop_supported(*shortcut_x, *shortcut_weight, at::Tensor(), res, sc, shortcut_stride,
                                    no_padding, no_dilation, 1) ||
      !cutlass_conv_fprop_supported(x, weight, bias_d, sc, out, stride, padding, dilation, groups)) {
    return at::Tensor();
  }
  const bool ran = cutlass_conv_fprop(*shortcut_x, *shortcut_weight, at::Tensor(), res, sc, shortcut_stride,
                                      no_padding, no_dilation, 1, /*relu=*/false) &&
                   cutlass_conv_fprop(x, weight, bias_d, sc, out, stride, padding, dilation, groups, relu);
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
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  RESNET_FUSED_DISPATCH_CUDA_TYPES(x.scalar_type(), op, [&] {
    const BiasAct<scalar_t> epi{
        y.const_data_ptr<scalar_t>(),
        bias_d.defined() ? bias_d.const_data_ptr<float>() : nullptr,
        sc_d.defined() ? sc_d.const_data_ptr<scalar_t>() : nullptr,
        res_d.defined() ? res_d.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(),
        relu};
    launch_epilogue<scalar_t>(epi, out.sizes(), mf, all_aligned, stream);
  });
  return out;
}

// Test hook for cutlass_conv_stats (conv_cutlass.h), which no op of the package calls yet: runs it on fresh
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
  m.impl("scale_bias_add_relu", &scale_bias_add_relu_cuda);
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
