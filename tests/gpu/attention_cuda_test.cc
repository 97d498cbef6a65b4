// The CUDA forward (reset_state + fold_forward + finalize_forward) against the f64 oracle
// (kernels/cpu/attention_ref.h), for both kernel families: the generic one always, the
// tensor-core one wherever tensor_core_supported(dtype, D). Errors are normalised
// (||o - ref|| / ||ref||, NaN never passes) with a tolerance per dtype; lse is compared by its
// largest absolute error, with -inf required exactly where the oracle has -inf. o and lse are
// poisoned with NaN before every run, so an element the kernels never wrote fails. Keys are
// folded as one block and as three blocks in shuffled order (what the ring does), positions are
// global and need not be monotone. Every test draws fresh inputs from a seed of its own name.

#include "kernels/cuda/attention_cuda.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/attention_ref.h"
#include "kernels/cuda/cuda_memory.h"
#include "tests/common/test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace ringattn::cuda {
namespace {

using test::iota_pos;
using test::normalised_error;
using test::randn;
using test::to_bytes;

constexpr double kInfD = std::numeric_limits<double>::infinity();

// A seed from the running test's full name: every test gets inputs of its own.
uint32_t test_seed() {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string(info->test_suite_name()) + "." + info->name();
  uint32_t h = 2166136261u;  // FNV-1a
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 16777619u;
  return h;
}

const char* kernel_name(KernelChoice k) {
  return k == KernelChoice::kTensorCore ? "tensor_core" : "generic";
}

// Normalised o tolerance by input dtype (the tensor-core kernels round P to the dtype before
// P V; f32 only ever runs the generic f32 kernel).
double tol_o(DType dt) { return dt == DType::kF32 ? 1e-5 : dt == DType::kF16 ? 3e-3 : 1e-2; }
// Largest absolute lse error (scores are f32 sums of exact products of the inputs).
double tol_lse(DType dt) { return dt == DType::kF32 ? 1e-4 : dt == DType::kF16 ? 1e-3 : 4e-3; }

// One forward problem as a rank sees it: its queries, the keys of every block it folds (global
// positions), the mask, and how the keys are cut into blocks.
struct Problem {
  int64_t batch = 1, nq = 64, nk = 64, heads = 2, kv_heads = 2, dim = 128;
  DType dtype = DType::kBF16;
  DType o_dtype = DType::kF32;  // dtype finalize_forward writes o in
  AttentionSpec spec;
  std::vector<int64_t> q_pos, k_pos;
  std::vector<float> sink;    // empty: no learned sink logits
  std::vector<int64_t> cuts;  // key block boundaries: 0 = c0 < c1 < ... = nk
  std::vector<size_t> order;  // the order blocks are folded in (empty: 0, 1, ...)
  bool packed = false;        // q from a [B, Nq, 3, H, D] buffer, k/v from [B, Nk, 2, H_kv, D]
  bool with_lse = true;
  float q_sigma = 1.0f;
};

// Host inputs in the problem's dtype, rounded: the oracle and the device read the same values.
struct Inputs {
  std::vector<float> q, k, v;  // already rounded to dtype
};

Inputs make_inputs(const Problem& p, std::mt19937& rng) {
  Inputs in;
  in.q = randn(static_cast<size_t>(p.batch * p.nq * p.heads * p.dim), rng, p.q_sigma, p.dtype);
  in.k = randn(static_cast<size_t>(p.batch * p.nk * p.kv_heads * p.dim), rng, 1.0f, p.dtype);
  in.v = randn(in.k.size(), rng, 1.0f, p.dtype);
  return in;
}

ref::RefOutput run_ref(const Problem& p, Inputs& in) {
  TensorView q(in.q.data(), DType::kF32, {p.batch, p.nq, p.heads, p.dim});
  TensorView k(in.k.data(), DType::kF32, {p.batch, p.nk, p.kv_heads, p.dim});
  TensorView v(in.v.data(), DType::kF32, {p.batch, p.nk, p.kv_heads, p.dim});
  std::vector<float> sink = p.sink;
  TensorView z(sink.data(), DType::kF32, {p.heads});
  return ref::attention_forward(p.spec, q, p.q_pos.data(), k, v, p.k_pos.data(),
                                sink.empty() ? nullptr : &z);
}

struct Result {
  std::vector<float> o, lse;
};

// Uploads, folds every block in p.order into one state, finalises, and reads o and lse back.
Result run_cuda(const Problem& p, const Inputs& in, KernelChoice choice) {
  Stream stream;
  const cudaStream_t s = stream.get();
  const int64_t B = p.batch, Nq = p.nq, Nk = p.nk, H = p.heads, Hk = p.kv_heads, D = p.dim;
  const size_t el = dtype_size(p.dtype);
  const Device dev = Device::kCUDA;

  // q (and k, v): either their own contiguous buffers, or interleaved in one packed buffer
  // (qkv / kv packing: a strided slice of a larger buffer, as a fused projection leaves them).
  DeviceBuffer qbuf, kbuf, vbuf;
  TensorView q, k, v;
  if (!p.packed) {
    const std::vector<unsigned char> qb = to_bytes(in.q, p.dtype), kb = to_bytes(in.k, p.dtype),
                                     vb = to_bytes(in.v, p.dtype);
    qbuf.resize(qb.size());
    kbuf.resize(kb.size());
    vbuf.resize(vb.size());
    copy_async(qbuf.data(), qb.data(), qb.size(), s);
    copy_async(kbuf.data(), kb.data(), kb.size(), s);
    copy_async(vbuf.data(), vb.data(), vb.size(), s);
    stream.synchronize();
    q = TensorView(qbuf.data(), p.dtype, {B, Nq, H, D}, dev);
    k = TensorView(kbuf.data(), p.dtype, {B, Nk, Hk, D}, dev);
    v = TensorView(vbuf.data(), p.dtype, {B, Nk, Hk, D}, dev);
  } else {
    // [B, Nq, 3, H, D]: q in slot 1 (slots 0 and 2 hold other values); [B, Nk, 2, Hk, D]: k in
    // slot 0, v in slot 1.
    std::vector<float> qp(static_cast<size_t>(B * Nq * 3 * H * D), 7.0f);
    std::vector<float> kvp(static_cast<size_t>(B * Nk * 2 * Hk * D));
    for (int64_t bt = 0; bt < B * Nq; ++bt) {
      std::copy_n(in.q.begin() + bt * H * D, H * D, qp.begin() + (bt * 3 + 1) * H * D);
    }
    for (int64_t bt = 0; bt < B * Nk; ++bt) {
      std::copy_n(in.k.begin() + bt * Hk * D, Hk * D, kvp.begin() + (bt * 2 + 0) * Hk * D);
      std::copy_n(in.v.begin() + bt * Hk * D, Hk * D, kvp.begin() + (bt * 2 + 1) * Hk * D);
    }
    const std::vector<unsigned char> qb = to_bytes(qp, p.dtype), kvb = to_bytes(kvp, p.dtype);
    qbuf.resize(qb.size());
    kbuf.resize(kvb.size());
    copy_async(qbuf.data(), qb.data(), qb.size(), s);
    copy_async(kbuf.data(), kvb.data(), kvb.size(), s);
    stream.synchronize();
    const int64_t qshape[4] = {B, Nq, H, D}, qstr[4] = {Nq * 3 * H * D, 3 * H * D, D, 1};
    const int64_t kshape[4] = {B, Nk, Hk, D}, kstr[4] = {Nk * 2 * Hk * D, 2 * Hk * D, D, 1};
    q = TensorView(static_cast<char*>(qbuf.data()) + H * D * el, p.dtype, 4, qshape, qstr, dev);
    k = TensorView(kbuf.data(), p.dtype, 4, kshape, kstr, dev);
    v = TensorView(static_cast<char*>(kbuf.data()) + Hk * D * el, p.dtype, 4, kshape, kstr, dev);
  }

  DeviceBuffer qpos(p.q_pos.size() * 8), kpos(p.k_pos.size() * 8), sink(p.sink.size() * 4);
  copy_async(qpos.data(), p.q_pos.data(), qpos.size(), s);
  copy_async(kpos.data(), p.k_pos.data(), kpos.size(), s);
  copy_async(sink.data(), p.sink.data(), sink.size(), s);

  // The state's arrays in buffers of their own (each aligned as cudaMalloc aligns).
  DeviceBuffer st_m(static_cast<size_t>(B * H * Nq) * 4), st_l(st_m.size()),
      st_acc(static_cast<size_t>(B * Nq * H * D) * 4);
  const ForwardState st{st_m.as<float>(), st_l.as<float>(), st_acc.as<float>(), B, Nq, H, D};

  // Poison: all-ones bytes are NaN in f32, bf16 and f16.
  const size_t o_bytes = static_cast<size_t>(B * Nq * H * D) * dtype_size(p.o_dtype);
  DeviceBuffer obuf(o_bytes), lsebuf(static_cast<size_t>(B * H * Nq) * 4);
  memset_async(obuf.data(), 0xff, obuf.size(), s);
  memset_async(lsebuf.data(), 0xff, lsebuf.size(), s);

  reset_state(st, s);
  std::vector<size_t> order = p.order;
  if (order.empty()) {
    order.resize(p.cuts.size() - 1);
    std::iota(order.begin(), order.end(), 0);
  }
  for (size_t bi : order) {
    const int64_t b0 = p.cuts[bi], b1 = p.cuts[bi + 1];
    fold_forward(p.spec, q, qpos.as<int64_t>(), k.slice(1, b0, b1), v.slice(1, b0, b1),
                 kpos.as<int64_t>() + b0, st, s, choice);
  }
  const TensorView o(obuf.data(), p.o_dtype, {B, Nq, H, D}, dev);
  finalize_forward(st, p.sink.empty() ? nullptr : sink.as<float>(), o,
                   p.with_lse ? lsebuf.as<float>() : nullptr, s);

  std::vector<unsigned char> ohost(o_bytes);
  Result r;
  r.lse.resize(static_cast<size_t>(B * H * Nq));
  copy_async(ohost.data(), obuf.data(), o_bytes, s);
  copy_async(r.lse.data(), lsebuf.data(), r.lse.size() * 4, s);
  stream.synchronize();
  r.o.resize(static_cast<size_t>(B * Nq * H * D));
  for (size_t i = 0; i < r.o.size(); ++i) {
    r.o[i] = load_as_float(ohost.data(), p.o_dtype, static_cast<int64_t>(i));
  }
  return r;
}

// Largest |a - ref| over rows the oracle gives a finite lse; -inf must be matched exactly.
// Returns +inf (and says why) on NaN or a mismatched infinity.
double lse_max_error(const std::vector<float>& a, const std::vector<double>& ref,
                     std::string* why) {
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) {
      *why = "lse[" + std::to_string(i) + "] is NaN (not written?)";
      return kInfD;
    }
    if (std::isinf(ref[i])) {
      if (!(std::isinf(a[i]) && a[i] < 0)) {
        *why = "lse[" + std::to_string(i) + "] = " + std::to_string(a[i]) + ", expected -inf";
        return kInfD;
      }
      continue;
    }
    if (!std::isfinite(a[i])) {
      *why = "lse[" + std::to_string(i) + "] = " + std::to_string(a[i]) + ", expected " +
             std::to_string(ref[i]);
      return kInfD;
    }
    worst = std::max(worst, std::fabs(a[i] - ref[i]));
  }
  return worst;
}

std::vector<KernelChoice> kernels_for(const Problem& p) {
  std::vector<KernelChoice> ks = {KernelChoice::kGeneric};
  if (tensor_core_supported(p.dtype, p.dim)) ks.push_back(KernelChoice::kTensorCore);
  return ks;
}

// Runs the problem on every kernel that takes it and checks o and lse against the oracle.
// extra_o: added to the o tolerance (o written in a 16-bit dtype adds its own rounding).
void expect_matches_ref(const Problem& p, uint32_t seed, double extra_o = 0.0) {
  std::mt19937 rng(seed);
  Inputs in = make_inputs(p, rng);
  const ref::RefOutput ref = run_ref(p, in);
  int64_t dead_rows = 0;
  for (double x : ref.lse) dead_rows += std::isinf(x) ? 1 : 0;
  for (KernelChoice kc : kernels_for(p)) {
    SCOPED_TRACE(std::string("kernel ") + kernel_name(kc) + ", " + dtype_name(p.dtype) + " D=" +
                 std::to_string(p.dim) + ", " + std::to_string(p.cuts.size() - 1) + " block(s)");
    const Result r = run_cuda(p, in, kc);
    const double eo = normalised_error(r.o, ref.o);
    EXPECT_LE(eo, tol_o(p.dtype) + extra_o) << "o: normalised error";
    // Rows that see nothing (and no learned sink): o exactly 0.
    if (dead_rows > 0) {
      int64_t bad = 0;
      for (int64_t b = 0; b < p.batch; ++b) {
        for (int64_t h = 0; h < p.heads; ++h) {
          for (int64_t i = 0; i < p.nq; ++i) {
            if (!std::isinf(ref.lse[static_cast<size_t>((b * p.heads + h) * p.nq + i)])) continue;
            for (int64_t c = 0; c < p.dim; ++c) {
              const float x = r.o[static_cast<size_t>(((b * p.nq + i) * p.heads + h) * p.dim + c)];
              bad += x != 0.0f ? 1 : 0;
            }
          }
        }
      }
      EXPECT_EQ(bad, 0) << "o must be exactly 0 in rows with nothing visible";
    }
    if (p.with_lse) {
      std::string why;
      const double el = lse_max_error(r.lse, ref.lse, &why);
      EXPECT_LE(el, tol_lse(p.dtype)) << "lse: largest absolute error " << why;
    }
  }
}

// Cuts [0, n) into `blocks` non-empty pieces of uneven sizes.
std::vector<int64_t> uneven_cuts(int64_t n, int blocks, std::mt19937& rng) {
  std::vector<int64_t> cuts = {0, n};
  std::uniform_int_distribution<int64_t> pick(1, std::max<int64_t>(1, n - 1));
  while (static_cast<int>(cuts.size()) < blocks + 1 && n > blocks) {
    const int64_t c = pick(rng);
    if (std::find(cuts.begin(), cuts.end(), c) == cuts.end()) cuts.push_back(c);
  }
  std::sort(cuts.begin(), cuts.end());
  return cuts;
}

// Runs p with all keys in one block, then cut in three uneven blocks folded in shuffled order.
void expect_one_and_three_blocks(Problem p, double extra_o = 0.0) {
  const uint32_t seed = test_seed();
  {
    SCOPED_TRACE("one block");
    p.cuts = {0, p.nk};
    p.order.clear();
    expect_matches_ref(p, seed, extra_o);
  }
  {
    SCOPED_TRACE("three blocks, shuffled");
    std::mt19937 rng(seed + 1);
    p.cuts = uneven_cuts(p.nk, 3, rng);
    p.order.resize(p.cuts.size() - 1);
    std::iota(p.order.begin(), p.order.end(), 0);
    do {
      std::shuffle(p.order.begin(), p.order.end(), rng);
    } while (p.order.size() > 1 && std::is_sorted(p.order.begin(), p.order.end()));
    expect_matches_ref(p, seed, extra_o);
  }
}

Problem square(int64_t n, bool causal, int64_t window, int64_t sinks) {
  Problem p;
  p.nq = p.nk = n;
  p.spec.causal = causal;
  p.spec.window = window;
  p.spec.sinks = sinks;
  p.q_pos = iota_pos(n);
  p.k_pos = iota_pos(n);
  return p;
}

// ---- masks x odd lengths (bf16, D = 128, both kernels) -----------------------------------------

struct MaskCase {
  const char* name;
  int64_t window, sinks;
};
const MaskCase kMasks[] = {{"full", 0, 0}, {"window", 100, 0}, {"window_sinks", 100, 4}};
void PrintTo(const MaskCase& m, std::ostream* os) { *os << m.name; }

class AttentionCudaMasks : public ::testing::TestWithParam<std::tuple<int64_t, bool, MaskCase>> {};

TEST_P(AttentionCudaMasks, MatchesOracle) {
  RINGATTN_REQUIRE_GPU();
  const auto [n, causal, mask] = GetParam();
  expect_one_and_three_blocks(square(n, causal, mask.window, mask.sinks));
}

INSTANTIATE_TEST_SUITE_P(OddLengths, AttentionCudaMasks,
                         ::testing::Combine(::testing::Values<int64_t>(77, 301, 1000),
                                            ::testing::Bool(), ::testing::ValuesIn(kMasks)),
                         [](const auto& info) {
                           return "N" + std::to_string(std::get<0>(info.param)) +
                                  (std::get<1>(info.param) ? "_causal_" : "_noncausal_") +
                                  std::get<2>(info.param).name;
                         });

// ---- dtypes x head dims ------------------------------------------------------------------------

struct DtypeCase {
  DType dtype;
  int64_t dim;
};
void PrintTo(const DtypeCase& c, std::ostream* os) { *os << dtype_name(c.dtype) << " D=" << c.dim; }

class AttentionCudaDtypes : public ::testing::TestWithParam<DtypeCase> {};

TEST_P(AttentionCudaDtypes, MatchesOracle) {
  RINGATTN_REQUIRE_GPU();
  Problem p = square(301, true, 50, 2);
  p.batch = 2;
  p.heads = 4;
  p.kv_heads = 2;
  p.dim = GetParam().dim;
  p.dtype = GetParam().dtype;
  expect_one_and_three_blocks(p);
}

// D = 40 and f32 take only the generic kernel; bf16/f16 at D = 64 and 128 both.
INSTANTIATE_TEST_SUITE_P(All, AttentionCudaDtypes,
                         ::testing::Values(DtypeCase{DType::kBF16, 40}, DtypeCase{DType::kBF16, 64},
                                           DtypeCase{DType::kBF16, 128}, DtypeCase{DType::kF16, 40},
                                           DtypeCase{DType::kF16, 64}, DtypeCase{DType::kF16, 128},
                                           DtypeCase{DType::kF32, 40}, DtypeCase{DType::kF32, 64},
                                           DtypeCase{DType::kF32, 128}),
                         [](const auto& info) {
                           return std::string(dtype_name(info.param.dtype)) + "_D" +
                                  std::to_string(info.param.dim);
                         });

// ---- single features ---------------------------------------------------------------------------

TEST(AttentionCuda, GqaAndMqa) {
  RINGATTN_REQUIRE_GPU();
  for (int64_t d : {64, 128}) {
    for (int64_t hk : {2, 1}) {
      SCOPED_TRACE("H=4 H_kv=" + std::to_string(hk) + " D=" + std::to_string(d));
      Problem p = square(257, true, 0, 0);
      p.heads = 4;
      p.kv_heads = hk;
      p.dim = d;
      expect_one_and_three_blocks(p);
    }
  }
}

TEST(AttentionCuda, BatchOfTwo) {
  RINGATTN_REQUIRE_GPU();
  Problem p = square(301, false, 0, 0);
  p.batch = 2;
  expect_one_and_three_blocks(p);
  p.spec.causal = true;
  p.dtype = DType::kF16;
  expect_one_and_three_blocks(p);
}

TEST(AttentionCuda, LearnedSinkLogits) {
  RINGATTN_REQUIRE_GPU();
  for (bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal, window 32" : "non-causal, window 32");
    Problem p = square(301, causal, 32, 0);
    p.heads = 4;
    p.kv_heads = 2;
    p.sink = {2.5f, -1.0f, 20.0f, -20.0f};
    expect_one_and_three_blocks(p);
  }
}

// Rows that see nothing: o = 0 and lse = -inf exactly, never NaN. Here every query lies before
// every key (causal), as a rank's queries do for the blocks of later ranks in the ring.
TEST(AttentionCuda, NothingVisible) {
  RINGATTN_REQUIRE_GPU();
  Problem p;
  p.nq = 64;
  p.nk = 256;
  p.spec.causal = true;
  p.q_pos = iota_pos(p.nq);
  p.k_pos = iota_pos(p.nk, 1000);
  expect_one_and_three_blocks(p);
  // With learned sink logits the only term is exp(z): o = 0, lse = z.
  p.sink = {1.5f, -3.0f};
  expect_one_and_three_blocks(p);
}

// Some rows see nothing (non-causal window: queries 0..34 are too far from keys 50..149), the
// others do; Nq != Nk.
TEST(AttentionCuda, SomeRowsSeeNothing) {
  RINGATTN_REQUIRE_GPU();
  for (DType dt : {DType::kBF16, DType::kF32}) {
    Problem p;
    p.dtype = dt;
    p.nq = 100;
    p.nk = 100;
    p.spec.window = 16;
    p.q_pos = iota_pos(p.nq);
    p.k_pos = iota_pos(p.nk, 50);
    expect_one_and_three_blocks(p);
  }
}

// A zigzag shard (SPEC section 3, P = 3, N = 600): this rank (r = 1) holds chunks 1 and 4 of 6,
// so its positions jump; the key blocks are the three ranks' shards in ring arrival order
// (own, then r - 1, then r - 2), each itself non-monotone.
TEST(AttentionCuda, ZigzagRingBlocks) {
  RINGATTN_REQUIRE_GPU();
  const int64_t chunk = 100;
  auto shard = [&](int r) { return test::zigzag_positions(chunk, 3, r); };
  for (const MaskCase& m : kMasks) {
    SCOPED_TRACE(m.name);
    Problem p;
    p.nq = 2 * chunk;
    p.nk = 6 * chunk;
    p.heads = 4;
    p.kv_heads = 1;
    p.spec.causal = true;
    p.spec.window = m.window;
    p.spec.sinks = m.sinks;
    p.q_pos = shard(1);
    for (int r : {1, 0, 2}) {
      const std::vector<int64_t> s = shard(r);
      p.k_pos.insert(p.k_pos.end(), s.begin(), s.end());
    }
    p.cuts = {0, 2 * chunk, 4 * chunk, 6 * chunk};
    expect_matches_ref(p, test_seed());
    p.order = {2, 0, 1};
    expect_matches_ref(p, test_seed());
  }
}

// Positions in no order at all (a permutation of 0..N-1 for queries and another for keys).
TEST(AttentionCuda, PermutedPositions) {
  RINGATTN_REQUIRE_GPU();
  std::mt19937 rng(test_seed());
  Problem p = square(300, true, 40, 3);
  std::shuffle(p.q_pos.begin(), p.q_pos.end(), rng);
  std::shuffle(p.k_pos.begin(), p.k_pos.end(), rng);
  expect_one_and_three_blocks(p);
}

// q a slice of a packed qkv buffer, k and v slices of a packed kv buffer (strided token and
// batch dimensions), B = 2, GQA.
TEST(AttentionCuda, StridedInputs) {
  RINGATTN_REQUIRE_GPU();
  for (int64_t d : {64, 128}) {
    Problem p = square(301, true, 0, 0);
    p.batch = 2;
    p.heads = 4;
    p.kv_heads = 2;
    p.dim = d;
    p.packed = true;
    expect_one_and_three_blocks(p);
  }
}

// o written in the input dtype (its rounding adds to the error), and with lse not asked for.
TEST(AttentionCuda, OutputInInputDtype) {
  RINGATTN_REQUIRE_GPU();
  for (DType dt : {DType::kBF16, DType::kF16}) {
    Problem p = square(257, true, 64, 4);
    p.dtype = dt;
    p.o_dtype = dt;
    expect_one_and_three_blocks(p, dt == DType::kBF16 ? 4e-3 : 1e-3);
  }
  Problem p = square(129, false, 0, 0);
  p.with_lse = false;
  expect_one_and_three_blocks(p);
}

// Large scores (q with sigma 6): the running max changes a lot between blocks.
TEST(AttentionCuda, LargeLogits) {
  RINGATTN_REQUIRE_GPU();
  for (DType dt : {DType::kBF16, DType::kF32}) {
    Problem p = square(301, true, 0, 0);
    p.dtype = dt;
    p.q_sigma = 6.0f;
    expect_one_and_three_blocks(p);
  }
}

// Two runs of one problem give the same bits (no races, nothing read that was not written).
TEST(AttentionCuda, Deterministic) {
  RINGATTN_REQUIRE_GPU();
  Problem p = square(301, true, 0, 0);
  std::mt19937 rng(test_seed());
  const Inputs in = make_inputs(p, rng);
  p.cuts = {0, 100, 301};
  for (KernelChoice kc : kernels_for(p)) {
    SCOPED_TRACE(kernel_name(kc));
    const Result a = run_cuda(p, in, kc), b = run_cuda(p, in, kc);
    EXPECT_EQ(0, std::memcmp(a.o.data(), b.o.data(), a.o.size() * 4));
    EXPECT_EQ(0, std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * 4));
  }
}

}  // namespace
}  // namespace ringattn::cuda
