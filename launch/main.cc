// The `ringattn` program. Dispatches subcommands; every error ends here as one line
// "[rank r] message" on stderr and a non-zero exit.

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "launch/commands.h"
#include "ringattn/config.h"
#include "ringattn/error.h"

namespace {

void print_usage(FILE* out) {
  std::fprintf(out,
               "ringattn %s: exact ring attention across ranks\n"
               "usage: [mpirun -np P] ringattn <command> [options]   (ringattn <command> --help)\n"
               "commands:\n"
               "  attend   attention over .npy files, sharded across ranks (SPEC section 7)\n"
               "  infer    long-context prefill over synthetic inputs (the main job)\n"
               "  bench    benchmarks: kernel (CPU kernel vs sgemm), ring, decode, gpu (CUDA)\n"
               "  plan     bytes each rank needs, largest N / smallest P that fits (no MPI)\n"
               "  scale-test  real runs over a sweep of N: measured peak memory against the plan\n",
               RINGATTN_VERSION);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    print_usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (!std::strcmp(argv[1], "--version")) {
    std::printf("ringattn %s (cuda %d, nccl %d)\n", RINGATTN_VERSION, RINGATTN_WITH_CUDA,
                RINGATTN_WITH_NCCL);
    return 0;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "attend") return ringattn::launch::run_attend(argc - 1, argv + 1);
    if (cmd == "infer") return ringattn::launch::run_infer(argc - 1, argv + 1);
    if (cmd == "bench") return ringattn::launch::run_bench(argc - 1, argv + 1);
    if (cmd == "plan") return ringattn::launch::run_plan(argc - 1, argv + 1);
    if (cmd == "scale-test") return ringattn::launch::run_scale_test(argc - 1, argv + 1);
    std::fprintf(stderr, "ringattn: unknown command '%s' (see ringattn --help)\n", cmd.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringattn %s: %s\n", cmd.c_str(), e.what());
    return 1;
  }
}
