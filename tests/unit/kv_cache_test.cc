// The distributed KV cache (in-process ranks) against the f64 oracle: prefill of N tokens then
// decode of T tokens equals dense attention over N + T tokens for the last T queries, for every
// mask, rank count, batch and step size; streaming eviction over many windows equals the
// windowed reference; memory stays flat; bad use fails on every rank.

#include "ringattn/kv_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <mutex>
#include <random>
#include <sstream>

#include "comm/inproc/inproc_communicator.h"
#include "kernels/cpu/attention_ref.h"
#include "ringattn/memory.h"
#include "runtime/src/sharding.h"
#include "tests/common/test_util.h"

namespace ringattn {
namespace {

using test::normalised_error;

struct DecodeCase {
  int world;
  int64_t n;      // prefill tokens
  int64_t steps;  // decode tokens in all
  int64_t step;   // tokens per decode call (the last call may bring fewer)
  Layout layout;
  bool causal;
  int64_t window, sinks;
  bool sink_logits;
  int64_t heads, kv_heads, head_dim, batch;
  DType dtype;
};

std::string case_name(const DecodeCase& c) {
  std::ostringstream os;
  os << "P" << c.world << "_N" << c.n << "_T" << c.steps << "x" << c.step << "_"
     << layout_name(c.layout) << (c.causal ? "_causal" : "_full") << "_W" << c.window << "_S"
     << c.sinks << (c.sink_logits ? "_z" : "") << "_H" << c.heads << "x" << c.kv_heads << "_D"
     << c.head_dim << "_B" << c.batch << "_" << dtype_name(c.dtype);
  return os.str();
}

// A whole sequence of `len` tokens: f32 values (rounded to the dtype, for the oracle) and the
// same values stored in the dtype (what the cache gets).
struct Sequence {
  int64_t len = 0;
  std::vector<float> q, k, v, z;
  std::vector<char> qs, ks, vs;
};

Sequence make_sequence(const DecodeCase& c, int64_t len, uint32_t seed) {
  std::mt19937 gen(seed);
  Sequence s;
  s.len = len;
  s.q = test::randn(static_cast<size_t>(c.batch * len * c.heads * c.head_dim), gen, 1.0f, c.dtype);
  s.k =
      test::randn(static_cast<size_t>(c.batch * len * c.kv_heads * c.head_dim), gen, 1.0f, c.dtype);
  s.v = test::randn(s.k.size(), gen, 1.0f, c.dtype);
  if (c.sink_logits) {
    for (int64_t h = 0; h < c.heads; ++h) s.z.push_back(h % 2 ? 1.5f : -0.5f);
  }
  const size_t es = dtype_size(c.dtype);
  for (auto [f, d] : {std::pair{&s.q, &s.qs}, std::pair{&s.k, &s.ks}, std::pair{&s.v, &s.vs}}) {
    d->resize(f->size() * es);  // exact: the values are already rounded
    convert(f->data(), DType::kF32, d->data(), c.dtype, static_cast<int64_t>(f->size()));
  }
  return s;
}

// View of positions [lo, hi) of a whole-sequence [B, len, heads, D] buffer in dtype (strided).
TensorView rows(std::vector<char>& buf, const DecodeCase& c, int64_t len, int64_t heads, int64_t lo,
                int64_t hi) {
  return TensorView(buf.data(), c.dtype, {c.batch, len, heads, c.head_dim}).slice(1, lo, hi);
}

// The shard's rows of a [B, len, heads, D] dtype buffer, gathered contiguously.
std::vector<char> gather(const std::vector<char>& buf, const DecodeCase& c, int64_t len,
                         int64_t heads, const Shard& shard) {
  const int64_t row_bytes = heads * c.head_dim * static_cast<int64_t>(dtype_size(c.dtype));
  return test::gather_rows(buf, c.batch, len, row_bytes, shard);
}

KVCacheConfig config_of(const DecodeCase& c) {
  KVCacheConfig cfg;
  cfg.spec.causal = c.causal;
  cfg.spec.window = c.window;
  cfg.spec.sinks = c.sinks;
  cfg.spec.layout = c.layout;
  cfg.batch = c.batch;
  cfg.heads = c.heads;
  cfg.kv_heads = c.kv_heads;
  cfg.head_dim = c.head_dim;
  cfg.dtype = c.dtype;
  cfg.prefill_len = c.n;
  cfg.max_len = c.n + c.steps;
  cfg.max_step_tokens = c.step;
  cfg.num_threads = 1;
  return cfg;
}

// The oracle for queries [q_lo, q_hi) over the keys at `keys` (global positions).
ref::RefOutput oracle(const DecodeCase& c, Sequence& s, int64_t q_lo, int64_t q_hi,
                      const std::vector<int64_t>& keys) {
  AttentionSpec spec = config_of(c).spec;
  std::vector<int64_t> q_pos;
  for (int64_t i = q_lo; i < q_hi; ++i) q_pos.push_back(i);
  const int64_t nk = static_cast<int64_t>(keys.size());
  std::vector<float> k(static_cast<size_t>(c.batch * nk * c.kv_heads * c.head_dim)), v(k.size());
  const int64_t kr = c.kv_heads * c.head_dim;
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t j = 0; j < nk; ++j) {
      std::copy_n(&s.k[(b * s.len + keys[j]) * kr], kr, &k[(b * nk + j) * kr]);
      std::copy_n(&s.v[(b * s.len + keys[j]) * kr], kr, &v[(b * nk + j) * kr]);
    }
  }
  const TensorView q = TensorView(s.q.data(), DType::kF32, {c.batch, s.len, c.heads, c.head_dim})
                           .slice(1, q_lo, q_hi);
  const TensorView tk(k.data(), DType::kF32, {c.batch, nk, c.kv_heads, c.head_dim});
  const TensorView tv(v.data(), DType::kF32, {c.batch, nk, c.kv_heads, c.head_dim});
  const TensorView tz(s.z.data(), DType::kF32, {c.heads});
  return ref::attention_forward(spec, q, q_pos.data(), tk, tv, keys.data(),
                                c.sink_logits ? &tz : nullptr);
}

// Runs prefill + decode on every rank; calls check(step_lo, step_hi, o, lse) on rank 0 after
// every decode call (o [B, T, H, D], lse [B, H, T]) and verifies all ranks got the same bits.
template <typename CheckFn, typename RankFn>
void run_decode(const DecodeCase& c, Sequence& s, CheckFn check, RankFn per_rank) {
  const Layout layout = resolve_layout(c.layout, c.causal, c.window);
  const int64_t B = c.batch, H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
  std::mutex mu;
  std::vector<std::vector<float>> rank_out(static_cast<size_t>(c.world));
  run_inproc(c.world, [&](Communicator& comm) {
    const KVCacheConfig cfg = config_of(c);
    KVCache cache(comm, cfg);
    const Shard shard = make_shard(c.n, comm.size(), comm.rank(), layout);
    const int64_t n = shard.size();
    std::vector<char> q = gather(s.qs, c, s.len, H, shard);
    std::vector<char> k = gather(s.ks, c, s.len, Hkv, shard);
    std::vector<char> v = gather(s.vs, c, s.len, Hkv, shard);
    std::vector<float> o(static_cast<size_t>(B * n * H * D)), lse(static_cast<size_t>(B * H * n));
    std::vector<float> z = s.z;
    const TensorView tz(z.data(), DType::kF32, {H});
    const TensorView* zp = c.sink_logits ? &tz : nullptr;
    TensorView to(o.data(), DType::kF32, {B, n, H, D}), tl(lse.data(), DType::kF32, {B, H, n});
    RingOptions opt;
    opt.num_threads = 1;
    cache.prefill(TensorView(q.data(), c.dtype, {B, n, H, D}),
                  TensorView(k.data(), c.dtype, {B, n, Hkv, D}),
                  TensorView(v.data(), c.dtype, {B, n, Hkv, D}), zp, to, &tl, opt);
    std::vector<float> od(static_cast<size_t>(B * c.step * H * D)),
        ld(static_cast<size_t>(B * H * c.step));
    for (int64_t lo = c.n; lo < c.n + c.steps; lo += c.step) {
      const int64_t hi = std::min(lo + c.step, c.n + c.steps), t = hi - lo;
      const TensorView o_new(od.data(), DType::kF32, {B, t, H, D});
      const TensorView l_new(ld.data(), DType::kF32, {B, H, t});
      cache.decode(rows(s.qs, c, s.len, H, lo, hi), rows(s.ks, c, s.len, Hkv, lo, hi),
                   rows(s.vs, c, s.len, Hkv, lo, hi), zp, o_new, &l_new);
      per_rank(comm, cache);
      // Every rank must hold the same merged result, bit for bit.
      std::vector<float> mine(od.begin(), od.begin() + B * t * H * D);
      mine.insert(mine.end(), ld.begin(), ld.begin() + B * H * t);
      {
        std::lock_guard<std::mutex> lock(mu);
        rank_out[static_cast<size_t>(comm.rank())] = mine;
      }
      comm.barrier();
      if (comm.rank() == 0) {
        for (int r = 1; r < c.world; ++r) {
          EXPECT_EQ(rank_out[static_cast<size_t>(r)], mine) << "rank " << r << " differs";
        }
        check(lo, hi, std::vector<float>(od.begin(), od.begin() + B * t * H * D),
              std::vector<float>(ld.begin(), ld.begin() + B * H * t));
      }
      comm.barrier();
    }
  });
}

class KVCacheDecodeTest : public ::testing::TestWithParam<DecodeCase> {};

// Prefill N then decode T tokens in calls of `step`: every call's rows equal the oracle over
// the sequence so far (for a causal mask: dense attention over all N + T tokens).
TEST_P(KVCacheDecodeTest, MatchesDenseOracle) {
  const DecodeCase c = GetParam();
  const int64_t total = c.n + c.steps;
  Sequence s = make_sequence(c, total, static_cast<uint32_t>(total * 31 + c.world));
  const double tol = c.dtype == DType::kF32 ? 1e-5 : 1e-3;
  int64_t decoded = 0;
  run_decode(
      c, s,
      [&](int64_t lo, int64_t hi, const std::vector<float>& o, const std::vector<float>& lse) {
        std::vector<int64_t> keys;
        for (int64_t j = 0; j < hi; ++j) keys.push_back(j);
        const ref::RefOutput want = oracle(c, s, lo, hi, keys);
        EXPECT_LE(normalised_error(o, want.o), tol) << "o at positions " << lo << ".." << hi;
        EXPECT_LE(normalised_error(lse, want.lse), tol) << "lse at positions " << lo << ".." << hi;
        decoded += hi - lo;
      },
      [](Communicator&, const KVCache&) {});
  EXPECT_EQ(decoded, c.steps);
}

std::vector<DecodeCase> decode_cases() {
  std::vector<DecodeCase> cases;
  const DType f32 = DType::kF32;
  for (int p : {1, 2, 3, 4}) {
    const int64_t n = 5 * p + 3;
    // Causal, no window (auto = zigzag), batch 2, GQA; T = 1 and T = 3 per call.
    cases.push_back({p, n, 6, 1, Layout::kAuto, true, 0, 0, false, 4, 2, 16, 2, f32});
    cases.push_back({p, n, 7, 3, Layout::kAuto, true, 0, 0, true, 4, 2, 16, 1, f32});
    // Sliding window with sinks and learned sinks (streaming mode), MQA, batch 2.
    cases.push_back({p, n, 9, 1, Layout::kAuto, true, 4, 2, true, 4, 1, 16, 2, f32});
    cases.push_back({p, n, 8, 2, Layout::kContiguous, true, 6, 1, false, 2, 2, 8, 1, f32});
    // Non-causal: the decoded queries see the new tokens of their own call too.
    cases.push_back({p, n, 5, 2, Layout::kContiguous, false, 0, 0, false, 2, 1, 16, 2, f32});
    cases.push_back({p, n, 6, 3, Layout::kAuto, false, 5, 1, true, 4, 2, 8, 1, f32});
  }
  // Zigzag with sinks but no window (sinks are ordinary keys then), a window wider than the
  // sequence, and reduced precision storage.
  cases.push_back({3, 17, 5, 1, Layout::kZigzag, true, 0, 2, false, 2, 1, 16, 1, f32});
  cases.push_back({2, 9, 6, 2, Layout::kAuto, true, 100, 3, true, 2, 1, 16, 2, f32});
  cases.push_back({4, 23, 5, 2, Layout::kAuto, true, 7, 4, false, 4, 2, 32, 1, DType::kBF16});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Sweep, KVCacheDecodeTest, ::testing::ValuesIn(decode_cases()),
                         [](const ::testing::TestParamInfo<DecodeCase>& i) {
                           return case_name(i.param);
                         });

// Streaming over many windows: every step equals the oracle over the tokens a windowed query
// can see (sinks + the last W), the cache never holds more than its fixed capacity, every
// rank keeps only positions the next query can see, and memory stays flat.
class KVCacheStreamingTest : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(KVCacheStreamingTest, EvictsAndMatchesWindowedOracle) {
  const DecodeCase c = GetParam();
  ASSERT_GT(c.window, 0);
  const int64_t total = c.n + c.steps;
  Sequence s = make_sequence(c, total, static_cast<uint32_t>(total + 7 * c.world));
  int checked = 0;
  std::vector<int64_t> process_bytes;
  run_decode(
      c, s,
      [&](int64_t lo, int64_t hi, const std::vector<float>& o, const std::vector<float>& lse) {
        // Check a spread of steps (the oracle is the slow part).
        if ((lo - c.n) % (7 * c.step) != 0 && hi != total) return;
        std::vector<int64_t> keys;
        for (int64_t j = 0; j < std::min(c.sinks, hi); ++j) keys.push_back(j);
        // Only tokens < hi exist when this call runs; the window reaches back W - 1.
        for (int64_t j = std::max(c.sinks, lo - c.window + 1); j < hi; ++j) keys.push_back(j);
        const ref::RefOutput want = oracle(c, s, lo, hi, keys);
        EXPECT_LE(normalised_error(o, want.o), 1e-5) << "o at positions " << lo << ".." << hi;
        EXPECT_LE(normalised_error(lse, want.lse), 1e-5) << "lse at positions " << lo;
        ++checked;
      },
      [&](Communicator& comm, const KVCache& cache) {
        // Capacity is fixed up front and bounded by W - 1 + T, whatever the stream length.
        EXPECT_LE(cache.capacity(), c.window - 1 + c.step);
        EXPECT_EQ(cache.bytes(), cache.capacity_bytes());
        EXPECT_LE(cache.local_tokens(), cache.capacity());
        int64_t held = 0;
        for (int64_t n : cache.rank_tokens()) held += n;
        // Between calls: exactly the last W - 1 tokens that are not sinks.
        const int64_t expect_held = std::min(cache.length() - c.sinks, c.window - 1);
        EXPECT_EQ(held, expect_held) << "at length " << cache.length();
        for (int64_t p : cache.local_positions()) {
          EXPECT_GT(p, cache.length() - c.window)
              << "rank " << comm.rank() << " kept an evicted token";
          EXPECT_GE(p, c.sinks);
        }
        // After a warm-up (first decode calls size the kernel's scratch) the process's accounted
        // bytes stay exactly flat. Measured between barriers so no rank is mid-call.
        comm.barrier();
        if (comm.rank() == 0 && cache.length() - c.n > 4 * c.step) {
          process_bytes.push_back(memory_stats().current_bytes);
        }
        comm.barrier();
      });
  EXPECT_GT(checked, 3);
  ASSERT_GT(process_bytes.size(), 10u);
  for (int64_t b : process_bytes)
    EXPECT_EQ(b, process_bytes.front()) << "memory grew while streaming";
}

std::vector<DecodeCase> streaming_cases() {
  const DType f32 = DType::kF32;
  return {
      // A contiguous prefill much longer than the window: the whole window starts on the last
      // rank and decode re-balances it.
      {2, 40, 300, 1, Layout::kContiguous, true, 8, 2, true, 2, 1, 16, 1, f32},
      {3, 12, 200, 3, Layout::kAuto, true, 10, 1, false, 4, 2, 16, 2, f32},
      {4, 9, 160, 2, Layout::kAuto, false, 6, 0, false, 2, 2, 8, 1, f32},
      {1, 5, 120, 1, Layout::kAuto, true, 5, 4, true, 2, 1, 8, 1, f32},
  };
}

INSTANTIATE_TEST_SUITE_P(Sweep, KVCacheStreamingTest, ::testing::ValuesIn(streaming_cases()),
                         [](const ::testing::TestParamInfo<DecodeCase>& i) {
                           return case_name(i.param);
                         });

// Bad use is an AgreedError on every rank (never a hang) with a message naming the problem.
void expect_all_ranks_fail(int world, const std::string& what,
                           const std::function<void(Communicator&)>& body) {
  std::atomic<int> agreed{0};
  InprocWorld w(world, std::chrono::milliseconds(20000));
  run_inproc(w, [&](Communicator& comm) {
    try {
      body(comm);
      ADD_FAILURE() << "rank " << comm.rank() << ": no error (expected '" << what << "')";
    } catch (const AgreedError& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
      ++agreed;
    }
  });
  EXPECT_EQ(agreed.load(), world);
}

struct Small {
  DecodeCase c{2, 6, 3, 1, Layout::kContiguous, true, 0, 0, false, 2, 1, 8, 1, DType::kF32};
  Sequence s = make_sequence(c, 12, 5);
  std::vector<float> o = std::vector<float>(64 * 16), lse = std::vector<float>(64);

  void prefill(Communicator& comm, KVCache& cache) {
    const Shard shard = make_shard(c.n, comm.size(), comm.rank(), Layout::kContiguous);
    const int64_t n = shard.size();
    std::vector<char> q = gather(s.qs, c, s.len, 2, shard), k = gather(s.ks, c, s.len, 1, shard),
                      v = gather(s.vs, c, s.len, 1, shard);
    std::vector<float> po(static_cast<size_t>(n * 16)), pl(static_cast<size_t>(2 * n));
    cache.prefill(TensorView(q.data(), DType::kF32, {1, n, 2, 8}),
                  TensorView(k.data(), DType::kF32, {1, n, 1, 8}),
                  TensorView(v.data(), DType::kF32, {1, n, 1, 8}), nullptr,
                  TensorView(po.data(), DType::kF32, {1, n, 2, 8}), nullptr);
  }
  void decode(KVCache& cache, int64_t lo, int64_t t, int64_t batch = 1) {
    cache.decode(rows(s.qs, c, s.len, 2, lo, lo + t), rows(s.ks, c, s.len, 1, lo, lo + t),
                 rows(s.vs, c, s.len, 1, lo, lo + t), nullptr,
                 TensorView(o.data(), DType::kF32, {batch, t, 2, 8}), nullptr);
  }
};

TEST(KVCacheErrors, DecodeBeforePrefill) {
  for (int p : {1, 3}) {
    expect_all_ranks_fail(p, "decode called before prefill", [](Communicator& comm) {
      Small x;
      KVCache cache(comm, config_of(x.c));
      x.decode(cache, 6, 1);
    });
  }
}

TEST(KVCacheErrors, BatchMismatch) {
  expect_all_ranks_fail(2, "as at construction", [](Communicator& comm) {
    Small x;
    KVCache cache(comm, config_of(x.c));
    x.prefill(comm, cache);
    // q_new with batch 2 (two views of the same rows stacked is not possible: build one).
    std::vector<float> q2(2 * 16, 0.5f), k2(2 * 8, 0.5f), o2(2 * 16);
    cache.decode(TensorView(q2.data(), DType::kF32, {2, 1, 2, 8}),
                 TensorView(k2.data(), DType::kF32, {2, 1, 1, 8}),
                 TensorView(k2.data(), DType::kF32, {2, 1, 1, 8}), nullptr,
                 TensorView(o2.data(), DType::kF32, {2, 1, 2, 8}), nullptr);
  });
}

TEST(KVCacheErrors, CapacityExceededWithoutWindow) {
  expect_all_ranks_fail(3, "capacity exceeded", [](Communicator& comm) {
    Small x;
    KVCacheConfig cfg = config_of(x.c);
    cfg.max_len = 8;  // room for two decoded tokens
    KVCache cache(comm, cfg);
    x.prefill(comm, cache);
    x.decode(cache, 6, 1);
    x.decode(cache, 7, 1);
    EXPECT_EQ(cache.length(), 8);
    x.decode(cache, 8, 1);
  });
}

TEST(KVCacheErrors, TooManyTokensInOneCall) {
  expect_all_ranks_fail(2, "max_step_tokens", [](Communicator& comm) {
    Small x;
    KVCache cache(comm, config_of(x.c));
    x.prefill(comm, cache);
    x.decode(cache, 6, 2);
  });
}

TEST(KVCacheErrors, RanksDisagreeOnTokenCount) {
  expect_all_ranks_fail(2, "different token counts", [](Communicator& comm) {
    Small x;
    KVCacheConfig cfg = config_of(x.c);
    cfg.max_step_tokens = 2;
    KVCache cache(comm, cfg);
    x.prefill(comm, cache);
    x.decode(cache, 6, comm.rank() == 0 ? 1 : 2);
  });
}

TEST(KVCacheErrors, PrefillTwice) {
  expect_all_ranks_fail(2, "prefill called twice", [](Communicator& comm) {
    Small x;
    KVCache cache(comm, config_of(x.c));
    x.prefill(comm, cache);
    x.prefill(comm, cache);
  });
}

// New tokens go to the emptiest rank, ties to the lowest: the books say where each one went.
TEST(KVCachePlacement, FewestTokensFirst) {
  run_inproc(3, [](Communicator& comm) {
    Small x;
    x.c.world = 3;
    x.c.n = 7;  // contiguous shards of 3, 2, 2 tokens
    KVCacheConfig cfg = config_of(x.c);
    cfg.max_len = 12;
    KVCache cache(comm, cfg);
    x.prefill(comm, cache);
    EXPECT_EQ(std::vector<int64_t>(cache.rank_tokens().begin(), cache.rank_tokens().end()),
              (std::vector<int64_t>{3, 2, 2}));
    const int expected_owner[] = {1, 2, 0, 1, 2};
    for (int i = 0; i < 5; ++i) {
      x.decode(cache, 7 + i, 1);
      const std::vector<int64_t> pos = cache.local_positions();
      const bool mine = std::find(pos.begin(), pos.end(), 7 + i) != pos.end();
      EXPECT_EQ(mine, comm.rank() == expected_owner[i]) << "token " << 7 + i;
    }
  });
}

// load() adopts a K/V shard without the prefill attention; decode then gives the same bits.
TEST(KVCacheLoad, DecodesLikePrefill) {
  run_inproc(3, [](Communicator& comm) {
    Small x;
    x.c.n = 9;
    x.c.window = 4;
    x.c.sinks = 1;
    KVCacheConfig cfg = config_of(x.c);
    KVCache prefilled(comm, cfg), loaded(comm, cfg);
    x.prefill(comm, prefilled);
    const Shard shard = make_shard(x.c.n, comm.size(), comm.rank(), Layout::kContiguous);
    const int64_t n = shard.size();
    std::vector<char> k = gather(x.s.ks, x.c, x.s.len, 1, shard),
                      v = gather(x.s.vs, x.c, x.s.len, 1, shard);
    loaded.load(TensorView(k.data(), DType::kF32, {1, n, 1, 8}),
                TensorView(v.data(), DType::kF32, {1, n, 1, 8}));
    EXPECT_EQ(loaded.local_positions(), prefilled.local_positions());
    for (int64_t p = 9; p < 12; ++p) {
      x.decode(prefilled, p, 1);
      const std::vector<float> want(x.o.begin(), x.o.begin() + 16);
      x.decode(loaded, p, 1);
      EXPECT_EQ(std::vector<float>(x.o.begin(), x.o.begin() + 16), want) << "position " << p;
    }
  });
}

// capacity_for: even split of the final length, or the largest prefill shard.
TEST(KVCacheCapacity, Bounds) {
  KVCacheConfig c;
  c.batch = 1;
  c.heads = c.kv_heads = 1;
  c.head_dim = 4;
  c.prefill_len = 100;
  c.max_len = 1000;
  EXPECT_EQ(KVCache::capacity_for(c, 4), 250);
  c.max_len = 0;
  EXPECT_EQ(KVCache::capacity_for(c, 3), 34);
  // Streaming, contiguous prefill longer than the window: the last rank holds W - 1 tokens.
  c.spec.causal = true;
  c.spec.window = 16;
  c.spec.sinks = 2;
  c.prefill_len = 1 << 20;
  c.max_step_tokens = 1;
  EXPECT_EQ(KVCache::capacity_for(c, 2), 15);
  // A short prefill: an even split of W - 1 + T.
  c.prefill_len = 8;
  c.max_step_tokens = 5;
  EXPECT_EQ(KVCache::capacity_for(c, 4), 5);
}

}  // namespace
}  // namespace ringattn
