#include "launch/ranks.h"

#include <chrono>
#include <cstring>
#include <memory>

#include "comm/inproc/inproc_communicator.h"
#include "ringattn/config.h"
#include "ringattn/error.h"
#if RINGATTN_WITH_CUDA
#include "kernels/cuda/cuda_memory.h"
#endif
#if RINGATTN_WITH_NCCL
#include "comm/nccl/nccl_communicator.h"
#endif

namespace ringattn::launch {

void check_virtual_ranks(int virtual_ranks, int mpi_world) {
  RINGATTN_CHECK(virtual_ranks >= 0, "--virtual-ranks must be >= 0, got ", virtual_ranks);
  RINGATTN_CHECK(virtual_ranks == 0 || mpi_world == 1, "--virtual-ranks ", virtual_ranks,
                 " runs the ranks as threads of one process: start one process, not ", mpi_world);
}

void run_on_ranks(MpiCommunicator& mpi, Backend backend, int virtual_ranks,
                  const std::function<void(Communicator&)>& fn) {
  const Device device = backend_device(backend);
  if (virtual_ranks > 0) {
    int device_index = 0;
#if RINGATTN_WITH_CUDA
    if (device == Device::kCUDA) device_index = cuda::current_device();
#endif
    InprocWorld world(virtual_ranks, std::chrono::milliseconds::zero(), device, device_index);
    run_inproc(world, fn);
    return;
  }
  if (device == Device::kCPU) {
    fn(mpi);
    return;
  }
#if RINGATTN_WITH_NCCL
  std::unique_ptr<NcclCommunicator> nccl = make_nccl_communicator(MPI_COMM_WORLD);
  fn(*nccl);
#else
  RINGATTN_THROW(ErrorCode::kUnsupported,
                 "--backend cuda across MPI ranks needs NCCL, which this build does not have "
                 "(use --virtual-ranks P for P ranks on one GPU)");
#endif
}

void copy_bytes(void* dst, const void* src, size_t bytes, Device device) {
  if (bytes == 0) return;
  if (device == Device::kCPU) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if RINGATTN_WITH_CUDA
  cuda::copy_sync(dst, src, bytes);
#else
  RINGATTN_THROW(ErrorCode::kUnsupported, "this build has no CUDA support");
#endif
}

TensorBuffer::TensorBuffer(Device device, DType dtype, std::initializer_list<int64_t> shape)
    : buf_(device) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  buf_.resize(static_cast<size_t>(n) * dtype_size(dtype));
  view_ = TensorView(buf_.data(), dtype, shape, device);
}

void TensorBuffer::upload(const void* host) {
  copy_bytes(buf_.data(), host, buf_.size(), view_.device());
}

void TensorBuffer::download(void* host) {
  copy_bytes(host, buf_.data(), buf_.size(), view_.device());
}

}  // namespace ringattn::launch
