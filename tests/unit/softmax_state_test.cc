// The online-softmax state (kernels/softmax_state.h) against closed forms in double.
//
// For a row with scaled logits s_j (masked: -inf), values v_j and optional learned sink z:
//   lse = log(sum_j exp(s_j) + exp(z)),   o = sum_j exp(s_j - lse) v_j.
// Every test below folds/merges in f32 through the header and compares with that.

#include "kernels/softmax_state.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace ringattn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One row's state, acc stored with a stride to exercise the strided access of the header.
struct State {
  int d;
  int stride;
  float m = kNegInf;
  float l = 0.0f;
  std::vector<float> acc;
  State(int d_, int stride_ = 1)
      : d(d_), stride(stride_), acc(static_cast<size_t>(d_ * stride_), 0.0f) {}
  float a(int c) const { return acc[static_cast<size_t>(c * stride)]; }
};

// Folds logits s (n of them) with values v [n, d] row-major.
void fold(State& st, const std::vector<float>& s, const std::vector<float>& v) {
  const int d = st.d;
  fold_row(st.m, st.l, st.acc.data(), st.stride, d, s.data(), static_cast<int>(s.size()),
           [&](int j, int c) { return v[static_cast<size_t>(j * d + c)]; });
}

void merge(State& a, const State& b) {
  merge_rows(a.m, a.l, a.acc.data(), a.stride, b.m, b.l, b.acc.data(), b.stride, a.d);
}

struct Final {
  std::vector<float> o;
  float lse;
};

Final finish(const State& st, bool has_sink = false, float z = 0.0f) {
  Final f;
  const float factor = finalize_row(st.m, st.l, has_sink, z, &f.lse);
  for (int c = 0; c < st.d; ++c) f.o.push_back(st.a(c) * factor);
  return f;
}

struct Exact {
  std::vector<double> o;
  double lse;
};

// The closed form in double.
Exact exact(const std::vector<float>& s, const std::vector<float>& v, int d, bool has_sink = false,
            double z = 0.0) {
  double mx = has_sink ? z : -INFINITY;
  for (float x : s) mx = std::max(mx, static_cast<double>(x));
  Exact e;
  e.o.assign(static_cast<size_t>(d), 0.0);
  if (mx == -INFINITY) {
    e.lse = -INFINITY;
    return e;
  }
  double sum = has_sink ? std::exp(z - mx) : 0.0;
  for (float x : s) sum += std::exp(static_cast<double>(x) - mx);
  e.lse = mx + std::log(sum);
  for (size_t j = 0; j < s.size(); ++j) {
    const double p = std::exp(static_cast<double>(s[j]) - e.lse);
    for (int c = 0; c < d; ++c)
      e.o[static_cast<size_t>(c)] += p * v[j * static_cast<size_t>(d) + static_cast<size_t>(c)];
  }
  return e;
}

void expect_close(const Final& got, const Exact& want, double rtol = 2e-6, const char* what = "") {
  ASSERT_EQ(got.o.size(), want.o.size());
  if (std::isinf(want.lse)) {
    EXPECT_EQ(got.lse, static_cast<float>(want.lse)) << what;
  } else {
    EXPECT_NEAR(got.lse, want.lse, rtol * (1.0 + std::fabs(want.lse))) << what;
  }
  double scale = 0.0;
  for (double x : want.o) scale = std::max(scale, std::fabs(x));
  for (size_t c = 0; c < want.o.size(); ++c) {
    ASSERT_FALSE(std::isnan(got.o[c])) << what << " c=" << c;
    EXPECT_NEAR(got.o[c], want.o[c], rtol * (1e-30 + scale) * 4) << what << " c=" << c;
  }
}

std::vector<float> random_values(std::mt19937& rng, int n, float sd = 1.0f) {
  std::normal_distribution<float> dist(0.0f, sd);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// Concatenation of logits and value rows, for the closed form of a merge.
void append(std::vector<float>& s, std::vector<float>& v, const std::vector<float>& s2,
            const std::vector<float>& v2) {
  s.insert(s.end(), s2.begin(), s2.end());
  v.insert(v.end(), v2.begin(), v2.end());
}

// ---------------------------------------------------------------------------------------------

TEST(RescaleFactor, EmptyEqualAndUnderflow) {
  EXPECT_EQ(rescale_factor(kNegInf, 3.0f), 0.0f);
  EXPECT_EQ(rescale_factor(kNegInf, kNegInf), 0.0f);  // not exp(NaN)
  EXPECT_EQ(rescale_factor(2.5f, 2.5f), 1.0f);
  EXPECT_FLOAT_EQ(rescale_factor(1.0f, 3.0f), std::exp(-2.0f));
  const float tiny = rescale_factor(-200.0f, 150.0f);
  EXPECT_EQ(tiny, 0.0f);
}

TEST(AdvanceMax, RaisesOnlyUpwards) {
  float m = kNegInf;
  EXPECT_EQ(advance_max(m, 3.0f), 0.0f);  // empty state: whatever it held is dropped
  EXPECT_EQ(m, 3.0f);
  EXPECT_EQ(advance_max(m, 1.0f), 1.0f);  // lower block max: m unchanged
  EXPECT_EQ(m, 3.0f);
  EXPECT_FLOAT_EQ(advance_max(m, 6.0f), std::exp(-3.0f));
  EXPECT_EQ(m, 6.0f);
  float e = kNegInf;
  EXPECT_EQ(advance_max(e, kNegInf), 0.0f);
  EXPECT_EQ(e, kNegInf);
}

TEST(FoldRow, MatchesDirectF64SoftmaxForRandomRows) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> logit(-8.0f, 8.0f);
  for (int trial = 0; trial < 200; ++trial) {
    const int d = 1 + trial % 7;
    const int n = 1 + static_cast<int>(rng() % 40);
    std::vector<float> s(static_cast<size_t>(n));
    for (float& x : s) x = (rng() % 4 == 0) ? kNegInf : logit(rng);
    s[rng() % s.size()] = logit(rng);  // at least one visible key
    const std::vector<float> v = random_values(rng, n * d);
    // Fold in up to three blocks of random sizes, acc strided.
    State st(d, 1 + trial % 3);
    int begin = 0;
    while (begin < n) {
      const int len = std::min(n - begin, 1 + static_cast<int>(rng() % 16));
      fold(st, std::vector<float>(s.begin() + begin, s.begin() + begin + len),
           std::vector<float>(v.begin() + begin * d, v.begin() + (begin + len) * d));
      begin += len;
    }
    expect_close(finish(st), exact(s, v, d), 2e-6, "random row");
  }
}

TEST(FoldRow, FullyMaskedBlockLeavesStateUnchanged) {
  State st(3);
  fold(st, {1.0f, 2.0f}, {1, 2, 3, 4, 5, 6});
  const State before = st;
  fold(st, {kNegInf, kNegInf, kNegInf}, {9, 9, 9, 9, 9, 9, 9, 9, 9});
  EXPECT_EQ(st.m, before.m);
  EXPECT_EQ(st.l, before.l);
  EXPECT_EQ(st.acc, before.acc);
}

TEST(FoldRow, HugeLogitGapNoOverflowOrNan) {
  const int d = 2;
  const std::vector<float> v = {1, 2, 3, 4, 5, 6};
  // Small first, then the dominant logit, then a very negative one: rescale of the earlier
  // state by exp(-150) underflows to 0, never overflows.
  for (const std::vector<float>& order :
       {std::vector<float>{0.0f, 150.0f, -200.0f}, std::vector<float>{150.0f, 0.0f, -200.0f},
        std::vector<float>{-200.0f, 0.0f, 150.0f}}) {
    State st(d);
    for (size_t j = 0; j < order.size(); ++j) {
      // Value row follows its logit: logit 150 always carries {3, 4}.
      const size_t row = order[j] == 150.0f ? 1 : (order[j] == 0.0f ? 0 : 2);
      fold(st, {order[j]}, {v[row * 2], v[row * 2 + 1]});
    }
    EXPECT_EQ(st.m, 150.0f);
    EXPECT_TRUE(std::isfinite(st.l));
    const Final f = finish(st);
    EXPECT_FLOAT_EQ(f.lse, 150.0f);
    EXPECT_FLOAT_EQ(f.o[0], 3.0f);
    EXPECT_FLOAT_EQ(f.o[1], 4.0f);
  }
  // Two comparable huge logits: softmax over 200 and 200 + log 3 gives weights 1/4, 3/4.
  State st(1);
  const float big = 200.0f;
  fold(st, {big}, {0.0f});
  fold(st, {big + std::log(3.0f)}, {4.0f});
  const Final f = finish(st);
  EXPECT_NEAR(f.o[0], 3.0f, 1e-5);
  EXPECT_NEAR(f.lse, big + std::log(4.0), 1e-4);
}

TEST(MergeRows, EmptyIntoStateIsIdentity) {
  std::mt19937 rng(2);
  State a(4);
  const std::vector<float> v = random_values(rng, 8);
  fold(a, {0.5f, -1.0f}, v);
  const State before = a;
  const State empty(4);
  merge(a, empty);
  EXPECT_EQ(a.m, before.m);
  EXPECT_EQ(a.l, before.l);
  EXPECT_EQ(a.acc, before.acc);
}

TEST(MergeRows, StateIntoEmptyCopiesIt) {
  std::mt19937 rng(3);
  State b(4, 2);
  fold(b, {0.5f, 7.0f, -3.0f}, random_values(rng, 12));
  State a(4);
  merge(a, b);
  EXPECT_EQ(a.m, b.m);
  EXPECT_FLOAT_EQ(a.l, b.l);
  for (int c = 0; c < 4; ++c) EXPECT_FLOAT_EQ(a.a(c), b.a(c));
}

TEST(MergeRows, EmptyIntoEmptyStaysEmptyWithoutNan) {
  State a(2), b(2);
  merge(a, b);
  EXPECT_EQ(a.m, kNegInf);
  EXPECT_EQ(a.l, 0.0f);
  EXPECT_EQ(a.acc[0], 0.0f);
  EXPECT_EQ(a.acc[1], 0.0f);
  float lse;
  EXPECT_EQ(finalize_row(a.m, a.l, false, 0.0f, &lse), 0.0f);
  EXPECT_EQ(lse, kNegInf);
}

TEST(MergeRows, OrderIndependentAndMatchesClosedForm) {
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> logit(-20.0f, 20.0f);
  for (int trial = 0; trial < 100; ++trial) {
    const int d = 5;
    std::vector<float> sa(3), sb(4), sc(2);
    for (float& x : sa) x = logit(rng);
    for (float& x : sb) x = logit(rng) + (trial % 2 ? 60.0f : 0.0f);  // sometimes a big gap
    for (float& x : sc) x = logit(rng);
    const std::vector<float> va = random_values(rng, 3 * d), vb = random_values(rng, 4 * d),
                             vc = random_values(rng, 2 * d);
    State a(d), b(d, 3), c(d);
    fold(a, sa, va);
    fold(b, sb, vb);
    fold(c, sc, vc);

    State ab = a;
    merge(ab, b);
    State ba = b;
    merge(ba, a);
    State ab_c = ab;
    merge(ab_c, c);
    State bc = b;
    merge(bc, c);
    State a_bc = a;
    merge(a_bc, bc);
    State cb_a = c;  // a third order
    merge(cb_a, b);
    merge(cb_a, a);

    std::vector<float> s2 = sa, v2 = va;
    append(s2, v2, sb, vb);
    const Exact e2 = exact(s2, v2, d);
    expect_close(finish(ab), e2, 3e-6, "a+b");
    expect_close(finish(ba), e2, 3e-6, "b+a");
    std::vector<float> s3 = s2, v3 = v2;
    append(s3, v3, sc, vc);
    const Exact e3 = exact(s3, v3, d);
    expect_close(finish(ab_c), e3, 3e-6, "(a+b)+c");
    expect_close(finish(a_bc), e3, 3e-6, "a+(b+c)");
    expect_close(finish(cb_a), e3, 3e-6, "(c+b)+a");
  }
}

TEST(MergeRows, HugeGapBothWays) {
  // State at max 0 and a state at max 150: either order gives the dominant one's output.
  State lo(2), hi(2), very_lo(2);
  fold(lo, {0.0f}, {1.0f, 1.0f});
  fold(hi, {150.0f}, {-2.0f, 5.0f});
  fold(very_lo, {-200.0f}, {100.0f, 100.0f});
  for (int order = 0; order < 2; ++order) {
    State x = order ? hi : lo;
    merge(x, order ? lo : hi);
    merge(x, very_lo);
    EXPECT_EQ(x.m, 150.0f);
    const Final f = finish(x);
    EXPECT_FLOAT_EQ(f.lse, 150.0f);
    EXPECT_FLOAT_EQ(f.o[0], -2.0f);
    EXPECT_FLOAT_EQ(f.o[1], 5.0f);
  }
  // Very low merged into very low: still exact relative weights.
  State p(1), q(1);
  fold(p, {-200.0f}, {2.0f});
  fold(q, {-200.0f}, {4.0f});
  merge(p, q);
  const Final f = finish(p);
  EXPECT_FLOAT_EQ(f.o[0], 3.0f);
  EXPECT_NEAR(f.lse, -200.0 + std::log(2.0), 1e-4);
}

// ---------------------------------------------------------------------------------------------

TEST(FinalizeRow, FullyMaskedRowGivesZeroAndMinusInf) {
  State st(3);
  fold(st, {kNegInf, kNegInf}, {1, 2, 3, 4, 5, 6});
  float lse = 0.0f;
  const float f = finalize_row(st.m, st.l, false, 0.0f, &lse);
  EXPECT_EQ(f, 0.0f);
  EXPECT_EQ(lse, kNegInf);
  for (int c = 0; c < 3; ++c) EXPECT_EQ(st.a(c) * f, 0.0f);
}

TEST(FinalizeRow, OnlySinkGivesLseZAndZeroOutput) {
  for (float z : {-20.0f, 0.0f, 20.0f, 1.5f}) {
    float lse = 0.0f;
    const float f = finalize_row(kNegInf, 0.0f, true, z, &lse);
    EXPECT_EQ(f, 0.0f) << z;
    EXPECT_EQ(lse, z);
  }
}

TEST(FinalizeRow, NoSinkIsPlainNormalisation) {
  float lse;
  const float f = finalize_row(2.0f, 4.0f, false, 123.0f, &lse);  // z ignored without a sink
  EXPECT_FLOAT_EQ(f, 0.25f);
  EXPECT_FLOAT_EQ(lse, 2.0f + std::log(4.0f));
}

TEST(FinalizeRow, LearnedSinkWithSmallAndHugeLogits) {
  std::mt19937 rng(5);
  const int d = 3;
  const std::vector<std::vector<float>> rows = {
      {0.0f, 1.0f, -0.5f},         // small logits
      {100.0f, 98.0f, 99.5f},      // huge positive: sink negligible
      {-100.0f, -98.0f, -101.0f},  // huge negative: sink dominates
      {200.0f, -200.0f, 0.0f},     // both
      {20.0f, 19.0f, kNegInf},     // comparable to z = +20
  };
  for (float z : {20.0f, -20.0f}) {
    for (const auto& s : rows) {
      const std::vector<float> v = random_values(rng, static_cast<int>(s.size()) * d);
      State st(d);
      fold(st, s, v);
      const Final f = finish(st, true, z);
      const Exact e = exact(s, v, d, true, z);
      EXPECT_TRUE(std::isfinite(f.lse));
      expect_close(f, e, 3e-6, "sink");
      // The sink only ever shrinks the output (weights sum to < 1).
      double sum_p = 0.0;
      for (float x : s) sum_p += std::exp(static_cast<double>(x) - e.lse);
      EXPECT_LT(sum_p, 1.0 + 1e-12);
    }
  }
  // Sink dominating by far: o ~ 0, lse ~ z.
  State st(1);
  fold(st, {-100.0f}, {7.0f});
  const Final f = finish(st, true, 20.0f);
  EXPECT_FLOAT_EQ(f.lse, 20.0f);
  EXPECT_NEAR(f.o[0], 0.0f, 1e-30);
  EXPECT_FALSE(std::isnan(f.o[0]));
}

// ---------------------------------------------------------------------------------------------

TEST(MergeNormalised, MatchesMergeRowsThenFinalize) {
  std::mt19937 rng(6);
  std::uniform_real_distribution<float> logit(-30.0f, 30.0f);
  for (int trial = 0; trial < 100; ++trial) {
    const int d = 4;
    std::vector<float> sa(3), sb(5);
    for (float& x : sa) x = logit(rng);
    for (float& x : sb) x = logit(rng) + (trial % 3 == 0 ? 90.0f : 0.0f);
    const std::vector<float> va = random_values(rng, 3 * d), vb = random_values(rng, 5 * d);
    State a(d), b(d);
    fold(a, sa, va);
    fold(b, sb, vb);
    Final fa = finish(a);
    const Final fb = finish(b);
    State ab = a;
    merge(ab, b);
    const Final fab = finish(ab);
    merge_normalised(fa.lse, fa.o.data(), fb.lse, fb.o.data(), d);
    EXPECT_NEAR(fa.lse, fab.lse, 2e-6 * (1 + std::fabs(fab.lse)));
    for (int c = 0; c < d; ++c) EXPECT_NEAR(fa.o[c], fab.o[c], 2e-5 * (1 + std::fabs(fab.o[c])));
    std::vector<float> s = sa, v = va;
    append(s, v, sb, vb);
    expect_close(fa, exact(s, v, d), 3e-6, "normalised");
  }
}

TEST(MergeNormalised, EmptyPartialsBothWays) {
  std::vector<float> o = {1.0f, -2.0f};
  float lse = 3.0f;
  const std::vector<float> garbage = {NAN, NAN};
  merge_normalised(lse, o.data(), kNegInf, garbage.data(), 2);  // empty b: unchanged
  EXPECT_EQ(lse, 3.0f);
  EXPECT_EQ(o[0], 1.0f);
  EXPECT_EQ(o[1], -2.0f);

  std::vector<float> e = {0.0f, 0.0f};
  float lse_e = kNegInf;
  merge_normalised(lse_e, e.data(), 3.0f, o.data(), 2);  // empty a: becomes b
  EXPECT_EQ(lse_e, 3.0f);
  EXPECT_EQ(e[0], 1.0f);
  EXPECT_EQ(e[1], -2.0f);

  std::vector<float> z = {0.0f, 0.0f};
  float lse_z = kNegInf;
  merge_normalised(lse_z, z.data(), kNegInf, z.data(), 2);  // both empty
  EXPECT_EQ(lse_z, kNegInf);
  EXPECT_EQ(z[0], 0.0f);
}

TEST(MergeNormalised, EqualLseAverages) {
  std::vector<float> a = {2.0f}, b = {6.0f};
  float lse = 1.0f;
  merge_normalised(lse, a.data(), 1.0f, b.data(), 1);
  EXPECT_FLOAT_EQ(a[0], 4.0f);
  EXPECT_FLOAT_EQ(lse, 1.0f + std::log(2.0f));
  // Huge gap: 150 vs -200 keeps the dominant partial exactly.
  std::vector<float> p = {5.0f}, q = {-7.0f};
  float lp = -200.0f;
  merge_normalised(lp, p.data(), 150.0f, q.data(), 1);
  EXPECT_EQ(lp, 150.0f);
  EXPECT_EQ(p[0], -7.0f);
}

}  // namespace
}  // namespace ringattn
