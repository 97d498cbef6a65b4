#include "comm/inproc/inproc_communicator.h"

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "ringattn/config.h"
#include "ringattn/error.h"

#if RINGATTN_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ringattn {
namespace detail {
namespace {

// Thrown in every rank that was blocked (or starts to block) after another rank failed. A
// distinct type so run_inproc can report the failure that caused the abort, not its echoes.
class InprocAbortedError : public Error {
 public:
  explicit InprocAbortedError(const std::string& message) : Error(ErrorCode::kInternal, message) {}
};

// A posted receive. Once popped by a sender its status is kCopying: the sender owns the
// buffer until it sets kDone, so nobody may withdraw it in between.
struct RecvState {
  enum class Status { kPosted, kCopying, kDone, kCancelled };
  void* data = nullptr;
  size_t bytes = 0;
  int source = 0;
  int destination = 0;
  int tag = 0;
  Status status = Status::kPosted;
  std::string error;  // non-empty: wait() throws it (size mismatch, copy, abort, timeout)
  ErrorCode error_code = ErrorCode::kInternal;
  bool error_is_abort = false;

  std::string describe() const {
    return str_cat("irecv of ", bytes, " bytes from rank ", source, " with tag ", tag);
  }
};

#if RINGATTN_WITH_CUDA

std::string cuda_text(cudaError_t rc) {
  return str_cat(cudaGetErrorName(rc), ": ", cudaGetErrorString(rc));
}

// Throws Error(kCuda) naming the call; clears CUDA's last-error slot so that a non-sticky
// failure is not reported again by an unrelated later check.
void check_cuda(cudaError_t rc, const char* call, const std::string& context) {
  if (rc == cudaSuccess) return;
  cudaGetLastError();
  RINGATTN_THROW(ErrorCode::kCuda, "inproc ", context, ": ", call, " failed: ", cuda_text(rc));
}

// The CUDA side of a world on one device: one copy stream per rank (non-blocking, so the
// copies never wait for, nor hold up, the ranks' own streams) and device staging of early
// messages.
class CudaWorld {
 public:
  CudaWorld(int size, int device) : device_(device) {
    int count = 0;
    const cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc != cudaSuccess) cudaGetLastError();
    RINGATTN_CHECK_CODE(
        ErrorCode::kUnsupported, rc == cudaSuccess && count > 0,
        "InprocWorld: a CUDA world needs a CUDA device, found none",
        rc == cudaSuccess ? std::string() : " (cudaGetDeviceCount: " + cuda_text(rc) + ")");
    RINGATTN_CHECK(device < count, "InprocWorld: expected a CUDA device index in [0, ", count,
                   "), found ", device);
    int previous = 0;
    check_cuda(cudaGetDevice(&previous), "cudaGetDevice", "world setup");
    check_cuda(cudaSetDevice(device), "cudaSetDevice", "world setup");
    try {
      int pools = 0;
      check_cuda(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device),
                 "cudaDeviceGetAttribute", "world setup");
      device_staging_ = pools != 0;
      streams_.reserve(static_cast<size_t>(size));
      for (int r = 0; r < size; ++r) {
        cudaStream_t stream = nullptr;
        check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                   "cudaStreamCreateWithFlags", "world setup");
        streams_.push_back(stream);
      }
    } catch (...) {
      destroy_streams();
      cudaSetDevice(previous);
      throw;
    }
    cudaSetDevice(previous);
  }
  ~CudaWorld() { destroy_streams(); }
  CudaWorld(const CudaWorld&) = delete;
  CudaWorld& operator=(const CudaWorld&) = delete;

  int device() const { return device_; }

  // Makes the world's device current on the calling thread (a rank's thread).
  void enter() const { check_cuda(cudaSetDevice(device_), "cudaSetDevice", "communicator"); }

  // Copies between any two buffers (host or device) and returns once the copy is complete.
  void copy(int rank, void* dst, const void* src, size_t bytes, const std::string& what) const {
    if (bytes == 0) return;
    const cudaStream_t stream = streams_[static_cast<size_t>(rank)];
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream), "cudaMemcpyAsync",
               what);
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize", what);
  }

  // Whether p is device (or managed) memory, which the host cannot read directly.
  bool is_device(const void* p, const std::string& what) const {
    cudaPointerAttributes attributes{};
    const cudaError_t rc = cudaPointerGetAttributes(&attributes, p);
    if (rc == cudaErrorInvalidValue) {
      cudaGetLastError();  // CUDA before 11 reported plain host memory this way
      return false;
    }
    check_cuda(rc, "cudaPointerGetAttributes", what);
    return attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
  }

  // A device copy of a device message that no receive was waiting for (null when `src` is
  // host memory or the device has no stream-ordered allocator: stage on the host then). Freed
  // on the stager's stream when the last holder lets go; every use of it was synchronised.
  std::shared_ptr<void> stage_on_device(int rank, const void* src, size_t bytes,
                                        const std::string& what) const {
    if (!device_staging_ || bytes == 0 || !is_device(src, what)) return nullptr;
    const cudaStream_t stream = streams_[static_cast<size_t>(rank)];
    void* p = nullptr;
    check_cuda(cudaMallocAsync(&p, bytes, stream), "cudaMallocAsync", what);
    std::shared_ptr<void> staged(p, [stream](void* q) { cudaFreeAsync(q, stream); });
    copy(rank, p, src, bytes, what);
    return staged;
  }

 private:
  void destroy_streams() noexcept {
    for (cudaStream_t stream : streams_) cudaStreamDestroy(stream);
    streams_.clear();
  }

  int device_;
  bool device_staging_ = false;
  std::vector<cudaStream_t> streams_;
};

#else

// A build without CUDA has no CUDA worlds; the other members are never reached.
class CudaWorld {
 public:
  CudaWorld(int, int) {
    RINGATTN_THROW(ErrorCode::kUnsupported,
                   "InprocWorld: a CUDA world needs a build with CUDA, this build has none "
                   "(RINGATTN_WITH_CUDA is 0)");
  }
  int device() const { return 0; }
  void enter() const {}
  void copy(int, void*, const void*, size_t, const std::string&) const {}
  bool is_device(const void*, const std::string&) const { return false; }
  std::shared_ptr<void> stage_on_device(int, const void*, size_t, const std::string&) const {
    return nullptr;
  }
};

#endif  // RINGATTN_WITH_CUDA

// A message sent before its receive was posted: a host copy, or a device copy in a CUDA world.
struct Staged {
  std::vector<unsigned char> host;
  std::shared_ptr<void> device;
  size_t bytes = 0;
  const void* data() const { return device ? device.get() : host.data(); }
};

size_t reduce_type_size(ReduceType type) {
  return type == ReduceType::kF32 ? sizeof(float) : sizeof(int64_t);
}

const char* reduce_type_name(ReduceType type) {
  switch (type) {
    case ReduceType::kF32:
      return "f32";
    case ReduceType::kF64:
      return "f64";
    case ReduceType::kI64:
      return "i64";
  }
  return "?";
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kMin:
      return "min";
  }
  return "?";
}

class CompletedRequest final : public Request {
 public:
  void wait() override {}
  bool test() override { return true; }
};

// One collective call of one rank, as published in its round.
struct Part {
  enum class Kind { kBroadcast, kAllreduce, kBarrier };
  bool present = false;
  Kind kind = Kind::kBarrier;
  void* data = nullptr;
  size_t size = 0;  // bytes (broadcast) or elements (allreduce)
  int root = 0;
  ReduceType type = ReduceType::kF32;
  ReduceOp op = ReduceOp::kSum;

  std::string describe() const {
    switch (kind) {
      case Kind::kBroadcast:
        return str_cat("broadcast(", size, " bytes, root ", root, ")");
      case Kind::kAllreduce:
        return str_cat("allreduce(", size, " x ", reduce_type_name(type), ", ", reduce_op_name(op),
                       ")");
      case Kind::kBarrier:
        return "barrier()";
    }
    return "?";
  }
  bool same_call(const Part& o) const {
    return kind == o.kind && size == o.size && root == o.root && type == o.type && op == o.op;
  }
};

// The k-th collective of every rank: the generation of the barrier inside each collective.
struct Round {
  explicit Round(int size) : parts(static_cast<size_t>(size)) {}
  std::vector<Part> parts;
  int arrived = 0;
  int finished = 0;                   // ranks done reading other ranks' buffers
  std::vector<unsigned char> result;  // allreduce: reduced values, rank r writes its slice
};

template <typename T>
T combine(T a, T b, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return a + b;
    case ReduceOp::kMax:
      return b > a ? b : a;
    case ReduceOp::kMin:
      return b < a ? b : a;
  }
  return a;
}

// out[i] = in_0[i] (op) in_1[i] (op) ... in_{P-1}[i] for i in [begin, end), always in rank
// order: floating-point sums then do not depend on which rank computed them.
template <typename T>
void reduce_slice(const std::vector<Part>& parts, ReduceOp op, size_t begin, size_t end,
                  void* out_bytes) {
  T* out = static_cast<T*>(out_bytes);
  const T* first = static_cast<const T*>(parts[0].data);
  for (size_t i = begin; i < end; ++i) out[i] = first[i];
  for (size_t r = 1; r < parts.size(); ++r) {
    const T* in = static_cast<const T*>(parts[r].data);
    for (size_t i = begin; i < end; ++i) out[i] = combine(out[i], in[i], op);
  }
}

}  // namespace

class InprocState : public std::enable_shared_from_this<InprocState> {
 public:
  InprocState(int size, std::chrono::milliseconds timeout, Device device, int device_index)
      : size_(size),
        device_(device),
        cuda_(device == Device::kCUDA ? std::make_unique<CudaWorld>(size, device_index) : nullptr),
        timeout_(timeout),
        next_round_(static_cast<size_t>(size), 0) {}

  ~InprocState() {
    // Staged device messages are freed on the copy streams: before cuda_ destroys them.
    mailboxes_.clear();
  }

  int size() const { return size_; }
  Device device() const { return device_; }
  int device_index() const { return cuda_ ? cuda_->device() : 0; }
  // Prepares the calling thread to play a rank (CUDA: the world's device becomes current).
  void enter() const {
    if (cuda_) cuda_->enter();
  }

  void set_timeout(std::chrono::milliseconds timeout) {
    std::lock_guard<std::mutex> lock(mu_);
    timeout_ = timeout;
  }
  std::chrono::milliseconds timeout() {
    std::lock_guard<std::mutex> lock(mu_);
    return timeout_;
  }

  void abort(int failed_rank) {
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_) return;
    aborted_ = true;
    failed_rank_ = failed_rank;
    cv_.notify_all();
  }
  bool aborted() {
    std::lock_guard<std::mutex> lock(mu_);
    return aborted_;
  }

  RequestPtr isend(int source, const void* data, size_t bytes, int destination, int tag);
  RequestPtr irecv(int destination, void* data, size_t bytes, int source, int tag);
  void wait_recv(RecvState& recv);
  bool test_recv(RecvState& recv);
  void cancel_recv(RecvState& recv) noexcept;

  void broadcast(int rank, void* data, size_t bytes, int root);
  void allreduce(int rank, void* data, size_t count, ReduceType type, ReduceOp op);
  void barrier(int rank);

 private:
  using Key = std::tuple<int, int, int>;  // (source, destination, tag)
  struct Mailbox {
    // At most one of the two is non-empty: a message meets a waiting receive or waits itself.
    std::deque<std::shared_ptr<Staged>> unexpected;
    std::deque<std::shared_ptr<RecvState>> posted;
  };

  std::string aborted_message(const std::string& context) const {
    return str_cat("in-process world aborted: rank ", failed_rank_, " failed (this rank was in ",
                   context, ")");
  }

  // Copies `bytes` between two buffers of this world; complete when it returns.
  void copy(int rank, void* dst, const void* src, size_t bytes, const std::string& what) const {
    if (cuda_) {
      cuda_->copy(rank, dst, src, bytes, what);
    } else if (bytes > 0) {
      std::memcpy(dst, src, bytes);
    }
  }

  // Copies a message into a receive that was matched with it (no lock held: the receive is
  // kCopying, so its buffer is ours). A failed copy is recorded in the receive and returned.
  std::string fill(int rank, RecvState& recv, const void* data, size_t bytes) const {
    if (bytes != recv.bytes) {
      recv.error = str_cat("inproc ", recv.describe(), ": expected ", recv.bytes,
                           " bytes, the matching isend sent ", bytes);
      return std::string();
    }
    try {
      copy(rank, recv.data, data, bytes, recv.describe());
    } catch (const Error& e) {
      recv.error = e.message();
      recv.error_code = e.code();
      return e.message();
    }
    return std::string();
  }

  void check_p2p(const char* call, const void* data, size_t bytes, int peer, int tag) const {
    RINGATTN_CHECK(peer >= 0 && peer < size_, "inproc ", call, ": expected peer in [0, ", size_,
                   "), found ", peer);
    RINGATTN_CHECK(tag >= 0, "inproc ", call, ": expected tag >= 0, found ", tag);
    RINGATTN_CHECK(data != nullptr || bytes == 0, "inproc ", call, ": null buffer for ", bytes,
                   " bytes");
  }

  // Blocks (lock held) until ready(). On abort or timeout calls withdraw() — which must undo
  // this rank's visible state so no other rank touches its buffer — and throws.
  template <typename Ready, typename Describe, typename Withdraw>
  void await(std::unique_lock<std::mutex>& lock, Ready ready, Describe what, Withdraw withdraw) {
    const std::chrono::milliseconds timeout = timeout_;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!ready()) {
      if (aborted_) {
        const std::string message = aborted_message(what());
        withdraw(message, true);
        throw InprocAbortedError(message);
      }
      if (timeout.count() == 0) {
        cv_.wait(lock);
      } else if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && !ready() &&
                 !aborted_) {
        const std::string message =
            str_cat("inproc ", what(), " timed out after ", timeout.count(), " ms");
        withdraw(message, false);
        RINGATTN_THROW(ErrorCode::kInternal, message);
      }
    }
  }

  // Pops the oldest posted receive for key (lock held) and marks it kCopying.
  std::shared_ptr<RecvState> pop_posted(const Key& key) {
    auto it = mailboxes_.find(key);
    if (it == mailboxes_.end() || it->second.posted.empty()) return nullptr;
    std::shared_ptr<RecvState> recv = std::move(it->second.posted.front());
    it->second.posted.pop_front();
    if (it->second.posted.empty() && it->second.unexpected.empty()) mailboxes_.erase(it);
    recv->status = RecvState::Status::kCopying;
    return recv;
  }

  void remove_posted(const RecvState& recv) {
    auto it = mailboxes_.find(Key{recv.source, recv.destination, recv.tag});
    if (it == mailboxes_.end()) return;
    auto& posted = it->second.posted;
    for (auto p = posted.begin(); p != posted.end(); ++p) {
      if (p->get() == &recv) {
        posted.erase(p);
        break;
      }
    }
    if (posted.empty() && it->second.unexpected.empty()) mailboxes_.erase(it);
  }

  // Sender side of a match: copy without the lock, then publish completion. A failed copy
  // fails the receive and the send.
  void deliver(int rank, RecvState& recv, const void* data, size_t bytes) {
    const std::string failure = fill(rank, recv, data, bytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      recv.status = RecvState::Status::kDone;
      cv_.notify_all();
    }
    if (!failure.empty()) RINGATTN_THROW(recv.error_code, failure);
  }

  // Phase 1 of every collective: publish `mine` in this rank's next round and wait for all
  // ranks. Returns the round once every rank's part is in place and consistent.
  std::shared_ptr<Round> arrive(int rank, const Part& mine);
  // Phase 2: this rank stopped reading other ranks' buffers; returns when all have (when
  // `wait_for_all`). Never aborts: every rank arrived, so all only have copying left to do.
  void finish(Round& round, bool wait_for_all);

  std::mutex mu_;
  std::condition_variable cv_;
  const int size_;
  const Device device_;
  const std::unique_ptr<CudaWorld> cuda_;  // null in a CPU world
  std::chrono::milliseconds timeout_;
  bool aborted_ = false;
  int failed_rank_ = -1;
  std::map<Key, Mailbox> mailboxes_;
  std::vector<uint64_t> next_round_;  // per rank: number of its next collective
  std::map<uint64_t, std::shared_ptr<Round>> rounds_;
};

namespace {

class RecvRequest final : public Request {
 public:
  RecvRequest(std::shared_ptr<InprocState> state, std::shared_ptr<RecvState> recv)
      : state_(std::move(state)), recv_(std::move(recv)) {}
  ~RecvRequest() override { state_->cancel_recv(*recv_); }
  void wait() override { state_->wait_recv(*recv_); }
  bool test() override { return state_->test_recv(*recv_); }

 private:
  std::shared_ptr<InprocState> state_;
  std::shared_ptr<RecvState> recv_;
};

[[noreturn]] void throw_recorded(const RecvState& recv) {
  if (recv.error_is_abort) throw InprocAbortedError(recv.error);
  RINGATTN_THROW(recv.error_code, recv.error);
}

}  // namespace

RequestPtr InprocState::isend(int source, const void* data, size_t bytes, int destination,
                              int tag) {
  check_p2p("isend", data, bytes, destination, tag);
  const Key key{source, destination, tag};
  std::unique_lock<std::mutex> lock(mu_);
  if (aborted_) {
    throw InprocAbortedError(
        aborted_message(str_cat("isend to rank ", destination, " with tag ", tag)));
  }
  if (std::shared_ptr<RecvState> recv = pop_posted(key)) {
    lock.unlock();
    deliver(source, *recv, data, bytes);
    return std::make_unique<CompletedRequest>();
  }
  // No receive yet: stage a copy without holding the lock. Only this rank sends with this
  // key's source, so no other send can slip in front of this one meanwhile.
  lock.unlock();
  auto staged = std::make_shared<Staged>();
  staged->bytes = bytes;
  if (cuda_) {
    staged->device = cuda_->stage_on_device(
        source, data, bytes, str_cat("isend to rank ", destination, " with tag ", tag));
  }
  if (!staged->device) {
    staged->host.resize(bytes);
    copy(source, staged->host.data(), data, bytes,
         str_cat("isend to rank ", destination, " with tag ", tag));
  }
  lock.lock();
  if (std::shared_ptr<RecvState> recv = pop_posted(key)) {
    lock.unlock();
    deliver(source, *recv, staged->data(), bytes);
  } else {
    mailboxes_[key].unexpected.push_back(std::move(staged));
  }
  return std::make_unique<CompletedRequest>();
}

RequestPtr InprocState::irecv(int destination, void* data, size_t bytes, int source, int tag) {
  check_p2p("irecv", data, bytes, source, tag);
  auto recv = std::make_shared<RecvState>();
  recv->data = data;
  recv->bytes = bytes;
  recv->source = source;
  recv->destination = destination;
  recv->tag = tag;
  std::unique_lock<std::mutex> lock(mu_);
  if (aborted_) throw InprocAbortedError(aborted_message(recv->describe()));
  const Key key{source, destination, tag};
  auto it = mailboxes_.find(key);
  if (it != mailboxes_.end() && !it->second.unexpected.empty()) {
    std::shared_ptr<Staged> message = std::move(it->second.unexpected.front());
    it->second.unexpected.pop_front();
    if (it->second.unexpected.empty() && it->second.posted.empty()) mailboxes_.erase(it);
    lock.unlock();
    // Nobody else can see `recv` yet: complete it here (a failed copy fails its wait()).
    fill(destination, *recv, message->data(), message->bytes);
    recv->status = RecvState::Status::kDone;
  } else {
    mailboxes_[key].posted.push_back(recv);
  }
  return std::make_unique<RecvRequest>(shared_from_this(), std::move(recv));
}

void InprocState::wait_recv(RecvState& recv) {
  std::unique_lock<std::mutex> lock(mu_);
  await(
      lock, [&] { return recv.status != RecvState::Status::kPosted; },
      [&] { return recv.describe(); },
      [&](const std::string& message, bool is_abort) {
        remove_posted(recv);
        recv.status = RecvState::Status::kCancelled;
        recv.error = message;
        recv.error_is_abort = is_abort;
      });
  // A sender that matched this receive is copying into it: that always finishes.
  cv_.wait(lock, [&] { return recv.status != RecvState::Status::kCopying; });
  if (!recv.error.empty()) throw_recorded(recv);
}

bool InprocState::test_recv(RecvState& recv) {
  std::unique_lock<std::mutex> lock(mu_);
  switch (recv.status) {
    case RecvState::Status::kPosted:
      // A poll loop must not spin forever on a dead world.
      if (aborted_) {
        remove_posted(recv);
        recv.status = RecvState::Status::kCancelled;
        recv.error = aborted_message(recv.describe());
        recv.error_is_abort = true;
        throw_recorded(recv);
      }
      return false;
    case RecvState::Status::kCopying:
      return false;
    case RecvState::Status::kDone:
    case RecvState::Status::kCancelled:
      if (!recv.error.empty()) throw_recorded(recv);
      return true;
  }
  return false;
}

void InprocState::cancel_recv(RecvState& recv) noexcept {
  try {
    std::unique_lock<std::mutex> lock(mu_);
    if (recv.status == RecvState::Status::kPosted) {
      remove_posted(recv);
      recv.status = RecvState::Status::kCancelled;
    }
    // The buffer may be freed right after this returns: let a running copy finish first.
    cv_.wait(lock, [&] { return recv.status != RecvState::Status::kCopying; });
  } catch (...) {
    // Only std::system_error from the mutex could get here; a destructor must not throw.
  }
}

std::shared_ptr<Round> InprocState::arrive(int rank, const Part& mine) {
  std::unique_lock<std::mutex> lock(mu_);
  const uint64_t number = next_round_[static_cast<size_t>(rank)]++;
  if (aborted_) throw InprocAbortedError(aborted_message(mine.describe()));
  std::shared_ptr<Round>& slot = rounds_[number];
  if (!slot) slot = std::make_shared<Round>(size_);
  std::shared_ptr<Round> round = slot;
  round->parts[static_cast<size_t>(rank)] = mine;
  round->parts[static_cast<size_t>(rank)].present = true;
  if (++round->arrived == size_) {
    // Everyone holds the round now; later collectives look up later numbers.
    rounds_.erase(number);
    if (mine.kind == Part::Kind::kAllreduce) {
      round->result.resize(mine.size * reduce_type_size(mine.type));
    }
    cv_.notify_all();
  }
  await(
      lock, [&] { return round->arrived == size_; },
      [&] {
        std::string missing;
        for (int r = 0; r < size_; ++r) {
          if (!round->parts[static_cast<size_t>(r)].present) {
            missing += str_cat(missing.empty() ? "" : ", ", r);
          }
        }
        return str_cat(mine.describe(), " (collective #", number, ") waiting for rank(s) ",
                       missing);
      },
      [&](const std::string&, bool) {
        // Take our buffer back out: a late rank must not complete the round with it.
        round->parts[static_cast<size_t>(rank)].present = false;
        --round->arrived;
      });
  // Every rank runs the same comparison on the same parts, so all throw or none does.
  const Part& first = round->parts[0];
  for (int r = 1; r < size_; ++r) {
    const Part& other = round->parts[static_cast<size_t>(r)];
    RINGATTN_CHECK_CODE(ErrorCode::kInternal, other.same_call(first), "inproc collective #", number,
                        ": ranks disagree: rank 0 called ", first.describe(), ", rank ", r,
                        " called ", other.describe());
  }
  return round;
}

void InprocState::finish(Round& round, bool wait_for_all) {
  std::unique_lock<std::mutex> lock(mu_);
  if (++round.finished == size_) cv_.notify_all();
  if (wait_for_all) cv_.wait(lock, [&] { return round.finished == size_; });
}

void InprocState::broadcast(int rank, void* data, size_t bytes, int root) {
  RINGATTN_CHECK(root >= 0 && root < size_, "inproc broadcast: expected root in [0, ", size_,
                 "), found ", root);
  RINGATTN_CHECK(data != nullptr || bytes == 0, "inproc broadcast: null buffer for ", bytes,
                 " bytes");
  Part mine;
  mine.kind = Part::Kind::kBroadcast;
  mine.data = data;
  mine.size = bytes;
  mine.root = root;
  std::shared_ptr<Round> round = arrive(rank, mine);
  if (rank != root && bytes > 0) {
    try {
      copy(rank, data, round->parts[static_cast<size_t>(root)].data, bytes, mine.describe());
    } catch (...) {
      finish(*round, false);  // the root waits for every rank to be done with its buffer
      throw;
    }
  }
  // Only the root's buffer is read by others: only the root must wait for the copies.
  finish(*round, rank == root);
}

void InprocState::allreduce(int rank, void* data, size_t count, ReduceType type, ReduceOp op) {
  RINGATTN_CHECK(data != nullptr || count == 0, "inproc allreduce: null buffer for ", count,
                 " elements");
  Part mine;
  mine.kind = Part::Kind::kAllreduce;
  mine.data = data;
  mine.size = count;
  mine.type = type;
  mine.op = op;
  // The reduction runs on the host: device inputs are copied out first (correct, not fast:
  // the runtime allreduces small control data and, in the backward pass, gradients).
  std::vector<unsigned char> host_input;
  if (cuda_ && count > 0 && cuda_->is_device(data, mine.describe())) {
    host_input.resize(count * reduce_type_size(type));
    copy(rank, host_input.data(), data, host_input.size(), mine.describe());
    mine.data = host_input.data();
  }
  std::shared_ptr<Round> round = arrive(rank, mine);
  // Rank r reduces elements [r*count/P, (r+1)*count/P): the work is split, the order of
  // operands per element is not.
  const size_t p = static_cast<size_t>(size_);
  const size_t r = static_cast<size_t>(rank);
  const size_t begin = count * r / p;
  const size_t end = count * (r + 1) / p;
  switch (type) {
    case ReduceType::kF32:
      reduce_slice<float>(round->parts, op, begin, end, round->result.data());
      break;
    case ReduceType::kF64:
      reduce_slice<double>(round->parts, op, begin, end, round->result.data());
      break;
    case ReduceType::kI64:
      reduce_slice<int64_t>(round->parts, op, begin, end, round->result.data());
      break;
  }
  // In place: nobody may overwrite its input until every rank has read all inputs.
  finish(*round, true);
  if (count > 0) copy(rank, data, round->result.data(), round->result.size(), mine.describe());
}

void InprocState::barrier(int rank) {
  Part mine;
  mine.kind = Part::Kind::kBarrier;
  arrive(rank, mine);
}

namespace {

class InprocCommunicator final : public Communicator {
 public:
  InprocCommunicator(std::shared_ptr<InprocState> state, int rank)
      : state_(std::move(state)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return state_->size(); }
  const char* name() const override { return "inproc"; }
  // A CUDA world takes device buffers and still host ones (the runtime's control data).
  bool accepts(Device device) const override {
    return device == Device::kCPU || device == state_->device();
  }

  RequestPtr isend(const void* data, size_t bytes, int peer, int tag) override {
    return state_->isend(rank_, data, bytes, peer, tag);
  }
  RequestPtr irecv(void* data, size_t bytes, int peer, int tag) override {
    return state_->irecv(rank_, data, bytes, peer, tag);
  }
  using Communicator::irecv;
  using Communicator::isend;

  void broadcast(void* data, size_t bytes, int root) override {
    state_->broadcast(rank_, data, bytes, root);
  }
  void allreduce(void* data, size_t count, ReduceType type, ReduceOp op) override {
    state_->allreduce(rank_, data, count, type, op);
  }
  void barrier() override { state_->barrier(rank_); }

 private:
  std::shared_ptr<InprocState> state_;
  int rank_;
};

}  // namespace
}  // namespace detail

InprocWorld::InprocWorld(int size, std::chrono::milliseconds wait_timeout, Device device,
                         int device_index) {
  RINGATTN_CHECK(size >= 1, "InprocWorld: expected size >= 1, found ", size);
  RINGATTN_CHECK(wait_timeout.count() >= 0, "InprocWorld: expected wait_timeout >= 0, found ",
                 wait_timeout.count(), " ms");
  RINGATTN_CHECK(device == Device::kCPU || device == Device::kCUDA,
                 "InprocWorld: expected device cpu or cuda, found ", static_cast<int>(device));
  RINGATTN_CHECK(device_index >= 0, "InprocWorld: expected device_index >= 0, found ",
                 device_index);
  state_ = std::make_shared<detail::InprocState>(size, wait_timeout, device, device_index);
}

InprocWorld::~InprocWorld() = default;

int InprocWorld::size() const { return state_->size(); }

Device InprocWorld::device() const { return state_->device(); }

int InprocWorld::device_index() const { return state_->device_index(); }

std::unique_ptr<Communicator> InprocWorld::communicator(int rank) {
  RINGATTN_CHECK(rank >= 0 && rank < state_->size(),
                 "InprocWorld::communicator: expected rank in [0, ", state_->size(), "), found ",
                 rank);
  state_->enter();
  return std::make_unique<detail::InprocCommunicator>(state_, rank);
}

void InprocWorld::set_wait_timeout(std::chrono::milliseconds timeout) {
  RINGATTN_CHECK(timeout.count() >= 0, "InprocWorld: expected wait_timeout >= 0, found ",
                 timeout.count(), " ms");
  state_->set_timeout(timeout);
}

std::chrono::milliseconds InprocWorld::wait_timeout() const { return state_->timeout(); }

void InprocWorld::abort(int failed_rank) { state_->abort(failed_rank); }

bool InprocWorld::aborted() const { return state_->aborted(); }

void run_inproc(int world, const std::function<void(Communicator&)>& fn) {
  InprocWorld w(world);
  run_inproc(w, fn);
}

void run_inproc(InprocWorld& world, const std::function<void(Communicator&)>& fn) {
  const int n = world.size();
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
  std::vector<char> echo(static_cast<size_t>(n), 0);  // failed only because the world aborted
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n));
  try {
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        ScopedRank scoped_rank(r);
        try {
          std::unique_ptr<Communicator> comm = world.communicator(r);
          fn(*comm);
        } catch (const detail::InprocAbortedError&) {
          errors[static_cast<size_t>(r)] = std::current_exception();
          echo[static_cast<size_t>(r)] = 1;
        } catch (...) {
          errors[static_cast<size_t>(r)] = std::current_exception();
          world.abort(r);
        }
      });
    }
  } catch (...) {
    // Could not start every rank: the started ones would wait for the missing ones forever.
    world.abort(static_cast<int>(threads.size()));
    for (std::thread& t : threads) t.join();
    throw;
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < n; ++r) {
    if (errors[static_cast<size_t>(r)] && !echo[static_cast<size_t>(r)]) {
      std::rethrow_exception(errors[static_cast<size_t>(r)]);
    }
  }
  for (int r = 0; r < n; ++r) {
    if (errors[static_cast<size_t>(r)]) std::rethrow_exception(errors[static_cast<size_t>(r)]);
  }
}

}  // namespace ringattn
