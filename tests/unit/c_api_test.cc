// The C ABI (ringattn/ringattn.h) on one process: status codes and messages for bad input,
// the thread-local last error, sharding positions, and forward/backward through the ABI equal
// (bit for bit) to the C++ API on the same one-rank problem.

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "comm/inproc/inproc_communicator.h"
#include "ringattn/ring.h"
#include "ringattn/ringattn.h"
#include "runtime/src/sharding.h"

namespace ringattn {
namespace {

// A one-rank self communicator, freed at scope exit.
class SelfComm {
 public:
  SelfComm() { EXPECT_EQ(ringattn_comm_create_self(&handle_), RINGATTN_OK); }
  ~SelfComm() { ringattn_comm_destroy(handle_); }
  ringattn_comm* get() const { return handle_; }

 private:
  ringattn_comm* handle_ = nullptr;
};

std::vector<float> random_values(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> out(n);
  for (float& x : out) x = dist(gen);
  return out;
}

struct Problem {
  ringattn_spec spec{};
  ringattn_shape shape{};
  std::vector<float> q, k, v, z, dout;

  Problem(bool causal, int64_t window, int64_t sinks, int64_t n) {
    spec.causal = causal ? 1 : 0;
    spec.window = window;
    spec.sinks = sinks;
    spec.layout = RINGATTN_LAYOUT_AUTO;
    shape = ringattn_shape{2, n, 4, 2, 16};
    const size_t nq = static_cast<size_t>(2 * n * 4 * 16), nk = nq / 2;
    q = random_values(nq, 1);
    k = random_values(nk, 2);
    v = random_values(nk, 3);
    z = random_values(4, 4);
    dout = random_values(nq, 5);
  }
  TensorView view_q(float* p) const {
    return TensorView(p, DType::kF32, {2, shape.seq_local, 4, 16});
  }
  TensorView view_k(float* p) const {
    return TensorView(p, DType::kF32, {2, shape.seq_local, 2, 16});
  }
  AttentionSpec cpp_spec() const {
    AttentionSpec s;
    s.causal = spec.causal != 0;
    s.window = spec.window;
    s.sinks = spec.sinks;
    return s;
  }
};

TEST(CApiTest, VersionAndStatusNames) {
  EXPECT_EQ(ringattn_abi_version(), RINGATTN_ABI_VERSION);
  EXPECT_STRNE(ringattn_version(), "");
  EXPECT_STREQ(ringattn_status_name(RINGATTN_OK), "ok");
  EXPECT_STREQ(ringattn_status_name(RINGATTN_ERROR_INVALID_ARGUMENT), "invalid argument");
  EXPECT_STREQ(ringattn_status_name(RINGATTN_ERROR_MPI), "mpi");
  EXPECT_STREQ(ringattn_status_name(99), "unknown");
}

TEST(CApiTest, ErrorCodesAndMessagesOnBadInput) {
  Problem p(true, 0, 0, 8);
  SelfComm comm;
  std::vector<float> o(p.q.size()), lse(2 * 4 * 8);

  // Null communicator.
  EXPECT_EQ(ringattn_forward(nullptr, &p.spec, 8, &p.shape, RINGATTN_F32, p.q.data(), p.k.data(),
                             p.v.data(), nullptr, o.data(), lse.data(), 1),
            RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ringattn_last_error()).find("communicator"), std::string::npos)
      << ringattn_last_error();

  // Bad dtype.
  EXPECT_EQ(ringattn_forward(comm.get(), &p.spec, 8, &p.shape, 7, p.q.data(), p.k.data(),
                             p.v.data(), nullptr, o.data(), lse.data(), 1),
            RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ringattn_last_error()).find("dtype"), std::string::npos);

  // H % H_kv != 0.
  ringattn_shape bad = p.shape;
  bad.kv_heads = 3;
  EXPECT_EQ(ringattn_forward(comm.get(), &p.spec, 8, &bad, RINGATTN_F32, p.q.data(), p.k.data(),
                             p.v.data(), nullptr, o.data(), lse.data(), 1),
            RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_STRNE(ringattn_last_error(), "");

  // Negative extent, bad layout, negative window, null q, seq_len not the shard's length.
  bad = p.shape;
  bad.head_dim = -1;
  EXPECT_EQ(ringattn_forward(comm.get(), &p.spec, 8, &bad, RINGATTN_F32, p.q.data(), p.k.data(),
                             p.v.data(), nullptr, o.data(), lse.data(), 1),
            RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ringattn_last_error()).find("head_dim"), std::string::npos);
  bad = p.shape;
  bad.batch = int64_t{1} << 40;
  bad.seq_local = int64_t{1} << 40;
  EXPECT_EQ(ringattn_forward(comm.get(), &p.spec, 8, &bad, RINGATTN_F32, p.q.data(), p.k.data(),
                             p.v.data(), nullptr, o.data(), lse.data(), 1),
            RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ringattn_last_error()).find("too large"), std::string::npos);
  ringattn_spec bad_spec = p.spec;
  bad_spec.layout = 5;
  EXPECT_EQ(ringattn_forward(comm.get(), &bad_spec, 8, &p.shape, RINGATTN_F32, p.q.data(),
                             p.k.data(), p.v.data(), nullptr, o.data(), lse.data(), 1),
            RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ringattn_last_error()).find("layout"), std::string::npos);
  bad_spec = p.spec;
  bad_spec.window = -2;
  EXPECT_EQ(ringattn_forward(comm.get(), &bad_spec, 8, &p.shape, RINGATTN_F32, p.q.data(),
                             p.k.data(), p.v.data(), nullptr, o.data(), lse.data(), 1),
            RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(ringattn_forward(comm.get(), &p.spec, 8, &p.shape, RINGATTN_F32, nullptr, p.k.data(),
                             p.v.data(), nullptr, o.data(), lse.data(), 1),
            RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ringattn_last_error()).find("q"), std::string::npos);
  EXPECT_EQ(ringattn_forward(comm.get(), &p.spec, 9, &p.shape, RINGATTN_F32, p.q.data(), p.k.data(),
                             p.v.data(), nullptr, o.data(), lse.data(), 1),
            RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_STRNE(ringattn_last_error(), "");

  // Backward without lse.
  std::vector<float> dq(p.q.size()), dk(p.k.size()), dv(p.v.size());
  EXPECT_EQ(ringattn_backward(comm.get(), &p.spec, 8, &p.shape, RINGATTN_F32, p.q.data(),
                              p.k.data(), p.v.data(), o.data(), nullptr, p.dout.data(), nullptr,
                              dq.data(), dk.data(), dv.data(), nullptr, 1),
            RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ringattn_last_error()).find("lse"), std::string::npos);

  // Null out-pointers of the small functions.
  EXPECT_EQ(ringattn_comm_create_self(nullptr), RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(ringattn_comm_rank(comm.get(), nullptr), RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(ringattn_allreduce(comm.get(), o.data(), 4, RINGATTN_REDUCE_F32, 9),
            RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(ringattn_broadcast(comm.get(), o.data(), 4, 1), RINGATTN_ERROR_INVALID_ARGUMENT);

  // A successful call clears the message.
  EXPECT_EQ(ringattn_forward(comm.get(), &p.spec, 8, &p.shape, RINGATTN_F32, p.q.data(), p.k.data(),
                             p.v.data(), nullptr, o.data(), lse.data(), 1),
            RINGATTN_OK);
  EXPECT_STREQ(ringattn_last_error(), "");
}

TEST(CApiTest, LastErrorIsPerThread) {
  EXPECT_EQ(ringattn_comm_rank(nullptr, nullptr), RINGATTN_ERROR_INVALID_ARGUMENT);
  const std::string mine = ringattn_last_error();
  EXPECT_FALSE(mine.empty());
  std::string other = "unset";
  std::thread t([&] { other = ringattn_last_error(); });
  t.join();
  EXPECT_EQ(other, "");
  EXPECT_EQ(std::string(ringattn_last_error()), mine);
}

TEST(CApiTest, SelfCommunicator) {
  SelfComm comm;
  int rank = -1, size = -1;
  ASSERT_EQ(ringattn_comm_rank(comm.get(), &rank), RINGATTN_OK);
  ASSERT_EQ(ringattn_comm_size(comm.get(), &size), RINGATTN_OK);
  EXPECT_EQ(rank, 0);
  EXPECT_EQ(size, 1);
  EXPECT_STREQ(ringattn_comm_name(comm.get()), "inproc");
  double x[3] = {1.5, -2.0, 3.25};
  ASSERT_EQ(ringattn_allreduce(comm.get(), x, 3, RINGATTN_REDUCE_F64, RINGATTN_SUM), RINGATTN_OK);
  EXPECT_EQ(x[0], 1.5);
  EXPECT_EQ(x[2], 3.25);
  EXPECT_EQ(ringattn_barrier(comm.get()), RINGATTN_OK);
  EXPECT_EQ(ringattn_comm_destroy(nullptr), RINGATTN_OK);
}

TEST(CApiTest, MpiAbortAndFinalizeWithoutMpi) {
  // Unit tests never initialise MPI: abort must refuse (not abort the test binary), finalize
  // has nothing to do.
  EXPECT_EQ(ringattn_mpi_abort(3), RINGATTN_ERROR_MPI);
  EXPECT_NE(std::string(ringattn_last_error()).find("not initialised"), std::string::npos)
      << ringattn_last_error();
  EXPECT_EQ(ringattn_mpi_finalize(), RINGATTN_OK);
}

TEST(CApiTest, ShardPositionsMatchSharding) {
  ringattn_spec spec{};
  spec.causal = 1;  // auto -> zigzag
  int resolved = -1;
  ASSERT_EQ(ringattn_resolve_layout(&spec, &resolved), RINGATTN_OK);
  EXPECT_EQ(resolved, RINGATTN_LAYOUT_ZIGZAG);
  for (int world : {1, 2, 3, 4}) {
    for (int rank = 0; rank < world; ++rank) {
      int64_t count = -1;
      ASSERT_EQ(ringattn_shard_positions(&spec, 23, world, rank, nullptr, 0, &count), RINGATTN_OK);
      const Shard shard = make_shard(23, world, rank, Layout::kZigzag);
      ASSERT_EQ(count, shard.size());
      std::vector<int64_t> pos(static_cast<size_t>(count));
      ASSERT_EQ(ringattn_shard_positions(&spec, 23, world, rank, pos.data(), count, &count),
                RINGATTN_OK);
      for (int64_t i = 0; i < count; ++i) EXPECT_EQ(pos[i], shard.position(i));
      if (count > 0) {
        EXPECT_EQ(ringattn_shard_positions(&spec, 23, world, rank, pos.data(), count - 1, &count),
                  RINGATTN_ERROR_INVALID_ARGUMENT);
      }
    }
  }
  int64_t count = 0;
  EXPECT_EQ(ringattn_shard_positions(&spec, 3, 4, 0, nullptr, 0, &count),
            RINGATTN_ERROR_INVALID_ARGUMENT);  // N < P
  EXPECT_EQ(ringattn_shard_positions(&spec, 8, 2, 2, nullptr, 0, &count),
            RINGATTN_ERROR_INVALID_ARGUMENT);  // rank >= world
}

class CApiParityTest : public ::testing::TestWithParam<std::tuple<bool, int64_t, int64_t, bool>> {};

TEST_P(CApiParityTest, ForwardAndBackwardEqualTheCppApi) {
  const auto [causal, window, sinks, learned] = GetParam();
  const int64_t n = 19;
  Problem p(causal, window, sinks, n);
  const float* z = learned ? p.z.data() : nullptr;
  std::vector<float> o(p.q.size()), lse(2 * 4 * n), dq(p.q.size()), dk(p.k.size()), dv(p.v.size()),
      dz(4, -1.0f);
  {
    SelfComm comm;
    ASSERT_EQ(ringattn_forward(comm.get(), &p.spec, n, &p.shape, RINGATTN_F32, p.q.data(),
                               p.k.data(), p.v.data(), z, o.data(), lse.data(), 1),
              RINGATTN_OK)
        << ringattn_last_error();
    ASSERT_EQ(ringattn_backward(comm.get(), &p.spec, n, &p.shape, RINGATTN_F32, p.q.data(),
                                p.k.data(), p.v.data(), o.data(), lse.data(), p.dout.data(), z,
                                dq.data(), dk.data(), dv.data(), dz.data(), 1),
              RINGATTN_OK)
        << ringattn_last_error();
  }

  std::vector<float> o2(o.size()), lse2(lse.size()), dq2(dq.size()), dk2(dk.size()), dv2(dv.size()),
      dz2(4, -1.0f);
  run_inproc(1, [&](Communicator& comm) {
    const AttentionSpec spec = p.cpp_spec();
    TensorView zv(const_cast<float*>(p.z.data()), DType::kF32, {4});
    TensorView lv(lse2.data(), DType::kF32, {2, 4, n});
    TensorView dzv(dz2.data(), DType::kF32, {4});
    RingOptions options;
    options.num_threads = 1;
    const TensorView q = p.view_q(p.q.data()), k = p.view_k(p.k.data()), v = p.view_k(p.v.data());
    forward(comm, spec, n, q, k, v, learned ? &zv : nullptr, p.view_q(o2.data()), &lv, options);
    backward(comm, spec, n, q, k, v, p.view_q(o2.data()), lv, p.view_q(p.dout.data()),
             learned ? &zv : nullptr, p.view_q(dq2.data()), p.view_k(dk2.data()),
             p.view_k(dv2.data()), &dzv, options);
  });
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  EXPECT_TRUE(same(o, o2));
  EXPECT_TRUE(same(lse, lse2));
  EXPECT_TRUE(same(dq, dq2));
  EXPECT_TRUE(same(dk, dk2));
  EXPECT_TRUE(same(dv, dv2));
  EXPECT_TRUE(same(dz, dz2));
  // Something was computed: o is not all zeros, and dz is written (zeros without sinks).
  bool nonzero = false;
  for (float x : o) nonzero |= x != 0.0f;
  EXPECT_TRUE(nonzero);
  if (!learned) {
    EXPECT_EQ(dz[0], 0.0f);
  }
}

INSTANTIATE_TEST_SUITE_P(Masks, CApiParityTest,
                         ::testing::Values(std::make_tuple(false, int64_t{0}, int64_t{0}, false),
                                           std::make_tuple(true, int64_t{0}, int64_t{0}, true),
                                           std::make_tuple(true, int64_t{4}, int64_t{2}, true),
                                           std::make_tuple(false, int64_t{3}, int64_t{1}, false)));

}  // namespace
}  // namespace ringattn
