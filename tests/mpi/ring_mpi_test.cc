// The ring forward through MpiCommunicator (real processes) against the f64 oracle. Every rank
// derives the whole problem from the seed, computes the oracle for the rows it owns, and
// checks its own shard, so no rank needs another rank's answer (nccl-tests style).

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

struct MpiRingCase {
  int64_t n;
  Layout layout;
  bool causal;
  int64_t window, sinks;
  bool sink_logits;
  int64_t heads, kv_heads, head_dim, batch;
};

class RingMpiTest : public ::testing::TestWithParam<MpiRingCase> {};

TEST_P(RingMpiTest, ShardMatchesDenseOracle) {
  const MpiRingCase c = GetParam();
  MpiCommunicator comm(MPI_COMM_WORLD);
  const int P = comm.size(), r = comm.rank();
  std::mt19937 gen(static_cast<uint32_t>(c.n * 7 + c.window));
  const int64_t B = c.batch, N = c.n, H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
  std::vector<float> q = test::randn(static_cast<size_t>(B * N * H * D), gen);
  std::vector<float> k = test::randn(static_cast<size_t>(B * N * Hkv * D), gen);
  std::vector<float> v = test::randn(k.size(), gen);
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
  std::vector<int64_t> q_pos(static_cast<size_t>(n));
  shard.positions(0, n, q_pos.data());
  const std::vector<int64_t> all_pos = test::iota_pos(N);

  // This rank's shard of q, k, v (rows gathered by global position).
  std::vector<float> lq = test::gather_rows(q, B, N, H * D, shard),
                     lk = test::gather_rows(k, B, N, Hkv * D, shard),
                     lv = test::gather_rows(v, B, N, Hkv * D, shard);
  std::vector<float> o(lq.size(), NAN), lse(static_cast<size_t>(B * H * n), NAN);
  const TensorView tq(lq.data(), DType::kF32, {B, n, H, D});
  const TensorView tk(lk.data(), DType::kF32, {B, n, Hkv, D});
  const TensorView tv(lv.data(), DType::kF32, {B, n, Hkv, D});
  const TensorView to(o.data(), DType::kF32, {B, n, H, D});
  const TensorView tl(lse.data(), DType::kF32, {B, H, n});
  const TensorView tz(z.data(), DType::kF32, {H});
  RingOptions opt;
  opt.num_threads = 1;
  forward(comm, spec, N, tq, tk, tv, c.sink_logits ? &tz : nullptr, to, &tl, opt);

  // Oracle: this rank's queries against the whole sequence.
  const TensorView gk(k.data(), DType::kF32, {B, N, Hkv, D});
  const TensorView gv(v.data(), DType::kF32, {B, N, Hkv, D});
  const ref::RefOutput want = ref::attention_forward(spec, tq, q_pos.data(), gk, gv, all_pos.data(),
                                                     c.sink_logits ? &tz : nullptr);
  std::string why;
  EXPECT_LE(test::normalised_error(o, want.o, &why), 1e-5) << "o on rank " << r << " " << why;
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(want.lse[i])) {
      EXPECT_TRUE(std::isinf(lse[i]) && lse[i] < 0) << "lse[" << i << "] on rank " << r;
    } else {
      EXPECT_NEAR(lse[i], want.lse[i], 1e-5 * std::max(1.0, std::fabs(want.lse[i])))
          << "lse[" << i << "] on rank " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Masks, RingMpiTest,
    ::testing::Values(MpiRingCase{37, Layout::kContiguous, false, 0, 0, false, 4, 2, 16, 1},
                      MpiRingCase{37, Layout::kZigzag, true, 0, 0, false, 4, 1, 16, 2},
                      MpiRingCase{53, Layout::kAuto, true, 0, 2, true, 4, 2, 32, 1},
                      MpiRingCase{53, Layout::kContiguous, true, 6, 1, true, 4, 4, 16, 1},
                      MpiRingCase{61, Layout::kContiguous, false, 5, 3, false, 2, 1, 16, 2},
                      MpiRingCase{61, Layout::kZigzag, true, 11, 2, false, 4, 2, 16, 1},
                      MpiRingCase{29, Layout::kAuto, true, 40, 0, true, 2, 2, 8, 1}));

// A rank with a different window: every rank throws an AgreedError naming the field.
TEST(RingMpiErrors, ConfigurationMismatchIsAnErrorOnEveryRank) {
  MpiCommunicator comm(MPI_COMM_WORLD);
  if (comm.size() < 2) GTEST_SKIP() << "needs two ranks";
  AttentionSpec spec;
  spec.causal = true;
  spec.window = comm.rank() == comm.size() - 1 ? 9 : 3;
  spec.layout = Layout::kContiguous;
  const int64_t N = 40;
  const int64_t n = make_shard(N, comm.size(), comm.rank(), Layout::kContiguous).size();
  std::vector<float> q(static_cast<size_t>(n * 8), 0.1f), o(q.size());
  const TensorView tq(q.data(), DType::kF32, {1, n, 1, 8});
  const TensorView to(o.data(), DType::kF32, {1, n, 1, 8});
  try {
    forward(comm, spec, N, tq, tq, tq, nullptr, to, nullptr);
    ADD_FAILURE() << "mismatched window was accepted";
  } catch (const AgreedError& e) {
    EXPECT_THAT(e.message(), ::testing::HasSubstr("configuration mismatch across ranks: window"));
  }
}

// A local problem on one rank only (its q has the wrong dtype): all ranks fail together.
TEST(RingMpiErrors, LocalErrorOnOneRankFailsEveryRank) {
  MpiCommunicator comm(MPI_COMM_WORLD);
  AttentionSpec spec;
  const int64_t N = 24;
  const int64_t n = make_shard(N, comm.size(), comm.rank(), Layout::kContiguous).size();
  std::vector<float> q(static_cast<size_t>(n * 8), 0.1f), o(q.size());
  const bool bad = comm.rank() == 0;
  const TensorView tq(q.data(), DType::kF32, {1, n, 1, 8});
  const TensorView tk(q.data(), bad ? DType::kBF16 : DType::kF32, {1, n, 1, 8});
  const TensorView to(o.data(), DType::kF32, {1, n, 1, 8});
  try {
    forward(comm, spec, N, tq, tk, tq, nullptr, to, nullptr);
    ADD_FAILURE() << "bad input on rank 0 was accepted";
  } catch (const AgreedError& e) {
    EXPECT_THAT(e.message(), ::testing::HasSubstr("share a dtype"));
    if (!bad) {
      EXPECT_THAT(e.message(), ::testing::HasSubstr("reported by rank 0"));
    }
  }
}

}  // namespace
}  // namespace ringattn
