// Helper of the `ringattn attend` tests: makes seeded inputs and the f64 oracle's answer as
// .npy files, and compares outputs against them.
//   attend_check gen DIR B N H H_kv D SEED [--causal] [--window W] [--sinks S] [--sink-logits]
// gen writes q, k, v, (z,) dout and the oracle's o_ref, lse_ref, dq_ref, dk_ref, dv_ref and
// dsink_ref (zeros without --sink-logits).
//   attend_check compare GOT.npy WANT.npy TOL
// compare prints the normalised error and exits 1 when it exceeds TOL (or on NaN or a shape
// mismatch); -inf must match -inf exactly.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/attention_ref.h"
#include "runtime/src/npy.h"

using namespace ringattn;

namespace {

int gen(int argc, char** argv) {
  if (argc < 9) {
    std::fprintf(stderr, "usage: attend_check gen DIR B N H H_kv D SEED [flags]\n");
    return 2;
  }
  const std::string dir = argv[2];
  const int64_t B = std::atoll(argv[3]), N = std::atoll(argv[4]), H = std::atoll(argv[5]),
                Hkv = std::atoll(argv[6]), D = std::atoll(argv[7]);
  std::mt19937 rng(static_cast<uint32_t>(std::atoll(argv[8])));
  AttentionSpec spec;
  bool with_z = false;
  for (int i = 9; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--causal"))
      spec.causal = true;
    else if (!std::strcmp(argv[i], "--window"))
      spec.window = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--sinks"))
      spec.sinks = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--sink-logits"))
      with_z = true;
  }
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> q(static_cast<size_t>(B * N * H * D)), k(static_cast<size_t>(B * N * Hkv * D)),
      v(k.size()), z(static_cast<size_t>(H));
  for (float& x : q) x = nd(rng);
  for (float& x : k) x = nd(rng);
  for (float& x : v) x = nd(rng);
  for (float& x : z) x = 2.0f * nd(rng);
  npy::write_f32(dir + "/q.npy", {B, N, H, D}, q.data());
  npy::write_f32(dir + "/k.npy", {B, N, Hkv, D}, k.data());
  npy::write_f32(dir + "/v.npy", {B, N, Hkv, D}, v.data());
  if (with_z) npy::write_f32(dir + "/z.npy", {H}, z.data());
  std::vector<int64_t> pos(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) pos[i] = i;
  const TensorView tq(q.data(), DType::kF32, {B, N, H, D});
  const TensorView tk(k.data(), DType::kF32, {B, N, Hkv, D});
  const TensorView tv(v.data(), DType::kF32, {B, N, Hkv, D});
  const TensorView tz(z.data(), DType::kF32, {H});
  const ref::RefOutput r =
      ref::attention_forward(spec, tq, pos.data(), tk, tv, pos.data(), with_z ? &tz : nullptr);
  std::vector<float> o(r.o.begin(), r.o.end()), lse(r.lse.begin(), r.lse.end());
  npy::write_f32(dir + "/o_ref.npy", {B, N, H, D}, o.data());
  npy::write_f32(dir + "/lse_ref.npy", {B, H, N}, lse.data());
  // The backward: drawn after the forward's inputs, so those stay what they were.
  std::vector<float> dout(q.size());
  for (float& x : dout) x = nd(rng);
  npy::write_f32(dir + "/dout.npy", {B, N, H, D}, dout.data());
  const TensorView tdo(dout.data(), DType::kF32, {B, N, H, D});
  const ref::RefGrads g = ref::attention_backward(spec, tq, pos.data(), tk, tv, pos.data(),
                                                  with_z ? &tz : nullptr, tdo);
  const std::vector<float> dq(g.dq.begin(), g.dq.end()), dk(g.dk.begin(), g.dk.end()),
      dv(g.dv.begin(), g.dv.end()), dsink(g.dsink.begin(), g.dsink.end());
  npy::write_f32(dir + "/dq_ref.npy", {B, N, H, D}, dq.data());
  npy::write_f32(dir + "/dk_ref.npy", {B, N, Hkv, D}, dk.data());
  npy::write_f32(dir + "/dv_ref.npy", {B, N, Hkv, D}, dv.data());
  npy::write_f32(dir + "/dsink_ref.npy", {H}, dsink.data());
  return 0;
}

int compare(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: attend_check compare GOT.npy WANT.npy TOL\n");
    return 2;
  }
  std::vector<int64_t> sg, sw;
  const std::vector<float> got = npy::read_f32(argv[2], &sg);
  const std::vector<float> want = npy::read_f32(argv[3], &sw);
  const double tol = std::atof(argv[4]);
  if (sg != sw) {
    std::fprintf(stderr, "compare: shape of %s differs from %s\n", argv[2], argv[3]);
    return 1;
  }
  double err = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i])) {
      std::fprintf(stderr, "compare: %s[%zu] is NaN\n", argv[2], i);
      return 1;
    }
    if (std::isinf(want[i]) || std::isinf(got[i])) {
      if (got[i] != want[i]) {
        std::fprintf(stderr, "compare: %s[%zu] = %g, want %g\n", argv[2], i, got[i], want[i]);
        return 1;
      }
      continue;
    }
    err += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  const double rel = std::sqrt(err / std::max(norm, 1e-300));
  std::printf("compare: %s vs %s: normalised error %.3e (tolerance %.1e)\n", argv[2], argv[3], rel,
              tol);
  return rel <= tol ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc >= 2 && !std::strcmp(argv[1], "gen")) return gen(argc, argv);
    if (argc >= 2 && !std::strcmp(argv[1], "compare")) return compare(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "attend_check: %s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "usage: attend_check gen|compare ...\n");
  return 2;
}
