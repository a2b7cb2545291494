// Training-path ops of resnet_fused (the NormConv scheme of DESIGN.md): schemas, argument checks shared with the
// CUDA kernels (train_cuda.cu), and the CPU implementations.
//
//   conv_stats:                    c = conv2d(relu(x*in_scale[k] + in_shift[k]) or x, W); per-channel batch mean and
//                                  biased variance of c
//   affine_relu:                   a = relu(x*scale[k] + shift[k])  (backward recomputes a conv's activated input)
//   conv_stats_backward_input:     dc' = dc + dmean[k]/n + dvar[k]*2(c - mean[k])/n  (n = values per channel)
//   affine_relu_backward:          g = da*[x*scale + shift > 0]; dx = g*scale, dscale = Σ g*x, dshift = Σ g
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
#include <torch/library.h>

#include <tuple>

#include "ops.h"
#include "train_ops.h"

namespace resnet_fused {

namespace {

void check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [N, C, H, W], got shape ", t.sizes());
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name, " must be float32/float64/float16/bfloat16, got ",
              t.scalar_type());
}

// `t` has the shape, dtype and device of activation `like` (called `like_name` in the message).
void check_same_activation(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                           const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " ", like.sizes(),
              ", got ", t.sizes());
  check_like(op, name, t, like, like_name);
}

// A per-channel statistic or parameter of bn_finalize: the shape, dtype and device of mean.
void check_like_mean(const char* op, const char* name, const at::Tensor& t, const at::Tensor& mean) {
  TORCH_CHECK(t.sizes() == mean.sizes(), op, ": ", name, " must have the shape of mean ", mean.sizes(), ", got ",
              t.sizes());
  check_like(op, name, t, mean, "mean");
}

}  // namespace

std::vector<int64_t> check_conv_stats(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift) {
  constexpr const char* op = "resnet_fused::conv_stats";
  std::vector<int64_t> out_sizes = check_conv(op, x, weight, stride, padding, dilation, groups);
  TORCH_CHECK(in_scale.has_value() == in_shift.has_value(), op, ": in_scale and in_shift must be given together");
  if (in_scale.has_value()) {
    check_channel_param(op, "in_scale", *in_scale, x, "x");
    check_channel_param(op, "in_shift", *in_shift, x, "x");
  }
  return out_sizes;
}

void check_affine_relu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  constexpr const char* op = "resnet_fused::affine_relu";
  check_activation(op, "x", x);
  check_channel_param(op, "scale", scale, x, "x");
  check_channel_param(op, "shift", shift, x, "x");
}

void check_affine_relu_backward(const at::Tensor& da, const at::Tensor& x, const at::Tensor& scale,
                                const at::Tensor& shift) {
  constexpr const char* op = "resnet_fused::affine_relu_backward";
  check_activation(op, "x", x);
  check_same_activation(op, "da", da, x, "x");
  check_channel_param(op, "scale", scale, x, "x");
  check_channel_param(op, "shift", shift, x, "x");
}

void check_conv_stats_backward_input(const at::Tensor& c, const at::Tensor& mean, const std::optional<at::Tensor>& dc,
                                     const std::optional<at::Tensor>& dmean, const std::optional<at::Tensor>& dvar) {
  constexpr const char* op = "resnet_fused::conv_stats_backward_input";
  check_activation(op, "c", c);
  check_channel_param(op, "mean", mean, c, "c");
  if (dc.has_value()) {
    check_same_activation(op, "dc", *dc, c, "c");
  }
  if (dmean.has_value()) {
    check_channel_param(op, "dmean", *dmean, c, "c");
  }
  if (dvar.has_value()) {
    check_channel_param(op, "dvar", *dvar, c, "c");
  }
}

void check_scale_bias_add_relu_backward(
    const at::Tensor& dout, const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& idn, const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift) {
  constexpr const char* op = "resnet_fused::scale_bias_add_relu_backward";
  check_scale_bias_add_relu(op, c, scale, shift, idn, idn_scale, idn_shift);
  check_same_activation(op, "dout", dout, c, "c");
}

void check_bn_finalize(const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                       const std::optional<at::Tensor>& running_var, double count) {
  constexpr const char* op = "resnet_fused::bn_finalize";
  TORCH_CHECK(mean.dim() == 1, op, ": mean must be 1-D [C], got shape ", mean.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, op,
              ": mean must be float32 or float64, got ", mean.scalar_type());
  check_like_mean(op, "var", var, mean);
  if (weight.has_value()) {
    check_like_mean(op, "weight", *weight, mean);
  }
  if (bias.has_value()) {
    check_like_mean(op, "bias", *bias, mean);
  }
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must be given together");
  if (running_mean.has_value()) {
    check_like_mean(op, "running_mean", *running_mean, mean);
    check_like_mean(op, "running_var", *running_var, mean);
    TORCH_CHECK(running_mean->is_contiguous() && running_var->is_contiguous(), op,
                ": running_mean and running_var must be contiguous (they are updated in place)");
    TORCH_CHECK(count > 1, op, ": count must be > 1 to update the running variance (unbiased), got ", count);
  }
}

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
    const std::optional<at::Tensor>& in_shift) {
  check_conv_stats(x, weight, stride, padding, dilation, groups, in_scale, in_shift);
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def(
      "conv_stats(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "Tensor? in_scale, Tensor? in_shift) -> (Tensor c, Tensor mean, Tensor var)",
      {at::Tag::pt2_compliant_tag});
  m.def("affine_relu(Tensor x, Tensor scale, Tensor shift) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("conv_stats_backward_input(Tensor c, Tensor mean, Tensor? dc, Tensor? dmean, Tensor? dvar) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "affine_relu_backward(Tensor da, Tensor x, Tensor scale, Tensor shift) "
      "-> (Tensor dx, Tensor dscale, Tensor dshift)",
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
  m.impl("scale_bias_add_relu_backward", &scale_bias_add_relu_backward_cpu);
  m.impl("bn_finalize", &bn_finalize_cpu);
}

}  // namespace resnet_fused
