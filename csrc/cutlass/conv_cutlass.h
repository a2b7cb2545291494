// CUTLASS implicit-GEMM convolutions on tensor cores (defined in fprop.cu and fprop_stats.cu).
//
// Built with CUTLASS when setup.py finds its headers (macro RESNET_FUSED_WITH_CUTLASS); without them these
// functions exist but always decline (kNoCutlass), so callers keep their cuDNN path.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace resnet_fused {

// Why every call is declined in a build without the CUTLASS headers.
inline constexpr const char* kNoCutlass = "the extension was built without the CUTLASS headers";

// Whether this build has the CUTLASS kernels (RESNET_FUSED_WITH_CUTLASS).
inline constexpr bool cutlass_built() {
#ifdef RESNET_FUSED_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

// out = act(conv2d(x, w)·s[k] + t[k] + residual) on tensor cores, in one launch on the current CUDA stream:
// fp32 accumulation, the epilogue in fp32 (acc·s + t with one fused multiply-add, then + residual, act = ReLU when
// `relu`, else identity; ReLU propagates NaN like torch.relu), one rounding to the output dtype at the store.
//   x            [N, C, H, W] activations           w    [K, C, R, S] filters
//   scale_shift  fp32 [K, 2]: (s, t) of each output channel (an eval BN's scale and shift), contiguous, 64-byte
//                aligned
//   residual     undefined, or of out's shape
//   out          [N, K, P, Q], preallocated (written, never read; must not overlap the inputs)
// Returns false, launching nothing, when the kernels do not cover the call (with the reason in *why when given);
// the caller then uses its cuDNN path. Covered: CUDA tensors on one device of compute capability >= 8.0; x, w,
// out, residual all float16 or all bfloat16, all dense channels_last (NHWC / KRSC) with 16-byte aligned data;
// groups == 1; C and K multiples of 8 (16-byte vectors); no empty tensor; each of x, w, out under 2^31 bytes (the
// kernels' 32-bit offsets); CUTLASS's can_implement. Shapes that contradict each other are errors (TORCH_CHECK), and
// so is a failed launch (with CUDA's error text).
// Kernels: tile 128x64x64 for K <= 64, else 128x128x64; the 1x1 convs with a threadblock swizzle (fprop.cu).
bool cutlass_conv_fprop(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale_shift,
                        const at::Tensor& residual, at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool relu, std::string* why = nullptr);

// Why cutlass_conv_fprop would not run these arguments (with a contiguous, 64-byte aligned scale_shift on x's
// device), or "" when it would (same rules; launches nothing). Lets a caller that needs several launches decide
// for all of them before starting any, or computing anything.
std::string cutlass_conv_fprop_uncovered(const at::Tensor& x, const at::Tensor& w, const at::Tensor& residual,
                                         const at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups);

// The tile configuration and swizzle width of the last conv_fprop kernel this thread launched, e.g.
// "128x64x64/3 swizzle 1" ("" before any): which kernel ran, for the record.
std::string cutlass_last_config();

// Training-path conv: c = conv2d(a, w) with a = x, or with the BN+ReLU prologue a = relu(x * in_scale[ch] +
// in_shift[ch]) applied to the activation tile on load (padding contributes 0 after the activation); and mean /
// var: per-output-channel mean and biased variance of the stored c over its N*P*Q pixels (fp32 [K],
// preallocated, overwritten). The epilogue writes mean-centred per-tile statistics (count, mean, M2) to a
// workspace, and two small kernels merge them with Chan's formula in fp64 in a fixed order (deterministic,
// accurate whatever the mean; fprop_stats.cu). Launches on the current CUDA stream. Coverage as
// cutlass_conv_fprop for x, w and c (c takes out's place), plus mean / var contiguous on x's device; with the
// prologue also in_scale / in_shift float32 [C], contiguous, on x's device (given together; wrong shapes are
// errors). Precision of the prologue: in_scale / in_shift are rounded to x's dtype (round to nearest) before use,
// since the kernel's scale/shift vectors are 16-bit, so it computes relu(x * rd(s) + rd(t)) in one fused
// multiply-add per element (fp16: error up to 2^-11 relative to |x*s| + |t|; bf16: 2^-8); in fp16, scale or
// shift beyond +-65504 become +-inf. An input pair of adjacent channels bitwise equal to the kernel's
// out-of-bounds marker (fp16 NaN 0x7eff / bf16 NaN 0x7fa5, both channels) is read as padding: 0, not NaN.
// Returns false, launching nothing, for any call not covered (with the reason in *why when given). The 1x1 convs run
// with a threadblock swizzle, as cutlass_conv_fprop's.
bool cutlass_conv_stats(const at::Tensor& x, const at::Tensor& w, const at::Tensor& in_scale,
                        const at::Tensor& in_shift, at::Tensor& c, at::Tensor& mean, at::Tensor& var,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        std::string* why = nullptr);

// Why cutlass_conv_stats would not run these arguments, or "" when it would (same rules; launches nothing).
std::string cutlass_conv_stats_uncovered(const at::Tensor& x, const at::Tensor& w, const at::Tensor& in_scale,
                                         const at::Tensor& in_shift, const at::Tensor& c, const at::Tensor& mean,
                                         const at::Tensor& var, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups);

}  // namespace resnet_fused
