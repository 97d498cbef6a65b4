#include "runtime/src/ring_buffers.h"

#include <algorithm>

namespace ringattn::detail {
namespace {

IndexRange hull(IndexRange a, IndexRange b) {
  if (a.empty()) return b;
  if (b.empty()) return a;
  return {std::min(a.lo, b.lo), std::max(a.hi, b.hi)};
}

}  // namespace

int64_t max_need(const RingPlan& plan, int rank) {
  int64_t m = 0;
  for (int origin = 0; origin < plan.world(); ++origin) {
    m = std::max(m, plan.need(rank, origin).size());
  }
  return m;
}

int64_t lane_tokens(const RingPlan& plan, int dir) {
  const int hops = dir > 0 ? plan.forward_hops() : plan.backward_hops();
  int64_t m = 0;
  for (int origin = 0; origin < plan.world(); ++origin) {
    for (int hop = 1; hop <= hops; ++hop) m = std::max(m, plan.carried(origin, dir, hop).size());
  }
  return m;
}

GradRoutes::GradRoutes(const RingPlan& plan, int dir, int hops)
    : world_(plan.world()), hops_(hops) {
  acc_.assign(static_cast<size_t>(world_) * (hops + 1), IndexRange{});
  last_.assign(static_cast<size_t>(world_), 0);
  for (int o = 0; o < world_; ++o) {
    IndexRange acc;
    for (int h = 1; h <= hops; ++h) {
      const int receiver = ((o + dir * h) % world_ + world_) % world_;
      if (plan.route(receiver, o) == dir) {
        const IndexRange need = plan.need(receiver, o);
        if (!need.empty()) last_[static_cast<size_t>(o)] = h;
        acc = hull(acc, need);
      }
      acc_[static_cast<size_t>(o) * (hops + 1) + h] = acc;
    }
  }
}

IndexRange GradRoutes::acc(int origin, int hop) const {
  if (hop < 1 || hop > last(origin)) return {};
  return acc_[static_cast<size_t>(origin) * (hops_ + 1) + hop];
}

int64_t GradRoutes::max_tokens() const {
  int64_t m = 0;
  for (int o = 0; o < world_; ++o) {
    for (int h = 1; h <= last(o); ++h) m = std::max(m, acc(o, h).size());
  }
  return m;
}

}  // namespace ringattn::detail
