// `ringattn infer`: long-context prefill over synthetic inputs, the main job. Every rank
// generates only its own shard: each element is a hash of (seed, layer, tensor, batch, global
// position, head, dim), so the inputs, and therefore the outputs, do not depend on the number
// of ranks or the layout. Rank 0 shows progress and a summary of where every rank's time went.

#include <algorithm>
#include <boost/program_options.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>

#include "comm/mpi/mpi_communicator.h"
#include "comm/mpi/mpi_session.h"
#include "launch/commands.h"
#include "launch/common.h"
#include "launch/infer_decode.h"
#include "launch/problem_flags.h"
#include "launch/ranks.h"
#include "ringattn/ring.h"
#include "runtime/src/backend.h"
#include "runtime/src/sharding.h"

namespace po = boost::program_options;

namespace ringattn::launch {
namespace {

struct InferArgs {
  ProblemFlags problem;
  int layers = 4;
  std::string backend = "auto", json;
  uint64_t seed = 1;
  int threads = 0, virtual_ranks = 0;
  int64_t decode_tokens = 0;
  std::string stream_tokens, report_every;
  InferArgs() {
    problem.seq_len = "256k";
    problem.window = 4096;
    problem.sinks = 4;
  }
};

void infer_rank(Communicator& comm, InferArgs& a, const po::variables_map& vm,
                const ProblemFlags::Resolved& p, Backend backend, int local_ranks);

int infer_main(MpiSession& session, int argc, char** argv) {
  MpiCommunicator mpi(MPI_COMM_WORLD);

  InferArgs a;
  po::options_description desc(
      "usage: mpirun -np P ringattn infer [options]\n"
      "Long-context prefill of synthetic inputs through the ring (the defaults show the sink +\n"
      "sliding-window path and finish in about a minute on 2 cores). Options");
  desc.add_options()("help,h", "show this help");
  a.problem.add_to(desc);
  desc.add_options()("layers", po::value(&a.layers)->default_value(a.layers),
                     "attention layers to run")(
      "backend", po::value(&a.backend)->default_value(a.backend), "auto | cpu | cuda")(
      "seed", po::value(&a.seed)->default_value(a.seed), "seed of the synthetic inputs")(
      "threads", po::value(&a.threads)->default_value(0),
      "CPU kernel threads per rank (0: cores / ranks on the node)")(
      "virtual-ranks", po::value(&a.virtual_ranks)->default_value(0),
      "run P ranks as threads of this one process (with --backend cuda: P ranks on one GPU)")(
      "json", po::value(&a.json), "also write the summary as JSON to this file")(
      "decode-tokens", po::value(&a.decode_tokens)->default_value(0),
      "after the prefill, decode T tokens one at a time through the distributed KV cache")(
      "stream-tokens", po::value(&a.stream_tokens),
      "streaming mode (needs --window): stream N tokens through the cache after a prefill of "
      "--seq-len tokens (default: one window), memory constant (suffixes k, M)")(
      "report-every", po::value(&a.report_every),
      "streaming: print memory every this many tokens (default: N / 16)");

  po::variables_map vm;
  ProblemFlags::Resolved p;
  Backend backend = Backend::kCpu;
  bool help = false;
  agree(mpi, [&] {
    help = parse_options(argc, argv, desc, vm);
    if (help) return;
    const bool stream = vm.count("stream-tokens") > 0;
    RINGATTN_CHECK(a.decode_tokens >= 0, "--decode-tokens must be >= 0, got ", a.decode_tokens);
    RINGATTN_CHECK(!(stream && a.decode_tokens > 0),
                   "--stream-tokens and --decode-tokens cannot be combined");
    if (stream) {
      RINGATTN_CHECK(a.problem.window > 0,
                     "--stream-tokens needs --window W > 0 (streaming keeps sinks + the last W)");
      a.decode_tokens = parse_count(a.stream_tokens, "--stream-tokens");
      RINGATTN_CHECK(a.decode_tokens > 0, "--stream-tokens must be > 0");
      // Streaming is about decode: unless told otherwise, prefill just one window.
      if (vm["seq-len"].defaulted()) {
        a.problem.seq_len = std::to_string(
            std::max<int64_t>(a.problem.window, 4 * std::max(mpi.size(), a.virtual_ranks)));
      }
    }
    p = a.problem.resolve();
    RINGATTN_CHECK(a.layers > 0, "--layers must be > 0, got ", a.layers);
    check_virtual_ranks(a.virtual_ranks, mpi.size());
    backend = select_backend(parse_backend(a.backend), mpi.rank() == 0);
    check_sharding(p.seq_len, a.virtual_ranks > 0 ? a.virtual_ranks : mpi.size(), p.layout,
                   p.spec.sinks);
  });
  if (help) {
    if (mpi.rank() == 0) std::cout << desc << "\n";
    return 0;
  }
  const int local_ranks = a.virtual_ranks > 0 ? a.virtual_ranks : session.local_size();
  run_on_ranks(mpi, backend, a.virtual_ranks,
               [&](Communicator& comm) { infer_rank(comm, a, vm, p, backend, local_ranks); });
  return 0;
}

// One rank's part of the job (an MPI rank, an NCCL rank or an in-process virtual rank).
void infer_rank(Communicator& comm, InferArgs& a_shared, const po::variables_map& vm,
                const ProblemFlags::Resolved& p, Backend backend, int local_ranks) {
  const InferArgs& a = a_shared;
  const int rank = comm.rank(), world = comm.size();
  const Shard shard = make_shard(p.seq_len, world, rank, p.layout);
  const Device device = backend_device(backend);

  const int64_t n = shard.size();
  const int64_t B = a.problem.batch, H = a.problem.heads, Hkv = a.problem.kv_heads,
                D = a.problem.head_dim;
  const AttentionSpec& spec = p.spec;
  const DType dtype = p.dtype;
  const int64_t seq_len = p.seq_len;
  const size_t es = dtype_size(dtype);
  // Inputs are generated on the host; with the CUDA backend they are copied to the device
  // (q, k, v, o, lse live there) and o comes back for the checksum.
  std::vector<char> qb(static_cast<size_t>(B * n * H * D) * es);
  std::vector<char> kb(static_cast<size_t>(B * n * Hkv * D) * es), vb(kb.size());
  std::vector<char> ob(qb.size());
  TensorBuffer qd(device, dtype, {B, n, H, D}), kd(device, dtype, {B, n, Hkv, D}),
      vd(device, dtype, {B, n, Hkv, D}), od(device, dtype, {B, n, H, D}),
      lsed(device, DType::kF32, {B, H, n});
  const TensorView q = qd.view(), k = kd.view(), v = vd.view(), o = od.view(), lse = lsed.view();
  RingOptions options;
  options.num_threads = a.threads > 0 ? a.threads : threads_per_rank(local_ranks);

  if (rank == 0) {
    std::printf("ringattn infer: P=%d%s backend=%s %s layers=%d threads/rank=%d\n", world,
                a.virtual_ranks > 0 ? " (virtual ranks)" : "", backend_name(backend),
                a.problem.describe(p).c_str(), a.layers, options.num_threads);
    std::fflush(stdout);
  }

  // One distributed KV cache per layer when decoding follows; sized here, before any token.
  std::unique_ptr<InferDecode> decoder;
  if (a.decode_tokens > 0) {
    DecodeSetup ds;
    ds.cache.spec = spec;
    ds.cache.batch = B;
    ds.cache.heads = H;
    ds.cache.kv_heads = Hkv;
    ds.cache.head_dim = D;
    ds.cache.dtype = dtype;
    ds.cache.prefill_len = seq_len;
    ds.cache.max_len = seq_len + a.decode_tokens;
    ds.cache.max_step_tokens = 1;
    ds.cache.num_threads = options.num_threads;
    ds.cache.device = device;
    ds.layers = a.layers;
    ds.tokens = a.decode_tokens;
    ds.streaming = vm.count("stream-tokens") > 0;
    ds.report_every = ds.streaming ? std::max<int64_t>(1, a.decode_tokens / 16) : 0;
    if (vm.count("report-every")) ds.report_every = parse_count(a.report_every, "--report-every");
    ds.seed = a.seed;
    decoder = std::make_unique<InferDecode>(comm, ds);
    if (rank == 0) {
      std::printf(
          "  KV cache: %lld token slots per rank per layer (%s per rank, all layers)%s\n",
          static_cast<long long>(decoder->cache(0).capacity()),
          format_bytes(static_cast<double>(decoder->cache(0).capacity_bytes()) * a.layers).c_str(),
          spec.window > 0 ? ", streaming: sinks + the last window" : "");
      std::fflush(stdout);
    }
  }

  Progress progress("prefill", a.layers, rank == 0);
  RingStats total;
  double generate_s = 0.0, o_checksum = 0.0;
  comm.barrier();
  const double t0 = now_seconds();
  for (int layer = 0; layer < a.layers; ++layer) {
    const double g0 = now_seconds();
    fill_synthetic(shard, B, H, D, a.seed, layer, 0, dtype, qb.data());
    fill_synthetic(shard, B, Hkv, D, a.seed, layer, 1, dtype, kb.data());
    fill_synthetic(shard, B, Hkv, D, a.seed, layer, 2, dtype, vb.data());
    qd.upload(qb.data());
    kd.upload(kb.data());
    vd.upload(vb.data());
    generate_s += now_seconds() - g0;
    const RingStats st = decoder ? decoder->cache(layer).prefill(q, k, v, nullptr, o, &lse, options)
                                 : forward(comm, spec, seq_len, q, k, v, nullptr, o, &lse, options);
    total.compute_s += st.compute_s;
    total.comm_wait_s += st.comm_wait_s;
    total.broadcast_s += st.broadcast_s;
    total.pack_s += st.pack_s;
    total.bytes_sent += st.bytes_sent;
    total.flops += st.flops;
    total.ring_steps = st.ring_steps;
    total.tiles_computed += st.tiles_computed;
    total.tiles_skipped += st.tiles_skipped;
    progress.update(layer + 1,
                    "layer " + std::to_string(layer + 1) + "/" + std::to_string(a.layers));
  }
  // A checksum of the last layer's output (independent of P and layout up to rounding).
  od.download(ob.data());
  for (int64_t i = 0; i < o.numel(); ++i) o_checksum += load_as_float(ob.data(), dtype, i);
  comm.barrier();
  const double wall = now_seconds() - t0;
  progress.finish();
  Json decode_json;
  if (decoder) {
    decoder->run();
    decode_json = decoder->report();
  }

  // Gather per-rank figures: each rank fills its row, a sum-allreduce gives everyone the table.
  constexpr int kCols = 8;
  std::vector<double> table(static_cast<size_t>(world * kCols), 0.0);
  double* row = &table[static_cast<size_t>(rank * kCols)];
  row[0] = total.compute_s;
  row[1] = total.comm_wait_s;
  row[2] = total.broadcast_s;
  row[3] = static_cast<double>(total.bytes_sent) / a.layers;
  row[4] = static_cast<double>(peak_rss_bytes());
  row[5] = static_cast<double>(n);
  row[6] = total.flops;
  row[7] = o_checksum;
  comm.allreduce(table.data(), table.size(), ReduceType::kF64, ReduceOp::kSum);

  if (rank == 0) {
    const double tokens = static_cast<double>(seq_len) * static_cast<double>(B) * a.layers;
    double flops = 0.0, checksum = 0.0;
    for (int r = 0; r < world; ++r) {
      flops += table[r * kCols + 6];
      checksum += table[r * kCols + 7];
    }
    std::printf(
        "\n  time %.2f s (inputs generated in %.2f s of it), %.0f tokens/s, %.1f GFLOP/s, "
        "ring steps per layer %d\n",
        wall, generate_s, tokens / wall, flops / wall * 1e-9, total.ring_steps);
    std::printf("  %-5s %8s %10s %11s %10s %16s %12s\n", "rank", "tokens", "compute_s",
                "comm_wait_s", "bcast_s", "bytes_sent/layer", "peak_rss");
    std::vector<Json> ranks;
    for (int r = 0; r < world; ++r) {
      const double* t = &table[r * kCols];
      std::printf("  %-5d %8.0f %10.2f %11.3f %10.4f %16s %12s\n", r, t[5], t[0], t[1], t[2],
                  format_bytes(t[3]).c_str(), format_bytes(t[4]).c_str());
      ranks.push_back(Json()
                          .add("rank", r)
                          .add("tokens", static_cast<int64_t>(t[5]))
                          .add("compute_s", t[0])
                          .add("comm_wait_s", t[1])
                          .add("broadcast_s", t[2])
                          .add("bytes_sent_per_layer", static_cast<int64_t>(t[3]))
                          .add("peak_rss_bytes", static_cast<int64_t>(t[4])));
    }
    std::printf("  output checksum %.6e\n", checksum);
    if (!a.json.empty()) {
      Json j;
      j.add("command", "infer").add("seq_len", seq_len).add("ranks", world);
      a.problem.add_to(j, p)
          .add("layers", a.layers)
          .add("threads", options.num_threads)
          .add("backend", backend_name(backend))
          .add("virtual_ranks", a.virtual_ranks > 0)
          .add("time_s", wall)
          .add("generate_s", generate_s)
          .add("tokens_per_s", tokens / wall)
          .add("gflops", flops / wall * 1e-9)
          .add("ring_steps", total.ring_steps)
          .add("output_checksum", checksum)
          .add("per_rank", ranks);
      if (decoder) j.add("decode", decode_json);
      j.write_file(a.json);
    }
  }
}

}  // namespace

int run_infer(int argc, char** argv) { return run_mpi_command(argc, argv, "infer", infer_main); }

}  // namespace ringattn::launch
