// The f64 oracle (kernels/cpu/attention_ref) against independent computations: a tiny case
// worked by hand, a direct formulation written here with a different loop structure
// (log-sum-exp first, then o = sum exp(s - lse) v), structural identities (GQA = MHA over
// repeated kv heads, permutation of tokens with their positions), and for the backward,
// central finite differences of the forward with Richardson extrapolation.

#include "kernels/cpu/attention_ref.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "ringattn/attention.h"
#include "ringattn/tensor.h"

namespace ringattn {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// One attention problem in f32 storage, [B, N, H, D] / [B, Nk, H_kv, D].
struct Problem {
  int64_t B = 1, Nq = 1, Nk = 1, H = 1, Hkv = 1, D = 1;
  AttentionSpec spec;
  bool has_z = false;
  std::vector<float> q, k, v, z;
  std::vector<int64_t> q_pos, k_pos;

  TensorView qv() { return TensorView(q.data(), DType::kF32, {B, Nq, H, D}); }
  TensorView kv() { return TensorView(k.data(), DType::kF32, {B, Nk, Hkv, D}); }
  TensorView vv() { return TensorView(v.data(), DType::kF32, {B, Nk, Hkv, D}); }
  TensorView zv() { return TensorView(z.data(), DType::kF32, {H}); }
  size_t qi(int64_t b, int64_t n, int64_t h, int64_t c) const {
    return static_cast<size_t>(((b * Nq + n) * H + h) * D + c);
  }
  size_t ki(int64_t b, int64_t n, int64_t h, int64_t c) const {
    return static_cast<size_t>(((b * Nk + n) * Hkv + h) * D + c);
  }
  size_t li(int64_t b, int64_t h, int64_t n) const {
    return static_cast<size_t>((b * H + h) * Nq + n);
  }
};

ref::RefOutput run_forward(Problem& p) {
  TensorView zv = p.zv();
  return ref::attention_forward(p.spec, p.qv(), p.q_pos.data(), p.kv(), p.vv(), p.k_pos.data(),
                                p.has_z ? &zv : nullptr);
}

// Values on a 2^-9 grid in [-2, 2], so that x +- 2^-8 and x +- 2^-7 are exact in f32.
float grid_value(std::mt19937& rng) {
  return static_cast<float>(static_cast<int>(rng() % 2049) - 1024) / 512.0f;
}

Problem random_problem(uint32_t seed, int64_t B, int64_t N, int64_t H, int64_t Hkv, int64_t D) {
  std::mt19937 rng(seed);
  Problem p;
  p.B = B;
  p.Nq = p.Nk = N;
  p.H = H;
  p.Hkv = Hkv;
  p.D = D;
  p.q.resize(static_cast<size_t>(B * N * H * D));
  p.k.resize(static_cast<size_t>(B * N * Hkv * D));
  p.v.resize(p.k.size());
  for (float& x : p.q) x = grid_value(rng);
  for (float& x : p.k) x = grid_value(rng);
  for (float& x : p.v) x = grid_value(rng);
  p.z.resize(static_cast<size_t>(H));
  for (float& x : p.z) x = grid_value(rng);
  p.q_pos.resize(static_cast<size_t>(N));
  std::iota(p.q_pos.begin(), p.q_pos.end(), 0);
  p.k_pos = p.q_pos;
  return p;
}

// SPEC section 2, written out from the text: causal first, then the window with sinks.
bool spec_visible(const AttentionSpec& s, int64_t i, int64_t j) {
  if (s.causal && j > i) return false;
  if (s.window == 0) return true;
  if (j < s.sinks) return true;
  const int64_t dist = s.causal ? i - j : std::llabs(i - j);
  return dist < s.window;
}

// Direct formulation: for each (b, i, h) gather the visible logits, lse by log-sum-exp
// (with exp(z) in the sum), then o = sum_j exp(s_j - lse) v_j. kv head = h * H_kv / H.
ref::RefOutput direct(const Problem& p) {
  ref::RefOutput out;
  out.o.assign(p.q.size(), 0.0);
  out.lse.assign(static_cast<size_t>(p.B * p.H * p.Nq), 0.0);
  // The default scale is 1/sqrt(D) rounded to f32 (AttentionSpec::scale is an f32 everywhere).
  const double scale = p.spec.scale != 0.0f
                           ? p.spec.scale
                           : static_cast<double>(static_cast<float>(1.0 / std::sqrt(p.D)));
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t i = 0; i < p.Nq; ++i) {
      for (int64_t h = 0; h < p.H; ++h) {
        const int64_t hk = h * p.Hkv / p.H;
        std::vector<std::pair<int64_t, double>> logits;  // (key index, scaled logit)
        for (int64_t j = 0; j < p.Nk; ++j) {
          if (!spec_visible(p.spec, p.q_pos[static_cast<size_t>(i)],
                            p.k_pos[static_cast<size_t>(j)]))
            continue;
          double dot = 0.0;
          for (int64_t c = 0; c < p.D; ++c) {
            dot += static_cast<double>(p.q[p.qi(b, i, h, c)]) * p.k[p.ki(b, j, hk, c)];
          }
          logits.emplace_back(j, scale * dot);
        }
        std::vector<double> terms;
        for (const auto& [j, s] : logits) terms.push_back(s);
        if (p.has_z) terms.push_back(p.z[static_cast<size_t>(h)]);
        double lse = -kInf;
        if (!terms.empty()) {
          const double mx = *std::max_element(terms.begin(), terms.end());
          double sum = 0.0;
          for (double t : terms) sum += std::exp(t - mx);
          lse = mx + std::log(sum);
        }
        out.lse[p.li(b, h, i)] = lse;
        for (const auto& [j, s] : logits) {
          const double w = std::exp(s - lse);
          for (int64_t c = 0; c < p.D; ++c) out.o[p.qi(b, i, h, c)] += w * p.v[p.ki(b, j, hk, c)];
        }
      }
    }
  }
  return out;
}

void expect_outputs_near(const ref::RefOutput& got, const ref::RefOutput& want, double tol,
                         const std::string& what) {
  ASSERT_EQ(got.o.size(), want.o.size()) << what;
  ASSERT_EQ(got.lse.size(), want.lse.size()) << what;
  for (size_t i = 0; i < want.o.size(); ++i) {
    ASSERT_FALSE(std::isnan(got.o[i])) << what << " o[" << i << "]";
    ASSERT_NEAR(got.o[i], want.o[i], tol) << what << " o[" << i << "]";
  }
  for (size_t i = 0; i < want.lse.size(); ++i) {
    if (std::isinf(want.lse[i])) {
      ASSERT_EQ(got.lse[i], want.lse[i]) << what << " lse[" << i << "]";
    } else {
      ASSERT_NEAR(got.lse[i], want.lse[i], tol * (1 + std::fabs(want.lse[i])))
          << what << " lse[" << i << "]";
    }
  }
}

struct MaskCase {
  const char* name;
  bool causal;
  int64_t window;
  int64_t sinks;
  bool learned_sink;
  float scale;
};

const MaskCase kMaskCases[] = {
    {"full", false, 0, 0, false, 0.0f},
    {"causal", true, 0, 0, false, 0.0f},
    {"causal_window2", true, 2, 0, false, 0.0f},
    {"window2", false, 2, 0, false, 0.0f},
    {"causal_window2_sinks2", true, 2, 2, false, 0.0f},
    {"window1_sinks1", false, 1, 1, false, 0.0f},
    {"causal_window3_sinks5", true, 3, 5, false, 0.0f},  // more sinks than some positions
    {"causal_learned_sink", true, 0, 0, true, 0.0f},
    {"learned_sink_window_sinks_scale", false, 2, 1, true, 0.37f},
    {"custom_scale", true, 0, 0, false, 1.75f},
};

void apply(Problem& p, const MaskCase& m) {
  p.spec.causal = m.causal;
  p.spec.window = m.window;
  p.spec.sinks = m.sinks;
  p.spec.scale = m.scale;
  p.has_z = m.learned_sink;
}

// ---------------------------------------------------------------------------------------------
// Hand-computed tiny case: N = 3, D = 2, H = 1, scale = 1.
//   q = [1,0], [0,0], [0,2]     k = [1,0], [0,1], [0,0]     v = [1,2], [3,4], [5,6]
// Non-causal logits q.k:
//   row 0: [1, 0, 0] -> p = [e, 1, 1] / (e + 2)
//          o = (e[1,2] + [3,4] + [5,6]) / (e+2) = [(e+8), (2e+10)] / (e+2), lse = log(e+2)
//   row 1: [0, 0, 0] -> uniform, o = [3, 4], lse = log 3
//   row 2: [0, 2, 0] -> p = [1, e^2, 1] / (e^2 + 2)
//          o = ([1,2] + e^2[3,4] + [5,6]) / (e^2+2) = [(6+3e^2), (8+4e^2)] / (e^2+2),
//          lse = log(e^2 + 2)
// Causal: row 0 sees key 0 only: o = [1,2], lse = 1; row 1 sees keys 0,1 with logits 0,0:
//   o = [2,3], lse = log 2; row 2 sees everything: as above.
Problem tiny_problem() {
  Problem p;
  p.Nq = p.Nk = 3;
  p.D = 2;
  p.q = {1, 0, 0, 0, 0, 2};
  p.k = {1, 0, 0, 1, 0, 0};
  p.v = {1, 2, 3, 4, 5, 6};
  p.q_pos = p.k_pos = {0, 1, 2};
  p.spec.scale = 1.0f;
  return p;
}

TEST(AttentionRef, TinyCaseByHandNonCausal) {
  Problem p = tiny_problem();
  const ref::RefOutput r = run_forward(p);
  const double e = std::exp(1.0), e2 = std::exp(2.0);
  const std::vector<double> o = {(e + 8) / (e + 2),       (2 * e + 10) / (e + 2), 3, 4,
                                 (6 + 3 * e2) / (e2 + 2), (8 + 4 * e2) / (e2 + 2)};
  const std::vector<double> lse = {std::log(e + 2), std::log(3.0), std::log(e2 + 2)};
  for (size_t i = 0; i < o.size(); ++i) EXPECT_NEAR(r.o[i], o[i], 1e-14) << i;
  for (size_t i = 0; i < lse.size(); ++i) EXPECT_NEAR(r.lse[i], lse[i], 1e-14) << i;
}

TEST(AttentionRef, TinyCaseByHandCausal) {
  Problem p = tiny_problem();
  p.spec.causal = true;
  const ref::RefOutput r = run_forward(p);
  const double e2 = std::exp(2.0);
  const std::vector<double> o = {1, 2, 2, 3, (6 + 3 * e2) / (e2 + 2), (8 + 4 * e2) / (e2 + 2)};
  const std::vector<double> lse = {1.0, std::log(2.0), std::log(e2 + 2)};
  for (size_t i = 0; i < o.size(); ++i) EXPECT_NEAR(r.o[i], o[i], 1e-14) << i;
  for (size_t i = 0; i < lse.size(); ++i) EXPECT_NEAR(r.lse[i], lse[i], 1e-14) << i;
}

TEST(AttentionRef, TinyCaseDefaultScaleIsInverseSqrtD) {
  // Row 1 has all-zero logits whatever the scale; row 0's logits are [1,0,0] * scale.
  Problem p = tiny_problem();
  p.spec.scale = 0.0f;
  const ref::RefOutput r = run_forward(p);
  const double s = 1.0 / std::sqrt(2.0), es = std::exp(s);
  EXPECT_NEAR(r.lse[0], std::log(es + 2), 1e-7);  // f32 scale: 1e-7 slack
  EXPECT_NEAR(r.o[0], (es + 8) / (es + 2), 1e-7);
  EXPECT_NEAR(r.lse[1], std::log(3.0), 1e-14);
}

TEST(AttentionRef, TinyCaseLearnedSink) {
  // Row 1 (logits 0,0,0) with z = log 5: lse = log(3 + 5) and o = [3,4] * 3/8.
  Problem p = tiny_problem();
  p.has_z = true;
  p.z = {static_cast<float>(std::log(5.0))};
  const ref::RefOutput r = run_forward(p);
  const double z = p.z[0];
  EXPECT_NEAR(r.lse[1], std::log(3.0 + std::exp(z)), 1e-14);
  EXPECT_NEAR(r.o[2], 3.0 * 3.0 / (3.0 + std::exp(z)), 1e-14);
  EXPECT_NEAR(r.o[3], 4.0 * 3.0 / (3.0 + std::exp(z)), 1e-14);
}

// ---------------------------------------------------------------------------------------------

class AttentionRefMask : public ::testing::TestWithParam<MaskCase> {};

TEST_P(AttentionRefMask, MatchesDirectFormulation) {
  const MaskCase& m = GetParam();
  for (auto [B, N, H, Hkv, D] : {std::array<int64_t, 5>{2, 9, 4, 2, 3},     // GQA
                                 std::array<int64_t, 5>{1, 11, 3, 1, 4},    // MQA
                                 std::array<int64_t, 5>{2, 7, 2, 2, 5}}) {  // MHA
    Problem p = random_problem(static_cast<uint32_t>(N * 31 + H), B, N, H, Hkv, D);
    apply(p, m);
    expect_outputs_near(run_forward(p), direct(p), 1e-12, m.name);
  }
}

TEST_P(AttentionRefMask, CrossAttentionWithArbitraryPositions) {
  // Queries of one shard (positions 6..10) against keys at scattered global positions.
  const MaskCase& m = GetParam();
  Problem p = random_problem(77, 2, 5, 4, 2, 3);
  p.q_pos = {6, 7, 8, 9, 10};
  p.Nk = 8;
  std::mt19937 rng(78);
  p.k.resize(static_cast<size_t>(p.B * p.Nk * p.Hkv * p.D));
  p.v.resize(p.k.size());
  for (float& x : p.k) x = grid_value(rng);
  for (float& x : p.v) x = grid_value(rng);
  p.k_pos = {11, 0, 9, 1, 4, 8, 2, 7};
  apply(p, m);
  expect_outputs_near(run_forward(p), direct(p), 1e-12, m.name);
}

TEST_P(AttentionRefMask, PermutingTokensWithTheirPositionsPermutesOutput) {
  const MaskCase& m = GetParam();
  Problem p = random_problem(5, 1, 8, 2, 1, 3);
  apply(p, m);
  const ref::RefOutput base = run_forward(p);
  // Permute queries (rows of q, q_pos) and keys (rows of k, v, k_pos) independently.
  const std::vector<size_t> perm_q = {3, 7, 0, 5, 1, 6, 2, 4}, perm_k = {6, 2, 7, 0, 4, 1, 5, 3};
  Problem s = p;
  const size_t qrow = static_cast<size_t>(p.H * p.D), krow = static_cast<size_t>(p.Hkv * p.D);
  for (size_t n = 0; n < 8; ++n) {
    std::copy_n(&p.q[perm_q[n] * qrow], qrow, &s.q[n * qrow]);
    std::copy_n(&p.k[perm_k[n] * krow], krow, &s.k[n * krow]);
    std::copy_n(&p.v[perm_k[n] * krow], krow, &s.v[n * krow]);
    s.q_pos[n] = p.q_pos[perm_q[n]];
    s.k_pos[n] = p.k_pos[perm_k[n]];
  }
  const ref::RefOutput r = run_forward(s);
  for (size_t n = 0; n < 8; ++n) {
    for (size_t x = 0; x < qrow; ++x) {
      ASSERT_NEAR(r.o[n * qrow + x], base.o[perm_q[n] * qrow + x], 1e-13) << m.name;
    }
    for (int64_t h = 0; h < p.H; ++h) {
      const double a = r.lse[p.li(0, h, static_cast<int64_t>(n))];
      const double b = base.lse[p.li(0, h, static_cast<int64_t>(perm_q[n]))];
      if (std::isinf(b))
        ASSERT_EQ(a, b);
      else
        ASSERT_NEAR(a, b, 1e-13) << m.name;
    }
  }
}

TEST_P(AttentionRefMask, GqaEqualsMhaOverRepeatedKvHeads) {
  const MaskCase& m = GetParam();
  for (int64_t Hkv : {1, 2}) {
    Problem g = random_problem(9, 2, 6, 6, Hkv, 3);
    apply(g, m);
    Problem mha = g;
    mha.Hkv = g.H;
    mha.k.assign(static_cast<size_t>(g.B * g.Nk * g.H * g.D), 0.0f);
    mha.v.assign(mha.k.size(), 0.0f);
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t n = 0; n < g.Nk; ++n)
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t c = 0; c < g.D; ++c) {
            const int64_t src = h / (g.H / g.Hkv);  // repeat_interleave
            mha.k[mha.ki(b, n, h, c)] = g.k[g.ki(b, n, src, c)];
            mha.v[mha.ki(b, n, h, c)] = g.v[g.ki(b, n, src, c)];
          }
    expect_outputs_near(run_forward(g), run_forward(mha), 1e-14, m.name);
  }
}

// --- backward against finite differences ------------------------------------------------------

double loss(Problem& p, const std::vector<double>& dout) {
  const ref::RefOutput r = run_forward(p);
  double sum = 0.0;
  for (size_t i = 0; i < dout.size(); ++i) sum += r.o[i] * dout[i];
  return sum;
}

// d loss / d x by central differences with Richardson extrapolation; x is on a 2^-9 grid so
// every perturbed value is exact in f32.
double numeric_grad(Problem& p, float& x, const std::vector<double>& dout) {
  const float x0 = x;
  auto central = [&](float h) {
    x = x0 + h;
    const double up = loss(p, dout);
    x = x0 - h;
    const double down = loss(p, dout);
    x = x0;
    return (up - down) / (2.0 * h);
  };
  const double d1 = central(1.0f / 128), d2 = central(1.0f / 256);
  return (4.0 * d2 - d1) / 3.0;
}

void check_grad(const std::vector<double>& analytic, std::vector<float>& param, Problem& p,
                const std::vector<double>& dout, const std::string& what) {
  ASSERT_EQ(analytic.size(), param.size()) << what;
  double max_abs = 0.0;
  for (double g : analytic) max_abs = std::max(max_abs, std::fabs(g));
  for (size_t i = 0; i < param.size(); ++i) {
    const double num = numeric_grad(p, param[i], dout);
    ASSERT_NEAR(analytic[i], num, 1e-6 * std::max(std::fabs(num), 0.1 * max_abs) + 1e-9)
        << what << "[" << i << "]";
  }
}

TEST_P(AttentionRefMask, BackwardMatchesFiniteDifferences) {
  const MaskCase& m = GetParam();
  Problem p = random_problem(123, 2, 5, 4, 2, 2);
  apply(p, m);
  std::mt19937 rng(321);
  std::vector<double> dout(p.q.size());
  for (double& x : dout) x = grid_value(rng);
  std::vector<float> dout_f(dout.begin(), dout.end());
  const TensorView dv(dout_f.data(), DType::kF32, {p.B, p.Nq, p.H, p.D});
  TensorView zv = p.zv();
  const ref::RefGrads g = ref::attention_backward(p.spec, p.qv(), p.q_pos.data(), p.kv(), p.vv(),
                                                  p.k_pos.data(), p.has_z ? &zv : nullptr, dv);
  check_grad(g.dq, p.q, p, dout, std::string(m.name) + " dq");
  check_grad(g.dk, p.k, p, dout, std::string(m.name) + " dk");
  check_grad(g.dv, p.v, p, dout, std::string(m.name) + " dv");
  ASSERT_EQ(g.dsink.size(), static_cast<size_t>(p.H));
  if (p.has_z) {
    check_grad(g.dsink, p.z, p, dout, std::string(m.name) + " dsink");
  } else {
    for (double x : g.dsink) EXPECT_EQ(x, 0.0);
  }
  // The gradients are not trivially zero.
  double norm = 0.0;
  for (double x : g.dk) norm += x * x;
  EXPECT_GT(norm, 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Masks, AttentionRefMask, ::testing::ValuesIn(kMaskCases),
                         [](const ::testing::TestParamInfo<MaskCase>& info) {
                           return std::string(info.param.name);
                         });

// ---------------------------------------------------------------------------------------------
// Specific mask facts, checked by how the output reacts to a change of one key.

// Returns whether changing v at key position `j` changes o for query row i.
bool depends_on_key(Problem p, int64_t i, int64_t j) {
  const ref::RefOutput before = run_forward(p);
  for (int64_t h = 0; h < p.Hkv; ++h)
    for (int64_t c = 0; c < p.D; ++c) p.v[p.ki(0, j, h, c)] += 1.0f;
  const ref::RefOutput after = run_forward(p);
  for (int64_t h = 0; h < p.H; ++h)
    for (int64_t c = 0; c < p.D; ++c)
      if (before.o[p.qi(0, i, h, c)] != after.o[p.qi(0, i, h, c)]) return true;
  return false;
}

TEST(AttentionRef, SinksVisibleThroughWindowButNeverFromTheFuture) {
  Problem p = random_problem(11, 1, 10, 1, 1, 2);
  p.spec.causal = true;
  p.spec.window = 2;
  p.spec.sinks = 3;
  EXPECT_TRUE(depends_on_key(p, 9, 0));   // sink, far outside the window
  EXPECT_TRUE(depends_on_key(p, 9, 2));   // last sink
  EXPECT_FALSE(depends_on_key(p, 9, 3));  // not a sink, outside the window
  EXPECT_TRUE(depends_on_key(p, 9, 8));   // inside the window
  EXPECT_FALSE(depends_on_key(p, 1, 2));  // a sink, but in the future of query 1
  EXPECT_FALSE(depends_on_key(p, 0, 1));
  EXPECT_TRUE(depends_on_key(p, 1, 0));
  p.spec.causal = false;  // non-causal: |i - j| < W, sinks still everywhere
  EXPECT_TRUE(depends_on_key(p, 1, 2));
  EXPECT_TRUE(depends_on_key(p, 0, 1));
  EXPECT_FALSE(depends_on_key(p, 0, 3));
  EXPECT_TRUE(depends_on_key(p, 4, 5));
  EXPECT_FALSE(depends_on_key(p, 4, 6));
}

TEST(AttentionRef, RowWithNoVisibleKeyIsZeroWithMinusInfLse) {
  Problem p = random_problem(12, 1, 3, 2, 1, 2);
  p.spec.causal = true;
  p.q_pos = {0, 1, 2};
  p.k_pos = {5, 6, 1};  // query 0 sees nothing; query 1 and 2 see key 2 (position 1)
  const ref::RefOutput r = run_forward(p);
  for (int64_t h = 0; h < p.H; ++h) {
    EXPECT_EQ(r.lse[p.li(0, h, 0)], -kInf);
    for (int64_t c = 0; c < p.D; ++c) EXPECT_EQ(r.o[p.qi(0, 0, h, c)], 0.0);
    EXPECT_TRUE(std::isfinite(r.lse[p.li(0, h, 1)]));
    // A single visible key: o is exactly its value row.
    for (int64_t c = 0; c < p.D; ++c)
      EXPECT_NEAR(r.o[p.qi(0, 1, h, c)], p.v[p.ki(0, 2, 0, c)], 1e-15);
  }
  // Window without sinks, query far from every key.
  Problem w = random_problem(13, 1, 2, 1, 1, 2);
  w.spec.window = 3;
  w.q_pos = {100, 3};
  w.k_pos = {0, 1};
  const ref::RefOutput rw = run_forward(w);
  EXPECT_EQ(rw.lse[0], -kInf);
  EXPECT_EQ(rw.o[0], 0.0);
  EXPECT_EQ(rw.o[1], 0.0);
  EXPECT_TRUE(std::isfinite(rw.lse[1]));
}

TEST(AttentionRef, RowWithNoVisibleKeyButLearnedSinkHasLseZ) {
  Problem p = random_problem(14, 1, 2, 2, 2, 2);
  p.spec.causal = true;
  p.q_pos = {0, 4};
  p.k_pos = {3, 9};  // query 0 sees nothing; query 1 sees key 0
  p.has_z = true;
  p.z = {-20.0f, 20.0f};
  const ref::RefOutput r = run_forward(p);
  EXPECT_EQ(r.lse[p.li(0, 0, 0)], -20.0);
  EXPECT_EQ(r.lse[p.li(0, 1, 0)], 20.0);
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t c = 0; c < 2; ++c) EXPECT_EQ(r.o[p.qi(0, 0, h, c)], 0.0);
  // Query 1, head 1: one key with logit s against z = 20: o = v * e^s / (e^s + e^20).
  double s = 0.0;
  for (int64_t c = 0; c < 2; ++c)
    s += static_cast<double>(p.q[p.qi(0, 1, 1, c)]) * p.k[p.ki(0, 0, 1, c)];
  s *= static_cast<double>(static_cast<float>(1.0 / std::sqrt(2.0)));
  const double w = std::exp(s) / (std::exp(s) + std::exp(20.0));
  EXPECT_NEAR(r.o[p.qi(0, 1, 1, 0)], w * p.v[p.ki(0, 0, 1, 0)], 1e-12 * w + 1e-300);
  EXPECT_NEAR(r.lse[p.li(0, 1, 1)], std::log(std::exp(s) + std::exp(20.0)), 1e-12);
}

TEST(AttentionRef, StridedAndBf16InputsAreReadCorrectly) {
  Problem p = random_problem(15, 2, 4, 2, 1, 3);
  p.spec.causal = true;
  const ref::RefOutput want = run_forward(p);
  // q embedded in a buffer with padding after each head row: strides [.., .., 5, 1].
  std::vector<float> padded(static_cast<size_t>(p.B * p.Nq * p.H * 5), 99.0f);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t n = 0; n < p.Nq; ++n)
      for (int64_t h = 0; h < p.H; ++h)
        for (int64_t c = 0; c < p.D; ++c)
          padded[static_cast<size_t>(((b * p.Nq + n) * p.H + h) * 5 + c)] = p.q[p.qi(b, n, h, c)];
  const int64_t shape[4] = {p.B, p.Nq, p.H, p.D};
  const int64_t strides[4] = {p.Nq * p.H * 5, p.H * 5, 5, 1};
  const TensorView qs(padded.data(), DType::kF32, 4, shape, strides);
  const ref::RefOutput got =
      ref::attention_forward(p.spec, qs, p.q_pos.data(), p.kv(), p.vv(), p.k_pos.data(), nullptr);
  expect_outputs_near(got, want, 0.0, "strided q");
  // bf16 storage: grid values with <= 8 significant bits are exact in bf16.
  for (float& x : p.q) x = std::round(x * 64) / 64;
  for (float& x : p.k) x = std::round(x * 64) / 64;
  for (float& x : p.v) x = std::round(x * 64) / 64;
  const ref::RefOutput want16 = run_forward(p);
  auto to_bf16 = [](const std::vector<float>& f) {
    std::vector<uint16_t> b(f.size());
    for (size_t i = 0; i < f.size(); ++i) b[i] = float_to_bf16(f[i]).bits;
    return b;
  };
  std::vector<uint16_t> qb = to_bf16(p.q), kb = to_bf16(p.k), vb = to_bf16(p.v);
  const TensorView qv(qb.data(), DType::kBF16, {p.B, p.Nq, p.H, p.D});
  const TensorView kv(kb.data(), DType::kBF16, {p.B, p.Nk, p.Hkv, p.D});
  const TensorView vv(vb.data(), DType::kBF16, {p.B, p.Nk, p.Hkv, p.D});
  expect_outputs_near(
      ref::attention_forward(p.spec, qv, p.q_pos.data(), kv, vv, p.k_pos.data(), nullptr), want16,
      0.0, "bf16");
}

TEST(AttentionRef, EmptySinkViewMeansNoLearnedSink) {
  Problem p = random_problem(16, 1, 4, 2, 1, 2);
  const ref::RefOutput plain = run_forward(p);
  const TensorView none;
  const ref::RefOutput r =
      ref::attention_forward(p.spec, p.qv(), p.q_pos.data(), p.kv(), p.vv(), p.k_pos.data(), &none);
  expect_outputs_near(r, plain, 0.0, "empty sink view");
}

TEST(AttentionRef, BackwardRejectsWrongDoutShape) {
  Problem p = random_problem(17, 1, 4, 2, 1, 2);
  std::vector<float> d(p.q.size());
  const TensorView bad(d.data(), DType::kF32, {1, 4, 1, 4});
  EXPECT_THROW(ref::attention_backward(p.spec, p.qv(), p.q_pos.data(), p.kv(), p.vv(),
                                       p.k_pos.data(), nullptr, bad),
               Error);
}

}  // namespace
}  // namespace ringattn
