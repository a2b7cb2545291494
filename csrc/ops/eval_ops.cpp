// resnet_fused eval ops: their schemas (TORCH_LIBRARY; the training ops add theirs in train_ops.cpp, and the CUDA
// build's test hook library resnet_fused_debug is defined here too) and their CPU implementations.
//
//   conv_bn_act:          y = act(conv2d(x, W)·s[k] + t[k] + conv2d_1x1(shortcut_x, W_s)·s_d[k] + t_d[k] + residual)
//   scale_bias_add_relu:  out = relu(c * scale[k] + shift[k] + (idn * idn_scale[k] + idn_shift[k]  |  idn))
//
// The first is a ResNet block's inference conv (each BN applied as a per-channel scale and shift computed from its
// live tensors on every call: s = γ/√(σ² + ε), t = β − μ·s; identity or downsample shortcut added before the
// ReLU), the second its training tail (BN2 applied from batch statistics, plus the identity or the downsample
// branch's own BN). The CPU versions run at::convolution and then the epilogue in the op-math type (fp32 for
// fp32/fp16/bf16, fp64 for fp64) with one rounding to the output dtype, the same math as the fused CUDA kernels
// (which differ only by using fused multiply-adds).
// Autograd and fake (meta) kernels are registered from Python (resnet_fused/backends/cuda.py).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <string_view>
#include <utility>

#include "../common/checks.h"
#include "../common/engine.h"

namespace resnet_fused {

namespace {

// (s, t) of `bn` as [K] tensors in the op-math dtype `acc`: the same ATen ops, in the same order, as the reference
// backend's eval_scale_shift.
std::pair<at::Tensor, at::Tensor> eval_scale_shift(const EvalBn& bn, at::ScalarType acc) {
  const at::Tensor invstd = at::rsqrt(bn.var.to(acc) + bn.eps);
  const at::Tensor scale = bn.weight.defined() ? bn.weight.to(acc) * invstd : invstd;
  at::Tensor shift = -bn.mean.to(acc) * scale;
  if (bn.bias.defined()) {
    shift = shift + bn.bias.to(acc);
  }
  return {scale, shift};
}

at::Tensor conv_bn_act_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& bn_mean, const at::Tensor& bn_var, double bn_eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shortcut_x,
    const std::optional<at::Tensor>& shortcut_weight, const std::optional<at::Tensor>& shortcut_bn_weight,
    const std::optional<at::Tensor>& shortcut_bn_bias, const std::optional<at::Tensor>& shortcut_bn_mean,
    const std::optional<at::Tensor>& shortcut_bn_var, double shortcut_bn_eps, at::IntArrayRef shortcut_stride,
    bool relu, c10::string_view engines) {
  // One implementation on the CPU: the engine argument (common/engine.h) is only validated.
  engine::parse("resnet_fused::conv_bn_act", std::string_view(engines.data(), engines.size()));
  const ConvBnActArgs a = conv_bn_act_args(
      x, weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, stride, padding, dilation, groups, residual, shortcut_x,
      shortcut_weight, shortcut_bn_weight, shortcut_bn_bias, shortcut_bn_mean, shortcut_bn_var, shortcut_bn_eps,
      shortcut_stride, relu);
  const auto out_sizes = check_conv_bn_act(a);
  const at::MemoryFormat mf = x.suggest_memory_format();
  const ConvParts parts = conv_parts(a, mf);
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  // y = conv·s + t [+ conv_d·s_d + t_d] [+ residual], in that order, in the op-math dtype.
  const auto [scale, shift] = eval_scale_shift(a.bn, acc);
  at::Tensor t = parts.main.to(acc).mul(scale.view({1, -1, 1, 1})).add_(shift.view({1, -1, 1, 1}));
  if (parts.shortcut.defined()) {
    const auto [s_scale, s_shift] = eval_scale_shift(a.shortcut_bn, acc);
    t.add_(parts.shortcut.to(acc).mul(s_scale.view({1, -1, 1, 1})).add_(s_shift.view({1, -1, 1, 1})));
  }
  if (a.residual.defined()) {
    t.add_(a.residual.to(acc));
  }
  if (relu) {
    t.relu_();
  }
  at::Tensor out = empty_in_format(out_sizes, x.options(), mf);
  out.copy_(t);
  return out;
}

at::Tensor scale_bias_add_relu_cpu(
    const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& idn,
    const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift) {
  check_scale_bias_add_relu(c, scale, shift, idn, idn_scale, idn_shift);
  const at::ScalarType acc = at::toOpMathType(c.scalar_type());
  at::Tensor t = c.to(acc).mul(channel_view(scale, acc)).add_(channel_view(shift, acc));
  at::Tensor r = idn.to(acc);
  if (idn_scale.has_value()) {
    r = r.mul(channel_view(*idn_scale, acc)).add_(channel_view(*idn_shift, acc));
  }
  t.add_(r).relu_();
  at::Tensor out = empty_in_format(c.sizes(), c.options(), c.suggest_memory_format());
  out.copy_(t);
  return out;
}

}  // namespace

TORCH_LIBRARY(resnet_fused, m) {
  m.def(
      "conv_bn_act(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor bn_mean, Tensor bn_var, "
      "float bn_eps, int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor? residual, "
      "Tensor? shortcut_x, Tensor? shortcut_weight, Tensor? shortcut_bn_weight, Tensor? shortcut_bn_bias, "
      "Tensor? shortcut_bn_mean, Tensor? shortcut_bn_var, float shortcut_bn_eps, int[2] shortcut_stride, "
      "bool relu, str engines=\"auto\") -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "scale_bias_add_relu(Tensor c, Tensor scale, Tensor shift, Tensor idn, Tensor? idn_scale, "
      "Tensor? idn_shift) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

#ifdef RESNET_FUSED_WITH_CUDA
// Test hooks of the CUDA build (implemented in cuda/eval_ops.cu).
TORCH_LIBRARY(resnet_fused_debug, m) {
  m.def(
      "cutlass_conv_stats(Tensor x, Tensor weight, Tensor? in_scale, Tensor? in_shift, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor, Tensor, bool)");
}
#endif

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_bn_act", &conv_bn_act_cpu);
  m.impl("scale_bias_add_relu", &scale_bias_add_relu_cpu);
}

}  // namespace resnet_fused
