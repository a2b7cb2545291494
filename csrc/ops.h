// Argument checks and layout helpers shared by the CPU (ops.cpp) and CUDA (ops_cuda.cu) implementations of the
// resnet_fused ops, so both devices accept exactly the same inputs and produce the same output layout.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace resnet_fused {

// Building blocks of the argument checks, shared with the training ops (train_ops.cpp). `op` prefixes every
// message (e.g. "resnet_fused::conv_stats").

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
// The same checks with the messages naming op `op` (its backward takes the same operands).
void check_scale_bias_add_relu(
    const char* op, const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& idn,
    const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift);

// Per-channel parameter as a [1, C, 1, 1] tensor in the op-math dtype `acc` (for the CPU implementations).
at::Tensor channel_view(const at::Tensor& p, at::ScalarType acc);

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
