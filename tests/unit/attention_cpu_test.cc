// The CPU kernel against the f64 oracle (kernels/cpu/attention_ref.h) with a normalised error,
// over a structured sweep of shapes and masks, with K/V split into uneven blocks folded in
// several orders; plus positions that are not contiguous, rows that see nothing, large logits,
// the vectorised exp, threading, and bad input.

#include "kernels/cpu/attention_cpu.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cblas.h>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "kernels/cpu/attention_ref.h"
#include "kernels/cpu/vec_math.h"
#include "tests/common/test_util.h"

namespace ringattn::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

using test::HostTensor;
using test::iota_pos;
using test::normalised_error;
using test::randn;
using test::uneven_cuts;

enum class Order { kForward, kReverse, kShuffled };
const char* order_name(Order o) {
  return o == Order::kForward ? "forward" : o == Order::kReverse ? "reverse" : "shuffled";
}

// One attention problem: inputs, positions, spec, and how K/V are cut into blocks.
struct Problem {
  int64_t batch = 1, nq = 1, nk = 1, heads = 1, kv_heads = 1, dim = 32;
  DType dtype = DType::kF32;
  AttentionSpec spec;
  std::vector<int64_t> q_pos, k_pos;
  std::vector<float> sink;  // empty: no learned sink logits
  std::vector<int64_t> cuts;  // block boundaries in [0, nk], first 0, last nk
  float sigma = 1.0f;
  uint32_t seed = 1;
};

struct Result {
  std::vector<float> o, lse;
  FoldStats stats;
};

struct Inputs {
  HostTensor q, k, v;
};

Inputs make_inputs(const Problem& p) {
  std::mt19937 rng(p.seed);
  const size_t qn = static_cast<size_t>(p.batch * p.nq * p.heads * p.dim);
  const size_t kn = static_cast<size_t>(p.batch * p.nk * p.kv_heads * p.dim);
  return Inputs{HostTensor(randn(qn, rng, p.sigma), p.dtype, {p.batch, p.nq, p.heads, p.dim}),
                HostTensor(randn(kn, rng, p.sigma), p.dtype, {p.batch, p.nk, p.kv_heads, p.dim}),
                HostTensor(randn(kn, rng), p.dtype, {p.batch, p.nk, p.kv_heads, p.dim})};
}

// Folds the K/V blocks in the given order and finalises; o is written in f32, or in the input
// dtype with o_in_dtype (outputs near exp(-20) are not representable in f16).
Result run_kernel(const Problem& p, Inputs& in, Order order, int threads = 2,
                  bool o_in_dtype = false) {
  SoftmaxStateCpu state(p.batch, p.nq, p.heads, p.dim);
  std::vector<size_t> blocks(p.cuts.size() - 1);
  std::iota(blocks.begin(), blocks.end(), 0);
  if (order == Order::kReverse) std::reverse(blocks.begin(), blocks.end());
  if (order == Order::kShuffled) {
    std::mt19937 rng(p.seed + 99);
    std::shuffle(blocks.begin(), blocks.end(), rng);
  }
  Result r;
  const TensorView k = in.k.view(), v = in.v.view();
  for (size_t bi : blocks) {
    const int64_t b0 = p.cuts[bi], b1 = p.cuts[bi + 1];
    const FoldStats st = fold_block(p.spec, in.q.view(), p.q_pos.data(), k.slice(1, b0, b1),
                                    v.slice(1, b0, b1), p.k_pos.data() + b0, state, threads);
    r.stats.tiles_computed += st.tiles_computed;
    r.stats.tiles_skipped += st.tiles_skipped;
    r.stats.flops += st.flops;
  }
  HostTensor o(std::vector<float>(static_cast<size_t>(p.batch * p.nq * p.heads * p.dim), 0.0f),
               o_in_dtype ? p.dtype : DType::kF32, {p.batch, p.nq, p.heads, p.dim});
  r.lse.assign(static_cast<size_t>(p.batch * p.heads * p.nq), 12345.0f);
  TensorView lse(r.lse.data(), DType::kF32, {p.batch, p.heads, p.nq});
  std::vector<float> sink = p.sink;
  TensorView z(sink.data(), DType::kF32, {p.heads});
  finalize(state, sink.empty() ? nullptr : &z, o.view(), &lse);
  r.o.resize(static_cast<size_t>(p.batch * p.nq * p.heads * p.dim));
  for (size_t i = 0; i < r.o.size(); ++i) r.o[i] = o.at(i);
  return r;
}

ref::RefOutput run_ref(const Problem& p, Inputs& in) {
  std::vector<float> sink = p.sink;
  TensorView z(sink.data(), DType::kF32, {p.heads});
  return ref::attention_forward(p.spec, in.q.view(), p.q_pos.data(), in.k.view(), in.v.view(),
                                p.k_pos.data(), sink.empty() ? nullptr : &z);
}

double tolerance(DType dt) { return dt == DType::kF32 ? 1e-5 : 1e-2; }

// Runs every fold order against the oracle and checks o and lse.
void expect_matches_ref(const Problem& p, double tol_o, double tol_lse, bool o_in_dtype = false) {
  Inputs in = make_inputs(p);
  const ref::RefOutput ref = run_ref(p, in);
  for (Order order : {Order::kForward, Order::kReverse, Order::kShuffled}) {
    const Result r = run_kernel(p, in, order, 2, o_in_dtype);
    const double eo = normalised_error(r.o, ref.o);
    // lse: -inf exactly where the oracle has -inf.
    std::string why;
    const double el = normalised_error(r.lse, ref.lse, &why);
    EXPECT_LE(eo, tol_o) << "o, fold order " << order_name(order);
    EXPECT_LE(el, tol_lse) << "lse, fold order " << order_name(order) << " " << why;
  }
}

// ---- the sweep ---------------------------------------------------------------------------------
// Combined axes: N x causal x window x sinks (every combination). The other axes (batch, heads,
// head dim, dtype, learned sinks, number of blocks) are drawn from a seed derived from the
// combination, restricted so the f64 oracle stays cheap: B * H * N^2 * D <= 3.3e7, which keeps
// N = 1000 to one head of D = 32.
using SweepParam = std::tuple<int64_t, bool, int64_t, int64_t>;

Problem derive(const SweepParam& param) {
  const auto [n, causal, window, sinks] = param;
  Problem p;
  p.seed = static_cast<uint32_t>(n * 7919 + (causal ? 1 : 0) * 104729 + window * 613 + sinks * 31);
  std::mt19937 rng(p.seed);
  struct Shape {
    int64_t b, h, hk, d;
  };
  std::vector<Shape> shapes;
  for (int64_t b : {1, 2}) {
    for (auto hh : {std::pair<int64_t, int64_t>{1, 1}, {4, 1}, {8, 2}}) {
      for (int64_t d : {32, 64, 128}) {
        if (static_cast<double>(b * hh.first * d) * static_cast<double>(n * n) <= 3.3e7) {
          shapes.push_back({b, hh.first, hh.second, d});
        }
      }
    }
  }
  const Shape s = shapes[std::uniform_int_distribution<size_t>(0, shapes.size() - 1)(rng)];
  p.batch = s.b;
  p.heads = s.h;
  p.kv_heads = s.hk;
  p.dim = s.d;
  p.nq = p.nk = n;
  const int dt = std::uniform_int_distribution<int>(0, 3)(rng);
  p.dtype = dt <= 1 ? DType::kF32 : dt == 2 ? DType::kBF16 : DType::kF16;
  if (std::uniform_int_distribution<int>(0, 1)(rng)) {
    // Mixed signs per head (and the sign of the only head chosen by the seed).
    const float first = std::uniform_int_distribution<int>(0, 1)(rng) ? 20.0f : -20.0f;
    for (int64_t h = 0; h < p.heads; ++h) p.sink.push_back(h % 2 ? -first : first);
  }
  p.spec.causal = causal;
  p.spec.window = window;
  p.spec.sinks = sinks;
  p.q_pos = iota_pos(n);
  p.k_pos = iota_pos(n);
  p.cuts = uneven_cuts(n, std::uniform_int_distribution<int>(1, 5)(rng), rng);
  return p;
}

std::string sweep_name(const ::testing::TestParamInfo<SweepParam>& info) {
  const Problem p = derive(info.param);
  std::string name = "N" + std::to_string(p.nq) + (p.spec.causal ? "_causal" : "_full") + "_w" +
                     std::to_string(p.spec.window) + "_s" + std::to_string(p.spec.sinks) + "_B" +
                     std::to_string(p.batch) + "_H" + std::to_string(p.heads) + "x" +
                     std::to_string(p.kv_heads) + "_D" + std::to_string(p.dim) + "_" +
                     dtype_name(p.dtype) + "_blocks" + std::to_string(p.cuts.size() - 1);
  if (!p.sink.empty()) name += p.sink[0] > 0 ? "_zpos" : "_zneg";
  return name;
}

class AttentionCpuSweep : public ::testing::TestWithParam<SweepParam> {};

TEST_P(AttentionCpuSweep, MatchesOracleInEveryFoldOrder) {
  const Problem p = derive(GetParam());
  expect_matches_ref(p, tolerance(p.dtype), tolerance(p.dtype));
}

INSTANTIATE_TEST_SUITE_P(Masks, AttentionCpuSweep,
                         ::testing::Combine(::testing::Values<int64_t>(1, 7, 33, 257, 1000),
                                            ::testing::Bool(),
                                            ::testing::Values<int64_t>(0, 1, 17, 256),
                                            ::testing::Values<int64_t>(0, 1, 4)),
                         sweep_name);

// Every dtype and head layout at D = 128 (the sweep rarely draws D = 128 with many heads).
class AttentionCpuHeads
    : public ::testing::TestWithParam<std::tuple<DType, std::pair<int64_t, int64_t>, int64_t>> {};

TEST_P(AttentionCpuHeads, MatchesOracle) {
  const auto [dt, hh, d] = GetParam();
  Problem p;
  p.batch = 2;
  p.nq = p.nk = 77;
  p.heads = hh.first;
  p.kv_heads = hh.second;
  p.dim = d;
  p.dtype = dt;
  p.spec.causal = true;
  p.spec.window = 20;
  p.spec.sinks = 2;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk);
  for (int64_t h = 0; h < p.heads; ++h) p.sink.push_back(h % 2 ? 1.5f : -0.5f);
  std::mt19937 rng(static_cast<uint32_t>(d + hh.first));
  p.cuts = uneven_cuts(p.nk, 3, rng);
  expect_matches_ref(p, tolerance(dt), tolerance(dt), /*o_in_dtype=*/true);
}

INSTANTIATE_TEST_SUITE_P(
    Dtypes, AttentionCpuHeads,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kBF16, DType::kF16),
                       ::testing::Values(std::pair<int64_t, int64_t>{1, 1},
                                         std::pair<int64_t, int64_t>{4, 1},
                                         std::pair<int64_t, int64_t>{8, 2}),
                       ::testing::Values<int64_t>(32, 64, 128)),
    [](const auto& info) {
      const auto hh = std::get<1>(info.param);
      return std::string(dtype_name(std::get<0>(info.param))) + "_H" + std::to_string(hh.first) +
             "x" + std::to_string(hh.second) + "_D" + std::to_string(std::get<2>(info.param));
    });

// ---- positions ---------------------------------------------------------------------------------

// A zigzag shard (SPEC section 3, P = 3): this rank's queries are chunks 1 and 4 of 6, and the
// key blocks are the three ranks' shards as they arrive around the ring.
TEST(AttentionCpu, ZigzagPositions) {
  const int64_t n = 600, chunk = n / 6;
  auto shard = [&](int r) { return test::zigzag_positions(chunk, 3, r); };
  for (int64_t window : {0, 150}) {
    Problem p;
    p.heads = 4;
    p.kv_heads = 2;
    p.dim = 64;
    p.nq = 2 * chunk;
    p.nk = n;
    p.spec.causal = true;
    p.spec.window = window;
    p.spec.sinks = window ? 4 : 0;
    p.q_pos = shard(1);
    p.k_pos.clear();
    for (int r : {1, 0, 2}) {
      const std::vector<int64_t> s = shard(r);
      p.k_pos.insert(p.k_pos.end(), s.begin(), s.end());
    }
    p.cuts = {0, 2 * chunk, 4 * chunk, 6 * chunk};
    SCOPED_TRACE("window " + std::to_string(window));
    expect_matches_ref(p, 1e-5, 1e-5);
  }
}

// Key positions in random order: the tile bounds are only a bounding box, so classification
// must stay conservative.
TEST(AttentionCpu, ShuffledPositions) {
  Problem p;
  p.heads = 2;
  p.kv_heads = 1;
  p.dim = 32;
  p.nq = 300;
  p.nk = 900;
  p.spec.causal = true;
  p.spec.window = 64;
  p.spec.sinks = 3;
  std::mt19937 rng(5);
  p.k_pos = iota_pos(p.nk);
  std::shuffle(p.k_pos.begin(), p.k_pos.end(), rng);
  p.q_pos = iota_pos(p.nq, 500);
  std::shuffle(p.q_pos.begin(), p.q_pos.end(), rng);
  p.cuts = uneven_cuts(p.nk, 4, rng);
  expect_matches_ref(p, 1e-5, 1e-5);
}

// Causal queries whose keys are all in the future: o = 0, lse = -inf (no NaN); with learned
// sinks lse = z and o = 0. Mixed with queries that do see keys.
TEST(AttentionCpu, RowsThatSeeNothing) {
  Problem p;
  p.heads = 2;
  p.dim = 32;
  p.nq = 20;
  p.nk = 300;
  p.spec.causal = true;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk, 100);
  p.cuts = {0, 130, 300};
  Inputs in = make_inputs(p);
  const Result r = run_kernel(p, in, Order::kForward);
  for (float x : r.o) EXPECT_EQ(x, 0.0f);
  for (float x : r.lse) EXPECT_EQ(x, -kInf);
  EXPECT_EQ(r.stats.tiles_computed, 0);
  EXPECT_GT(r.stats.tiles_skipped, 0);

  p.sink = {3.0f, -7.0f};
  const Result rz = run_kernel(p, in, Order::kForward);
  for (float x : rz.o) EXPECT_EQ(x, 0.0f);
  for (int64_t h = 0; h < p.heads; ++h) {
    for (int64_t i = 0; i < p.nq; ++i) EXPECT_EQ(rz.lse[h * p.nq + i], p.sink[h]);
  }

  // Half of the queries see some keys, half none; every row of a tile is processed together.
  p.sink.clear();
  p.q_pos = iota_pos(p.nq, 90);
  expect_matches_ref(p, 1e-5, 1e-5);
}

// Logits of order 1e3 (gaps far above the ~88 where exp overflows): no overflow, no NaN. The
// logits themselves carry an f32 rounding of ~1e-4 absolute, hence the looser tolerance.
TEST(AttentionCpu, LargeLogits) {
  Problem p;
  p.heads = 4;
  p.kv_heads = 2;
  p.dim = 64;
  p.nq = p.nk = 200;
  p.sigma = 3.0f;
  p.spec.scale = 10.0f;
  p.spec.causal = true;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk);
  p.sink = {20.0f, -20.0f, 20.0f, -20.0f};
  std::mt19937 rng(11);
  p.cuts = uneven_cuts(p.nk, 4, rng);
  expect_matches_ref(p, 2e-3, 1e-5);
}

// ---- work accounting, threads, BLAS threads ------------------------------------------------------

TEST(AttentionCpu, SkipsMaskedTiles) {
  Problem p;
  p.dim = 32;
  p.nq = p.nk = 4000;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk);
  p.cuts = {0, p.nk};
  const double full = 4.0 * p.nq * p.nk * p.dim;
  Inputs in = make_inputs(p);
  const Result dense = run_kernel(p, in, Order::kForward);
  EXPECT_EQ(dense.stats.tiles_skipped, 0);
  EXPECT_DOUBLE_EQ(dense.stats.flops, full);

  p.spec.causal = true;
  const Result causal = run_kernel(p, in, Order::kForward);
  EXPECT_GT(causal.stats.tiles_skipped, 0);
  EXPECT_LT(causal.stats.flops, 0.75 * full);

  // A short window with sinks: work O(N (W + S)) up to tile granularity, and still exact.
  p.spec.window = 16;
  p.spec.sinks = 4;
  const Result windowed = run_kernel(p, in, Order::kForward);
  EXPECT_LT(windowed.stats.flops, 0.2 * full);
  const ref::RefOutput ref = run_ref(p, in);
  EXPECT_LE(normalised_error(windowed.o, ref.o), 1e-5);
}

TEST(AttentionCpu, ThreadCountDoesNotChangeTheResult) {
  Problem p;
  p.batch = 2;
  p.heads = 4;
  p.kv_heads = 2;
  p.dim = 64;
  p.nq = p.nk = 700;
  p.spec.causal = true;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk);
  p.cuts = {0, 300, 700};
  Inputs in = make_inputs(p);
  const Result one = run_kernel(p, in, Order::kForward, 1);
  for (int threads : {2, 3, 8}) {
    const Result many = run_kernel(p, in, Order::kForward, threads);
    // Each work item runs the same arithmetic whichever thread takes it: bitwise equal.
    EXPECT_EQ(one.o, many.o) << threads << " threads";
    EXPECT_EQ(one.lse, many.lse) << threads << " threads";
  }
}

TEST(AttentionCpu, ConcurrentCallers) {
  // Ranks of the in-process communicator are threads calling the kernel at the same time.
  Problem p;
  p.heads = 4;
  p.dim = 32;
  p.nq = p.nk = 300;
  p.spec.causal = true;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk);
  p.cuts = {0, 100, 300};
  Inputs in = make_inputs(p);
  const Result expected = run_kernel(p, in, Order::kForward);
  std::vector<Result> got(3);
  std::vector<std::thread> callers;
  for (int t = 0; t < 3; ++t) {
    callers.emplace_back([&, t] { got[t] = run_kernel(p, in, Order::kForward, 2); });
  }
  for (std::thread& t : callers) t.join();
  for (const Result& r : got) EXPECT_EQ(r.o, expected.o);
}

TEST(AttentionCpu, RestoresBlasThreadCount) {
  const int before = openblas_get_num_threads();
  openblas_set_num_threads(2);
  Problem p;
  p.nq = p.nk = 64;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk);
  p.cuts = {0, p.nk};
  Inputs in = make_inputs(p);
  run_kernel(p, in, Order::kForward, 2);
  EXPECT_EQ(openblas_get_num_threads(), 2);
  openblas_set_num_threads(before);
}

TEST(AttentionCpu, DefaultThreadsFromEnvironment) {
  setenv("RINGATTN_NUM_THREADS", "3", 1);
  EXPECT_EQ(default_num_threads(), 3);
  setenv("RINGATTN_NUM_THREADS", "zero", 1);
  EXPECT_THROW(default_num_threads(), Error);
  unsetenv("RINGATTN_NUM_THREADS");
  EXPECT_GE(default_num_threads(), 1);
}

// ---- the vectorised exp ------------------------------------------------------------------------

int64_t ulp_distance(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if (ia < 0) ia = std::numeric_limits<int32_t>::min() - ia;
  if (ib < 0) ib = std::numeric_limits<int32_t>::min() - ib;
  return std::abs(static_cast<int64_t>(ia) - static_cast<int64_t>(ib));
}

TEST(VecMath, ExpAccuracyAndSpecialValues) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-87.3f, 88.7f);
  std::vector<float> x(100003);
  for (float& e : x) e = dist(rng);
  for (int i = 0; i < 2000; ++i) x[i] = -1.0f + i * 1e-3f;  // around 0, where r is tiny
  const std::vector<float> special = {-kInf, -1e30f, -200.0f, -104.0f, 0.0f, -0.0f, 89.0f, 1e30f,
                                      kInf};
  const std::vector<float> expect = {0.0f, 0.0f, 0.0f, 0.0f, 1.0f, 1.0f, kInf, kInf, kInf};
  for (VecIsa isa : {VecIsa::kGeneric, VecIsa::kAvx2, VecIsa::kAvx512}) {
    if (!vec_isa_supported(isa)) continue;
    SCOPED_TRACE(vec_isa_name(isa));
    std::vector<float> y(x.size());
    exp_vec(isa, x.data(), y.data(), static_cast<int64_t>(x.size()));
    int64_t worst = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const float truth = static_cast<float>(std::exp(static_cast<double>(x[i])));
      worst = std::max(worst, ulp_distance(y[i], truth));
    }
    EXPECT_LE(worst, 2) << "max ulp error";
    std::vector<float> ys(special.size());
    exp_vec(isa, special.data(), ys.data(), static_cast<int64_t>(special.size()));
    for (size_t i = 0; i < special.size(); ++i) EXPECT_EQ(ys[i], expect[i]) << "exp(" << special[i] << ")";
    const float nan = std::numeric_limits<float>::quiet_NaN();
    float yn = 0.0f;
    exp_vec(isa, &nan, &yn, 1);
    EXPECT_TRUE(std::isnan(yn));
  }
}

TEST(VecMath, ExpShiftSumMasksAndTails) {
  for (int64_t n : {1, 5, 16, 17, 40, 513}) {
    std::vector<float> s(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) s[j] = j % 3 == 0 ? -kInf : 0.01f * static_cast<float>(j);
    const float m = row_max(s.data(), n);
    EXPECT_EQ(m, n > 1 ? 0.01f * static_cast<float>((n - 1) % 3 == 0 ? n - 2 : n - 1) : -kInf);
    if (m == -kInf) continue;
    double expected = 0.0;
    std::vector<float> p = s;
    for (float& e : p) expected += e == -kInf ? 0.0 : std::exp(static_cast<double>(e) - m);
    const float sum = exp_shift_sum(s.data(), n, m);
    EXPECT_NEAR(sum, expected, 1e-5 * expected) << n;
    for (int64_t j = 0; j < n; j += 3) EXPECT_EQ(s[j], 0.0f);
  }
}

// ---- bad input -----------------------------------------------------------------------------------

class AttentionCpuBadInput : public ::testing::Test {
 protected:
  std::vector<float> q = std::vector<float>(2 * 8 * 4 * 16, 0.5f);
  std::vector<float> kv = std::vector<float>(2 * 8 * 2 * 16, 0.5f);
  std::vector<float> out = std::vector<float>(2 * 8 * 4 * 16);
  std::vector<int64_t> pos = iota_pos(8);
  TensorView qv{q.data(), DType::kF32, {2, 8, 4, 16}};
  TensorView kvv{kv.data(), DType::kF32, {2, 8, 2, 16}};
  TensorView ov{out.data(), DType::kF32, {2, 8, 4, 16}};

  void expect_error(const std::function<void()>& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }
};

TEST_F(AttentionCpuBadInput, ValidInputPasses) {
  EXPECT_NO_THROW(attention({}, qv, pos.data(), kvv, kvv, pos.data(), nullptr, ov, nullptr, 2));
}

TEST_F(AttentionCpuBadInput, ShapeMismatch) {
  TensorView k_bad(kv.data(), DType::kF32, {2, 8, 2, 8});
  expect_error([&] { attention({}, qv, pos.data(), k_bad, k_bad, pos.data(), nullptr, ov, nullptr); },
               "D=16");
  TensorView o_bad(out.data(), DType::kF32, {2, 8, 2, 16});
  expect_error([&] { attention({}, qv, pos.data(), kvv, kvv, pos.data(), nullptr, o_bad, nullptr); },
               "o must have the shape of q");
}

TEST_F(AttentionCpuBadInput, HeadsNotMultipleOfKvHeads) {
  TensorView k3(kv.data(), DType::kF32, {2, 8, 3, 8});
  TensorView q3(q.data(), DType::kF32, {2, 8, 4, 8});
  expect_error([&] { attention({}, q3, pos.data(), k3, k3, pos.data(), nullptr, ov, nullptr); },
               "H % H_kv");
}

TEST_F(AttentionCpuBadInput, NegativeWindow) {
  AttentionSpec spec;
  spec.window = -1;
  expect_error([&] { attention(spec, qv, pos.data(), kvv, kvv, pos.data(), nullptr, ov, nullptr); },
               "window");
}

TEST_F(AttentionCpuBadInput, UnsupportedDtype) {
  TensorView q_bad(q.data(), static_cast<DType>(7), {2, 8, 4, 16});
  try {
    attention({}, q_bad, pos.data(), kvv, kvv, pos.data(), nullptr, ov, nullptr);
    ADD_FAILURE() << "no error for dtype code 7";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_NE(std::string(e.what()).find("dtype"), std::string::npos) << e.what();
  }
}

TEST_F(AttentionCpuBadInput, NullPositions) {
  expect_error([&] { attention({}, qv, nullptr, kvv, kvv, pos.data(), nullptr, ov, nullptr); },
               "q_pos");
  expect_error([&] { attention({}, qv, pos.data(), kvv, kvv, nullptr, nullptr, ov, nullptr); },
               "k_pos");
}

TEST_F(AttentionCpuBadInput, StateSizedForOtherQueries) {
  SoftmaxStateCpu state(2, 7, 4, 16);
  expect_error([&] { fold_block({}, qv, pos.data(), kvv, kvv, pos.data(), state); },
               "state must be sized for q");
}

}  // namespace
}  // namespace ringattn::cpu
