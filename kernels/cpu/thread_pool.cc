#include "kernels/cpu/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <exception>

#include <cblas.h>

namespace ringattn::cpu {

struct ThreadPool::Job {
  const std::function<void(int64_t)>* fn = nullptr;
  int64_t n = 0;
  int max_helpers = 0;  // pool threads allowed besides the caller
  int helpers = 0;      // guarded by the pool's mu_
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex done_mu;
  std::condition_variable done_cv;
  std::exception_ptr error;  // guarded by done_mu
};

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::run_items(Job& job) {
  for (;;) {
    // Once every index is claimed nobody touches fn again, so the caller may return (and
    // destroy fn) as soon as `done` reaches n even if a helper still holds the Job.
    const int64_t i = job.next.fetch_add(1);
    if (i >= job.n) return;
    try {
      (*job.fn)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job.done_mu);
      if (!job.error) job.error = std::current_exception();
    }
    if (job.done.fetch_add(1) + 1 == job.n) {
      std::lock_guard<std::mutex> lock(job.done_mu);
      job.done_cv.notify_all();
    }
  }
}

std::shared_ptr<ThreadPool::Job> ThreadPool::find_job_locked() {
  for (const std::shared_ptr<Job>& job : jobs_) {
    if (job->helpers < job->max_helpers && job->next.load() < job->n) return job;
  }
  return nullptr;
}

void ThreadPool::worker_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    std::shared_ptr<Job> job;
    cv_.wait(lock, [&] { return stop_ || (job = find_job_locked()) != nullptr; });
    if (stop_) return;
    ++job->helpers;
    lock.unlock();
    run_items(*job);
    lock.lock();
    --job->helpers;
  }
}

void ThreadPool::parallel_for(int64_t n, int num_threads, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  const int helpers = static_cast<int>(std::min<int64_t>(num_threads, n)) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  job->max_helpers = helpers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Enough idle threads for this job even while other callers' jobs run.
    int busy = 0;
    for (const std::shared_ptr<Job>& j : jobs_) busy += j->max_helpers;
    while (static_cast<int>(workers_.size()) < busy + helpers) {
      workers_.emplace_back([this] { worker_loop(); });
    }
    jobs_.push_back(job);
  }
  cv_.notify_all();
  run_items(*job);
  {
    std::unique_lock<std::mutex> lock(job->done_mu);
    job->done_cv.wait(lock, [&] { return job->done.load() == job->n; });
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
      if (*it == job) {
        jobs_.erase(it);
        break;
      }
    }
  }
  if (job->error) std::rethrow_exception(job->error);
}

namespace {
std::mutex g_blas_mu;
int g_blas_depth = 0;
int g_blas_saved_threads = 1;
}  // namespace

BlasSingleThreadScope::BlasSingleThreadScope() {
  std::lock_guard<std::mutex> lock(g_blas_mu);
  if (g_blas_depth++ == 0) {
    g_blas_saved_threads = openblas_get_num_threads();
    if (g_blas_saved_threads != 1) openblas_set_num_threads(1);
  }
}

BlasSingleThreadScope::~BlasSingleThreadScope() {
  std::lock_guard<std::mutex> lock(g_blas_mu);
  if (--g_blas_depth == 0 && g_blas_saved_threads != 1) {
    openblas_set_num_threads(g_blas_saved_threads);
  }
}

}  // namespace ringattn::cpu
