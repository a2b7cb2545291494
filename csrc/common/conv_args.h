// The arguments of resnet_fused::conv_bn_act as one value (ATen's Tensor only, so that light units such as the cuDNN
// engine's adapter need none of <ATen/ATen.h>); the checks and helpers over them are in checks.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>

namespace resnet_fused {

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

}  // namespace resnet_fused
