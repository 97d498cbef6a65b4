// The in-process ring (P ranks as threads) against the f64 oracle: every shard layout, mask,
// sink configuration and rank count must give dense attention over the whole sequence.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <mutex>

#include "comm/inproc/inproc_communicator.h"
#include "kernels/cpu/attention_ref.h"
#include "ringattn/ring.h"
#include "runtime/src/ring_plan.h"
#include "runtime/src/sharding.h"
#include "tests/common/test_util.h"

namespace ringattn {
namespace {

using test::gather_rows;
using test::RingCase;
using test::scatter_rows;

class RingForwardTest : public ::testing::TestWithParam<RingCase> {};

TEST_P(RingForwardTest, MatchesDenseOracle) {
  const RingCase c = GetParam();
  const test::RingInputs g =
      test::make_ring_inputs(c, static_cast<uint32_t>(c.n * 131 + c.world), false);
  const AttentionSpec spec = test::spec_of(c);
  const std::vector<int64_t> pos = test::iota_pos(c.n);
  TensorView gq(const_cast<float*>(g.q.data()), DType::kF32, {c.batch, c.n, c.heads, c.head_dim});
  TensorView gk(const_cast<float*>(g.k.data()), DType::kF32,
                {c.batch, c.n, c.kv_heads, c.head_dim});
  TensorView gv(const_cast<float*>(g.v.data()), DType::kF32,
                {c.batch, c.n, c.kv_heads, c.head_dim});
  TensorView gz(const_cast<float*>(g.z.data()), DType::kF32, {c.heads});
  const ref::RefOutput want = ref::attention_forward(spec, gq, pos.data(), gk, gv, pos.data(),
                                                     c.sink_logits ? &gz : nullptr);

  // Assembled ring output in global order.
  std::vector<double> got_o(want.o.size(), std::nan("")), got_lse(want.lse.size(), std::nan(""));
  std::mutex mu;
  const Layout layout = resolve_layout(c.layout, c.causal, c.window);
  run_inproc(c.world, [&](Communicator& comm) {
    const Shard shard = make_shard(c.n, comm.size(), comm.rank(), layout);
    const int64_t n = shard.size();
    const int64_t qrow = c.heads * c.head_dim, krow = c.kv_heads * c.head_dim;
    std::vector<char> q = gather_rows(g.q, c.batch, c.n, qrow, shard, c.dtype);
    std::vector<char> k = gather_rows(g.k, c.batch, c.n, krow, shard, c.dtype);
    std::vector<char> v = gather_rows(g.v, c.batch, c.n, krow, shard, c.dtype);
    std::vector<float> o(static_cast<size_t>(c.batch * n * c.heads * c.head_dim), NAN);
    std::vector<float> lse(static_cast<size_t>(c.batch * c.heads * n), NAN);
    std::vector<float> z = g.z;
    TensorView tq(q.data(), c.dtype, {c.batch, n, c.heads, c.head_dim});
    TensorView tk(k.data(), c.dtype, {c.batch, n, c.kv_heads, c.head_dim});
    TensorView tv(v.data(), c.dtype, {c.batch, n, c.kv_heads, c.head_dim});
    TensorView to(o.data(), DType::kF32, {c.batch, n, c.heads, c.head_dim});
    TensorView tl(lse.data(), DType::kF32, {c.batch, c.heads, n});
    TensorView tz(z.data(), DType::kF32, {c.heads});
    RingOptions opt;
    opt.num_threads = 1;
    forward(comm, spec, c.n, tq, tk, tv, c.sink_logits ? &tz : nullptr, to, &tl, opt);
    std::lock_guard<std::mutex> lock(mu);
    scatter_rows(o, c.batch, c.n, qrow, shard, got_o);
    scatter_rows(lse, c.batch * c.heads, c.n, 1, shard, got_lse);
  });

  // NaN (an element never written) fails; lse must be -inf exactly where the oracle's is.
  const double tol = c.dtype == DType::kF32 ? 1e-5 : 1e-2;
  std::string why;
  EXPECT_LE(test::normalised_error(got_o, want.o, &why), tol) << "normalised error of o " << why;
  EXPECT_LE(test::normalised_error(got_lse, want.lse, &why), tol)
      << "normalised error of lse " << why;
}

std::vector<RingCase> ring_cases() {
  std::vector<RingCase> cases;
  const DType f32 = DType::kF32;
  // Every rank count with both layouts, causal and not, N not divisible by P.
  for (int p : {1, 2, 3, 4, 7}) {
    for (Layout layout : {Layout::kContiguous, Layout::kZigzag}) {
      for (bool causal : {false, true}) {
        const int64_t n = 7 * p + 3;
        cases.push_back({p, n, layout, causal, 0, 0, false, 2, 1, 16, 1, f32});
        // Window smaller than a shard, sinks, learned sinks, GQA.
        cases.push_back({p, n, layout, causal, 3, 1, true, 4, 2, 16, 1, f32});
        // Window larger than a shard (spans several ranks), 4 sinks.
        cases.push_back({p, 13 * p + 5, layout, causal, 17,
                         std::min<int64_t>(4, (13 * p + 5) / (2 * p)), false, 4, 1, 8, 2, f32});
      }
    }
  }
  // N == P (one token per rank) and N < 2P for zigzag (empty chunks).
  for (int p : {2, 3, 4}) {
    cases.push_back({p, p, Layout::kZigzag, true, 0, 0, false, 2, 2, 8, 1, f32});
    cases.push_back({p, p + 1, Layout::kContiguous, false, 2, 1, true, 2, 1, 8, 1, f32});
  }
  // Auto layout, a window wider than the sequence, and every sink count.
  for (int64_t s : {0, 1, 4}) {
    cases.push_back({3, 61, Layout::kAuto, true, 5, s, false, 4, 4, 32, 1, f32});
    cases.push_back({4, 61, Layout::kAuto, false, 7, s, s == 4, 4, 2, 32, 1, f32});
    cases.push_back({2, 29, Layout::kAuto, true, 100, s, true, 2, 1, 16, 1, f32});
  }
  // Reduced precision inside the runtime.
  cases.push_back({3, 50, Layout::kAuto, true, 0, 1, true, 4, 2, 64, 1, DType::kBF16});
  cases.push_back({4, 50, Layout::kContiguous, true, 9, 4, false, 4, 2, 64, 2, DType::kF16});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Sweep, RingForwardTest, ::testing::ValuesIn(ring_cases()),
                         test::ring_case_name);

// A rank whose configuration differs must make EVERY rank fail, never hang.
TEST(RingForwardErrors, ConfigurationMismatchFailsOnEveryRank) {
  const int world = 3;
  std::mutex mu;
  std::vector<std::string> messages(world);
  EXPECT_THROW(run_inproc(world,
                          [&](Communicator& comm) {
                            AttentionSpec spec;
                            spec.causal = true;
                            spec.window = comm.rank() == 1 ? 8 : 4;
                            spec.layout = Layout::kContiguous;
                            const int64_t N = 30;
                            const Shard shard =
                                make_shard(N, world, comm.rank(), Layout::kContiguous);
                            const int64_t n = shard.size();
                            std::vector<float> q(static_cast<size_t>(n * 2 * 8), 0.5f), o(q.size());
                            TensorView tq(q.data(), DType::kF32, {1, n, 2, 8});
                            TensorView to(o.data(), DType::kF32, {1, n, 2, 8});
                            try {
                              forward(comm, spec, N, tq, tq, tq, nullptr, to, nullptr);
                            } catch (const AgreedError& e) {
                              std::lock_guard<std::mutex> lock(mu);
                              messages[comm.rank()] = e.message();
                              throw;
                            }
                          }),
               Error);
  for (int r = 0; r < world; ++r) {
    EXPECT_THAT(messages[r], ::testing::HasSubstr("configuration mismatch across ranks: window"))
        << "rank " << r;
  }
}

// Local bad input on one rank (its shard has the wrong size) fails on every rank.
TEST(RingForwardErrors, BadShardOnOneRankFailsEverywhere) {
  const int world = 4;
  std::mutex mu;
  int agreed = 0;
  EXPECT_THROW(run_inproc(world,
                          [&](Communicator& comm) {
                            AttentionSpec spec;
                            const int64_t N = 40;
                            int64_t n =
                                make_shard(N, world, comm.rank(), Layout::kContiguous).size();
                            if (comm.rank() == 2) n += 1;
                            std::vector<float> q(static_cast<size_t>(n * 8), 0.5f), o(q.size());
                            TensorView tq(q.data(), DType::kF32, {1, n, 1, 8});
                            TensorView to(o.data(), DType::kF32, {1, n, 1, 8});
                            try {
                              forward(comm, spec, N, tq, tq, tq, nullptr, to, nullptr);
                            } catch (const AgreedError& e) {
                              std::lock_guard<std::mutex> lock(mu);
                              ++agreed;
                              EXPECT_THAT(e.message(), ::testing::HasSubstr("shard of rank 2"));
                              throw;
                            }
                          }),
               Error);
  EXPECT_EQ(agreed, world);
}

TEST(RingForwardErrors, RejectsFewerTokensThanRanksAndOversizedSinks) {
  for (auto [n, sinks, expect] : {std::tuple<int64_t, int64_t, const char*>{2, 0, "N"},
                                  std::tuple<int64_t, int64_t, const char*>{12, 5, "sinks"}}) {
    const int world = 3;
    int agreed = 0;
    std::mutex mu;
    EXPECT_THROW(run_inproc(world,
                            [&, n = n, sinks = sinks, expect = expect](Communicator& comm) {
                              AttentionSpec spec;
                              spec.sinks = sinks;
                              spec.layout = Layout::kContiguous;
                              const int64_t local = std::max<int64_t>(1, n / world);
                              std::vector<float> q(static_cast<size_t>(local * 8), 0.5f),
                                  o(q.size());
                              TensorView tq(q.data(), DType::kF32, {1, local, 1, 8});
                              TensorView to(o.data(), DType::kF32, {1, local, 1, 8});
                              try {
                                forward(comm, spec, n, tq, tq, tq, nullptr, to, nullptr);
                              } catch (const AgreedError& e) {
                                std::lock_guard<std::mutex> lock(mu);
                                ++agreed;
                                EXPECT_THAT(e.message(), ::testing::HasSubstr(expect));
                                throw;
                              }
                            }),
                 Error);
    EXPECT_EQ(agreed, world);
  }
}

// With a window, the ring stops early and sends O(W + S) bytes, independent of N.
TEST(RingForwardStats, WindowedRingSendsTheSameBytesAtAnyLength) {
  uint64_t sent[2] = {0, 0};
  int steps[2] = {0, 0};
  const int64_t lengths[2] = {4096, 16384};
  for (int i = 0; i < 2; ++i) {
    std::mutex mu;
    run_inproc(2, [&](Communicator& comm) {
      AttentionSpec spec;
      spec.causal = true;
      spec.window = 64;
      spec.sinks = 4;
      const int64_t N = lengths[i];
      const int64_t n = make_shard(N, 2, comm.rank(), Layout::kContiguous).size();
      std::vector<float> q(static_cast<size_t>(n * 16), 0.25f), o(q.size());
      TensorView tq(q.data(), DType::kF32, {1, n, 1, 16});
      TensorView to(o.data(), DType::kF32, {1, n, 1, 16});
      RingOptions opt;
      opt.num_threads = 1;
      const RingStats st = forward(comm, spec, N, tq, tq, tq, nullptr, to, nullptr, opt);
      if (comm.rank() == 0) {
        std::lock_guard<std::mutex> lock(mu);
        sent[i] = st.bytes_sent;
        steps[i] = st.ring_steps;
      }
    });
  }
  EXPECT_EQ(steps[0], 1);
  EXPECT_EQ(steps[1], 1);
  EXPECT_EQ(sent[0], sent[1]);
  // Rank 0 broadcasts 4 sink tokens and forwards the W-1 = 63 keys rank 1 needs; k and v, f32.
  EXPECT_EQ(sent[0], static_cast<uint64_t>((4 + 63) * 2 * 16 * 4));
}

}  // namespace
}  // namespace ringattn
