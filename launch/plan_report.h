#pragma once
/// Shared by `ringattn plan` and `ringattn scale-test`: the planner's input from the problem
/// flags, and a rank's plan as (name, bytes) rows for tables and JSON.

#include <string>
#include <utility>
#include <vector>

#include "launch/common.h"
#include "launch/problem_flags.h"
#include "ringattn/plan.h"

namespace ringattn::launch {

/// The planner's input for a resolved problem on `ranks` ranks.
PlanInput make_plan_input(const ProblemFlags& flags, const ProblemFlags::Resolved& problem,
                          int ranks, PlanMode mode, int threads, int64_t decode_tokens);

/// The components of a rank's plan that the mode uses, in the order of RankMemory, named as
/// its fields (the JSON keys), followed by "peak".
std::vector<std::pair<std::string, int64_t>> memory_components(const MemoryPlan& plan,
                                                               const RankMemory& rank);

/// {"rank", "tokens", then every component} for JSON.
Json rank_memory_json(const MemoryPlan& plan, const RankMemory& rank);

}  // namespace ringattn::launch
