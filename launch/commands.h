#pragma once
/// Subcommands of the `ringattn` program. Each takes the arguments after its own name
/// (argv[0] is the subcommand name) and returns the process exit code; errors are thrown as
/// ringattn::Error and reported by main.

namespace ringattn::launch {

/// `ringattn attend`: the file contract of SPEC section 7.
int run_attend(int argc, char** argv);
/// `ringattn infer`: long-context prefill (and decode) over synthetic inputs.
int run_infer(int argc, char** argv);
/// `ringattn bench kernel|ring|decode|gpu`: benchmarks with a table and --json.
int run_bench(int argc, char** argv);
/// `ringattn bench ring` (argv[0] == "ring"): 1 rank vs P ranks in one mpirun.
int run_bench_ring(int argc, char** argv);
/// `ringattn bench decode` (argv[0] == "decode"): KV cache decode latency, 1 rank and P ranks.
int run_bench_decode(int argc, char** argv);
/// `ringattn bench gpu` (argv[0] == "gpu"): CUDA kernel TFLOP/s; an error in a build without CUDA.
int run_bench_gpu(int argc, char** argv);
/// `ringattn plan`: the bytes each rank needs (no MPI), --solve max-seq-len | min-ranks.
int run_plan(int argc, char** argv);
/// `ringattn scale-test`: a sweep of real runs, measured peak memory against the plan.
int run_scale_test(int argc, char** argv);

}  // namespace ringattn::launch
