// `ringattn plan`: the bytes each rank needs, before anything runs. A pure computation (no MPI):
// it evaluates the runtime's own ring plan, so it answers in milliseconds even for P = 1024.

#include "ringattn/plan.h"

#include <algorithm>
#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>

#include "launch/commands.h"
#include "launch/common.h"
#include "launch/plan_report.h"
#include "launch/problem_flags.h"

namespace po = boost::program_options;

namespace ringattn::launch {
namespace {

struct PlanArgs {
  ProblemFlags problem;
  int ranks = 1, threads = 0;
  std::string backend = "cpu";
  std::string mode = "forward", gpu_mem, solve, json, decode_tokens = "0", reserve = "0";
  PlanArgs() { problem.seq_len = "1M"; }
};

// The ranks shown as table columns: all of them up to 8, else the first, the largest and the
// last.
std::vector<int> shown_ranks(const MemoryPlan& plan) {
  const int p = static_cast<int>(plan.ranks.size());
  std::vector<int> out;
  if (p <= 8) {
    for (int r = 0; r < p; ++r) out.push_back(r);
  } else {
    out = {0, plan.max_rank, p - 1};
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
  }
  return out;
}

void print_table(const MemoryPlan& plan) {
  const std::vector<int> cols = shown_ranks(plan);
  std::printf("\n  %-22s", "bytes per rank");
  for (int r : cols) std::printf(" %12s", ("rank " + std::to_string(r)).c_str());
  std::printf("\n  %-22s", "tokens");
  for (int r : cols) std::printf(" %12lld", static_cast<long long>(plan.ranks[r].tokens));
  std::printf("\n");
  const auto names = memory_components(plan, plan.ranks[0]);
  for (size_t i = 0; i < names.size(); ++i) {
    std::printf("  %-22s", names[i].first.c_str());
    for (int r : cols) {
      const int64_t bytes = memory_components(plan, plan.ranks[r])[i].second;
      std::printf(" %12s", format_bytes(static_cast<double>(bytes)).c_str());
    }
    std::printf("\n");
  }
  std::printf(
      "  (peak is the high-water mark, not the sum: the sink copy and the ring buffers,\n"
      "   and the forward's and the backward's buffers, are never held at once)\n");
  if (plan.input.mode == PlanMode::kTrain) {
    std::printf(
        "  (train: dout, dq, dk, dv are allocated after the forward; the backward holds\n"
        "   sink_copy again during its sink phase)\n");
  }
  if (plan.input.mode == PlanMode::kInfer) {
    std::printf("  (infer: the KV cache is allocated before the prefill and never grows)\n");
  }
}

int plan_main(int argc, char** argv) {
  PlanArgs a;
  po::options_description desc(
      "usage: ringattn plan [options]\n"
      "The bytes each rank needs for one attention call (no MPI; answers at once). Options");
  desc.add_options()("help,h", "show this help");
  a.problem.add_to(desc);
  desc.add_options()("ranks", po::value(&a.ranks)->default_value(a.ranks), "ranks P")(
      "mode", po::value(&a.mode)->default_value(a.mode),
      "forward | train (forward + backward) | infer (forward prefill + KV cache)")(
      "decode-tokens", po::value(&a.decode_tokens)->default_value(a.decode_tokens),
      "infer: tokens decoded after the prefill (the cache is sized for N + T)")(
      "threads", po::value(&a.threads)->default_value(0),
      "CPU kernel threads per rank (0: as ringattn would use on this machine with P ranks)")(
      "backend", po::value(&a.backend)->default_value(a.backend),
      "cpu (host memory of the CPU kernels) or cuda (device memory of the CUDA kernels)")(
      "gpu-mem", po::value(&a.gpu_mem),
      "memory per rank, e.g. 80GiB: says whether the plan fits (needed by --solve)")(
      "reserve", po::value(&a.reserve)->default_value(a.reserve),
      "memory per rank the runtime does not own (program, MPI, a CUDA context), taken off "
      "--gpu-mem before fitting, e.g. 64MiB")(
      "solve", po::value(&a.solve),
      "max-seq-len (largest --seq-len that fits) | min-ranks (smallest --ranks that fits)")(
      "json", po::value(&a.json), "also write the plan as JSON to this file ('-': stdout only)");
  po::variables_map vm;
  if (parse_options(argc, argv, desc, vm)) {
    std::cout << desc << "\n";
    return 0;
  }
  const ProblemFlags::Resolved p = a.problem.resolve();
  const PlanMode mode = parse_plan_mode(a.mode);
  RINGATTN_CHECK(a.ranks >= 1, "--ranks must be >= 1, got ", a.ranks);
  RINGATTN_CHECK(a.threads >= 0, "--threads must be >= 0, got ", a.threads);
  const int64_t decode_tokens = parse_count(a.decode_tokens, "--decode-tokens");
  const int64_t gpu_mem = a.gpu_mem.empty() ? 0 : parse_bytes(a.gpu_mem, "--gpu-mem");
  const int64_t reserve = parse_bytes(a.reserve, "--reserve");
  RINGATTN_CHECK(reserve >= 0 && (gpu_mem == 0 || reserve < gpu_mem), "--reserve ", a.reserve,
                 " must be >= 0 and below --gpu-mem ", a.gpu_mem);
  // What the plan must fit in: the device's memory less what the runtime does not own.
  const int64_t budget = gpu_mem > 0 ? gpu_mem - reserve : 0;
  RINGATTN_CHECK(a.solve.empty() || a.solve == "max-seq-len" || a.solve == "min-ranks",
                 "--solve must be max-seq-len or min-ranks, got '", a.solve, "'");
  RINGATTN_CHECK(a.solve.empty() || budget > 0, "--solve ", a.solve, " needs --gpu-mem");

  const int threads = a.threads > 0 ? a.threads : threads_per_rank(a.ranks);
  PlanInput in = make_plan_input(a.problem, p, a.ranks, mode, threads, decode_tokens);
  RINGATTN_CHECK(a.backend == "cpu" || a.backend == "cuda", "--backend must be cpu or cuda, got '",
                 a.backend, "'");
  in.device = a.backend == "cuda" ? Device::kCUDA : Device::kCPU;
  RINGATTN_CHECK_CODE(ErrorCode::kUnsupported,
                      in.device == Device::kCPU || mode != PlanMode::kInfer,
                      "--mode infer (the KV cache) runs on the CPU backend only in this version");
  Json solved;
  if (a.solve == "max-seq-len") {
    const int64_t n = max_seq_len(in, budget);
    RINGATTN_CHECK(n > 0, "no sequence length fits in ", a.gpu_mem, " per rank at P=", a.ranks);
    in.seq_len = n;
    solved.add("max_seq_len", n);
  } else if (a.solve == "min-ranks") {
    const int ranks = min_ranks(in, budget);
    RINGATTN_CHECK(ranks > 0, "no rank count up to min(N, 65536) fits N=", p.seq_len, " in ",
                   a.gpu_mem, " per rank");
    in.ranks = ranks;
    if (a.threads == 0) in.threads = threads_per_rank(ranks);
    solved.add("min_ranks", ranks);
  }
  const MemoryPlan plan = plan_memory(in);
  const RankMemory& worst = plan.ranks[plan.max_rank];

  ProblemFlags::Resolved shown = p;
  shown.seq_len = in.seq_len;
  if (a.json != "-") {
    std::printf("ringattn plan: P=%d %s mode=%s backend=%s threads/rank=%d\n", in.ranks,
                a.problem.describe(shown).c_str(), plan_mode_name(mode), a.backend.c_str(),
                in.threads);
    std::printf("  ring: %d forward hops, %d backward hops\n", plan.forward_hops,
                plan.backward_hops);
    if (a.solve == "max-seq-len") {
      std::printf("  largest N that fits in %s per rank: %lld\n", a.gpu_mem.c_str(),
                  static_cast<long long>(in.seq_len));
    } else if (a.solve == "min-ranks") {
      std::printf("  smallest P that fits in %s per rank: %d\n", a.gpu_mem.c_str(), in.ranks);
    }
    print_table(plan);
    std::printf("\n  peak per rank: %s (rank %d)", format_bytes(worst.peak).c_str(), worst.rank);
    if (budget > 0) {
      std::printf(", %s %s (%.1f%% of the %s left after --reserve %s)",
                  worst.peak <= budget ? "fits in" : "DOES NOT fit in", a.gpu_mem.c_str(),
                  100.0 * worst.peak / budget, format_bytes(static_cast<double>(budget)).c_str(),
                  a.reserve.c_str());
    }
    std::printf("\n");
  }
  if (!a.json.empty()) {
    std::vector<Json> ranks;
    for (const RankMemory& m : plan.ranks) ranks.push_back(rank_memory_json(plan, m));
    Json j;
    j.add("command", "plan").add("seq_len", in.seq_len).add("ranks", in.ranks);
    a.problem.add_to(j, p)
        .add("mode", plan_mode_name(mode))
        .add("threads", in.threads)
        .add("backend", a.backend)
        .add("decode_tokens", decode_tokens)
        .add("forward_hops", plan.forward_hops)
        .add("backward_hops", plan.backward_hops)
        .add("peak", worst.peak)
        .add("max_rank", plan.max_rank);
    if (budget > 0) {
      j.add("gpu_mem", gpu_mem).add("reserve", reserve).add("fits", worst.peak <= budget);
    }
    if (!a.solve.empty()) j.add("solve", solved);
    j.add("per_rank", ranks);
    if (a.json == "-") {
      std::printf("%s\n", j.str().c_str());
    } else {
      j.write_file(a.json);
    }
  }
  return 0;
}

}  // namespace

int run_plan(int argc, char** argv) { return plan_main(argc, argv); }

}  // namespace ringattn::launch
