// Argument checks of the training-path ops, shared by the CPU (train_ops.cpp) and CUDA (train_cuda.cu)
// implementations so both devices accept exactly the same inputs. Activations are 4-D [N, C, H, W] of any float
// dtype; per-channel vectors are float32 (float64 allowed with float64 activations) of size C on the
// activation's device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace resnet_fused {

// conv_stats: x, weight and the conv parameters as for conv_bn_act's convolution; in_scale / in_shift given
// together, per-channel vectors of x. Returns the output size [N, K, P, Q].
std::vector<int64_t> check_conv_stats(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift);

// affine_relu: x 4-D floating, scale / shift per-channel vectors of x.
void check_affine_relu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift);

// affine_relu_backward: as affine_relu, and da of x's shape, dtype and device.
void check_affine_relu_backward(const at::Tensor& da, const at::Tensor& x, const at::Tensor& scale,
                                const at::Tensor& shift);

// conv_stats_backward_input: c 4-D floating; mean, dmean, dvar per-channel vectors of c; dc of c's shape, dtype
// and device.
void check_conv_stats_backward_input(const at::Tensor& c, const at::Tensor& mean, const std::optional<at::Tensor>& dc,
                                     const std::optional<at::Tensor>& dmean, const std::optional<at::Tensor>& dvar);

// scale_bias_add_relu_backward: the operands of scale_bias_add_relu, and dout of c's shape, dtype and device.
void check_scale_bias_add_relu_backward(
    const at::Tensor& dout, const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& idn, const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift);

// bn_finalize: mean 1-D float32 or float64; var, weight, bias, running_mean, running_var of mean's shape, dtype and
// device; the running statistics given together, contiguous (they are updated in place), and count > 1 for
// their unbiased variance.
void check_bn_finalize(const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                       const std::optional<at::Tensor>& running_var, double count);

}  // namespace resnet_fused
