// `ringattn attend`: the file contract of SPEC section 7. Every rank parses the same flags,
// reads only its shard of each input with MPI-IO, runs the ring, and writes only its part of
// each output into "<out>.partial"; the outputs are renamed into place once every rank has
// succeeded. Every failure is agreed across ranks first, so all ranks exit non-zero with the
// same one-line message and no rank is left waiting.

#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>

#include "comm/mpi/mpi_communicator.h"
#include "comm/mpi/mpi_session.h"
#include "launch/attend_decode.h"
#include "launch/commands.h"
#include "launch/common.h"
#include "launch/problem_flags.h"
#include "launch/ranks.h"
#include "launch/sharded_io.h"
#include "ringattn/ring.h"
#include "runtime/src/backend.h"

namespace po = boost::program_options;

namespace ringattn::launch {
namespace {

struct AttendArgs {
  std::string q, k, v, out, lse, sink_logits;
  bool causal = false;
  int64_t window = 0, sinks = 0;
  double scale = 0.0;
  std::string layout = "auto", backend = "auto", dtype = "f32";
  std::string dout, dq, dk, dv, dsink;
  int64_t decode_from = -1;
};

po::options_description attend_options(AttendArgs& a) {
  po::options_description d(
      "usage: mpirun -np P ringattn attend --q Q.npy --k K.npy --v V.npy --out O.npy [options]\n"
      "Attention over whole-sequence .npy files (f32, [B, N, H, D] and [B, N, H_kv, D]); each\n"
      "rank reads and writes only its own shard. Options");
  d.add_options()("help,h", "show this help")("q", po::value(&a.q),
                                              "queries [B, N, H, D] (.npy, f32)")(
      "k", po::value(&a.k), "keys [B, N, H_kv, D]")("v", po::value(&a.v), "values [B, N, H_kv, D]")(
      "out", po::value(&a.out), "output o [B, N, H, D] (.npy, f32)")(
      "lse", po::value(&a.lse), "optional output lse [B, H, N] (natural log)")(
      "causal", po::bool_switch(&a.causal),
      "causal mask (key j visible to query i only if j <= i)")(
      "window", po::value(&a.window)->default_value(0), "sliding window W (0 = unlimited)")(
      "sinks", po::value(&a.sinks)->default_value(0), "number of global sink tokens S")(
      "sink-logits", po::value(&a.sink_logits), "learned sink logits [H] (.npy, f32)")(
      "scale", po::value(&a.scale)->default_value(0.0), "score scale (0 = 1/sqrt(D))")(
      "layout", po::value(&a.layout)->default_value("auto"), "auto | contiguous | zigzag")(
      "backend", po::value(&a.backend)->default_value("auto"), "auto | cpu | cuda")(
      "dtype", po::value(&a.dtype)->default_value("f32"),
      "compute/storage precision: f32 | bf16 | f16")(
      "dout", po::value(&a.dout),
      "upstream gradient do [B, N, H, D] (.npy, f32): also run the ring backward")(
      "dq", po::value(&a.dq), "output dq [B, N, H, D] (with --dout)")(
      "dk", po::value(&a.dk), "output dk [B, N, H_kv, D] (with --dout)")(
      "dv", po::value(&a.dv), "output dv [B, N, H_kv, D] (with --dout)")(
      "dsink", po::value(&a.dsink),
      "optional output dsink [H], the gradient of --sink-logits (zeros without them)")(
      "decode-from", po::value(&a.decode_from),
      "prefill 0..N0-1 through the ring, then decode N0..N-1 one token at a time through the "
      "distributed KV cache (same output; needs --causal)");
  return d;
}

// Checks one input header: f32, C order, `dims` dimensions.
npy::Header input_header(const std::string& path, const char* flag, size_t dims,
                         const char* expected) {
  RINGATTN_CHECK(!path.empty(), "--", flag, " is required");
  const npy::Header h = npy::read_header(path);
  RINGATTN_CHECK(h.descr == "<f4", path, " (--", flag,
                 "): expected little-endian f32 ('<f4'), got '", h.descr, "'");
  RINGATTN_CHECK(!h.fortran_order, path, " (--", flag, "): expected C order, got Fortran order");
  RINGATTN_CHECK(h.shape.size() == dims, path, " (--", flag, "): expected shape ", expected,
                 ", got ", h.shape_string());
  return h;
}

int attend_main(MpiSession& session, int argc, char** argv) {
  MpiCommunicator comm(MPI_COMM_WORLD);
  const int rank = comm.rank(), world = comm.size();

  AttendArgs a;
  po::variables_map vm;
  const po::options_description desc = attend_options(a);
  AttentionSpec spec;
  DType dtype = DType::kF32;
  npy::Header hq, hk, hv, hdo;
  int64_t batch = 0, seq_len = 0, heads = 0, kv_heads = 0, head_dim = 0;
  std::vector<float> z;
  Backend backend = Backend::kCpu;
  Layout layout = Layout::kContiguous;
  Shard shard;

  // 1. Flags and headers, agreed across ranks before any data moves.
  bool help = false;
  agree(comm, [&] {
    help = parse_options(argc, argv, desc, vm);
    if (help) return;
    RINGATTN_CHECK(!a.out.empty(), "--out is required");
    if (a.dout.empty()) {
      RINGATTN_CHECK(a.dq.empty() && a.dk.empty() && a.dv.empty() && a.dsink.empty(),
                     "--dq/--dk/--dv/--dsink are outputs of the backward, which needs --dout");
    } else {
      RINGATTN_CHECK(!a.dq.empty() && !a.dk.empty() && !a.dv.empty(),
                     "--dout needs the outputs --dq, --dk and --dv");
      RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, !vm.count("decode-from"),
                          "--dout (the backward) cannot be combined with --decode-from");
    }
    backend = select_backend(parse_backend(a.backend), rank == 0);
    dtype = parse_dtype(a.dtype);
    spec.causal = a.causal;
    spec.window = a.window;
    spec.sinks = a.sinks;
    spec.scale = static_cast<float>(a.scale);
    spec.layout = parse_layout(a.layout);
    validate_spec(spec);
    hq = input_header(a.q, "q", 4, "[B, N, H, D]");
    hk = input_header(a.k, "k", 4, "[B, N, H_kv, D]");
    hv = input_header(a.v, "v", 4, "[B, N, H_kv, D]");
    batch = hq.shape[0];
    seq_len = hq.shape[1];
    heads = hq.shape[2];
    head_dim = hq.shape[3];
    kv_heads = hk.shape[2];
    RINGATTN_CHECK(hk.shape[0] == batch && hk.shape[1] == seq_len && hk.shape[3] == head_dim, a.k,
                   ": expected [B, N, H_kv, D] with B=", batch, " N=", seq_len, " D=", head_dim,
                   " as q, got ", hk.shape_string());
    RINGATTN_CHECK(hv.shape == hk.shape, a.v, ": expected the shape of k ", hk.shape_string(),
                   ", got ", hv.shape_string());
    RINGATTN_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0,
                   "heads must be a multiple of kv_heads (H % H_kv == 0), got H=", heads,
                   " H_kv=", kv_heads);
    RINGATTN_CHECK(batch > 0 && head_dim > 0, a.q, ": empty batch or head dimension ",
                   hq.shape_string());
    if (!a.sink_logits.empty()) {
      const npy::Header hz = input_header(a.sink_logits, "sink-logits", 1, "[H]");
      RINGATTN_CHECK(hz.shape[0] == heads, a.sink_logits, ": expected [H] with H=", heads, ", got ",
                     hz.shape_string());
      z = read_small(a.sink_logits, hz);
    }
    if (!a.dout.empty()) {
      hdo = input_header(a.dout, "dout", 4, "[B, N, H, D]");
      RINGATTN_CHECK(hdo.shape == hq.shape, a.dout, ": expected the shape of q ", hq.shape_string(),
                     ", got ", hdo.shape_string());
    }
    layout = resolve_layout(spec.layout, spec.causal, spec.window);
    check_sharding(seq_len, world, layout, spec.sinks);
    if (vm.count("decode-from")) {
      check_decode_from(a.decode_from, seq_len, world, spec);
    } else {
      a.decode_from = -1;
    }
    // With --decode-from, each rank reads its shard of the prefill 0..N0-1 only.
    shard = make_shard(a.decode_from >= 0 ? a.decode_from : seq_len, world, rank, layout);
  });
  if (help) {
    if (rank == 0) std::cout << desc << "\n";
    return 0;
  }

  // 2. Read this rank's shards and convert to the compute dtype.
  const int64_t n = shard.size();
  std::vector<float> qf(static_cast<size_t>(batch * n * heads * head_dim));
  std::vector<float> kf(static_cast<size_t>(batch * n * kv_heads * head_dim)), vf(kf.size());
  agree(comm, [&] {
    read_token_shard(a.q, hq, shard, qf.data());
    read_token_shard(a.k, hk, shard, kf.data());
    read_token_shard(a.v, hv, shard, vf.data());
  });
  std::vector<char> qs, ks, vs;
  void* qp = qf.data();
  void* kp = kf.data();
  void* vp = vf.data();
  if (dtype != DType::kF32) {
    auto narrow = [&](std::vector<float>& src, std::vector<char>& dst) -> void* {
      dst.resize(src.size() * dtype_size(dtype));
      convert(src.data(), DType::kF32, dst.data(), dtype, static_cast<int64_t>(src.size()));
      std::vector<float>().swap(src);
      return dst.data();
    };
    qp = narrow(qf, qs);
    kp = narrow(kf, ks);
    vp = narrow(vf, vs);
  }
  const TensorView q(qp, dtype, {batch, n, heads, head_dim});
  const TensorView k(kp, dtype, {batch, n, kv_heads, head_dim});
  const TensorView v(vp, dtype, {batch, n, kv_heads, head_dim});
  std::vector<float> of(static_cast<size_t>(batch * n * heads * head_dim));
  std::vector<float> lsef(static_cast<size_t>(batch * heads * n));
  const TensorView o(of.data(), DType::kF32, {batch, n, heads, head_dim});
  const TensorView lse(lsef.data(), DType::kF32, {batch, heads, n});
  const TensorView zt(z.empty() ? nullptr : z.data(), DType::kF32, {heads});
  RingOptions options;
  options.num_threads = threads_per_rank(session.local_size());
  const bool backward_pass = !a.dout.empty();
  std::vector<float> dof, dqf, dkf, dvf, dzf;
  RingStats bst;
  // The backward over the (device) views of the forward's tensors; gradients land in dqf, dkf,
  // dvf and dzf on the host.
  const Device device = backend_device(backend);
  std::vector<std::unique_ptr<TensorBuffer>> mirrors;
  auto on_device = [&](const TensorView& t, std::initializer_list<int64_t> shape) {
    if (device == Device::kCPU) return t;
    mirrors.push_back(std::make_unique<TensorBuffer>(device, t.dtype(), shape));
    mirrors.back()->upload(t.data());
    return mirrors.back()->view();
  };
  auto to_host = [&](const TensorView& dev, const TensorView& host) {
    if (device != Device::kCPU) copy_bytes(host.data(), dev.data(), host.nbytes(), device);
  };
  // The forward's tensors where the backend computes (the host views themselves on the CPU).
  struct Mirrored {
    TensorView q, k, v, o, lse, z;
    bool has_z;
    const TensorView* z_ptr() const { return has_z ? &z : nullptr; }
  };
  auto mirror = [&] {
    return Mirrored{on_device(q, {batch, n, heads, head_dim}),
                    on_device(k, {batch, n, kv_heads, head_dim}),
                    on_device(v, {batch, n, kv_heads, head_dim}),
                    on_device(o, {batch, n, heads, head_dim}),
                    on_device(lse, {batch, heads, n}),
                    z.empty() ? zt : on_device(zt, {heads}),
                    !z.empty()};
  };
  auto run_backward = [&](Communicator& rc, const TensorView& qx, const TensorView& kx,
                          const TensorView& vx, const TensorView& ox, const TensorView& lsex,
                          const TensorView* zx) {
    dof.resize(static_cast<size_t>(batch * n * heads * head_dim));
    agree(rc, [&] { read_token_shard(a.dout, hdo, shard, dof.data()); });
    std::vector<char> dos;
    void* dop = dof.data();
    if (dtype != DType::kF32) {
      dos.resize(dof.size() * dtype_size(dtype));
      convert(dof.data(), DType::kF32, dos.data(), dtype, static_cast<int64_t>(dof.size()));
      dop = dos.data();
    }
    dqf.resize(dof.size());
    dkf.resize(static_cast<size_t>(batch * n * kv_heads * head_dim));
    dvf.resize(dkf.size());
    dzf.resize(static_cast<size_t>(heads));
    const TensorView dq(dqf.data(), DType::kF32, {batch, n, heads, head_dim});
    const TensorView dk(dkf.data(), DType::kF32, {batch, n, kv_heads, head_dim});
    const TensorView dv(dvf.data(), DType::kF32, {batch, n, kv_heads, head_dim});
    const TensorView dzt(dzf.data(), DType::kF32, {heads});
    const TensorView doutx =
        on_device(TensorView(dop, dtype, {batch, n, heads, head_dim}), {batch, n, heads, head_dim});
    const TensorView dqx = on_device(dq, {batch, n, heads, head_dim});
    const TensorView dkx = on_device(dk, {batch, n, kv_heads, head_dim});
    const TensorView dvx = on_device(dv, {batch, n, kv_heads, head_dim});
    const TensorView dzx = on_device(dzt, {heads});
    bst =
        backward(rc, spec, seq_len, qx, kx, vx, ox, lsex, doutx, zx, dqx, dkx, dvx, &dzx, options);
    to_host(dqx, dq);
    to_host(dkx, dk);
    to_host(dvx, dv);
    to_host(dzx, dzt);
  };

  // 3. The ring (agrees on the configuration itself). With the CUDA backend every tensor gets a
  // device copy (outputs are copied back after the call) and the ranks talk over NCCL.
  RingStats st;
  std::optional<DecodeFromResult> decoded;
  if (a.decode_from < 0) {
    run_on_ranks(comm, backend, 0, [&](Communicator& rc) {
      const Mirrored x = mirror();
      st = forward(rc, spec, seq_len, x.q, x.k, x.v, x.z_ptr(), x.o, &x.lse, options);
      to_host(x.o, o);
      to_host(x.lse, lse);
      if (a.dout.empty()) return;
      // The backward (--dout): gradients in f32, whatever the compute dtype.
      run_backward(rc, x.q, x.k, x.v, x.o, x.lse, x.z_ptr());
    });
  } else {
    const std::string paths[3] = {a.q, a.k, a.v};
    const npy::Header headers[3] = {hq, hk, hv};
    if (device == Device::kCPU) {
      decoded =
          run_decode_from(comm, spec, a.decode_from, seq_len, q, k, v, z.empty() ? nullptr : &zt, o,
                          lse, paths, headers, options.num_threads);
    } else {
      // The KV cache on the GPU: the prefill's tensors get device copies (outputs copied back);
      // run_decode_from copies the decode tokens up itself.
      run_on_ranks(comm, backend, 0, [&](Communicator& rc) {
        const Mirrored x = mirror();
        decoded = run_decode_from(rc, spec, a.decode_from, seq_len, x.q, x.k, x.v, x.z_ptr(), x.o,
                                  x.lse, paths, headers, options.num_threads);
        to_host(x.o, o);
        to_host(x.lse, lse);
      });
    }
    st = decoded->prefill;
  }

  // 4. Outputs: written as .partial by every rank, renamed into place only if all succeeded.
  // Each collective step (create, close) is its own agreement, so a rank that failed an
  // independent step (a write) never leaves the others inside a collective it skipped.
  std::vector<std::unique_ptr<ShardedOutput>> outputs;
  try {
    agree(comm, [&] {
      outputs.push_back(std::make_unique<ShardedOutput>(
          MPI_COMM_WORLD, a.out, std::vector<int64_t>{batch, seq_len, heads, head_dim}));
    });
    if (!a.lse.empty()) {
      agree(comm, [&] {
        outputs.push_back(std::make_unique<ShardedOutput>(
            MPI_COMM_WORLD, a.lse, std::vector<int64_t>{batch, heads, seq_len}));
      });
    }
    // The backward's outputs follow: dq, dk, dv, then dsink.
    const size_t grad_outputs = outputs.size();
    if (backward_pass) {
      agree(comm, [&] {
        outputs.push_back(std::make_unique<ShardedOutput>(
            MPI_COMM_WORLD, a.dq, std::vector<int64_t>{batch, seq_len, heads, head_dim}));
        outputs.push_back(std::make_unique<ShardedOutput>(
            MPI_COMM_WORLD, a.dk, std::vector<int64_t>{batch, seq_len, kv_heads, head_dim}));
        outputs.push_back(std::make_unique<ShardedOutput>(
            MPI_COMM_WORLD, a.dv, std::vector<int64_t>{batch, seq_len, kv_heads, head_dim}));
        if (!a.dsink.empty()) {
          outputs.push_back(std::make_unique<ShardedOutput>(MPI_COMM_WORLD, a.dsink,
                                                            std::vector<int64_t>{heads}));
        }
      });
    }
    agree(comm, [&] {
      if (backward_pass) {
        write_token_shard(*outputs[grad_outputs], batch, seq_len, heads * head_dim, shard,
                          dqf.data());
        write_token_shard(*outputs[grad_outputs + 1], batch, seq_len, kv_heads * head_dim, shard,
                          dkf.data());
        write_token_shard(*outputs[grad_outputs + 2], batch, seq_len, kv_heads * head_dim, shard,
                          dvf.data());
        // dz is the same on every rank (summed by the backward); rank 0 writes it.
        if (!a.dsink.empty() && rank == 0) outputs[grad_outputs + 3]->write(0, dzf.data(), heads);
      }
      write_token_shard(*outputs[0], batch, seq_len, heads * head_dim, shard, of.data());
      // The decoded tokens' outputs are the same on every rank; rank 0 writes them.
      if (decoded && rank == 0) {
        write_token_shard(*outputs[0], batch, seq_len, heads * head_dim, decoded->decoded,
                          decoded->o.data());
        if (!a.lse.empty()) {
          write_row_shard(*outputs[1], batch, heads, seq_len, decoded->decoded,
                          decoded->lse.data());
        }
      }
      if (!a.lse.empty()) write_row_shard(*outputs[1], batch, heads, seq_len, shard, lsef.data());
    });
    agree(comm, [&] {
      for (auto& out : outputs) out->close();
    });
    agree(comm, [&] {
      for (auto& out : outputs) out->commit();
    });
  } catch (...) {
    for (auto& out : outputs) out->discard();
    throw;
  }
  if (rank == 0 && decoded) {
    const int64_t n_dec = seq_len - a.decode_from;
    std::fprintf(stderr,
                 "ringattn attend: prefilled %lld tokens, decoded %lld one at a time in %.3f s "
                 "(%.3f ms/token)\n",
                 static_cast<long long>(a.decode_from), static_cast<long long>(n_dec),
                 decoded->decode_s, n_dec > 0 ? 1e3 * decoded->decode_s / n_dec : 0.0);
  }
  if (rank == 0) {
    std::fprintf(stderr,
                 "ringattn attend: N=%lld P=%d %s layout, %.3f s (compute %.3f s, comm wait "
                 "%.3f s), wrote %s\n",
                 static_cast<long long>(seq_len), world, layout_name(layout), st.total_s,
                 st.compute_s, st.comm_wait_s, a.out.c_str());
    if (backward_pass) {
      std::fprintf(stderr,
                   "ringattn attend: backward %.3f s (compute %.3f s, comm wait %.3f s), wrote "
                   "%s, %s, %s%s%s\n",
                   bst.total_s, bst.compute_s, bst.comm_wait_s, a.dq.c_str(), a.dk.c_str(),
                   a.dv.c_str(), a.dsink.empty() ? "" : ", ", a.dsink.c_str());
    }
  }
  return 0;
}

}  // namespace

int run_attend(int argc, char** argv) { return run_mpi_command(argc, argv, "attend", attend_main); }

}  // namespace ringattn::launch
