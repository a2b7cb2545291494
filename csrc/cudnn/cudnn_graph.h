// resnet_fused's cuDNN graph engine: a ResNet layer's convolution with its BatchNorm / ReLU work fused around it as
// ONE cuDNN fusion graph (cudnn-frontend graph API), so cuDNN runs one Hopper/Ampere-native kernel where the plain
// path runs a convolution plus elementwise and reduction passes over the activations.
//
// Every op takes `plan_only` last (default false): true finds or builds the op's graph for these tensors (shapes,
// strides, dtypes, device, alignment) without running it — ok then means the same call with plan_only false runs
// on a built graph, so an op that needs several graphs checks them all before running any. Outputs are not written.
//
// Layout conventions: activations 4-D [N, C, H, W] in fp16 / bf16 (fp32 only where torch allows cuDNN TF32), meant
// channels_last (NHWC strides; other strides are passed to cuDNN, which may refuse them); weights [K, C/groups, R,
// S] in the activations' dtype, meant channels_last too (KRSC). Per-channel vectors are 1-D; "fp32 [C]" below.
// Every output is preallocated by the caller (any dense strides) and fully overwritten. Σ is over N, H, W (of the
// tensor the statistic is of), M is the number of values per channel it sums.
//
// Each call builds its graph once per key (pattern, shapes, strides, dtypes, conv parameters, prologue / residual /
// ReLU flags, torch's TF32 and determinism flags, device) into a bounded LRU cache (RESNET_FUSED_CUDNN_CACHE_SIZE,
// default 512 graphs; a refusal is cached only when cuDNN said "not supported", never a transient failure such as
// an out-of-memory): validate(), build_operation_graph, heuristics (mode A, then the fallback list) filtered like
// PyTorch's own cuDNN convolutions, the heuristics' first buildable plan — or, with RESNET_FUSED_CUDNN_AUTOTUNE=1
// (read once per process), every buildable plan without reduced-precision reductions or input down-conversion,
// timed by cuDNN's autotuning on the first call. No graph, plan or autotuning is built while a CUDA graph capture
// is underway (the current stream, or any blocking stream): such a call declines until it has been built outside a
// capture. It runs on ATen's cuDNN handle for the tensors' device bound to the current stream, with its workspace
// from the CUDA caching allocator. Nothing is synchronized (except an autotuning first call).
//
// Errors: arguments that contradict each other (shapes, dtypes, devices) raise like PyTorch's own ops (c10::Error).
// Anything the engine or cuDNN does not support — CPU tensors, fp64, fp32 without TF32, empty, non-dense or
// misaligned (16 B) tensors, an output aliasing another operand, strides or shapes cuDNN's engines refuse, a build
// without the frontend — returns ok=false with the reason (cuDNN's / the frontend's own message when it is theirs)
// and leaves the outputs unspecified: the caller falls back to another engine, or raises the reason when this engine
// was forced.
//
// BN finalize is not a graph here: the project's own bn_finalize (csrc/ops/train_ops.cpp) stays. It is a [C]-sized
// op, launch bound either way, and it has torch's exact semantics — the biased variance to normalize, the unbiased
// one for running_var, momentum=None (cumulative average), num_batches_tracked — which cuDNN's bn_finalize (a momentum
// scalar, its own running-variance convention) does not cover; and it takes mean / var, i.e. genstats_mean_var's
// corrected variance, not the raw Σ / Σ². For SyncBN, all-reduce each rank's (count, mean, count·var) and merge
// them with Chan's formula before it, not the raw Σ / Σ² (which would bring the cancellation back).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace resnet_fused::cudnn_graph {

struct Result {
  bool ok;
  std::string reason;  // empty when ok; cuDNN's own message when it refused the graph
};

// Relative variance below which conv_genstats' fp32 Σ / Σ² do not resolve a channel's variance (see
// ill_conditioned_channels): 2^-5.
constexpr double kIllConditionedTau = 1.0 / 32;

#ifdef RESNET_FUSED_WITH_CUDNN_FRONTEND

// Built with the frontend, a CUDA device is present, torch.backends.cudnn.enabled, and ATen's cuDNN handle for the
// current device can be made.
bool available();

// "frontend 1.32.0, cuDNN 9.24.0" (the cuDNN loaded, "(built against 9.x.y)" added when its headers differed);
// build_info()["cudnn_frontend"].
std::string version();

// Eval: y = act(conv(x, w)·scale[k] + shift[k] [+ residual]), act = ReLU when `relu`, else identity.
//   x [N, C, H, W]; w [K, C/groups, R, S]; scale, shift fp32 (or x's dtype) [K]; residual (undefined = none) and y
//   [N, K, P, Q] in x's dtype. fp32 epilogue, one rounding to y's dtype. For a downsample shortcut, compute it with
//   its own call (relu=false) and pass it as the residual.
Result conv_scale_bias_act(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& residual, at::Tensor& y, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, bool relu, bool plan_only = false);

// Training forward (the "NormConv" forward):
//   a = relu(x·in_scale[c] + in_shift[c]) when in_scale / in_shift are defined (the previous layer's BN + ReLU
//       applied on load, zero padding applied to a, not x), else a = x;
//   c = conv(a, w) [N, K, P, Q] in x's dtype; sum[k] = Σ c, sq_sum[k] = Σ c² (fp32 [K], cuDNN's genstats, summed
//   in fp32 from the fp32 accumulators). in_scale / in_shift: fp32 [C] (cuDNN's samples use x's dtype; both are
//   accepted). Turn sum / sq_sum into mean / variance with genstats_mean_var, never with the bare formula.
Result conv_genstats(const at::Tensor& x, const at::Tensor& w, const at::Tensor& in_scale, const at::Tensor& in_shift,
                     at::Tensor& c, at::Tensor& sum, at::Tensor& sq_sum, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool plan_only = false);

// Backward of c = conv(a, w) through the ReLU that made a:
//   dx = conv_dgrad(dy, w) · [z > 0],  z = x·in_scale[c] + in_shift[c] when in_scale / in_shift are defined (x = the
//   previous layer's saved conv output, as conv_genstats' prologue), else z = x (x = the ReLU's input or output).
//   dy [N, K, P, Q]; x, dx [N, C, H, W]; all in x's dtype; in_scale / in_shift as in conv_genstats.
Result conv_dgrad_drelu(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& x, const at::Tensor& in_scale,
                        const at::Tensor& in_shift, at::Tensor& dx, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool plan_only = false);

// Backward of c = conv(a, w), a = relu(bn(x)), bn training-mode BatchNorm with batch statistics, all in one graph
// (cuDNN's dgrad + drelu + dbn_weight):
//   x̂ = (x − mean[c])·invstd[c],  g = conv_dgrad(dy, w) · [γ[c]·x̂ + β[c] > 0]    (written to g, x's dtype)
//   dgamma[c] = Σ g·x̂,  dbeta[c] = Σ g                                            (BN's weight / bias gradients)
//   eq_scale_dy[c] = γ·invstd,  eq_scale_x[c] = −γ·invstd²·dgamma/M,
//   eq_bias[c] = γ·invstd·(mean·invstd·dgamma − dbeta)/M
// so that the gradient w.r.t. x of the whole BN (through its batch mean and variance) is
//   dx = eq_scale_dy·g + eq_scale_x·x + eq_bias
// — one elementwise pass left to the caller (or to the next graph's prologue). mean / invstd are the forward's
// saved batch mean and 1/√(var + eps); γ / β the BN's weight / bias (ones / zeros when it has none). All per-channel
// tensors fp32 [C]; dy [N, K, P, Q], x and g [N, C, H, W] in x's dtype.
Result conv_dgrad_drelu_bn(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& g,
                           at::Tensor& dgamma, at::Tensor& dbeta, at::Tensor& eq_scale_dy, at::Tensor& eq_scale_x,
                           at::Tensor& eq_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, bool plan_only = false);

// Weight gradient of c = conv(a, w) with a recomputed on load:
//   dw = conv_wgrad(dy, a),  a = relu(x·in_scale[c] + in_shift[c]) when in_scale / in_shift are defined, else a = x.
//   dy [N, K, P, Q] and x [N, C, H, W] in x's dtype; dw [K, C/groups, R, S] in x's dtype (fp32 accumulation).
Result conv_wgrad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& in_scale, const at::Tensor& in_shift,
                  at::Tensor& dw, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t groups, bool plan_only = false);

// The statistics' exact route. With m = Σc/M and q = Σc²/M as fp32 sums, the variance v = q − m² cancels
// catastrophically when |mean| ≫ std. If the sums carry a relative error ρ (fp32 roundings along cuDNN's
// accumulation path, relative to Σ|c| and Σc²), then |Δv| ≤ 3ρ·q (since |m|·E|c| ≤ q), so a channel with v ≥ τ·q
// has a relative variance error ≤ 3ρ/τ. With τ = kIllConditionedTau = 2^-5 and ρ ≤ 2^-16 (a path of up to ~256
// fp32 roundings) that is ≤ 1.5e-3 (invstd ≤ 7e-4, at fp16's and under bf16's unit roundoff); the mean's error
// relative to std is ≤ ρ/√τ. Channels with v < τ·q (a negative v included) are ill-conditioned:
//
// ill_conditioned_channels: bool [K] on sum's device, v < τ·q computed in fp64 from the fp32 sums. No host sync.
at::Tensor ill_conditioned_channels(const at::Tensor& sum, const at::Tensor& sq_sum, int64_t count,
                                    double tau = kIllConditionedTau);

// genstats_mean_var: mean[k] and biased var[k] of c from conv_genstats' sum / sq_sum (fp64 math), the
// ill-conditioned channels' mean and variance recomputed exactly from c (two passes in fp64 over those channels
// only). mean / var: [K] of any float dtype on c's device (written). Returns how many channels were recomputed; one
// host sync (the count). CUDA-free ATen code: runs on any device.
int64_t genstats_mean_var(const at::Tensor& c, const at::Tensor& sum, const at::Tensor& sq_sum, at::Tensor& mean,
                          at::Tensor& var, double tau = kIllConditionedTau);

#else  // built without the cuDNN frontend: the engine is absent, every graph refused

inline constexpr const char* kNotBuilt = "resnet_fused was built without the cuDNN frontend (csrc/cudnn/)";

inline bool available() { return false; }
inline std::string version() { return ""; }
inline Result conv_scale_bias_act(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                  int64_t, bool, bool = false) {
  return {false, kNotBuilt};
}
inline Result conv_genstats(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                            at::Tensor&, at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                            bool = false) {
  return {false, kNotBuilt};
}
inline Result conv_dgrad_drelu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                               int64_t, bool = false) {
  return {false, kNotBuilt};
}
inline Result conv_dgrad_drelu_bn(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                  at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::IntArrayRef,
                                  at::IntArrayRef, at::IntArrayRef, int64_t, bool = false) {
  return {false, kNotBuilt};
}
inline Result conv_wgrad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, bool = false) {
  return {false, kNotBuilt};
}
// Only meaningful on conv_genstats' results, which a build without the frontend never has.
inline at::Tensor ill_conditioned_channels(const at::Tensor&, const at::Tensor&, int64_t, double = kIllConditionedTau) {
  TORCH_CHECK(false, kNotBuilt);
  return {};
}
inline int64_t genstats_mean_var(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                 double = kIllConditionedTau) {
  TORCH_CHECK(false, kNotBuilt);
  return 0;
}

#endif  // RESNET_FUSED_WITH_CUDNN_FRONTEND

}  // namespace resnet_fused::cudnn_graph
