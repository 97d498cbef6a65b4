// The distributed KV cache on CUDA tensors (KVCacheConfig::device = kCUDA) against the f64
// oracle: P in {1, 2, 3, 4} virtual ranks of an in-process CUDA world (threads of one process
// passing device buffers), prefill of N tokens then decode in calls of T = 1 or 3 tokens, every
// call's rows equal to dense attention over the sequence so far (streaming: over the sinks and
// the window); GQA, sinks and learned sink logits; bf16 / f16 on the tensor-core kernels, f32
// on the generic ones. Every rank must get the same bits; the cache's device bytes equal
// KVCache::bytes_for, and the device memory stays flat while streaming.

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <random>
#include <sstream>
#include <tuple>
#include <vector>

#include "comm/inproc/inproc_communicator.h"
#include "kernels/cpu/attention_ref.h"
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/device.h"
#include "ringattn/kv_cache.h"
#include "ringattn/memory.h"
#include "runtime/src/sharding.h"
#include "tests/common/test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace ringattn {
namespace {

using test::normalised_error;

struct GpuDecodeCase {
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

std::string case_name(const ::testing::TestParamInfo<GpuDecodeCase>& info) {
  const GpuDecodeCase& c = info.param;
  std::ostringstream os;
  os << "P" << c.world << "_N" << c.n << "_T" << c.steps << "x" << c.step << "_"
     << layout_name(c.layout) << (c.causal ? "_causal" : "_full") << "_W" << c.window << "_S"
     << c.sinks << (c.sink_logits ? "_z" : "") << "_H" << c.heads << "x" << c.kv_heads << "_D"
     << c.head_dim << "_B" << c.batch << "_" << dtype_name(c.dtype);
  return os.str();
}

double tolerance(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return 2e-2;
    case DType::kF16:
      return 5e-3;
    default:
      return 1e-4;
  }
}

KVCacheConfig config_of(const GpuDecodeCase& c) {
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
  cfg.device = Device::kCUDA;
  return cfg;
}

// The whole sequence as f32 values already rounded to the dtype (the oracle's inputs).
struct Sequence {
  int64_t len = 0;
  std::vector<float> q, k, v, z;
};

Sequence make_sequence(const GpuDecodeCase& c, uint32_t seed) {
  std::mt19937 gen(seed);
  Sequence s;
  s.len = c.n + c.steps;
  s.q =
      test::randn(static_cast<size_t>(c.batch * s.len * c.heads * c.head_dim), gen, 1.0f, c.dtype);
  s.k = test::randn(static_cast<size_t>(c.batch * s.len * c.kv_heads * c.head_dim), gen, 1.0f,
                    c.dtype);
  s.v = test::randn(s.k.size(), gen, 1.0f, c.dtype);
  for (int64_t h = 0; h < c.heads; ++h) s.z.push_back(h % 2 ? 1.5f : -0.5f);
  return s;
}

// The oracle for queries [lo, hi) over the keys the mask lets them see among positions < hi:
// every earlier key (the mask does the rest), or in streaming mode the sinks and the last W.
ref::RefOutput oracle(const GpuDecodeCase& c, Sequence& s, int64_t lo, int64_t hi) {
  std::vector<int64_t> keys;
  if (c.window > 0) {
    for (int64_t j = 0; j < std::min(c.sinks, hi); ++j) keys.push_back(j);
    for (int64_t j = std::max(c.sinks, lo - c.window + 1); j < hi; ++j) keys.push_back(j);
  } else {
    for (int64_t j = 0; j < hi; ++j) keys.push_back(j);
  }
  std::vector<int64_t> q_pos;
  for (int64_t i = lo; i < hi; ++i) q_pos.push_back(i);
  const int64_t nk = static_cast<int64_t>(keys.size()), kr = c.kv_heads * c.head_dim;
  std::vector<float> k(static_cast<size_t>(c.batch * nk * kr)), v(k.size());
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t j = 0; j < nk; ++j) {
      std::copy_n(&s.k[static_cast<size_t>((b * s.len + keys[j]) * kr)], kr,
                  &k[static_cast<size_t>((b * nk + j) * kr)]);
      std::copy_n(&s.v[static_cast<size_t>((b * s.len + keys[j]) * kr)], kr,
                  &v[static_cast<size_t>((b * nk + j) * kr)]);
    }
  }
  const TensorView q =
      TensorView(s.q.data(), DType::kF32, {c.batch, s.len, c.heads, c.head_dim}).slice(1, lo, hi);
  const TensorView tk(k.data(), DType::kF32, {c.batch, nk, c.kv_heads, c.head_dim});
  const TensorView tv(v.data(), DType::kF32, {c.batch, nk, c.kv_heads, c.head_dim});
  const TensorView tz(s.z.data(), DType::kF32, {c.heads});
  return ref::attention_forward(config_of(c).spec, q, q_pos.data(), tk, tv, keys.data(),
                                c.sink_logits ? &tz : nullptr);
}

Shard run_of(int64_t lo, int64_t hi) {
  Shard s;
  s.runs.push_back(PosRange{lo, hi});
  return s;
}

// Prefill + decode on every rank of a CUDA world; rank 0 compares every call with the oracle
// (streaming: a spread of calls) and checks that every rank got the same bits. Returns the
// device bytes measured between calls after a warm-up (streaming).
std::vector<int64_t> run_case(const GpuDecodeCase& c) {
  Sequence s = make_sequence(c, static_cast<uint32_t>(c.n * 131 + c.steps * 7 + c.world));
  const Layout layout = resolve_layout(c.layout, c.causal, c.window);
  const int64_t B = c.batch, H = c.heads, Hkv = c.kv_heads, D = c.head_dim, T = c.step;
  const int64_t total = c.n + c.steps;
  std::mutex mu;
  std::vector<std::vector<float>> rank_out(static_cast<size_t>(c.world));
  std::vector<int64_t> device_bytes;
  int checked = 0;
  InprocWorld world(c.world, std::chrono::milliseconds(120000), Device::kCUDA,
                    cuda::current_device());
  run_inproc(world, [&](Communicator& comm) {
    const KVCacheConfig cfg = config_of(c);
    const cuda::Stream st;
    KVCache cache(comm, cfg);
    EXPECT_EQ(cache.bytes(), KVCache::bytes_for(cfg, comm.size()));
    const Shard shard = make_shard(c.n, comm.size(), comm.rank(), layout);
    const int64_t n = shard.size();
    auto up = [&](const std::vector<float>& x, int64_t heads, const Shard& sh) {
      return test::upload(test::gather_rows(x, B, s.len, heads * D, sh, c.dtype), st);
    };
    cuda::DeviceBuffer qd = up(s.q, H, shard), kd = up(s.k, Hkv, shard), vd = up(s.v, Hkv, shard);
    cuda::DeviceBuffer od(static_cast<size_t>(B * n * H * D) * sizeof(float));
    cuda::DeviceBuffer ld(static_cast<size_t>(B * H * n) * sizeof(float));
    cuda::DeviceBuffer zd = test::upload(s.z, st);
    const Device dev = Device::kCUDA;
    const TensorView tz(zd.data(), DType::kF32, {H}, dev);
    const TensorView* zp = c.sink_logits ? &tz : nullptr;
    const TensorView to(od.data(), DType::kF32, {B, n, H, D}, dev);
    const TensorView tl(ld.data(), DType::kF32, {B, H, n}, dev);
    cache.prefill(TensorView(qd.data(), c.dtype, {B, n, H, D}, dev),
                  TensorView(kd.data(), c.dtype, {B, n, Hkv, D}, dev),
                  TensorView(vd.data(), c.dtype, {B, n, Hkv, D}, dev), zp, to, &tl);
    // Decode buffers, allocated once (the streaming check measures flat device memory).
    const size_t es = dtype_size(c.dtype);
    cuda::DeviceBuffer qn(static_cast<size_t>(B * T * H * D) * es);
    cuda::DeviceBuffer kn(static_cast<size_t>(B * T * Hkv * D) * es), vn(kn.size());
    cuda::DeviceBuffer on(static_cast<size_t>(B * T * H * D) * sizeof(float));
    cuda::DeviceBuffer ln(static_cast<size_t>(B * H * T) * sizeof(float));
    std::vector<float> oh(static_cast<size_t>(B * T * H * D)), lh(static_cast<size_t>(B * H * T));
    for (int64_t lo = c.n; lo < total; lo += T) {
      const int64_t hi = std::min(lo + T, total), t = hi - lo;
      const Shard rows = run_of(lo, hi);
      for (auto [x, buf, heads] :
           {std::tuple{&s.q, &qn, H}, std::tuple{&s.k, &kn, Hkv}, std::tuple{&s.v, &vn, Hkv}}) {
        const std::vector<char> host = test::gather_rows(*x, B, s.len, heads * D, rows, c.dtype);
        cuda::copy_async(buf->data(), host.data(), host.size(), st.get());
      }
      st.synchronize();
      const TensorView o_new(on.data(), DType::kF32, {B, t, H, D}, dev);
      const TensorView l_new(ln.data(), DType::kF32, {B, H, t}, dev);
      const DecodeStats ds =
          cache.decode(TensorView(qn.data(), c.dtype, {B, t, H, D}, dev),
                       TensorView(kn.data(), c.dtype, {B, t, Hkv, D}, dev),
                       TensorView(vn.data(), c.dtype, {B, t, Hkv, D}, dev), zp, o_new, &l_new);
      EXPECT_GE(ds.owner_of_first, 0);
      EXPECT_EQ(cache.length(), hi);
      EXPECT_EQ(cache.bytes(), cache.capacity_bytes());
      EXPECT_LE(cache.local_tokens(), cache.capacity());
      cuda::copy_async(oh.data(), on.data(), static_cast<size_t>(B * t * H * D) * sizeof(float),
                       st.get());
      cuda::copy_async(lh.data(), ln.data(), static_cast<size_t>(B * H * t) * sizeof(float),
                       st.get());
      st.synchronize();
      std::vector<float> mine(oh.begin(), oh.begin() + B * t * H * D);
      mine.insert(mine.end(), lh.begin(), lh.begin() + B * H * t);
      {
        std::lock_guard<std::mutex> lock(mu);
        rank_out[static_cast<size_t>(comm.rank())] = mine;
      }
      comm.barrier();
      if (comm.rank() == 0) {
        for (int r = 1; r < c.world; ++r) {
          EXPECT_EQ(rank_out[static_cast<size_t>(r)], mine) << "rank " << r << " differs";
        }
        const bool check = c.window == 0 || (lo - c.n) % (5 * T) == 0 || hi == total;
        if (check) {
          const ref::RefOutput want = oracle(c, s, lo, hi);
          const std::vector<float> o(oh.begin(), oh.begin() + B * t * H * D);
          const std::vector<float> l(lh.begin(), lh.begin() + B * H * t);
          EXPECT_LT(normalised_error(o, want.o), tolerance(c.dtype)) << "o at " << lo;
          EXPECT_LT(normalised_error(l, want.lse), tolerance(c.dtype)) << "lse at " << lo;
          ++checked;
        }
        // After a warm-up the device bytes stay exactly flat (measured while no rank is
        // inside a call).
        if (c.window > 0 && lo - c.n > 4 * T) {
          device_bytes.push_back(memory_stats(Device::kCUDA).current_bytes);
        }
      }
      comm.barrier();
    }
  });
  EXPECT_GT(checked, 0);
  return device_bytes;
}

class GpuKVCacheTest : public ::testing::TestWithParam<GpuDecodeCase> {};

TEST_P(GpuKVCacheTest, MatchesOracle) {
  RINGATTN_REQUIRE_GPU();
  const GpuDecodeCase c = GetParam();
  const std::vector<int64_t> bytes = run_case(c);
  if (c.window > 0 && c.steps > 20 * c.step) {
    ASSERT_GT(bytes.size(), 5u);
    for (int64_t b : bytes) EXPECT_EQ(b, bytes.front()) << "device memory grew while streaming";
  }
}

std::vector<GpuDecodeCase> cases() {
  std::vector<GpuDecodeCase> out;
  const DType bf = DType::kBF16, f16 = DType::kF16, f32 = DType::kF32;
  const Layout au = Layout::kAuto, ct = Layout::kContiguous;
  for (int p : {1, 2, 3, 4}) {
    const int64_t n = 37 * p + 5;
    // Causal (zigzag), GQA, batch 2; T = 1 and T = 3 per call; learned sinks.
    out.push_back({p, n, 6, 1, au, true, 0, 0, false, 4, 2, 64, 2, bf});
    out.push_back({p, n, 7, 3, au, true, 0, 0, true, 4, 2, 128, 1, f16});
    out.push_back({p, n, 5, 1, au, true, 0, 0, false, 4, 1, 32, 1, f32});
    // Streaming (window + sinks, learned sinks), long enough to wrap the ring buffers.
    out.push_back({p, n, 150, 1, au, true, 24, 4, true, 4, 1, 64, 2, bf});
    out.push_back({p, n, 120, 3, ct, true, 17, 2, false, 4, 2, 64, 1, f16});
    out.push_back({p, n, 90, 2, au, false, 13, 1, true, 2, 2, 16, 1, f32});
  }
  // A long contiguous prefill (the whole window on the last rank) and non-causal full decode.
  out.push_back({3, 200, 60, 1, ct, true, 32, 4, false, 8, 2, 128, 1, bf});
  out.push_back({2, 50, 9, 3, ct, false, 0, 0, true, 2, 1, 64, 2, f32});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuKVCacheTest, ::testing::ValuesIn(cases()), case_name);

}  // namespace
}  // namespace ringattn
