// Argument checks and layout helpers shared by the CPU (ops.cpp) and CUDA (ops_cuda.cu) implementations of the
// resnet_fused ops, so both devices accept exactly the same inputs and produce the same output layout.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace resnet_fused {

// Validates the arguments of resnet_fused::conv_bias_act (ranks, channel counts, conv parameters, devices,
// residual / shortcut shapes, dtypes: all of x's dtype except bias, which may also be in the accumulation
// dtype, fp32 or fp64 for fp64 x) and returns the output size [N, K, P, Q].
std::vector<int64_t> check_conv_bias_act(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shortcut_x,
    const std::optional<at::Tensor>& shortcut_weight, at::IntArrayRef shortcut_stride);

// Validates the arguments of resnet_fused::scale_bias_add_relu (c / idn same 4-D shape, dtype and device;
// per-channel fp32 parameters of size C, fp64 allowed with fp64 c; idn_scale / idn_shift given together).
void check_scale_bias_add_relu(
    const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& idn,
    const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift);

// The dense tensor of `sizes` in memory format `mf` that every op returns (the same strides as
// torch.empty(sizes, memory_format=mf), which is what the fake kernels in Python produce).
at::Tensor empty_in_format(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat mf);

// True when `t` has exactly the strides of empty_in_format(t.sizes(), ..., mf).
bool has_format_strides(const at::Tensor& t, at::MemoryFormat mf);

// Output of the main convolution and of the optional 1x1 shortcut convolution of conv_bias_act, both made
// dense in memory format `mf` (undefined shortcut when there is none).
struct ConvParts {
  at::Tensor main;
  at::Tensor shortcut;
};
ConvParts conv_parts(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& shortcut_x,
    const std::optional<at::Tensor>& shortcut_weight, at::IntArrayRef shortcut_stride, at::MemoryFormat mf);

}  // namespace resnet_fused
