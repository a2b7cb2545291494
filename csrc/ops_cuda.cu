// CUDA implementations of the resnet_fused ops (fp32 / fp16 / bf16, fp32 math).
//
// scale_bias_add_relu is one memory-bound pass: it reads c and idn once and writes out once, instead of the
// four to six elementwise passes eager PyTorch makes for BN-apply + (BN-apply) + add + ReLU.
//
// conv_bias_act runs the convolution(s) with at::convolution (cuDNN) and then ONE fused epilogue kernel for
// bias + shortcut-conv output + residual + ReLU, instead of separate bias, add and ReLU passes. The single-launch
// version (implicit GEMM with the epilogue and the 1x1 shortcut GEMM in the same kernel, CUTLASS) is planned
// to replace the cuDNN call; until then the main and shortcut convolutions are separate launches.
//
// Both epilogues are elementwise over a dense NCHW or NHWC tensor with a per-channel term. Every operand is
// made dense in the output's memory format, so one linear element index addresses all of them, and
//   NHWC: channel(e) = e % C          NCHW: channel(e) = (e / (H*W)) % C.
// Each thread handles VEC consecutive elements with one 16-byte load per operand and one 16-byte store when
// the layout keeps a pack inside one row of channels (NHWC: C % VEC == 0) or one channel plane (NCHW:
// H*W % VEC == 0) and every pointer is 16-byte aligned; otherwise a scalar kernel (VEC = 1) runs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "build_info.h"
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

// VEC elements moved with one aligned 16-byte (or smaller, for VEC = 1) memory transaction.
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

template <typename scalar_t>
struct ScaleBiasAddReluArgs {
  const scalar_t* __restrict__ c;      // [N, C, H, W] dense in the launch's layout
  const scalar_t* __restrict__ idn;    // same shape and layout as c
  const float* __restrict__ scale;     // [C]
  const float* __restrict__ shift;     // [C]
  const float* __restrict__ idn_scale; // [C], or nullptr: idn is added as is
  const float* __restrict__ idn_shift; // [C], or nullptr together with idn_scale
  scalar_t* __restrict__ out;          // same shape and layout as c
};

// out[e] = relu(c[e] * scale[k] + shift[k] + r),  r = idn[e] * idn_scale[k] + idn_shift[k]  (dual)  or  idn[e],
// k = channel(e); all math in fp32, one rounding to scalar_t at the store. Thread i owns elements
// [i*VEC, (i+1)*VEC); NHWC packs span channels k..k+VEC-1, NCHW packs share channel k.
template <typename scalar_t, typename index_t, int VEC, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads)
scale_bias_add_relu_kernel(ScaleBiasAddReluArgs<scalar_t> a, int64_t n_packs, index_t C, index_t HW) {
  using P = Pack<scalar_t, VEC>;
  const int64_t i64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i64 >= n_packs) {
    return;
  }
  const index_t i = static_cast<index_t>(i64);
  const index_t k0 = channel_of<CHANNELS_LAST>(i * VEC, C, HW);
  const bool dual = a.idn_scale != nullptr;
  const P cv = reinterpret_cast<const P*>(a.c)[i];
  const P iv = reinterpret_cast<const P*>(a.idn)[i];
  P ov;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const index_t k = CHANNELS_LAST ? k0 + j : k0;
    const float y = fmaf(static_cast<float>(cv.v[j]), a.scale[k], a.shift[k]);
    float r = static_cast<float>(iv.v[j]);
    if (dual) {
      r = fmaf(r, a.idn_scale[k], a.idn_shift[k]);
    }
    ov.v[j] = static_cast<scalar_t>(relu(y + r));
  }
  reinterpret_cast<P*>(a.out)[i] = ov;
}

template <typename scalar_t>
struct BiasActArgs {
  const scalar_t* y;                   // conv output [N, K, P, Q], dense in the launch's layout (may alias out)
  const float* __restrict__ bias;      // [K] in fp32, or nullptr
  const scalar_t* __restrict__ sc;     // shortcut conv output, same shape and layout as y, or nullptr
  const scalar_t* __restrict__ res;    // residual, same shape and layout as y, or nullptr
  scalar_t* out;                       // same shape and layout as y
  bool relu;
};

// out[e] = act(y[e] + bias[k] + sc[e] + res[e]) (summed in this order), absent terms skipped,
// act = relu or identity, k = channel(e); fp32 math, one rounding at the store. The feature branches are
// uniform across the grid.
template <typename scalar_t, typename index_t, int VEC, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads)
bias_act_epilogue_kernel(BiasActArgs<scalar_t> a, int64_t n_packs, index_t C, index_t HW) {
  using P = Pack<scalar_t, VEC>;
  const int64_t i64 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i64 >= n_packs) {
    return;
  }
  const index_t i = static_cast<index_t>(i64);
  float acc[VEC];
  const P yv = reinterpret_cast<const P*>(a.y)[i];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    acc[j] = static_cast<float>(yv.v[j]);
  }
  if (a.bias != nullptr) {
    const index_t k0 = channel_of<CHANNELS_LAST>(i * VEC, C, HW);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc[j] += a.bias[CHANNELS_LAST ? k0 + j : k0];
    }
  }
  if (a.sc != nullptr) {
    const P sv = reinterpret_cast<const P*>(a.sc)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc[j] += static_cast<float>(sv.v[j]);
    }
  }
  if (a.res != nullptr) {
    const P rv = reinterpret_cast<const P*>(a.res)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc[j] += static_cast<float>(rv.v[j]);
    }
  }
  P ov;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    ov.v[j] = static_cast<scalar_t>(a.relu ? relu(acc[j]) : acc[j]);
  }
  reinterpret_cast<P*>(a.out)[i] = ov;
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Compile-time kernel variant: pack width, layout and index type.
template <int V, bool CL, typename I>
struct Variant {
  static constexpr int kVec = V;
  static constexpr bool kChannelsLast = CL;
  using index_t = I;
};

// Picks the kernel variant for a dense 4-D tensor of `sizes` in layout `mf` and calls
// launch(Variant<...>{}, n_packs, C, HW, grid): 16-byte packs when the layout and the alignment allow it,
// int32 indices when every element index fits.
template <typename scalar_t, typename Launch>
void dispatch_variant(at::IntArrayRef sizes, at::MemoryFormat mf, bool all_aligned, Launch&& launch) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t C = sizes[1], HW = sizes[2] * sizes[3];
  const int64_t numel = sizes[0] * C * HW;
  const bool cl = mf == at::MemoryFormat::ChannelsLast;
  const bool vec = all_aligned && (cl ? C % kVec == 0 : HW % kVec == 0);
  const bool i32 = numel <= std::numeric_limits<int32_t>::max();
  const int vec_width = vec ? kVec : 1;
  const int64_t n_packs = numel / vec_width;
  const int64_t blocks = (n_packs + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "resnet_fused: tensor too large for one launch (",
              numel, " elements)");
  const dim3 grid(static_cast<unsigned>(blocks));
  auto go = [&](auto variant) { launch(variant, n_packs, C, HW, grid); };
  auto by_index = [&](auto v, auto c) {
    constexpr int VV = decltype(v)::value;
    constexpr bool CC = decltype(c)::value;
    if (i32) {
      go(Variant<VV, CC, int32_t>{});
    } else {
      go(Variant<VV, CC, int64_t>{});
    }
  };
  using VecT = std::integral_constant<int, kVec>;
  using One = std::integral_constant<int, 1>;
  if (vec) {
    cl ? by_index(VecT{}, std::true_type{}) : by_index(VecT{}, std::false_type{});
  } else {
    cl ? by_index(One{}, std::true_type{}) : by_index(One{}, std::false_type{});
  }
}

#define RESNET_FUSED_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                \
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
    ScaleBiasAddReluArgs<scalar_t> args{
        c_d.const_data_ptr<scalar_t>(),
        idn_d.const_data_ptr<scalar_t>(),
        scale_d.const_data_ptr<float>(),
        shift_d.const_data_ptr<float>(),
        idn_scale_d.defined() ? idn_scale_d.const_data_ptr<float>() : nullptr,
        idn_shift_d.defined() ? idn_shift_d.const_data_ptr<float>() : nullptr,
        out.mutable_data_ptr<scalar_t>()};
    dispatch_variant<scalar_t>(out.sizes(), mf, all_aligned, [&](auto v, int64_t n_packs, int64_t C, int64_t HW,
                                                                 dim3 grid) {
      using V = decltype(v);
      using index_t = typename V::index_t;
      scale_bias_add_relu_kernel<scalar_t, index_t, V::kVec, V::kChannelsLast>
          <<<grid, kThreads, 0, stream>>>(args, n_packs, static_cast<index_t>(C), static_cast<index_t>(HW));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
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
  const at::Tensor bias_d = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor res_d = residual.has_value() ? residual->contiguous(mf) : at::Tensor();
  const at::Tensor& sc_d = parts.shortcut;
  const bool all_aligned = aligned16(y.data_ptr()) && aligned16(out.data_ptr()) &&
                           (!res_d.defined() || aligned16(res_d.data_ptr())) &&
                           (!sc_d.defined() || aligned16(sc_d.data_ptr()));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  RESNET_FUSED_DISPATCH_CUDA_TYPES(x.scalar_type(), op, [&] {
    BiasActArgs<scalar_t> args{
        y.const_data_ptr<scalar_t>(),
        bias_d.defined() ? bias_d.const_data_ptr<float>() : nullptr,
        sc_d.defined() ? sc_d.const_data_ptr<scalar_t>() : nullptr,
        res_d.defined() ? res_d.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(),
        relu};
    dispatch_variant<scalar_t>(out.sizes(), mf, all_aligned, [&](auto v, int64_t n_packs, int64_t C, int64_t HW,
                                                                 dim3 grid) {
      using V = decltype(v);
      using index_t = typename V::index_t;
      bias_act_epilogue_kernel<scalar_t, index_t, V::kVec, V::kChannelsLast>
          <<<grid, kThreads, 0, stream>>>(args, n_packs, static_cast<index_t>(C), static_cast<index_t>(HW));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bias_act", &conv_bias_act_cuda);
  m.impl("scale_bias_add_relu", &scale_bias_add_relu_cuda);
}

}  // namespace resnet_fused
