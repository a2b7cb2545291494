// The engine argument of the CUDA ops (engine.h): parsing, the error when every engine declines, what ran.
#include "engine.h"

#include <c10/util/Exception.h>

#include <string>

namespace resnet_fused {
namespace engine {

namespace {

thread_local std::string g_last;

}  // namespace

const char* name(Engine e) {
  switch (e) {
    case Engine::kCudnn:
      return "cudnn";
    case Engine::kCutlass:
      return "cutlass";
    case Engine::kPlain:
      return "plain";
  }
  return "?";
}

Order parse(const char* op, std::string_view spec) {
  Order order;
  if (spec == "auto") {
    order.engines[0] = Engine::kCudnn;
    order.engines[1] = Engine::kCutlass;
    order.engines[2] = Engine::kPlain;
    order.count = kEngines;
    return order;
  }
  std::string_view rest = spec;
  while (true) {
    const size_t comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    bool known = false;
    for (int i = 0; i < kEngines; ++i) {
      const Engine e = static_cast<Engine>(i);
      if (item == name(e)) {
        for (int j = 0; j < order.count; ++j) {
          TORCH_CHECK(order.engines[j] != e, op, ": engine '", name(e), "' is listed twice in '", spec, "'");
        }
        order.engines[order.count++] = e;
        known = true;
      }
    }
    TORCH_CHECK(known, op, ": unknown engine '", item, "' in '", spec,
                "': the engine argument is 'auto' or a comma-separated list of cudnn, cutlass, plain");
    if (comma == std::string_view::npos) {
      break;
    }
    rest = rest.substr(comma + 1);
  }
  return order;
}

void decline(const char* op, const Order& order, const std::vector<std::string>& reasons) {
  if (order.count == 1) {
    TORCH_CHECK(false, op, ": engine '", name(order.engines[0]), "' cannot run this call: ", reasons.at(0));
  }
  std::string list, all;
  for (int i = 0; i < order.count; ++i) {
    list += std::string(i > 0 ? "," : "") + name(order.engines[i]);
    all += std::string(i > 0 ? "; " : "") + name(order.engines[i]) + ": " + reasons.at(i);
  }
  TORCH_CHECK(false, op, ": none of the engines '", list, "' can run this call (", all, ")");
}

void record(Engine e, const std::string& detail) { g_last = detail.empty() ? name(e) : name(e) + (" " + detail); }

std::string last_engine() { return g_last; }

}  // namespace engine
}  // namespace resnet_fused
