// The cuDNN graph engine's two halves meet here, in plain C++ types: cudnn_graph.cpp (ATen side: checks tensors,
// binds the device, handle, stream and workspace) describes each call as a GraphSpec; graphs.cpp (the only unit that
// includes the heavy cudnn-frontend headers) turns a spec into a cuDNN fusion graph, validates, lowers, plans and
// caches it, and executes it with a pointer per tensor role. Keeping torch out of graphs.cpp and the frontend out of
// cudnn_graph.cpp keeps both translation units' compile times apart (and parallel under MAX_JOBS=2).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

struct cudnnContext;  // cudnnHandle_t is cudnnContext*

namespace resnet_fused::cudnn_graph::detail {

// The fusion patterns (csrc/cudnn/cudnn_graph.h documents their math).
enum class Kind : int64_t {
  kConvScaleBiasAct = 1,  // conv_fprop → ×SCALE → +SHIFT → [+RESIDUAL] → [ReLU] → Y
  kConvGenstats,          // [ReLU(X×SCALE+SHIFT)] → conv_fprop → Y, genstats(Y) → SUM, SQ_SUM
  kDgradDrelu,            // conv_dgrad(DY, W) → ReLU backward against X or X×SCALE+SHIFT → DX
  kDgradDreluDbn,         // conv_dgrad → ReLU backward against BN(X) → DX, dbn_weight → DGAMMA, DBETA, EQ_*
  kWgrad,                 // conv_wgrad(DY, [ReLU(X×SCALE+SHIFT)] or X) → DW
};

const char* kind_name(Kind kind);

enum class DType : int64_t { kHalf = 1, kBFloat16, kFloat };

// Tensor roles. A role's cuDNN uid is role + 1, so a graph's variant pack in sorted-uid order is its present roles in
// this order.
enum Role : int {
  X,
  W,
  SCALE,
  SHIFT,
  RESIDUAL,
  Y,
  SUM,
  SQ_SUM,
  DY,
  DX,
  DW,
  MEAN,
  INV_STD,
  GAMMA,
  BETA,
  DGAMMA,
  DBETA,
  EQ_SCALE_DY,
  EQ_SCALE_X,
  EQ_BIAS,
  kNumRoles
};

const char* role_name(int role);

// One graph tensor: logical dims in NCHW order (per-channel vectors as [1, C, 1, 1]) and element strides.
struct TensorDesc {
  bool present = false;
  DType dtype = DType::kFloat;
  std::array<int64_t, 4> dims{};
  std::array<int64_t, 4> strides{};
};

// Everything that shapes one graph; also its cache key (with the device).
struct GraphSpec {
  Kind kind = Kind::kConvScaleBiasAct;
  DType io = DType::kHalf;  // dtype of the activations, weights and gradients
  std::array<TensorDesc, kNumRoles> tensors{};
  std::array<int64_t, 2> stride{1, 1};
  std::array<int64_t, 2> padding{0, 0};
  std::array<int64_t, 2> dilation{1, 1};
  bool relu = false;           // kConvScaleBiasAct: ReLU at the end
  bool allow_tf32 = false;     // fp32 io only: engines that round inputs to TF32 allowed (torch's cuDNN TF32 flag)
  bool deterministic = false;  // non-deterministic engines excluded (torch's cuDNN / algorithm determinism flags)
  int device = -1;             // CUDA device index of the tensors (-1: validate only)

  // Adds a tensor of `role` with the given shape and strides (per-channel vectors: dims {1, C, 1, 1}).
  void set(int role, DType dtype, const std::array<int64_t, 4>& dims, const std::array<int64_t, 4>& strides);
  bool has(int role) const { return tensors[role].present; }
  // Every field as integers: the cache key.
  std::vector<int64_t> key() const;
  // "conv_genstats bf16 X[8,64,56,56] ..." for messages.
  std::string describe() const;
};

struct Status {
  bool ok;
  std::string reason;  // cuDNN's / the frontend's own message when !ok
};

// Builds the graph and runs the checks that need no GPU: the frontend's validate() and the lowering to a cuDNN
// operation graph (build_operation_graph without a handle, which has cuDNN's backend finalize every tensor,
// operation and the operation graph). Heuristics, plans and execution need a device. Not cached.
Status validate(const GraphSpec& spec);

// Looks the spec's graph up in the bounded LRU cache, or builds it on `handle`'s device (only when `may_build`: not
// while a CUDA graph capture is underway): validate, operation graph, heuristics (mode A, then the fallback list)
// minus the excluded engines (torch's TF32 / determinism flags; with `autotune` also reduced-precision reductions and
// input down-conversion), support check, plans (the heuristics' first buildable one; every buildable one then
// cuDNN's autotuning at the first execution when `autotune`). A refusal is cached only when cuDNN said the graph is
// not supported; a transient failure (out of memory, a CUDA error) is returned and retried by the next call.
// prepare() stops there: ok means execute() will find the graph built (an op checks all its graphs before running
// any). execute() then runs it on the handle's stream with `ptrs[role]` for each present role and a workspace from
// `workspace(bytes)` (a device pointer that stays valid for work enqueued on that stream).
Status prepare(const GraphSpec& spec, cudnnContext* handle, bool autotune, bool may_build);
Status execute(const GraphSpec& spec, cudnnContext* handle, const std::array<void*, kNumRoles>& ptrs,
               const std::function<void*(int64_t)>& workspace, bool autotune, bool may_build);

// A target device described without one (cuDNN's deviceless planning): cuDNN's device-properties JSON (the keys of
// CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION: deviceVer, multiProcessorCount, maxSharedMemoryPerBlockOptin,
// l2CacheSize, ...), and the SM version and count the frontend's heuristics and support check are given.
struct DeviceProfile {
  std::string json;
  int sm_version = 90;
  int sm_count = 132;
};

struct PlanReport {
  bool ok = false;
  std::string reason;      // cuDNN's / the frontend's message when !ok
  std::string step;        // the step that refused: validate, operation graph, heuristics, support, plans
  bool permanent = false;  // the refusal says "not supported" (what the engine caches)
  std::string engine;      // the chosen plan's engine name
  int64_t workspace = 0;   // its workspace bytes
};

// Builds the spec's graph exactly as execute() does (same nodes, same steps, same engine filters), but for `profile`
// instead of a handle's device: no GPU is touched (cuDNN's runtime-compiled engines still load the CUDA driver
// library and NVRTC). Never throws. benchmarks/cudnn_report.py's driver calls it.
PlanReport plan_deviceless(const GraphSpec& spec, const DeviceProfile& profile, bool autotune);

// The cache: its number of graphs (built or refused), its capacity (RESNET_FUSED_CUDNN_CACHE_SIZE, default 512),
// and emptying it.
int64_t cache_size();
int64_t cache_capacity();
void cache_clear();

// "frontend 1.32.0, cuDNN 9.24.0" (the cuDNN that is loaded; "(built against 9.x.y)" added when the headers
// differ).
std::string version();

}  // namespace resnet_fused::cudnn_graph::detail
