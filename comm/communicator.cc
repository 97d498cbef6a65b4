#include "comm/communicator.h"

#include "ringattn/error.h"

namespace ringattn {
namespace {

// The byte-level calls cannot see a tensor's device or strides, so the checks live here, once
// for every implementation.
void check_transferable(const Communicator& comm, const TensorView& t, const char* call) {
  RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, comm.accepts(t.device()), comm.name(), " ", call,
                      ": expected a buffer on a device this communicator accepts, found ",
                      device_name(t.device()), " tensor ", t.describe());
  RINGATTN_CHECK(t.is_contiguous(), comm.name(), " ", call,
                 ": expected a contiguous tensor, found strided ", t.describe());
  RINGATTN_CHECK(t.defined(), comm.name(), " ", call, ": expected data, found a null tensor ",
                 t.describe());
}

}  // namespace

RequestPtr Communicator::isend(const TensorView& t, int peer, int tag) {
  check_transferable(*this, t, "isend");
  return isend(static_cast<const void*>(t.data()), t.nbytes(), peer, tag);
}

RequestPtr Communicator::irecv(const TensorView& t, int peer, int tag) {
  check_transferable(*this, t, "irecv");
  return irecv(t.data(), t.nbytes(), peer, tag);
}

}  // namespace ringattn
