// MpiCommunicator under mpiexec (1..4 ranks): the in-process communicator's cases through MPI,
// plus chunked large messages and MPI errors turned into exceptions. Expected values are
// derived from (rank, tag, index), so no rank needs another's data to check its own.

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "comm/mpi/mpi_communicator.h"
#include "comm/mpi/mpi_session.h"
#include "ringattn/error.h"
#include "ringattn/tensor.h"
#include "tests/common/test_util.h"
#include "tests/mpi/mpi_test_env.h"

namespace ringattn {
namespace {

using test::count_mismatches;
using test::fill_pattern;

// ---- session ---------------------------------------------------------------------------------

TEST(MpiSessionTest, ReportsWorldAndNodeRanks) {
  const MpiSession& session = mpi_test::mpi_session();
  int rank = -1, size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(session.world_rank(), rank);
  EXPECT_EQ(session.world_size(), size);
  EXPECT_TRUE(session.owns_mpi());
  EXPECT_GE(session.local_rank(), 0);
  EXPECT_LT(session.local_rank(), session.local_size());
  EXPECT_LE(session.local_size(), session.world_size());
  // Node-local ranks 0..local_size-1 each appear once per node: the ranks with local rank 0
  // (the nodes) times the node size adds up to the world when nodes are equal, and at least
  // one rank is local rank 0 in any case.
  int leaders = session.local_rank() == 0 ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &leaders, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_GE(leaders, 1);
  EXPECT_LE(leaders, session.world_size());
  // What the error messages of this thread start with.
  EXPECT_EQ(current_rank(), rank);
}

// ---- point to point --------------------------------------------------------------------------

// (message bytes, chunk bytes): the default single-message path and the chunked path.
class MpiRingTest : public ::testing::TestWithParam<std::tuple<size_t, size_t>> {};

TEST_P(MpiRingTest, ExchangesWithNeighboursOnManyTags) {
  const size_t bytes = std::get<0>(GetParam());
  MpiCommunicator comm(MPI_COMM_WORLD, std::get<1>(GetParam()));
  const int world = comm.size();
  const int r = comm.rank();
  const int prev = (r - 1 + world) % world;
  const int next = (r + 1) % world;
  EXPECT_STREQ(comm.name(), "mpi");
  constexpr int kTags = 8;
  std::vector<std::vector<uint8_t>> send(kTags, std::vector<uint8_t>(bytes));
  std::vector<std::vector<uint8_t>> recv(kTags, std::vector<uint8_t>(bytes, 0));
  std::vector<RequestPtr> requests;
  for (int tag = 0; tag < kTags; ++tag) {
    fill_pattern(send[tag], r, tag);
    requests.push_back(comm.irecv(recv[tag].data(), bytes, prev, tag));
  }
  for (int tag = kTags - 1; tag >= 0; --tag) {
    requests.push_back(comm.isend(send[tag].data(), bytes, next, tag));
  }
  for (RequestPtr& req : requests) wait(req);
  for (RequestPtr& req : requests) {
    req->wait();  // a second wait is a no-op
    EXPECT_TRUE(req->test());
  }
  for (int tag = 0; tag < kTags; ++tag) {
    EXPECT_EQ(count_mismatches(recv[tag], prev, tag), 0u) << "tag " << tag;
  }
}

// At step s rank r holds the block of rank r-s.
TEST_P(MpiRingTest, PassesBlocksAroundTheRing) {
  const size_t bytes = std::get<0>(GetParam());
  MpiCommunicator comm(MPI_COMM_WORLD, std::get<1>(GetParam()));
  const int world = comm.size();
  const int r = comm.rank();
  std::vector<uint8_t> current(bytes), spare(bytes);
  fill_pattern(current, r, 0);
  for (int step = 1; step < world; ++step) {
    RequestPtr recv = comm.irecv(spare.data(), bytes, (r - 1 + world) % world, step);
    RequestPtr send = comm.isend(current.data(), bytes, (r + 1) % world, step);
    wait(recv);
    wait(send);
    std::swap(current, spare);
    const int owner = ((r - step) % world + world) % world;
    EXPECT_EQ(count_mismatches(current, owner, 0), 0u) << "step " << step;
  }
}

INSTANTIATE_TEST_SUITE_P(
    SizesAndChunks, MpiRingTest,
    ::testing::Values(std::make_tuple(size_t{0}, MpiCommunicator::kDefaultChunkBytes),
                      std::make_tuple(size_t{1}, MpiCommunicator::kDefaultChunkBytes),
                      std::make_tuple(size_t{1} << 20, MpiCommunicator::kDefaultChunkBytes),
                      std::make_tuple((size_t{1} << 20) + 5, size_t{4096}),
                      std::make_tuple(size_t{3}, size_t{1})));

// Larger than the 64 MiB a ring step may move; with 1 MiB chunks it is 81 MPI messages per
// transfer under one tag, which MPI must keep in order.
TEST(MpiCommunicatorTest, MovesLargeMessagesWholeAndChunked) {
  const size_t bytes = (size_t{80} << 20) + 7;
  for (size_t chunk : {MpiCommunicator::kDefaultChunkBytes, size_t{1} << 20}) {
    MpiCommunicator comm(MPI_COMM_WORLD, chunk);
    const int world = comm.size();
    const int r = comm.rank();
    const int prev = (r - 1 + world) % world;
    std::vector<uint8_t> send(bytes), recv(bytes, 0);
    fill_pattern(send, r, 11);
    RequestPtr rq = comm.irecv(recv.data(), bytes, prev, 11);
    RequestPtr sq = comm.isend(send.data(), bytes, (r + 1) % world, 11);
    wait(rq);
    wait(sq);
    EXPECT_EQ(count_mismatches(recv, prev, 11), 0u) << "chunk " << chunk;

    std::vector<uint8_t> bcast(bytes, 0);
    if (r == world - 1) fill_pattern(bcast, r, 12);
    comm.broadcast(bcast.data(), bytes, world - 1);
    EXPECT_EQ(count_mismatches(bcast, world - 1, 12), 0u) << "chunk " << chunk;
  }
}

TEST(MpiCommunicatorTest, KeepsFifoOrderPerSourceDestinationTag) {
  MpiCommunicator comm;
  constexpr int kMessages = 50;
  constexpr int kTag = 3;
  auto length = [](int i) { return static_cast<size_t>((i % 5 + 1) * 4); };
  if (comm.rank() == 0) {
    std::vector<std::vector<uint8_t>> payload(kMessages);
    std::vector<RequestPtr> sends;
    for (int dst = 1; dst < comm.size(); ++dst) {
      for (int i = 0; i < kMessages; ++i) {
        payload[i].assign(length(i), 0);
        fill_pattern(payload[i], i, dst);
        RequestPtr req = comm.isend(payload[i].data(), payload[i].size(), dst, kTag);
        wait(req);
      }
    }
  } else {
    std::vector<std::vector<uint8_t>> got(kMessages);
    std::vector<RequestPtr> requests(kMessages);
    for (int i = 0; i < kMessages; ++i) {
      got[i].assign(length(i), 0);
      requests[i] = comm.irecv(got[i].data(), got[i].size(), 0, kTag);
    }
    for (int i = kMessages - 1; i >= 0; --i) wait(requests[i]);
    for (int i = 0; i < kMessages; ++i) {
      EXPECT_EQ(count_mismatches(got[i], i, comm.rank()), 0u) << "message " << i;
    }
  }
  comm.barrier();
}

TEST(MpiCommunicatorTest, TensorOverloadsSendContiguousTensors) {
  MpiCommunicator comm;
  const int world = comm.size();
  const int r = comm.rank();
  const int prev = (r - 1 + world) % world;
  std::vector<float> out(24), in(24, -1.0f);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(r * 100 + i);
  RequestPtr rq = comm.irecv(TensorView(in.data(), DType::kF32, {2, 3, 4}), prev, 1);
  RequestPtr sq = comm.isend(TensorView(out.data(), DType::kF32, {2, 3, 4}), (r + 1) % world, 1);
  wait(rq);
  wait(sq);
  for (size_t i = 0; i < in.size(); ++i) EXPECT_EQ(in[i], static_cast<float>(prev * 100 + i));

  const int64_t shape[2] = {4, 3};
  const int64_t strides[2] = {6, 2};
  TensorView strided(out.data(), DType::kF32, 2, shape, strides);
  try {
    comm.isend(strided, 0, 0);
    ADD_FAILURE() << "strided tensor accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  }
  EXPECT_TRUE(comm.accepts(Device::kCPU));
  if (!comm.accepts(Device::kCUDA)) {
    try {
      comm.irecv(TensorView(in.data(), DType::kF32, {24}, Device::kCUDA), 0, 0);
      ADD_FAILURE() << "CUDA tensor accepted by a communicator that does not accept CUDA";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    }
  }
}

// ---- collectives -----------------------------------------------------------------------------

class MpiChunkTest : public ::testing::TestWithParam<size_t> {};

TEST_P(MpiChunkTest, BroadcastsFromEveryRoot) {
  MpiCommunicator comm(MPI_COMM_WORLD, GetParam());
  for (size_t bytes : {size_t{0}, size_t{1}, (size_t{1} << 20) + 3}) {
    for (int root = 0; root < comm.size(); ++root) {
      std::vector<uint8_t> buf(bytes, 0xee);
      if (comm.rank() == root) fill_pattern(buf, root, 17);
      comm.broadcast(buf.data(), bytes, root);
      EXPECT_EQ(count_mismatches(buf, root, 17), 0u) << "root " << root << ", " << bytes;
    }
  }
}

TEST_P(MpiChunkTest, AllreducesEveryTypeAndOp) {
  MpiCommunicator comm(MPI_COMM_WORLD, GetParam());
  for (size_t count : {size_t{0}, size_t{1}, size_t{1000}, size_t{100003}}) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
      test::expect_exact_allreduce(comm, op, count);
    }
  }
}

// Default (one MPI call), 1001 bytes (125 doubles or 250 floats per call: not a whole number
// of elements) and 3 bytes (smaller than an element: one element per call).
INSTANTIATE_TEST_SUITE_P(Chunks, MpiChunkTest,
                         ::testing::Values(MpiCommunicator::kDefaultChunkBytes, size_t{1001},
                                           size_t{3}));

// Rank 0 arrives late; everyone else must stay in the barrier until it does.
TEST(MpiCommunicatorTest, BarrierWaitsForTheLastRank) {
  MpiCommunicator comm;
  comm.barrier();
  const auto start = std::chrono::steady_clock::now();
  if (comm.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  comm.barrier();
  const auto waited = std::chrono::steady_clock::now() - start;
  // Other ranks left the first barrier at most a few ms after rank 0 did.
  EXPECT_GE(waited, std::chrono::milliseconds(200)) << "rank " << comm.rank();
}

// ---- errors ----------------------------------------------------------------------------------

TEST(MpiCommunicatorTest, InvalidPeerIsAnMpiErrorNotAnAbort) {
  MpiCommunicator comm;
  char byte = 0;
  try {
    RequestPtr req = comm.isend(&byte, 1, comm.size(), 0);
    ADD_FAILURE() << "isend to peer " << comm.size() << " accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kMpi) << e.what();
    EXPECT_NE(e.message().find("MPI_Isend"), std::string::npos) << e.what();
    EXPECT_NE(e.message().find("peer " + std::to_string(comm.size())), std::string::npos)
        << e.what();
  }
  try {
    RequestPtr req = comm.irecv(&byte, 1, comm.size() + 5, 2);
    ADD_FAILURE() << "irecv from an invalid peer accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kMpi) << e.what();
    EXPECT_NE(e.message().find("MPI_Irecv"), std::string::npos) << e.what();
  }
  try {
    comm.broadcast(&byte, 1, comm.size());
    ADD_FAILURE() << "broadcast from an invalid root accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kMpi) << e.what();
    EXPECT_NE(e.message().find("MPI_Bcast"), std::string::npos) << e.what();
  }
  // Wildcards would change matching silently: rejected before MPI sees them.
  try {
    comm.irecv(&byte, 1, MPI_ANY_SOURCE, 0);
    ADD_FAILURE() << "MPI_ANY_SOURCE accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
  }
  // The communicator still works after the errors.
  comm.barrier();
}

// A message shorter than the receive expects is caught by the count check (MPI itself accepts
// it silently). A longer one is not tested: OpenMPI truncates it silently between a rank and
// itself and may write past the buffer between processes — sizes must agree.
TEST(MpiCommunicatorTest, ShortMessageIsAnMpiError) {
  MpiCommunicator comm;
  const int self = comm.rank();
  int64_t out[2] = {1, 2};
  int64_t in[2] = {0, 0};
  RequestPtr rq = comm.irecv(in, 2 * sizeof(int64_t), self, 1);
  RequestPtr sq = comm.isend(out, sizeof(int64_t), self, 1);
  wait(sq);
  try {
    rq->wait();
    ADD_FAILURE() << "short message accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kMpi);
    EXPECT_NE(e.message().find("expected 16 bytes"), std::string::npos) << e.what();
    EXPECT_NE(e.message().find("received 8"), std::string::npos) << e.what();
  }
  EXPECT_THROW(rq->wait(), Error);  // the failure is sticky, not forgotten
  EXPECT_THROW(rq->test(), Error);
  comm.barrier();
}

// A destroyed, unwaited receive is cancelled: the next message with its tag goes to the next
// receive. Destroying an unwaited send neither blocks for long nor crashes.
TEST(MpiCommunicatorTest, DestroyingUnwaitedRequestsIsSafe) {
  MpiCommunicator comm;
  const int self = comm.rank();
  {
    int64_t dead = -1;
    RequestPtr abandoned = comm.irecv(&dead, sizeof(dead), self, 9);
  }
  int64_t value = 7, got = -1;
  RequestPtr rq = comm.irecv(&got, sizeof(got), self, 9);
  RequestPtr sq = comm.isend(&value, sizeof(value), self, 9);
  wait(rq);
  wait(sq);
  EXPECT_EQ(got, 7);

  const auto start = std::chrono::steady_clock::now();
  { RequestPtr abandoned = comm.isend(&value, sizeof(value), self, 10); }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(4));
  // Whether MPI cancelled the send or delivered it, leave no message behind.
  int pending = 0;
  MPI_Iprobe(self, 10, comm.comm(), &pending, MPI_STATUS_IGNORE);
  if (pending) MPI_Recv(&got, 1, MPI_INT64_T, self, 10, comm.comm(), MPI_STATUS_IGNORE);
  comm.barrier();
}

}  // namespace
}  // namespace ringattn
