// The output size of a convolution by PyTorch's rule, in plain C++ (c10's ArrayRef and TORCH_CHECK only) so that
// the argument checks (checks.cpp) and the CUTLASS units, which stay away from <ATen/ATen.h>, share it.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace resnet_fused {

// The output size [N, K, P, Q] of a convolution of x [N, C, H, W] with w [K, C/groups, R, S]:
// P = (H + 2·pad − dil·(R − 1) − 1) / stride + 1 for a window that fits the padded input, and PyTorch's error
// (TORCH_CHECK, prefixed by `op`) for one that does not; dividing that negative numerator with C++'s truncation
// toward zero would give P = 1 for strides >= 2.
inline std::vector<int64_t> conv_output_size(const char* op, c10::IntArrayRef x_sizes, c10::IntArrayRef w_sizes,
                                             c10::IntArrayRef stride, c10::IntArrayRef padding,
                                             c10::IntArrayRef dilation) {
  TORCH_CHECK(x_sizes.size() == 4 && w_sizes.size() == 4, op, ": x and weight must be 4-D, got ", x_sizes, " and ",
              w_sizes);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 elements");
  int64_t out[2];
  for (int d = 0; d < 2; ++d) {
    const int64_t padded = x_sizes[2 + d] + 2 * padding[d];
    const int64_t window = dilation[d] * (w_sizes[2 + d] - 1) + 1;
    TORCH_CHECK(padded >= window, op, ": Calculated padded input size per channel: (", x_sizes[2] + 2 * padding[0],
                " x ", x_sizes[3] + 2 * padding[1], "). Kernel size: (", dilation[0] * (w_sizes[2] - 1) + 1, " x ",
                dilation[1] * (w_sizes[3] - 1) + 1, "). Kernel size can't be greater than actual input size");
    out[d] = (padded - window) / stride[d] + 1;
  }
  return {x_sizes[0], w_sizes[0], out[0], out[1]};
}

}  // namespace resnet_fused
