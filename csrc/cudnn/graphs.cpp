// The cuDNN fusion graphs of resnet_fused, built with the cudnn-frontend graph API (header-only, C++17): one
// function per fusion pattern builds it from a GraphSpec with tensors named and uid'd by role; graphs are validated,
// lowered to a cuDNN operation graph, planned from cuDNN's heuristics and kept in a bounded LRU cache keyed on the
// spec; execution only fills the variant pack (one pointer per role, in uid order) and the workspace. The same build
// runs for a device profile instead of a handle (plan_deviceless: cuDNN's deviceless planning), which is how
// benchmarks/cudnn_report.py learns, without a GPU, which of these graphs cuDNN has an engine for.
//
// This is the only translation unit that includes cudnn_frontend.h (the heaviest header set of the project: keep it
// that way). It includes no torch headers; cudnn_graph.cpp is the ATen side. The patterns follow the shapes of the
// cudnn-frontend samples that NVIDIA runs on Ampere/Hopper (convolution/fprop.cpp CSBR and SBRCS, dgrads.cpp Dgrad
// Drelu [DBNweight], wgrads.cpp scale-bias-relu-wgrad), because cuDNN's specialized fused engines match patterns.
#include "graph_spec.h"

// No JSON (de)serialization of graphs is used: leaving the frontend's bundled nlohmann/json out saves compile time.
#define CUDNN_FRONTEND_SKIP_JSON_LIB
#include <cudnn_frontend.h>

#include <atomic>
#include <cstdlib>
#include <list>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>

namespace resnet_fused::cudnn_graph::detail {

namespace fe = cudnn_frontend;

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::kConvScaleBiasAct:
      return "conv_scale_bias_act";
    case Kind::kConvGenstats:
      return "conv_genstats";
    case Kind::kDgradDrelu:
      return "conv_dgrad_drelu";
    case Kind::kDgradDreluDbn:
      return "conv_dgrad_drelu_bn";
    case Kind::kWgrad:
      return "conv_wgrad";
  }
  return "?";
}

const char* role_name(int role) {
  static constexpr const char* kNames[kNumRoles] = {
      "X",  "W",  "SCALE", "SHIFT", "RESIDUAL", "Y",     "SUM",    "SQ_SUM",      "DY",         "DX",
      "DW", "MEAN", "INV_STD", "GAMMA", "BETA", "DGAMMA", "DBETA", "EQ_SCALE_DY", "EQ_SCALE_X", "EQ_BIAS"};
  return role >= 0 && role < kNumRoles ? kNames[role] : "?";
}

namespace {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kHalf:
      return "fp16";
    case DType::kBFloat16:
      return "bf16";
    case DType::kFloat:
      return "fp32";
  }
  return "?";
}

fe::DataType_t fe_type(DType d) {
  switch (d) {
    case DType::kHalf:
      return fe::DataType_t::HALF;
    case DType::kBFloat16:
      return fe::DataType_t::BFLOAT16;
    case DType::kFloat:
      return fe::DataType_t::FLOAT;
  }
  return fe::DataType_t::NOT_SET;
}

int64_t uid(int role) { return role + 1; }

std::vector<int64_t> vec(const std::array<int64_t, 4>& a) { return {a.begin(), a.end()}; }

using TensorPtr = std::shared_ptr<fe::graph::Tensor_attributes>;

// A graph input of `role`, with the spec's dims, strides and dtype.
TensorPtr input(fe::graph::Graph& g, const GraphSpec& s, int role) {
  const TensorDesc& t = s.tensors[role];
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(role_name(role))
                      .set_uid(uid(role))
                      .set_dim(vec(t.dims))
                      .set_stride(vec(t.strides))
                      .set_data_type(fe_type(t.dtype)));
}

// Marks the node output `t` as the graph output of `role`.
void output(const TensorPtr& t, const GraphSpec& s, int role) {
  const TensorDesc& d = s.tensors[role];
  t->set_output(true)
      .set_name(role_name(role))
      .set_uid(uid(role))
      .set_dim(vec(d.dims))
      .set_stride(vec(d.strides))
      .set_data_type(fe_type(d.dtype));
}

// A pointwise node in fp32.
TensorPtr pointwise(fe::graph::Graph& g, const char* name, fe::PointwiseMode_t mode, const TensorPtr& a,
                    const TensorPtr& b = nullptr) {
  auto attrs = fe::graph::Pointwise_attributes().set_mode(mode).set_compute_data_type(fe::DataType_t::FLOAT);
  attrs.set_name(name);
  return b ? g.pointwise(a, b, attrs) : g.pointwise(a, attrs);
}

// relu(x·SCALE + SHIFT): the previous layer's BN + ReLU applied to a conv operand on load.
TensorPtr bn_relu_prologue(fe::graph::Graph& g, const GraphSpec& s, const TensorPtr& x) {
  auto scaled = pointwise(g, "prologue_scale", fe::PointwiseMode_t::MUL, x, input(g, s, SCALE));
  auto shifted = pointwise(g, "prologue_shift", fe::PointwiseMode_t::ADD, scaled, input(g, s, SHIFT));
  return pointwise(g, "prologue_relu", fe::PointwiseMode_t::RELU_FWD, shifted);
}

template <typename Attrs>
Attrs conv_attrs(const GraphSpec& s, const char* name) {
  Attrs attrs;
  attrs.set_pre_padding({s.padding[0], s.padding[1]})
      .set_post_padding({s.padding[0], s.padding[1]})
      .set_stride({s.stride[0], s.stride[1]})
      .set_dilation({s.dilation[0], s.dilation[1]});
  attrs.set_name(name);
  return attrs;
}

// conv_dgrad(DY, W), shaped like DX (its size is not implied by DY's when the stride is > 1).
TensorPtr dgrad_node(fe::graph::Graph& g, const GraphSpec& s) {
  auto dgrad = g.conv_dgrad(input(g, s, DY), input(g, s, W), conv_attrs<fe::graph::Conv_dgrad_attributes>(s, "dgrad"));
  dgrad->set_dim(vec(s.tensors[DX].dims)).set_stride(vec(s.tensors[DX].strides));
  return dgrad;
}

// The roles each pattern needs; the optional ones (prologue SCALE/SHIFT, RESIDUAL) are read from the spec.
Status check_roles(const GraphSpec& s) {
  std::vector<int> need;
  switch (s.kind) {
    case Kind::kConvScaleBiasAct:
      need = {X, W, SCALE, SHIFT, Y};
      break;
    case Kind::kConvGenstats:
      need = {X, W, Y, SUM, SQ_SUM};
      break;
    case Kind::kDgradDrelu:
      need = {DY, W, X, DX};
      break;
    case Kind::kDgradDreluDbn:
      need = {DY, W, X, MEAN, INV_STD, GAMMA, BETA, DX, DGAMMA, DBETA, EQ_SCALE_DY, EQ_SCALE_X, EQ_BIAS};
      break;
    case Kind::kWgrad:
      need = {DY, X, DW};
      break;
  }
  for (int role : need) {
    if (!s.has(role)) return {false, std::string("graph spec lacks tensor ") + role_name(role)};
  }
  if (s.has(SCALE) != s.has(SHIFT)) return {false, "graph spec has one of SCALE / SHIFT without the other"};
  return {true, ""};
}

// Adds the nodes of the spec's pattern to `g` (the math of each is in cudnn_graph.h).
Status add_nodes(fe::graph::Graph& g, const GraphSpec& s) {
  Status roles = check_roles(s);
  if (!roles.ok) return roles;
  g.set_name(kind_name(s.kind));
  g.set_io_data_type(fe_type(s.io))
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  switch (s.kind) {
    case Kind::kConvScaleBiasAct: {
      auto conv = g.conv_fprop(input(g, s, X), input(g, s, W), conv_attrs<fe::graph::Conv_fprop_attributes>(s, "conv"));
      auto y = pointwise(g, "scale", fe::PointwiseMode_t::MUL, conv, input(g, s, SCALE));
      y = pointwise(g, "shift", fe::PointwiseMode_t::ADD, y, input(g, s, SHIFT));
      if (s.has(RESIDUAL)) y = pointwise(g, "residual", fe::PointwiseMode_t::ADD, y, input(g, s, RESIDUAL));
      if (s.relu) y = pointwise(g, "relu", fe::PointwiseMode_t::RELU_FWD, y);
      output(y, s, Y);
      break;
    }
    case Kind::kConvGenstats: {
      auto x = input(g, s, X);
      auto a = s.has(SCALE) ? bn_relu_prologue(g, s, x) : x;
      auto c = g.conv_fprop(a, input(g, s, W), conv_attrs<fe::graph::Conv_fprop_attributes>(s, "conv"));
      output(c, s, Y);
      auto genstats = fe::graph::Genstats_attributes();
      genstats.set_name("genstats");
      auto [sum, sq_sum] = g.genstats(c, genstats);
      output(sum, s, SUM);
      output(sq_sum, s, SQ_SUM);
      break;
    }
    case Kind::kDgradDrelu: {
      auto dgrad = dgrad_node(g, s);
      auto x = input(g, s, X);
      auto pre = x;
      if (s.has(SCALE)) {
        pre = pointwise(g, "pre_scale", fe::PointwiseMode_t::MUL, x, input(g, s, SCALE));
        pre = pointwise(g, "pre_shift", fe::PointwiseMode_t::ADD, pre, input(g, s, SHIFT));
      }
      output(pointwise(g, "drelu", fe::PointwiseMode_t::RELU_BWD, dgrad, pre), s, DX);
      break;
    }
    case Kind::kDgradDreluDbn: {
      auto dgrad = dgrad_node(g, s);
      auto x = input(g, s, X);
      auto mean = input(g, s, MEAN);
      auto inv_std = input(g, s, INV_STD);
      auto gamma = input(g, s, GAMMA);
      auto bn = pointwise(g, "bn_center", fe::PointwiseMode_t::SUB, x, mean);
      bn = pointwise(g, "bn_normalize", fe::PointwiseMode_t::MUL, bn, inv_std);
      bn = pointwise(g, "bn_scale", fe::PointwiseMode_t::MUL, bn, gamma);
      bn = pointwise(g, "bn_shift", fe::PointwiseMode_t::ADD, bn, input(g, s, BETA));
      auto grad = pointwise(g, "drelu", fe::PointwiseMode_t::RELU_BWD, dgrad, bn);
      output(grad, s, DX);
      auto dbn = fe::graph::DBN_weight_attributes();
      dbn.set_name("dbn_weight");
      auto [dgamma, dbeta, eq_scale_dy, eq_scale_x, eq_bias] = g.dbn_weight(grad, x, mean, inv_std, gamma, dbn);
      output(dgamma, s, DGAMMA);
      output(dbeta, s, DBETA);
      output(eq_scale_dy, s, EQ_SCALE_DY);
      output(eq_scale_x, s, EQ_SCALE_X);
      output(eq_bias, s, EQ_BIAS);
      break;
    }
    case Kind::kWgrad: {
      auto x = input(g, s, X);
      auto a = s.has(SCALE) ? bn_relu_prologue(g, s, x) : x;
      auto dw = g.conv_wgrad(input(g, s, DY), a, conv_attrs<fe::graph::Conv_wgrad_attributes>(s, "wgrad"));
      output(dw, s, DW);
      break;
    }
  }
  return {true, ""};
}

Status fail(const char* step, fe::error_t e) { return {false, std::string(step) + ": " + e.get_message()}; }

// Where a graph is planned: a cuDNN handle's device, or (deviceless, `props` set) a device profile.
struct Target {
  cudnnContext* handle = nullptr;
  std::shared_ptr<fe::DeviceProperties> props;
  int sm_version = 0;  // the profile's: cuDNN reads it from the device otherwise
  int sm_count = 0;
};

// A build's outcome: the graph, or why not and whether that refusal is permanent (cacheable).
struct Built {
  Status status{false, ""};
  bool permanent = false;  // cuDNN / the frontend said the graph is not supported: the same spec always fails
  std::shared_ptr<fe::graph::Graph> graph;
  std::vector<int> roles;
  int64_t workspace = 0;
  std::string engine;  // the chosen plan's name
};

// Whether a failed step's error says "not supported" (a property of the spec and the installation, so worth
// caching: a runtime compilation that fails fails again) rather than a transient failure: an allocation, a CUDA /
// driver call (a module load can run out of memory).
bool is_not_supported(fe::error_t e) {
  const std::string m = e.get_message();
  for (const char* transient : {"ALLOC", "OUT_OF_MEMORY", "out of memory", "CUDA_API", "cudaError", "CUDA_ERROR",
                                "EXECUTION_FAILED"}) {
    if (m.find(transient) != std::string::npos) return false;
  }
  switch (e.get_code()) {
    case fe::error_code_t::ATTRIBUTE_NOT_SET:
    case fe::error_code_t::SHAPE_DEDUCTION_FAILED:
    case fe::error_code_t::INVALID_TENSOR_NAME:
    case fe::error_code_t::GRAPH_NOT_SUPPORTED:
    case fe::error_code_t::GRAPH_EXECUTION_PLAN_CREATION_FAILED:
    case fe::error_code_t::HEURISTIC_QUERY_FAILED:
    case fe::error_code_t::INVALID_VALUE:
      return true;
    default:
      return false;
  }
}

// The numerical notes whose engines a spec excludes. PyTorch's own cuDNN convolutions, for fp32 io: no engines that
// down-convert fp32 inputs (to fp16), no TF32 tensor cores unless torch allows them. With fp16 / bf16 io the only
// fp32 operands are the per-channel vectors and the fused intermediates, which the tensor-core operand is rounded
// from anyway (the GPU tests compare every graph with fp64 at the io dtype's tolerance). Autotuning times every
// plan and keeps the fastest, so it also excludes what the heuristics' ordering would otherwise keep behind more
// accurate engines: reduced-precision reductions (fp16 / bf16 accumulation) and input down-conversion. Always: no
// non-deterministic engines when torch asks for determinism.
std::vector<fe::NumericalNote_t> excluded_notes(const GraphSpec& s, bool autotune) {
  std::vector<fe::NumericalNote_t> notes;
  if (s.io == DType::kFloat || autotune) notes.push_back(fe::NumericalNote_t::DOWN_CONVERT_INPUTS);
  if (s.io == DType::kFloat && !s.allow_tf32) notes.push_back(fe::NumericalNote_t::TENSOR_CORE);
  if (autotune) notes.push_back(fe::NumericalNote_t::REDUCED_PRECISION_REDUCTION);
  if (s.deterministic) notes.push_back(fe::NumericalNote_t::NONDETERMINISTIC);
  return notes;
}

// Builds the spec's graph up to its plans for `target`: validate, operation graph, heuristics (mode A, then the
// fallback list) minus the excluded engines, support check, plans (the heuristics' first buildable one, or every
// buildable one when `autotune`). Never throws.
Built build(const GraphSpec& s, const Target& target, bool autotune) {
  Built out;
  auto g = std::make_shared<fe::graph::Graph>();
  out.status = add_nodes(*g, s);
  if (!out.status.ok) {
    out.permanent = true;
    return out;
  }
  auto step = [&out](const char* name, fe::error_t e) {
    if (e.is_bad()) {
      out.status = fail(name, e);
      out.permanent = is_not_supported(e);
    }
    return e.is_good();
  };
  if (target.props != nullptr) {
    g->set_device_properties(target.props);
    g->set_sm_version(target.sm_version);
    g->set_sm_count(target.sm_count);
  }
  if (!step("validate", g->validate()) ||
      !step("operation graph", target.props != nullptr ? g->build_operation_graph()
                                                        : g->build_operation_graph(target.handle)) ||
      !step("heuristics", g->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}))) {
    return out;
  }
  if (auto notes = excluded_notes(s, autotune); !notes.empty()) g->deselect_numeric_notes(notes);
  const auto policy = autotune ? fe::BuildPlanPolicy_t::ALL : fe::BuildPlanPolicy_t::HEURISTICS_CHOICE;
  if (!step("support", g->check_support()) || !step("plans", g->build_plans(policy))) return out;
  for (int64_t u : g->get_variant_pack_uids_sorted()) {
    const int role = static_cast<int>(u - 1);
    if (role < 0 || role >= kNumRoles || !s.has(role)) {
      out.status = {false, "the graph asks for a tensor (uid " + std::to_string(u) + ") it was not given"};
      out.permanent = true;
      return out;
    }
    out.roles.push_back(role);
  }
  out.workspace = autotune ? g->get_autotune_workspace_size() : g->get_workspace_size();
  if (g->get_plan_name(out.engine).is_bad()) out.engine.clear();
  out.graph = std::move(g);
  out.status = {true, ""};
  return out;
}

// A built graph (or a permanent refusal) as the cache keeps it.
struct Entry {
  Status status{false, ""};
  std::shared_ptr<fe::graph::Graph> graph;
  std::vector<int> roles;  // the graph's user tensors in uid order: the order of execute()'s pointer array
  std::atomic<int64_t> workspace{0};
  std::atomic<bool> tuned{true};  // false: plans still to autotune (at the first execution, which has the pointers)
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& key) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the 64-bit words
    for (int64_t v : key) {
      h ^= static_cast<uint64_t>(v);
      h *= 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

// Bounded LRU map spec key -> entry. Builds are serialized (build_mu); lookups only take mu.
class Cache {
 public:
  std::shared_ptr<Entry> find(const std::vector<int64_t>& key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    lru_.splice(lru_.begin(), lru_, it->second);
    return it->second->second;
  }

  void insert(const std::vector<int64_t>& key, std::shared_ptr<Entry> entry) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(key);
    if (it != index_.end()) {
      it->second->second = std::move(entry);
      lru_.splice(lru_.begin(), lru_, it->second);
      return;
    }
    lru_.emplace_front(key, std::move(entry));
    index_.emplace(key, lru_.begin());
    while (static_cast<int64_t>(lru_.size()) > capacity()) {
      index_.erase(lru_.back().first);
      lru_.pop_back();  // a graph still executing elsewhere lives on in its shared_ptr
    }
  }

  int64_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(lru_.size());
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    index_.clear();
    lru_.clear();
  }

  static int64_t capacity() {
    static const int64_t cap = [] {
      const char* env = std::getenv("RESNET_FUSED_CUDNN_CACHE_SIZE");
      const long long v = env != nullptr ? std::atoll(env) : 0;
      return v > 0 ? static_cast<int64_t>(v) : int64_t{512};
    }();
    return cap;
  }

  std::mutex build_mu;

 private:
  using Item = std::pair<std::vector<int64_t>, std::shared_ptr<Entry>>;
  std::mutex mu_;
  std::list<Item> lru_;
  std::unordered_map<std::vector<int64_t>, std::list<Item>::iterator, KeyHash> index_;
};

// Never destroyed: cached graphs hold cuDNN descriptors that must not be released after cuDNN / CUDA have shut down
// at process exit.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

std::string cudnn_version_string(size_t v) {
  return std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." + std::to_string(v % 100);
}

}  // namespace

void GraphSpec::set(int role, DType dtype, const std::array<int64_t, 4>& dims, const std::array<int64_t, 4>& strides) {
  TensorDesc& t = tensors[role];
  t.present = true;
  t.dtype = dtype;
  t.dims = dims;
  t.strides = strides;
}

std::vector<int64_t> GraphSpec::key() const {
  std::vector<int64_t> k = {static_cast<int64_t>(kind), static_cast<int64_t>(io), stride[0], stride[1], padding[0],
                            padding[1], dilation[0], dilation[1], relu, allow_tf32, deterministic, device};
  for (const TensorDesc& t : tensors) {
    k.push_back(t.present ? static_cast<int64_t>(t.dtype) : 0);
    if (!t.present) continue;
    k.insert(k.end(), t.dims.begin(), t.dims.end());
    k.insert(k.end(), t.strides.begin(), t.strides.end());
  }
  return k;
}

std::string GraphSpec::describe() const {
  std::ostringstream out;
  out << kind_name(kind) << " " << dtype_name(io);
  for (int role = 0; role < kNumRoles; ++role) {
    const TensorDesc& t = tensors[role];
    if (!t.present) continue;
    out << " " << role_name(role) << "[" << t.dims[0] << "," << t.dims[1] << "," << t.dims[2] << "," << t.dims[3]
        << "]";
    if (t.dtype != io) out << dtype_name(t.dtype);
  }
  out << " stride " << stride[0] << "x" << stride[1] << " padding " << padding[0] << "x" << padding[1]
      << " dilation " << dilation[0] << "x" << dilation[1];
  if (kind == Kind::kConvScaleBiasAct) out << (relu ? " relu" : " no-relu");
  return out.str();
}

Status validate(const GraphSpec& spec) {
  try {
    fe::graph::Graph g;
    Status status = add_nodes(g, spec);
    if (!status.ok) return status;
    if (auto e = g.validate(); e.is_bad()) return fail("validate", e);
    if (auto e = g.build_operation_graph(nullptr); e.is_bad()) return fail("operation graph", e);
    return {true, ""};
  } catch (const std::exception& ex) {
    return {false, std::string("cudnn-frontend raised: ") + ex.what()};
  }
}

namespace {

// The cached entry of `spec`, built on `handle`'s device if absent (only when `may_build`). A build that fails
// for good (not supported) is cached as a refusal; a transient failure is returned, not cached.
Status find_or_build(const GraphSpec& spec, cudnnContext* handle, bool autotune, bool may_build,
                     std::shared_ptr<Entry>& entry) {
  const std::vector<int64_t> key = spec.key();
  Cache& c = cache();
  entry = c.find(key);
  if (entry == nullptr) {
    if (!may_build) {
      return {false, "the graph is not built yet and a CUDA graph capture is underway, during which cuDNN may not "
                     "build it"};
    }
    std::lock_guard<std::mutex> lock(c.build_mu);
    entry = c.find(key);  // built by another thread meanwhile
    if (entry == nullptr) {
      Target target;
      target.handle = handle;
      Built built = build(spec, target, autotune);
      if (!built.status.ok && !built.permanent) return built.status;
      entry = std::make_shared<Entry>();
      entry->status = built.status;
      entry->graph = std::move(built.graph);
      entry->roles = std::move(built.roles);
      entry->workspace = built.workspace;
      entry->tuned = !(built.status.ok && autotune);
      c.insert(key, entry);
    }
  }
  if (!entry->status.ok) return entry->status;
  if (!entry->tuned && !may_build) {
    return {false, "the graph's plans are not autotuned yet and a CUDA graph capture is underway, during which "
                   "cuDNN's autotuning (which synchronizes) may not run"};
  }
  return {true, ""};
}

}  // namespace

Status prepare(const GraphSpec& spec, cudnnContext* handle, bool autotune, bool may_build) {
  try {
    std::shared_ptr<Entry> entry;
    Status status = find_or_build(spec, handle, autotune, may_build, entry);
    if (!status.ok) return {false, status.reason + " [" + spec.describe() + "]"};
  } catch (const std::exception& ex) {
    return {false, std::string("cudnn-frontend raised: ") + ex.what() + " [" + spec.describe() + "]"};
  }
  return {true, ""};
}

Status execute(const GraphSpec& spec, cudnnContext* handle, const std::array<void*, kNumRoles>& ptrs,
               const std::function<void*(int64_t)>& workspace, bool autotune, bool may_build) {
  Cache& c = cache();
  try {
    std::shared_ptr<Entry> entry;
    Status status = find_or_build(spec, handle, autotune, may_build, entry);
    if (!status.ok) return {false, status.reason + " [" + spec.describe() + "]"};
    std::array<void*, kNumRoles> sorted{};
    for (size_t i = 0; i < entry->roles.size(); ++i) {
      sorted[i] = ptrs[entry->roles[i]];
      if (sorted[i] == nullptr) return {false, std::string("no pointer for tensor ") + role_name(entry->roles[i])};
    }
    if (!entry->tuned) {
      // cuDNN's autotuning times every built plan with this call's tensors and keeps the fastest (it synchronizes
      // the device); then the entry runs like any other. Its workspace has the autotuning size. A failure (e.g.
      // out of memory) is returned and the next call tunes again.
      std::lock_guard<std::mutex> lock(c.build_mu);
      if (!entry->tuned) {
        const int64_t tune_bytes = entry->workspace;
        void* ws = tune_bytes > 0 ? workspace(tune_bytes) : nullptr;
        std::unordered_map<int64_t, void*> pack;
        for (size_t i = 0; i < entry->roles.size(); ++i) pack.emplace(uid(entry->roles[i]), sorted[i]);
        if (auto e = entry->graph->autotune(handle, pack, ws); e.is_bad()) {
          return {false, fail("autotune", e).reason + " [" + spec.describe() + "]"};
        }
        entry->workspace = entry->graph->get_workspace_size();
        entry->tuned = true;
      }
    }
    const int64_t ws_bytes = entry->workspace;
    void* ws = ws_bytes > 0 ? workspace(ws_bytes) : nullptr;
    auto e = entry->graph->execute(handle, sorted.data(), static_cast<int>(entry->roles.size()), ws);
    if (e.is_bad()) return {false, fail("execute", e).reason + " [" + spec.describe() + "]"};
  } catch (const std::exception& ex) {
    return {false, std::string("cudnn-frontend raised: ") + ex.what() + " [" + spec.describe() + "]"};
  }
  return {true, ""};
}

PlanReport plan_deviceless(const GraphSpec& spec, const DeviceProfile& profile, bool autotune) {
  PlanReport report;
  try {
    Target target;
    target.props = std::make_shared<fe::DeviceProperties>();
    const std::string& json = profile.json;
    if (auto e = target.props->deserialize(std::vector<uint8_t>(json.begin(), json.end())); e.is_bad()) {
      report.reason = fail("device properties", e).reason;
      report.step = "device properties";
      return report;
    }
    target.sm_version = profile.sm_version;
    target.sm_count = profile.sm_count;
    Built built = build(spec, target, autotune);
    report.ok = built.status.ok;
    report.reason = built.status.reason;
    report.permanent = built.permanent;
    report.step = built.status.ok ? "" : built.status.reason.substr(0, built.status.reason.find(':'));
    report.engine = built.engine;
    report.workspace = built.workspace;
  } catch (const std::exception& ex) {
    report.ok = false;
    report.reason = std::string("cudnn-frontend raised: ") + ex.what();
  }
  return report;
}

int64_t cache_size() { return cache().size(); }

int64_t cache_capacity() { return Cache::capacity(); }

void cache_clear() { cache().clear(); }

std::string version() {
  std::string v = std::to_string(CUDNN_FRONTEND_MAJOR_VERSION) + "." + std::to_string(CUDNN_FRONTEND_MINOR_VERSION) +
                  "." + std::to_string(CUDNN_FRONTEND_PATCH_VERSION);
  const size_t runtime = cudnnGetVersion();
  std::string out = "frontend " + v + ", cuDNN " + cudnn_version_string(runtime);
  if (runtime != static_cast<size_t>(CUDNN_VERSION)) {
    out += " (built against " + cudnn_version_string(CUDNN_VERSION) + ")";
  }
  return out;
}

}  // namespace resnet_fused::cudnn_graph::detail
