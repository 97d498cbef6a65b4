// The C ABI's MPI communicator under mpiexec (1..4 ranks): it adopts the MPI the test main
// initialised, its collectives work, forward/backward through the ABI equal the C++ API over an
// MpiCommunicator bit for bit, and a configuration mismatch between ranks is an error on every
// rank with the same status.

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "comm/mpi/mpi_communicator.h"
#include "ringattn/ring.h"
#include "ringattn/ringattn.h"
#include "runtime/src/sharding.h"

namespace ringattn {
namespace {

class MpiHandle {
 public:
  MpiHandle() {
    EXPECT_EQ(ringattn_comm_create_mpi(&handle_), RINGATTN_OK) << ringattn_last_error();
  }
  ~MpiHandle() { ringattn_comm_destroy(handle_); }
  ringattn_comm* get() const { return handle_; }

 private:
  ringattn_comm* handle_ = nullptr;
};

// Values of global position `pos` (so every rank builds its shard without communication).
float value(uint32_t tensor, int64_t pos, int64_t i) {
  std::mt19937 gen(static_cast<uint32_t>(tensor * 1000003u + pos * 7919u + i));
  return std::normal_distribution<float>(0.0f, 1.0f)(gen);
}

std::vector<float> shard_values(uint32_t tensor, const Shard& shard, int64_t batch, int64_t row) {
  const int64_t n = shard.size();
  std::vector<float> out(static_cast<size_t>(batch * n * row));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t i = 0; i < row; ++i) {
        out[(b * n + t) * row + i] = value(tensor, b * 100000 + shard.position(t), i);
      }
    }
  }
  return out;
}

TEST(CApiMpiTest, AdoptsMpiAndReducesAcrossRanks) {
  int rank = -1, size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MpiHandle comm;
  int r = -1, s = -1;
  ASSERT_EQ(ringattn_comm_rank(comm.get(), &r), RINGATTN_OK);
  ASSERT_EQ(ringattn_comm_size(comm.get(), &s), RINGATTN_OK);
  EXPECT_EQ(r, rank);
  EXPECT_EQ(s, size);
  EXPECT_STREQ(ringattn_comm_name(comm.get()), "mpi");
  int64_t x[2] = {rank + 1, rank};
  ASSERT_EQ(ringattn_allreduce(comm.get(), x, 2, RINGATTN_REDUCE_I64, RINGATTN_SUM), RINGATTN_OK);
  EXPECT_EQ(x[0], int64_t{size} * (size + 1) / 2);
  float m = static_cast<float>(rank);
  ASSERT_EQ(ringattn_allreduce(comm.get(), &m, 1, RINGATTN_REDUCE_F32, RINGATTN_MAX), RINGATTN_OK);
  EXPECT_EQ(m, static_cast<float>(size - 1));
  int32_t b = rank == size - 1 ? 42 : 0;
  ASSERT_EQ(ringattn_broadcast(comm.get(), &b, sizeof(b), size - 1), RINGATTN_OK);
  EXPECT_EQ(b, 42);
  EXPECT_EQ(ringattn_barrier(comm.get()), RINGATTN_OK);
  // The application owns MPI here: finalize through the ABI must leave it alone.
  EXPECT_EQ(ringattn_mpi_finalize(), RINGATTN_OK);
  int finalized = 1;
  MPI_Finalized(&finalized);
  EXPECT_EQ(finalized, 0);
}

TEST(CApiMpiTest, ForwardAndBackwardEqualTheCppApi) {
  MpiHandle handle;
  MpiCommunicator cpp_comm(MPI_COMM_WORLD);
  const int rank = cpp_comm.rank(), world = cpp_comm.size();
  const int64_t n = 29, batch = 2, heads = 4, kv_heads = 2, dim = 16;
  ringattn_spec spec{};
  spec.causal = 1;
  spec.window = 6;
  spec.sinks = 2;
  spec.layout = RINGATTN_LAYOUT_AUTO;
  int64_t count = 0;
  ASSERT_EQ(ringattn_shard_positions(&spec, n, world, rank, nullptr, 0, &count), RINGATTN_OK);
  const Shard shard = make_shard(n, world, rank, resolve_layout(Layout::kAuto, true, 6));
  ASSERT_EQ(count, shard.size());
  const ringattn_shape shape{batch, count, heads, kv_heads, dim};
  std::vector<float> q = shard_values(1, shard, batch, heads * dim);
  std::vector<float> k = shard_values(2, shard, batch, kv_heads * dim);
  std::vector<float> v = shard_values(3, shard, batch, kv_heads * dim);
  std::vector<float> dout = shard_values(4, shard, batch, heads * dim);
  std::vector<float> z = {0.5f, -1.0f, 0.0f, 2.0f};

  std::vector<float> o(q.size()), lse(static_cast<size_t>(batch * heads * count)), dq(q.size()),
      dk(k.size()), dv(v.size()), dz(4);
  ASSERT_EQ(ringattn_forward(handle.get(), &spec, n, &shape, RINGATTN_F32, q.data(), k.data(),
                             v.data(), z.data(), o.data(), lse.data(), 1),
            RINGATTN_OK)
      << ringattn_last_error();
  ASSERT_EQ(ringattn_backward(handle.get(), &spec, n, &shape, RINGATTN_F32, q.data(), k.data(),
                              v.data(), o.data(), lse.data(), dout.data(), z.data(), dq.data(),
                              dk.data(), dv.data(), dz.data(), 1),
            RINGATTN_OK)
      << ringattn_last_error();

  AttentionSpec cpp_spec;
  cpp_spec.causal = true;
  cpp_spec.window = 6;
  cpp_spec.sinks = 2;
  auto qv = [&](float* p) { return TensorView(p, DType::kF32, {batch, count, heads, dim}); };
  auto kv = [&](float* p) { return TensorView(p, DType::kF32, {batch, count, kv_heads, dim}); };
  std::vector<float> o2(o.size()), lse2(lse.size()), dq2(dq.size()), dk2(dk.size()), dv2(dv.size()),
      dz2(4);
  TensorView zv(z.data(), DType::kF32, {heads});
  TensorView lv(lse2.data(), DType::kF32, {batch, heads, count});
  TensorView dzv(dz2.data(), DType::kF32, {heads});
  RingOptions options;
  options.num_threads = 1;
  forward(cpp_comm, cpp_spec, n, qv(q.data()), kv(k.data()), kv(v.data()), &zv, qv(o2.data()), &lv,
          options);
  backward(cpp_comm, cpp_spec, n, qv(q.data()), kv(k.data()), kv(v.data()), qv(o2.data()), lv,
           qv(dout.data()), &zv, qv(dq2.data()), kv(dk2.data()), kv(dv2.data()), &dzv, options);
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  EXPECT_TRUE(same(o, o2));
  EXPECT_TRUE(same(lse, lse2));
  EXPECT_TRUE(same(dq, dq2));
  EXPECT_TRUE(same(dk, dk2));
  EXPECT_TRUE(same(dv, dv2));
  EXPECT_TRUE(same(dz, dz2));
  // dz is the same on every rank.
  std::vector<float> dz_max = dz;
  ASSERT_EQ(ringattn_allreduce(handle.get(), dz_max.data(), 4, RINGATTN_REDUCE_F32, RINGATTN_MAX),
            RINGATTN_OK);
  EXPECT_TRUE(same(dz, dz_max));
}

TEST(CApiMpiTest, MismatchIsAnErrorOnEveryRank) {
  MpiHandle handle;
  int rank = 0, world = 1;
  ringattn_comm_rank(handle.get(), &rank);
  ringattn_comm_size(handle.get(), &world);
  const int64_t n = 8 * world;
  ringattn_spec spec{};
  spec.layout = RINGATTN_LAYOUT_CONTIGUOUS;
  // The last rank asks for a window the others do not: every rank must fail alike.
  if (rank == world - 1) spec.window = 3;
  const ringattn_shape shape{1, 8, 2, 2, 8};
  std::vector<float> q(8 * 2 * 8, 0.25f), o(q.size()), lse(2 * 8);
  const ringattn_status st =
      ringattn_forward(handle.get(), &spec, n, &shape, RINGATTN_F32, q.data(), q.data(), q.data(),
                       nullptr, o.data(), lse.data(), 1);
  if (world == 1) {
    EXPECT_EQ(st, RINGATTN_OK);
    return;
  }
  EXPECT_EQ(st, RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ringattn_last_error()).find("window"), std::string::npos)
      << ringattn_last_error();
  // Still in step: a collective afterwards completes.
  int64_t one = 1;
  ASSERT_EQ(ringattn_allreduce(handle.get(), &one, 1, RINGATTN_REDUCE_I64, RINGATTN_SUM),
            RINGATTN_OK);
  EXPECT_EQ(one, world);
}

}  // namespace
}  // namespace ringattn
