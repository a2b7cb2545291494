// The cuDNN graph engine's slot in the CUDA ops (engine "cudnn", common/engine.h): an adapter from the ops'
// arguments to csrc/cudnn/'s graphs (cudnn_graph.h, built with the cuDNN frontend: RESNET_FUSED_WITH_CUDNN_FRONTEND).
// Plain C++ (cudnn_engine.cpp, compiled by the host compiler): the frontend's headers never reach nvcc.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "../common/conv_args.h"

namespace resnet_fused {
namespace cudnn_engine {

// Why the cudnn engine can run nothing in this process ("" when it may try: a graph can still be refused).
std::string unavailable();

// Every op below checks all the cuDNN graphs it needs (cudnn_graph.h's plan_only: built, or refused — a refusal
// cuDNN calls "not supported" is cached, so a later call declines on a cache lookup) before it runs anything, and
// declines with cuDNN's reason, having launched nothing, when one has no engine. A planned graph that still fails to
// run (an operand's alignment, an out-of-memory) declines too; the work already done is then discarded.

// Why conv_bn_act cannot run this call ("" when both its graphs are built): its caller asks before computing the
// scale / shift the graphs take. out_sizes / mf: the output's.
std::string conv_bn_act_declines(const ConvBnActArgs& a, at::IntArrayRef out_sizes, at::MemoryFormat mf);

// conv_bn_act on cuDNN graphs: y = act(conv(x, W)·s + t [+ residual]) as one graph; with a downsample shortcut,
// first its conv with (s_d, t_d) [+ residual] into a temporary in x's dtype, then the main graph adding it.
//   scale_shift  fp32 [n_bn, 2, K]: scale_shift[b][0] = s, scale_shift[b][1] = t of BN b (0: a.bn, 1: a.shortcut_bn)
//   out          the output, preallocated dense in x's memory format
// Returns "" when it ran, else cuDNN's reason for refusing (then nothing was written to out).
std::string conv_bn_act(const ConvBnActArgs& a, const at::Tensor& scale_shift, at::Tensor& out);

// conv_stats on cuDNN graphs: c = conv(relu(x·in_scale + in_shift) or x, W) with Σc and Σc² per channel from the
// same graph (genstats, its outputs zeroed first), then the batch mean and biased variance by
// cudnn_graph::genstats_mean_var, which recomputes exactly every channel whose variance the fp32 sums cannot
// resolve (|mean| ≫ std): the variance is never worse than the other engines'. With in_scale, the BN+ReLU prologue
// is fused into the graph when cuDNN has an engine for that, else applied by one affine_relu pass before the graph
// without it. What cuDNN 9.19 / 9.24 have on Hopper (benchmarks/results/cudnn/): genstats only in fp16 NHWC, where
// a prologue with fp32 vectors has no engine (so fp16 runs the pass, then the graph); no genstats engine in bf16,
// fp32 or NCHW (those calls decline after one cached planning). The check costs one host synchronization, so the
// engine declines while the current stream is capturing a CUDA graph. out = (c, mean, var): c dense in `mf`,
// mean / var fp32 [K].
// Returns "" when it ran, else why not (nothing launched).
std::string conv_stats(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& in_scale,
                       const std::optional<at::Tensor>& in_shift, at::IntArrayRef out_sizes, at::MemoryFormat mf,
                       std::tuple<at::Tensor, at::Tensor, at::Tensor>& out);

// conv_stats_backward_conv (ops/train_ops.h) on cuDNN graphs: dW by the wgrad graph, and with a prologue the input
// side by the dgrad graph with the ReLU's mask [x·in_scale + in_shift > 0] applied to its output, then
// affine_relu_backward's pass for dx = g·in_scale, dscale = Σ g·x, dshift = Σ g; without one, dx is cuDNN's plain
// dgrad (at::convolution_backward: no ReLU to fuse). Each graph takes the prologue fused (recomputed on load) when
// cuDNN has an engine for that, else the activated input a = affine_relu(x), made once by one pass (cuDNN 9.19 /
// 9.24 on Hopper: dgrad + dReLU with the prologue has an engine in NHWC; wgrad with it has none, without it one
// for every ResNet conv; NCHW dgrad + dReLU none). out = (dx,
// dweight, dscale, dshift) as the op returns them. Returns "" when it ran, else why not (nothing launched).
std::string conv_stats_backward_conv(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, const std::optional<at::Tensor>& in_scale,
                                     const std::optional<at::Tensor>& in_shift, std::array<bool, 2> output_mask,
                                     std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>& out);

}  // namespace cudnn_engine
}  // namespace resnet_fused
