// Argument checks and layout helpers of every resnet_fused op (declared in checks.h), shared by the CPU and CUDA
// implementations.
#include "checks.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>

namespace resnet_fused {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 elements, got ", v);
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, op, ": ", name, " must be >= ", min_value, ", got ", v);
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, const char* x_name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of ", x_name, " (",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of ", x_name, " (", x.device(),
              "), got ", t.device());
}

void check_channel_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& t,
                         const char* t_name) {
  const int64_t C = t.size(1);
  TORCH_CHECK(p.dim() == 1 && p.size(0) == C, op, ": ", name, " must be 1-D of size C = ", C, ", got shape ",
              p.sizes());
  const bool ok = p.scalar_type() == at::kFloat || (t.scalar_type() == at::kDouble && p.scalar_type() == at::kDouble);
  TORCH_CHECK(ok, op, ": ", name, " must be float32 (or float64 with float64 ", t_name, "), got ", p.scalar_type());
  TORCH_CHECK(p.device() == t.device(), op, ": ", name, " must be on the device of ", t_name, " (", t.device(),
              "), got ", p.device());
}

std::vector<int64_t> check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D [K, C/groups, R, S], got shape ", weight.sizes());
  TORCH_CHECK(is_float_type(x.scalar_type()), op, ": x must be float32/float64/float16/bfloat16, got ",
              x.scalar_type());
  check_like(op, "weight", weight, x, "x");
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t C = x.size(1), K = weight.size(0);
  TORCH_CHECK(weight.size(1) * groups == C, op, ": x has ", C, " channels but weight expects ", weight.size(1),
              " x groups (", groups, ") = ", weight.size(1) * groups);
  TORCH_CHECK(K % groups == 0, op, ": weight's output channels (", K, ") must be divisible by groups (", groups,
              ")");
  return conv_output_size(op, x.sizes(), weight.sizes(), stride, padding, dilation);
}

EvalBn make_eval_bn(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, double eps) {
  EvalBn bn;
  bn.weight = weight.value_or(at::Tensor());
  bn.bias = bias.value_or(at::Tensor());
  bn.mean = mean.value_or(at::Tensor());
  bn.var = var.value_or(at::Tensor());
  bn.eps = eps;
  return bn;
}

namespace {

// The tensors of an eval BN of K channels: floating-point vectors of size K on x's device (any floating dtype: a
// half model's buffers are read as they are), weight and bias given together, eps >= 0.
void check_eval_bn(const char* op, const char* name, const EvalBn& bn, int64_t K, const at::Tensor& x) {
  TORCH_CHECK(bn.mean.defined() && bn.var.defined(), op, ": ", name, "_mean and ", name,
              "_var must be given together");
  TORCH_CHECK(bn.weight.defined() == bn.bias.defined(), op, ": ", name, "_weight and ", name,
              "_bias must be given together (affine) or both be None");
  const std::pair<const char*, const at::Tensor*> fields[] = {
      {"weight", &bn.weight}, {"bias", &bn.bias}, {"mean", &bn.mean}, {"var", &bn.var}};
  for (const auto& [field, t] : fields) {
    if (!t->defined()) {
      continue;
    }
    TORCH_CHECK(t->dim() == 1 && t->size(0) == K, op, ": ", name, "_", field, " must be 1-D of size K = ", K,
                ", got shape ", t->sizes());
    TORCH_CHECK(is_float_type(t->scalar_type()), op, ": ", name, "_", field,
                " must be float32/float64/float16/bfloat16, got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, "_", field, " must be on the device of x (", x.device(),
                "), got ", t->device());
  }
  TORCH_CHECK(bn.eps >= 0.0 && std::isfinite(bn.eps), op, ": ", name, "_eps must be finite and >= 0, got ", bn.eps);
}

}  // namespace

std::vector<int64_t> check_conv_bn_act(const ConvBnActArgs& a) {
  constexpr const char* op = "resnet_fused::conv_bn_act";
  const std::vector<int64_t> out_sizes = check_conv(op, a.x, a.weight, a.stride, a.padding, a.dilation, a.groups);
  check_pair(op, "shortcut_stride", a.shortcut_stride, 1);
  const int64_t N = out_sizes[0], K = out_sizes[1], P = out_sizes[2], Q = out_sizes[3];
  check_eval_bn(op, "bn", a.bn, K, a.x);

  if (a.residual.defined()) {
    TORCH_CHECK(a.residual.sizes() == at::IntArrayRef(out_sizes), op, ": residual must have the output shape ",
                at::IntArrayRef(out_sizes), ", got ", a.residual.sizes());
    check_like(op, "residual", a.residual, a.x, "x");
  }
  TORCH_CHECK(a.shortcut_x.defined() == a.shortcut_weight.defined(), op,
              ": shortcut_x and shortcut_weight must be given together");
  const EvalBn& sbn = a.shortcut_bn;
  if (!a.shortcut_x.defined()) {
    TORCH_CHECK(!sbn.weight.defined() && !sbn.bias.defined() && !sbn.mean.defined() && !sbn.var.defined(), op,
                ": shortcut_bn_* tensors were given without a shortcut (shortcut_x)");
    return out_sizes;
  }
  const at::Tensor& sx = a.shortcut_x;
  const at::Tensor& sw = a.shortcut_weight;
  TORCH_CHECK(sw.dim() == 4 && sw.size(0) == K && sw.size(2) == 1 && sw.size(3) == 1, op,
              ": shortcut_weight must be [K, Cs, 1, 1] with K = ", K, ", got shape ", sw.sizes());
  TORCH_CHECK(sx.dim() == 4, op, ": shortcut_x must be 4-D [N, Cs, Hs, Ws], got shape ", sx.sizes());
  TORCH_CHECK(sx.size(0) == N, op, ": shortcut_x batch (", sx.size(0), ") must equal x's (", N, ")");
  TORCH_CHECK(sx.size(1) == sw.size(1), op, ": shortcut_x has ", sx.size(1), " channels but shortcut_weight expects ",
              sw.size(1));
  check_like(op, "shortcut_x", sx, a.x, "x");
  check_like(op, "shortcut_weight", sw, a.x, "x");
  const std::array<int64_t, 2> no_padding{0, 0}, no_dilation{1, 1};
  const std::vector<int64_t> s_sizes =
      conv_output_size(op, sx.sizes(), sw.sizes(), a.shortcut_stride, no_padding, no_dilation);
  TORCH_CHECK(s_sizes[2] == P && s_sizes[3] == Q, op, ": shortcut conv output is ", s_sizes[2], "x", s_sizes[3],
              " (input ", sx.size(2), "x", sx.size(3), ", stride ", a.shortcut_stride,
              ") but the main conv output is ", P, "x", Q);
  check_eval_bn(op, "shortcut_bn", sbn, K, a.x);
  return out_sizes;
}

void check_scale_bias_add_relu(
    const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& idn,
    const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift) {
  check_scale_bias_add_relu("resnet_fused::scale_bias_add_relu", c, scale, shift, idn, idn_scale, idn_shift);
}

void check_scale_bias_add_relu(
    const char* op, const at::Tensor& c, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& idn,
    const std::optional<at::Tensor>& idn_scale, const std::optional<at::Tensor>& idn_shift) {
  TORCH_CHECK(c.dim() == 4, op, ": c must be 4-D [N, C, H, W], got shape ", c.sizes());
  TORCH_CHECK(is_float_type(c.scalar_type()), op, ": c must be float32/float64/float16/bfloat16, got ",
              c.scalar_type());
  TORCH_CHECK(idn.sizes() == c.sizes(), op, ": idn must have the shape of c ", c.sizes(), ", got ", idn.sizes());
  check_like(op, "idn", idn, c, "c");
  check_channel_param(op, "scale", scale, c, "c");
  check_channel_param(op, "shift", shift, c, "c");
  TORCH_CHECK(idn_scale.has_value() == idn_shift.has_value(), op,
              ": idn_scale and idn_shift must be given together");
  if (idn_scale.has_value()) {
    check_channel_param(op, "idn_scale", *idn_scale, c, "c");
    check_channel_param(op, "idn_shift", *idn_shift, c, "c");
  }
}

at::Tensor empty_in_format(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat mf) {
  return at::empty(sizes, options.memory_format(mf));
}

bool has_format_strides(const at::Tensor& t, at::MemoryFormat mf) {
  if (mf == at::MemoryFormat::ChannelsLast) {
    return t.strides() == at::IntArrayRef(c10::get_channels_last_strides_2d(t.sizes()));
  }
  std::vector<int64_t> strides(t.dim());
  int64_t s = 1;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    strides[d] = s;
    s *= std::max<int64_t>(t.size(d), 1);
  }
  return t.strides() == at::IntArrayRef(strides);
}

at::Tensor with_format_strides(const at::Tensor& t, at::MemoryFormat mf) {
  if (has_format_strides(t, mf)) {
    return t;
  }
  at::Tensor out = empty_in_format(t.sizes(), t.options(), mf);
  out.copy_(t);
  return out;
}

ConvParts conv_parts(const ConvBnActArgs& a, at::MemoryFormat mf) {
  ConvParts parts;
  parts.main = at::convolution(a.x, a.weight, std::nullopt, a.stride, a.padding, a.dilation, /*transposed=*/false,
                               /*output_padding=*/{0, 0}, a.groups)
                   .contiguous(mf);
  if (a.shortcut_x.defined()) {
    parts.shortcut = at::convolution(a.shortcut_x, a.shortcut_weight, std::nullopt, a.shortcut_stride,
                                     /*padding=*/{0, 0}, /*dilation=*/{1, 1}, /*transposed=*/false,
                                     /*output_padding=*/{0, 0}, /*groups=*/1)
                         .contiguous(mf);
  }
  return parts;
}

at::Tensor channel_view(const at::Tensor& p, at::ScalarType acc) {
  return p.to(acc).view({1, -1, 1, 1});
}

ConvBnActArgs conv_bn_act_args(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& bn_mean, const at::Tensor& bn_var, double bn_eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shortcut_x,
    const std::optional<at::Tensor>& shortcut_weight, const std::optional<at::Tensor>& shortcut_bn_weight,
    const std::optional<at::Tensor>& shortcut_bn_bias, const std::optional<at::Tensor>& shortcut_bn_mean,
    const std::optional<at::Tensor>& shortcut_bn_var, double shortcut_bn_eps, at::IntArrayRef shortcut_stride,
    bool relu) {
  ConvBnActArgs a;
  a.x = x;
  a.weight = weight;
  a.bn = make_eval_bn(bn_weight, bn_bias, bn_mean, bn_var, bn_eps);
  a.stride = stride;
  a.padding = padding;
  a.dilation = dilation;
  a.groups = groups;
  a.residual = residual.value_or(at::Tensor());
  a.shortcut_x = shortcut_x.value_or(at::Tensor());
  a.shortcut_weight = shortcut_weight.value_or(at::Tensor());
  a.shortcut_bn = make_eval_bn(shortcut_bn_weight, shortcut_bn_bias, shortcut_bn_mean, shortcut_bn_var,
                               shortcut_bn_eps);
  a.shortcut_stride = shortcut_stride;
  a.relu = relu;
  return a;
}


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

namespace {

// The conv and prologue arguments of conv_stats and of its backward.
std::vector<int64_t> check_prologue_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups, const std::optional<at::Tensor>& in_scale,
                                         const std::optional<at::Tensor>& in_shift) {
  std::vector<int64_t> out_sizes = check_conv(op, x, weight, stride, padding, dilation, groups);
  TORCH_CHECK(in_scale.has_value() == in_shift.has_value(), op, ": in_scale and in_shift must be given together");
  if (in_scale.has_value()) {
    check_channel_param(op, "in_scale", *in_scale, x, "x");
    check_channel_param(op, "in_shift", *in_shift, x, "x");
  }
  return out_sizes;
}

}  // namespace

std::vector<int64_t> check_conv_stats(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift) {
  return check_prologue_conv("resnet_fused::conv_stats", x, weight, stride, padding, dilation, groups, in_scale,
                             in_shift);
}

std::vector<int64_t> check_conv_stats_backward_conv(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift) {
  constexpr const char* op = "resnet_fused::conv_stats_backward_conv";
  std::vector<int64_t> out_sizes =
      check_prologue_conv(op, x, weight, stride, padding, dilation, groups, in_scale, in_shift);
  TORCH_CHECK(g.sizes() == at::IntArrayRef(out_sizes), op, ": g must have the conv's output shape ",
              at::IntArrayRef(out_sizes), ", got ", g.sizes());
  check_like(op, "g", g, x, "x");
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

}  // namespace resnet_fused
