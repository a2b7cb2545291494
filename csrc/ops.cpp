// resnet_fused ops: schemas (TORCH_LIBRARY), argument checks shared with the CUDA kernels, and the CPU
// implementations.
//
//   conv_bias_act:        y = act(conv2d(x, W) + bias[k] + conv2d_1x1(shortcut_x, W_s) + residual)
//   scale_bias_add_relu:  out = relu(c * scale[k] + shift[k] + (idn * idn_scale[k] + idn_shift[k]  |  idn))
//
// The first is a ResNet block's inference tail (BN folded into W / bias, identity or downsample shortcut
// added before the ReLU), the second its training tail (BN2 applied from batch statistics, plus the identity
// or the downsample branch's own BN). The CPU versions run at::convolution and then the epilogue in the op-math
// type (fp32 for fp32/fp16/bf16, fp64 for fp64) with one rounding to the output dtype, the same math as the fused
// CUDA kernels (which differ only by using fused multiply-adds).
// Autograd and fake (meta) kernels are registered from Python (resnet_fused/backends/cuda.py).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>

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
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = weight.size(0), R = weight.size(2), S = weight.size(3);
  TORCH_CHECK(weight.size(1) * groups == C, op, ": x has ", C, " channels but weight expects ", weight.size(1),
              " x groups (", groups, ") = ", weight.size(1) * groups);
  TORCH_CHECK(K % groups == 0, op, ": weight's output channels (", K, ") must be divisible by groups (", groups,
              ")");
  const int64_t P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) / stride[0] + 1;
  const int64_t Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(P >= 1 && Q >= 1, op, ": output would be empty (", P, "x", Q, ") for input ", H, "x", W,
              ", kernel ", R, "x", S, ", stride ", stride, ", padding ", padding, ", dilation ", dilation);
  return {N, K, P, Q};
}

std::vector<int64_t> check_conv_bias_act(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shortcut_x,
    const std::optional<at::Tensor>& shortcut_weight, at::IntArrayRef shortcut_stride) {
  constexpr const char* op = "resnet_fused::conv_bias_act";
  const std::vector<int64_t> out_sizes = check_conv(op, x, weight, stride, padding, dilation, groups);
  check_pair(op, "shortcut_stride", shortcut_stride, 1);
  const int64_t N = out_sizes[0], K = out_sizes[1], P = out_sizes[2], Q = out_sizes[3];

  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K, op, ": bias must be 1-D of size K = ", K, ", got shape ",
                bias->sizes());
    const at::ScalarType acc = at::toOpMathType(x.scalar_type());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() || bias->scalar_type() == acc, op,
                ": bias must have the dtype of x (", x.scalar_type(), ") or its accumulation dtype (", acc,
                "), got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias must be on the device of x (", x.device(), "), got ",
                bias->device());
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_sizes), op, ": residual must have the output shape ",
                at::IntArrayRef(out_sizes), ", got ", residual->sizes());
    check_like(op, "residual", *residual, x, "x");
  }
  TORCH_CHECK(shortcut_x.has_value() == shortcut_weight.has_value(), op,
              ": shortcut_x and shortcut_weight must be given together");
  if (shortcut_x.has_value()) {
    const at::Tensor& sx = *shortcut_x;
    const at::Tensor& sw = *shortcut_weight;
    TORCH_CHECK(sw.dim() == 4 && sw.size(0) == K && sw.size(2) == 1 && sw.size(3) == 1, op,
                ": shortcut_weight must be [K, Cs, 1, 1] with K = ", K, ", got shape ", sw.sizes());
    TORCH_CHECK(sx.dim() == 4, op, ": shortcut_x must be 4-D [N, Cs, Hs, Ws], got shape ", sx.sizes());
    TORCH_CHECK(sx.size(0) == N, op, ": shortcut_x batch (", sx.size(0), ") must equal x's (", N, ")");
    TORCH_CHECK(sx.size(1) == sw.size(1), op, ": shortcut_x has ", sx.size(1),
                " channels but shortcut_weight expects ", sw.size(1));
    const int64_t Ps = (sx.size(2) - 1) / shortcut_stride[0] + 1;
    const int64_t Qs = (sx.size(3) - 1) / shortcut_stride[1] + 1;
    TORCH_CHECK(Ps == P && Qs == Q, op, ": shortcut conv output is ", Ps, "x", Qs, " (input ", sx.size(2), "x",
                sx.size(3), ", stride ", shortcut_stride, ") but the main conv output is ", P, "x", Q);
    check_like(op, "shortcut_x", sx, x, "x");
    check_like(op, "shortcut_weight", sw, x, "x");
  }
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

ConvParts conv_parts(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& shortcut_x,
    const std::optional<at::Tensor>& shortcut_weight, at::IntArrayRef shortcut_stride, at::MemoryFormat mf) {
  ConvParts parts;
  parts.main = at::convolution(x, weight, std::nullopt, stride, padding, dilation, /*transposed=*/false,
                               /*output_padding=*/{0, 0}, groups)
                   .contiguous(mf);
  if (shortcut_x.has_value()) {
    parts.shortcut = at::convolution(*shortcut_x, *shortcut_weight, std::nullopt, shortcut_stride,
                                     /*padding=*/{0, 0}, /*dilation=*/{1, 1}, /*transposed=*/false,
                                     /*output_padding=*/{0, 0}, /*groups=*/1)
                         .contiguous(mf);
  }
  return parts;
}

at::Tensor channel_view(const at::Tensor& p, at::ScalarType acc) {
  return p.to(acc).view({1, -1, 1, 1});
}

namespace {

at::Tensor conv_bias_act_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& shortcut_x, const std::optional<at::Tensor>& shortcut_weight,
    at::IntArrayRef shortcut_stride, bool relu) {
  const auto out_sizes = check_conv_bias_act(x, weight, bias, stride, padding, dilation, groups, residual,
                                             shortcut_x, shortcut_weight, shortcut_stride);
  const at::MemoryFormat mf = x.suggest_memory_format();
  const ConvParts parts = conv_parts(x, weight, stride, padding, dilation, groups, shortcut_x, shortcut_weight,
                                     shortcut_stride, mf);
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  at::Tensor t = parts.main.to(acc);
  if (bias.has_value()) {
    t.add_(channel_view(*bias, acc));
  }
  if (parts.shortcut.defined()) {
    t.add_(parts.shortcut.to(acc));
  }
  if (residual.has_value()) {
    t.add_(residual->to(acc));
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
#ifdef RESNET_FUSED_WITH_CUDNN_FRONTEND
  info.cudnn_frontend = cudnn_frontend_version();
#endif
  return info;
}

TORCH_LIBRARY(resnet_fused, m) {
  m.def(
      "conv_bias_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, Tensor? residual, Tensor? shortcut_x, Tensor? shortcut_weight, int[2] shortcut_stride, "
      "bool relu) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "scale_bias_add_relu(Tensor c, Tensor scale, Tensor shift, Tensor idn, Tensor? idn_scale, "
      "Tensor? idn_shift) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_bias_act", &conv_bias_act_cpu);
  m.impl("scale_bias_add_relu", &scale_bias_add_relu_cpu);
}

}  // namespace resnet_fused
