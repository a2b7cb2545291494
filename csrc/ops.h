// Argument checks and layout helpers shared by the CPU (ops.cpp) and CUDA (ops_cuda.cu) implementations of the
// resnet_fused ops, so both devices accept exactly the same inputs and produce the same output layout.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
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

// A BatchNorm in its eval form as conv_bn_act receives it: the module's live tensors (never a copy) and eps.
// weight / bias are undefined for affine=False; every tensor is undefined for the absent shortcut BN.
// bn(c) = c·s + t with s = weight/√(var + eps) (1/√(var + eps) without weight), t = bias − mean·s.
struct EvalBn {
  at::Tensor weight;
  at::Tensor bias;
  at::Tensor mean;
  at::Tensor var;
  double eps = 0.0;

  bool present() const { return mean.defined(); }
};

EvalBn make_eval_bn(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, double eps);

// The arguments of resnet_fused::conv_bn_act, as one value the CPU and CUDA implementations share:
//   y = act(conv2d(x, W)·s + t [+ conv1x1(shortcut_x, W_s, shortcut_stride)·s_d + t_d] [+ residual])
// (summed in that order; act = ReLU when relu, else identity; (s, t) from bn, (s_d, t_d) from shortcut_bn).
// The array refs point into the op's arguments and live as long as the call.
struct ConvBnActArgs {
  at::Tensor x;                // [N, C, H, W]
  at::Tensor weight;           // [K, C/groups, R, S], x's dtype and device
  EvalBn bn;                   // K channels
  at::IntArrayRef stride, padding, dilation;
  int64_t groups = 1;
  at::Tensor residual;         // [N, K, P, Q] in x's dtype, or undefined
  at::Tensor shortcut_x;       // [N, Cs, Hs, Ws] in x's dtype, or undefined
  at::Tensor shortcut_weight;  // [K, Cs, 1, 1], given with shortcut_x
  EvalBn shortcut_bn;          // present exactly when shortcut_x is
  at::IntArrayRef shortcut_stride;
  bool relu = true;
};

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

// The output size [N, K, P, Q] of a convolution with PyTorch's rule P = (H + 2·pad − dil·(R − 1) − 1) / stride + 1
// for a window that fits the padded input, and PyTorch's error (TORCH_CHECK, prefixed by `op`) for one that does
// not (truncating that negative numerator toward zero would give P = 1 for strides >= 2).
std::vector<int64_t> conv_output_size(const char* op, at::IntArrayRef x_sizes, at::IntArrayRef w_sizes,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

// Validates the arguments of resnet_fused::conv_bn_act (ranks, channel counts, conv parameters, devices,
// residual / shortcut shapes; x, weight, residual, shortcut tensors all of x's dtype; each BN's tensors
// floating-point vectors of K channels on x's device, of any floating dtype, weight and bias given together, eps
// >= 0; the shortcut BN given exactly with the shortcut) and returns the output size [N, K, P, Q].
std::vector<int64_t> check_conv_bn_act(const ConvBnActArgs& a);

// (s, t) of `bn` as [K] tensors in the op-math dtype `acc` (the CPU implementation; the same ATen ops as the
// reference backend's eval_scale_shift).
std::pair<at::Tensor, at::Tensor> eval_scale_shift(const EvalBn& bn, at::ScalarType acc);

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

// Output of the main convolution and of the optional 1x1 shortcut convolution of conv_bn_act (at::convolution:
// cuDNN on CUDA), both made dense in memory format `mf` (undefined shortcut when there is none).
struct ConvParts {
  at::Tensor main;
  at::Tensor shortcut;
};
ConvParts conv_parts(const ConvBnActArgs& a, at::MemoryFormat mf);

}  // namespace resnet_fused
