#include "comm/mpi/mpi_communicator.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h>  // OpenMPI extensions: MPIX_Query_cuda_support
#endif

#include "ringattn/error.h"

namespace ringattn {
namespace {

// How long the destructor of an unwaited request keeps driving MPI progress after cancelling
// before it gives the handle up. Receives cancel at once; a send cannot be cancelled in
// OpenMPI and completes only when the peer receives it, which a failing peer may never do.
constexpr std::chrono::seconds kAbandonAfter{5};

std::string mpi_error_string(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) return "error " + std::to_string(rc);
  return std::string(text, static_cast<size_t>(length));
}

bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

// Bytes of chunk i when `bytes` are split into chunks of at most `chunk`. A zero-byte message
// is still one (empty) MPI message: the receiver posted a receive that must be matched.
size_t chunk_count(size_t bytes, size_t chunk) {
  return bytes == 0 ? 1 : (bytes + chunk - 1) / chunk;
}
int chunk_size(size_t bytes, size_t chunk, size_t i) {
  return static_cast<int>(std::min(chunk, bytes - i * chunk));
}

// One isend/irecv: the MPI requests of its chunks, in posting order.
class MpiRequest final : public Request {
 public:
  MpiRequest(bool is_recv, size_t bytes, int peer, int tag, size_t chunks)
      : is_recv_(is_recv), bytes_(bytes), peer_(peer), tag_(tag) {
    requests_.reserve(chunks);
    expected_.reserve(chunks);
  }

  ~MpiRequest() override { abandon(); }

  std::vector<MPI_Request>& requests() { return requests_; }
  std::vector<int>& expected() { return expected_; }

  void wait() override {
    if (done_) return rethrow_failure();
    std::vector<MPI_Status> statuses(requests_.size());
    int rc = MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), statuses.data());
    finish(rc, statuses, "MPI_Waitall");
  }

  bool test() override {
    if (done_) {
      rethrow_failure();
      return true;
    }
    std::vector<MPI_Status> statuses(requests_.size());
    int flag = 0;
    int rc =
        MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &flag, statuses.data());
    if (rc == MPI_SUCCESS && !flag) return false;
    finish(rc, statuses, "MPI_Testall");
    return true;
  }

 private:
  std::string describe() const {
    return detail::str_cat(is_recv_ ? "irecv from peer " : "isend to peer ", peer_, ", tag ", tag_,
                           ", ", bytes_, " bytes in ", requests_.size(), " chunk(s)");
  }

  void rethrow_failure() const {
    if (!failure_.empty()) RINGATTN_THROW(ErrorCode::kMpi, failure_);
  }

  // Called once every chunk completed (or one failed): records the outcome so that a second
  // wait() is a no-op on success and repeats the same error on failure.
  void finish(int rc, std::vector<MPI_Status>& statuses, const char* call) {
    if (rc == MPI_ERR_IN_STATUS) {
      for (const MPI_Status& s : statuses) {
        if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING) {
          rc = s.MPI_ERROR;
          break;
        }
      }
    }
    if (rc != MPI_SUCCESS) {
      // Chunks still pending stay in requests_; the destructor cancels them.
      failure_ = detail::str_cat(call, " (", describe(), ") failed: ", mpi_error_string(rc));
      done_ = true;
      rethrow_failure();
    }
    done_ = true;
    if (!is_recv_) return;
    // MPI accepts a shorter message silently (a longer one is MPI_ERR_TRUNCATE at best).
    for (size_t i = 0; i < statuses.size(); ++i) {
      int count = 0;
      MPI_Get_count(&statuses[i], MPI_BYTE, &count);
      if (count != expected_[i]) {
        failure_ = detail::str_cat(describe(), ": expected ", expected_[i], " bytes in chunk ", i,
                                   ", received ", count,
                                   " (sender and receiver disagree on the message size)");
        rethrow_failure();
      }
    }
  }

  // Never throws: runs in destructors, also while an exception unwinds.
  void abandon() noexcept {
    const bool pending = std::any_of(requests_.begin(), requests_.end(),
                                     [](MPI_Request r) { return r != MPI_REQUEST_NULL; });
    if (!pending || mpi_finalized()) return;
    for (MPI_Request& r : requests_) {
      if (r != MPI_REQUEST_NULL) MPI_Cancel(&r);
    }
    const auto deadline = std::chrono::steady_clock::now() + kAbandonAfter;
    while (std::chrono::steady_clock::now() < deadline) {
      int flag = 0;
      MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &flag, MPI_STATUSES_IGNORE);
      if (flag) return;
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    // The peer is not taking part any more (the job is failing): free the handles so that
    // nothing leaks; MPI may still complete the transfer in the background.
    for (MPI_Request& r : requests_) {
      if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
    }
    std::fprintf(stderr, "[rank %d] ringattn: abandoned an unfinished MPI %s after %lld s\n",
                 current_rank(), describe().c_str(), static_cast<long long>(kAbandonAfter.count()));
  }

  bool is_recv_;
  size_t bytes_;
  int peer_;
  int tag_;
  std::vector<MPI_Request> requests_;
  std::vector<int> expected_;  // bytes of each chunk, checked against what arrived
  bool done_ = false;
  std::string failure_;
};

void check_peer_tag(const char* call, int peer, int tag) {
  // Negative values are MPI wildcards (MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_PROC_NULL) that would
  // silently change the matching semantics the ring relies on.
  RINGATTN_CHECK(peer >= 0 && tag >= 0, "mpi ", call,
                 ": expected peer >= 0 and tag >= 0, found peer ", peer, ", tag ", tag);
}

MPI_Datatype mpi_type(ReduceType type) {
  switch (type) {
    case ReduceType::kF32:
      return MPI_FLOAT;
    case ReduceType::kF64:
      return MPI_DOUBLE;
    case ReduceType::kI64:
      return MPI_INT64_T;
  }
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "mpi allreduce: unknown reduce type ",
                 static_cast<int>(type));
}

size_t reduce_type_size(ReduceType type) {
  return type == ReduceType::kF32 ? sizeof(float) : sizeof(int64_t);
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "mpi allreduce: unknown reduce op ",
                 static_cast<int>(op));
}

bool mpi_is_cuda_aware() {
#if defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
  // Compiled against a CUDA-aware build; the library loaded at run time must agree.
  return MPIX_Query_cuda_support() == 1;
#else
  return false;
#endif
}

}  // namespace

void check_mpi(int rc, const char* call, const std::string& context) {
  if (rc == MPI_SUCCESS) return;
  RINGATTN_THROW(ErrorCode::kMpi, call, context.empty() ? "" : "(", context,
                 context.empty() ? "" : ")", " failed: ", mpi_error_string(rc));
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, size_t chunk_bytes) : chunk_bytes_(chunk_bytes) {
  RINGATTN_CHECK(chunk_bytes >= 1 && chunk_bytes <= static_cast<size_t>(INT_MAX),
                 "MpiCommunicator: expected chunk_bytes in [1, INT_MAX], found ", chunk_bytes);
  int initialized = 0;
  MPI_Initialized(&initialized);
  RINGATTN_CHECK_CODE(ErrorCode::kMpi, initialized && !mpi_finalized(),
                      "MpiCommunicator: expected an initialised MPI (create an MpiSession "
                      "first), found MPI ",
                      initialized ? "already finalised" : "not initialised");
  check_mpi(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
  // From here on comm_ is ours: free it if the rest of the constructor throws.
  try {
    check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  } catch (...) {
    MPI_Comm_free(&comm_);
    throw;
  }
  cuda_aware_ = mpi_is_cuda_aware();
}

MpiCommunicator::~MpiCommunicator() {
  if (comm_ != MPI_COMM_NULL && !mpi_finalized()) MPI_Comm_free(&comm_);
}

bool MpiCommunicator::accepts(Device device) const {
  return device == Device::kCPU || (device == Device::kCUDA && cuda_aware_);
}

RequestPtr MpiCommunicator::isend(const void* data, size_t bytes, int peer, int tag) {
  check_peer_tag("isend", peer, tag);
  const size_t chunks = chunk_count(bytes, chunk_bytes_);
  // Owned before the first chunk is posted: if a later chunk fails, unwinding cancels the
  // earlier ones.
  auto request = std::make_unique<MpiRequest>(false, bytes, peer, tag, chunks);
  const char* base = static_cast<const char*>(data);
  for (size_t i = 0; i < chunks; ++i) {
    const int n = chunk_size(bytes, chunk_bytes_, i);
    MPI_Request r = MPI_REQUEST_NULL;
    check_mpi(MPI_Isend(base + i * chunk_bytes_, n, MPI_BYTE, peer, tag, comm_, &r), "MPI_Isend",
              detail::str_cat("peer ", peer, ", tag ", tag, ", ", bytes, " bytes, chunk ", i));
    request->requests().push_back(r);
    request->expected().push_back(n);
  }
  return request;
}

RequestPtr MpiCommunicator::irecv(void* data, size_t bytes, int peer, int tag) {
  check_peer_tag("irecv", peer, tag);
  const size_t chunks = chunk_count(bytes, chunk_bytes_);
  auto request = std::make_unique<MpiRequest>(true, bytes, peer, tag, chunks);
  char* base = static_cast<char*>(data);
  for (size_t i = 0; i < chunks; ++i) {
    const int n = chunk_size(bytes, chunk_bytes_, i);
    MPI_Request r = MPI_REQUEST_NULL;
    check_mpi(MPI_Irecv(base + i * chunk_bytes_, n, MPI_BYTE, peer, tag, comm_, &r), "MPI_Irecv",
              detail::str_cat("peer ", peer, ", tag ", tag, ", ", bytes, " bytes, chunk ", i));
    request->requests().push_back(r);
    request->expected().push_back(n);
  }
  return request;
}

void MpiCommunicator::broadcast(void* data, size_t bytes, int root) {
  char* base = static_cast<char*>(data);
  for (size_t offset = 0; offset < bytes; offset += chunk_bytes_) {
    const int n = static_cast<int>(std::min(chunk_bytes_, bytes - offset));
    check_mpi(MPI_Bcast(base + offset, n, MPI_BYTE, root, comm_), "MPI_Bcast",
              detail::str_cat("root ", root, ", ", bytes, " bytes, offset ", offset));
  }
}

void MpiCommunicator::allreduce(void* data, size_t count, ReduceType type, ReduceOp op) {
  const MPI_Datatype datatype = mpi_type(type);
  const MPI_Op mpi_operation = mpi_op(op);
  const size_t elem = reduce_type_size(type);
  // Whole elements per call, at least one even when chunk_bytes is smaller than an element.
  const size_t per_call = std::max<size_t>(1, chunk_bytes_ / elem);
  char* base = static_cast<char*>(data);
  for (size_t offset = 0; offset < count; offset += per_call) {
    const int n = static_cast<int>(std::min(per_call, count - offset));
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, base + offset * elem, n, datatype, mpi_operation, comm_),
              "MPI_Allreduce", detail::str_cat(count, " elements, offset ", offset));
  }
}

void MpiCommunicator::barrier() { check_mpi(MPI_Barrier(comm_), "MPI_Barrier"); }

}  // namespace ringattn
