// The memory planner against hand-computed byte counts, one component at a time, and the
// solvers against the plan itself: plan(max N) fits and plan(max N + 1) does not; likewise for
// the smallest rank count.

#include "ringattn/plan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "comm/inproc/inproc_communicator.h"
#include "kernels/cpu/attention_cpu.h"
#include "kernels/cpu/attention_cpu_bwd.h"
#include "ringattn/error.h"
#include "ringattn/kv_cache.h"

namespace ringattn {
namespace {

// B=1 H=4 H_kv=2 D=32 f32, one kernel thread.
PlanInput small(int64_t n, int ranks) {
  PlanInput in;
  in.seq_len = n;
  in.ranks = ranks;
  in.batch = 1;
  in.heads = 4;
  in.kv_heads = 2;
  in.head_dim = 32;
  in.dtype = DType::kF32;
  in.threads = 1;
  return in;
}

TEST(PlanTest, OneRankForwardEveryComponent) {
  const MemoryPlan mp = plan_memory(small(1000, 1));
  ASSERT_EQ(mp.ranks.size(), 1u);
  const RankMemory& m = mp.ranks[0];
  EXPECT_EQ(m.tokens, 1000);
  EXPECT_EQ(m.q, 1000 * 4 * 32 * 4);
  EXPECT_EQ(m.o, m.q);
  EXPECT_EQ(m.k, 1000 * 2 * 32 * 4);
  EXPECT_EQ(m.v, m.k);
  EXPECT_EQ(m.lse, 4 * 1000 * 4);
  EXPECT_EQ(m.positions, 1000 * 8 + 1000 * 8);  // q_pos + k_pos of the local block
  EXPECT_EQ(m.ring_buffers, 0);                 // one rank: no ring
  EXPECT_EQ(m.sink_copy, 0);
  EXPECT_EQ(m.softmax_state, 2 * 4 * 1000 * 4 + 1000 * 4 * 32 * 4);
  // 8 items (B*H = 4, two query tiles of 512) >= 2 threads: 512 x 256 score tile, f32 in place.
  EXPECT_EQ(m.kernel_workspace, 512 * 256 * 4);
  EXPECT_EQ(m.dq + m.dk + m.dv + m.dout + m.cache, 0);
  EXPECT_EQ(m.peak, 2 * 512000 + 2 * 256000 + 16000 + 16000 + 544000 + 524288);
}

TEST(PlanTest, RingBuffersTwoRanksFullAttention) {
  const MemoryPlan mp = plan_memory(small(1000, 2));
  EXPECT_EQ(mp.forward_hops, 1);
  EXPECT_EQ(mp.backward_hops, 0);
  for (const RankMemory& m : mp.ranks) {
    EXPECT_EQ(m.tokens, 500);
    // Two receive buffers and one send buffer of [k; v] for the whole 500-token block.
    EXPECT_EQ(m.ring_buffers, 3 * 2 * (500 * 2 * 32 * 4));
    EXPECT_EQ(m.positions, 500 * 8 + 500 * 8);
  }
}

TEST(PlanTest, UnevenShardsDifferPerRank) {
  const MemoryPlan mp = plan_memory(small(1001, 2));
  EXPECT_EQ(mp.ranks[0].tokens, 501);
  EXPECT_EQ(mp.ranks[1].tokens, 500);
  EXPECT_EQ(mp.ranks[0].q, 501 * 4 * 32 * 4);
  EXPECT_EQ(mp.ranks[1].q, 500 * 4 * 32 * 4);
  // Buffers are sized for the largest carried block (501 tokens) on both ranks.
  EXPECT_EQ(mp.ranks[1].ring_buffers, 3 * 2 * (501 * 2 * 32 * 4));
  EXPECT_EQ(mp.max_rank, 0);
  EXPECT_GT(mp.ranks[0].peak, mp.ranks[1].peak);
  EXPECT_EQ(mp.max_peak(), mp.ranks[0].peak);
}

TEST(PlanTest, WindowAndSinksCarryOnlyTheWindow) {
  PlanInput in = small(1000, 2);
  in.spec.causal = true;
  in.spec.window = 100;
  in.spec.sinks = 4;
  const MemoryPlan mp = plan_memory(in);
  EXPECT_EQ(mp.layout, Layout::kContiguous);
  // Rank 1's queries 500..999 see rank 0's keys 401..499 (i - j < 100): 99 tokens travel.
  const int64_t lane = 3 * 2 * (99 * 2 * 32 * 4);
  const int64_t sink = 2 * (4 * 2 * 32 * 4) + 4 * 8;
  // Window 100: key tiles of 128, score tile 512 x 128.
  const int64_t ws = 512 * 128 * 4;
  for (const RankMemory& m : mp.ranks) {
    EXPECT_EQ(m.ring_buffers, lane);
    EXPECT_EQ(m.sink_copy, sink);
    EXPECT_EQ(m.kernel_workspace, ws);
  }
  // Rank 0 folds its own keys 4..499 (sinks come from the broadcast), rank 1 its own 500.
  EXPECT_EQ(mp.ranks[0].positions, 500 * 8 + 496 * 8);
  EXPECT_EQ(mp.ranks[1].positions, 500 * 8 + 500 * 8);
  // The sink copy is freed before the ring buffers exist: the peak holds the larger of the two.
  const RankMemory& m = mp.ranks[1];
  const int64_t tensors = 2 * 256000 + 2 * 128000 + 8000;
  EXPECT_EQ(m.peak, tensors + m.positions + m.softmax_state + ws + std::max(sink, lane));
}

TEST(PlanTest, KernelWorkspaceBf16AndThreads) {
  AttentionSpec spec;
  // One thread: 512 x 256 score tile plus f32 copies of 300 q rows and 256 k and v keys.
  EXPECT_EQ(cpu::fold_workspace_bytes(spec, 1, 2, 16, 300, 300, DType::kBF16, 1),
            (512 * 256 + (300 + 2 * 256) * 16) * 4);
  // Four threads: query tiles shrink to 64 (10 items), each thread holds its own workspace.
  EXPECT_EQ(cpu::fold_workspace_bytes(spec, 1, 2, 16, 300, 300, DType::kBF16, 4),
            4 * (64 * 256 + (64 + 2 * 256) * 16) * 4);
  // f32 is read in place: only the score tile.
  EXPECT_EQ(cpu::fold_workspace_bytes(spec, 1, 2, 16, 300, 300, DType::kF32, 1), 512 * 256 * 4);
  // Fewer items than threads: only as many threads as items hold a workspace (one tile of 64).
  EXPECT_EQ(cpu::fold_workspace_bytes(spec, 1, 1, 16, 10, 10, DType::kF32, 4), 64 * 256 * 4);
  EXPECT_EQ(cpu::fold_workspace_bytes(spec, 1, 3, 16, 10, 10, DType::kF32, 4), 3 * 64 * 256 * 4);
  EXPECT_EQ(cpu::fold_workspace_bytes(spec, 1, 2, 16, 0, 300, DType::kF32, 1), 0);
}

TEST(PlanTest, BackwardWorkspaceBf16AndThreads) {
  AttentionSpec spec;
  // One thread: two 256 x 256 score-sized tiles, a 256 x D dq tile, f32 copies of 256 q and
  // dout rows and 256 k and v keys.
  EXPECT_EQ(cpu::backward_workspace_bytes(spec, 1, 2, 16, 300, 300, DType::kBF16, 1),
            (2 * 256 * 256 + 256 * 16 + 4 * 256 * 16) * 4);
  // Four threads: key tiles shrink to 64 (B * H_kv * 5 = 10 items), each thread its own.
  EXPECT_EQ(cpu::backward_workspace_bytes(spec, 1, 2, 16, 300, 300, DType::kBF16, 4),
            4 * (2 * 256 * 64 + 256 * 16 + 2 * 256 * 16 + 2 * 64 * 16) * 4);
  // f32 is read in place.
  EXPECT_EQ(cpu::backward_workspace_bytes(spec, 1, 2, 16, 300, 300, DType::kF32, 1),
            (2 * 256 * 256 + 256 * 16) * 4);
  // One item, four threads: one workspace, key tile at its minimum of 64.
  EXPECT_EQ(cpu::backward_workspace_bytes(spec, 1, 1, 16, 10, 10, DType::kF32, 4),
            (2 * 256 * 64 + 256 * 16) * 4);
  // A window of 100 makes both tiles 128.
  spec.causal = true;
  spec.window = 100;
  EXPECT_EQ(cpu::backward_workspace_bytes(spec, 1, 2, 32, 500, 4, DType::kF32, 1),
            (2 * 128 * 128 + 128 * 32) * 4);
  EXPECT_EQ(cpu::backward_workspace_bytes(spec, 1, 2, 16, 0, 300, DType::kF32, 1), 0);
}

TEST(PlanTest, TrainFullAttentionEveryComponent) {
  PlanInput in = small(1000, 2);
  in.mode = PlanMode::kTrain;
  const MemoryPlan mp = plan_memory(in);
  const MemoryPlan fwd = plan_memory(small(1000, 2));
  for (const RankMemory& m : mp.ranks) {
    EXPECT_EQ(m.dout, m.q);
    EXPECT_EQ(m.dq, m.q);
    EXPECT_EQ(m.dk, m.k);
    EXPECT_EQ(m.dv, m.v);
    EXPECT_EQ(m.backward_positions, 500 * 8 + 500 * 8);
    // lse and Delta [4, 500] and dq [500, 4, 32], f32.
    EXPECT_EQ(m.backward_state, 2 * 4 * 500 * 4 + 500 * 4 * 32 * 4);
    // dk, dv of the own 500 keys, f32; no sinks.
    EXPECT_EQ(m.grad_accumulators, 2 * 500 * 2 * 32 * 4);
    // The k/v lane (3 x [k; v] of 500 tokens) and the dk/dv lane: two partials and a receive
    // buffer of the whole 500-token block (the next rank needs all of it) and its return.
    const int64_t kv_block = 500 * 2 * 32 * 4;
    EXPECT_EQ(m.backward_ring_buffers, 3 * 2 * kv_block + 3 * 2 * kv_block + 2 * kv_block);
    // B * H_kv = 2 kv heads, two key tiles each: 256 x 256 tiles, f32 in place.
    const int64_t ws = (2 * 256 * 256 + 256 * 32) * 4;
    EXPECT_EQ(m.backward_workspace, ws);
    // Forward-time tensors, the gradients, the forward's kept workspace and the backward's
    // buffers at once: more than the whole forward.
    const int64_t tensors = m.q + m.k + m.v + m.o + m.lse;
    const int64_t grads = m.dout + m.dq + m.dk + m.dv;
    EXPECT_EQ(m.peak, tensors + grads + m.kernel_workspace + m.backward_positions +
                          m.backward_state + m.grad_accumulators + m.backward_ring_buffers + ws);
    EXPECT_GT(m.peak, fwd.ranks[static_cast<size_t>(m.rank)].peak);
  }
}

TEST(PlanTest, TrainWindowSinksAndLearnedSinks) {
  PlanInput in = small(1000, 2);
  in.mode = PlanMode::kTrain;
  in.spec.causal = true;
  in.spec.window = 100;
  in.spec.sinks = 4;
  in.sink_logits = true;
  const MemoryPlan mp = plan_memory(in);
  const int64_t kv99 = 99 * 2 * 32 * 4;
  // Rank 0's keys 401..499 travel to rank 1 and their dk/dv come back: rank 0 receives the
  // return, rank 1 (whose block nobody needs) sends nothing home.
  EXPECT_EQ(mp.ranks[0].backward_ring_buffers, 3 * 2 * kv99 + 3 * 2 * kv99 + 2 * kv99);
  EXPECT_EQ(mp.ranks[1].backward_ring_buffers, 3 * 2 * kv99 + 3 * 2 * kv99);
  const int64_t sink = 2 * (4 * 2 * 32 * 4) + 4 * 8;
  // Own dk/dv, the sinks' dk/dv and dz [4].
  const int64_t acc = 2 * 500 * 2 * 32 * 4 + 2 * 4 * 2 * 32 * 4 + 4 * 4;
  // Window 100: 128 x 128 tiles for the sink fold and the ring alike.
  const int64_t ws = (2 * 128 * 128 + 128 * 32) * 4;
  for (const RankMemory& m : mp.ranks) {
    EXPECT_EQ(m.grad_accumulators, acc);
    EXPECT_EQ(m.backward_workspace, ws);
    EXPECT_EQ(m.sink_copy, sink);
    EXPECT_EQ(m.backward_positions, m.positions);
    // The sink copy is freed before the ring buffers exist.
    const int64_t tensors = m.q + m.k + m.v + m.o + m.lse + m.dout + m.dq + m.dk + m.dv;
    EXPECT_EQ(m.peak, tensors + m.kernel_workspace + m.backward_positions + m.backward_state + acc +
                          ws + std::max(sink, m.backward_ring_buffers));
  }
  EXPECT_EQ(mp.ranks[0].backward_positions, 500 * 8 + 496 * 8);
  EXPECT_EQ(mp.max_rank, 0);
}

// The cache is sized by the cache itself: a KVCache built for the same problem holds exactly the
// planned bytes, and the cache sits on top of the forward's peak (it is allocated first).
TEST(PlanTest, InferCacheIsWhatTheCacheAllocates) {
  for (const bool windowed : {false, true}) {
    PlanInput in = small(1001, 2);
    in.mode = PlanMode::kInfer;
    in.decode_tokens = 99;
    if (windowed) {
      in.spec.causal = true;
      in.spec.window = 64;
      in.spec.sinks = 2;
    }
    const MemoryPlan mp = plan_memory(in);
    run_inproc(2, [&](Communicator& comm) {
      KVCacheConfig c;
      c.spec = in.spec;
      c.batch = in.batch;
      c.heads = in.heads;
      c.kv_heads = in.kv_heads;
      c.head_dim = in.head_dim;
      c.dtype = in.dtype;
      c.prefill_len = in.seq_len;
      c.max_len = in.seq_len + in.decode_tokens;
      const KVCache cache(comm, c);
      EXPECT_EQ(static_cast<int64_t>(cache.bytes()), mp.ranks[comm.rank()].cache)
          << "windowed " << windowed << " rank " << comm.rank();
    });
    PlanInput f = in;
    f.mode = PlanMode::kForward;
    EXPECT_EQ(mp.ranks[0].peak - plan_memory(f).ranks[0].peak, mp.ranks[0].cache);
    // Non-streaming: 1001 + 99 tokens over 2 ranks need 550 slots each (k and v, f32, 2 kv heads
    // of 32) at least; streaming: at most W - 1 + T = 64 slots, whatever N.
    if (windowed) {
      EXPECT_LT(mp.ranks[0].cache, 2 * 64 * 2 * 32 * 4 * 2);
    } else {
      EXPECT_GT(mp.ranks[0].cache, 2 * 550 * 2 * 32 * 4);
    }
  }
}

TEST(PlanTest, RejectsWhatTheRuntimeRejects) {
  EXPECT_THROW(plan_memory(small(3, 4)), Error);  // N < P
  PlanInput bad = small(1000, 2);
  bad.kv_heads = 3;
  EXPECT_THROW(plan_memory(bad), Error);
  PlanInput sinks = small(1000, 2);
  sinks.spec.sinks = 600;  // beyond rank 0's shard
  EXPECT_THROW(plan_memory(sinks), Error);
  EXPECT_THROW(parse_plan_mode("backward"), Error);
  EXPECT_EQ(parse_plan_mode("train"), PlanMode::kTrain);
}

struct SolveCase {
  const char* name;
  bool causal;
  int64_t window, sinks;
  PlanMode mode;
  DType dtype;
  int ranks;
  int64_t budget;
};

class PlanSolveTest : public ::testing::TestWithParam<SolveCase> {};

TEST_P(PlanSolveTest, MaxSeqLenIsTheEdgeOfThePlan) {
  const SolveCase c = GetParam();
  PlanInput in = small(0, c.ranks);
  in.spec.causal = c.causal;
  in.spec.window = c.window;
  in.spec.sinks = c.sinks;
  in.mode = c.mode;
  in.dtype = c.dtype;
  in.threads = 2;
  const int64_t n = max_seq_len(in, c.budget);
  ASSERT_GT(n, 0);
  in.seq_len = n;
  EXPECT_LE(plan_memory(in).max_peak(), c.budget) << "N=" << n;
  in.seq_len = n + 1;
  EXPECT_GT(plan_memory(in).max_peak(), c.budget) << "N=" << n + 1;
}

TEST_P(PlanSolveTest, MinRanksIsTheEdgeOfThePlan) {
  const SolveCase c = GetParam();
  PlanInput in = small(1 << 20, 1);
  in.spec.causal = c.causal;
  in.spec.window = c.window;
  in.spec.sinks = c.sinks;
  in.mode = c.mode;
  in.dtype = c.dtype;
  in.threads = 2;
  const int p = min_ranks(in, c.budget);
  ASSERT_GT(p, 1) << "the budget should need more than one rank";
  in.ranks = p;
  EXPECT_LE(plan_memory(in).max_peak(), c.budget) << "P=" << p;
  in.ranks = p - 1;
  EXPECT_GT(plan_memory(in).max_peak(), c.budget) << "P=" << p - 1;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, PlanSolveTest,
    ::testing::Values(
        SolveCase{"full", false, 0, 0, PlanMode::kForward, DType::kF32, 2, 64 << 20},
        SolveCase{"causal_zigzag", true, 0, 0, PlanMode::kForward, DType::kBF16, 3, 48 << 20},
        SolveCase{"window_sinks_train", true, 4096, 4, PlanMode::kTrain, DType::kBF16, 2,
                  256 << 20},
        SolveCase{"bidir_window", false, 512, 0, PlanMode::kForward, DType::kF16, 4, 40 << 20},
        SolveCase{"infer", true, 0, 0, PlanMode::kInfer, DType::kF32, 2, 96 << 20}),
    [](const ::testing::TestParamInfo<SolveCase>& info) { return std::string(info.param.name); });

TEST(PlanTest, NothingFitsReturnsZero) {
  EXPECT_EQ(max_seq_len(small(0, 2), 1024), 0);
  EXPECT_EQ(min_ranks(small(1000, 1), 1024, 64), 0);
}

TEST(PlanTest, WindowedMemoryGrowsLinearlyInTokensPerRank) {
  // With a window the ring buffers do not grow with N: doubling N at fixed P adds exactly the
  // per-token tensors and state of the added tokens.
  PlanInput in = small(1 << 16, 4);
  in.spec.causal = true;
  in.spec.window = 1024;
  in.spec.sinks = 4;
  in.seq_len = 1 << 16;
  const int64_t a = plan_memory(in).max_peak();
  in.seq_len = 1 << 17;
  const int64_t b = plan_memory(in).max_peak();
  in.seq_len = 1 << 18;
  const int64_t c = plan_memory(in).max_peak();
  EXPECT_EQ(c - b, 2 * (b - a));
}

}  // namespace
}  // namespace ringattn
