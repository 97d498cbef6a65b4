// ringattn._C: the Python binding, a thin pybind11 layer over the C ABI (ringattn/ringattn.h).
// Tensors cross as raw data pointers (torch's data_ptr()) plus shapes, so the module never links
// libtorch; the pure Python side (ringattn/torch.py) checks devices, dtypes and contiguity.
// Pointers are host memory for "mpi"/"self" communicators and device memory of the
// communicator's GPU for "nccl" ones (torch CUDA tensors' data_ptr()).
// Every long call releases the GIL; a failed status becomes ringattn._C.Error.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ringattn/config.h"
#include "ringattn/ringattn.h"

namespace py = pybind11;

namespace {

// The Python exception type: RuntimeError subclass carrying the status name in the message.
class PyRingattnError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

void check(ringattn_status status) {
  if (status == RINGATTN_OK) return;
  throw PyRingattnError(std::string(ringattn_status_name(status)) + ": " + ringattn_last_error());
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Owns a ringattn_comm; close() frees it early (MPI communicators must go before finalize).
class Comm {
 public:
  explicit Comm(ringattn_comm* handle) : handle_(handle) {}
  ~Comm() { ringattn_comm_destroy(handle_); }
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  static std::unique_ptr<Comm> mpi() {
    ringattn_comm* h = nullptr;
    {
      py::gil_scoped_release release;
      check(ringattn_comm_create_mpi(&h));
    }
    return std::make_unique<Comm>(h);
  }
  static std::unique_ptr<Comm> nccl() {
    ringattn_comm* h = nullptr;
    {
      py::gil_scoped_release release;
      check(ringattn_comm_create_nccl(&h));
    }
    return std::make_unique<Comm>(h);
  }
  static std::unique_ptr<Comm> self() {
    ringattn_comm* h = nullptr;
    check(ringattn_comm_create_self(&h));
    return std::make_unique<Comm>(h);
  }

  ringattn_comm* get() const {
    if (handle_ == nullptr) throw PyRingattnError("invalid argument: communicator is closed");
    return handle_;
  }
  int rank() const {
    int r = 0;
    check(ringattn_comm_rank(get(), &r));
    return r;
  }
  int size() const {
    int s = 0;
    check(ringattn_comm_size(get(), &s));
    return s;
  }
  std::string name() const { return ringattn_comm_name(handle_); }
  int device() const {
    int d = -1;
    check(ringattn_comm_device(get(), &d));
    return d;
  }
  void close() {
    ringattn_comm* h = handle_;
    handle_ = nullptr;
    py::gil_scoped_release release;
    check(ringattn_comm_destroy(h));
  }

 private:
  ringattn_comm* handle_;
};

ringattn_spec make_spec(bool causal, int64_t window, int64_t sinks, float scale, int layout) {
  ringattn_spec s{};
  s.causal = causal ? 1 : 0;
  s.window = window;
  s.sinks = sinks;
  s.scale = scale;
  s.layout = layout;
  return s;
}

ringattn_shape make_shape(const std::vector<int64_t>& dims) {
  if (dims.size() != 5) {
    throw PyRingattnError(
        "invalid argument: shape must be (batch, seq_local, heads, kv_heads, "
        "head_dim), found " +
        std::to_string(dims.size()) + " values");
  }
  return ringattn_shape{dims[0], dims[1], dims[2], dims[3], dims[4]};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ringattn C ABI binding (raw pointers; use ringattn.torch for tensors)";
  py::register_exception<PyRingattnError>(m, "Error", PyExc_RuntimeError);

  m.def("version", &ringattn_version, "Library version string.");
  m.def("abi_version", &ringattn_abi_version, "C ABI version of the loaded library.");
  m.attr("WITH_CUDA") = static_cast<bool>(RINGATTN_WITH_CUDA);
  m.attr("WITH_NCCL") = static_cast<bool>(RINGATTN_WITH_NCCL);
  m.attr("F32") = static_cast<int>(RINGATTN_F32);
  m.attr("BF16") = static_cast<int>(RINGATTN_BF16);
  m.attr("F16") = static_cast<int>(RINGATTN_F16);
  m.attr("LAYOUT_AUTO") = static_cast<int>(RINGATTN_LAYOUT_AUTO);
  m.attr("LAYOUT_CONTIGUOUS") = static_cast<int>(RINGATTN_LAYOUT_CONTIGUOUS);
  m.attr("LAYOUT_ZIGZAG") = static_cast<int>(RINGATTN_LAYOUT_ZIGZAG);
  m.attr("REDUCE_F32") = static_cast<int>(RINGATTN_REDUCE_F32);
  m.attr("REDUCE_F64") = static_cast<int>(RINGATTN_REDUCE_F64);
  m.attr("REDUCE_I64") = static_cast<int>(RINGATTN_REDUCE_I64);
  m.attr("SUM") = static_cast<int>(RINGATTN_SUM);
  m.attr("MAX") = static_cast<int>(RINGATTN_MAX);
  m.attr("MIN") = static_cast<int>(RINGATTN_MIN);

  py::class_<Comm>(m, "Comm",
                   "A communicator handle (MPI_COMM_WORLD over MPI or NCCL, or a one-rank self).")
      .def_static("mpi", &Comm::mpi, "Communicator over MPI_COMM_WORLD (initialises MPI).")
      .def_static("nccl", &Comm::nccl,
                  "Communicator over MPI_COMM_WORLD on CUDA device buffers (NCCL; initialises "
                  "MPI; one GPU per rank, by node-local rank; a collective).")
      .def_static("self", &Comm::self, "One-rank communicator without MPI.")
      .def_property_readonly("rank", &Comm::rank)
      .def_property_readonly("size", &Comm::size)
      .def_property_readonly("name", &Comm::name)
      .def_property_readonly("device", &Comm::device,
                             "CUDA device of the tensors ('nccl'), -1 for host tensors.")
      .def("close", &Comm::close, "Frees the handle now (collective for MPI).")
      .def(
          "allreduce",
          [](Comm& c, uintptr_t data, int64_t count, int type, int op) {
            ringattn_comm* h = c.get();
            py::gil_scoped_release release;
            check(ringattn_allreduce(h, ptr<void>(data), count, type, op));
          },
          py::arg("data_ptr"), py::arg("count"), py::arg("type"), py::arg("op"),
          "In-place allreduce of count elements at data_ptr (blocking).")
      .def(
          "broadcast",
          [](Comm& c, uintptr_t data, int64_t bytes, int root) {
            ringattn_comm* h = c.get();
            py::gil_scoped_release release;
            check(ringattn_broadcast(h, ptr<void>(data), bytes, root));
          },
          py::arg("data_ptr"), py::arg("nbytes"), py::arg("root"))
      .def("barrier", [](Comm& c) {
        ringattn_comm* h = c.get();
        py::gil_scoped_release release;
        check(ringattn_barrier(h));
      });

  m.def(
      "mpi_finalize", [] { check(ringattn_mpi_finalize()); },
      "Finalises MPI if the library initialised it (close MPI communicators first).");

  m.def(
      "mpi_abort", [](int code) { check(ringattn_mpi_abort(code)); },
      "MPI_Abort(MPI_COMM_WORLD, code): ends every rank (top-level error handlers only).");

  m.def(
      "resolve_layout",
      [](bool causal, int64_t window, int64_t sinks, int layout) {
        const ringattn_spec s = make_spec(causal, window, sinks, 0.0f, layout);
        int resolved = 0;
        check(ringattn_resolve_layout(&s, &resolved));
        return resolved;
      },
      py::arg("causal"), py::arg("window"), py::arg("sinks"), py::arg("layout"));

  m.def(
      "shard_positions",
      [](bool causal, int64_t window, int64_t sinks, int layout, int64_t seq_len, int world,
         int rank) {
        const ringattn_spec s = make_spec(causal, window, sinks, 0.0f, layout);
        int64_t count = 0;
        check(ringattn_shard_positions(&s, seq_len, world, rank, nullptr, 0, &count));
        std::vector<int64_t> pos(static_cast<size_t>(count));
        check(ringattn_shard_positions(&s, seq_len, world, rank, pos.data(), count, &count));
        return pos;
      },
      py::arg("causal"), py::arg("window"), py::arg("sinks"), py::arg("layout"), py::arg("seq_len"),
      py::arg("world"), py::arg("rank"), "Global positions of rank's tokens, in local order.");

  m.def(
      "forward",
      [](Comm& c, bool causal, int64_t window, int64_t sinks, float scale, int layout,
         int64_t seq_len, const std::vector<int64_t>& shape, int dtype, uintptr_t q, uintptr_t k,
         uintptr_t v, uintptr_t sink_logits, uintptr_t o, uintptr_t lse, int num_threads) {
        const ringattn_spec s = make_spec(causal, window, sinks, scale, layout);
        const ringattn_shape sh = make_shape(shape);
        ringattn_comm* h = c.get();
        py::gil_scoped_release release;
        check(ringattn_forward(h, &s, seq_len, &sh, dtype, ptr<const void>(q), ptr<const void>(k),
                               ptr<const void>(v), ptr<const float>(sink_logits), ptr<void>(o),
                               ptr<float>(lse), num_threads));
      },
      py::arg("comm"), py::arg("causal"), py::arg("window"), py::arg("sinks"), py::arg("scale"),
      py::arg("layout"), py::arg("seq_len"), py::arg("shape"), py::arg("dtype"), py::arg("q"),
      py::arg("k"), py::arg("v"), py::arg("sink_logits"), py::arg("o"), py::arg("lse"),
      py::arg("num_threads") = 0,
      "Ring forward over data pointers (0 = null for sink_logits and lse). A collective; "
      "blocking (CUDA inputs must be ready: synchronise their stream first).");

  m.def(
      "backward",
      [](Comm& c, bool causal, int64_t window, int64_t sinks, float scale, int layout,
         int64_t seq_len, const std::vector<int64_t>& shape, int dtype, uintptr_t q, uintptr_t k,
         uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t dout, uintptr_t sink_logits,
         uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t dsink, int num_threads) {
        const ringattn_spec s = make_spec(causal, window, sinks, scale, layout);
        const ringattn_shape sh = make_shape(shape);
        ringattn_comm* h = c.get();
        py::gil_scoped_release release;
        check(ringattn_backward(h, &s, seq_len, &sh, dtype, ptr<const void>(q), ptr<const void>(k),
                                ptr<const void>(v), ptr<const void>(o), ptr<const float>(lse),
                                ptr<const void>(dout), ptr<const float>(sink_logits), ptr<void>(dq),
                                ptr<void>(dk), ptr<void>(dv), ptr<float>(dsink), num_threads));
      },
      py::arg("comm"), py::arg("causal"), py::arg("window"), py::arg("sinks"), py::arg("scale"),
      py::arg("layout"), py::arg("seq_len"), py::arg("shape"), py::arg("dtype"), py::arg("q"),
      py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("dout"),
      py::arg("sink_logits"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dsink"),
      py::arg("num_threads") = 0,
      "Ring backward over data pointers (0 = null for sink_logits and dsink). A collective; "
      "blocking (CUDA inputs must be ready: synchronise their stream first).");
}
