// The cuDNN support report's driver (benchmarks/cudnn_report.py): plans resnet_fused's own fusion graphs
// (csrc/cudnn/graphs.cpp, compiled into this program unchanged) for a device profile, with no GPU.
//
// stdin: a device-properties JSON line, then one case per line:
//   id kind io vec layout N C H W K R S stride pad prologue residual relu autotune
// (kind: conv_scale_bias_act | conv_genstats | conv_dgrad_drelu | conv_dgrad_drelu_bn | conv_wgrad; io / vec:
// fp16 | bf16 | fp32; layout: nhwc | nchw; flags 0/1). The tensors are those cudnn_graph.cpp's ops give the engine:
// activations [N, C, H, W] and weights [K, C, R, S] with the layout's strides (weights channels_last with NHWC),
// per-channel vectors [1, C, 1, 1] strides {C, 1, C, C}; `vec` is the prologue's / eval graph's scale and shift
// dtype; the statistics and BN-backward vectors are fp32, as the ops require.
// stdout: one JSON object per case.
#include <array>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

#include "../../csrc/cudnn/graph_spec.h"

#include <cudnn.h>

namespace d = resnet_fused::cudnn_graph::detail;

namespace {

d::DType dtype(const std::string& s) {
  if (s == "fp16") return d::DType::kHalf;
  if (s == "bf16") return d::DType::kBFloat16;
  if (s == "fp32") return d::DType::kFloat;
  throw std::runtime_error("unknown dtype " + s);
}

d::Kind kind(const std::string& s) {
  if (s == "conv_scale_bias_act") return d::Kind::kConvScaleBiasAct;
  if (s == "conv_genstats") return d::Kind::kConvGenstats;
  if (s == "conv_dgrad_drelu") return d::Kind::kDgradDrelu;
  if (s == "conv_dgrad_drelu_bn") return d::Kind::kDgradDreluDbn;
  if (s == "conv_wgrad") return d::Kind::kWgrad;
  throw std::runtime_error("unknown kind " + s);
}

std::array<int64_t, 4> strides(const std::array<int64_t, 4>& n, bool nhwc) {
  if (nhwc) return {n[1] * n[2] * n[3], 1, n[3] * n[1], n[1]};
  return {n[1] * n[2] * n[3], n[2] * n[3], n[3], 1};
}

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (ch == '\n') {
      out += "\\n";
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      out += ' ';
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

}  // namespace

int main() {
  std::string json;
  std::getline(std::cin, json);
  d::DeviceProfile profile;
  profile.json = json;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    std::istringstream in(line);
    std::string id, kind_s, io_s, vec_s, layout;
    int64_t N, C, H, W, K, R, S, stride, pad;
    int prologue, residual, relu, autotune;
    in >> id >> kind_s >> io_s >> vec_s >> layout >> N >> C >> H >> W >> K >> R >> S >> stride >> pad >> prologue >>
        residual >> relu >> autotune;
    d::GraphSpec s;
    s.kind = kind(kind_s);
    s.io = dtype(io_s);
    const d::DType vec = dtype(vec_s), f32 = d::DType::kFloat;
    const bool nhwc = layout == "nhwc";
    const int64_t P = (H + 2 * pad - R) / stride + 1, Q = (W + 2 * pad - S) / stride + 1;
    s.stride = {stride, stride};
    s.padding = {pad, pad};
    s.relu = relu != 0;
    s.allow_tf32 = true;  // torch.backends.cudnn.allow_tf32's default; fp32 io runs only as TF32
    const std::array<int64_t, 4> x{N, C, H, W}, w{K, C, R, S}, y{N, K, P, Q};
    auto act = [&](int role, const std::array<int64_t, 4>& dims) { s.set(role, s.io, dims, strides(dims, nhwc)); };
    auto vector = [&](int role, d::DType t, int64_t c) { s.set(role, t, {1, c, 1, 1}, {c, 1, c, c}); };
    switch (s.kind) {
      case d::Kind::kConvScaleBiasAct:
        act(d::X, x), act(d::W, w), vector(d::SCALE, vec, K), vector(d::SHIFT, vec, K), act(d::Y, y);
        if (residual) act(d::RESIDUAL, y);
        break;
      case d::Kind::kConvGenstats:
        act(d::X, x), act(d::W, w), act(d::Y, y), vector(d::SUM, f32, K), vector(d::SQ_SUM, f32, K);
        if (prologue) vector(d::SCALE, vec, C), vector(d::SHIFT, vec, C);
        break;
      case d::Kind::kDgradDrelu:
        act(d::DY, y), act(d::W, w), act(d::X, x), act(d::DX, x);
        if (prologue) vector(d::SCALE, vec, C), vector(d::SHIFT, vec, C);
        break;
      case d::Kind::kDgradDreluDbn:
        act(d::DY, y), act(d::W, w), act(d::X, x), act(d::DX, x);
        for (int role : {d::MEAN, d::INV_STD, d::GAMMA, d::BETA, d::DGAMMA, d::DBETA, d::EQ_SCALE_DY, d::EQ_SCALE_X,
                         d::EQ_BIAS}) {
          vector(role, f32, C);
        }
        break;
      case d::Kind::kWgrad:
        act(d::DY, y), act(d::X, x), act(d::DW, w);
        if (prologue) vector(d::SCALE, vec, C), vector(d::SHIFT, vec, C);
        break;
    }
    const d::PlanReport r = d::plan_deviceless(s, profile, autotune != 0);
    std::cout << "{\"id\": " << quote(id) << ", \"ok\": " << (r.ok ? "true" : "false")
              << ", \"step\": " << quote(r.step) << ", \"permanent\": " << (r.permanent ? "true" : "false")
              << ", \"engine\": " << quote(r.engine) << ", \"workspace\": " << r.workspace
              << ", \"reason\": " << quote(r.reason) << ", \"spec\": " << quote(s.describe())
              << ", \"cudnn\": " << cudnnGetVersion() << "}" << std::endl;
  }
  return 0;
}
