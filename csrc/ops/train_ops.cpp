// Training-path ops of resnet_fused (the NormConv scheme of DESIGN.md): schemas (a fragment of the library) and the
// CPU implementations; their argument checks are shared with the CUDA kernels (common/checks.h, cuda/train_ops.cu).
//
//   conv_stats:                    c = conv2d(relu(x*in_scale[k] + in_shift[k]) or x, W); per-channel batch mean and
//                                  biased variance of c
//   affine_relu:                   a = relu(x*scale[k] + shift[k])  (backward recomputes a conv's activated input)
//   conv_stats_backward_input:     dc' = dc + dmean[k]/n + dvar[k]*2(c - mean[k])/n  (n = values per channel)
//   affine_relu_backward:          g = da*[x*scale + shift > 0]; dx = g*scale, dscale = Σ g*x, dshift = Σ g
//   conv_stats_backward_conv:      conv_stats' convolution backward, given g = dL/dc (conv_stats_backward_input's
//                                  result): dW = wgrad(g, a) with a = relu(x*in_scale + in_shift) (or x), and
//                                  dx, dscale, dshift = affine_relu_backward(dgrad(g, W), x, in_scale, in_shift) (dx =
//                                  dgrad(g, W) without a prologue, dscale / dshift then not computed). output_mask =
//                                  [input side, weight]; an output not asked for is a 0-element tensor. CUDA
//                                  engines: cudnn (the wgrad graph recomputing a on load, the dgrad graph with the
//                                  ReLU mask fused) or plain (this composition)
//   scale_bias_add_relu_backward:  g = dout*[z > 0], z = scale_bias_add_relu's pre-activation recomputed from its
//                                  inputs; dc = g*s, dscale = Σ g*c, dshift = Σ g, didn = g (or g*s_d with
//                                  didn_scale = Σ g*idn; the gradient of idn_shift is dshift)
//   bn_finalize:                   invstd = 1/√(var + eps), scale = γ·invstd, shift = β − mean·scale, and the
//                                  running-statistics update of BatchNorm (unbiased variance var·count/(count−1))
//
// Σ is over N, H, W. The CPU versions compute exactly what the reference backend (resnet_fused/backends/
// reference.py, resnet_fused/norm.py) computes, with the same ATen operations in the op-math dtype (fp32, fp64 for
// fp64 activations); per-channel results are in that dtype, tensor results dense in the memory format of the
// op's first activation operand. Fake kernels and autograd are registered from Python
// (resnet_fused/backends/cuda.py).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>

#include "../common/checks.h"
#include "../common/engine.h"
#include "train_ops.h"

namespace resnet_fused {

namespace {

constexpr int64_t kChannelDims[] = {0, 2, 3};

// `t` (any layout, op-math dtype) rounded to `like`'s dtype in a new tensor dense in memory format `mf`.
at::Tensor dense_result(const at::Tensor& t, const at::Tensor& like, at::MemoryFormat mf) {
  at::Tensor out = empty_in_format(like.sizes(), like.options(), mf);
  out.copy_(t);
  return out;
}

// relu(x*scale + shift) in the op-math dtype `acc`.
at::Tensor affine_relu_acc(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           at::ScalarType acc) {
  return x.to(acc).mul(channel_view(scale, acc)).add_(channel_view(shift, acc)).relu_();
}

at::Tensor affine_relu_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_affine_relu(x, scale, shift);
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  return dense_result(affine_relu_acc(x, scale, shift, acc), x, x.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_stats_cpu(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, c10::string_view engines) {
  check_conv_stats(x, weight, stride, padding, dilation, groups, in_scale, in_shift);
  // One implementation on the CPU: the engine argument (common/engine.h) is only validated.
  engine::parse("resnet_fused::conv_stats", std::string_view(engines.data(), engines.size()));
  const at::MemoryFormat mf = x.suggest_memory_format();
  const at::Tensor a = in_scale.has_value() ? affine_relu_cpu(x, *in_scale, *in_shift) : x;
  at::Tensor c = at::convolution(a, weight, std::nullopt, stride, padding, dilation, /*transposed=*/false,
                                 /*output_padding=*/{0, 0}, groups)
                     .contiguous(mf);
  const at::ScalarType acc = at::toOpMathType(c.scalar_type());
  auto [var, mean] = at::var_mean(c.to(acc), kChannelDims, /*correction=*/std::optional<at::Scalar>(0),
                                  /*keepdim=*/false);
  return {c, mean, var};
}

at::Tensor conv_stats_backward_input_cpu(const at::Tensor& c, const at::Tensor& mean,
                                         const std::optional<at::Tensor>& dc, const std::optional<at::Tensor>& dmean,
                                         const std::optional<at::Tensor>& dvar) {
  check_conv_stats_backward_input(c, mean, dc, dmean, dvar);
  const at::ScalarType acc = at::toOpMathType(c.scalar_type());
  const double n = static_cast<double>(c.numel() / std::max<int64_t>(c.size(1), 1));
  // Absent gradients count as zero; the sum is formed out of place (dc may already be in the op-math dtype).
  at::Tensor g = dc.has_value() ? dc->to(acc) : at::zeros(c.sizes(), c.options().dtype(acc));
  if (dmean.has_value()) {
    g = g + channel_view(*dmean, acc) / n;
  }
  if (dvar.has_value()) {
    g = g + channel_view(*dvar, acc) * (2.0 / n) * (c.to(acc) - channel_view(mean, acc));
  }
  return dense_result(g, c, c.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_relu_backward_cpu(
    const at::Tensor& da, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_affine_relu_backward(da, x, scale, shift);
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  const at::Tensor xa = x.to(acc);
  const at::Tensor s = channel_view(scale, acc);
  const at::Tensor g = da.to(acc) * xa.mul(s).add_(channel_view(shift, acc)).gt(0);
  at::Tensor dx = dense_result(g * s, x, x.suggest_memory_format());
  return {dx, (g * xa).sum(kChannelDims), g.sum(kChannelDims)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_bias_add_relu_backward_cpu(
    const at::Tensor& dout, const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& idn, const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift) {
  check_scale_bias_add_relu_backward(dout, c, scale, shift, idn, idn_scale, idn_shift);
  const at::ScalarType acc = at::toOpMathType(c.scalar_type());
  const at::MemoryFormat mf = c.suggest_memory_format();
  const at::Tensor ca = c.to(acc);
  const at::Tensor ia = idn.to(acc);
  const at::Tensor s = channel_view(scale, acc);
  const bool dual = idn_scale.has_value();
  at::Tensor z = ca.mul(s).add_(channel_view(shift, acc));
  if (dual) {
    z.add_(ia.mul(channel_view(*idn_scale, acc))).add_(channel_view(*idn_shift, acc));
  } else {
    z.add_(ia);
  }
  const at::Tensor g = dout.to(acc) * z.gt(0);
  at::Tensor dc = dense_result(g * s, c, mf);
  at::Tensor didn = dense_result(dual ? g * channel_view(*idn_scale, acc) : g, idn, mf);
  at::Tensor didn_scale = dual ? (g * ia).sum(kChannelDims) : at::empty({0}, c.options().dtype(acc));
  return {dc, didn, (g * ca).sum(kChannelDims), g.sum(kChannelDims), didn_scale};
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cpu(
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double count, double momentum_factor, double eps) {
  check_bn_finalize(mean, var, weight, bias, running_mean, running_var, count);
  const at::Tensor invstd = at::rsqrt(var + eps);
  at::Tensor scale = weight.has_value() ? *weight * invstd : invstd;
  at::Tensor shift = -mean * scale;
  if (bias.has_value()) {
    shift = shift + *bias;
  }
  if (running_mean.has_value()) {
    const at::Tensor unbiased = var * (count / (count - 1));
    running_mean->mul_(1.0 - momentum_factor).add_(mean * momentum_factor);
    running_var->mul_(1.0 - momentum_factor).add_(unbiased * momentum_factor);
  }
  return {scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_stats_backward_conv_cpu(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, std::array<bool, 2> output_mask, c10::string_view engines) {
  check_conv_stats_backward_conv(g, x, weight, stride, padding, dilation, groups, in_scale, in_shift);
  engine::parse("resnet_fused::conv_stats_backward_conv", std::string_view(engines.data(), engines.size()));
  return conv_stats_backward_conv_composite(g, x, weight, stride, padding, dilation, groups, in_scale, in_shift,
                                            output_mask);
}

}  // namespace

at::Tensor not_computed(const at::TensorOptions& like) { return at::empty({0}, like); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_stats_backward_conv_composite(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, std::array<bool, 2> output_mask) {
  static const auto affine_relu = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("resnet_fused::affine_relu", "")
                                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  static const auto affine_relu_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resnet_fused::affine_relu_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&)>();
  const bool prologue = in_scale.has_value();
  const at::TensorOptions per_channel = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor dx = not_computed(x.options()), dw = not_computed(weight.options());
  at::Tensor dscale = not_computed(per_channel), dshift = not_computed(per_channel);
  if (!output_mask[0] && !output_mask[1]) {
    return {dx, dw, dscale, dshift};
  }
  // The weight gradient needs the activated input; the input gradient only its shape.
  const at::Tensor a = prologue && output_mask[1] ? affine_relu.call(x, *in_scale, *in_shift) : x;
  auto [da, dw_, unused] = at::convolution_backward(g, a, weight, std::nullopt, stride, padding, dilation,
                                                    /*transposed=*/false, {0, 0}, groups,
                                                    {output_mask[0], output_mask[1], false});
  // The layouts the fake kernel promises (dense in the suggested memory format of x / weight), whatever the
  // convolution backward chose: a compiled graph reads them by those strides.
  if (output_mask[1]) {
    dw = with_format_strides(dw_, weight.suggest_memory_format());
  }
  if (output_mask[0]) {
    if (prologue) {
      std::tie(dx, dscale, dshift) = affine_relu_backward.call(da, x, *in_scale, *in_shift);
    } else {
      dx = with_format_strides(da, x.suggest_memory_format());
    }
  }
  return {dx, dw, dscale, dshift};
}

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def(
      "conv_stats(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "Tensor? in_scale, Tensor? in_shift, str engines=\"auto\") -> (Tensor c, Tensor mean, Tensor var)",
      {at::Tag::pt2_compliant_tag});
  m.def("affine_relu(Tensor x, Tensor scale, Tensor shift) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("conv_stats_backward_input(Tensor c, Tensor mean, Tensor? dc, Tensor? dmean, Tensor? dvar) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "affine_relu_backward(Tensor da, Tensor x, Tensor scale, Tensor shift) "
      "-> (Tensor dx, Tensor dscale, Tensor dshift)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "conv_stats_backward_conv(Tensor g, Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, Tensor? in_scale, Tensor? in_shift, bool[2] output_mask, str engines=\"auto\") "
      "-> (Tensor dx, Tensor dweight, Tensor dscale, Tensor dshift)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "scale_bias_add_relu_backward(Tensor dout, Tensor c, Tensor scale, Tensor shift, Tensor idn, "
      "Tensor? idn_scale, Tensor? idn_shift) -> (Tensor dc, Tensor didn, Tensor dscale, Tensor dshift, "
      "Tensor didn_scale)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "bn_finalize(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float count, float momentum_factor, float eps) -> (Tensor scale, Tensor shift)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_stats", &conv_stats_cpu);
  m.impl("affine_relu", &affine_relu_cpu);
  m.impl("conv_stats_backward_input", &conv_stats_backward_input_cpu);
  m.impl("affine_relu_backward", &affine_relu_backward_cpu);
  m.impl("conv_stats_backward_conv", &conv_stats_backward_conv_cpu);
  m.impl("scale_bias_add_relu_backward", &scale_bias_add_relu_backward_cpu);
  m.impl("bn_finalize", &bn_finalize_cpu);
}

}  // namespace resnet_fused
