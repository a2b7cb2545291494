// ATen side of the cuDNN graph engine (cudnn_graph.h): argument checks, the tensors of each call described as a
// GraphSpec (graph_spec.h) with one pointer per tensor role, and the device, cuDNN handle, stream and workspace the
// graph runs with; graphs.cpp builds, caches and executes the graphs. Also the statistics' exact route
// (genstats_mean_var) and the `resnet_fused_cudnn` torch library: hooks that let tests build and validate every
// graph from shapes alone (meta tensors, no GPU) and call each graph on CUDA tensors.
#include "cudnn_graph.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "../common/build_info.h"
#include "../common/checks.h"
#include "graph_spec.h"

namespace resnet_fused {

std::string cudnn_frontend_version() { return cudnn_graph::version(); }

namespace cudnn_graph {

namespace {

using detail::DType;
using detail::GraphSpec;
using detail::Kind;
using detail::kNumRoles;

// kValidate: the tensors are meta tensors; the graph is built and validated (validate() + lowering to a cuDNN
// operation graph, no device), not planned or run. kPlan: the graph is found or built with its plans on the tensors'
// device and their pointers checked, not run (an op checks every graph it needs before running any).
enum class Mode { kExecute, kValidate, kPlan };

Mode mode_of(bool plan_only) { return plan_only ? Mode::kPlan : Mode::kExecute; }

// Whether a CUDA graph capture is underway that a graph build, plan build or autotuning on `stream` could join or
// break: `stream` capturing, or — what the legacy stream's status shows — a capture on any blocking stream of the
// device. (Captures on other non-blocking streams are invisible to the runtime's queries; the build touches no
// stream but the handle's.)
bool capture_underway(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;  // cannot tell: assume so
  }
  if (status != cudaStreamCaptureStatusNone) return true;
  const cudaError_t legacy = cudaStreamIsCapturing(cudaStreamLegacy, &status);
  if (legacy != cudaSuccess) {
    (void)cudaGetLastError();  // cudaErrorStreamCaptureImplicit: a blocking stream is capturing
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

std::optional<DType> engine_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat;
    default:
      return std::nullopt;
  }
}

bool autotune_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("RESNET_FUSED_CUDNN_AUTOTUNE");
    return env != nullptr && std::string_view(env) == "1";
  }();
  return on;
}

// `p` is a per-channel vector of `c` channels for the tensor `like`: 1-D [c] on its device, fp32 (or like's dtype
// when `io_ok`).
void check_vector(const char* op, const char* name, const at::Tensor& p, int64_t c, const at::Tensor& like,
                  bool io_ok) {
  TORCH_CHECK(p.defined(), op, ": ", name, " is required");
  TORCH_CHECK(p.dim() == 1 && p.size(0) == c, op, ": ", name, " must be 1-D of size ", c, ", got shape ", p.sizes());
  TORCH_CHECK(p.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", p.device());
  const bool ok = p.scalar_type() == at::kFloat || (io_ok && p.scalar_type() == like.scalar_type());
  TORCH_CHECK(ok, op, ": ", name, " must be float32", io_ok ? " (or the activations' dtype)" : "", ", got ",
              p.scalar_type());
}

// `t` has the given shape and like's dtype and device.
void check_tensor(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes, const at::Tensor& like,
                  const char* like_name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is required");
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
  check_like(op, name, t, like, like_name);
}

// in_scale / in_shift: both defined (the BN + ReLU prologue) or neither.
bool check_prologue(const char* op, const at::Tensor& in_scale, const at::Tensor& in_shift, const at::Tensor& x) {
  TORCH_CHECK(in_scale.defined() == in_shift.defined(), op, ": in_scale and in_shift must be given together");
  if (!in_scale.defined()) return false;
  check_vector(op, "in_scale", in_scale, x.size(1), x, true);
  check_vector(op, "in_shift", in_shift, x.size(1), x, true);
  return true;
}

// One engine call being assembled: the spec, the pointers, and the first reason the engine cannot take it.
class Call {
 public:
  Call(Kind kind, const at::Tensor& x, Mode mode) : mode_(mode), device_(x.device()) {
    spec_.kind = kind;
    const std::optional<DType> io = engine_dtype(x.scalar_type());
    if (!io.has_value()) {
      refuse(std::string("dtype ") + c10::toString(x.scalar_type()) +
             " is not supported by the cuDNN fusion engines (float16, bfloat16, float32 with TF32)");
    } else {
      spec_.io = *io;
    }
    if (mode_ != Mode::kValidate && !x.is_cuda()) {
      refuse("the cuDNN graph engine runs on CUDA tensors, got " + x.device().str());
    }
  }

  void conv(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
    spec_.stride = {stride[0], stride[1]};
    spec_.padding = {padding[0], padding[1]};
    spec_.dilation = {dilation[0], dilation[1]};
  }

  void relu(bool on) { spec_.relu = on; }

  // A 4-D activation, weight or gradient tensor of `role` (checked by the op).
  void tensor(int role, const at::Tensor& t) {
    const std::optional<DType> dtype = engine_dtype(t.scalar_type());
    if (!dtype.has_value()) return;  // x's dtype, refused in the constructor
    if (t.numel() == 0) return refuse(std::string("tensor ") + detail::role_name(role) + " is empty");
    if (!t.is_non_overlapping_and_dense()) {
      return refuse(std::string("tensor ") + detail::role_name(role) + " is not dense (strides " +
                    c10::str(t.strides()) + ")");
    }
    spec_.set(role, *dtype, {t.size(0), t.size(1), t.size(2), t.size(3)},
              {t.stride(0), t.stride(1), t.stride(2), t.stride(3)});
    bind(role, t);
  }

  // A per-channel vector of `role` (checked by check_vector); inputs are made contiguous, outputs must be.
  void vector(int role, const at::Tensor& p, bool write) {
    const std::optional<DType> dtype = engine_dtype(p.scalar_type());
    if (!dtype.has_value()) return;  // x's dtype, refused in the constructor
    at::Tensor v = p;
    const int64_t c = v.size(0);
    if (!v.is_contiguous()) {
      if (write) return refuse(std::string("output ") + detail::role_name(role) + " is not contiguous");
      if (mode_ == Mode::kPlan) return spec_.set(role, *dtype, {1, c, 1, 1}, {c, 1, c, c});  // copied when run
      v = keep_.emplace_back(p.contiguous());
    }
    spec_.set(role, *dtype, {1, c, 1, 1}, {c, 1, c, c});
    bind(role, v);
  }

  Result run() {
    if (!refusal_.empty()) return {false, refusal_};
    if (mode_ == Mode::kValidate) {
      const detail::Status status = detail::validate(spec_);
      return {status.ok, status.ok ? "" : status.reason + " [" + spec_.describe() + "]"};
    }
    at::Context& ctx = at::globalContext();
    if (!ctx.userEnabledCuDNN()) return {false, "torch.backends.cudnn.enabled is False"};
    spec_.allow_tf32 = ctx.allowTF32CuDNN();
    spec_.deterministic = ctx.deterministicCuDNN() || ctx.deterministicAlgorithms();
    if (spec_.io == DType::kFloat && !spec_.allow_tf32) {
      return {false, "float32 runs on the cuDNN fusion engines only as TF32, which torch.backends.cudnn.allow_tf32 "
                     "forbids"};
    }
    c10::cuda::CUDAGuard guard(device_);
    spec_.device = device_.index();
    cudnnHandle_t handle = at::native::getCudnnHandle();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device_.index()).stream();
    const cudnnStatus_t status = cudnnSetStream(handle, stream);
    if (status != CUDNN_STATUS_SUCCESS) return {false, std::string("cudnnSetStream: ") + cudnnGetErrorString(status)};
    const bool may_build = !capture_underway(stream);
    if (mode_ == Mode::kPlan) {
      const detail::Status result = detail::prepare(spec_, handle, autotune_enabled(), may_build);
      return {result.ok, result.reason};
    }
    std::vector<c10::DataPtr> workspaces;  // freed after the graph is enqueued: stream-ordered reuse is safe
    auto workspace = [&workspaces](int64_t bytes) {
      workspaces.push_back(c10::cuda::CUDACachingAllocator::get()->allocate(static_cast<size_t>(bytes)));
      return workspaces.back().get();
    };
    const detail::Status result = detail::execute(spec_, handle, ptrs_, workspace, autotune_enabled(), may_build);
    return {result.ok, result.reason};
  }

 private:
  void refuse(std::string reason) {
    if (refusal_.empty()) refusal_ = std::move(reason);
  }

  void bind(int role, const at::Tensor& t) {
    if (mode_ == Mode::kValidate) return;
    void* ptr = t.data_ptr();
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
      return refuse(std::string("tensor ") + detail::role_name(role) + " is not 16-byte aligned");
    }
    const auto begin = reinterpret_cast<uintptr_t>(ptr);
    const auto end = begin + static_cast<uintptr_t>(t.numel() * t.element_size());
    const bool write = is_output(role);
    for (const Span& other : spans_) {
      if ((write || other.write) && begin < other.end && other.begin < end) {
        return refuse(std::string("tensor ") + detail::role_name(role) + " overlaps " +
                      detail::role_name(other.role) + " (a graph output may not alias another operand)");
      }
    }
    spans_.push_back({role, begin, end, write});
    ptrs_[role] = ptr;
  }

  static bool is_output(int role) {
    switch (role) {
      case detail::Y:
      case detail::SUM:
      case detail::SQ_SUM:
      case detail::DX:
      case detail::DW:
      case detail::DGAMMA:
      case detail::DBETA:
      case detail::EQ_SCALE_DY:
      case detail::EQ_SCALE_X:
      case detail::EQ_BIAS:
        return true;
      default:
        return false;
    }
  }

  struct Span {
    int role;
    uintptr_t begin, end;  // the bytes [begin, end) the tensor's elements span (dense tensors)
    bool write;
  };

  Mode mode_;
  at::Device device_;
  GraphSpec spec_;
  std::array<void*, kNumRoles> ptrs_{};
  std::vector<at::Tensor> keep_;  // contiguous copies of input vectors, alive until the graph is enqueued
  std::vector<Span> spans_;       // memory of the tensors bound so far
  std::string refusal_;
};

Result conv_scale_bias_act_impl(Mode mode, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                                const at::Tensor& shift, const at::Tensor& residual, const at::Tensor& y,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, bool relu) {
  constexpr const char* op = "cudnn_graph::conv_scale_bias_act";
  const std::vector<int64_t> out = check_conv(op, x, w, stride, padding, dilation, groups);
  check_vector(op, "scale", scale, out[1], x, true);
  check_vector(op, "shift", shift, out[1], x, true);
  if (residual.defined()) check_tensor(op, "residual", residual, out, x, "x");
  check_tensor(op, "y", y, out, x, "x");
  Call call(Kind::kConvScaleBiasAct, x, mode);
  call.conv(stride, padding, dilation);
  call.relu(relu);
  call.tensor(detail::X, x);
  call.tensor(detail::W, w);
  call.vector(detail::SCALE, scale, false);
  call.vector(detail::SHIFT, shift, false);
  if (residual.defined()) call.tensor(detail::RESIDUAL, residual);
  call.tensor(detail::Y, y);
  return call.run();
}

Result conv_genstats_impl(Mode mode, const at::Tensor& x, const at::Tensor& w, const at::Tensor& in_scale,
                          const at::Tensor& in_shift, const at::Tensor& c, const at::Tensor& sum,
                          const at::Tensor& sq_sum, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "cudnn_graph::conv_genstats";
  const std::vector<int64_t> out = check_conv(op, x, w, stride, padding, dilation, groups);
  const bool prologue = check_prologue(op, in_scale, in_shift, x);
  check_tensor(op, "c", c, out, x, "x");
  check_vector(op, "sum", sum, out[1], x, false);
  check_vector(op, "sq_sum", sq_sum, out[1], x, false);
  Call call(Kind::kConvGenstats, x, mode);
  call.conv(stride, padding, dilation);
  call.tensor(detail::X, x);
  call.tensor(detail::W, w);
  if (prologue) {
    call.vector(detail::SCALE, in_scale, false);
    call.vector(detail::SHIFT, in_shift, false);
  }
  call.tensor(detail::Y, c);
  call.vector(detail::SUM, sum, true);
  call.vector(detail::SQ_SUM, sq_sum, true);
  return call.run();
}

Result conv_dgrad_drelu_impl(Mode mode, const at::Tensor& dy, const at::Tensor& w, const at::Tensor& x,
                             const at::Tensor& in_scale, const at::Tensor& in_shift, const at::Tensor& dx,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             int64_t groups) {
  constexpr const char* op = "cudnn_graph::conv_dgrad_drelu";
  const std::vector<int64_t> out = check_conv(op, x, w, stride, padding, dilation, groups);
  const bool prologue = check_prologue(op, in_scale, in_shift, x);
  check_tensor(op, "dy", dy, out, x, "x");
  check_tensor(op, "dx", dx, x.sizes(), x, "x");
  Call call(Kind::kDgradDrelu, x, mode);
  call.conv(stride, padding, dilation);
  call.tensor(detail::DY, dy);
  call.tensor(detail::W, w);
  call.tensor(detail::X, x);
  if (prologue) {
    call.vector(detail::SCALE, in_scale, false);
    call.vector(detail::SHIFT, in_shift, false);
  }
  call.tensor(detail::DX, dx);
  return call.run();
}

Result conv_dgrad_drelu_bn_impl(Mode mode, const at::Tensor& dy, const at::Tensor& w, const at::Tensor& x,
                                const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                                const at::Tensor& beta, const at::Tensor& g, const at::Tensor& dgamma,
                                const at::Tensor& dbeta, const at::Tensor& eq_scale_dy, const at::Tensor& eq_scale_x,
                                const at::Tensor& eq_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "cudnn_graph::conv_dgrad_drelu_bn";
  const std::vector<int64_t> out = check_conv(op, x, w, stride, padding, dilation, groups);
  const int64_t c = x.size(1);
  check_tensor(op, "dy", dy, out, x, "x");
  check_tensor(op, "g", g, x.sizes(), x, "x");
  const std::pair<const char*, const at::Tensor*> vectors[] = {
      {"mean", &mean},   {"invstd", &invstd},           {"gamma", &gamma},           {"beta", &beta},
      {"dgamma", &dgamma}, {"dbeta", &dbeta},           {"eq_scale_dy", &eq_scale_dy}, {"eq_scale_x", &eq_scale_x},
      {"eq_bias", &eq_bias}};
  for (const auto& [name, t] : vectors) check_vector(op, name, *t, c, x, false);
  Call call(Kind::kDgradDreluDbn, x, mode);
  call.conv(stride, padding, dilation);
  call.tensor(detail::DY, dy);
  call.tensor(detail::W, w);
  call.tensor(detail::X, x);
  call.vector(detail::MEAN, mean, false);
  call.vector(detail::INV_STD, invstd, false);
  call.vector(detail::GAMMA, gamma, false);
  call.vector(detail::BETA, beta, false);
  call.tensor(detail::DX, g);
  call.vector(detail::DGAMMA, dgamma, true);
  call.vector(detail::DBETA, dbeta, true);
  call.vector(detail::EQ_SCALE_DY, eq_scale_dy, true);
  call.vector(detail::EQ_SCALE_X, eq_scale_x, true);
  call.vector(detail::EQ_BIAS, eq_bias, true);
  return call.run();
}

Result conv_wgrad_impl(Mode mode, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& in_scale,
                       const at::Tensor& in_shift, const at::Tensor& dw, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "cudnn_graph::conv_wgrad";
  const std::vector<int64_t> out = check_conv(op, x, dw, stride, padding, dilation, groups);
  const bool prologue = check_prologue(op, in_scale, in_shift, x);
  check_tensor(op, "dy", dy, out, x, "x");
  Call call(Kind::kWgrad, x, mode);
  call.conv(stride, padding, dilation);
  call.tensor(detail::DY, dy);
  call.tensor(detail::X, x);
  if (prologue) {
    call.vector(detail::SCALE, in_scale, false);
    call.vector(detail::SHIFT, in_shift, false);
  }
  call.tensor(detail::DW, dw);
  return call.run();
}

}  // namespace

bool available() {
  if (!at::cuda::is_available() || !at::globalContext().userEnabledCuDNN()) return false;
  try {
    return at::native::getCudnnHandle() != nullptr;
  } catch (const std::exception&) {
    return false;
  }
}

std::string version() { return detail::version(); }

Result conv_scale_bias_act(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& residual, at::Tensor& y, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, bool relu, bool plan_only) {
  return conv_scale_bias_act_impl(mode_of(plan_only), x, w, scale, shift, residual, y, stride, padding, dilation,
                                  groups, relu);
}

Result conv_genstats(const at::Tensor& x, const at::Tensor& w, const at::Tensor& in_scale, const at::Tensor& in_shift,
                     at::Tensor& c, at::Tensor& sum, at::Tensor& sq_sum, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool plan_only) {
  return conv_genstats_impl(mode_of(plan_only), x, w, in_scale, in_shift, c, sum, sq_sum, stride, padding, dilation,
                            groups);
}

Result conv_dgrad_drelu(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& x, const at::Tensor& in_scale,
                        const at::Tensor& in_shift, at::Tensor& dx, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool plan_only) {
  return conv_dgrad_drelu_impl(mode_of(plan_only), dy, w, x, in_scale, in_shift, dx, stride, padding, dilation, groups);
}

Result conv_dgrad_drelu_bn(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& g,
                           at::Tensor& dgamma, at::Tensor& dbeta, at::Tensor& eq_scale_dy, at::Tensor& eq_scale_x,
                           at::Tensor& eq_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, bool plan_only) {
  return conv_dgrad_drelu_bn_impl(mode_of(plan_only), dy, w, x, mean, invstd, gamma, beta, g, dgamma, dbeta,
                                  eq_scale_dy, eq_scale_x, eq_bias, stride, padding, dilation, groups);
}

Result conv_wgrad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& in_scale, const at::Tensor& in_shift,
                  at::Tensor& dw, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t groups, bool plan_only) {
  return conv_wgrad_impl(mode_of(plan_only), dy, x, in_scale, in_shift, dw, stride, padding, dilation, groups);
}

at::Tensor ill_conditioned_channels(const at::Tensor& sum, const at::Tensor& sq_sum, int64_t count, double tau) {
  constexpr const char* op = "cudnn_graph::ill_conditioned_channels";
  TORCH_CHECK(sum.dim() == 1, op, ": sum must be 1-D, got shape ", sum.sizes());
  check_tensor(op, "sq_sum", sq_sum, sum.sizes(), sum, "sum");
  TORCH_CHECK(count > 0, op, ": count must be positive, got ", count);
  TORCH_CHECK(tau > 0 && tau < 1, op, ": tau must be in (0, 1), got ", tau);
  const at::Tensor m = sum.to(at::kDouble) / static_cast<double>(count);
  const at::Tensor q = sq_sum.to(at::kDouble) / static_cast<double>(count);
  return (q - m * m) < q * tau;
}

int64_t genstats_mean_var(const at::Tensor& c, const at::Tensor& sum, const at::Tensor& sq_sum, at::Tensor& mean,
                          at::Tensor& var, double tau) {
  constexpr const char* op = "cudnn_graph::genstats_mean_var";
  TORCH_CHECK(c.dim() == 4, op, ": c must be 4-D [N, K, P, Q], got shape ", c.sizes());
  const int64_t k = c.size(1);
  const int64_t count = k > 0 ? c.numel() / k : 0;
  check_vector(op, "sum", sum, k, c, false);
  check_vector(op, "sq_sum", sq_sum, k, c, false);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean}, {"var", &var}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == k, op, ": ", name, " must be 1-D of size ", k, ", got ", t->sizes());
    TORCH_CHECK(t->device() == c.device() && at::isFloatingType(t->scalar_type()), op, ": ", name,
                " must be a floating tensor on ", c.device());
  }
  TORCH_CHECK(count > 0, op, ": c has no values per channel");
  at::Tensor m = sum.to(at::kDouble) / static_cast<double>(count);
  at::Tensor v = sq_sum.to(at::kDouble) / static_cast<double>(count) - m * m;
  const at::Tensor bad = ill_conditioned_channels(sum, sq_sum, count, tau).nonzero().view({-1});  // host sync
  const int64_t n_bad = bad.numel();
  if (n_bad > 0) {
    const at::Tensor cb = c.index_select(1, bad).to(at::kDouble);
    const at::Tensor mb = cb.mean({0, 2, 3});
    const at::Tensor vb = (cb - mb.view({1, -1, 1, 1})).square().mean({0, 2, 3});
    m.index_copy_(0, bad, mb);
    v.index_copy_(0, bad, vb);
  }
  mean.copy_(m);
  var.copy_(v);
  return n_bad;
}

namespace {

// ---- the resnet_fused_cudnn torch library: test and debug hooks ----

using HookResult = std::tuple<bool, std::string>;

HookResult hook(const Result& r) { return {r.ok, r.reason}; }

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// validate(kind, x_shape, w_shape, dtype, ...): the graph `kind` would build for tensors of these shapes (activations
// and weights channels_last, or contiguous; per-channel vectors in vec_dtype, fp32 by default for the ones that
// accept another dtype) is built and validated without a GPU. kind: conv_scale_bias_act, conv_genstats,
// conv_dgrad_drelu, conv_dgrad_drelu_bn, conv_wgrad.
HookResult validate_hook(std::string_view kind, at::IntArrayRef x_shape, at::IntArrayRef w_shape, at::ScalarType dtype,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         bool prologue, bool residual, bool relu, bool channels_last,
                         std::optional<at::ScalarType> vec_dtype) {
  const at::TensorOptions meta = at::TensorOptions().device(at::kMeta).dtype(dtype);
  const at::MemoryFormat mf = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(x_shape.size() == 4 && w_shape.size() == 4, "resnet_fused_cudnn::validate: x_shape and w_shape must "
              "have 4 elements, got ", x_shape, " and ", w_shape);
  const at::Tensor x = at::empty(x_shape, meta, mf);
  const at::Tensor w = at::empty(w_shape, meta, mf);
  const std::vector<int64_t> out = check_conv("resnet_fused_cudnn::validate", x, w, stride, padding, dilation, groups);
  const int64_t c = x_shape[1], k = out[1];
  auto act = [&](at::IntArrayRef sizes) { return at::empty(sizes, meta, mf); };
  auto vec = [&](int64_t n, bool io_ok) {
    return at::empty({n}, meta.dtype(io_ok ? vec_dtype.value_or(at::kFloat) : at::kFloat));
  };
  const at::Tensor in_scale = prologue ? vec(c, true) : at::Tensor();
  const at::Tensor in_shift = prologue ? vec(c, true) : at::Tensor();
  if (kind == "conv_scale_bias_act") {
    return hook(conv_scale_bias_act_impl(Mode::kValidate, x, w, vec(k, true), vec(k, true),
                                         residual ? act(out) : at::Tensor(), act(out), stride, padding, dilation,
                                         groups, relu));
  }
  if (kind == "conv_genstats") {
    return hook(conv_genstats_impl(Mode::kValidate, x, w, in_scale, in_shift, act(out), vec(k, false), vec(k, false),
                                   stride, padding, dilation, groups));
  }
  if (kind == "conv_dgrad_drelu") {
    return hook(conv_dgrad_drelu_impl(Mode::kValidate, act(out), w, x, in_scale, in_shift, act(x_shape), stride,
                                      padding, dilation, groups));
  }
  if (kind == "conv_dgrad_drelu_bn") {
    return hook(conv_dgrad_drelu_bn_impl(Mode::kValidate, act(out), w, x, vec(c, false), vec(c, false), vec(c, false),
                                         vec(c, false), act(x_shape), vec(c, false), vec(c, false), vec(c, false),
                                         vec(c, false), vec(c, false), stride, padding, dilation, groups));
  }
  if (kind == "conv_wgrad") {
    return hook(conv_wgrad_impl(Mode::kValidate, act(out), x, in_scale, in_shift, act(w_shape), stride, padding,
                                dilation, groups));
  }
  TORCH_CHECK(false, "resnet_fused_cudnn::validate: unknown graph kind '", kind, "' (conv_scale_bias_act, "
              "conv_genstats, conv_dgrad_drelu, conv_dgrad_drelu_bn, conv_wgrad)");
  return {false, ""};
}

HookResult conv_scale_bias_act_hook(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                                    const at::Tensor& shift, const std::optional<at::Tensor>& residual, at::Tensor& y,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, bool relu) {
  return hook(conv_scale_bias_act(x, w, scale, shift, opt(residual), y, stride, padding, dilation, groups, relu));
}

HookResult conv_genstats_hook(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& in_scale,
                              const std::optional<at::Tensor>& in_shift, at::Tensor& c, at::Tensor& sum,
                              at::Tensor& sq_sum, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups) {
  return hook(conv_genstats(x, w, opt(in_scale), opt(in_shift), c, sum, sq_sum, stride, padding, dilation, groups));
}

HookResult conv_dgrad_drelu_hook(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& x,
                                 const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
                                 at::Tensor& dx, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  return hook(conv_dgrad_drelu(dy, w, x, opt(in_scale), opt(in_shift), dx, stride, padding, dilation, groups));
}

HookResult conv_dgrad_drelu_bn_hook(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& x,
                                    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma,
                                    const at::Tensor& beta, at::Tensor& g, at::Tensor& dgamma, at::Tensor& dbeta,
                                    at::Tensor& eq_scale_dy, at::Tensor& eq_scale_x, at::Tensor& eq_bias,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups) {
  return hook(conv_dgrad_drelu_bn(dy, w, x, mean, invstd, gamma, beta, g, dgamma, dbeta, eq_scale_dy, eq_scale_x,
                                  eq_bias, stride, padding, dilation, groups));
}

HookResult conv_wgrad_hook(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& in_scale,
                           const std::optional<at::Tensor>& in_shift, at::Tensor& dw, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return hook(conv_wgrad(dy, x, opt(in_scale), opt(in_shift), dw, stride, padding, dilation, groups));
}

int64_t genstats_mean_var_hook(const at::Tensor& c, const at::Tensor& sum, const at::Tensor& sq_sum, at::Tensor& mean,
                               at::Tensor& var, double tau) {
  return genstats_mean_var(c, sum, sq_sum, mean, var, tau);
}

}  // namespace

// Not pt2-tagged and without fake kernels: these are hooks for tests and debugging, called eagerly; the fused ops
// that use the engine are resnet_fused's own.
TORCH_LIBRARY(resnet_fused_cudnn, m) {
  m.def("available() -> bool", &available);
  m.def("version() -> str", &version);
  m.def("cache_size() -> int", &detail::cache_size);
  m.def("cache_capacity() -> int", &detail::cache_capacity);
  m.def("cache_clear() -> ()", &detail::cache_clear);
  m.def(
      "validate(str kind, int[] x_shape, int[] w_shape, ScalarType dtype, int[2] stride=[1, 1], "
      "int[2] padding=[0, 0], int[2] dilation=[1, 1], int groups=1, bool prologue=False, bool residual=False, "
      "bool relu=True, bool channels_last=True, ScalarType? vec_dtype=None) -> (bool, str)",
      &validate_hook);
  m.def(
      "conv_scale_bias_act(Tensor x, Tensor w, Tensor scale, Tensor shift, Tensor? residual, Tensor(a!) y, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> (bool, str)",
      &conv_scale_bias_act_hook);
  m.def(
      "conv_genstats(Tensor x, Tensor w, Tensor? in_scale, Tensor? in_shift, Tensor(a!) c, Tensor(b!) sum, "
      "Tensor(c!) sq_sum, int[2] stride, int[2] padding, int[2] dilation, int groups) -> (bool, str)",
      &conv_genstats_hook);
  m.def(
      "conv_dgrad_drelu(Tensor dy, Tensor w, Tensor x, Tensor? in_scale, Tensor? in_shift, Tensor(a!) dx, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> (bool, str)",
      &conv_dgrad_drelu_hook);
  m.def(
      "conv_dgrad_drelu_bn(Tensor dy, Tensor w, Tensor x, Tensor mean, Tensor invstd, Tensor gamma, Tensor beta, "
      "Tensor(a!) g, Tensor(b!) dgamma, Tensor(c!) dbeta, Tensor(d!) eq_scale_dy, Tensor(e!) eq_scale_x, "
      "Tensor(f!) eq_bias, int[2] stride, int[2] padding, int[2] dilation, int groups) -> (bool, str)",
      &conv_dgrad_drelu_bn_hook);
  m.def(
      "conv_wgrad(Tensor dy, Tensor x, Tensor? in_scale, Tensor? in_shift, Tensor(a!) dw, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> (bool, str)",
      &conv_wgrad_hook);
  m.def("ill_conditioned_channels(Tensor sum, Tensor sq_sum, int count, float tau=0.03125) -> Tensor",
        &ill_conditioned_channels);
  m.def(
      "genstats_mean_var(Tensor c, Tensor sum, Tensor sq_sum, Tensor(a!) mean, Tensor(b!) var, "
      "float tau=0.03125) -> int",
      &genstats_mean_var_hook);
}

}  // namespace cudnn_graph
}  // namespace resnet_fused
