// Sharding of N global tokens over P ranks (SPEC section 3): sizes, exact partition, position
// round trips, auto resolution and the errors raised before any communication.

#include "runtime/src/sharding.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "ringattn/error.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;

// Sequence lengths for world p: the edge cases (N = P, N = P + 1, N < 2P, odd, not divisible
// by P or 2P) plus a few larger ones.
std::vector<int64_t> lengths_for(int p) {
  std::vector<int64_t> out = {p, p + 1, 2 * p - 1, 2 * p, 2 * p + 1, 3 * p + 2, 37, 64, 1001};
  std::vector<int64_t> kept;
  for (int64_t n : out) {
    if (n >= p) kept.push_back(n);
  }
  return kept;
}

std::string describe(int64_t n, int p, Layout layout) {
  return "N=" + std::to_string(n) + " P=" + std::to_string(p) + " " + layout_name(layout);
}

std::vector<std::pair<int64_t, int64_t>> as_pairs(const Shard& s) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (const PosRange& r : s.runs) out.emplace_back(r.begin, r.end);
  return out;
}

using Runs = std::vector<std::pair<int64_t, int64_t>>;

TEST(Sharding, ContiguousSizesAndOrder) {
  for (int p = 1; p <= 9; ++p) {
    for (int64_t n : lengths_for(p)) {
      int64_t expected_begin = 0;
      for (int r = 0; r < p; ++r) {
        const Shard s = make_shard(n, p, r, Layout::kContiguous);
        ASSERT_EQ(s.runs.size(), 1u) << describe(n, p, Layout::kContiguous);
        const int64_t expected_size = n / p + (r < n % p ? 1 : 0);
        EXPECT_EQ(s.size(), expected_size) << describe(n, p, Layout::kContiguous) << " r=" << r;
        EXPECT_EQ(s.runs[0].begin, expected_begin) << describe(n, p, Layout::kContiguous);
        expected_begin += expected_size;
      }
      EXPECT_EQ(expected_begin, n);
    }
  }
}

TEST(Sharding, ContiguousHandExamples) {
  // 10 tokens on 3 ranks: 4, 3, 3.
  EXPECT_EQ(as_pairs(make_shard(10, 3, 0, Layout::kContiguous)), (Runs{{0, 4}}));
  EXPECT_EQ(as_pairs(make_shard(10, 3, 1, Layout::kContiguous)), (Runs{{4, 7}}));
  EXPECT_EQ(as_pairs(make_shard(10, 3, 2, Layout::kContiguous)), (Runs{{7, 10}}));
  // N = P: one token each.
  EXPECT_EQ(as_pairs(make_shard(5, 5, 4, Layout::kContiguous)), (Runs{{4, 5}}));
}

TEST(Sharding, ZigzagHandExamples) {
  // 10 tokens, 2 ranks: chunks 3, 3, 2, 2 = [0,3) [3,6) [6,8) [8,10).
  EXPECT_EQ(as_pairs(make_shard(10, 2, 0, Layout::kZigzag)), (Runs{{0, 3}, {8, 10}}));
  EXPECT_EQ(as_pairs(make_shard(10, 2, 1, Layout::kZigzag)), (Runs{{3, 6}, {6, 8}}));
  // 8 tokens, 2 ranks: even chunks of 2.
  EXPECT_EQ(as_pairs(make_shard(8, 2, 0, Layout::kZigzag)), (Runs{{0, 2}, {6, 8}}));
  EXPECT_EQ(as_pairs(make_shard(8, 2, 1, Layout::kZigzag)), (Runs{{2, 4}, {4, 6}}));
  // N = 3 < 2P = 4: chunks 1, 1, 1, 0; rank 0's mirror chunk 3 is empty and dropped.
  EXPECT_EQ(as_pairs(make_shard(3, 2, 0, Layout::kZigzag)), (Runs{{0, 1}}));
  EXPECT_EQ(as_pairs(make_shard(3, 2, 1, Layout::kZigzag)), (Runs{{1, 2}, {2, 3}}));
  // N = P = 3: chunks 1, 1, 1, 0, 0, 0: one token each, in order.
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(as_pairs(make_shard(3, 3, r, Layout::kZigzag)), (Runs{{r, r + 1}})) << r;
  }
  // 7 tokens, 3 ranks: chunks 2, 1, 1, 1, 1, 1.
  EXPECT_EQ(as_pairs(make_shard(7, 3, 0, Layout::kZigzag)), (Runs{{0, 2}, {6, 7}}));
  EXPECT_EQ(as_pairs(make_shard(7, 3, 1, Layout::kZigzag)), (Runs{{2, 3}, {5, 6}}));
  EXPECT_EQ(as_pairs(make_shard(7, 3, 2, Layout::kZigzag)), (Runs{{3, 4}, {4, 5}}));
}

TEST(Sharding, ZigzagChunkSizes) {
  for (int p = 1; p <= 9; ++p) {
    for (int64_t n : lengths_for(p)) {
      // Chunk c of 2P: size n / 2P, the first n % 2P one more; begin is the running sum.
      const int64_t chunks = 2 * p;
      std::vector<int64_t> begin(chunks + 1, 0);
      for (int64_t c = 0; c < chunks; ++c) {
        begin[c + 1] = begin[c] + n / chunks + (c < n % chunks ? 1 : 0);
      }
      ASSERT_EQ(begin[chunks], n);
      for (int r = 0; r < p; ++r) {
        Runs expected;
        for (int64_t c : {static_cast<int64_t>(r), chunks - 1 - r}) {
          if (begin[c + 1] > begin[c]) expected.emplace_back(begin[c], begin[c + 1]);
        }
        const Shard s = make_shard(n, p, r, Layout::kZigzag);
        EXPECT_EQ(as_pairs(s), expected) << describe(n, p, Layout::kZigzag) << " r=" << r;
        EXPECT_GE(s.size(), 1) << describe(n, p, Layout::kZigzag) << " r=" << r;
      }
    }
  }
}

TEST(Sharding, ShardsPartitionTheSequence) {
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag}) {
    for (int p = 1; p <= 9; ++p) {
      for (int64_t n : lengths_for(p)) {
        std::vector<int> owners(n, 0);
        for (int r = 0; r < p; ++r) {
          for (const PosRange& run : make_shard(n, p, r, layout).runs) {
            ASSERT_GT(run.size(), 0) << describe(n, p, layout);
            ASSERT_GE(run.begin, 0);
            ASSERT_LE(run.end, n);
            for (int64_t j = run.begin; j < run.end; ++j) ++owners[j];
          }
        }
        for (int64_t j = 0; j < n; ++j) {
          ASSERT_EQ(owners[j], 1) << describe(n, p, layout) << " position " << j;
        }
      }
    }
  }
}

TEST(Sharding, PositionsRoundTrip) {
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag}) {
    for (int p = 1; p <= 6; ++p) {
      for (int64_t n : lengths_for(p)) {
        for (int r = 0; r < p; ++r) {
          const Shard s = make_shard(n, p, r, layout);
          const int64_t m = s.size();
          std::vector<int64_t> all(m);
          s.positions(0, m, all.data());
          for (int64_t k = 0; k < m; ++k) {
            ASSERT_EQ(s.position(k), all[k]) << describe(n, p, layout);
            ASSERT_EQ(s.local_index(all[k]), k) << describe(n, p, layout);
            if (k > 0) {
              ASSERT_NE(all[k], all[k - 1]);
            }
          }
          // Every sub-range [lo, hi) agrees with the whole (small shards: O(m^3)).
          for (int64_t lo = 0; lo <= m && m <= 64; ++lo) {
            for (int64_t hi = lo; hi <= m; ++hi) {
              std::vector<int64_t> part(hi - lo + 1, -7);
              s.positions(lo, hi, part.data());
              for (int64_t k = lo; k < hi; ++k) ASSERT_EQ(part[k - lo], all[k]);
              ASSERT_EQ(part[hi - lo], -7) << "wrote past hi";
            }
          }
          // Positions held elsewhere (and outside 0..N-1) map to -1.
          int64_t held = 0;
          for (int64_t j = -2; j < n + 2; ++j) {
            if (s.local_index(j) >= 0) ++held;
          }
          EXPECT_EQ(held, m);
          EXPECT_EQ(s.local_index(-1), -1);
          EXPECT_EQ(s.local_index(n), -1);
        }
      }
    }
  }
}

TEST(Sharding, HugeSequenceIsRunArithmetic) {
  // 10^7 + 3 tokens on 7 ranks: nothing per token is materialised.
  const int64_t n = 10'000'003;
  const int p = 7;
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag}) {
    int64_t total = 0;
    for (int r = 0; r < p; ++r) {
      const Shard s = make_shard(n, p, r, layout);
      total += s.size();
      const int64_t last = s.size() - 1;
      EXPECT_EQ(s.local_index(s.position(0)), 0);
      EXPECT_EQ(s.local_index(s.position(last)), last);
      EXPECT_EQ(s.local_index(s.position(last / 2)), last / 2);
    }
    EXPECT_EQ(total, n);
  }
  // Zigzag rank 3 of 7: chunks 3 and 10 of 14; 10^7+3 = 14 * 714285 + 13, so chunks 0..12 hold
  // 714286 tokens and chunk 13 holds 714285.
  const Shard s = make_shard(n, p, 3, Layout::kZigzag);
  ASSERT_EQ(s.runs.size(), 2u);
  EXPECT_EQ(s.runs[0].begin, 3 * 714286);
  EXPECT_EQ(s.runs[1].begin, 10 * 714286);
  EXPECT_EQ(s.position(714286), 10 * 714286);  // first token of the second run
  EXPECT_EQ(s.local_index(10 * 714286 + 5), 714286 + 5);
}

TEST(Sharding, PositionOutOfRangeThrows) {
  const Shard s = make_shard(10, 2, 1, Layout::kZigzag);
  EXPECT_THROW(s.position(-1), Error);
  EXPECT_THROW(s.position(s.size()), Error);
  int64_t out[16];
  EXPECT_THROW(s.positions(0, s.size() + 1, out), Error);
  EXPECT_THROW(s.positions(3, 2, out), Error);
}

TEST(Sharding, AutoResolution) {
  EXPECT_EQ(resolve_layout(Layout::kAuto, true, 0), Layout::kZigzag);
  EXPECT_EQ(resolve_layout(Layout::kAuto, true, 128), Layout::kContiguous);
  EXPECT_EQ(resolve_layout(Layout::kAuto, false, 0), Layout::kContiguous);
  EXPECT_EQ(resolve_layout(Layout::kAuto, false, 128), Layout::kContiguous);
  for (bool causal : {false, true}) {
    for (int64_t w : {0, 7}) {
      EXPECT_EQ(resolve_layout(Layout::kContiguous, causal, w), Layout::kContiguous);
      EXPECT_EQ(resolve_layout(Layout::kZigzag, causal, w), Layout::kZigzag);
    }
  }
}

// Runs f, expects an invalid-argument Error, and returns its message.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_EQ(e.message().find('\n'), std::string::npos) << "message must be one line";
    return e.message();
  }
  ADD_FAILURE() << "no Error thrown";
  return "";
}

TEST(Sharding, CheckShardingErrors) {
  EXPECT_THAT(error_of([] { check_sharding(3, 4, Layout::kContiguous, 0); }),
              AllOf(HasSubstr("N = 3"), HasSubstr("P = 4"), HasSubstr("expected N >= P")));
  EXPECT_THAT(error_of([] { check_sharding(0, 1, Layout::kZigzag, 0); }),
              HasSubstr("expected N >= P"));
  EXPECT_THAT(error_of([] { check_sharding(8, 0, Layout::kContiguous, 0); }),
              HasSubstr("world size must be >= 1, got 0"));
  EXPECT_THAT(error_of([] { check_sharding(8, 2, Layout::kAuto, 0); }),
              HasSubstr("resolved layout"));
  EXPECT_THAT(error_of([] { check_sharding(8, 2, Layout::kContiguous, -1); }),
              HasSubstr("sinks must be >= 0, got -1"));

  // Contiguous 10 on 3: rank 0 holds 4 tokens, so 4 sinks fit and 5 do not.
  EXPECT_NO_THROW(check_sharding(10, 3, Layout::kContiguous, 4));
  EXPECT_THAT(error_of([] { check_sharding(10, 3, Layout::kContiguous, 5); }),
              AllOf(HasSubstr("sinks 5 exceed the first chunk of rank 0 (4 tokens)"),
                    HasSubstr("expected sinks <= 4")));
  // Zigzag 10 on 2: rank 0's first chunk is 3 tokens (its second chunk does not count).
  EXPECT_NO_THROW(check_sharding(10, 2, Layout::kZigzag, 3));
  EXPECT_THAT(error_of([] { check_sharding(10, 2, Layout::kZigzag, 4); }),
              HasSubstr("sinks 4 exceed the first chunk of rank 0 (3 tokens)"));
  // N = P zigzag: one token per first chunk, so only a <bos> sink.
  EXPECT_NO_THROW(check_sharding(4, 4, Layout::kZigzag, 1));
  EXPECT_THAT(error_of([] { check_sharding(4, 4, Layout::kZigzag, 2); }),
              HasSubstr("sinks 2 exceed the first chunk of rank 0 (1 tokens)"));
}

TEST(Sharding, MakeShardRejectsBadArguments) {
  EXPECT_THAT(error_of([] { make_shard(10, 2, 2, Layout::kContiguous); }),
              HasSubstr("rank 2 out of range"));
  EXPECT_THAT(error_of([] { make_shard(10, 2, -1, Layout::kZigzag); }),
              HasSubstr("rank -1 out of range"));
  EXPECT_THAT(error_of([] { make_shard(1, 2, 0, Layout::kZigzag); }), HasSubstr("expected N >= P"));
  EXPECT_THAT(error_of([] { make_shard(10, 2, 0, Layout::kAuto); }), HasSubstr("resolved layout"));
}

}  // namespace
}  // namespace ringattn
