// The whole ring on one GPU against the f64 oracle: P in {1, 2, 3, 4, 8} virtual ranks (threads
// of one process, each with its own streams, passing device buffers through the in-process
// communicator), forward and backward, every mask, sinks and learned sinks, bf16 / f16 on the
// tensor-core kernels and f32 on the generic ones; then the ring over NCCL with one rank.
// Outputs are poisoned (NaN) before each run; NaN never passes the error measure.

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <mutex>
#include <vector>

#include "comm/inproc/inproc_communicator.h"
#include "kernels/cpu/attention_ref.h"
#include "kernels/cuda/cuda_memory.h"
#include "ringattn/config.h"
#include "ringattn/ring.h"
#include "runtime/src/sharding.h"
#include "tests/common/test_util.h"
#include "tests/gpu/gpu_test_util.h"
#if RINGATTN_WITH_NCCL
#include "comm/nccl/nccl_communicator.h"
#endif

namespace ringattn {
namespace {

using test::gather_rows;
using test::normalised_error;
using test::RingCase;
using test::scatter_rows;

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

// A device f32 buffer of `count` NaNs (all bits set).
cuda::DeviceBuffer poisoned(size_t count, const cuda::Stream& s) {
  return test::upload(std::vector<uint32_t>(count, 0xffffffffu), s);
}

// Runs the ring forward and backward on `comm` (device buffers) for this rank's shard and
// scatters o, lse, dq, dk, dv into the global results (under mu); dsink from rank 0.
struct GlobalResults {
  std::vector<double> o, lse, dq, dk, dv, dsink;
};

void run_rank(Communicator& comm, const RingCase& c, const AttentionSpec& spec,
              const test::RingInputs& g, std::mutex& mu, GlobalResults& out) {
  const Layout layout = resolve_layout(c.layout, c.causal, c.window);
  const Shard shard = make_shard(c.n, comm.size(), comm.rank(), layout);
  const int64_t n = shard.size(), B = c.batch, H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
  const cuda::Stream s;
  auto shard_of = [&](const std::vector<float>& global, int64_t heads) {
    return test::upload(gather_rows(global, B, c.n, heads * D, shard, c.dtype), s);
  };
  cuda::DeviceBuffer qd = shard_of(g.q, H), kd = shard_of(g.k, Hkv), vd = shard_of(g.v, Hkv),
                     dod = shard_of(g.dout, H);
  cuda::DeviceBuffer od = poisoned(static_cast<size_t>(B * n * H * D), s);
  cuda::DeviceBuffer lsed = poisoned(static_cast<size_t>(B * H * n), s);
  cuda::DeviceBuffer zd = test::upload(g.z, s);
  const Device dev = Device::kCUDA;
  const TensorView tq(qd.data(), c.dtype, {B, n, H, D}, dev);
  const TensorView tk(kd.data(), c.dtype, {B, n, Hkv, D}, dev);
  const TensorView tv(vd.data(), c.dtype, {B, n, Hkv, D}, dev);
  const TensorView tdo(dod.data(), c.dtype, {B, n, H, D}, dev);
  const TensorView to(od.data(), DType::kF32, {B, n, H, D}, dev);
  const TensorView tl(lsed.data(), DType::kF32, {B, H, n}, dev);
  const TensorView tz(zd.data(), DType::kF32, {H}, dev);
  const TensorView* zp = c.sink_logits ? &tz : nullptr;
  forward(comm, spec, c.n, tq, tk, tv, zp, to, &tl);

  cuda::DeviceBuffer dqd = poisoned(static_cast<size_t>(B * n * H * D), s);
  cuda::DeviceBuffer dkd = poisoned(static_cast<size_t>(B * n * Hkv * D), s);
  cuda::DeviceBuffer dvd = poisoned(static_cast<size_t>(B * n * Hkv * D), s);
  cuda::DeviceBuffer dzd = poisoned(static_cast<size_t>(H), s);
  const TensorView tdq(dqd.data(), DType::kF32, {B, n, H, D}, dev);
  const TensorView tdk(dkd.data(), DType::kF32, {B, n, Hkv, D}, dev);
  const TensorView tdv(dvd.data(), DType::kF32, {B, n, Hkv, D}, dev);
  const TensorView tdz(dzd.data(), DType::kF32, {H}, dev);
  backward(comm, spec, c.n, tq, tk, tv, to, tl, tdo, zp, tdq, tdk, tdv, &tdz);

  auto download = [&](const cuda::DeviceBuffer& d) { return test::download<float>(d, s); };
  const std::vector<float> o = download(od), lse = download(lsed), dq = download(dqd),
                           dk = download(dkd), dv = download(dvd), dz = download(dzd);
  std::lock_guard<std::mutex> lock(mu);
  scatter_rows(o, B, c.n, H * D, shard, out.o);
  scatter_rows(lse, B * H, c.n, 1, shard, out.lse);  // [B, H, n]
  scatter_rows(dq, B, c.n, H * D, shard, out.dq);
  scatter_rows(dk, B, c.n, Hkv * D, shard, out.dk);
  scatter_rows(dv, B, c.n, Hkv * D, shard, out.dv);
  if (comm.rank() == 0) out.dsink.assign(dz.begin(), dz.end());
}

class GpuRingTest : public ::testing::TestWithParam<RingCase> {};

void check_case(const RingCase& c,
                const std::function<void(const std::function<void(Communicator&)>&)>& run_ranks) {
  const test::RingInputs g = test::make_ring_inputs(
      c, static_cast<uint32_t>(c.n * 7919 + c.world * 31 + c.head_dim), true);
  const AttentionSpec spec = test::spec_of(c);

  const std::vector<int64_t> pos = test::iota_pos(c.n);
  auto view = [&](const std::vector<float>& x, int64_t heads) {
    return TensorView(const_cast<float*>(x.data()), DType::kF32, {c.batch, c.n, heads, c.head_dim});
  };
  const TensorView gz(const_cast<float*>(g.z.data()), DType::kF32, {c.heads});
  const ref::RefOutput want =
      ref::attention_forward(spec, view(g.q, c.heads), pos.data(), view(g.k, c.kv_heads),
                             view(g.v, c.kv_heads), pos.data(), c.sink_logits ? &gz : nullptr);
  const ref::RefGrads grads = ref::attention_backward(
      spec, view(g.q, c.heads), pos.data(), view(g.k, c.kv_heads), view(g.v, c.kv_heads),
      pos.data(), c.sink_logits ? &gz : nullptr, view(g.dout, c.heads));

  GlobalResults got;
  got.o.assign(want.o.size(), NAN);
  got.lse.assign(want.lse.size(), NAN);
  got.dq.assign(grads.dq.size(), NAN);
  got.dk.assign(grads.dk.size(), NAN);
  got.dv.assign(grads.dv.size(), NAN);
  std::mutex mu;
  run_ranks([&](Communicator& comm) { run_rank(comm, c, spec, g, mu, got); });

  const double tol = tolerance(c.dtype);
  EXPECT_LT(normalised_error(got.o, want.o), tol) << "o";
  EXPECT_LT(normalised_error(got.lse, want.lse), tol) << "lse";
  EXPECT_LT(normalised_error(got.dq, grads.dq), 2 * tol) << "dq";
  EXPECT_LT(normalised_error(got.dk, grads.dk), 2 * tol) << "dk";
  EXPECT_LT(normalised_error(got.dv, grads.dv), 2 * tol) << "dv";
  if (c.sink_logits) {
    EXPECT_LT(normalised_error(got.dsink, grads.dsink), 2 * tol) << "dsink";
  } else {
    for (double x : got.dsink) EXPECT_EQ(x, 0.0) << "dsink without sink logits";
  }
}

TEST_P(GpuRingTest, InprocRingMatchesOracle) {
  RINGATTN_REQUIRE_GPU();
  const RingCase c = GetParam();
  check_case(c, [&](const std::function<void(Communicator&)>& fn) {
    InprocWorld world(c.world, std::chrono::milliseconds(120000), Device::kCUDA,
                      cuda::current_device());
    run_inproc(world, fn);
  });
}

std::vector<RingCase> cases() {
  std::vector<RingCase> out;
  const DType bf = DType::kBF16, f16 = DType::kF16, f32 = DType::kF32;
  const Layout zz = Layout::kZigzag, ct = Layout::kContiguous, au = Layout::kAuto;
  for (int p : {1, 2, 3, 4, 8}) {
    // Full causal (zigzag), window + sinks, non-causal window (both ring directions).
    out.push_back({p, 1031, zz, true, 0, 0, false, 4, 2, 128, 1, bf});
    out.push_back({p, 2053, au, true, 300, 4, true, 4, 1, 64, 2, f16});
    out.push_back({p, 977, ct, false, 200, 2, false, 2, 2, 128, 1, bf});
  }
  out.push_back({3, 301, ct, false, 0, 0, true, 3, 1, 40, 1, f32});  // generic kernels
  out.push_back({4, 515, zz, true, 0, 3, false, 2, 2, 64, 1, f32});
  out.push_back({2, 4099, au, true, 1024, 4, false, 8, 2, 128, 1, bf});  // many tiles
  return out;
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuRingTest, ::testing::ValuesIn(cases()), test::ring_case_name);

#if RINGATTN_WITH_NCCL
// One NCCL rank: the same ring code over the NCCL communicator (stream-ordered transfers, the
// agreement collectives on host buffers staged through the device).
TEST(GpuRingNccl, OneRankMatchesOracle) {
  RINGATTN_REQUIRE_GPU();
  for (const RingCase& c :
       {RingCase{1, 777, Layout::kAuto, true, 256, 4, true, 4, 2, 128, 1, DType::kBF16},
        RingCase{1, 513, Layout::kAuto, false, 0, 0, false, 2, 2, 64, 2, DType::kF16}}) {
    check_case(c, [&](const std::function<void(Communicator&)>& fn) {
      NcclCommunicator comm(NcclCommunicator::new_unique_id(), 1, 0, cuda::current_device());
      fn(comm);
    });
  }
}
#endif

}  // namespace
}  // namespace ringattn
