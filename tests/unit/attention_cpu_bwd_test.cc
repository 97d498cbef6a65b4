// The CPU backward kernel against the f64 oracle's backward (ref::attention_backward) with a
// normalised error, over a sweep of shapes and masks like the forward's, with K/V cut into
// uneven blocks folded in several orders (each block accumulating into its own slice of dk/dv,
// dq across blocks); plus rows that see nothing, zigzag positions, threads and bad input.

#include "kernels/cpu/attention_cpu_bwd.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/attention_ref.h"
#include "tests/common/test_util.h"

namespace ringattn::cpu {
namespace {

using test::gradient_error;
using test::HostTensor;
using test::iota_pos;
using test::randn;
using test::uneven_cuts;

enum class Order { kForward, kShuffled };

struct Problem {
  int64_t batch = 1, nq = 1, nk = 1, heads = 1, kv_heads = 1, dim = 32;
  DType dtype = DType::kF32;
  AttentionSpec spec;
  std::vector<int64_t> q_pos, k_pos;
  std::vector<float> sink;    // empty: no learned sink logits
  std::vector<int64_t> cuts;  // block boundaries in [0, nk]
  uint32_t seed = 1;
};

struct Grads {
  std::vector<float> dq, dk, dv, dsink;
};

struct Case {
  Problem p;
  HostTensor q, k, v, dout, o;
  std::vector<float> lse;
  ref::RefGrads ref;

  explicit Case(const Problem& prob)
      : p(prob),
        q({}, DType::kF32, {}),
        k({}, DType::kF32, {}),
        v({}, DType::kF32, {}),
        dout({}, DType::kF32, {}),
        o({}, DType::kF32, {}) {
    std::mt19937 rng(p.seed);
    const size_t qn = static_cast<size_t>(p.batch * p.nq * p.heads * p.dim);
    const size_t kn = static_cast<size_t>(p.batch * p.nk * p.kv_heads * p.dim);
    q = HostTensor(randn(qn, rng), p.dtype, {p.batch, p.nq, p.heads, p.dim});
    k = HostTensor(randn(kn, rng), p.dtype, {p.batch, p.nk, p.kv_heads, p.dim});
    v = HostTensor(randn(kn, rng), p.dtype, {p.batch, p.nk, p.kv_heads, p.dim});
    dout = HostTensor(randn(qn, rng), p.dtype, {p.batch, p.nq, p.heads, p.dim});
    std::vector<float> z = p.sink;
    TensorView zv(z.data(), DType::kF32, {p.heads});
    const TensorView* sink = z.empty() ? nullptr : &zv;
    // The forward's outputs as the ring hands them over: o in the input dtype, lse f32.
    const ref::RefOutput fwd = ref::attention_forward(p.spec, q.view(), p.q_pos.data(), k.view(),
                                                      v.view(), p.k_pos.data(), sink);
    o = HostTensor(std::vector<float>(fwd.o.begin(), fwd.o.end()), p.dtype,
                   {p.batch, p.nq, p.heads, p.dim});
    lse.assign(fwd.lse.begin(), fwd.lse.end());
    ref = ref::attention_backward(p.spec, q.view(), p.q_pos.data(), k.view(), v.view(),
                                  p.k_pos.data(), sink, dout.view());
  }

  Grads run(Order order, int threads) {
    BackwardStateCpu state;
    TensorView lse_view(lse.data(), DType::kF32, {p.batch, p.heads, p.nq});
    state.begin(o.view(), dout.view(), lse_view);
    Grads g;
    const size_t kn = static_cast<size_t>(p.batch * p.nk * p.kv_heads * p.dim);
    g.dk.assign(kn, 0.0f);
    g.dv.assign(kn, 0.0f);
    const TensorView dk(g.dk.data(), DType::kF32, {p.batch, p.nk, p.kv_heads, p.dim});
    const TensorView dv(g.dv.data(), DType::kF32, {p.batch, p.nk, p.kv_heads, p.dim});
    std::vector<size_t> blocks(p.cuts.size() - 1);
    std::iota(blocks.begin(), blocks.end(), 0);
    if (order == Order::kShuffled) {
      std::mt19937 rng(p.seed + 99);
      std::shuffle(blocks.begin(), blocks.end(), rng);
    }
    for (size_t bi : blocks) {
      const int64_t b0 = p.cuts[bi], b1 = p.cuts[bi + 1];
      fold_block_backward(p.spec, q.view(), p.q_pos.data(), k.view().slice(1, b0, b1),
                          v.view().slice(1, b0, b1), p.k_pos.data() + b0, dout.view(), state,
                          dk.slice(1, b0, b1), dv.slice(1, b0, b1), threads);
    }
    g.dq.assign(static_cast<size_t>(p.batch * p.nq * p.heads * p.dim), 0.0f);
    finalize_backward(state, TensorView(g.dq.data(), DType::kF32, {p.batch, p.nq, p.heads, p.dim}));
    g.dsink.assign(static_cast<size_t>(p.heads), 0.0f);
    if (!p.sink.empty()) {
      TensorView zv(p.sink.data(), DType::kF32, {p.heads});
      sink_logits_backward(state, zv, g.dsink.data());
    }
    return g;
  }

  void expect_matches(double tol, int threads = 2) {
    for (Order order : {Order::kForward, Order::kShuffled}) {
      const Grads g = run(order, threads);
      const char* name = order == Order::kForward ? "forward" : "shuffled";
      EXPECT_LE(gradient_error(g.dq, ref.dq), tol) << "dq, fold order " << name;
      EXPECT_LE(gradient_error(g.dk, ref.dk), tol) << "dk, fold order " << name;
      EXPECT_LE(gradient_error(g.dv, ref.dv), tol) << "dv, fold order " << name;
      EXPECT_LE(gradient_error(g.dsink, ref.dsink), tol) << "dsink, fold order " << name;
    }
  }
};

double tolerance(DType dt) { return dt == DType::kF32 ? 1e-5 : 1e-2; }

// ---- the sweep ---------------------------------------------------------------------------------
// N x causal x window x sinks, every combination; batch, heads (MHA/GQA/MQA), D, dtype, learned
// sinks and the block cuts drawn from a seed of the combination, with B * H * N^2 * D kept
// small enough for the f64 oracle's backward.
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
    for (auto hh : {std::pair<int64_t, int64_t>{1, 1}, {4, 1}, {4, 2}, {2, 2}}) {
      for (int64_t d : {32, 64, 128}) {
        if (static_cast<double>(b * hh.first * d) * static_cast<double>(n * n) <= 6e6) {
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
    for (int64_t h = 0; h < p.heads; ++h) p.sink.push_back(h % 2 ? -1.5f : 2.0f);
  }
  p.spec.causal = causal;
  p.spec.window = window;
  p.spec.sinks = sinks;
  p.q_pos = iota_pos(n);
  p.k_pos = iota_pos(n);
  p.cuts = uneven_cuts(n, std::uniform_int_distribution<int>(1, 4)(rng), rng);
  return p;
}

std::string sweep_name(const ::testing::TestParamInfo<SweepParam>& info) {
  const Problem p = derive(info.param);
  std::string name = "N" + std::to_string(p.nq) + (p.spec.causal ? "_causal" : "_full") + "_w" +
                     std::to_string(p.spec.window) + "_s" + std::to_string(p.spec.sinks) + "_B" +
                     std::to_string(p.batch) + "_H" + std::to_string(p.heads) + "x" +
                     std::to_string(p.kv_heads) + "_D" + std::to_string(p.dim) + "_" +
                     dtype_name(p.dtype) + "_blocks" + std::to_string(p.cuts.size() - 1);
  if (!p.sink.empty()) name += "_z";
  return name;
}

class AttentionCpuBwdSweep : public ::testing::TestWithParam<SweepParam> {};

TEST_P(AttentionCpuBwdSweep, MatchesOracleInEveryFoldOrder) {
  const Problem p = derive(GetParam());
  Case c(p);
  c.expect_matches(tolerance(p.dtype));
}

INSTANTIATE_TEST_SUITE_P(Masks, AttentionCpuBwdSweep,
                         ::testing::Combine(::testing::Values<int64_t>(1, 7, 33, 301),
                                            ::testing::Bool(),
                                            ::testing::Values<int64_t>(0, 1, 17, 256),
                                            ::testing::Values<int64_t>(0, 1, 4)),
                         sweep_name);

// Learned sinks, GQA/MQA and every head dimension in f32 at once (the sweep draws them by seed).
class AttentionCpuBwdHeads
    : public ::testing::TestWithParam<std::tuple<std::pair<int64_t, int64_t>, int64_t>> {};

TEST_P(AttentionCpuBwdHeads, MatchesOracle) {
  const auto [hh, d] = GetParam();
  Problem p;
  p.batch = 2;
  p.nq = p.nk = 77;
  p.heads = hh.first;
  p.kv_heads = hh.second;
  p.dim = d;
  p.spec.causal = true;
  p.spec.window = 20;
  p.spec.sinks = 2;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk);
  for (int64_t h = 0; h < p.heads; ++h) p.sink.push_back(h % 2 ? 1.5f : -0.5f);
  std::mt19937 rng(static_cast<uint32_t>(d + hh.first));
  p.cuts = uneven_cuts(p.nk, 3, rng);
  Case c(p);
  c.expect_matches(1e-5);
}

INSTANTIATE_TEST_SUITE_P(Gqa, AttentionCpuBwdHeads,
                         ::testing::Combine(::testing::Values(std::pair<int64_t, int64_t>{1, 1},
                                                              std::pair<int64_t, int64_t>{4, 1},
                                                              std::pair<int64_t, int64_t>{8, 2}),
                                            ::testing::Values<int64_t>(32, 64, 128)),
                         [](const auto& info) {
                           const auto hh = std::get<0>(info.param);
                           return "H" + std::to_string(hh.first) + "x" + std::to_string(hh.second) +
                                  "_D" + std::to_string(std::get<1>(info.param));
                         });

// A zigzag shard against the three ranks' shards in ring order, causal with and without a
// window: positions are neither contiguous nor sorted across blocks.
TEST(AttentionCpuBwd, ZigzagPositions) {
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
    for (int r : {1, 0, 2}) {
      const std::vector<int64_t> s = shard(r);
      p.k_pos.insert(p.k_pos.end(), s.begin(), s.end());
    }
    p.cuts = {0, 2 * chunk, 4 * chunk, 6 * chunk};
    SCOPED_TRACE("window " + std::to_string(window));
    Case c(p);
    c.expect_matches(1e-5);
  }
}

// Causal queries whose keys all lie in the future: lse = -inf, every gradient exactly 0, no NaN;
// mixed with rows that see keys, and with learned sinks (lse = z for the empty rows).
TEST(AttentionCpuBwd, RowsThatSeeNothing) {
  Problem p;
  p.heads = 2;
  p.dim = 32;
  p.nq = 20;
  p.nk = 300;
  p.spec.causal = true;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk, 100);
  p.cuts = {0, 130, 300};
  {
    Case c(p);
    for (float x : c.lse) ASSERT_EQ(x, -std::numeric_limits<float>::infinity());
    const Grads g = c.run(Order::kForward, 2);
    for (float x : g.dq) EXPECT_EQ(x, 0.0f);
    for (float x : g.dk) EXPECT_EQ(x, 0.0f);
    for (float x : g.dv) EXPECT_EQ(x, 0.0f);
  }
  p.q_pos = iota_pos(p.nq, 90);
  {
    Case c(p);
    c.expect_matches(1e-5);
  }
  p.sink = {0.5f, -2.0f};
  {
    Case c(p);
    c.expect_matches(1e-5);
  }
}

// Any thread count gives the same gradients to f32 rounding (dq sums in a scheduling-dependent
// order), and 1 thread agrees with the oracle.
TEST(AttentionCpuBwd, ThreadCounts) {
  Problem p;
  p.heads = 4;
  p.kv_heads = 2;
  p.dim = 64;
  p.nq = p.nk = 600;
  p.spec.causal = true;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk);
  p.cuts = {0, p.nk};
  Case c(p);
  for (int threads : {1, 3, 8}) {
    SCOPED_TRACE(std::to_string(threads) + " threads");
    c.expect_matches(1e-5, threads);
  }
}

// The one-shot entry point writes every output in the output dtype and dsink.
TEST(AttentionCpuBwd, OneShot) {
  Problem p;
  p.batch = 1;
  p.heads = 4;
  p.kv_heads = 1;
  p.dim = 32;
  p.nq = p.nk = 90;
  p.spec.window = 10;
  p.spec.sinks = 1;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk);
  p.cuts = {0, p.nk};
  p.sink = {1.0f, -1.0f, 0.0f, 3.0f};
  Case c(p);
  const size_t qn = static_cast<size_t>(p.nq * p.heads * p.dim);
  const size_t kn = static_cast<size_t>(p.nk * p.kv_heads * p.dim);
  Grads g;
  g.dq.assign(qn, 7.0f);
  g.dk.assign(kn, 7.0f);  // overwritten, not added to
  g.dv.assign(kn, 7.0f);
  g.dsink.assign(4, 7.0f);
  TensorView lse(c.lse.data(), DType::kF32, {1, p.heads, p.nq});
  TensorView z(p.sink.data(), DType::kF32, {p.heads});
  TensorView dsink(g.dsink.data(), DType::kF32, {p.heads});
  const FoldStats st = attention_backward(
      p.spec, c.q.view(), p.q_pos.data(), c.k.view(), c.v.view(), p.k_pos.data(), &z, c.o.view(),
      lse, c.dout.view(), TensorView(g.dq.data(), DType::kF32, {1, p.nq, p.heads, p.dim}),
      TensorView(g.dk.data(), DType::kF32, {1, p.nk, p.kv_heads, p.dim}),
      TensorView(g.dv.data(), DType::kF32, {1, p.nk, p.kv_heads, p.dim}), &dsink, 2);
  EXPECT_GT(st.flops, 0.0);
  EXPECT_LE(gradient_error(g.dq, c.ref.dq), 1e-5);
  EXPECT_LE(gradient_error(g.dk, c.ref.dk), 1e-5);
  EXPECT_LE(gradient_error(g.dv, c.ref.dv), 1e-5);
  EXPECT_LE(gradient_error(g.dsink, c.ref.dsink), 1e-5);
}

// Masked tiles are skipped: a causal problem computes fewer pairs than a full one.
TEST(AttentionCpuBwd, SkipsMaskedTiles) {
  Problem p;
  p.nq = p.nk = 2048;
  p.dim = 32;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk);
  std::vector<float> zeros(static_cast<size_t>(p.nq * p.dim), 0.0f), lse(p.nq, 0.0f);
  std::vector<float> dk(zeros.size(), 0.0f), dv(zeros.size(), 0.0f);
  const TensorView t(zeros.data(), DType::kF32, {1, p.nq, 1, p.dim});
  const TensorView dkv(dk.data(), DType::kF32, {1, p.nk, 1, p.dim});
  const TensorView dvv(dv.data(), DType::kF32, {1, p.nk, 1, p.dim});
  BackwardStateCpu state;
  state.begin(t, t, TensorView(lse.data(), DType::kF32, {1, 1, p.nq}));
  AttentionSpec spec;
  const FoldStats full =
      fold_block_backward(spec, t, p.q_pos.data(), t, t, p.k_pos.data(), t, state, dkv, dvv, 2);
  spec.causal = true;
  const FoldStats causal =
      fold_block_backward(spec, t, p.q_pos.data(), t, t, p.k_pos.data(), t, state, dkv, dvv, 2);
  EXPECT_EQ(full.tiles_skipped, 0);
  EXPECT_GT(causal.tiles_skipped, 0);
  EXPECT_LT(causal.flops, 0.6 * full.flops);
}

TEST(AttentionCpuBwd, BadInput) {
  std::vector<float> buf(4 * 8 * 2 * 32, 0.0f), lse(2 * 8, 0.0f), acc(4 * 8 * 2 * 32, 0.0f);
  std::vector<int64_t> pos = iota_pos(8);
  const TensorView q(buf.data(), DType::kF32, {1, 8, 2, 32});
  const TensorView acc_view(acc.data(), DType::kF32, {1, 8, 2, 32});
  BackwardStateCpu state;
  // lse of the wrong shape.
  EXPECT_THROW(state.begin(q, q, TensorView(lse.data(), DType::kF32, {1, 8, 2})), Error);
  // dout of another shape than o.
  EXPECT_THROW(state.begin(q, TensorView(buf.data(), DType::kF32, {1, 7, 2, 32}),
                           TensorView(lse.data(), DType::kF32, {1, 2, 8})),
               Error);
  state.begin(q, q, TensorView(lse.data(), DType::kF32, {1, 2, 8}));
  AttentionSpec spec;
  EXPECT_NO_THROW(
      fold_block_backward(spec, q, pos.data(), q, q, pos.data(), q, state, acc_view, acc_view, 1));
  // dk accumulator not f32.
  std::vector<uint16_t> half(acc.size());
  EXPECT_THROW(
      fold_block_backward(spec, q, pos.data(), q, q, pos.data(), q, state,
                          TensorView(half.data(), DType::kBF16, {1, 8, 2, 32}), acc_view, 1),
      Error);
  // dv accumulator sized for other keys.
  EXPECT_THROW(fold_block_backward(spec, q, pos.data(), q, q, pos.data(), q, state, acc_view,
                                   acc_view.slice(1, 0, 4), 1),
               Error);
  // State sized for other queries.
  EXPECT_THROW(fold_block_backward(spec, q.slice(1, 0, 4), pos.data(), q, q, pos.data(),
                                   q.slice(1, 0, 4), state, acc_view, acc_view, 1),
               Error);
}

}  // namespace
}  // namespace ringattn::cpu
