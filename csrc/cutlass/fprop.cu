// CUTLASS 2.x implicit-GEMM convolutions on tensor cores for the resnet_fused CUDA ops (interface and coverage
// rules in conv_cutlass.h).
//
// cutlass_conv_fprop:  out = act(conv2d(x, W)·s[k] + t[k] + residual)   (an eval BN applied in the epilogue)
//   Implicit GEMM on NHWC: M = N*P*Q output pixels, N = K output channels, K = R*S*C, fp16 or bf16 operands,
//   fp32 accumulators. Kernel: cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast with the sm80 tensor-op
//   mainloop (mma.sync m16n8k16; the same code runs on sm90), optimized activation / filter iterators, a 3-stage
//   cp.async pipeline; two tile configurations (conv_cutlass_common.h), chosen per problem: threadblock 128x128x64
//   with warps 64x64 (96 KiB of shared memory), or 128x64x64 with warps 64x32 (72 KiB) for K <= 64 output channels.
//   Threadblock swizzle: a width chosen per call (1x1 convs: CUTLASS's heuristic, so consecutive threadblocks
//   share their activation tile in L2; others: none), set in the kernel's parameters; the kernels are launched
//   directly (cutlass_conv::launch: the shared-memory attribute set once per device, CUDA's own error text on a
//   failed launch).
//   The epilogue with broadcast hands each output vector its slice of the broadcast vector, here the fp32
//   (s, t) pairs of the output channels (ScaleShift below: one vector carries both), and, only when the output
//   op asks for it, the matching vector of the source tensor C (the residual). One output op,
//   ScaleShiftResidualAct, takes "residual given" and "ReLU" as runtime flags, so each (dtype, tile) has exactly
//   one kernel: four in all. The caller computes (s, t) from the BN's live tensors right before the launch
//   (cuda/eval_ops.cu).
//
// Only the CUTLASS and CUDA runtime headers plus ATen's Tensor and c10's stream / allocator headers are
// included here: every nvcc device pass parses this file, so it stays away from <ATen/ATen.h>.
#include "conv_cutlass.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "../common/build_info.h"

#ifdef RESNET_FUSED_WITH_CUTLASS
#include "cutlass/array.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/numeric_types.h"
#include "cutlass/version.h"

#include "conv_cutlass_common.h"
#endif

namespace resnet_fused {

#ifndef RESNET_FUSED_WITH_CUTLASS

std::string cutlass_conv_fprop_uncovered(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t) {
  return kNoCutlass;
}

bool cutlass_conv_fprop(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                        at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, bool, std::string* why) {
  if (why != nullptr) {
    *why = kNoCutlass;
  }
  return false;
}

std::string cutlass_last_config() { return ""; }

#else

namespace {

// The per-output-channel coefficients of the epilogue: an eval BN's scale s and shift t. The epilogue with broadcast
// loads one ElementVector per output column from its broadcast pointer and hands the output op one ElementCompute
// per output element; making both this pair carries s AND t in that single broadcast vector (a [K, 2] fp32 array),
// and the loads stay vectorized (8 pairs = 64 bytes per access).
struct ScaleShift {
  float s, t;

  ScaleShift() = default;
  // What cutlass::Array::clear() fills with: s = t = 0 (columns past K).
  CUTLASS_HOST_DEVICE explicit ScaleShift(int zero) : s(static_cast<float>(zero)), t(static_cast<float>(zero)) {}
};
static_assert(sizeof(ScaleShift) == 2 * sizeof(float), "ScaleShift must be two packed floats: [K, 2] fp32");

// Epilogue output op of the fprop kernel, in the form cutlass::epilogue::threadblock::EpilogueWithBroadcast
// expects (single source: the residual is tensor C; the broadcast vector V holds each column's (s, t)):
//   Z = act(AB·s + t + C)   (C only when the residual is given; act = ReLU or identity), fp32, rounded once.
// The auxiliary output T of that epilogue is not stored (kStoreT = false).
template <typename Element, int kN>
class ScaleShiftResidualAct {
 public:
  using ElementOutput = Element;
  using ElementC = Element;
  using ElementZ = Element;
  using ElementT = Element;
  using ElementAccumulator = float;
  using ElementCompute = ScaleShift;  // the epilogue keeps the broadcast fragment in this type
  using ElementVector = ScaleShift;
  static int const kCount = kN;  // elements per call (one 16-byte vector of the output)

  static bool const kIsSingleSource = true;
  static bool const kStoreZ = true;
  static bool const kStoreT = false;

  using FragmentAccumulator = cutlass::Array<ElementAccumulator, kN>;
  using FragmentCompute = cutlass::Array<ElementCompute, kN>;
  using FragmentC = cutlass::Array<ElementC, kN>;
  using FragmentZ = cutlass::Array<ElementZ, kN>;
  using FragmentT = cutlass::Array<ElementT, kN>;
  using FragmentOutput = FragmentZ;

  struct Params {
    bool with_residual = false;  // read tensor C and add it
    bool relu = false;           // act = ReLU, else identity
  };

  CUTLASS_HOST_DEVICE
  explicit ScaleShiftResidualAct(Params const& params) : with_residual_(params.with_residual), relu_(params.relu) {}

  // The epilogue loads tensor C only when this is true.
  CUTLASS_HOST_DEVICE
  bool is_source_needed() const { return with_residual_; }

  // Serial split-K is never used (split_k_slices = 1): there is no partial-sum state to track.
  CUTLASS_HOST_DEVICE
  void set_k_partition(int, int) {}

  // Z = act(AB·s + t + C).
  CUTLASS_HOST_DEVICE
  void operator()(FragmentZ& frag_Z, FragmentT&, FragmentAccumulator const& AB, FragmentC const& frag_C,
                  FragmentCompute const& V) const {
    cutlass::NumericArrayConverter<float, ElementC, kN> to_float;
    const cutlass::Array<float, kN> c = to_float(frag_C);
    cutlass::Array<float, kN> z;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kN; ++i) {
      z[i] = act(fmaf(AB[i], V[i].s, V[i].t) + c[i]);
    }
    cutlass::NumericArrayConverter<ElementZ, float, kN> to_output;
    frag_Z = to_output(z);
  }

  // Z = act(AB·s + t)  (is_source_needed() == false).
  CUTLASS_HOST_DEVICE
  void operator()(FragmentZ& frag_Z, FragmentT&, FragmentAccumulator const& AB, FragmentCompute const& V) const {
    cutlass::Array<float, kN> z;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kN; ++i) {
      z[i] = act(fmaf(AB[i], V[i].s, V[i].t));
    }
    cutlass::NumericArrayConverter<ElementZ, float, kN> to_output;
    frag_Z = to_output(z);
  }

 private:
  // ReLU that propagates NaN like torch.relu (NaN < 0 is false).
  CUTLASS_HOST_DEVICE
  float act(float v) const { return relu_ && v < 0.f ? 0.f : v; }

  bool with_residual_;
  bool relu_;
};

// The fprop kernel per dtype (cutlass::half_t, cutlass::bfloat16_t) and tile configuration (conv_cutlass_common.h:
// Tile128x128, Tile128x64), with the runtime-width swizzle.
template <typename Element, typename Tile>
struct Fprop {
  static constexpr int kAccess = 128 / cutlass::sizeof_bits<Element>::value;  // 8 elements = 16 bytes
  using OutputOp = ScaleShiftResidualAct<Element, kAccess>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      Element, cutlass::layout::TensorNHWC,  // A: activations x
      Element, cutlass::layout::TensorNHWC,  // B: filters w, KRSC
      Element, cutlass::layout::TensorNHWC,  // C (residual) and D (out)
      float,                                 // accumulator
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, typename Tile::ThreadblockShape,
      typename Tile::WarpShape, cutlass_conv::InstructionShape, OutputOp, cutlass_conv::Swizzle, Tile::kStages,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  // Only for its static can_implement(): the kernel is launched directly (cutlass_conv::launch).
  using Conv = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

// Shared memory per threadblock (the mainloop's stages; the epilogue's storage shares it), as documented above.
static_assert(sizeof(Fprop<cutlass::half_t, cutlass_conv::Tile128x128>::Kernel::SharedStorage) == 96 * 1024,
              "128x128x64 tile, 3 stages: 96 KiB of shared memory");
static_assert(sizeof(Fprop<cutlass::bfloat16_t, cutlass_conv::Tile128x64>::Kernel::SharedStorage) == 72 * 1024,
              "128x64x64 tile, 3 stages: 72 KiB of shared memory");

// The tile for a problem: 128x64 for K <= 64 output channels (a 128-wide tile would be half empty), else 128x128.
bool narrow_tile(const cutlass::conv::Conv2dProblemSize& p) { return p.K <= 64; }

// The epilogue loads 8 (s, t) pairs (64 bytes) at column offsets that are multiples of 8.
constexpr std::uintptr_t kScaleShiftAlignment = 64;

std::atomic<int64_t> g_launches{0};
thread_local std::string g_last_config;

// One call's problem in CUTLASS's terms, filled by prepare() when the call is covered.
struct Call {
  cutlass::conv::Conv2dProblemSize problem;
  void* x;
  void* w;
  void* residual;           // nullptr when absent
  void* out;                // set only when launching (a mutable pointer)
  ScaleShift* scale_shift;  // [K] pairs; nullptr for the coverage question alone
  bool relu;
};

template <typename Element, typename Tile>
typename Fprop<Element, Tile>::Kernel::Arguments arguments(const Call& c) {
  using Layout = cutlass::layout::TensorNHWC;
  const auto& p = c.problem;
  const Layout x_layout = Layout::packed({p.N, p.H, p.W, p.C});
  const Layout w_layout = Layout::packed({p.K, p.R, p.S, p.C});
  const Layout out_layout = Layout::packed({p.N, p.P, p.Q, p.K});
  auto* out = static_cast<Element*>(c.out);
  // Without a residual the source tensor is never read (is_source_needed() is false): point it at out.
  auto* source = c.residual != nullptr ? static_cast<Element*>(c.residual) : out;
  typename Fprop<Element, Tile>::OutputOp::Params op;
  op.with_residual = c.residual != nullptr;
  op.relu = c.relu;
  return typename Fprop<Element, Tile>::Kernel::Arguments(
      p, {static_cast<Element*>(c.x), x_layout}, {static_cast<Element*>(c.w), w_layout}, {source, out_layout},
      {out, out_layout}, op, cutlass::conv::SplitKMode::kSerial,
      /*ptr_Vector=*/c.scale_shift, /*ptr_Tensor=*/nullptr, /*ldr=*/0, /*ldt=*/0);
}

template <typename Element, typename Tile>
bool can_implement(const Call& c) {
  return Fprop<Element, Tile>::Conv::can_implement(arguments<Element, Tile>(c)) == cutlass::Status::kSuccess;
}

bool can_implement(const Call& c, at::ScalarType dtype) {
  const bool narrow = narrow_tile(c.problem);
  if (dtype == at::kHalf) {
    return narrow ? can_implement<cutlass::half_t, cutlass_conv::Tile128x64>(c)
                  : can_implement<cutlass::half_t, cutlass_conv::Tile128x128>(c);
  }
  return narrow ? can_implement<cutlass::bfloat16_t, cutlass_conv::Tile128x64>(c)
                : can_implement<cutlass::bfloat16_t, cutlass_conv::Tile128x128>(c);
}

// Fills `call` and returns nullptr when the kernels cover the arguments (rules in conv_cutlass.h), else why not.
const char* prepare(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale_shift,
                    const at::Tensor& residual, const at::Tensor& out, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu, Call& call) {
  constexpr const char* fn = "resnet_fused::cutlass_conv_fprop";
  if (const char* why = cutlass_conv::conv_problem(fn, x, w, out, stride, padding, dilation, groups, call.problem)) {
    return why;
  }
  if (residual.defined()) {
    TORCH_CHECK(residual.sizes() == out.sizes(), fn, ": residual must have out's shape ", out.sizes(), ", got ",
                residual.sizes());
    if (!cutlass_conv::like_x(residual, x)) {
      return "the residual is not dense channels_last with 16-byte aligned data in x's dtype";
    }
  }
  // An undefined scale_shift: the coverage question alone (cutlass_conv_fprop_uncovered).
  if (scale_shift.defined()) {
    TORCH_CHECK(scale_shift.scalar_type() == at::kFloat && scale_shift.dim() == 2 &&
                    scale_shift.size(0) == w.size(0) && scale_shift.size(1) == 2,
                fn, ": scale_shift must be float32 [K = ", w.size(0), ", 2]");
    if (scale_shift.device() != x.device() || !scale_shift.is_contiguous() ||
        !cutlass_conv::aligned(scale_shift.const_data_ptr(), kScaleShiftAlignment)) {
      return "scale_shift is not contiguous and 64-byte aligned on x's device";
    }
  }
  call.x = const_cast<void*>(x.const_data_ptr());
  call.w = const_cast<void*>(w.const_data_ptr());
  call.residual = residual.defined() ? const_cast<void*>(residual.const_data_ptr()) : nullptr;
  call.out = nullptr;
  call.scale_shift =
      scale_shift.defined() ? static_cast<ScaleShift*>(const_cast<void*>(scale_shift.const_data_ptr())) : nullptr;
  call.relu = relu;
  if (!can_implement(call, x.scalar_type())) {
    return "CUTLASS's can_implement refused the problem";
  }
  return nullptr;
}

// Launches the kernel of tile configuration Tile: its parameters as CUTLASS's device layer would make them, the
// swizzle width of swizzle_log_tile() in place of the template's, one launch (cutlass_conv::launch_swizzled).
template <typename Element, typename Tile>
void run(const Call& c, c10::DeviceIndex device) {
  using Kernel = typename Fprop<Element, Tile>::Kernel;
  typename Kernel::Params params(arguments<Element, Tile>(c), /*semaphore=*/nullptr);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  cutlass_conv::launch_swizzled<Kernel>("CUTLASS conv fprop", params, c.problem, stream, device);
  g_last_config = std::to_string(Tile::ThreadblockShape::kM) + "x" + std::to_string(Tile::ThreadblockShape::kN) +
                  "x" + std::to_string(Tile::ThreadblockShape::kK) + "/" + std::to_string(Tile::kStages) +
                  " swizzle " + std::to_string(1 << params.swizzle_log_tile);
}

}  // namespace

std::string cutlass_conv_fprop_uncovered(const at::Tensor& x, const at::Tensor& w, const at::Tensor& residual,
                                         const at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups) {
  Call call;
  const char* why = prepare(x, w, at::Tensor(), residual, out, stride, padding, dilation, groups, false, call);
  return why != nullptr ? why : "";
}

bool cutlass_conv_fprop(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale_shift,
                        const at::Tensor& residual, at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool relu, std::string* why) {
  TORCH_CHECK(scale_shift.defined(), "resnet_fused::cutlass_conv_fprop: scale_shift is required");
  Call call;
  if (const char* reason = prepare(x, w, scale_shift, residual, out, stride, padding, dilation, groups, relu, call)) {
    if (why != nullptr) {
      *why = reason;
    }
    return false;
  }
  call.out = out.mutable_data_ptr();
  const c10::cuda::CUDAGuard guard(x.device());
  const bool narrow = narrow_tile(call.problem);
  if (x.scalar_type() == at::kHalf) {
    narrow ? run<cutlass::half_t, cutlass_conv::Tile128x64>(call, x.get_device())
           : run<cutlass::half_t, cutlass_conv::Tile128x128>(call, x.get_device());
  } else {
    narrow ? run<cutlass::bfloat16_t, cutlass_conv::Tile128x64>(call, x.get_device())
           : run<cutlass::bfloat16_t, cutlass_conv::Tile128x128>(call, x.get_device());
  }
  return true;
}

std::string cutlass_last_config() { return g_last_config; }

std::string cutlass_version() {
  return std::to_string(CUTLASS_MAJOR) + "." + std::to_string(CUTLASS_MINOR) + "." + std::to_string(CUTLASS_PATCH);
}

int64_t cutlass_conv_launches() { return g_launches.load(std::memory_order_relaxed); }

void cutlass_conv::count_launch() { g_launches.fetch_add(1, std::memory_order_relaxed); }

#endif  // RESNET_FUSED_WITH_CUTLASS

}  // namespace resnet_fused
