#include "comm/nccl/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>

#include "comm/mpi/mpi_communicator.h"
#include "ringattn/error.h"

namespace ringattn {
namespace detail {
namespace {

static_assert(sizeof(ncclUniqueId) == std::tuple_size<NcclCommunicator::UniqueId>::value,
              "NcclCommunicator::UniqueId must hold exactly an ncclUniqueId");

// How long the destructor of an unwaited request waits for its operation before it gives up
// (as MpiCommunicator does): an NCCL operation cannot be cancelled, and a failing peer may
// never post the matching call.
constexpr std::chrono::seconds kAbandonAfter{5};
// Polling: yield this many times before sleeping between queries (a wait on a transfer that
// is almost done should not pay a sleep; a long one should not burn a core).
constexpr int kSpinsBeforeSleep = 2000;
constexpr std::chrono::microseconds kPollSleep{20};

// NCCL groups are per thread and nest across communicators: an ncclGroupEnd inside another
// communicator's open group launches nothing, so the event recorded after it would complete
// at once. Counting our open groups per thread turns that misuse into an error.
thread_local int t_open_groups = 0;

std::string cuda_text(cudaError_t rc) {
  return str_cat(cudaGetErrorName(rc), ": ", cudaGetErrorString(rc));
}

std::string with_context(const char* call, const std::string& context) {
  return context.empty() ? std::string(call) : str_cat(call, " (", context, ")");
}

// Throws Error(kCuda) for a failed CUDA call. Clears CUDA's last-error slot first so that a
// non-sticky failure here is not reported again by an unrelated later check.
void check_cuda(cudaError_t rc, const char* call, const std::string& context = std::string()) {
  if (rc == cudaSuccess) return;
  cudaGetLastError();
  RINGATTN_THROW(ErrorCode::kCuda, "nccl communicator: ", with_context(call, context),
                 " failed: ", cuda_text(rc));
}

ncclDataType_t nccl_type(ReduceType type) {
  switch (type) {
    case ReduceType::kF32:
      return ncclFloat32;
    case ReduceType::kF64:
      return ncclFloat64;
    case ReduceType::kI64:
      return ncclInt64;
  }
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "nccl allreduce: unknown reduce type ",
                 static_cast<int>(type));
}

size_t reduce_type_size(ReduceType type) {
  return type == ReduceType::kF32 ? sizeof(float) : sizeof(int64_t);
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "nccl allreduce: unknown reduce op ",
                 static_cast<int>(op));
}

// Makes `device` current for the scope and restores the caller's device after (never throws
// on the way out).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
    device_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  int device_ = 0;
};

// The operations of one NCCL group. Their completion is a single event recorded on the
// communicator's stream right after ncclGroupEnd launched them.
struct Launch {
  enum class Status { kOpen, kLaunched, kFailed };
  Status status = Status::kOpen;
  cudaEvent_t event = nullptr;
  bool complete = false;
  ErrorCode failure_code = ErrorCode::kNccl;  // kFailed: what every wait()/test() throws
  std::string failure;

  Launch() = default;
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;
  ~Launch() {
    // Safe while the event is still pending: CUDA releases it once it completed.
    if (event != nullptr) cudaEventDestroy(event);
  }
};

struct P2p {
  bool is_recv = false;
  size_t bytes = 0;
  int peer = 0;
  int tag = 0;
  std::string describe() const {
    return str_cat(is_recv ? "irecv of " : "isend of ", bytes,
                   is_recv ? " bytes from peer " : " bytes to peer ", peer, " (tag ", tag, ")");
  }
};

class CompletedRequest final : public Request {
 public:
  void wait() override {}
  bool test() override { return true; }
};

}  // namespace

class NcclState : public std::enable_shared_from_this<NcclState> {
 public:
  NcclState(const NcclCommunicator::UniqueId& id, int nranks, int rank, int device);
  ~NcclState();
  NcclState(const NcclState&) = delete;
  NcclState& operator=(const NcclState&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }

  RequestPtr post(const P2p& op, void* data);
  void broadcast(void* data, size_t bytes, int root);
  void allreduce(void* data, size_t count, ReduceType type, ReduceOp op);
  void barrier();
  void group_start();
  void group_end();
  void abort() noexcept;

  void wait(Launch& launch, const P2p& op);
  bool test(Launch& launch, const P2p& op);
  void abandon(Launch& launch, const P2p& op) noexcept;

 private:
  // Throws Error(kNccl) naming the call, NCCL's error string and its last error text, and
  // marks the communicator failed.
  void check_nccl(ncclResult_t rc, const char* call, const std::string& context);
  // Throws when the communicator was aborted or an earlier NCCL/CUDA failure marked it failed.
  void check_usable(const std::string& what) const;
  // A failure of a CUDA call that involves NCCL's stream: the communicator cannot be trusted
  // any more (sticky errors, or an operation that never completed).
  [[noreturn]] void fail_cuda(cudaError_t rc, const char* call, const std::string& what);
  void check_async_error(const std::string& what);
  // Polls `event`: true once it completed; with `block`, until then. Throws on abort, on an
  // asynchronous NCCL error and on a failed query.
  bool poll(cudaEvent_t event, const std::string& what, bool block);
  // fail_cuda unless rc is cudaSuccess.
  void check_stream_cuda(cudaError_t rc, const char* call, const std::string& what) {
    if (rc != cudaSuccess) fail_cuda(rc, call, what);
  }
  void synchronize(const std::string& what);
  void check_collective(const std::string& what) const;
  bool is_device_memory(const void* p, const std::string& what) const;
  void* reserve_scratch(size_t bytes);

  int rank_ = 0;
  int size_ = 0;
  int device_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t sync_event_ = nullptr;  // completion of the blocking collectives
  void* scratch_ = nullptr;           // host data of collectives is staged here
  size_t scratch_bytes_ = 0;

  int group_depth_ = 0;
  int group_ops_ = 0;  // NCCL operations posted in the open group
  std::shared_ptr<Launch> open_launch_;

  std::string failure_;  // non-empty: a call failed; every later call throws this
  std::atomic<bool> aborted_{false};
  std::mutex comm_mu_;  // comm_ against abort() from another thread
};

NcclState::NcclState(const NcclCommunicator::UniqueId& id, int nranks, int rank, int device)
    : rank_(rank), size_(nranks), device_(device) {
  RINGATTN_CHECK(nranks >= 1, "NcclCommunicator: expected nranks >= 1, found ", nranks);
  RINGATTN_CHECK(rank >= 0 && rank < nranks, "NcclCommunicator: expected rank in [0, ", nranks,
                 "), found ", rank);
  RINGATTN_CHECK(device >= 0, "NcclCommunicator: expected device >= 0, found ", device);
  int count = 0;
  const cudaError_t count_rc = cudaGetDeviceCount(&count);
  if (count_rc != cudaSuccess) {
    cudaGetLastError();
    RINGATTN_THROW(ErrorCode::kCuda, "NcclCommunicator: expected a CUDA device, found none (",
                   "cudaGetDeviceCount: ", cuda_text(count_rc), ")");
  }
  RINGATTN_CHECK(device < count, "NcclCommunicator: expected device in [0, ", count, "), found ",
                 device);
  DeviceGuard guard(device);
  try {
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
               "cudaStreamCreateWithFlags");
    check_cuda(cudaEventCreateWithFlags(&sync_event_, cudaEventDisableTiming),
               "cudaEventCreateWithFlags");
    ncclUniqueId nccl_id;
    std::memcpy(nccl_id.internal, id.data(), sizeof(nccl_id.internal));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 1;
    check_nccl(ncclCommInitRankConfig(&comm_, nranks, nccl_id, rank, &config),
               "ncclCommInitRankConfig",
               str_cat("rank ", rank, " of ", nranks, ", device ", device));
  } catch (...) {
    // The destructor does not run for a constructor that throws.
    if (sync_event_ != nullptr) cudaEventDestroy(sync_event_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    throw;
  }
}

NcclState::~NcclState() {
  // Never throws: every result below is deliberately ignored.
  int previous = -1;
  cudaGetDevice(&previous);
  cudaSetDevice(device_);
  {
    std::lock_guard<std::mutex> lock(comm_mu_);
    if (comm_ != nullptr) {
      // Leave NCCL's per-thread group if an exception skipped our group_end.
      if (group_depth_ > 0) {
        ncclGroupEnd();
        --t_open_groups;
      }
      const bool idle =
          failure_.empty() && group_depth_ == 0 && cudaStreamQuery(stream_) == cudaSuccess;
      if (idle) {
        ncclCommDestroy(comm_);
      } else {
        // Pending operations may wait for peers that never come: do not flush them.
        ncclCommAbort(comm_);
      }
      comm_ = nullptr;
    }
  }
  if (scratch_ != nullptr) cudaFree(scratch_);
  if (sync_event_ != nullptr) cudaEventDestroy(sync_event_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  cudaGetLastError();
  if (previous >= 0) cudaSetDevice(previous);
}

void NcclState::check_nccl(ncclResult_t rc, const char* call, const std::string& context) {
  if (rc == ncclSuccess) return;
  const char* last = ncclGetLastError(comm_);
  std::string message =
      str_cat("nccl ", with_context(call, context), " failed: ", ncclGetErrorString(rc));
  if (last != nullptr && last[0] != '\0') message += str_cat(" (", last, ")");
  if (failure_.empty()) failure_ = message;
  RINGATTN_THROW(ErrorCode::kNccl, message);
}

void NcclState::check_usable(const std::string& what) const {
  if (aborted_.load()) {
    RINGATTN_THROW(ErrorCode::kNccl, "nccl ", what, ": the communicator was aborted");
  }
  if (!failure_.empty()) {
    RINGATTN_THROW(ErrorCode::kNccl, "nccl ", what,
                   ": the communicator failed earlier: ", failure_);
  }
}

void NcclState::fail_cuda(cudaError_t rc, const char* call, const std::string& what) {
  cudaGetLastError();
  std::string message = str_cat("nccl ", what, ": ", call, " failed: ", cuda_text(rc));
  if (failure_.empty()) failure_ = message;
  RINGATTN_THROW(ErrorCode::kCuda, message);
}

void NcclState::check_async_error(const std::string& what) {
  std::lock_guard<std::mutex> lock(comm_mu_);
  if (comm_ == nullptr) return;  // aborted: check_usable reports it
  ncclResult_t async = ncclSuccess;
  check_nccl(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError", what);
  if (async != ncclSuccess && async != ncclInProgress) {
    check_nccl(async, "asynchronous NCCL operation", what);
  }
}

bool NcclState::poll(cudaEvent_t event, const std::string& what, bool block) {
  for (int spins = 0;; ++spins) {
    check_usable(what);
    const cudaError_t rc = cudaEventQuery(event);
    if (rc == cudaSuccess) return true;
    if (rc != cudaErrorNotReady) fail_cuda(rc, "cudaEventQuery", what);
    check_async_error(what);
    if (!block) return false;
    if (spins < kSpinsBeforeSleep) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(kPollSleep);
    }
  }
}

void NcclState::synchronize(const std::string& what) {
  check_stream_cuda(cudaEventRecord(sync_event_, stream_), "cudaEventRecord", what);
  poll(sync_event_, what, true);
}

void NcclState::check_collective(const std::string& what) const {
  check_usable(what);
  // Inside a group the collective would only be queued: its blocking wait would return
  // before the data moved.
  RINGATTN_CHECK(group_depth_ == 0, "nccl ", what,
                 ": collectives cannot be called inside a group (group_start() without "
                 "group_end())");
  RINGATTN_CHECK(t_open_groups == 0, "nccl ", what,
                 ": another NCCL communicator has a group open on this thread");
}

bool NcclState::is_device_memory(const void* p, const std::string& what) const {
  cudaPointerAttributes attributes{};
  const cudaError_t rc = cudaPointerGetAttributes(&attributes, p);
  if (rc == cudaErrorInvalidValue) {
    // CUDA before 11 reported plain host memory this way.
    cudaGetLastError();
    return false;
  }
  check_cuda(rc, "cudaPointerGetAttributes", what);
  if (attributes.type == cudaMemoryTypeManaged) return true;
  if (attributes.type != cudaMemoryTypeDevice) return false;
  RINGATTN_CHECK(attributes.device == device_, "nccl ", what, ": expected memory of CUDA device ",
                 device_, " (this communicator's), found memory of device ", attributes.device);
  return true;
}

void* NcclState::reserve_scratch(size_t bytes) {
  if (bytes <= scratch_bytes_) return scratch_;
  // Collectives synchronise before they return, so the old buffer is idle.
  if (scratch_ != nullptr) {
    void* old = scratch_;
    scratch_ = nullptr;
    scratch_bytes_ = 0;
    check_cuda(cudaFree(old), "cudaFree", "scratch");
  }
  const size_t size = std::max<size_t>(bytes, 256);
  check_cuda(cudaMalloc(&scratch_, size), "cudaMalloc", str_cat(size, " bytes of scratch"));
  scratch_bytes_ = size;
  return scratch_;
}

namespace {

// One isend/irecv. Keeps the communicator's state alive, so it may outlive NcclCommunicator.
class NcclRequest final : public Request {
 public:
  NcclRequest(std::shared_ptr<NcclState> state, std::shared_ptr<Launch> launch, const P2p& op)
      : state_(std::move(state)), launch_(std::move(launch)), op_(op) {}
  ~NcclRequest() override { state_->abandon(*launch_, op_); }
  NcclRequest(const NcclRequest&) = delete;
  NcclRequest& operator=(const NcclRequest&) = delete;
  void wait() override { state_->wait(*launch_, op_); }
  bool test() override { return state_->test(*launch_, op_); }

 private:
  std::shared_ptr<NcclState> state_;
  std::shared_ptr<Launch> launch_;
  P2p op_;
};

}  // namespace

RequestPtr NcclState::post(const P2p& op, void* data) {
  const char* call = op.is_recv ? "irecv" : "isend";
  check_usable(call);
  RINGATTN_CHECK(op.peer >= 0 && op.peer < size_, "nccl ", call, ": expected peer in [0, ", size_,
                 "), found ", op.peer);
  RINGATTN_CHECK(op.tag >= 0, "nccl ", call, ": expected tag >= 0, found ", op.tag);
  RINGATTN_CHECK(data != nullptr || op.bytes == 0, "nccl ", call, ": null buffer for ", op.bytes,
                 " bytes");
  if (op.bytes == 0) return std::make_unique<CompletedRequest>();
  DeviceGuard guard(device_);
  RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, is_device_memory(data, call), "nccl ", op.describe(),
                      ": expected a device buffer, found host memory (NCCL point-to-point "
                      "moves device memory only)");
  // Outside a group the operation is a group of its own, launched before this returns.
  const bool implicit = group_depth_ == 0;
  if (implicit) group_start();
  RequestPtr request;
  try {
    if (op.is_recv) {
      check_nccl(ncclRecv(data, op.bytes, ncclUint8, op.peer, comm_, stream_), "ncclRecv",
                 op.describe());
    } else {
      check_nccl(ncclSend(data, op.bytes, ncclUint8, op.peer, comm_, stream_), "ncclSend",
                 op.describe());
    }
    ++group_ops_;
    request = std::make_unique<NcclRequest>(shared_from_this(), open_launch_, op);
  } catch (...) {
    if (implicit) {
      try {
        group_end();
      } catch (...) {
        // The failure that got us here is the one to report.
      }
    }
    throw;
  }
  if (implicit) group_end();
  return request;
}

void NcclState::group_start() {
  check_usable("group_start");
  if (group_depth_ == 0) {
    RINGATTN_CHECK(t_open_groups == 0,
                   "nccl group_start: another NCCL communicator has a group open on this "
                   "thread (NCCL groups are per thread: close it first)");
    check_nccl(ncclGroupStart(), "ncclGroupStart", "");
    open_launch_ = std::make_shared<Launch>();
    group_ops_ = 0;
    ++t_open_groups;
  }
  ++group_depth_;
}

void NcclState::group_end() {
  RINGATTN_CHECK(group_depth_ > 0, "nccl group_end: expected an open group, found none (",
                 "group_end() without group_start())");
  if (--group_depth_ > 0) return;
  --t_open_groups;
  std::shared_ptr<Launch> launch = std::move(open_launch_);
  const int ops = group_ops_;
  group_ops_ = 0;
  // NCCL's group is per thread: close it even when something inside it failed.
  const ncclResult_t rc = ncclGroupEnd();
  try {
    check_nccl(rc, "ncclGroupEnd", str_cat(ops, " operation(s)"));
    check_usable("group_end");
    if (ops > 0) {
      DeviceGuard guard(device_);
      check_stream_cuda(cudaEventCreateWithFlags(&launch->event, cudaEventDisableTiming),
                        "cudaEventCreateWithFlags", "group_end");
      check_stream_cuda(cudaEventRecord(launch->event, stream_), "cudaEventRecord", "group_end");
    }
    launch->status = Launch::Status::kLaunched;
  } catch (const Error& e) {
    launch->status = Launch::Status::kFailed;
    launch->failure_code = e.code();
    launch->failure = e.message();
    throw;
  }
}

void NcclState::wait(Launch& launch, const P2p& op) {
  switch (launch.status) {
    case Launch::Status::kOpen:
      RINGATTN_THROW(ErrorCode::kInvalidArgument, "nccl wait() on the ", op.describe(),
                     ": it was posted inside a group that is still open; call group_end() "
                     "before waiting");
    case Launch::Status::kFailed:
      RINGATTN_THROW(launch.failure_code, launch.failure);
    case Launch::Status::kLaunched:
      break;
  }
  if (launch.complete) return;
  poll(launch.event, str_cat("wait() on the ", op.describe()), true);
  launch.complete = true;
}

bool NcclState::test(Launch& launch, const P2p& op) {
  switch (launch.status) {
    case Launch::Status::kOpen:
      RINGATTN_THROW(ErrorCode::kInvalidArgument, "nccl test() on the ", op.describe(),
                     ": it was posted inside a group that is still open; call group_end() "
                     "before testing");
    case Launch::Status::kFailed:
      RINGATTN_THROW(launch.failure_code, launch.failure);
    case Launch::Status::kLaunched:
      break;
  }
  if (launch.complete) return true;
  launch.complete = poll(launch.event, str_cat("test() on the ", op.describe()), false);
  return launch.complete;
}

void NcclState::abandon(Launch& launch, const P2p& op) noexcept {
  if (launch.status != Launch::Status::kLaunched || launch.complete) return;
  const auto deadline = std::chrono::steady_clock::now() + kAbandonAfter;
  while (std::chrono::steady_clock::now() < deadline) {
    if (aborted_.load() || !failure_.empty()) return;
    const cudaError_t rc = cudaEventQuery(launch.event);
    if (rc == cudaSuccess) return;
    if (rc != cudaErrorNotReady) {
      cudaGetLastError();
      return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  try {
    std::fprintf(stderr,
                 "[rank %d] ringattn: abandoned an unfinished NCCL %s after %lld s (its buffer "
                 "stays in use until the stream completes it)\n",
                 rank_, op.describe().c_str(), static_cast<long long>(kAbandonAfter.count()));
  } catch (...) {
    // describe() allocates; a destructor must not throw.
  }
}

void NcclState::broadcast(void* data, size_t bytes, int root) {
  const std::string what = str_cat("broadcast(", bytes, " bytes, root ", root, ")");
  check_collective(what);
  RINGATTN_CHECK(root >= 0 && root < size_, "nccl broadcast: expected root in [0, ", size_,
                 "), found ", root);
  RINGATTN_CHECK(data != nullptr || bytes == 0, "nccl broadcast: null buffer for ", bytes,
                 " bytes");
  if (bytes == 0) return;
  DeviceGuard guard(device_);
  const bool on_device = is_device_memory(data, what);
  char* base = static_cast<char*>(data);
  // The same chunks whatever the memory: ranks passing host and device buffers still match.
  for (size_t offset = 0; offset < bytes; offset += NcclCommunicator::kChunkBytes) {
    const size_t n = std::min(NcclCommunicator::kChunkBytes, bytes - offset);
    const std::string context = str_cat(what, ", offset ", offset);
    void* buf = on_device ? base + offset : reserve_scratch(n);
    // Stream order keeps the staging copies, the broadcast and the next chunk's copies in
    // sequence; pageable host copies return only once the host side is done.
    if (!on_device && rank_ == root) {
      check_stream_cuda(cudaMemcpyAsync(buf, base + offset, n, cudaMemcpyHostToDevice, stream_),
                        "cudaMemcpyAsync", context);
    }
    check_nccl(ncclBroadcast(buf, buf, n, ncclUint8, root, comm_, stream_), "ncclBroadcast",
               context);
    if (!on_device && rank_ != root) {
      check_stream_cuda(cudaMemcpyAsync(base + offset, buf, n, cudaMemcpyDeviceToHost, stream_),
                        "cudaMemcpyAsync", context);
    }
  }
  synchronize(what);
}

void NcclState::allreduce(void* data, size_t count, ReduceType type, ReduceOp op) {
  const std::string what = str_cat("allreduce(", count, " elements)");
  check_collective(what);
  const ncclDataType_t datatype = nccl_type(type);
  const ncclRedOp_t nccl_operation = nccl_op(op);
  RINGATTN_CHECK(data != nullptr || count == 0, "nccl allreduce: null buffer for ", count,
                 " elements");
  if (count == 0) return;
  DeviceGuard guard(device_);
  const bool on_device = is_device_memory(data, what);
  const size_t elem = reduce_type_size(type);
  const size_t per_call = NcclCommunicator::kChunkBytes / elem;
  char* base = static_cast<char*>(data);
  for (size_t first = 0; first < count; first += per_call) {
    const size_t n = std::min(per_call, count - first);
    const std::string context = str_cat(what, ", offset ", first);
    char* host = base + first * elem;
    void* buf = on_device ? static_cast<void*>(host) : reserve_scratch(n * elem);
    if (!on_device) {
      check_stream_cuda(cudaMemcpyAsync(buf, host, n * elem, cudaMemcpyHostToDevice, stream_),
                        "cudaMemcpyAsync", context);
    }
    check_nccl(ncclAllReduce(buf, buf, n, datatype, nccl_operation, comm_, stream_),
               "ncclAllReduce", context);
    if (!on_device) {
      check_stream_cuda(cudaMemcpyAsync(host, buf, n * elem, cudaMemcpyDeviceToHost, stream_),
                        "cudaMemcpyAsync", context);
    }
  }
  synchronize(what);
}

void NcclState::barrier() {
  const std::string what = "barrier()";
  check_collective(what);
  DeviceGuard guard(device_);
  void* buf = reserve_scratch(sizeof(int32_t));
  check_stream_cuda(cudaMemsetAsync(buf, 0, sizeof(int32_t), stream_), "cudaMemsetAsync", what);
  // An allreduce completes on no rank before every rank contributed.
  check_nccl(ncclAllReduce(buf, buf, 1, ncclInt32, ncclSum, comm_, stream_), "ncclAllReduce", what);
  synchronize(what);
}

void NcclState::abort() noexcept {
  std::lock_guard<std::mutex> lock(comm_mu_);
  if (aborted_.exchange(true)) return;
  if (comm_ != nullptr) {
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }
}

}  // namespace detail

NcclCommunicator::UniqueId NcclCommunicator::new_unique_id() {
  ncclUniqueId id;
  const ncclResult_t rc = ncclGetUniqueId(&id);
  if (rc != ncclSuccess) {
    const char* last = ncclGetLastError(nullptr);
    RINGATTN_THROW(ErrorCode::kNccl, "nccl ncclGetUniqueId failed: ", ncclGetErrorString(rc),
                   last != nullptr && last[0] != '\0' ? " (" : "", last != nullptr ? last : "",
                   last != nullptr && last[0] != '\0' ? ")" : "");
  }
  UniqueId bytes;
  std::memcpy(bytes.data(), id.internal, bytes.size());
  return bytes;
}

NcclCommunicator::NcclCommunicator(const UniqueId& id, int nranks, int rank, int device)
    : state_(std::make_shared<detail::NcclState>(id, nranks, rank, device)) {}

NcclCommunicator::~NcclCommunicator() = default;

int NcclCommunicator::rank() const { return state_->rank(); }
int NcclCommunicator::size() const { return state_->size(); }

RequestPtr NcclCommunicator::isend(const void* data, size_t bytes, int peer, int tag) {
  detail::P2p op;
  op.bytes = bytes;
  op.peer = peer;
  op.tag = tag;
  // ncclSend only reads the buffer; NcclState::post serves both directions.
  return state_->post(op, const_cast<void*>(data));
}

RequestPtr NcclCommunicator::irecv(void* data, size_t bytes, int peer, int tag) {
  detail::P2p op;
  op.is_recv = true;
  op.bytes = bytes;
  op.peer = peer;
  op.tag = tag;
  return state_->post(op, data);
}

void NcclCommunicator::broadcast(void* data, size_t bytes, int root) {
  state_->broadcast(data, bytes, root);
}

void NcclCommunicator::allreduce(void* data, size_t count, ReduceType type, ReduceOp op) {
  state_->allreduce(data, count, type, op);
}

void NcclCommunicator::barrier() { state_->barrier(); }
void NcclCommunicator::group_start() { state_->group_start(); }
void NcclCommunicator::group_end() { state_->group_end(); }
cudaStream_t NcclCommunicator::stream() const { return state_->stream(); }
int NcclCommunicator::device() const { return state_->device(); }
void NcclCommunicator::abort() noexcept { state_->abort(); }

std::unique_ptr<NcclCommunicator> make_nccl_communicator(MPI_Comm comm) {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  RINGATTN_CHECK_CODE(ErrorCode::kMpi, initialized && !finalized,
                      "make_nccl_communicator: expected an initialised MPI (create an "
                      "MpiSession first), found MPI ",
                      initialized ? "already finalised" : "not initialised");
  int rank = 0;
  int size = 0;
  check_mpi(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm, &size), "MPI_Comm_size");
  // The processes of one node share its GPUs; keying by rank keeps local ranks in rank order.
  MPI_Comm node = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node),
            "MPI_Comm_split_type", "MPI_COMM_TYPE_SHARED");
  int local_rank = 0;
  int local_size = 1;
  const int rank_rc = MPI_Comm_rank(node, &local_rank);
  const int size_rc = MPI_Comm_size(node, &local_size);
  MPI_Comm_free(&node);
  check_mpi(rank_rc, "MPI_Comm_rank", "node communicator");
  check_mpi(size_rc, "MPI_Comm_size", "node communicator");

  int devices = 0;
  const cudaError_t count_rc = cudaGetDeviceCount(&devices);
  std::string problem;
  if (count_rc != cudaSuccess) {
    cudaGetLastError();
    problem =
        detail::str_cat("no CUDA device (cudaGetDeviceCount: ", detail::cuda_text(count_rc), ")");
    devices = 0;
  } else if (devices == 0) {
    problem = "no CUDA device";
  } else if (local_size > devices) {
    problem = detail::str_cat(local_size, " ranks on this node but ", devices,
                              " CUDA device(s): NCCL needs one GPU per rank (the in-process "
                              "communicator runs several virtual ranks on one GPU)");
  }
  // Agree before anyone enters NCCL's bootstrap, so a node without devices fails every rank
  // instead of leaving the others waiting for it.
  int ok = problem.empty() ? 1 : 0;
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce",
            "device check");
  if (!ok) {
    RINGATTN_THROW(
        ErrorCode::kUnsupported, "make_nccl_communicator: ",
        problem.empty() ? std::string("another rank found no usable CUDA device") : problem);
  }
  const int device = local_rank % devices;
  detail::check_cuda(cudaSetDevice(device), "cudaSetDevice", detail::str_cat("device ", device));

  // Rank 0 sends [status][id]; status 0 tells the others that it could not create an id.
  struct {
    int32_t status;
    char id[sizeof(NcclCommunicator::UniqueId)];
  } record{};
  std::string id_failure;
  if (rank == 0) {
    try {
      const NcclCommunicator::UniqueId id = NcclCommunicator::new_unique_id();
      std::memcpy(record.id, id.data(), id.size());
      record.status = 1;
    } catch (const Error& e) {
      id_failure = e.message();
    }
  }
  check_mpi(MPI_Bcast(&record, static_cast<int>(sizeof(record)), MPI_BYTE, 0, comm), "MPI_Bcast",
            "NCCL unique id");
  if (record.status != 1) {
    RINGATTN_THROW(
        ErrorCode::kNccl, "make_nccl_communicator: ",
        rank == 0 ? id_failure : std::string("rank 0 could not create the NCCL unique id"));
  }
  NcclCommunicator::UniqueId id;
  std::memcpy(id.data(), record.id, id.size());
  return std::make_unique<NcclCommunicator>(id, size, rank, device);
}

}  // namespace ringattn
