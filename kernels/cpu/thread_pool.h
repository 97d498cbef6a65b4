#pragma once
/// A small persistent pool of std::threads for the CPU kernels. Work is an index range run by
/// the caller plus up to num_threads - 1 pool threads, claimed one index at a time (dynamic
/// scheduling: causal work items differ in cost). Several callers may run jobs at once (ranks
/// that are threads of one process); each caller always works on its own job, so no caller
/// waits on another's work.

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace ringattn::cpu {

/// The process-wide pool (created on first use, threads added on demand, joined at exit).
class ThreadPool {
 public:
  static ThreadPool& instance();

  /// Runs fn(i) for every i in [0, n) on at most num_threads threads, the caller included.
  /// Blocks until all are done; rethrows the first exception an fn threw.
  void parallel_for(int64_t n, int num_threads, const std::function<void(int64_t)>& fn);

  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

 private:
  struct Job;
  ThreadPool() = default;
  void worker_loop();
  static void run_items(Job& job);
  // With mu_ held: a job that still has unclaimed items and room for another helper.
  std::shared_ptr<Job> find_job_locked();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> jobs_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
};

/// RAII: makes OpenBLAS run single-threaded while at least one scope is alive (our own threads
/// already use every core; a pthread OpenBLAS inside them would oversubscribe and serialise on
/// its pool), and restores the previous thread count when the last scope ends, so a later
/// plain sgemm can still use all its threads.
class BlasSingleThreadScope {
 public:
  BlasSingleThreadScope();
  ~BlasSingleThreadScope();
  BlasSingleThreadScope(const BlasSingleThreadScope&) = delete;
  BlasSingleThreadScope& operator=(const BlasSingleThreadScope&) = delete;
};

}  // namespace ringattn::cpu
