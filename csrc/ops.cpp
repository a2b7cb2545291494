// resnet_fused ops: schemas (TORCH_LIBRARY), argument checks shared with the CUDA kernels, and the CPU
// implementations.
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
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>

#include "build_info.h"
#include "ops.h"

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

std::vector<int64_t> conv_output_size(const char* op, at::IntArrayRef x_sizes, at::IntArrayRef w_sizes,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x_sizes.size() == 4 && w_sizes.size() == 4, op, ": x and weight must be 4-D, got ", x_sizes, " and ",
              w_sizes);
  int64_t out[2];
  for (int d = 0; d < 2; ++d) {
    // The padded input minus the dilated window: negative when the window does not fit (PyTorch's error; C++
    // division truncates toward zero, so dividing a negative span by a stride >= 2 would claim one output).
    const int64_t padded = x_sizes[2 + d] + 2 * padding[d];
    const int64_t window = dilation[d] * (w_sizes[2 + d] - 1) + 1;
    TORCH_CHECK(padded >= window, op, ": Calculated padded input size per channel: (",
                x_sizes[2] + 2 * padding[0], " x ", x_sizes[3] + 2 * padding[1], "). Kernel size: (",
                dilation[0] * (w_sizes[2] - 1) + 1, " x ", dilation[1] * (w_sizes[3] - 1) + 1,
                "). Kernel size can't be greater than actual input size");
    out[d] = (padded - window) / stride[d] + 1;
  }
  return {x_sizes[0], w_sizes[0], out[0], out[1]};
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

std::pair<at::Tensor, at::Tensor> eval_scale_shift(const EvalBn& bn, at::ScalarType acc) {
  const at::Tensor invstd = at::rsqrt(bn.var.to(acc) + bn.eps);
  const at::Tensor scale = bn.weight.defined() ? bn.weight.to(acc) * invstd : invstd;
  at::Tensor shift = -bn.mean.to(acc) * scale;
  if (bn.bias.defined()) {
    shift = shift + bn.bias.to(acc);
  }
  return {scale, shift};
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

at::Tensor conv_bn_act_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& bn_mean, const at::Tensor& bn_var, double bn_eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shortcut_x,
    const std::optional<at::Tensor>& shortcut_weight, const std::optional<at::Tensor>& shortcut_bn_weight,
    const std::optional<at::Tensor>& shortcut_bn_bias, const std::optional<at::Tensor>& shortcut_bn_mean,
    const std::optional<at::Tensor>& shortcut_bn_var, double shortcut_bn_eps, at::IntArrayRef shortcut_stride,
    bool relu) {
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

BuildInfo build_info() {
  BuildInfo info;
#ifdef RESNET_FUSED_WITH_CUDA
  info.with_cuda = true;
  info.cuda_runtime_version = cuda_runtime_version();
  info.cuda_archs = cuda_archs();
#else
  info.with_cuda = false;
  info.cuda_runtime_version = 0;
#endif
  info.torch_version = TORCH_VERSION;
#ifdef RESNET_FUSED_WITH_CUTLASS
  info.cutlass_version = cutlass_version();
#endif
  return info;
}

TORCH_LIBRARY(resnet_fused, m) {
  m.def(
      "conv_bn_act(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor bn_mean, Tensor bn_var, "
      "float bn_eps, int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor? residual, "
      "Tensor? shortcut_x, Tensor? shortcut_weight, Tensor? shortcut_bn_weight, Tensor? shortcut_bn_bias, "
      "Tensor? shortcut_bn_mean, Tensor? shortcut_bn_var, float shortcut_bn_eps, int[2] shortcut_stride, "
      "bool relu) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "scale_bias_add_relu(Tensor c, Tensor scale, Tensor shift, Tensor idn, Tensor? idn_scale, "
      "Tensor? idn_shift) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_bn_act", &conv_bn_act_cpu);
  m.impl("scale_bias_add_relu", &scale_bias_add_relu_cpu);
}

}  // namespace resnet_fused
