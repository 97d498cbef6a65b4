// `ringattn bench decode`: per-token decode latency through the distributed KV cache, on 1 rank
// and on all P ranks of the mpirun, for a list of cache sizes, with and without a window. The
// cache is filled with KVCache::load (synthetic K/V, no prefill attention), so a 1M-token cache
// costs seconds to set up. Without a window each rank attends its N/P tokens per new token;
// with one (streaming mode) it holds only the sinks and the last W - 1 tokens, whatever N.

#include <mpi.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <thread>

#include "comm/mpi/mpi_communicator.h"
#include "launch/commands.h"
#include "launch/common.h"
#include "launch/problem_flags.h"
#include "ringattn/kv_cache.h"

namespace po = boost::program_options;

namespace ringattn::launch {
namespace {

struct DecodeBenchArgs {
  std::string cache_sizes = "64k,256k,1M", windows = "0,4096";
  int64_t batch = 1, heads = 8, kv_heads = 2, head_dim = 64, sinks = 4;
  int tokens = 32, warmup = 4, threads = 0;
  std::string dtype = "f32", json;
};

std::vector<int64_t> parse_counts(const std::string& text, const char* flag, bool allow_zero) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const int64_t v = item == "0" ? 0 : parse_count(item, flag);
    RINGATTN_CHECK(v > 0 || (allow_zero && v == 0), flag, ": bad entry '", item, "' in '", text,
                   "'");
    out.push_back(v);
  }
  RINGATTN_CHECK(!out.empty(), flag, " must not be empty");
  return out;
}

struct DecodeTiming {
  double p50_s = 0.0, p99_s = 0.0, mean_s = 0.0;
  int64_t keys_per_rank = 0;              // the most keys one rank attended per token (last token)
  size_t cache_bytes = 0;                 // per rank
  double compute_s = 0.0, merge_s = 0.0;  // per token, rank 0
};

// Fills a cache of `size` tokens on `comm` and times `tokens` decode calls of one token each
// (after `warmup` untimed ones). Latency per token is the slowest rank's wall time.
DecodeTiming time_decode(Communicator& comm, const DecodeBenchArgs& a, DType dtype, int64_t size,
                         int64_t window, int threads) {
  KVCacheConfig cfg;
  cfg.spec.causal = true;
  cfg.spec.window = window;
  cfg.spec.sinks = window > 0 ? a.sinks : 0;
  cfg.batch = a.batch;
  cfg.heads = a.heads;
  cfg.kv_heads = a.kv_heads;
  cfg.head_dim = a.head_dim;
  cfg.dtype = dtype;
  cfg.prefill_len = size;
  cfg.max_len = size + a.warmup + a.tokens;
  cfg.max_step_tokens = 1;
  cfg.num_threads = threads;
  KVCache cache(comm, cfg);
  {
    const Layout layout = resolve_layout(cfg.spec.layout, true, window);
    const Shard shard = make_shard(size, comm.size(), comm.rank(), layout);
    const int64_t n = shard.size(), B = a.batch, Hkv = a.kv_heads, D = a.head_dim;
    std::vector<char> kb(static_cast<size_t>(B * n * Hkv * D) * dtype_size(dtype)), vb(kb.size());
    fill_synthetic(shard, B, Hkv, D, 3, 0, 1, dtype, kb.data());
    fill_synthetic(shard, B, Hkv, D, 3, 0, 2, dtype, vb.data());
    cache.load(TensorView(kb.data(), dtype, {B, n, Hkv, D}),
               TensorView(vb.data(), dtype, {B, n, Hkv, D}));
  }
  const int64_t B = a.batch, H = a.heads, Hkv = a.kv_heads, D = a.head_dim;
  const size_t es = dtype_size(dtype);
  std::vector<char> qb(static_cast<size_t>(B * H * D) * es), ob(qb.size());
  std::vector<char> kb(static_cast<size_t>(B * Hkv * D) * es), vb(kb.size());
  std::vector<float> lse(static_cast<size_t>(B * H));
  const TensorView q(qb.data(), dtype, {B, 1, H, D}), o(ob.data(), dtype, {B, 1, H, D});
  const TensorView k(kb.data(), dtype, {B, 1, Hkv, D}), v(vb.data(), dtype, {B, 1, Hkv, D});
  const TensorView tl(lse.data(), DType::kF32, {B, H, 1});
  std::vector<double> lat;
  DecodeTiming t;
  for (int i = 0; i < a.warmup + a.tokens; ++i) {
    Shard token;
    token.runs.push_back(PosRange{cache.length(), cache.length() + 1});
    fill_synthetic(token, B, H, D, 3, 0, 0, dtype, qb.data());
    fill_synthetic(token, B, Hkv, D, 3, 0, 1, dtype, kb.data());
    fill_synthetic(token, B, Hkv, D, 3, 0, 2, dtype, vb.data());
    const double t0 = now_seconds();
    const DecodeStats st = cache.decode(q, k, v, nullptr, o, &tl);
    double dt = now_seconds() - t0;
    if (i < a.warmup) continue;
    lat.push_back(dt);
    t.compute_s += st.compute_s / a.tokens;
    t.merge_s += st.merge_s / a.tokens;
    t.keys_per_rank = st.keys;
  }
  // The slowest rank's time for each token (one allreduce for all of them).
  comm.allreduce(lat.data(), lat.size(), ReduceType::kF64, ReduceOp::kMax);
  comm.allreduce(&t.keys_per_rank, 1, ReduceType::kI64, ReduceOp::kMax);
  double sum = 0.0;
  for (double x : lat) sum += x;
  t.mean_s = sum / static_cast<double>(lat.size());
  std::sort(lat.begin(), lat.end());
  auto pct = [&](double q) {
    return lat[std::min(lat.size() - 1, static_cast<size_t>(q * static_cast<double>(lat.size())))];
  };
  t.p50_s = pct(0.5);
  t.p99_s = pct(0.99);
  t.cache_bytes = cache.bytes();
  return t;
}

int bench_decode_main(MpiSession& session, int argc, char** argv) {
  MpiCommunicator comm(MPI_COMM_WORLD);
  const int rank = comm.rank(), world = comm.size();
  DecodeBenchArgs a;
  po::options_description desc(
      "usage: mpirun -np P --bind-to none ringattn bench decode [options]\n"
      "Per-token decode latency through the distributed KV cache on 1 rank and on P ranks, for\n"
      "each cache size and window (0 = none: every cached token is attended). Options");
  desc.add_options()("help,h", "show this help")(
      "cache-sizes", po::value(&a.cache_sizes)->default_value(a.cache_sizes),
      "comma-separated cache sizes N (tokens before decoding; suffixes k, M)")(
      "windows", po::value(&a.windows)->default_value(a.windows),
      "comma-separated windows W (0 = no window; W > 0 runs the streaming cache)")(
      "sinks", po::value(&a.sinks)->default_value(a.sinks), "sink tokens S with a window")(
      "batch", po::value(&a.batch)->default_value(a.batch), "batch B")(
      "heads", po::value(&a.heads)->default_value(a.heads), "query heads H")(
      "kv-heads", po::value(&a.kv_heads)->default_value(a.kv_heads), "kv heads H_kv")(
      "head-dim", po::value(&a.head_dim)->default_value(a.head_dim), "head dimension D")(
      "tokens", po::value(&a.tokens)->default_value(a.tokens), "timed decode tokens per point")(
      "warmup", po::value(&a.warmup)->default_value(a.warmup), "untimed decode tokens first")(
      "threads", po::value(&a.threads)->default_value(0),
      "kernel threads per rank (0: cores / ranks on the node; the 1-rank run uses P times that)")(
      "dtype", po::value(&a.dtype)->default_value(a.dtype), "f32 | bf16 | f16")(
      "json", po::value(&a.json), "also write the results as JSON to this file");
  po::variables_map vm;
  std::vector<int64_t> sizes, windows;
  DType dtype = DType::kF32;
  bool help = false;
  agree(comm, [&] {
    help = parse_options(argc, argv, desc, vm);
    if (help) return;
    sizes = parse_counts(a.cache_sizes, "--cache-sizes", false);
    windows = parse_counts(a.windows, "--windows", true);
    dtype = parse_dtype(a.dtype);
    RINGATTN_CHECK(a.tokens > 0 && a.warmup >= 0, "--tokens must be > 0 and --warmup >= 0");
    RINGATTN_CHECK(
        a.batch > 0 && a.heads > 0 && a.kv_heads > 0 && a.head_dim > 0 && a.heads % a.kv_heads == 0,
        "--batch, --heads, --kv-heads, --head-dim must be > 0 with H % H_kv == 0");
    for (int64_t n : sizes) RINGATTN_CHECK(n >= 4 * world, "--cache-sizes: ", n, " is too small");
  });
  if (help) {
    if (rank == 0) std::cout << desc << "\n";
    return 0;
  }
  const int threads = a.threads > 0 ? a.threads : threads_per_rank(session.local_size());
  if (rank == 0) {
    std::printf(
        "bench decode: B=%lld H=%lld H_kv=%lld D=%lld %s causal, sinks %lld with a window, "
        "%d tokens (+%d warm-up) per point, %d threads/rank (1-rank run: %d)\n",
        static_cast<long long>(a.batch), static_cast<long long>(a.heads),
        static_cast<long long>(a.kv_heads), static_cast<long long>(a.head_dim), dtype_name(dtype),
        static_cast<long long>(a.sinks), a.tokens, a.warmup, threads, threads * world);
    std::printf("  %-6s %10s %7s %10s %10s %10s %12s %12s %12s\n", "ranks", "cache_N", "window",
                "p50_ms", "p99_ms", "tokens/s", "keys/rank", "cache/rank", "merge_ms");
    std::fflush(stdout);
  }
  std::vector<Json> rows;
  auto record = [&](int ranks, int64_t n, int64_t w, const DecodeTiming& t) {
    if (rank != 0) return;
    std::printf("  %-6d %10lld %7lld %10.3f %10.3f %10.1f %12lld %12s %12.3f\n", ranks,
                static_cast<long long>(n), static_cast<long long>(w), t.p50_s * 1e3, t.p99_s * 1e3,
                1.0 / t.mean_s, static_cast<long long>(t.keys_per_rank),
                format_bytes(static_cast<double>(t.cache_bytes)).c_str(), t.merge_s * 1e3);
    std::fflush(stdout);
    rows.push_back(Json()
                       .add("ranks", ranks)
                       .add("cache_tokens", n)
                       .add("window", w)
                       .add("sinks", w > 0 ? a.sinks : int64_t{0})
                       .add("latency_p50_ms", t.p50_s * 1e3)
                       .add("latency_p99_ms", t.p99_s * 1e3)
                       .add("latency_mean_ms", t.mean_s * 1e3)
                       .add("tokens_per_s", 1.0 / t.mean_s)
                       .add("keys_per_rank", t.keys_per_rank)
                       .add("cache_bytes_per_rank", static_cast<int64_t>(t.cache_bytes))
                       .add("compute_ms", t.compute_s * 1e3)
                       .add("merge_ms", t.merge_s * 1e3));
  };
  for (int64_t w : windows) {
    for (int64_t n : sizes) {
      // 1 rank with the threads of all P (same cores) while the others sleep, then all P.
      if (world > 1) {
        if (rank == 0) {
          MpiCommunicator self(MPI_COMM_SELF);
          record(1, n, w, time_decode(self, a, dtype, n, w, threads * world));
        }
        sleeping_barrier(MPI_COMM_WORLD);
      }
      record(world, n, w, time_decode(comm, a, dtype, n, w, threads));
    }
  }
  if (rank == 0 && !a.json.empty()) {
    Json()
        .add("command", "bench decode")
        .add("ranks", world)
        .add("batch", a.batch)
        .add("heads", a.heads)
        .add("kv_heads", a.kv_heads)
        .add("head_dim", a.head_dim)
        .add("dtype", dtype_name(dtype))
        .add("causal", true)
        .add("threads", threads)
        .add("tokens", static_cast<int64_t>(a.tokens))
        .add("warmup", static_cast<int64_t>(a.warmup))
        .add("results", rows)
        .write_file(a.json);
  }
  return 0;
}

}  // namespace

int run_bench_decode(int argc, char** argv) {
  return run_mpi_command(argc, argv, "bench decode", bench_decode_main);
}

}  // namespace ringattn::launch
