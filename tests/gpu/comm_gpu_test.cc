// Communicators on device buffers: the in-process communicator with a CUDA world (P virtual
// ranks on one GPU, P in {1, 2, 3, 4, 8}) and the NCCL communicator with one rank (send/recv
// to self in a group, collectives on device and host buffers, group semantics, errors).
// Expected values are derived from (seed, rank, tag, index) so every rank checks its own data
// without talking (nccl-tests style). Every receive buffer is first filled with the bitwise
// complement of what it should receive, so a byte that was never written always fails.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "comm/inproc/inproc_communicator.h"
#include "ringattn/config.h"
#include "ringattn/error.h"
#include "ringattn/tensor.h"
#include "tests/common/test_util.h"
#include "tests/gpu/gpu_test_util.h"

#if RINGATTN_WITH_NCCL
#include "comm/mpi/mpi_session.h"
#include "comm/nccl/nccl_communicator.h"
#endif

namespace ringattn {
namespace {

using std::chrono::milliseconds;

// A deadlock in an in-process test becomes an error naming what was awaited.
constexpr milliseconds kTestTimeout{60000};
constexpr uint32_t kSeed = 0x5eed2024u;

// Test helpers throw (run_inproc rethrows on the main thread) rather than assert: they run
// on the threads that play the ranks.
void cuda_ok(cudaError_t rc, const char* call) {
  if (rc != cudaSuccess) {
    throw std::runtime_error(std::string(call) + " failed: " + cudaGetErrorString(rc));
  }
}
#define CUDA_OK(call) cuda_ok((call), #call)

uint8_t pattern(uint32_t seed, int source, int tag, size_t i) {
  const uint64_t h = (seed ^ (static_cast<uint64_t>(source) * 0x9e3779b97f4a7c15ull)) +
                     static_cast<uint64_t>(tag) * 1000003ull + i * 2654435761ull;
  return static_cast<uint8_t>(h ^ (h >> 13) ^ (h >> 29));
}

std::vector<uint8_t> expected_bytes(size_t bytes, int source, int tag) {
  std::vector<uint8_t> v(bytes);
  for (size_t i = 0; i < bytes; ++i) v[i] = pattern(kSeed, source, tag, i);
  return v;
}

// The complement of what a buffer should end up holding: every unwritten byte mismatches.
std::vector<uint8_t> poison_of(const std::vector<uint8_t>& expected) {
  std::vector<uint8_t> v(expected.size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint8_t>(~expected[i]);
  return v;
}

size_t mismatches(const std::vector<uint8_t>& got, const std::vector<uint8_t>& expected) {
  size_t bad = got.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < std::min(got.size(), expected.size()); ++i) bad += got[i] != expected[i];
  return bad;
}

// cudaMalloc'ed bytes with synchronous upload/download. An upload waits for its DMA (a
// pageable cudaMemcpy may return before it landed, and the communicators' streams do not wait
// for the legacy stream); downloads follow a wait(), which completed the transfer.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) CUDA_OK(cudaMalloc(&data_, bytes));
  }
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFree(data_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  void upload(const void* host) {
    if (bytes_ == 0) return;
    CUDA_OK(cudaMemcpy(data_, host, bytes_, cudaMemcpyHostToDevice));
    CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
  }
  void upload(const std::vector<uint8_t>& host) { upload(host.data()); }
  void download(void* host) const {
    if (bytes_ > 0) CUDA_OK(cudaMemcpy(host, data_, bytes_, cudaMemcpyDeviceToHost));
  }
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> v(bytes_);
    download(v.data());
    return v;
  }

 private:
  void* data_ = nullptr;
  size_t bytes_;
};

// Allreduce of `count` elements of T in a device (or host) buffer; returns the mismatches.
template <typename T>
size_t check_allreduce(Communicator& comm, ReduceType type, ReduceOp op, size_t count,
                       bool on_device) {
  std::vector<T> data = test::allreduce_input<T>(comm.rank(), count);
  const std::vector<T> expected = test::allreduce_expected<T>(comm.size(), op, count);
  if (on_device) {
    DeviceBuffer buf(count * sizeof(T));
    buf.upload(data.data());
    comm.allreduce(buf.data(), count, type, op);
    buf.download(data.data());
  } else {
    comm.allreduce(data.data(), count, type, op);
  }
  size_t bad = 0;
  for (size_t i = 0; i < count; ++i) bad += data[i] != expected[i];
  return bad;
}

void run_cuda_world(int world, const std::function<void(Communicator&)>& fn) {
  InprocWorld w(world, kTestTimeout, Device::kCUDA, 0);
  run_inproc(w, fn);
}

// ---- in-process ranks on one GPU -------------------------------------------------------------

class InprocCudaTest : public ::testing::TestWithParam<int> {};

TEST_P(InprocCudaTest, WorldTakesDeviceAndHostBuffers) {
  RINGATTN_REQUIRE_GPU();
  InprocWorld world(GetParam(), kTestTimeout, Device::kCUDA, 0);
  EXPECT_EQ(world.device(), Device::kCUDA);
  EXPECT_EQ(world.device_index(), 0);
  std::unique_ptr<Communicator> comm = world.communicator(0);
  EXPECT_TRUE(comm->accepts(Device::kCUDA));
  EXPECT_TRUE(comm->accepts(Device::kCPU));
  EXPECT_STREQ(comm->name(), "inproc");
}

// The ring pass of P-1 steps on device buffers: at step s rank r holds the block of rank r-s.
// Receives posted before the sends (direct copy into the posted buffer).
TEST_P(InprocCudaTest, PassesDeviceBlocksAroundTheRing) {
  RINGATTN_REQUIRE_GPU();
  const int world = GetParam();
  for (size_t bytes : {size_t{1}, size_t{4099}, size_t{1} << 20}) {
    run_cuda_world(world, [&](Communicator& comm) {
      const int r = comm.rank();
      DeviceBuffer a(bytes), b(bytes);
      DeviceBuffer* current = &a;
      DeviceBuffer* spare = &b;
      current->upload(expected_bytes(bytes, r, 0));
      for (int step = 1; step < world; ++step) {
        const int owner = ((r - step) % world + world) % world;
        const std::vector<uint8_t> expected = expected_bytes(bytes, owner, 0);
        spare->upload(poison_of(expected));
        RequestPtr recv = comm.irecv(spare->data(), bytes, (r - 1 + world) % world, step);
        RequestPtr send = comm.isend(current->data(), bytes, (r + 1) % world, step);
        wait(recv);
        wait(send);
        EXPECT_EQ(mismatches(spare->download(), expected), 0u)
            << "rank " << r << ", step " << step << ", " << bytes << " bytes";
        std::swap(current, spare);
      }
    });
  }
}

// Sends that happen before their receive is posted are staged (in device memory where the
// device has a stream-ordered allocator) and delivered later, in order per tag.
TEST_P(InprocCudaTest, DeliversDeviceMessagesSentBeforeTheReceive) {
  RINGATTN_REQUIRE_GPU();
  const int world = GetParam();
  constexpr int kTags = 3;
  constexpr size_t kBytes = (size_t{1} << 18) + 7;
  run_cuda_world(world, [&](Communicator& comm) {
    const int r = comm.rank();
    const int next = (r + 1) % world;
    const int prev = (r - 1 + world) % world;
    std::vector<std::unique_ptr<DeviceBuffer>> send, recv;
    std::vector<RequestPtr> requests;
    for (int tag = 0; tag < kTags; ++tag) {
      send.push_back(std::make_unique<DeviceBuffer>(kBytes));
      send.back()->upload(expected_bytes(kBytes, r, tag));
      requests.push_back(comm.isend(send.back()->data(), kBytes, next, tag));
    }
    for (RequestPtr& q : requests) wait(q);
    // Eager: the payload was copied at isend; overwriting the send buffers must not matter.
    for (auto& b : send) b->upload(std::vector<uint8_t>(kBytes, 0x11));
    comm.barrier();  // every send happened before any receive below is posted
    requests.clear();
    for (int tag = kTags - 1; tag >= 0; --tag) {
      recv.push_back(std::make_unique<DeviceBuffer>(kBytes));
      recv.back()->upload(poison_of(expected_bytes(kBytes, prev, tag)));
      requests.push_back(comm.irecv(recv.back()->data(), kBytes, prev, tag));
    }
    for (RequestPtr& q : requests) wait(q);
    for (int i = 0; i < kTags; ++i) {
      const int tag = kTags - 1 - i;
      EXPECT_EQ(mismatches(recv[i]->download(), expected_bytes(kBytes, prev, tag)), 0u)
          << "rank " << r << ", tag " << tag;
    }
  });
}

// Host and device buffers may meet: a host send into a device receive and back.
TEST_P(InprocCudaTest, MixesHostAndDeviceBuffers) {
  RINGATTN_REQUIRE_GPU();
  const int world = GetParam();
  constexpr size_t kBytes = 10007;
  run_cuda_world(world, [&](Communicator& comm) {
    const int r = comm.rank();
    const int next = (r + 1) % world;
    const int prev = (r - 1 + world) % world;
    // Step 1: host -> device.
    std::vector<uint8_t> host_send = expected_bytes(kBytes, r, 1);
    const std::vector<uint8_t> expected1 = expected_bytes(kBytes, prev, 1);
    DeviceBuffer dev_recv(kBytes);
    dev_recv.upload(poison_of(expected1));
    RequestPtr a = comm.irecv(dev_recv.data(), kBytes, prev, 1);
    RequestPtr b = comm.isend(host_send.data(), kBytes, next, 1);
    wait(a);
    wait(b);
    EXPECT_EQ(mismatches(dev_recv.download(), expected1), 0u) << "host -> device, rank " << r;
    // Step 2: device -> host, through the tensor overloads.
    DeviceBuffer dev_send(kBytes);
    dev_send.upload(expected_bytes(kBytes, r, 2));
    const std::vector<uint8_t> expected2 = expected_bytes(kBytes, prev, 2);
    std::vector<uint8_t> host_recv = poison_of(expected2);
    TensorView send_view(dev_send.data(), DType::kF16, {1, static_cast<int64_t>(kBytes / 2)},
                         Device::kCUDA);
    RequestPtr c = comm.irecv(host_recv.data(), kBytes, prev, 2);
    RequestPtr d = comm.isend(dev_send.data(), kBytes, next, 2);
    wait(c);
    wait(d);
    EXPECT_EQ(mismatches(host_recv, expected2), 0u) << "device -> host, rank " << r;
    EXPECT_EQ(send_view.nbytes(), kBytes - 1);
    std::vector<uint8_t> tensor_expected = expected_bytes(kBytes, prev, 2);
    tensor_expected.resize(kBytes - 1);
    DeviceBuffer tensor_recv(kBytes - 1);
    tensor_recv.upload(poison_of(tensor_expected));
    TensorView recv_view(tensor_recv.data(), DType::kF16, {1, static_cast<int64_t>(kBytes / 2)},
                         Device::kCUDA);
    RequestPtr e = comm.irecv(recv_view, prev, 3);
    RequestPtr f = comm.isend(send_view, next, 3);
    wait(e);
    wait(f);
    EXPECT_EQ(mismatches(tensor_recv.download(), tensor_expected), 0u) << "tensors, rank " << r;
  });
}

TEST_P(InprocCudaTest, BroadcastsDeviceAndHostBuffersFromEveryRoot) {
  RINGATTN_REQUIRE_GPU();
  const int world = GetParam();
  run_cuda_world(world, [&](Communicator& comm) {
    const int r = comm.rank();
    for (size_t bytes : {size_t{1}, (size_t{1} << 20) + 3}) {
      for (int root = 0; root < world; ++root) {
        const std::vector<uint8_t> expected = expected_bytes(bytes, root, 17);
        // All device.
        DeviceBuffer buf(bytes);
        buf.upload(r == root ? expected : poison_of(expected));
        comm.broadcast(buf.data(), bytes, root);
        EXPECT_EQ(mismatches(buf.download(), expected), 0u)
            << "device, root " << root << ", rank " << r << ", " << bytes << " bytes";
        // Root on the device, the others on the host (and the other way round).
        std::vector<uint8_t> host = r == root ? expected : poison_of(expected);
        if (r == root) {
          comm.broadcast(buf.data(), bytes, root);
        } else {
          comm.broadcast(host.data(), bytes, root);
          EXPECT_EQ(mismatches(host, expected), 0u)
              << "device root -> host, root " << root << ", rank " << r;
        }
        host = r == root ? expected : poison_of(expected);
        buf.upload(poison_of(expected));
        if (r == root) {
          comm.broadcast(host.data(), bytes, root);
        } else {
          comm.broadcast(buf.data(), bytes, root);
          EXPECT_EQ(mismatches(buf.download(), expected), 0u)
              << "host root -> device, root " << root << ", rank " << r;
        }
      }
    }
  });
}

TEST_P(InprocCudaTest, AllreducesDeviceAndHostBuffers) {
  RINGATTN_REQUIRE_GPU();
  run_cuda_world(GetParam(), [](Communicator& comm) {
    for (bool on_device : {true, false}) {
      for (size_t count : {size_t{1}, size_t{1000}}) {
        for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
          const std::string where = std::string(on_device ? "device" : "host") + ", " +
                                    test::op_name(op) + ", count " + std::to_string(count);
          EXPECT_EQ(check_allreduce<float>(comm, ReduceType::kF32, op, count, on_device), 0u)
              << "f32, " << where;
          EXPECT_EQ(check_allreduce<double>(comm, ReduceType::kF64, op, count, on_device), 0u)
              << "f64, " << where;
          EXPECT_EQ(check_allreduce<int64_t>(comm, ReduceType::kI64, op, count, on_device), 0u)
              << "i64, " << where;
        }
      }
    }
    comm.barrier();
  });
}

// One rank throws while the others block on device transfers and collectives it never joins:
// run_inproc returns (no hang) and rethrows the original exception.
TEST_P(InprocCudaTest, AbortedWorldDoesNotHang) {
  RINGATTN_REQUIRE_GPU();
  const int world = GetParam();
  const int failing = world - 1;
  InprocWorld w(world, milliseconds::zero(), Device::kCUDA, 0);  // only the abort can release
  const auto start = std::chrono::steady_clock::now();
  try {
    run_inproc(w, [&](Communicator& comm) {
      const int r = comm.rank();
      if (r == failing) {
        std::this_thread::sleep_for(milliseconds(50));  // let the others block first
        throw std::runtime_error("boom on the last rank");
      }
      DeviceBuffer buf(64);
      if (r % 3 == 0) {
        RequestPtr recv = comm.irecv(buf.data(), buf.bytes(), failing, 0);
        wait(recv);
      } else if (r % 3 == 1) {
        comm.barrier();
      } else {
        comm.allreduce(buf.data(), 8, ReduceType::kI64, ReduceOp::kSum);
      }
    });
    FAIL() << "run_inproc returned normally";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "boom on the last rank");
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  EXPECT_TRUE(w.aborted());
}

INSTANTIATE_TEST_SUITE_P(Worlds, InprocCudaTest, ::testing::Values(1, 2, 3, 4, 8));

TEST(InprocCudaWorldTest, RejectsADeviceIndexThatDoesNotExist) {
  RINGATTN_REQUIRE_GPU();
  int count = 0;
  CUDA_OK(cudaGetDeviceCount(&count));
  try {
    InprocWorld world(2, milliseconds::zero(), Device::kCUDA, count);
    FAIL() << "device " << count << " of " << count << " accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(e.message().find("device index"), std::string::npos) << e.what();
  }
}

#if RINGATTN_WITH_NCCL

// ---- NCCL, one rank --------------------------------------------------------------------------

std::unique_ptr<NcclCommunicator> one_rank_nccl() {
  return std::make_unique<NcclCommunicator>(NcclCommunicator::new_unique_id(), 1, 0, 0);
}

TEST(NcclCommunicatorTest, DescribesItself) {
  RINGATTN_REQUIRE_GPU();
  std::unique_ptr<NcclCommunicator> comm = one_rank_nccl();
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->size(), 1);
  EXPECT_STREQ(comm->name(), "nccl");
  EXPECT_TRUE(comm->accepts(Device::kCUDA));
  EXPECT_FALSE(comm->accepts(Device::kCPU));
  EXPECT_EQ(comm->device(), 0);
  EXPECT_NE(comm->stream(), nullptr);
}

// Several messages to self in one group: they match in posting order (NCCL has no tags).
TEST(NcclCommunicatorTest, SendsToSelfInAGroup) {
  RINGATTN_REQUIRE_GPU();
  std::unique_ptr<NcclCommunicator> comm = one_rank_nccl();
  const std::vector<size_t> sizes = {1, 4099, size_t{1} << 20, (size_t{1} << 22) + 5};
  for (int round = 0; round < 3; ++round) {
    std::vector<std::unique_ptr<DeviceBuffer>> send, recv;
    std::vector<RequestPtr> requests;
    comm->group_start();
    for (size_t i = 0; i < sizes.size(); ++i) {
      const int tag = round * 10 + static_cast<int>(i);
      const std::vector<uint8_t> expected = expected_bytes(sizes[i], 0, tag);
      send.push_back(std::make_unique<DeviceBuffer>(sizes[i]));
      send.back()->upload(expected);
      recv.push_back(std::make_unique<DeviceBuffer>(sizes[i]));
      recv.back()->upload(poison_of(expected));
      requests.push_back(comm->irecv(recv.back()->data(), sizes[i], 0, tag));
      requests.push_back(comm->isend(send.back()->data(), sizes[i], 0, tag));
    }
    comm->group_end();
    for (RequestPtr& q : requests) wait(q);
    for (RequestPtr& q : requests) EXPECT_TRUE(q->test());
    for (RequestPtr& q : requests) q->wait();  // idempotent
    for (size_t i = 0; i < sizes.size(); ++i) {
      const int tag = round * 10 + static_cast<int>(i);
      EXPECT_EQ(mismatches(recv[i]->download(), expected_bytes(sizes[i], 0, tag)), 0u)
          << "round " << round << ", message " << i;
    }
  }
}

// The stream contract: data produced on another stream is ordered before the send by making
// the communicator's stream wait on an event; the receive is complete after wait().
TEST(NcclCommunicatorTest, OrdersAfterAnEventOfTheProducer) {
  RINGATTN_REQUIRE_GPU();
  std::unique_ptr<NcclCommunicator> comm = one_rank_nccl();
  constexpr size_t kBytes = size_t{8} << 20;
  DeviceBuffer send(kBytes), recv(kBytes);
  recv.upload(std::vector<uint8_t>(kBytes, 0x00));
  cudaStream_t producer = nullptr;
  cudaEvent_t ready = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&producer, cudaStreamNonBlocking));
  CUDA_OK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
  CUDA_OK(cudaMemsetAsync(send.data(), 0x5a, kBytes, producer));
  CUDA_OK(cudaEventRecord(ready, producer));
  CUDA_OK(cudaStreamWaitEvent(comm->stream(), ready, 0));
  {
    CommGroup group(*comm);
    RequestPtr r = comm->irecv(recv.data(), kBytes, 0, 0);
    RequestPtr s = comm->isend(send.data(), kBytes, 0, 0);
    group.end();
    wait(r);
    wait(s);
  }
  EXPECT_EQ(mismatches(recv.download(), std::vector<uint8_t>(kBytes, 0x5a)), 0u);
  CUDA_OK(cudaEventDestroy(ready));
  CUDA_OK(cudaStreamDestroy(producer));
}

TEST(NcclCommunicatorTest, WaitInsideAnOpenGroupIsAnError) {
  RINGATTN_REQUIRE_GPU();
  std::unique_ptr<NcclCommunicator> comm = one_rank_nccl();
  constexpr size_t kBytes = 4096;
  const std::vector<uint8_t> expected = expected_bytes(kBytes, 0, 5);
  DeviceBuffer send(kBytes), recv(kBytes);
  send.upload(expected);
  recv.upload(poison_of(expected));
  comm->group_start();
  comm->group_start();  // nested: only the outermost group_end launches
  RequestPtr r = comm->irecv(recv.data(), kBytes, 0, 5);
  RequestPtr s = comm->isend(send.data(), kBytes, 0, 5);
  comm->group_end();
  for (RequestPtr* q : {&r, &s}) {
    try {
      (*q)->wait();
      ADD_FAILURE() << "wait() inside an open group returned";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(e.message().find("group_end()"), std::string::npos) << e.what();
    }
    EXPECT_THROW((*q)->test(), Error);
  }
  // Collectives cannot join a group of point-to-point operations.
  int64_t v = 1;
  try {
    comm->allreduce(&v, 1, ReduceType::kI64, ReduceOp::kSum);
    ADD_FAILURE() << "allreduce inside an open group returned";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(e.message().find("inside a group"), std::string::npos) << e.what();
  }
  comm->group_end();
  wait(r);
  wait(s);
  EXPECT_EQ(mismatches(recv.download(), expected), 0u);
  try {
    comm->group_end();
    FAIL() << "group_end without group_start accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  }
  comm->barrier();  // still usable
}

// Requests keep the communicator's state alive: they may be waited after it was destroyed.
TEST(NcclCommunicatorTest, RequestsOutliveTheCommunicator) {
  RINGATTN_REQUIRE_GPU();
  constexpr size_t kBytes = 1 << 16;
  const std::vector<uint8_t> expected = expected_bytes(kBytes, 0, 1);
  DeviceBuffer send(kBytes), recv(kBytes);
  send.upload(expected);
  recv.upload(poison_of(expected));
  RequestPtr r, s;
  {
    std::unique_ptr<NcclCommunicator> comm = one_rank_nccl();
    comm->group_start();
    r = comm->irecv(recv.data(), kBytes, 0, 1);
    s = comm->isend(send.data(), kBytes, 0, 1);
    comm->group_end();
  }
  wait(r);
  wait(s);
  EXPECT_EQ(mismatches(recv.download(), expected), 0u);
}

TEST(NcclCommunicatorTest, RejectsHostBuffersAndBadPeers) {
  RINGATTN_REQUIRE_GPU();
  std::unique_ptr<NcclCommunicator> comm = one_rank_nccl();
  std::vector<uint8_t> host(64, 1);
  for (bool is_send : {true, false}) {
    try {
      if (is_send) {
        comm->isend(host.data(), host.size(), 0, 0);
      } else {
        comm->irecv(host.data(), host.size(), 0, 0);
      }
      ADD_FAILURE() << "host buffer accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
      EXPECT_NE(e.message().find("device buffer"), std::string::npos) << e.what();
    }
  }
  TensorView host_tensor(host.data(), DType::kF32, {16});
  try {
    comm->isend(host_tensor, 0, 0);
    ADD_FAILURE() << "host tensor accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
  }
  DeviceBuffer buf(64);
  try {
    comm->isend(buf.data(), 64, 1, 0);
    ADD_FAILURE() << "peer 1 accepted in a world of 1";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(e.message().find("found 1"), std::string::npos) << e.what();
  }
  EXPECT_THROW(comm->irecv(buf.data(), 64, 0, -1), Error);
  EXPECT_THROW(comm->broadcast(buf.data(), 64, 1), Error);
  // Zero bytes: complete at once, no NCCL call, null buffers allowed.
  RequestPtr empty = comm->isend(nullptr, 0, 0, 0);
  EXPECT_TRUE(empty->test());
  // None of the rejected calls left a group open or the communicator failed.
  int64_t v = 3;
  comm->allreduce(&v, 1, ReduceType::kI64, ReduceOp::kSum);
  EXPECT_EQ(v, 3);
}

// One rank: a broadcast leaves the data as it was, an allreduce reduces one contribution. Both
// through device buffers and through host buffers (staged), with more than one chunk.
TEST(NcclCommunicatorTest, BroadcastsDeviceAndHostBuffers) {
  RINGATTN_REQUIRE_GPU();
  std::unique_ptr<NcclCommunicator> comm = one_rank_nccl();
  for (size_t bytes : {size_t{1}, size_t{1000}, NcclCommunicator::kChunkBytes + 3}) {
    const std::vector<uint8_t> expected = expected_bytes(bytes, 0, 9);
    DeviceBuffer buf(bytes);
    buf.upload(expected);
    comm->broadcast(buf.data(), bytes, 0);
    EXPECT_EQ(mismatches(buf.download(), expected), 0u) << "device, " << bytes << " bytes";
    std::vector<uint8_t> host = expected;
    comm->broadcast(host.data(), bytes, 0);
    EXPECT_EQ(mismatches(host, expected), 0u) << "host, " << bytes << " bytes";
  }
  comm->broadcast(nullptr, 0, 0);
}

TEST(NcclCommunicatorTest, AllreducesDeviceAndHostBuffers) {
  RINGATTN_REQUIRE_GPU();
  std::unique_ptr<NcclCommunicator> comm = one_rank_nccl();
  for (bool on_device : {true, false}) {
    for (size_t count : {size_t{1}, size_t{1000}}) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
        const std::string where = std::string(on_device ? "device" : "host") + ", " +
                                  test::op_name(op) + ", count " + std::to_string(count);
        EXPECT_EQ(check_allreduce<float>(*comm, ReduceType::kF32, op, count, on_device), 0u)
            << "f32, " << where;
        EXPECT_EQ(check_allreduce<double>(*comm, ReduceType::kF64, op, count, on_device), 0u)
            << "f64, " << where;
        EXPECT_EQ(check_allreduce<int64_t>(*comm, ReduceType::kI64, op, count, on_device), 0u)
            << "i64, " << where;
      }
    }
  }
  // More than one chunk of host data.
  const size_t count = NcclCommunicator::kChunkBytes / sizeof(double) + 5;
  EXPECT_EQ(check_allreduce<double>(*comm, ReduceType::kF64, ReduceOp::kSum, count, false), 0u);
  comm->allreduce(nullptr, 0, ReduceType::kF32, ReduceOp::kSum);
  comm->barrier();
}

TEST(NcclCommunicatorTest, AbortedCommunicatorRejectsEveryCall) {
  RINGATTN_REQUIRE_GPU();
  std::unique_ptr<NcclCommunicator> comm = one_rank_nccl();
  comm->barrier();
  comm->abort();
  comm->abort();  // idempotent
  DeviceBuffer buf(64);
  try {
    comm->isend(buf.data(), 64, 0, 0);
    FAIL() << "isend on an aborted communicator";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNccl);
    EXPECT_NE(e.message().find("aborted"), std::string::npos) << e.what();
  }
  EXPECT_THROW(comm->barrier(), Error);
}

// The MPI bootstrap: a one-process MPI job (singleton init) picks local rank 0's GPU.
TEST(NcclCommunicatorTest, MpiFactoryPicksTheNodeLocalGpu) {
  RINGATTN_REQUIRE_GPU();
  static MpiSession session;  // MPI can be initialised once per process: keep it to the end
  std::unique_ptr<Communicator> comm = make_nccl_communicator(MPI_COMM_WORLD);
  EXPECT_EQ(comm->size(), session.world_size());
  EXPECT_EQ(comm->rank(), session.world_rank());
  int device = -1;
  CUDA_OK(cudaGetDevice(&device));
  EXPECT_EQ(device, session.local_rank());
  int64_t v = 1;
  comm->allreduce(&v, 1, ReduceType::kI64, ReduceOp::kSum);
  EXPECT_EQ(v, session.world_size());
}

#endif  // RINGATTN_WITH_NCCL

}  // namespace
}  // namespace ringattn
