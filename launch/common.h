#pragma once
/// Small pieces shared by the subcommands: size parsing, resident memory, a JSON writer, and
/// the progress display.

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include <mpi.h>

#include "comm/mpi/mpi_session.h"
#include "ringattn/tensor.h"
#include "runtime/src/sharding.h"

namespace ringattn::launch {

/// Runs an MPI subcommand: owns the MpiSession and reports errors. An error every rank raised
/// together (AgreedError) prints one line on every rank and returns 1 after a normal MPI
/// shutdown; any other error prints "[rank r] ..." and aborts the whole job (MPI_Abort), so a
/// rank that failed alone never leaves the others hanging.
int run_mpi_command(int argc, char** argv, const char* name,
                    const std::function<int(MpiSession&, int, char**)>& body);

/// Fills this rank's [B, shard.size(), heads, dim] part of a synthetic tensor: element
/// (b, token at global position p, h, c) is a uniform value in [-1, 1) derived from
/// (seed, layer, tensor, b, p, h, c) alone, so the global tensor does not depend on P or the
/// layout. Written in `dtype` (round to nearest even).
void fill_synthetic(const Shard& shard, int64_t batch, int64_t heads, int64_t dim, uint64_t seed,
                    int layer, int tensor, DType dtype, void* out);

/// Parses a token count with an optional suffix: "4096", "64k" (x1024), "1M" (x1024^2),
/// "1G". Throws Error naming the flag on anything else.
int64_t parse_count(const std::string& text, const char* flag);

/// Parses a byte size: "8GiB", "512MiB", "80GB" (x1000^3), "1024". Throws Error.
int64_t parse_bytes(const std::string& text, const char* flag);

/// Peak resident set size of this process in bytes (getrusage).
int64_t peak_rss_bytes();
/// Current resident set size of this process in bytes (/proc/self/statm).
int64_t current_rss_bytes();

/// "1.50 GiB", "512.0 MiB", "12 B".
std::string format_bytes(double bytes);

/// A barrier that sleeps (2 ms polls) instead of spinning: MPI's blocking barrier busy-polls,
/// which would take a core from a rank that measures alone (the single-rank rows of the
/// benchmarks) while the others wait.
void sleeping_barrier(MPI_Comm comm);

/// Monotonic wall clock in seconds.
double now_seconds();

/// CPUs this process may run on (its affinity mask: mpirun binds ranks by default).
int allowed_cpus();

/// Threads each rank's CPU kernel should use: $RINGATTN_NUM_THREADS, else the cores of the
/// node divided by the ranks on this node, at most allowed_cpus() (at least 1).
int threads_per_rank(int local_ranks);

/// A minimal JSON writer producing one object (keys in insertion order, snake_case).
class Json {
 public:
  Json& add(const std::string& key, double value);
  Json& add(const std::string& key, int64_t value);
  Json& add(const std::string& key, int value) { return add(key, static_cast<int64_t>(value)); }
  Json& add(const std::string& key, bool value);
  Json& add(const std::string& key, const std::string& value);
  Json& add(const std::string& key, const char* value) { return add(key, std::string(value)); }
  Json& add(const std::string& key, const Json& object);
  Json& add(const std::string& key, const std::vector<Json>& array);
  Json& add(const std::string& key, const std::vector<double>& array);
  std::string str() const;
  /// Writes str() to path; throws Error(kIo) on failure.
  void write_file(const std::string& path) const;

 private:
  std::vector<std::pair<std::string, std::string>> items_;
};

/// Progress for rank 0: a redrawn bar on a terminal, plain lines otherwise.
class Progress {
 public:
  Progress(std::string label, int64_t total, bool enabled);
  /// Reports `done` of `total` units with a short note ("layer 2/4").
  void update(int64_t done, const std::string& note);
  void finish();

 private:
  std::string label_;
  int64_t total_;
  bool enabled_, tty_;
  double start_;
  bool finished_ = false;
};

}  // namespace ringattn::launch
