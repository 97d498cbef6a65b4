#include "runtime/src/ring_plan.h"

#include <algorithm>

#include "ringattn/error.h"

namespace ringattn {
namespace {

int wrap(int64_t a, int p) {
  const int64_t m = a % p;
  return static_cast<int>(m < 0 ? m + p : m);
}

IndexRange hull(const IndexRange& a, const IndexRange& b) {
  if (a.empty()) return b;
  if (b.empty()) return a;
  return {std::min(a.lo, b.lo), std::max(a.hi, b.hi)};
}

// Global keys [begin, end) visible to at least one query of the run q = [first, last + 1),
// ignoring the sink rule (sinks are folded from the broadcast, never from a ring block).
// Each bound is attained by an end query of the run, so every key inside is visible to some
// query: causal, key j is seen by query `last` iff j <= last and by `first` iff j > first - W;
// non-causal, |i - j| < W for some i in the run iff first - W < j < last + W.
PosRange visible_keys(const RingGeometry& g, const PosRange& q) {
  const int64_t first = q.begin, last = q.end - 1, w = g.window, n = g.seq_len;
  PosRange keys{0, n};
  if (g.causal) {
    keys.end = last + 1;
  } else if (w > 0) {
    keys.end = w >= n - last ? n : last + w;  // written so that a huge W cannot overflow
  }
  if (w > 0 && w <= first) keys.begin = first - w + 1;
  return keys;
}

}  // namespace

RingPlan::RingPlan(const RingGeometry& geometry) : g_(geometry) {
  check_sharding(g_.seq_len, g_.world, g_.layout, g_.sinks);
  RINGATTN_CHECK(g_.window >= 0, "window must be >= 0 (0 = unlimited), got ", g_.window);
  const int p = g_.world;

  shards_.reserve(p);
  for (int r = 0; r < p; ++r) {
    shards_.push_back(make_shard(g_.seq_len, p, r, g_.layout));
    max_shard_ = std::max(max_shard_, shards_.back().size());
  }

  // need(r, o): over (query run of r) x (key run of o), the visible keys of the query run
  // intersected with the key run minus the sinks [0, S), mapped to o's local indices
  // (run offset + position - run begin), hulled.
  need_.assign(static_cast<size_t>(p) * p, IndexRange{});
  for (int r = 0; r < p; ++r) {
    for (int o = 0; o < p; ++o) {
      IndexRange acc;
      for (const PosRange& q : shards_[r].runs) {
        const PosRange keys = visible_keys(g_, q);
        int64_t offset = 0;  // local index of the key run's first token in o's shard
        for (const PosRange& k : shards_[o].runs) {
          const int64_t lo = std::max({keys.begin, k.begin, g_.sinks});
          const int64_t hi = std::min(keys.end, k.end);
          if (lo < hi) acc = hull(acc, {offset + lo - k.begin, offset + hi - k.begin});
          offset += k.size();
        }
      }
      need_[static_cast<size_t>(r) * p + o] = acc;
    }
  }

  // Hop counts. A pair routed forward arrives at hop (r - o) mod P, backward at (o - r) mod P.
  // Two directions only pay off for a non-causal window (the mask reaches both neighbours);
  // they are kept unless the two rings would overlap: forward reaches o+1..o+F and backward
  // o-1..o-B, distinct ranks iff F + B <= P - 1. Otherwise one forward ring as far as needed.
  two_way_ = !g_.causal && g_.window > 0;
  auto max_distance = [&](int dir) {
    int hops = 0;
    for (int r = 0; r < p; ++r) {
      for (int o = 0; o < p; ++o) {
        if (route(r, o) == dir) hops = std::max(hops, wrap(dir * (r - o), p));
      }
    }
    return hops;
  };
  forward_hops_ = max_distance(+1);
  backward_hops_ = max_distance(-1);
  if (two_way_ && forward_hops_ + backward_hops_ > p - 1) {
    two_way_ = false;
    forward_hops_ = max_distance(+1);
    backward_hops_ = 0;
  }
  if (backward_hops_ == 0) two_way_ = false;

  // carried(o, d, s) = hull of need(o + d*h, o) over h = s..hops(d), receivers routed in d:
  // everything a rank at or beyond hop s still has to see. Built from the far end inwards,
  // so carried(o, d, s + 1) lies inside carried(o, d, s).
  for (int di = 0; di < 2; ++di) {
    const int dir = di == 0 ? +1 : -1;
    const int hops = di == 0 ? forward_hops_ : backward_hops_;
    carried_[di].assign(static_cast<size_t>(p) * p, IndexRange{});
    for (int o = 0; o < p; ++o) {
      IndexRange acc;
      for (int h = hops; h >= 1; --h) {
        const int receiver = wrap(o + static_cast<int64_t>(dir) * h, p);
        if (route(receiver, o) == dir) acc = hull(acc, need(receiver, o));
        carried_[di][static_cast<size_t>(o) * p + h] = acc;
      }
    }
  }
}

int RingPlan::origin_at(int rank, int dir, int step) const {
  RINGATTN_CHECK(dir == 1 || dir == -1, "direction must be +1 or -1, got ", dir);
  RINGATTN_CHECK(rank >= 0 && rank < g_.world, "rank ", rank, " out of range: expected < ",
                 g_.world);
  return wrap(rank - static_cast<int64_t>(dir) * step, g_.world);
}

int RingPlan::route(int receiver, int origin) const {
  if (receiver == origin || need(receiver, origin).empty()) return 0;
  if (!two_way_) return +1;
  return origin < receiver ? +1 : -1;
}

IndexRange RingPlan::carried(int origin, int dir, int hop) const {
  RINGATTN_CHECK(dir == 1 || dir == -1, "direction must be +1 or -1, got ", dir);
  RINGATTN_CHECK(origin >= 0 && origin < g_.world, "origin ", origin, " out of range: expected < ",
                 g_.world);
  const int hops = dir > 0 ? forward_hops_ : backward_hops_;
  if (hop < 1 || hop > hops) return {};
  return carried_[dir > 0 ? 0 : 1][static_cast<size_t>(origin) * g_.world + hop];
}

int64_t RingPlan::tokens_sent(int rank) const {
  RINGATTN_CHECK(rank >= 0 && rank < g_.world, "rank ", rank, " out of range: expected < ",
                 g_.world);
  int64_t total = 0;
  // At hop s the rank forwards the block it held after hop s - 1: forward that is origin
  // r - (s - 1) (its own at s = 1), backward origin r + (s - 1).
  for (int s = 1; s <= forward_hops_; ++s) {
    total += carried(origin_at(rank, +1, s - 1), +1, s).size();
  }
  for (int s = 1; s <= backward_hops_; ++s) {
    total += carried(origin_at(rank, -1, s - 1), -1, s).size();
  }
  return total;
}

}  // namespace ringattn
