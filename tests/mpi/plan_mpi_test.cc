// The memory planner against the accounting allocator, through real MPI ranks: every rank
// allocates its shards through HostVector, runs the ring forward (and in train mode then the
// backward, with the gradient tensors allocated after the forward, as the plan assumes) twice,
// and compares the growth of the allocator's peak with its own plan: equal to the byte in the
// second call, at most the plan in the first.
//
// The calls run in a fresh thread with one kernel thread: the kernels' workspaces are
// thread-local and kept between calls, so the thread starts with none, the first call grows
// them and the second starts with them in place (the steady state the plan describes).

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "comm/mpi/mpi_communicator.h"
#include "mpi_test_env.h"
#include "ringattn/memory.h"
#include "ringattn/plan.h"
#include "ringattn/ring.h"
#include "runtime/src/sharding.h"

namespace ringattn {
namespace {

struct PlanMpiCase {
  const char* name;
  int64_t n;  // N per rank count: the global length is n * P + extra
  int64_t extra;
  Layout layout;
  bool causal;
  int64_t window, sinks;
  DType dtype;
  int64_t heads, kv_heads, head_dim;
  bool sink_logits;  // learned per-head sink logits (and, in train mode, their gradient)
};

class PlanMpiTest : public ::testing::TestWithParam<std::tuple<PlanMpiCase, PlanMode>> {};

TEST_P(PlanMpiTest, AllocatorPeakEqualsPlan) {
  const PlanMpiCase c = std::get<0>(GetParam());
  const PlanMode mode = std::get<1>(GetParam());
  if (mpi_test::mpi_session().thread_level() < MpiThreadLevel::kSerialized) {
    GTEST_SKIP() << "needs MPI_THREAD_SERIALIZED to run the ring from a fresh thread";
  }
  MpiCommunicator comm(MPI_COMM_WORLD);
  const int P = comm.size(), r = comm.rank();
  const int64_t N = c.n * P + c.extra, B = 1, H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
  AttentionSpec spec;
  spec.causal = c.causal;
  spec.window = c.window;
  spec.sinks = c.sinks;
  spec.layout = c.layout;

  PlanInput in;
  in.seq_len = N;
  in.ranks = P;
  in.batch = B;
  in.heads = H;
  in.kv_heads = Hkv;
  in.head_dim = D;
  in.dtype = c.dtype;
  in.spec = spec;
  in.threads = 1;
  in.mode = mode;
  in.sink_logits = c.sink_logits;
  const MemoryPlan plan = plan_memory(in);
  const int64_t planned = plan.ranks[r].peak;

  // grown[i]: the allocator's peak during call i (a forward, or a forward and a backward) above
  // what the thread held before the first.
  int64_t grown[2] = {-1, -1};
  std::string failure;
  std::thread worker([&] {
    try {
      const Layout layout = resolve_layout(spec.layout, spec.causal, spec.window);
      const Shard shard = make_shard(N, P, r, layout);
      const int64_t n = shard.size();
      const size_t es = dtype_size(c.dtype);
      const int64_t before = memory_stats().current_bytes;
      for (int64_t& g : grown) {
        reset_memory_peak();
        {
          HostVector<char> qb(static_cast<size_t>(B * n * H * D) * es), ob(qb.size());
          HostVector<char> kb(static_cast<size_t>(B * n * Hkv * D) * es), vb(kb.size());
          HostVector<float> lseb(static_cast<size_t>(B * H * n));
          // Any finite values do: only the bytes matter here.
          for (size_t i = 0; i < qb.size(); ++i) qb[i] = static_cast<char>(i % 7);
          for (size_t i = 0; i < kb.size(); ++i) kb[i] = vb[i] = static_cast<char>(i % 5);
          const TensorView q(qb.data(), c.dtype, {B, n, H, D}), o(ob.data(), c.dtype, {B, n, H, D});
          const TensorView k(kb.data(), c.dtype, {B, n, Hkv, D});
          const TensorView v(vb.data(), c.dtype, {B, n, Hkv, D});
          const TensorView lse(lseb.data(), DType::kF32, {B, H, n});
          // The learned sink logits and their gradient are the caller's [H] parameters (not
          // planned), so they live outside the accounting allocator.
          std::vector<float> zb(static_cast<size_t>(H), 0.5f), dzb(zb.size());
          const TensorView z(zb.data(), DType::kF32, {H}), dz(dzb.data(), DType::kF32, {H});
          const TensorView* sink_logits = c.sink_logits ? &z : nullptr;
          RingOptions options;
          options.num_threads = 1;
          forward(comm, spec, N, q, k, v, sink_logits, o, &lse, options);
          if (mode == PlanMode::kTrain) {
            HostVector<char> dob(qb.size()), dqb(qb.size()), dkb(kb.size()), dvb(kb.size());
            for (size_t i = 0; i < dob.size(); ++i) dob[i] = static_cast<char>(i % 3);
            const TensorView dout(dob.data(), c.dtype, {B, n, H, D});
            const TensorView dq(dqb.data(), c.dtype, {B, n, H, D});
            const TensorView dk(dkb.data(), c.dtype, {B, n, Hkv, D});
            const TensorView dv(dvb.data(), c.dtype, {B, n, Hkv, D});
            backward(comm, spec, N, q, k, v, o, lse, dout, sink_logits, dq, dk, dv,
                     c.sink_logits ? &dz : nullptr, options);
          }
        }
        g = memory_stats().peak_bytes - before;
      }
    } catch (const std::exception& e) {
      failure = e.what();
    }
  });
  worker.join();
  ASSERT_EQ(failure, "");
  // The plan is the steady state (the kernels' workspaces kept from the call before); the first
  // call, which starts without them, never needs more.
  EXPECT_EQ(grown[1], planned) << plan_mode_name(mode) << ", rank " << r << " of " << P
                               << ": measured " << grown[1] << " B, planned " << planned << " B";
  EXPECT_LE(grown[0], planned) << plan_mode_name(mode) << ", rank " << r << " of " << P
                               << ": first call " << grown[0] << " B, planned " << planned << " B";
}

const PlanMpiCase kCases[] = {
    {"full_f32", 300, 0, Layout::kAuto, false, 0, 0, DType::kF32, 4, 2, 32, false},
    {"causal_zigzag_bf16_uneven", 257, 3, Layout::kAuto, true, 0, 0, DType::kBF16, 4, 1, 64, false},
    {"causal_contiguous_f16", 400, 1, Layout::kContiguous, true, 0, 0, DType::kF16, 2, 2, 32,
     false},
    {"window_sinks_f32", 700, 2, Layout::kAuto, true, 96, 4, DType::kF32, 4, 2, 32, true},
    {"window_sinks_bf16", 1000, 1, Layout::kAuto, true, 200, 4, DType::kBF16, 8, 2, 64, false},
    {"bidir_window_uneven", 350, 1, Layout::kAuto, false, 64, 0, DType::kF32, 2, 1, 32, true},
    {"bidir_window_sinks_zigzag", 500, 3, Layout::kZigzag, false, 128, 2, DType::kBF16, 4, 4, 32,
     false},
    {"causal_window_zigzag_f16", 600, 5, Layout::kZigzag, true, 300, 0, DType::kF16, 4, 2, 32,
     false},
};

INSTANTIATE_TEST_SUITE_P(Cases, PlanMpiTest,
                         ::testing::Combine(::testing::ValuesIn(kCases),
                                            ::testing::Values(PlanMode::kForward,
                                                              PlanMode::kTrain)),
                         [](const ::testing::TestParamInfo<PlanMpiTest::ParamType>& info) {
                           return std::string(std::get<0>(info.param).name) + "_" +
                                  plan_mode_name(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace ringattn
