// An eval BatchNorm as the CUDA kernels read it: the module's live tensors, taken as they are (any floating dtype,
// any element stride), and the per-channel scale and shift computed from them on the device on every call:
//
//   s[k] = γ[k] / √(σ²[k] + ε)   (1/√(σ²[k] + ε) without γ),   t[k] = β[k] − μ[k]·s[k]   (−μ[k]·s[k] without β)
//
// in fp32, each product and sum rounded on its own (the reference backend's eval_scale_shift, in the same order,
// with a correctly rounded square root and division). A half model's fp16 buffers, fp64 buffers or a strided view
// cost no conversion launch: each value is converted to fp32 when it is loaded. Nothing is cached: an in-place
// edit of any of these tensors (through .data included) is seen by the next launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../common/checks.h"

namespace resnet_fused {

// One tensor of a BN: pointer, dtype and element stride (nullptr when absent: γ and β of affine=False).
struct BnTensorRef {
  const void* data = nullptr;
  int64_t stride = 1;
  int8_t dtype = static_cast<int8_t>(at::ScalarType::Float);  // Float, Double, Half or BFloat16
};

// The four tensors and eps of one BN; mean.data == nullptr when the BN is absent.
struct BnRef {
  BnTensorRef weight, bias, mean, var;
  float eps = 0.f;
};

inline BnTensorRef bn_tensor_ref(const at::Tensor& t) {
  BnTensorRef r;
  if (t.defined()) {
    const at::ScalarType s = t.scalar_type();
    TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
                "resnet_fused: BatchNorm tensors must be float32/float64/float16/bfloat16, got ", s);
    r.data = t.const_data_ptr();
    r.stride = t.stride(0);
    r.dtype = static_cast<int8_t>(s);
  }
  return r;
}

// The BN as the kernels read it (an absent BN gives mean.data == nullptr).
inline BnRef bn_ref(const EvalBn& bn) {
  BnRef r;
  r.weight = bn_tensor_ref(bn.weight);
  r.bias = bn_tensor_ref(bn.bias);
  r.mean = bn_tensor_ref(bn.mean);
  r.var = bn_tensor_ref(bn.var);
  r.eps = static_cast<float>(bn.eps);
  return r;
}

#ifdef __CUDACC__

// Element k of a BN tensor, converted to fp32 (the dtype switch is uniform across the grid).
__device__ __forceinline__ float bn_load(const BnTensorRef& t, int64_t k) {
  const int64_t i = k * t.stride;
  switch (static_cast<at::ScalarType>(t.dtype)) {
    case at::ScalarType::Double:
      return static_cast<float>(static_cast<const double*>(t.data)[i]);
    case at::ScalarType::Half:
      return static_cast<float>(static_cast<const c10::Half*>(t.data)[i]);
    case at::ScalarType::BFloat16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(t.data)[i]);
    default:
      return static_cast<const float*>(t.data)[i];
  }
}

// (s, t) of channel k of `bn` (see the file comment).
__device__ __forceinline__ void bn_scale_shift(const BnRef& bn, int64_t k, float& s, float& t) {
  const float invstd = 1.f / sqrtf(__fadd_rn(bn_load(bn.var, k), bn.eps));
  s = bn.weight.data != nullptr ? __fmul_rn(bn_load(bn.weight, k), invstd) : invstd;
  t = __fmul_rn(-bn_load(bn.mean, k), s);
  if (bn.bias.data != nullptr) {
    t = __fadd_rn(t, bn_load(bn.bias, k));
  }
}

#endif  // __CUDACC__

}  // namespace resnet_fused
