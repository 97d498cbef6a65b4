// `ringattn scale-test`: proves the planner. For each mode and sequence length of a sweep, every
// rank allocates its shards through the accounting allocator, runs the real ring, and reports
// the planned bytes next to the measured peak of the allocator and the process's peak resident
// memory. Lengths run in increasing order: the kernels' per-thread workspaces are kept between
// calls and only grow, so a run never inherits a larger workspace than its own plan counts. The
// plan is the steady state with the workspaces in place; the first run of a mode, which starts
// without some of them, may measure a little less.

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

#include "comm/mpi/mpi_communicator.h"
#include "launch/commands.h"
#include "launch/common.h"
#include "launch/plan_report.h"
#include "launch/problem_flags.h"
#include "launch/ranks.h"
#include "ringattn/kv_cache.h"
#include "ringattn/memory.h"
#include "ringattn/plan.h"
#include "ringattn/ring.h"
#include "runtime/src/sharding.h"

namespace po = boost::program_options;

namespace ringattn::launch {
namespace {

struct ScaleArgs {
  ProblemFlags problem;
  std::string seq_lens = "64k,128k,256k,1M", modes = "forward", json, csv, plot;
  int threads = 0, virtual_ranks = 0;
  std::string backend = "auto";
  int64_t decode_tokens = 8;
  uint64_t seed = 1;
  ScaleArgs() {
    problem.window = 4096;
    problem.sinks = 4;
  }
};

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// Peak resident memory since the last reset_peak_rss(): VmHWM, which Linux resets when "5" is
// written to /proc/self/clear_refs. Returns false when the reset is not permitted (then VmHWM
// is the peak since the process started).
bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return out.good();
}

int64_t peak_rss_since_reset() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;  // kB
  }
  return peak_rss_bytes();
}

// One rank's figures for one (mode, N).
constexpr int kCols = 5;  // tokens, planned, measured, peak_rss, time_s

// Allocates this rank's shards through the accounting allocator, fills them, runs the mode and
// returns {tokens, planned, measured, peak_rss, time}.
// With the CUDA backend the tensors and every runtime buffer live on the GPU and the measured
// figure is the device's accounted peak (the plan is made for the device too); the inputs are
// generated on the host and copied up (that staging buffer is outside the measurement).
std::vector<double> run_one(Communicator& comm, const ScaleArgs& a, const ProblemFlags::Resolved& p,
                            PlanMode mode, int threads, Device device, const MemoryPlan& plan) {
  const int rank = comm.rank();
  const Shard shard = make_shard(p.seq_len, comm.size(), rank, p.layout);
  const int64_t n = shard.size(), B = a.problem.batch, H = a.problem.heads,
                Hkv = a.problem.kv_heads, D = a.problem.head_dim;
  const size_t es = dtype_size(p.dtype);
  // Host staging for the generated inputs (not accounted: std::vector).
  auto generate = [&](TensorBuffer& t, int64_t heads, int tensor) {
    if (device == Device::kCPU) {
      fill_synthetic(shard, B, heads, D, a.seed, 0, tensor, p.dtype, t.data());
      return;
    }
    std::vector<char> host(static_cast<size_t>(B * n * heads * D) * es);
    fill_synthetic(shard, B, heads, D, a.seed, 0, tensor, p.dtype, host.data());
    t.upload(host.data());
  };
  comm.barrier();
  const bool rss_reset = reset_peak_rss();
  reset_memory_peak(device);
  double time_s = 0.0;
  {
    TensorBuffer qb(device, p.dtype, {B, n, H, D}), ob(device, p.dtype, {B, n, H, D});
    TensorBuffer kb(device, p.dtype, {B, n, Hkv, D}), vb(device, p.dtype, {B, n, Hkv, D});
    TensorBuffer lseb(device, DType::kF32, {B, H, n});
    generate(qb, H, 0);
    generate(kb, Hkv, 1);
    generate(vb, Hkv, 2);
    const TensorView q = qb.view(), o = ob.view(), k = kb.view(), v = vb.view(), lse = lseb.view();
    RingOptions options;
    options.num_threads = threads;
    comm.barrier();
    const double t0 = now_seconds();
    if (mode == PlanMode::kInfer) {
      // The cache is allocated before the prefill, as the plan counts it; then it decodes
      // --decode-tokens tokens (their one-token inputs are the caller's, and tiny: plain
      // vectors on the CPU, outside the accounting; token 0 of q, k, v, o on the GPU).
      KVCacheConfig c;
      c.spec = p.spec;
      c.batch = B;
      c.heads = H;
      c.kv_heads = Hkv;
      c.head_dim = D;
      c.dtype = p.dtype;
      c.prefill_len = p.seq_len;
      c.max_len = p.seq_len + a.decode_tokens;
      c.num_threads = threads;
      c.device = device;
      KVCache cache(comm, c);
      cache.prefill(q, k, v, nullptr, o, &lse, options);
      const Shard one{{PosRange{0, 1}}};
      std::vector<char> qn(static_cast<size_t>(B * H * D) * es), on(qn.size());
      std::vector<char> kn(static_cast<size_t>(B * Hkv * D) * es), vn(kn.size());
      // On the GPU the new token goes into token 0 of the (already prefilled, already cached)
      // q, k, v tensors and o's token 0 takes the output, so decode allocates nothing outside
      // the plan.
      auto to_token0 = [&](const TensorView& t, const std::vector<char>& host) {
        const size_t row = static_cast<size_t>(t.size(2) * t.size(3)) * es;
        for (int64_t b = 0; b < B; ++b) {
          copy_bytes(static_cast<char*>(t.data()) + static_cast<size_t>(b * t.stride(0)) * es,
                     host.data() + static_cast<size_t>(b) * row, row, device);
        }
      };
      for (int64_t t = 0; t < a.decode_tokens; ++t) {
        fill_synthetic(one, B, H, D, a.seed, static_cast<int>(t) + 1, 0, p.dtype, qn.data());
        fill_synthetic(one, B, Hkv, D, a.seed, static_cast<int>(t) + 1, 1, p.dtype, kn.data());
        fill_synthetic(one, B, Hkv, D, a.seed, static_cast<int>(t) + 1, 2, p.dtype, vn.data());
        if (device != Device::kCPU) {
          to_token0(q, qn);
          to_token0(k, kn);
          to_token0(v, vn);
          cache.decode(q.slice(1, 0, 1), k.slice(1, 0, 1), v.slice(1, 0, 1), nullptr,
                       o.slice(1, 0, 1), nullptr);
          continue;
        }
        cache.decode(TensorView(qn.data(), p.dtype, {B, 1, H, D}),
                     TensorView(kn.data(), p.dtype, {B, 1, Hkv, D}),
                     TensorView(vn.data(), p.dtype, {B, 1, Hkv, D}), nullptr,
                     TensorView(on.data(), p.dtype, {B, 1, H, D}), nullptr);
      }
    } else {
      forward(comm, p.spec, p.seq_len, q, k, v, nullptr, o, &lse, options);
    }
    if (mode == PlanMode::kTrain) {
      // The gradient tensors exist only in train mode, as the plan counts them.
      TensorBuffer dob(device, p.dtype, {B, n, H, D}), dqb(device, p.dtype, {B, n, H, D});
      TensorBuffer dkb(device, p.dtype, {B, n, Hkv, D}), dvb(device, p.dtype, {B, n, Hkv, D});
      generate(dob, H, 3);
      const TensorView dout = dob.view(), dq = dqb.view(), dk = dkb.view(), dv = dvb.view();
      backward(comm, p.spec, p.seq_len, q, k, v, o, lse, dout, nullptr, dq, dk, dv, nullptr,
               options);
    }
    time_s = now_seconds() - t0;
  }
  const int64_t measured = memory_stats(device).peak_bytes;
  const int64_t rss = rss_reset ? peak_rss_since_reset() : peak_rss_bytes();
  // Virtual ranks share this process's counters: the figure to compare is all ranks together.
  int64_t planned = plan.ranks[rank].peak;
  if (a.virtual_ranks > 0) {
    planned = 0;
    for (const RankMemory& r : plan.ranks) planned += r.peak;
  }
  return {static_cast<double>(n), static_cast<double>(planned), static_cast<double>(measured),
          static_cast<double>(rss), time_s};
}

void scale_test_rank(Communicator& comm, const ScaleArgs& a, const ProblemFlags::Resolved& base,
                     const std::vector<int64_t>& lens, const std::vector<PlanMode>& modes,
                     int threads, Backend backend);

int scale_test_main(MpiSession& session, int argc, char** argv) {
  MpiCommunicator mpi(MPI_COMM_WORLD);
  ScaleArgs a;
  po::options_description desc(
      "usage: mpirun -np P ringattn scale-test [options]\n"
      "For each mode and N of the sweep: allocate, run the real ring, and report per rank the\n"
      "planned bytes, the measured peak of the accounting allocator, peak RSS and time. Options");
  desc.add_options()("help,h", "show this help");
  a.problem.add_to(desc);
  desc.add_options()("seq-lens", po::value(&a.seq_lens)->default_value(a.seq_lens),
                     "comma-separated sequence lengths (run in increasing order; --seq-len is "
                     "ignored)")(
      "modes", po::value(&a.modes)->default_value(a.modes),
      "comma-separated: forward, train (forward then backward), infer (KV cache, prefill, "
      "decode)")("decode-tokens", po::value(&a.decode_tokens)->default_value(a.decode_tokens),
                 "infer: tokens decoded after the prefill")(
      "threads", po::value(&a.threads)->default_value(0),
      "CPU kernel threads per rank (0: cores / ranks on the node)")(
      "backend", po::value(&a.backend)->default_value(a.backend),
      "auto | cpu | cuda (cuda: tensors and buffers on the GPU, device memory measured)")(
      "virtual-ranks", po::value(&a.virtual_ranks)->default_value(0),
      "run P ranks as threads of this one process (with --backend cuda: P ranks on one GPU)")(
      "seed", po::value(&a.seed)->default_value(a.seed), "seed of the synthetic inputs")(
      "json", po::value(&a.json), "write the results as JSON to this file")(
      "csv", po::value(&a.csv), "write the results as CSV to this file (input of --plot)")(
      "plot", po::value(&a.plot),
      "plot memory per rank against N, measured and planned, to this PNG (needs matplotlib)");

  po::variables_map vm;
  bool help = false;
  ProblemFlags::Resolved base;
  std::vector<int64_t> lens;
  std::vector<PlanMode> modes;
  Backend backend = Backend::kCpu;
  agree(mpi, [&] {
    help = parse_options(argc, argv, desc, vm);
    if (help) return;
    base = a.problem.resolve();
    for (const std::string& s : split(a.seq_lens)) lens.push_back(parse_count(s, "--seq-lens"));
    RINGATTN_CHECK(!lens.empty(), "--seq-lens is empty");
    std::sort(lens.begin(), lens.end());
    lens.erase(std::unique(lens.begin(), lens.end()), lens.end());
    for (const std::string& s : split(a.modes)) modes.push_back(parse_plan_mode(s));
    RINGATTN_CHECK(!modes.empty(), "--modes is empty");
    RINGATTN_CHECK(a.decode_tokens >= 0, "--decode-tokens must be >= 0, got ", a.decode_tokens);
    RINGATTN_CHECK(a.threads >= 0, "--threads must be >= 0, got ", a.threads);
    check_virtual_ranks(a.virtual_ranks, mpi.size());
    backend = select_backend(parse_backend(a.backend), mpi.rank() == 0);
    const int ranks = a.virtual_ranks > 0 ? a.virtual_ranks : mpi.size();
    for (int64_t n : lens) check_sharding(n, ranks, base.layout, base.spec.sinks);
  });
  if (help) {
    if (mpi.rank() == 0) std::cout << desc << "\n";
    return 0;
  }
  const int threads = a.threads > 0 ? a.threads
                                    : threads_per_rank(a.virtual_ranks > 0 ? a.virtual_ranks
                                                                           : session.local_size());
  run_on_ranks(mpi, backend, a.virtual_ranks, [&](Communicator& comm) {
    scale_test_rank(comm, a, base, lens, modes, threads, backend);
  });
  return 0;
}

void scale_test_rank(Communicator& comm, const ScaleArgs& a, const ProblemFlags::Resolved& base,
                     const std::vector<int64_t>& lens, const std::vector<PlanMode>& modes,
                     int threads, Backend backend) {
  const int rank = comm.rank(), world = comm.size();
  const Device device = backend_device(backend);
  if (rank == 0) {
    ProblemFlags::Resolved shown = base;
    shown.seq_len = lens.back();
    std::printf("ringattn scale-test: P=%d seq-lens=%s %s backend=%s threads/rank=%d\n", world,
                a.seq_lens.c_str(), a.problem.describe(shown).c_str(), backend_name(backend),
                threads);
    if (a.virtual_ranks > 0) {
      std::printf(
          "  (virtual ranks share one process: planned is the sum over ranks, measured "
          "the process's peak, both the same on every row)\n");
    }
    std::printf("  %-8s %10s %5s %10s %12s %12s %8s %12s %9s\n", "mode", "seq_len", "rank",
                "tokens", "planned", "measured", "ratio", "peak_rss", "time_s");
    std::fflush(stdout);
  }

  std::vector<Json> rows;
  std::ostringstream csv;
  csv << "ranks,mode,seq_len,rank,tokens,planned_bytes,measured_bytes,peak_rss_bytes,time_s\n";
  double worst = 0.0;
  for (PlanMode mode : modes) {
    for (int64_t n : lens) {
      ProblemFlags::Resolved p = base;
      p.seq_len = n;
      PlanInput in = make_plan_input(a.problem, p, world, mode, threads, a.decode_tokens);
      in.device = device;
      const MemoryPlan plan = plan_memory(in);
      std::vector<double> table(static_cast<size_t>(world * kCols), 0.0);
      const std::vector<double> mine = run_one(comm, a, p, mode, threads, device, plan);
      std::copy(mine.begin(), mine.end(), table.begin() + rank * kCols);
      comm.allreduce(table.data(), table.size(), ReduceType::kF64, ReduceOp::kSum);
      if (rank != 0) continue;
      double time_s = 0.0;
      for (int r = 0; r < world; ++r) time_s = std::max(time_s, table[r * kCols + 4]);
      for (int r = 0; r < world; ++r) {
        const double* t = &table[r * kCols];
        const double ratio = t[1] > 0 ? t[2] / t[1] : 0.0;
        worst = std::max(worst, std::fabs(ratio - 1.0));
        std::printf("  %-8s %10lld %5d %10.0f %12s %12s %8.4f %12s %9.2f\n", plan_mode_name(mode),
                    static_cast<long long>(n), r, t[0], format_bytes(t[1]).c_str(),
                    format_bytes(t[2]).c_str(), ratio, format_bytes(t[3]).c_str(), t[4]);
        std::fflush(stdout);
        csv << world << "," << plan_mode_name(mode) << "," << n << "," << r << ","
            << static_cast<int64_t>(t[0]) << "," << static_cast<int64_t>(t[1]) << ","
            << static_cast<int64_t>(t[2]) << "," << static_cast<int64_t>(t[3]) << "," << t[4]
            << "\n";
        rows.push_back(Json()
                           .add("mode", plan_mode_name(mode))
                           .add("seq_len", n)
                           .add("rank", r)
                           .add("tokens", static_cast<int64_t>(t[0]))
                           .add("planned_bytes", static_cast<int64_t>(t[1]))
                           .add("measured_bytes", static_cast<int64_t>(t[2]))
                           .add("peak_rss_bytes", static_cast<int64_t>(t[3]))
                           .add("time_s", t[4])
                           .add("plan", rank_memory_json(plan, plan.ranks[r])));
      }
    }
  }
  if (rank == 0) {
    std::printf("  largest |measured / planned - 1| over every run and rank: %.2f%%\n",
                100.0 * worst);
    if (!a.csv.empty()) {
      std::ofstream out(a.csv);
      out << csv.str();
      RINGATTN_CHECK_CODE(ErrorCode::kIo, out.good(), a.csv, ": cannot write CSV");
    }
    if (!a.json.empty()) {
      Json j;
      j.add("command", "scale-test").add("ranks", world);
      a.problem.add_to(j, base)
          .add("threads", threads)
          .add("backend", backend_name(backend))
          .add("max_relative_error", worst)
          .add("runs", rows);
      j.write_file(a.json);
    }
    if (!a.plot.empty()) {
      // The plot script reads CSVs; without --csv the results go to a file next to the plot.
      const std::string csv_path = a.csv.empty() ? a.plot + ".csv" : a.csv;
      if (a.csv.empty()) {
        std::ofstream out(csv_path);
        out << csv.str();
      }
      const std::string cmd = std::string("/usr/bin/python3 '") + RINGATTN_SOURCE_DIR +
                              "/scripts/plot_memory.py' --out '" + a.plot + "' '" + csv_path + "'";
      if (std::system(cmd.c_str()) != 0) {
        std::fprintf(stderr, "ringattn scale-test: the plot script failed (%s)\n", cmd.c_str());
      }
    }
  }
}

}  // namespace

int run_scale_test(int argc, char** argv) {
  return run_mpi_command(argc, argv, "scale-test", scale_test_main);
}

}  // namespace ringattn::launch
