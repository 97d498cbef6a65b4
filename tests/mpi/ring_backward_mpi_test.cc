// The ring backward through MpiCommunicator (real processes) against the f64 oracle's backward.
// Every rank derives the whole problem from the seed, computes the dense gradients, and checks
// its own shard of dq, dk, dv and the dz every rank must hold (nccl-tests style).

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "comm/mpi/mpi_communicator.h"
#include "kernels/cpu/attention_ref.h"
#include "ringattn/ring.h"
#include "runtime/src/sharding.h"
#include "tests/common/test_util.h"

namespace ringattn {
namespace {

struct MpiBwdCase {
  int64_t n;
  Layout layout;
  bool causal;
  int64_t window, sinks;
  bool sink_logits;
  int64_t heads, kv_heads, head_dim, batch;
};

class RingBackwardMpiTest : public ::testing::TestWithParam<MpiBwdCase> {};

TEST_P(RingBackwardMpiTest, ShardMatchesDenseOracle) {
  const MpiBwdCase c = GetParam();
  MpiCommunicator comm(MPI_COMM_WORLD);
  const int P = comm.size(), r = comm.rank();
  std::mt19937 gen(static_cast<uint32_t>(c.n * 7 + c.window + 3));
  const int64_t B = c.batch, N = c.n, H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
  std::vector<float> q = test::randn(static_cast<size_t>(B * N * H * D), gen);
  std::vector<float> k = test::randn(static_cast<size_t>(B * N * Hkv * D), gen);
  std::vector<float> v = test::randn(k.size(), gen);
  std::vector<float> dout = test::randn(q.size(), gen);
  std::vector<float> z;
  for (int64_t h = 0; h < H && c.sink_logits; ++h) z.push_back(0.5f * static_cast<float>(h) - 1.0f);
  AttentionSpec spec;
  spec.causal = c.causal;
  spec.window = c.window;
  spec.sinks = c.sinks;
  spec.layout = c.layout;
  const Layout layout = resolve_layout(c.layout, c.causal, c.window);
  const Shard shard = make_shard(N, P, r, layout);
  const int64_t n = shard.size();
  const std::vector<int64_t> pos = test::iota_pos(N);

  // This rank's rows of a global [B, N, heads, D] tensor (inputs f32, oracle gradients f64).
  auto take = [&](const auto& g, int64_t heads) {
    return test::gather_rows(g, B, N, heads * D, shard);
  };
  std::vector<float> lq = take(q, H), lk = take(k, Hkv), lv = take(v, Hkv), ldo = take(dout, H);
  std::vector<float> o(lq.size(), NAN), lse(static_cast<size_t>(B * H * n), NAN);
  std::vector<float> dq(lq.size(), NAN), dk(lk.size(), NAN), dv(lk.size(), NAN),
      dz(static_cast<size_t>(H), NAN);
  const TensorView tq(lq.data(), DType::kF32, {B, n, H, D});
  const TensorView tk(lk.data(), DType::kF32, {B, n, Hkv, D});
  const TensorView tv(lv.data(), DType::kF32, {B, n, Hkv, D});
  const TensorView tdo(ldo.data(), DType::kF32, {B, n, H, D});
  const TensorView to(o.data(), DType::kF32, {B, n, H, D});
  const TensorView tl(lse.data(), DType::kF32, {B, H, n});
  const TensorView tz(z.data(), DType::kF32, {H});
  const TensorView tdz(dz.data(), DType::kF32, {H});
  RingOptions opt;
  opt.num_threads = 1;
  const TensorView* zp = c.sink_logits ? &tz : nullptr;
  forward(comm, spec, N, tq, tk, tv, zp, to, &tl, opt);
  const RingStats st = backward(comm, spec, N, tq, tk, tv, to, tl, tdo, zp,
                                TensorView(dq.data(), DType::kF32, {B, n, H, D}),
                                TensorView(dk.data(), DType::kF32, {B, n, Hkv, D}),
                                TensorView(dv.data(), DType::kF32, {B, n, Hkv, D}), &tdz, opt);
  EXPECT_GT(st.blocks_computed, 0);

  const TensorView gq(q.data(), DType::kF32, {B, N, H, D});
  const TensorView gk(k.data(), DType::kF32, {B, N, Hkv, D});
  const TensorView gv(v.data(), DType::kF32, {B, N, Hkv, D});
  const TensorView gdo(dout.data(), DType::kF32, {B, N, H, D});
  const ref::RefGrads want =
      ref::attention_backward(spec, gq, pos.data(), gk, gv, pos.data(), zp, gdo);
  EXPECT_LE(test::gradient_error(dq, take(want.dq, H)), 1e-5) << "dq on rank " << r;
  EXPECT_LE(test::gradient_error(dk, take(want.dk, Hkv)), 1e-5) << "dk on rank " << r;
  EXPECT_LE(test::gradient_error(dv, take(want.dv, Hkv)), 1e-5) << "dv on rank " << r;
  EXPECT_LE(test::gradient_error(dz, want.dsink), 1e-5) << "dz on rank " << r;
}

INSTANTIATE_TEST_SUITE_P(
    Masks, RingBackwardMpiTest,
    ::testing::Values(MpiBwdCase{37, Layout::kContiguous, false, 0, 0, false, 4, 2, 16, 1},
                      MpiBwdCase{37, Layout::kZigzag, true, 0, 0, true, 4, 1, 16, 2},
                      MpiBwdCase{53, Layout::kAuto, true, 0, 2, true, 4, 2, 32, 1},
                      MpiBwdCase{53, Layout::kContiguous, true, 6, 1, true, 4, 4, 16, 1},
                      MpiBwdCase{61, Layout::kContiguous, false, 5, 3, false, 2, 1, 16, 2},
                      MpiBwdCase{61, Layout::kZigzag, true, 11, 2, false, 4, 2, 16, 1}));

// Bad input on one rank (dq of the wrong shape): every rank throws an AgreedError.
TEST(RingBackwardMpiErrors, LocalErrorOnOneRankFailsEveryRank) {
  MpiCommunicator comm(MPI_COMM_WORLD);
  AttentionSpec spec;
  const int64_t N = 24;
  const int64_t n = make_shard(N, comm.size(), comm.rank(), Layout::kContiguous).size();
  std::vector<float> q(static_cast<size_t>(n * 8), 0.1f), out(q.size()),
      lse(static_cast<size_t>(n));
  const bool bad = comm.rank() == comm.size() - 1;
  const TensorView tq(q.data(), DType::kF32, {1, n, 1, 8});
  const TensorView tl(lse.data(), DType::kF32, {1, 1, n});
  const TensorView tout(out.data(), DType::kF32, {1, n, 1, 8});
  const TensorView tdq(out.data(), DType::kF32, {1, n, 1, bad ? 4 : 8});
  try {
    backward(comm, spec, N, tq, tq, tq, tq, tl, tq, nullptr, tdq, tout, tout, nullptr);
    ADD_FAILURE() << "bad dq on the last rank was accepted";
  } catch (const AgreedError& e) {
    EXPECT_THAT(e.message(), ::testing::HasSubstr("dq must have the shape of q"));
  }
}

}  // namespace
}  // namespace ringattn
