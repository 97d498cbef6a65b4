// The in-process communicator: P ranks as threads. Expected values are derived from
// (rank, tag, index) so every rank checks its own data without talking (nccl-tests style).

#include "comm/inproc/inproc_communicator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "ringattn/config.h"
#include "ringattn/error.h"
#include "ringattn/tensor.h"
#include "tests/common/test_util.h"

#if RINGATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ringattn {
namespace {

using std::chrono::milliseconds;

// A safety net: a deadlock in one of these tests becomes an error, not a hung test binary.
constexpr milliseconds kTestTimeout{30000};

using test::count_mismatches;
using test::fill_pattern;

void run(int world, const std::function<void(Communicator&)>& fn) {
  InprocWorld w(world, kTestTimeout);
  run_inproc(w, fn);
}

// ---- point to point --------------------------------------------------------------------------

class InprocRingTest : public ::testing::TestWithParam<std::tuple<int, size_t>> {};

// Every rank posts irecv from r-1 and isend to r+1 for many tags, then waits on everything:
// the pattern of one ring step. Must not deadlock and must deliver each tag's own payload.
TEST_P(InprocRingTest, ExchangesWithNeighboursOnManyTags) {
  const int world = std::get<0>(GetParam());
  const size_t bytes = std::get<1>(GetParam());
  constexpr int kTags = 8;
  run(world, [&](Communicator& comm) {
    const int r = comm.rank();
    const int prev = (r - 1 + world) % world;
    const int next = (r + 1) % world;
    EXPECT_EQ(comm.size(), world);
    EXPECT_STREQ(comm.name(), "inproc");
    std::vector<std::vector<uint8_t>> send(kTags, std::vector<uint8_t>(bytes));
    std::vector<std::vector<uint8_t>> recv(kTags, std::vector<uint8_t>(bytes, 0));
    std::vector<RequestPtr> requests;
    for (int tag = 0; tag < kTags; ++tag) {
      fill_pattern(send[tag], r, tag);
      requests.push_back(comm.irecv(recv[tag].data(), bytes, prev, tag));
    }
    // Send in reverse tag order: matching is by tag, not by arrival.
    for (int tag = kTags - 1; tag >= 0; --tag) {
      requests.push_back(comm.isend(send[tag].data(), bytes, next, tag));
    }
    for (RequestPtr& req : requests) wait(req);
    for (RequestPtr& req : requests) EXPECT_TRUE(req->test());
    for (int tag = 0; tag < kTags; ++tag) {
      EXPECT_EQ(count_mismatches(recv[tag], prev, tag), 0u) << "tag " << tag;
    }
  });
}

// The full ring pass: at step s rank r holds the block of rank r-s, so after P-1 steps of
// (irecv from r-1 into the spare buffer, isend current to r+1, wait, swap) it saw every block.
TEST_P(InprocRingTest, PassesBlocksAroundTheRing) {
  const int world = std::get<0>(GetParam());
  const size_t bytes = std::get<1>(GetParam());
  run(world, [&](Communicator& comm) {
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
  });
}

INSTANTIATE_TEST_SUITE_P(WorldsAndSizes, InprocRingTest,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4, 7),
                                            ::testing::Values(size_t{0}, size_t{1},
                                                              size_t{1} << 20)));

// Messages of one (source, destination, tag) arrive in posting order, whether the receive was
// posted before the send (direct copy) or after (staged message), and whatever order the
// receives are waited in.
TEST(InprocCommunicatorTest, KeepsFifoOrderPerSourceDestinationTag) {
  constexpr int kWorld = 4;
  constexpr int kMessages = 50;
  constexpr int kTag = 3;
  run(kWorld, [&](Communicator& comm) {
    auto length = [](int i) { return static_cast<size_t>((i % 5 + 1) * 4); };
    if (comm.rank() == 0) {
      comm.barrier();  // receivers posted the first half
      std::vector<std::vector<uint8_t>> payload(kMessages);
      for (int dst = 1; dst < kWorld; ++dst) {
        for (int i = 0; i < kMessages; ++i) {
          payload[i].assign(length(i), 0);
          fill_pattern(payload[i], i, dst);
          RequestPtr req = comm.isend(payload[i].data(), payload[i].size(), dst, kTag);
          wait(req);
        }
      }
      comm.barrier();  // all sent before the second half is posted
      return;
    }
    std::vector<std::vector<uint8_t>> got(kMessages);
    std::vector<RequestPtr> requests(kMessages);
    for (int i = 0; i < kMessages / 2; ++i) {
      got[i].assign(length(i), 0);
      requests[i] = comm.irecv(got[i].data(), got[i].size(), 0, kTag);
    }
    comm.barrier();
    comm.barrier();
    for (int i = kMessages / 2; i < kMessages; ++i) {
      got[i].assign(length(i), 0);
      requests[i] = comm.irecv(got[i].data(), got[i].size(), 0, kTag);
    }
    for (int i = kMessages - 1; i >= 0; --i) wait(requests[i]);
    for (int i = 0; i < kMessages; ++i) {
      EXPECT_EQ(count_mismatches(got[i], i, comm.rank()), 0u) << "message " << i;
    }
  });
}

TEST(InprocCommunicatorTest, TestReportsCompletionWithoutBlocking) {
  run(2, [](Communicator& comm) {
    int64_t value = -1;
    if (comm.rank() == 1) {
      RequestPtr recv = comm.irecv(&value, sizeof(value), 0, 0);
      EXPECT_FALSE(recv->test());  // rank 0 sends only after the barrier
      comm.barrier();
      while (!recv->test()) std::this_thread::yield();
      recv->wait();  // idempotent after completion
      EXPECT_EQ(value, 42);
    } else {
      comm.barrier();
      value = 42;
      RequestPtr send = comm.isend(&value, sizeof(value), 1, 0);
      EXPECT_TRUE(send->test());  // buffered: complete once isend returned
    }
  });
}

// An unwaited receive that is destroyed withdraws itself: the next message with its key goes
// to the next receive, not into the dead buffer.
TEST(InprocCommunicatorTest, DestroyedReceiveIsWithdrawn) {
  run(2, [](Communicator& comm) {
    if (comm.rank() == 1) {
      {
        int64_t dead = -1;
        RequestPtr abandoned = comm.irecv(&dead, sizeof(dead), 0, 9);
      }
      comm.barrier();
      comm.barrier();
      int64_t value = -1;
      RequestPtr recv = comm.irecv(&value, sizeof(value), 0, 9);
      wait(recv);
      EXPECT_EQ(value, 7);
    } else {
      comm.barrier();
      int64_t value = 7;
      RequestPtr send = comm.isend(&value, sizeof(value), 1, 9);
      wait(send);
      comm.barrier();
    }
  });
}

TEST(InprocCommunicatorTest, SizeMismatchFailsTheReceive) {
  try {
    run(2, [](Communicator& comm) {
      int64_t value = 5;
      if (comm.rank() == 0) {
        RequestPtr send = comm.isend(&value, 4, 1, 0);
        wait(send);
      } else {
        RequestPtr recv = comm.irecv(&value, sizeof(value), 0, 0);
        wait(recv);
      }
    });
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInternal);
    EXPECT_NE(e.message().find("expected 8 bytes"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[rank 1]"), std::string::npos) << e.what();
  }
}

TEST(InprocCommunicatorTest, RejectsInvalidPeerAndTag) {
  run(2, [](Communicator& comm) {
    char byte = 0;
    try {
      comm.isend(&byte, 1, 2, 0);
      ADD_FAILURE() << "peer 2 accepted in a world of 2";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(e.message().find("found 2"), std::string::npos) << e.what();
    }
    EXPECT_THROW(comm.irecv(&byte, 1, -1, 0), Error);
    EXPECT_THROW(comm.irecv(&byte, 1, 0, -1), Error);
    EXPECT_THROW(comm.broadcast(&byte, 1, 5), Error);
  });
}

// Groups are for NCCL; the in-process communicator accepts them (nested too) and ignores them.
TEST(InprocCommunicatorTest, GroupsAreAcceptedAndIgnored) {
  run(3, [](Communicator& comm) {
    const int r = comm.rank();
    const int world = comm.size();
    std::vector<uint8_t> out(100), in(100, 0);
    fill_pattern(out, r, 4);
    RequestPtr recv, send;
    {
      CommGroup group(comm);
      comm.group_start();
      recv = comm.irecv(in.data(), in.size(), (r - 1 + world) % world, 4);
      send = comm.isend(out.data(), out.size(), (r + 1) % world, 4);
      comm.group_end();
      group.end();
    }
    wait(recv);
    wait(send);
    EXPECT_EQ(count_mismatches(in, (r - 1 + world) % world, 4), 0u);
  });
}

// ---- device worlds ---------------------------------------------------------------------------

int visible_cuda_devices() {
#if RINGATTN_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

TEST(InprocWorldDeviceTest, CpuWorldIsTheDefault) {
  InprocWorld world(2);
  EXPECT_EQ(world.device(), Device::kCPU);
  EXPECT_EQ(world.device_index(), 0);
  InprocWorld explicit_cpu(2, milliseconds::zero(), Device::kCPU);
  EXPECT_EQ(explicit_cpu.device(), Device::kCPU);
  EXPECT_FALSE(explicit_cpu.communicator(1)->accepts(Device::kCUDA));
}

// Without CUDA in the build, or without a device on the machine, a CUDA world cannot exist:
// Error(kUnsupported) saying which. With a device it is made and accepts device buffers (the
// transfers themselves are tested in tests/gpu/comm_gpu_test.cc).
TEST(InprocWorldDeviceTest, CudaWorldNeedsCudaAndADevice) {
  if (visible_cuda_devices() > 0) {
    InprocWorld world(2, milliseconds::zero(), Device::kCUDA, 0);
    EXPECT_EQ(world.device(), Device::kCUDA);
    EXPECT_TRUE(world.communicator(0)->accepts(Device::kCUDA));
    EXPECT_TRUE(world.communicator(1)->accepts(Device::kCPU));
    return;
  }
  try {
    InprocWorld world(2, milliseconds::zero(), Device::kCUDA, 0);
    FAIL() << "a CUDA world was made without a CUDA device";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    const std::string expected =
        RINGATTN_WITH_CUDA ? "needs a CUDA device, found none" : "needs a build with CUDA";
    EXPECT_NE(e.message().find(expected), std::string::npos) << e.what();
  }
}

TEST(InprocWorldDeviceTest, RejectsANegativeDeviceIndex) {
  try {
    InprocWorld world(2, milliseconds::zero(), Device::kCUDA, -1);
    FAIL() << "device index -1 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(e.message().find("found -1"), std::string::npos) << e.what();
  }
}

// ---- tensor overloads ------------------------------------------------------------------------

TEST(InprocCommunicatorTest, TensorOverloadsSendContiguousTensors) {
  run(3, [](Communicator& comm) {
    const int r = comm.rank();
    const int world = comm.size();
    std::vector<float> out(24), in(24, -1.0f);
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(r * 100 + i);
    TensorView send(out.data(), DType::kF32, {2, 3, 4});
    TensorView recv(in.data(), DType::kF32, {2, 3, 4});
    RequestPtr rq = comm.irecv(recv, (r - 1 + world) % world, 1);
    RequestPtr sq = comm.isend(send, (r + 1) % world, 1);
    wait(rq);
    wait(sq);
    const int prev = (r - 1 + world) % world;
    for (size_t i = 0; i < in.size(); ++i) EXPECT_EQ(in[i], static_cast<float>(prev * 100 + i));
  });
}

TEST(InprocCommunicatorTest, TensorOverloadsRejectStridedAndDeviceTensors) {
  InprocWorld world(1);
  std::unique_ptr<Communicator> comm = world.communicator(0);
  std::vector<float> data(24);
  // Every other column of a [4, 6] matrix: not contiguous.
  const int64_t shape[2] = {4, 3};
  const int64_t strides[2] = {6, 2};
  TensorView strided(data.data(), DType::kF32, 2, shape, strides);
  try {
    comm->isend(strided, 0, 0);
    FAIL() << "strided tensor accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(e.message().find("contiguous"), std::string::npos) << e.what();
  }
  EXPECT_THROW(comm->irecv(strided, 0, 0), Error);

  EXPECT_TRUE(comm->accepts(Device::kCPU));
  EXPECT_FALSE(comm->accepts(Device::kCUDA));
  TensorView on_gpu(data.data(), DType::kF32, {24}, Device::kCUDA);
  try {
    comm->irecv(on_gpu, 0, 0);
    FAIL() << "CUDA tensor accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_NE(e.message().find("cuda"), std::string::npos) << e.what();
  }
}

// ---- collectives -----------------------------------------------------------------------------

class InprocCollectiveTest : public ::testing::TestWithParam<int> {};

TEST_P(InprocCollectiveTest, BroadcastsFromEveryRoot) {
  const int world = GetParam();
  run(world, [&](Communicator& comm) {
    for (size_t bytes : {size_t{0}, size_t{1}, (size_t{1} << 20) + 3}) {
      for (int root = 0; root < world; ++root) {
        std::vector<uint8_t> buf(bytes, 0xee);
        if (comm.rank() == root) fill_pattern(buf, root, 17);
        comm.broadcast(buf.data(), bytes, root);
        EXPECT_EQ(count_mismatches(buf, root, 17), 0u) << "root " << root << ", " << bytes;
      }
    }
  });
}

TEST_P(InprocCollectiveTest, AllreducesEveryTypeAndOp) {
  run(GetParam(), [](Communicator& comm) {
    for (size_t count : {size_t{0}, size_t{1}, size_t{1000}}) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
        test::expect_exact_allreduce(comm, op, count);
      }
    }
  });
}

// Inexact sums: every rank gets the same bits, those of the sum in rank order.
TEST_P(InprocCollectiveTest, AllreduceIsBitIdenticalOnEveryRank) {
  const int world = GetParam();
  constexpr size_t kCount = 4099;
  std::vector<std::vector<float>> results(world);
  run(world, [&](Communicator& comm) {
    // Mixed magnitudes and signs: a different summation order changes the rounding of many
    // elements.
    auto input = [](int rank, size_t i) {
      const float scale = rank % 3 == 0 ? 1.0f : rank % 3 == 1 ? 1e3f : 1e-3f;
      return scale * std::sin(static_cast<float>(rank) * 7.3f + static_cast<float>(i) * 0.37f);
    };
    std::vector<float> data(kCount);
    for (size_t i = 0; i < kCount; ++i) data[i] = input(comm.rank(), i);
    comm.allreduce(data.data(), kCount, ReduceType::kF32, ReduceOp::kSum);
    size_t bad = 0;
    for (size_t i = 0; i < kCount; ++i) {
      float expected = input(0, i);
      for (int r = 1; r < comm.size(); ++r) expected += input(r, i);
      bad += data[i] != expected;
    }
    EXPECT_EQ(bad, 0u) << "elements differing from the sum in rank order";
    results[comm.rank()] = std::move(data);
  });
  for (int r = 0; r < world; ++r) ASSERT_EQ(results[r].size(), kCount) << "rank " << r;
  for (int r = 1; r < world; ++r) {
    EXPECT_EQ(std::memcmp(results[r].data(), results[0].data(), kCount * sizeof(float)), 0)
        << "rank " << r;
  }
}

// Nobody leaves barrier k before everybody entered it, over many generations.
TEST_P(InprocCollectiveTest, BarrierHoldsEveryRankUntilAllArrive) {
  const int world = GetParam();
  constexpr int kRounds = 200;
  std::vector<std::atomic<int>> entered(kRounds);
  for (auto& e : entered) e = 0;
  run(world, [&](Communicator& comm) {
    for (int k = 0; k < kRounds; ++k) {
      // Stagger arrivals so a broken barrier has a chance to let someone through early.
      if ((k + comm.rank()) % 7 == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
      entered[k].fetch_add(1);
      comm.barrier();
      EXPECT_EQ(entered[k].load(), world) << "barrier " << k;
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Worlds, InprocCollectiveTest, ::testing::Values(1, 2, 3, 4, 7));

TEST(InprocCommunicatorTest, MismatchedCollectivesFailOnEveryRank) {
  std::atomic<int> failures{0};
  EXPECT_THROW(run(3,
                   [&](Communicator& comm) {
                     int64_t v = 1;
                     try {
                       if (comm.rank() == 2) {
                         comm.broadcast(&v, sizeof(v), 0);
                       } else {
                         comm.allreduce(&v, 1, ReduceType::kI64, ReduceOp::kSum);
                       }
                     } catch (const Error& e) {
                       EXPECT_NE(e.message().find("ranks disagree"), std::string::npos) << e.what();
                       failures.fetch_add(1);
                       throw;
                     }
                   }),
               Error);
  EXPECT_EQ(failures.load(), 3);
}

// ---- failure: abort and timeout --------------------------------------------------------------

// One rank throws while the others block in a receive, a barrier and an allreduce that it will
// never join: run_inproc must return (no hang) and rethrow the original exception.
TEST(InprocCommunicatorTest, FailingRankAbortsTheWorldAndIsRethrown) {
  constexpr int kWorld = 4;
  constexpr int kFailing = 2;
  std::vector<std::string> echoes(kWorld);
  InprocWorld world(kWorld);  // no timeout: only the abort can release the others
  const auto start = std::chrono::steady_clock::now();
  try {
    run_inproc(world, [&](Communicator& comm) {
      const int r = comm.rank();
      if (r == kFailing) {
        std::this_thread::sleep_for(milliseconds(50));  // let the others block first
        throw std::runtime_error("boom on rank 2");
      }
      try {
        int64_t v = 0;
        if (r == 0) {
          RequestPtr recv = comm.irecv(&v, sizeof(v), kFailing, 0);
          wait(recv);
        } else if (r == 1) {
          comm.barrier();
        } else {
          comm.allreduce(&v, 1, ReduceType::kI64, ReduceOp::kSum);
        }
      } catch (const Error& e) {
        echoes[r] = e.message();
        EXPECT_EQ(e.code(), ErrorCode::kInternal);
        throw;
      }
    });
    FAIL() << "run_inproc returned normally";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "boom on rank 2");  // not rank 0's abort echo
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  EXPECT_TRUE(world.aborted());
  for (int r : {0, 1, 3}) {
    EXPECT_NE(echoes[r].find("in-process world aborted: rank 2 failed"), std::string::npos)
        << "rank " << r << ": " << echoes[r];
  }
  // Later operations on the aborted world fail at once.
  std::unique_ptr<Communicator> comm = world.communicator(0);
  EXPECT_THROW(comm->barrier(), Error);
}

TEST(InprocCommunicatorTest, FirstFailureInRankOrderIsRethrown) {
  try {
    run_inproc(3, [](Communicator& comm) {
      RINGATTN_THROW(ErrorCode::kInvalidArgument, "bad input on rank ", comm.rank());
    });
    FAIL() << "run_inproc returned normally";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_EQ(e.message(), "bad input on rank 0");
    EXPECT_EQ(std::string(e.what()), "[rank 0] bad input on rank 0");
  }
}

TEST(InprocCommunicatorTest, TimeoutNamesWhatTheReceiveWaitedFor) {
  InprocWorld world(2, milliseconds(200));
  try {
    run_inproc(world, [](Communicator& comm) {
      if (comm.rank() == 0) {
        int64_t v = 0;
        RequestPtr recv = comm.irecv(&v, sizeof(v), 1, 5);  // rank 1 never sends
        wait(recv);
      }
    });
    FAIL() << "the receive did not time out";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInternal);
    const std::string what = e.what();
    EXPECT_NE(what.find("[rank 0]"), std::string::npos) << what;
    EXPECT_NE(what.find("timed out after 200 ms"), std::string::npos) << what;
    EXPECT_NE(what.find("from rank 1 with tag 5"), std::string::npos) << what;
  }
}

TEST(InprocCommunicatorTest, TimeoutNamesTheRanksMissingFromACollective) {
  InprocWorld world(3, milliseconds(200));
  try {
    run_inproc(world, [](Communicator& comm) {
      if (comm.rank() != 1) comm.barrier();  // rank 1 skips the barrier
    });
    FAIL() << "the barrier did not time out";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("barrier()"), std::string::npos) << what;
    EXPECT_NE(what.find("waiting for rank(s) 1"), std::string::npos) << what;
    EXPECT_NE(what.find("timed out"), std::string::npos) << what;
  }
}

}  // namespace
}  // namespace ringattn
