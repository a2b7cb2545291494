// Argument checks and layout helpers shared by the CPU (csrc/ops/) and CUDA (csrc/cuda/) implementations of the
// resnet_fused ops, so both devices accept exactly the same inputs and produce the same output layout; the one
// place for them (definitions in checks.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "conv_args.h"  // EvalBn, ConvBnActArgs
#include "conv_size.h"  // conv_output_size: PyTorch's output size and its error

namespace resnet_fused {

// Building blocks of the argument checks. `op` prefixes every message (e.g. "resnet_fused::conv_stats").

// float32 / float64 / float16 / bfloat16.
bool is_float_type(at::ScalarType t);

// A conv parameter pair (stride, padding, dilation): 2 elements, each >= min_value.
void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t min_value);

// `t` has the dtype and the device of `x` (called `x_name` in the message).
void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, const char* x_name);

// `p` is a per-channel vector of activation `t` (called `t_name` in the message): 1-D of size t.size(1), float32
// (or float64 with float64 t), on t's device.
void check_channel_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& t,
                         const char* t_name);

// Validates a convolution's input `x` [N, C, H, W] (floating), `weight` [K, C/groups, R, S] (x's dtype and
// device) and parameters, and returns the output size [N, K, P, Q].
std::vector<int64_t> check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups);

// Gathers the op's arguments (schema order) into a ConvBnActArgs.
ConvBnActArgs conv_bn_act_args(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& bn_mean, const at::Tensor& bn_var, double bn_eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shortcut_x,
    const std::optional<at::Tensor>& shortcut_weight, const std::optional<at::Tensor>& shortcut_bn_weight,
    const std::optional<at::Tensor>& shortcut_bn_bias, const std::optional<at::Tensor>& shortcut_bn_mean,
    const std::optional<at::Tensor>& shortcut_bn_var, double shortcut_bn_eps, at::IntArrayRef shortcut_stride,
    bool relu);

// Validates the arguments of resnet_fused::conv_bn_act (ranks, channel counts, conv parameters, devices,
// residual / shortcut shapes; x, weight, residual, shortcut tensors all of x's dtype; each BN's tensors
// floating-point vectors of K channels on x's device, of any floating dtype, weight and bias given together, eps
// >= 0; the shortcut BN given exactly with the shortcut) and returns the output size [N, K, P, Q].
std::vector<int64_t> check_conv_bn_act(const ConvBnActArgs& a);

// Validates the arguments of resnet_fused::scale_bias_add_relu (c / idn same 4-D shape, dtype and device;
// per-channel fp32 parameters of size C, fp64 allowed with fp64 c; idn_scale / idn_shift given together).
void check_scale_bias_add_relu(
    const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& idn,
    const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift);
// The same checks with the messages naming op `op` (its backward takes the same operands).
void check_scale_bias_add_relu(
    const char* op, const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& idn,
    const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift);

// ------------------------------------------------------------------------------------------ training ops
// Activations are 4-D [N, C, H, W] of any float dtype; per-channel vectors are float32 (float64 allowed with
// float64 activations) of size C on the activation's device.

// conv_stats: x, weight and the conv parameters as for conv_bn_act's convolution; in_scale / in_shift given
// together, per-channel vectors of x. Returns the output size [N, K, P, Q].
std::vector<int64_t> check_conv_stats(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift);

// conv_stats_backward_conv: x, weight, the conv parameters and the prologue as conv_stats; g of conv_stats' output
// shape (returned), dtype and device.
std::vector<int64_t> check_conv_stats_backward_conv(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
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

// ------------------------------------------------------------------------------------------ layout helpers

// Per-channel parameter as a [1, C, 1, 1] tensor in the op-math dtype `acc` (for the CPU implementations).
at::Tensor channel_view(const at::Tensor& p, at::ScalarType acc);

// The dense tensor of `sizes` in memory format `mf` that every op returns (the same strides as
// torch.empty(sizes, memory_format=mf), which is what the fake kernels in Python produce).
at::Tensor empty_in_format(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat mf);

// True when `t` has exactly the strides of empty_in_format(t.sizes(), ..., mf).
bool has_format_strides(const at::Tensor& t, at::MemoryFormat mf);

// `t` itself when it has those strides, else a copy that has them (the exact strides a fake kernel's torch.empty in
// memory format `mf` gives, size-1 dimensions included).
at::Tensor with_format_strides(const at::Tensor& t, at::MemoryFormat mf);

// Output of the main convolution and of the optional 1x1 shortcut convolution of conv_bn_act (at::convolution:
// cuDNN on CUDA), both made dense in memory format `mf` (undefined shortcut when there is none).
struct ConvParts {
  at::Tensor main;
  at::Tensor shortcut;
};
ConvParts conv_parts(const ConvBnActArgs& a, at::MemoryFormat mf);

}  // namespace resnet_fused
