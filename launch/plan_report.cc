#include "launch/plan_report.h"

namespace ringattn::launch {

PlanInput make_plan_input(const ProblemFlags& flags, const ProblemFlags::Resolved& problem,
                          int ranks, PlanMode mode, int threads, int64_t decode_tokens) {
  PlanInput in;
  in.seq_len = problem.seq_len;
  in.ranks = ranks;
  in.batch = flags.batch;
  in.heads = flags.heads;
  in.kv_heads = flags.kv_heads;
  in.head_dim = flags.head_dim;
  in.dtype = problem.dtype;
  in.spec = problem.spec;
  in.mode = mode;
  in.decode_tokens = decode_tokens;
  in.threads = threads;
  return in;
}

std::vector<std::pair<std::string, int64_t>> memory_components(const MemoryPlan& plan,
                                                               const RankMemory& m) {
  const PlanMode mode = plan.input.mode;
  std::vector<std::pair<std::string, int64_t>> rows = {
      {"q", m.q}, {"k", m.k}, {"v", m.v}, {"o", m.o}, {"lse", m.lse}};
  if (mode == PlanMode::kTrain) {
    rows.insert(rows.end(), {{"dout", m.dout}, {"dq", m.dq}, {"dk", m.dk}, {"dv", m.dv}});
  }
  rows.insert(rows.end(), {{"positions", m.positions},
                           {"ring_buffers", m.ring_buffers},
                           {"sink_copy", m.sink_copy},
                           {"softmax_state", m.softmax_state},
                           {"kernel_workspace", m.kernel_workspace}});
  if (mode == PlanMode::kTrain) {
    rows.insert(rows.end(), {{"backward_positions", m.backward_positions},
                             {"backward_state", m.backward_state},
                             {"grad_accumulators", m.grad_accumulators},
                             {"backward_ring_buffers", m.backward_ring_buffers},
                             {"backward_workspace", m.backward_workspace}});
  }
  if (mode == PlanMode::kInfer) rows.emplace_back("cache", m.cache);
  rows.emplace_back("peak", m.peak);
  return rows;
}

Json rank_memory_json(const MemoryPlan& plan, const RankMemory& m) {
  Json j;
  j.add("rank", m.rank).add("tokens", m.tokens);
  for (const auto& [name, bytes] : memory_components(plan, m)) j.add(name, bytes);
  return j;
}

}  // namespace ringattn::launch
