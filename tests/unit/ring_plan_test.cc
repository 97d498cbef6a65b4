// The ring plan against a brute-force mask: every visible (query, key) pair is folded exactly
// once by a simulated ring that moves only what the plan says, nothing is planned for blocks
// with no visible key, and with a window the traffic per rank does not grow with N.

#include "runtime/src/ring_plan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include "ringattn/error.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;

int wrap(int a, int p) { return ((a % p) + p) % p; }

bool inside(const IndexRange& inner, const IndexRange& outer) {
  return inner.empty() || (outer.lo <= inner.lo && inner.hi <= outer.hi);
}

std::string str(const IndexRange& r) {
  return "[" + std::to_string(r.lo) + ", " + std::to_string(r.hi) + ")";
}

std::string describe(const RingGeometry& g) {
  std::ostringstream os;
  os << "N=" << g.seq_len << " P=" << g.world << " " << layout_name(g.layout)
     << (g.causal ? " causal" : " non-causal") << " W=" << g.window << " S=" << g.sinks;
  return os.str();
}

// Simulates the whole ring for one geometry and returns the first broken invariant ("" if
// none). The simulation moves blocks the way the runtime does: every rank folds the sink
// broadcast and its own need(r, r), then at hop s of direction d it sends the part
// carried(o, d, s) of the block o it holds (its own at s = 1) to rank r + d, and the receiver
// folds need(receiver, o), which must lie inside what arrived.
std::string simulate(const RingPlan& plan) {
  const RingGeometry& g = plan.geometry();
  const int p = g.world;
  const int64_t n = g.seq_len, sinks = g.sinks;
  std::ostringstream err;

  std::vector<std::vector<int64_t>> pos(p);
  for (int r = 0; r < p; ++r) {
    pos[r].resize(plan.shard(r).size());
    plan.shard(r).positions(0, plan.shard(r).size(), pos[r].data());
  }
  auto vis = [&](int64_t i, int64_t j) { return visible(g.causal, g.window, g.sinks, i, j); };

  const int hops[2] = {plan.forward_hops(), plan.backward_hops()};
  if (hops[0] < 0 || hops[1] < 0 || hops[0] + hops[1] > p - 1) {
    err << "hops F=" << hops[0] << " B=" << hops[1] << " overlap or are negative";
    return err.str();
  }
  if (hops[1] > 0 && (g.causal || g.window == 0))
    return "backward hops without a non-causal window";
  if (plan.steps() != std::max(hops[0], hops[1])) return "steps() != max(F, B)";

  // need: inside the origin's shard, empty iff no visible non-sink pair, and tight (both ends
  // of the hull are keys some query of the receiver sees).
  for (int r = 0; r < p; ++r) {
    for (int o = 0; o < p; ++o) {
      const IndexRange need = plan.need(r, o);
      bool any = false;
      for (int64_t i : pos[r]) {
        for (int64_t j : pos[o]) any = any || (j >= sinks && vis(i, j));
      }
      if (any == need.empty()) {
        err << "need(" << r << ", " << o << ") = " << str(need) << " but visible pairs: " << any;
        return err.str();
      }
      if (need.empty()) {
        if (plan.route(r, o) != 0) return "route set for an empty need";
        continue;
      }
      if (need.lo < 0 || need.hi > static_cast<int64_t>(pos[o].size())) {
        err << "need(" << r << ", " << o << ") = " << str(need) << " outside the shard";
        return err.str();
      }
      for (int64_t k : {need.lo, need.hi - 1}) {
        bool seen = false;
        for (int64_t i : pos[r]) seen = seen || vis(i, pos[o][k]);
        if (!seen || pos[o][k] < sinks) {
          err << "need(" << r << ", " << o << ") = " << str(need) << " not tight at " << k;
          return err.str();
        }
      }
      const int route = plan.route(r, o);
      if ((r == o) != (route == 0)) return "route 0 iff local step";
    }
  }

  // carried: empty outside 1..hops, nested, the first hop inside the origin's shard.
  for (int di = 0; di < 2; ++di) {
    const int dir = di == 0 ? 1 : -1;
    for (int o = 0; o < p; ++o) {
      if (!plan.carried(o, dir, 0).empty() || !plan.carried(o, dir, hops[di] + 1).empty()) {
        return "carried outside 1..hops is not empty";
      }
      const IndexRange first = plan.carried(o, dir, 1);
      if (!inside(first, IndexRange{0, static_cast<int64_t>(pos[o].size())})) {
        return "carried(o, d, 1) outside the origin's shard";
      }
      for (int s = 1; s < hops[di]; ++s) {
        if (!inside(plan.carried(o, dir, s + 1), plan.carried(o, dir, s))) {
          err << "carried(" << o << ", " << dir << ", " << s + 1 << ") not nested";
          return err.str();
        }
      }
    }
  }

  // The ring itself. count[i * n + j]: how often pair (i, j) is folded (masked pairs are not
  // counted: the kernel applies visible() inside a folded range).
  std::vector<int> count(static_cast<size_t>(n * n), 0);
  std::vector<std::vector<int>> arrivals(p, std::vector<int>(p, 0));
  std::vector<int64_t> sent(p, 0);
  auto fold = [&](int r, int o, const IndexRange& range) {
    for (int64_t i : pos[r]) {
      for (int64_t k = range.lo; k < range.hi; ++k) {
        if (vis(i, pos[o][k])) ++count[i * n + pos[o][k]];
      }
    }
  };
  for (int r = 0; r < p; ++r) {
    for (int64_t i : pos[r]) {
      for (int64_t j = 0; j < sinks; ++j) {
        if (vis(i, j)) ++count[i * n + j];  // the sink broadcast, folded first
      }
    }
    ++arrivals[r][r];
    fold(r, r, plan.need(r, r));  // step 0: the local block
  }
  for (int di = 0; di < 2; ++di) {
    const int dir = di == 0 ? 1 : -1;
    std::vector<IndexRange> held(p);  // what rank r holds of block origin_at(r, dir, s - 1)
    for (int r = 0; r < p; ++r) held[r] = IndexRange{0, static_cast<int64_t>(pos[r].size())};
    bool last_hop_used = hops[di] == 0;
    for (int s = 1; s <= hops[di]; ++s) {
      std::vector<IndexRange> arrived(p);
      for (int r = 0; r < p; ++r) {
        const int o = plan.origin_at(r, dir, s - 1);
        const IndexRange c = plan.carried(o, dir, s);
        if (!inside(c, held[r])) {
          err << "rank " << r << " hop " << s << " dir " << dir << " forwards " << str(c)
              << " of origin " << o << " but holds only " << str(held[r]);
          return err.str();
        }
        const int to = wrap(r + dir, p);
        if (plan.origin_at(to, dir, s) != o) return "origin_at disagrees with the ring";
        arrived[to] = c;
        sent[r] += c.size();
      }
      for (int r = 0; r < p; ++r) {
        // At hop s rank r receives origin r - s (forward) from rank r - 1.
        const int o = plan.origin_at(r, dir, s);
        if (o != wrap(r - dir * s, p)) return "origin_at formula";
        ++arrivals[r][o];
        const IndexRange need = plan.need(r, o);
        if (need.empty()) continue;
        if (plan.route(r, o) != dir) return "block arrives from the direction it is not routed";
        if (!inside(need, arrived[r])) {
          err << "rank " << r << " needs " << str(need) << " of origin " << o << " at hop " << s
              << " dir " << dir << " but receives " << str(arrived[r]);
          return err.str();
        }
        if (s == hops[di]) last_hop_used = true;
        fold(r, o, need);
      }
      held = arrived;
    }
    if (!last_hop_used) {
      err << "direction " << dir << " runs " << hops[di] << " hops but the last one is unused";
      return err.str();
    }
  }

  for (int r = 0; r < p; ++r) {
    for (int o = 0; o < p; ++o) {
      if (arrivals[r][o] > 1) {
        err << "origin " << o << " reaches rank " << r << " " << arrivals[r][o] << " times";
        return err.str();
      }
    }
    if (sent[r] != plan.tokens_sent(r)) {
      err << "rank " << r << " sent " << sent[r] << " tokens, tokens_sent says "
          << plan.tokens_sent(r);
      return err.str();
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const int expected = vis(i, j) ? 1 : 0;
      if (count[i * n + j] != expected) {
        err << "pair (" << i << ", " << j << ") folded " << count[i * n + j] << " times, expected "
            << expected;
        return err.str();
      }
    }
  }
  return "";
}

class RingPlanExhaustive : public ::testing::TestWithParam<int> {};

TEST_P(RingPlanExhaustive, EveryVisiblePairFoldedExactlyOnce) {
  const int p = GetParam();
  int configs = 0;
  for (int64_t n : {p, p + 1, 2 * p - 1, 2 * p, 2 * p + 1, 3 * p + 2, 37, 64}) {
    if (n < p) continue;
    for (Layout layout : {Layout::kContiguous, Layout::kZigzag}) {
      const int64_t first_run = make_shard(n, p, 0, layout).runs.front().size();
      for (bool causal : {false, true}) {
        std::vector<int64_t> windows = {0, 1, 2, 3, 5, n / 3, n / 2, n - 1, n, n + 5};
        std::sort(windows.begin(), windows.end());
        windows.erase(std::unique(windows.begin(), windows.end()), windows.end());
        for (int64_t w : windows) {
          for (int64_t s : {int64_t{0}, int64_t{1}, int64_t{2}, first_run - 1, first_run}) {
            if (s < 0 || s > first_run) continue;
            RingGeometry g;
            g.seq_len = n;
            g.world = p;
            g.layout = layout;
            g.causal = causal;
            g.window = w;
            g.sinks = s;
            const RingPlan plan(g);
            EXPECT_EQ(simulate(plan), "") << describe(g);
            ++configs;
          }
        }
      }
    }
  }
  EXPECT_GT(configs, 100);
}

INSTANTIATE_TEST_SUITE_P(Worlds, RingPlanExhaustive, ::testing::Range(1, 9));

RingGeometry geometry(int64_t n, int p, Layout layout, bool causal, int64_t w, int64_t s) {
  RingGeometry g;
  g.seq_len = n;
  g.world = p;
  g.layout = layout;
  g.causal = causal;
  g.window = w;
  g.sinks = s;
  return g;
}

std::vector<int64_t> all_tokens_sent(const RingPlan& plan) {
  std::vector<int64_t> out;
  for (int r = 0; r < plan.world(); ++r) out.push_back(plan.tokens_sent(r));
  return out;
}

TEST(RingPlan, SingleRankHasNoHops) {
  const RingPlan plan(geometry(10, 1, Layout::kContiguous, false, 3, 2));
  EXPECT_EQ(plan.forward_hops(), 0);
  EXPECT_EQ(plan.backward_hops(), 0);
  EXPECT_EQ(plan.steps(), 0);
  EXPECT_EQ(plan.tokens_sent(0), 0);
  // Local step: keys 2..9 (the 2 sinks come from the broadcast).
  EXPECT_EQ(plan.need(0, 0).lo, 2);
  EXPECT_EQ(plan.need(0, 0).hi, 10);
}

TEST(RingPlan, WindowTrafficIndependentOfSequenceLength) {
  // P = 2, causal, W = 4096, S = 4: rank 1's queries start at N/2, so the oldest key any of
  // them sees is N/2 - 4095: rank 0 sends the last W - 1 = 4095 tokens of its block, once.
  for (int64_t n : {int64_t{262144}, int64_t{1048576}}) {
    const RingPlan plan(geometry(n, 2, Layout::kContiguous, true, 4096, 4));
    EXPECT_EQ(plan.forward_hops(), 1) << n;
    EXPECT_EQ(plan.backward_hops(), 0) << n;
    EXPECT_EQ(plan.need(1, 0).lo, n / 2 - 4095) << n;
    EXPECT_EQ(plan.need(1, 0).hi, n / 2) << n;
    EXPECT_TRUE(plan.need(0, 1).empty()) << n;
    EXPECT_EQ(all_tokens_sent(plan), (std::vector<int64_t>{4095, 0})) << n;
  }
  // P = 8 and longer sequences: every rank but the last sends W - 1, whatever N.
  for (int64_t n : {int64_t{1} << 20, int64_t{1} << 22, int64_t{10'000'019}}) {
    const RingPlan plan(geometry(n, 8, Layout::kContiguous, true, 4096, 4));
    EXPECT_EQ(plan.forward_hops(), 1) << n;
    std::vector<int64_t> expected(8, 4095);
    expected[7] = 0;
    EXPECT_EQ(all_tokens_sent(plan), expected) << n;
  }
}

TEST(RingPlan, WindowHandExample) {
  // N = 40 on 4 ranks of 10, causal, S = 2.
  {
    // W = 6: rank r + 1 (queries from 10(r+1)) sees keys from 10r + 5: local [5, 10) of r.
    const RingPlan plan(geometry(40, 4, Layout::kContiguous, true, 6, 2));
    EXPECT_EQ(plan.forward_hops(), 1);
    EXPECT_EQ(plan.carried(0, 1, 1).lo, 5);
    EXPECT_EQ(plan.carried(0, 1, 1).hi, 10);
    EXPECT_EQ(all_tokens_sent(plan), (std::vector<int64_t>{5, 5, 5, 0}));
    // Rank 0's local step skips the 2 sinks.
    EXPECT_EQ(plan.need(0, 0).lo, 2);
  }
  {
    // W = 12: receiver r + 1 reaches back to 10r - 1, i.e. one token of rank r - 1, so two
    // hops. need(1, 0) = [2, 10) (sinks dropped), need(2, 0) = [9, 10), need(2, 1) = [0, 10),
    // need(3, 1) = [9, 10), need(3, 2) = [0, 10).
    const RingPlan plan(geometry(40, 4, Layout::kContiguous, true, 12, 2));
    EXPECT_EQ(plan.forward_hops(), 2);
    EXPECT_EQ(plan.need(1, 0).lo, 2);
    EXPECT_EQ(plan.need(2, 0).lo, 9);
    EXPECT_EQ(plan.carried(0, 1, 1).lo, 2);
    EXPECT_EQ(plan.carried(0, 1, 2).lo, 9);
    // rank 0: 8 (own block, hop 1); rank 1: 10 + 1 (own, then origin 0's last token);
    // rank 2: 10 + 1; rank 3: nothing anyone after it needs.
    EXPECT_EQ(all_tokens_sent(plan), (std::vector<int64_t>{8, 11, 11, 0}));
  }
}

TEST(RingPlan, ForwardHopsAreMinimal) {
  // 8 ranks of 100, causal W = 250: query 100r reaches back to 100r - 249, which lies in rank
  // r - 3's block (the hop count k needs 100k < 349), so 3 hops. A rank r in 2..6 sends its
  // own block (100), origin r - 1's whole block (100) and the last 49 of r - 2: W - 1 tokens.
  const RingPlan plan(geometry(800, 8, Layout::kContiguous, true, 250, 0));
  EXPECT_EQ(plan.forward_hops(), 3);
  EXPECT_EQ(plan.backward_hops(), 0);
  const std::vector<int64_t> sent = all_tokens_sent(plan);
  EXPECT_EQ(sent, (std::vector<int64_t>{100, 200, 249, 249, 249, 249, 249, 0}));
  // The reach back from query 100r is 100r - W + 1: W = 201 stops at the first token of rank
  // r - 2 (2 hops), W = 202 takes the last token of rank r - 3 (3 hops).
  EXPECT_EQ(RingPlan(geometry(800, 8, Layout::kContiguous, true, 201, 0)).forward_hops(), 2);
  EXPECT_EQ(RingPlan(geometry(800, 8, Layout::kContiguous, true, 202, 0)).forward_hops(), 3);
  EXPECT_EQ(RingPlan(geometry(800, 8, Layout::kContiguous, true, 1, 0)).forward_hops(), 0);
  EXPECT_EQ(RingPlan(geometry(800, 8, Layout::kContiguous, true, 2, 0)).forward_hops(), 1);
}

TEST(RingPlan, CausalFullLap) {
  // Contiguous, no window: origin o is needed by every rank after it and by none before.
  // Rank r forwards, at hop s, origin r - s + 1 when that origin still has a receiver ahead
  // (o + s <= 3): ranks 0..2 send 16 (r + 1) tokens, rank 3 nothing.
  const RingPlan plan(geometry(64, 4, Layout::kContiguous, true, 0, 0));
  EXPECT_EQ(plan.forward_hops(), 3);
  EXPECT_EQ(plan.backward_hops(), 0);
  EXPECT_EQ(all_tokens_sent(plan), (std::vector<int64_t>{16, 32, 48, 0}));

  // Zigzag (what auto picks): every rank's late chunk sees every earlier chunk, so a full lap
  // of P - 1 hops; tokens_sent is the sum of what each hop carries.
  for (int p = 2; p <= 8; ++p) {
    const RingPlan zz(geometry(1000, p, Layout::kZigzag, true, 0, 4));
    EXPECT_EQ(zz.forward_hops(), p - 1) << p;
    EXPECT_EQ(zz.backward_hops(), 0) << p;
    for (int r = 0; r < p; ++r) {
      int64_t sum = 0;
      for (int s = 1; s <= p - 1; ++s) sum += zz.carried(wrap(r - s + 1, p), 1, s).size();
      EXPECT_EQ(zz.tokens_sent(r), sum) << p << " " << r;
      EXPECT_GT(zz.tokens_sent(r), 0) << p << " " << r;
    }
    // The sink owner's block never carries the 4 sinks.
    EXPECT_EQ(zz.carried(0, 1, 1).lo, 4) << p;
  }
}

TEST(RingPlan, NonCausalWindowUsesTwoShortDirections) {
  // 4 ranks of 10, |i - j| < 3: each rank needs the last 2 keys of its left neighbour
  // (forward, 1 hop) and the first 2 of its right one (backward, 1 hop); one forward ring
  // would need 3 hops to bring r + 1's block round.
  const RingPlan plan(geometry(40, 4, Layout::kContiguous, false, 3, 0));
  EXPECT_EQ(plan.forward_hops(), 1);
  EXPECT_EQ(plan.backward_hops(), 1);
  EXPECT_EQ(plan.steps(), 1);
  EXPECT_EQ(plan.route(2, 1), 1);
  EXPECT_EQ(plan.route(1, 2), -1);
  EXPECT_EQ(plan.route(3, 0), 0);
  EXPECT_EQ(plan.carried(1, 1, 1).lo, 8);
  EXPECT_EQ(plan.carried(1, 1, 1).hi, 10);
  EXPECT_EQ(plan.carried(1, -1, 1).lo, 0);
  EXPECT_EQ(plan.carried(1, -1, 1).hi, 2);
  EXPECT_EQ(plan.origin_at(1, -1, 1), 2);
  EXPECT_EQ(plan.origin_at(3, -1, 1), 0);
  EXPECT_EQ(all_tokens_sent(plan), (std::vector<int64_t>{2, 4, 4, 2}));

  // P = 3: F + B = 2 = P - 1, the two rings just meet without overlapping: still two-way.
  const RingPlan three(geometry(30, 3, Layout::kContiguous, false, 3, 0));
  EXPECT_EQ(three.forward_hops(), 1);
  EXPECT_EQ(three.backward_hops(), 1);
  EXPECT_EQ(all_tokens_sent(three), (std::vector<int64_t>{2, 4, 2}));

  // P = 2: both neighbours are the same rank; two rings would deliver it twice, so forward.
  const RingPlan two(geometry(20, 2, Layout::kContiguous, false, 3, 0));
  EXPECT_EQ(two.forward_hops(), 1);
  EXPECT_EQ(two.backward_hops(), 0);
  EXPECT_EQ(all_tokens_sent(two), (std::vector<int64_t>{2, 2}));

  // A window wider than the sequence: everyone needs everyone, one full forward lap.
  const RingPlan wide(geometry(40, 4, Layout::kContiguous, false, 100, 0));
  EXPECT_EQ(wide.forward_hops(), 3);
  EXPECT_EQ(wide.backward_hops(), 0);

  // Long non-causal windowed sequence: two 1-hop rings moving W - 1 tokens each way.
  for (int64_t n : {int64_t{1} << 18, int64_t{1} << 20}) {
    const RingPlan big(geometry(n, 8, Layout::kContiguous, false, 4096, 4));
    EXPECT_EQ(big.forward_hops(), 1) << n;
    EXPECT_EQ(big.backward_hops(), 1) << n;
    EXPECT_EQ(big.tokens_sent(3), 2 * 4095) << n;
    EXPECT_EQ(big.tokens_sent(0), 4095) << n;
    EXPECT_EQ(big.tokens_sent(7), 4095) << n;
  }
}

TEST(RingPlan, RejectsBadGeometry) {
  try {
    RingPlan plan(geometry(10, 2, Layout::kZigzag, true, 0, 4));
    ADD_FAILURE() << "no error for sinks beyond rank 0's first chunk";
  } catch (const Error& e) {
    EXPECT_THAT(e.message(), HasSubstr("sinks 4 exceed the first chunk of rank 0 (3 tokens)"));
  }
  EXPECT_THROW(RingPlan(geometry(3, 4, Layout::kContiguous, false, 0, 0)), Error);
  EXPECT_THROW(RingPlan(geometry(10, 2, Layout::kAuto, false, 0, 0)), Error);
  EXPECT_THROW(RingPlan(geometry(10, 2, Layout::kContiguous, false, -1, 0)), Error);
  const RingPlan plan(geometry(10, 2, Layout::kContiguous, false, 0, 0));
  EXPECT_THROW(plan.carried(0, 0, 1), Error);
  EXPECT_THROW(plan.origin_at(2, 1, 1), Error);
  EXPECT_THROW(plan.tokens_sent(-1), Error);
}

}  // namespace
}  // namespace ringattn
