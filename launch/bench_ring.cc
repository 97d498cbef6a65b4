// `ringattn bench ring`: the same attention problem on 1 rank and on P ranks, in one run.
// Rank 0 first computes the whole sequence alone (with the threads of all P ranks, so both
// runs use the same cores); then all P ranks run the ring. Reported: time of each, parallel
// efficiency t_1 / t_P, and exposed communication (comm wait / total, the worst rank).

#include <mpi.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <thread>

#include "comm/mpi/mpi_communicator.h"
#include "launch/commands.h"
#include "launch/common.h"
#include "launch/problem_flags.h"
#include "launch/ranks.h"
#include "ringattn/ring.h"

namespace po = boost::program_options;

namespace ringattn::launch {
namespace {

struct RingBenchArgs {
  ProblemFlags problem;
  std::string json, backend = "cpu";
  int repeats = 2, threads = 0, virtual_ranks = 0;
};

// Best-of-repeats time of the ring forward on `comm` (every rank of it takes part): this rank's
// RingStats of the best run, with total_s the slowest rank's time.
RingStats time_ring(Communicator& comm, const ProblemFlags& f, const ProblemFlags::Resolved& p,
                    int repeats, int threads, Device device) {
  const Shard shard = make_shard(p.seq_len, comm.size(), comm.rank(), p.layout);
  const int64_t n = shard.size(), B = f.batch, H = f.heads, Hkv = f.kv_heads, D = f.head_dim;
  const size_t es = dtype_size(p.dtype);
  std::vector<char> qb(static_cast<size_t>(B * n * H * D) * es);
  std::vector<char> kb(static_cast<size_t>(B * n * Hkv * D) * es), vb(kb.size());
  fill_synthetic(shard, B, H, D, 7, 0, 0, p.dtype, qb.data());
  fill_synthetic(shard, B, Hkv, D, 7, 0, 1, p.dtype, kb.data());
  fill_synthetic(shard, B, Hkv, D, 7, 0, 2, p.dtype, vb.data());
  TensorBuffer qd(device, p.dtype, {B, n, H, D}), od(device, p.dtype, {B, n, H, D});
  TensorBuffer kd(device, p.dtype, {B, n, Hkv, D}), vd(device, p.dtype, {B, n, Hkv, D});
  qd.upload(qb.data());
  kd.upload(kb.data());
  vd.upload(vb.data());
  const TensorView q = qd.view(), o = od.view(), k = kd.view(), v = vd.view();
  RingOptions options;
  options.num_threads = threads;
  RingStats best;
  best.total_s = 1e300;
  for (int r = 0; r < std::max(1, repeats); ++r) {
    comm.barrier();
    RingStats st = forward(comm, p.spec, p.seq_len, q, k, v, nullptr, o, nullptr, options);
    double t = st.total_s;
    comm.allreduce(&t, 1, ReduceType::kF64, ReduceOp::kMax);
    st.total_s = t;
    if (t < best.total_s) best = st;
  }
  return best;
}

int bench_ring_main(MpiSession& session, int argc, char** argv) {
  MpiCommunicator comm(MPI_COMM_WORLD);
  const int rank = comm.rank();
  RingBenchArgs a;
  po::options_description desc(
      "usage: mpirun -np P --bind-to none ringattn bench ring [options]\n"
      "The same problem on 1 rank and on P ranks in one run: parallel efficiency and exposed\n"
      "communication. Options");
  desc.add_options()("help,h", "show this help");
  a.problem.add_to(desc);
  desc.add_options()("repeats", po::value(&a.repeats)->default_value(a.repeats),
                     "runs of each, best time kept")(
      "threads", po::value(&a.threads)->default_value(0),
      "kernel threads per rank (0: cores / ranks on the node)")(
      "backend", po::value(&a.backend)->default_value(a.backend), "auto | cpu | cuda")(
      "virtual-ranks", po::value(&a.virtual_ranks)->default_value(0),
      "run the P ranks as threads of this one process (with --backend cuda: on one GPU)")(
      "json", po::value(&a.json), "also write the results as JSON to this file");
  po::variables_map vm;
  ProblemFlags::Resolved p;
  Backend backend = Backend::kCpu;
  bool help = false;
  agree(comm, [&] {
    help = parse_options(argc, argv, desc, vm);
    if (help) return;
    p = a.problem.resolve();
    check_virtual_ranks(a.virtual_ranks, comm.size());
    backend = select_backend(parse_backend(a.backend), rank == 0);
    check_sharding(p.seq_len, a.virtual_ranks > 0 ? a.virtual_ranks : comm.size(), p.layout,
                   p.spec.sinks);
  });
  if (help) {
    if (rank == 0) std::cout << desc << "\n";
    return 0;
  }
  const int world = a.virtual_ranks > 0 ? a.virtual_ranks : comm.size();
  const int threads = a.threads > 0 ? a.threads
                                    : threads_per_rank(a.virtual_ranks > 0 ? a.virtual_ranks
                                                                           : session.local_size());
  const Device device = backend_device(backend);

  // 1 rank, with the threads of all P ranks (same cores), while the others sleep. On the GPU:
  // one rank on this process's GPU, against P ranks (virtual ranks: on the same GPU).
  RingStats single;
  if (rank == 0 && device == Device::kCUDA) {
    run_on_ranks(comm, backend, 1, [&](Communicator& one) {
      single = time_ring(one, a.problem, p, a.repeats, threads, device);
    });
  } else if (rank == 0) {
    if (allowed_cpus() < threads * world) {
      std::fprintf(stderr,
                   "bench ring: rank 0 may use only %d CPUs but the single-rank reference needs "
                   "%d; run mpirun with --bind-to none for a fair comparison\n",
                   allowed_cpus(), threads * world);
    }
    MpiCommunicator self(MPI_COMM_SELF);
    single = time_ring(self, a.problem, p, a.repeats, threads * world, device);
  }
  sleeping_barrier(MPI_COMM_WORLD);
  RingStats multi;
  double worst[3] = {0.0, 0.0, 0.0};
  run_on_ranks(comm, backend, a.virtual_ranks, [&](Communicator& ring) {
    const RingStats st = time_ring(ring, a.problem, p, a.repeats, threads, device);
    double w[3] = {st.comm_wait_s / std::max(st.total_s, 1e-12), st.comm_wait_s,
                   static_cast<double>(st.bytes_sent)};
    ring.allreduce(w, 3, ReduceType::kF64, ReduceOp::kMax);
    if (ring.rank() == 0) {
      multi = st;
      std::copy(w, w + 3, worst);
    }
  });
  if (rank != 0) return 0;

  const double efficiency = single.total_s / multi.total_s;
  const double flops = single.flops;
  std::printf("bench ring: %s, backend %s%s, %d threads/rank\n", a.problem.describe(p).c_str(),
              backend_name(backend), a.virtual_ranks > 0 ? " (virtual ranks)" : "", threads);
  std::printf("  %-8s %8s %10s %10s %16s %12s\n", "ranks", "time_s", "GFLOP/s", "speedup",
              "comm_wait/total", "bytes_sent");
  std::printf("  %-8d %8.3f %10.2f %10s %16s %12s\n", 1, single.total_s,
              flops / single.total_s * 1e-9, "1.00", "-", "0 B");
  std::printf("  %-8d %8.3f %10.2f %10.2f %15.1f%% %12s\n", world, multi.total_s,
              flops / multi.total_s * 1e-9, efficiency, 100.0 * worst[0],
              format_bytes(worst[2]).c_str());
  std::printf(
      "  parallel efficiency (t_1 / t_P, same cores): %.1f%%; exposed communication "
      "(worst rank): %.1f%%\n",
      100.0 * efficiency, 100.0 * worst[0]);
  if (!a.json.empty()) {
    Json j;
    j.add("command", "bench ring").add("seq_len", p.seq_len).add("ranks", world);
    a.problem.add_to(j, p)
        .add("threads", threads)
        .add("backend", backend_name(backend))
        .add("virtual_ranks", a.virtual_ranks > 0)
        .add("single_rank_s", single.total_s)
        .add("ring_s", multi.total_s)
        .add("parallel_efficiency", efficiency)
        .add("exposed_comm_fraction", worst[0])
        .add("comm_wait_s", worst[1])
        .add("bytes_sent", static_cast<int64_t>(worst[2]));
    j.write_file(a.json);
  }
  return 0;
}

}  // namespace

int run_bench_ring(int argc, char** argv) {
  return run_mpi_command(argc, argv, "bench ring", bench_ring_main);
}

}  // namespace ringattn::launch
