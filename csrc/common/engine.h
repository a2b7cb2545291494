// The engines of the CUDA ops conv_bn_act and conv_stats, and the order in which a call tries them.
//
//   cudnn    cuDNN's fusion graphs (csrc/cudnn/, built with the cuDNN frontend headers)
//   cutlass  this extension's CUTLASS kernels (csrc/cutlass/)
//   plain    cuDNN's convolution (at::convolution) plus this extension's fused channel passes (csrc/cuda/): runs every
//            valid call
//
// Each op takes the engines to try as a string: "auto" (the default order: cudnn, cutlass, plain) or a comma-separated
// list of distinct names ("cutlass", "cutlass,cudnn,plain"). An engine that cannot run a call declines with its
// reason, launching nothing, and the next one runs it; when none can, the op raises (decline()) with every reason,
// so a single forced engine raises its own. Python picks the order per call (resnet_fused/backends/cuda.py:
// forced engine, else the measured fastest first). The CPU kernels have one implementation and only validate it.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace resnet_fused {
namespace engine {

enum class Engine : int { kCudnn = 0, kCutlass = 1, kPlain = 2 };
inline constexpr int kEngines = 3;

const char* name(Engine e);

// The engines of one call, in the order they are tried.
struct Order {
  Engine engines[kEngines];
  int count = 0;
};

// Parses an op's engine argument (TORCH_CHECK, naming `op`, on an unknown or repeated name or an empty list).
Order parse(const char* op, std::string_view spec);

// Raises the op's error for a call no engine of `order` accepted; reasons[i] is why order.engines[i] declined.
// With one engine the message is "<op>: engine '<name>' cannot run this call: <reason>" (how Python's measurement
// tells a decline from a failure).
[[noreturn]] void decline(const char* op, const Order& order, const std::vector<std::string>& reasons);

// Notes that engine `e` ran this thread's last conv_bn_act / conv_stats call, with a detail (e.g. CUTLASS's tile
// configuration); last_engine() returns "<name>[ <detail>]", "" before any (_C.last_engine(), the provenance that
// resnet_fused.backends.cuda.engine_choices() reports).
void record(Engine e, const std::string& detail = "");
std::string last_engine();

// One op call on the first engine of `order` that accepts it: try_engine(e, out) returns "" having run e (its result
// in `out`), else why e declined, having launched nothing. The engine that ran is recorded (with detail(e) when a
// `detail` function is given); when none accepted, decline() raises with every reason.
template <typename Result, typename Try>
Result run_first(const char* op, const Order& order, Try&& try_engine, std::string (*detail)(Engine) = nullptr) {
  std::vector<std::string> reasons;
  for (int i = 0; i < order.count; ++i) {
    const Engine e = order.engines[i];
    Result out;
    std::string why = try_engine(e, out);
    if (why.empty()) {
      record(e, detail != nullptr ? detail(e) : "");
      return out;
    }
    reasons.push_back(std::move(why));
  }
  decline(op, order, reasons);
}

}  // namespace engine
}  // namespace resnet_fused
