// What the CPU kernels of ops/train_ops.cpp share with the CUDA entry points (cuda/train_ops.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace resnet_fused {

// conv_stats_backward_conv composed of ATen's convolution_backward and this library's affine_relu /
// affine_relu_backward (called through the dispatcher, so this one definition is the CPU kernel and the CUDA engine
// "plain"): a = affine_relu(x, in_scale, in_shift) when the weight gradient needs it, (da, dW) =
// convolution_backward(g, a, W), then (dx, dscale, dshift) = affine_relu_backward(da, x, in_scale, in_shift).
// Arguments checked by the caller.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_stats_backward_conv_composite(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, std::array<bool, 2> output_mask);

// The placeholder of an output that output_mask did not ask for: a 0-element tensor with `like`'s options (as the
// fake kernel in resnet_fused/backends/cuda.py returns; Python maps it to None).
at::Tensor not_computed(const at::TensorOptions& like);

}  // namespace resnet_fused
