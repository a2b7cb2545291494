// The cuDNN graph engine's slot in the CUDA ops (engine "cudnn", common/engine.h): an adapter from the ops'
// arguments to csrc/cudnn/'s graphs (cudnn_graph.h, built with the cuDNN frontend: RESNET_FUSED_WITH_CUDNN_FRONTEND).
// Plain C++ (cudnn_engine.cpp, compiled by the host compiler): the frontend's headers never reach nvcc.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "../common/conv_args.h"

namespace resnet_fused {
namespace cudnn_engine {

// Why the cudnn engine can run nothing in this process ("" when it may try: a graph can still be refused).
std::string unavailable();

// conv_bn_act on cuDNN graphs: y = act(conv(x, W)·s + t [+ residual]) as one graph; with a downsample shortcut,
// first its conv with (s_d, t_d) [+ residual] into a temporary in x's dtype, then the main graph adding it.
//   scale_shift  fp32 [n_bn, 2, K]: scale_shift[b][0] = s, scale_shift[b][1] = t of BN b (0: a.bn, 1: a.shortcut_bn)
//   out          the output, preallocated dense in x's memory format
// Returns "" when it ran, else cuDNN's reason for refusing (then nothing was written to out).
std::string conv_bn_act(const ConvBnActArgs& a, const at::Tensor& scale_shift, at::Tensor& out);

}  // namespace cudnn_engine
}  // namespace resnet_fused
