// The in-process ring backward (P ranks as threads) against the f64 oracle's backward over the
// whole sequence: every rank count, layout, mask, sink configuration and GQA must give the
// dense gradients dq, dk, dv and dz; plus errors on every rank and the windowed byte count.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <mutex>

#include "comm/inproc/inproc_communicator.h"
#include "kernels/cpu/attention_ref.h"
#include "ringattn/ring.h"
#include "runtime/src/sharding.h"
#include "tests/common/test_util.h"

namespace ringattn {
namespace {

using test::gather_rows;
using test::gradient_error;
using test::RingCase;
using test::scatter_rows;

class RingBackwardTest : public ::testing::TestWithParam<RingCase> {};

TEST_P(RingBackwardTest, MatchesDenseOracle) {
  const RingCase c = GetParam();
  const test::RingInputs g =
      test::make_ring_inputs(c, static_cast<uint32_t>(c.n * 131 + c.world * 7 + c.window), true);
  const AttentionSpec spec = test::spec_of(c);
  const std::vector<int64_t> pos = test::iota_pos(c.n);
  auto view = [&](const std::vector<float>& t, int64_t heads) {
    return TensorView(const_cast<float*>(t.data()), DType::kF32, {c.batch, c.n, heads, c.head_dim});
  };
  TensorView gz(const_cast<float*>(g.z.data()), DType::kF32, {c.heads});
  const ref::RefGrads want = ref::attention_backward(
      spec, view(g.q, c.heads), pos.data(), view(g.k, c.kv_heads), view(g.v, c.kv_heads),
      pos.data(), c.sink_logits ? &gz : nullptr, view(g.dout, c.heads));

  std::vector<double> dq(want.dq.size(), std::nan("")), dk(want.dk.size(), std::nan("")),
      dv(want.dv.size(), std::nan(""));
  std::vector<std::vector<float>> dsink(static_cast<size_t>(c.world));
  std::mutex mu;
  const Layout layout = resolve_layout(c.layout, c.causal, c.window);
  run_inproc(c.world, [&](Communicator& comm) {
    const Shard shard = make_shard(c.n, comm.size(), comm.rank(), layout);
    const int64_t n = shard.size();
    const int64_t qrow = c.heads * c.head_dim, krow = c.kv_heads * c.head_dim;
    std::vector<char> q = gather_rows(g.q, c.batch, c.n, qrow, shard, c.dtype);
    std::vector<char> k = gather_rows(g.k, c.batch, c.n, krow, shard, c.dtype);
    std::vector<char> v = gather_rows(g.v, c.batch, c.n, krow, shard, c.dtype);
    std::vector<char> dout = gather_rows(g.dout, c.batch, c.n, qrow, shard, c.dtype);
    std::vector<char> o(q.size());
    std::vector<float> lse(static_cast<size_t>(c.batch * c.heads * n), NAN);
    const size_t qn = static_cast<size_t>(c.batch * n * c.heads * c.head_dim);
    const size_t kn = static_cast<size_t>(c.batch * n * c.kv_heads * c.head_dim);
    std::vector<float> lq(qn, NAN), lk(kn, NAN), lv(kn, NAN),
        ldz(static_cast<size_t>(c.heads), NAN);
    std::vector<float> z = g.z;
    const TensorView tq(q.data(), c.dtype, {c.batch, n, c.heads, c.head_dim});
    const TensorView tk(k.data(), c.dtype, {c.batch, n, c.kv_heads, c.head_dim});
    const TensorView tv(v.data(), c.dtype, {c.batch, n, c.kv_heads, c.head_dim});
    const TensorView tdo(dout.data(), c.dtype, {c.batch, n, c.heads, c.head_dim});
    const TensorView to(o.data(), c.dtype, {c.batch, n, c.heads, c.head_dim});
    const TensorView tl(lse.data(), DType::kF32, {c.batch, c.heads, n});
    const TensorView tz(z.data(), DType::kF32, {c.heads});
    const TensorView tdz(ldz.data(), DType::kF32, {c.heads});
    RingOptions opt;
    opt.num_threads = 1;
    const TensorView* zp = c.sink_logits ? &tz : nullptr;
    forward(comm, spec, c.n, tq, tk, tv, zp, to, &tl, opt);
    backward(comm, spec, c.n, tq, tk, tv, to, tl, tdo, zp,
             TensorView(lq.data(), DType::kF32, {c.batch, n, c.heads, c.head_dim}),
             TensorView(lk.data(), DType::kF32, {c.batch, n, c.kv_heads, c.head_dim}),
             TensorView(lv.data(), DType::kF32, {c.batch, n, c.kv_heads, c.head_dim}), &tdz, opt);
    std::lock_guard<std::mutex> lock(mu);
    scatter_rows(lq, c.batch, c.n, qrow, shard, dq);
    scatter_rows(lk, c.batch, c.n, krow, shard, dk);
    scatter_rows(lv, c.batch, c.n, krow, shard, dv);
    dsink[static_cast<size_t>(comm.rank())] = ldz;
  });

  // The forward's o is rounded to the dtype before the backward reads it (as a training
  // framework would store it), hence the same tolerance as the forward's.
  const double tol = c.dtype == DType::kF32 ? 1e-5 : 1e-2;
  EXPECT_LE(gradient_error(dq, want.dq), tol) << "dq";
  EXPECT_LE(gradient_error(dk, want.dk), tol) << "dk";
  EXPECT_LE(gradient_error(dv, want.dv), tol) << "dv";
  for (int r = 0; r < c.world; ++r) {
    EXPECT_LE(gradient_error(dsink[r], want.dsink), tol) << "dsink on rank " << r;
    EXPECT_EQ(dsink[r], dsink[0]) << "every rank must end with the same dz";
  }
}

std::vector<RingCase> backward_cases() {
  std::vector<RingCase> cases;
  const DType f32 = DType::kF32;
  // Every rank count with both layouts, causal and not, N not divisible by P.
  for (int p : {1, 2, 3, 4, 7}) {
    for (Layout layout : {Layout::kContiguous, Layout::kZigzag}) {
      for (bool causal : {false, true}) {
        const int64_t n = 7 * p + 3;
        cases.push_back({p, n, layout, causal, 0, 0, false, 2, 1, 16, 1, f32});
        // Window smaller than a shard, one sink, learned sinks, GQA.
        cases.push_back({p, n, layout, causal, 3, 1, true, 4, 2, 16, 1, f32});
        // Window larger than a shard (spans several ranks), 4 sinks, MQA, batch 2.
        cases.push_back({p, 13 * p + 5, layout, causal, 17,
                         std::min<int64_t>(4, (13 * p + 5) / (2 * p)), false, 4, 1, 8, 2, f32});
      }
    }
  }
  // One token per rank; a window wider than the sequence; every sink count with learned sinks.
  for (int p : {2, 3, 4})
    cases.push_back({p, p, Layout::kZigzag, true, 0, 0, true, 2, 2, 8, 1, f32});
  for (int64_t s : {0, 1, 4}) {
    cases.push_back({4, 61, Layout::kAuto, false, 7, s, true, 4, 2, 32, 1, f32});
    cases.push_back({2, 29, Layout::kAuto, true, 100, s, true, 2, 1, 16, 1, f32});
  }
  // Longer shards (several kernel tiles per block) and reduced precision.
  cases.push_back({3, 700, Layout::kZigzag, true, 0, 0, true, 2, 1, 32, 1, f32});
  cases.push_back({5, 400, Layout::kContiguous, false, 90, 4, true, 2, 2, 32, 1, f32});
  cases.push_back({3, 50, Layout::kAuto, true, 0, 1, true, 4, 2, 64, 1, DType::kBF16});
  cases.push_back({4, 50, Layout::kContiguous, true, 9, 4, false, 4, 2, 64, 2, DType::kF16});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Sweep, RingBackwardTest, ::testing::ValuesIn(backward_cases()),
                         test::ring_case_name);

// A configuration mismatch or bad local input on one rank fails on every rank, never hangs.
TEST(RingBackwardErrors, FailuresAreAgreedOnEveryRank) {
  const int world = 3;
  const int64_t N = 30;
  for (int which : {0, 1}) {
    std::mutex mu;
    std::vector<std::string> messages(world);
    EXPECT_THROW(run_inproc(world,
                            [&](Communicator& comm) {
                              AttentionSpec spec;
                              spec.causal = true;
                              spec.window = which == 0 && comm.rank() == 1 ? 8 : 4;
                              spec.layout = Layout::kContiguous;
                              const int64_t n =
                                  make_shard(N, world, comm.rank(), Layout::kContiguous).size();
                              std::vector<float> q(static_cast<size_t>(n * 2 * 8), 0.5f),
                                  out(q.size());
                              std::vector<float> lse(static_cast<size_t>(2 * n), 0.0f);
                              TensorView tq(q.data(), DType::kF32, {1, n, 2, 8});
                              TensorView tout(out.data(), DType::kF32, {1, n, 2, 8});
                              // which == 1: rank 2's dout has one token too few.
                              const int64_t dn = which == 1 && comm.rank() == 2 ? n - 1 : n;
                              TensorView tdo(q.data(), DType::kF32, {1, dn, 2, 8});
                              TensorView tl(lse.data(), DType::kF32, {1, 2, n});
                              try {
                                backward(comm, spec, N, tq, tq, tq, tq, tl, tdo, nullptr, tout,
                                         tout, tout, nullptr);
                              } catch (const AgreedError& e) {
                                std::lock_guard<std::mutex> lock(mu);
                                messages[comm.rank()] = e.message();
                                throw;
                              }
                            }),
                 Error);
    for (int r = 0; r < world; ++r) {
      EXPECT_THAT(messages[r], ::testing::HasSubstr(which == 0 ? "configuration mismatch across "
                                                                 "ranks: window"
                                                               : "dout must have the shape of q"))
          << "rank " << r;
    }
  }
}

// With a window the backward, like the forward, moves O(W + S) bytes per rank: the same at any
// N (no lap to bring dk/dv home), for a causal window and a two-way non-causal one.
TEST(RingBackwardStats, WindowedBackwardSendsTheSameBytesAtAnyLength) {
  for (bool causal : {true, false}) {
    const int world = causal ? 4 : 5;
    uint64_t sent[2][5] = {};
    const int64_t lengths[2] = {2000, 8000};
    for (int i = 0; i < 2; ++i) {
      std::mutex mu;
      run_inproc(world, [&](Communicator& comm) {
        AttentionSpec spec;
        spec.causal = causal;
        spec.window = 64;
        spec.sinks = 4;
        spec.layout = Layout::kContiguous;
        const int64_t N = lengths[i];
        const int64_t n = make_shard(N, world, comm.rank(), Layout::kContiguous).size();
        std::vector<float> q(static_cast<size_t>(n * 16), 0.25f), out(q.size());
        std::vector<float> lse(static_cast<size_t>(n), 1.0f);
        TensorView tq(q.data(), DType::kF32, {1, n, 1, 16});
        TensorView tout(out.data(), DType::kF32, {1, n, 1, 16});
        TensorView tl(lse.data(), DType::kF32, {1, 1, n});
        RingOptions opt;
        opt.num_threads = 1;
        const RingStats st = backward(comm, spec, N, tq, tq, tq, tq, tl, tq, nullptr, tout, tout,
                                      tout, nullptr, opt);
        std::lock_guard<std::mutex> lock(mu);
        sent[i][comm.rank()] = st.bytes_sent;
      });
    }
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(sent[0][r], sent[1][r]) << (causal ? "causal" : "non-causal") << ", rank " << r;
      // K/V of at most 2 (W - 1) keys each way plus their f32 dk/dv back, and the sinks.
      EXPECT_LT(sent[1][r], static_cast<uint64_t>(3 * 2 * (2 * 64 + 4) * 16 * 4)) << "rank " << r;
    }
  }
}

}  // namespace
}  // namespace ringattn
