// `ringattn bench`: benchmarks that print a table for people and write JSON for machines.
// `bench kernel` measures the CPU kernel against the two things it has to beat: the machine's
// sgemm rate (its ceiling: attention is two GEMMs plus a softmax) and the unfused path that
// materialises the N x N score matrix. New benchmarks are one more entry in kBenches below.

#include <cblas.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cpu/attention_cpu.h"
#include "kernels/cpu/attention_cpu_bwd.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/vec_math.h"
#include "launch/commands.h"
#include "launch/common.h"
#include "ringattn/error.h"

namespace po = boost::program_options;

namespace ringattn::launch {
namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Best wall time of `repeats` runs of fn, after one untimed warm-up run (first touch of buffers,
// thread pool start-up, OpenBLAS buffer allocation).
template <typename Fn>
double best_of(int repeats, Fn&& fn) {
  fn();
  double best = 1e300;
  for (int r = 0; r < repeats; ++r) {
    const double t0 = now_seconds();
    fn();
    best = std::min(best, now_seconds() - t0);
  }
  return best;
}

std::vector<int64_t> parse_int_list(const std::string& text, const char* flag) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    std::size_t used = 0;
    int64_t v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    RINGATTN_CHECK(used == item.size() && !item.empty() && v > 0, flag,
                   " must be a comma-separated list of positive integers, got '", text, "'");
    out.push_back(v);
  }
  RINGATTN_CHECK(!out.empty(), flag, " must not be empty");
  return out;
}

// cblas_sgemm of an n x n x n product with `threads` OpenBLAS threads; returns GFLOP/s.
double sgemm_gflops(int64_t n, int threads, int repeats) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> a(static_cast<size_t>(n * n)), b(a.size()), c(a.size());
  for (float& x : a) x = dist(rng);
  for (float& x : b) x = dist(rng);
  const int saved = openblas_get_num_threads();
  openblas_set_num_threads(threads);
  const int ni = static_cast<int>(n);
  const double t = best_of(repeats, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, ni, ni, ni, 1.0f, a.data(), ni, b.data(),
                ni, 0.0f, c.data(), ni);
  });
  openblas_set_num_threads(saved);
  return 2.0 * static_cast<double>(n) * n * n / t * 1e-9;
}

// The unfused baseline: per (batch, head) the full score matrix S = scale Q K^T (sgemm), a row
// softmax with the same vectorised exp, and O = P V (sgemm). Threads over (batch, head), each
// with its own N x N buffer and single-threaded BLAS, as the fused kernel does. Inputs f32.
void unfused_attention(const std::vector<float>& q, const std::vector<float>& k,
                       const std::vector<float>& v, std::vector<float>& o, int64_t batch, int64_t n,
                       int64_t heads, int64_t kv_heads, int64_t d, bool causal, int threads) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int ni = static_cast<int>(n), di = static_cast<int>(d);
  const int ldq = static_cast<int>(heads * d), ldk = static_cast<int>(kv_heads * d);
  cpu::BlasSingleThreadScope blas_scope;
  cpu::ThreadPool::instance().parallel_for(batch * heads, threads, [&](int64_t item) {
    const int64_t b = item / heads, h = item % heads, hk = h / (heads / kv_heads);
    thread_local std::vector<float> s;
    s.resize(static_cast<size_t>(n * n));
    const float* qp = q.data() + (b * n * heads + h) * d;
    const float* kp = k.data() + (b * n * kv_heads + hk) * d;
    const float* vp = v.data() + (b * n * kv_heads + hk) * d;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ni, ni, di, scale, qp, ldq, kp, ldk, 0.0f,
                s.data(), ni);
    for (int64_t i = 0; i < n; ++i) {
      float* row = s.data() + i * n;
      if (causal) std::fill(row + i + 1, row + n, -INFINITY);
      const float m = cpu::row_max(row, n);
      const float sum = cpu::exp_shift_sum(row, n, m);
      cpu::scale_row(row, n, 1.0f / sum);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, ni, di, ni, 1.0f, s.data(), ni, vp, ldk,
                0.0f, o.data() + (b * n * heads + h) * d, ldq);
  });
}

void print_kernel_usage(const po::options_description& opts) {
  std::cout << "usage: ringattn bench kernel [options]\n"
               "  CPU attention kernel vs the same run's cblas_sgemm rate and vs the unfused\n"
               "  sgemm -> softmax -> sgemm path, best of --repeats, causal and not; and the\n"
               "  backward kernel (dq, dk, dv; 2.5x the forward FLOPs) vs the same sgemm rate.\n"
            << opts << std::endl;
}

int bench_kernel(int argc, char** argv) {
  int64_t seq_len = 4096, heads = 8, batch = 1, kv_heads = 0;
  int threads = 0, repeats = 3;
  std::string head_dims_text = "64,128", dtype_text = "f32", json_path, seq_len_text;
  po::options_description opts("options");
  opts.add_options()("help,h", "print this help")(
      "seq-len", po::value<std::string>(&seq_len_text)->default_value("4096"),
      "sequence length N (queries = keys; suffixes k, M)")(
      "heads", po::value<int64_t>(&heads)->default_value(8), "query heads H")(
      "kv-heads", po::value<int64_t>(&kv_heads)->default_value(0), "kv heads H_kv (0 = H)")(
      "head-dims", po::value<std::string>(&head_dims_text)->default_value("64,128"),
      "comma-separated head dimensions D")("batch", po::value<int64_t>(&batch)->default_value(1),
                                           "batch B")(
      "threads", po::value<int>(&threads)->default_value(0),
      "threads for every measurement (0 = $RINGATTN_NUM_THREADS or all cores)")(
      "repeats", po::value<int>(&repeats)->default_value(3), "timed runs; the best is reported")(
      "dtype", po::value<std::string>(&dtype_text)->default_value("f32"), "f32, bf16 or f16")(
      "json", po::value<std::string>(&json_path), "also write the results as JSON to this file");
  po::variables_map vm;
  po::store(po::command_line_parser(argc, argv).options(opts).run(), vm);
  if (vm.count("help")) {
    print_kernel_usage(opts);
    return 0;
  }
  po::notify(vm);
  seq_len = parse_count(seq_len_text, "--seq-len");
  if (kv_heads == 0) kv_heads = heads;
  RINGATTN_CHECK(seq_len > 0 && heads > 0 && batch > 0,
                 "--seq-len, --heads and --batch must be > 0");
  RINGATTN_CHECK(kv_heads > 0 && heads % kv_heads == 0,
                 "--heads must be a multiple of --kv-heads, got ", heads, " and ", kv_heads);
  RINGATTN_CHECK(repeats > 0, "--repeats must be > 0, got ", repeats);
  RINGATTN_CHECK(threads >= 0, "--threads must be >= 0, got ", threads);
  const std::vector<int64_t> head_dims = parse_int_list(head_dims_text, "--head-dims");
  const DType dtype = parse_dtype(dtype_text);
  if (threads == 0) threads = cpu::default_num_threads();

  const double sgemm = sgemm_gflops(2048, threads, repeats);
  std::printf(
      "ringattn bench kernel: N=%lld H=%lld H_kv=%lld B=%lld dtype=%s threads=%d repeats=%d "
      "exp=%s\n",
      static_cast<long long>(seq_len), static_cast<long long>(heads),
      static_cast<long long>(kv_heads), static_cast<long long>(batch), dtype_name(dtype), threads,
      repeats, cpu::vec_isa_name(cpu::best_vec_isa()));
  std::printf("cblas_sgemm 2048^3, %d threads: %.1f GFLOP/s\n\n", threads, sgemm);
  std::printf("%5s  %6s  %12s  %9s  %14s  %12s  %11s  %9s\n", "D", "causal", "ours GFLOP/s",
              "% sgemm", "unfused GFLOP/s", "ours/unfused", "bwd GFLOP/s", "bwd %");

  std::vector<Json> rows;
  for (int64_t d : head_dims) {
    std::mt19937 rng(static_cast<uint32_t>(d));
    std::normal_distribution<float> dist(0.0f, 1.0f);
    const size_t qn = static_cast<size_t>(batch * seq_len * heads * d);
    const size_t kn = static_cast<size_t>(batch * seq_len * kv_heads * d);
    std::vector<float> qf(qn), kf(kn), vf(kn), o_ours(qn), o_unfused(qn), dof(qn);
    for (float& x : qf) x = dist(rng);
    for (float& x : kf) x = dist(rng);
    for (float& x : vf) x = dist(rng);
    for (float& x : dof) x = dist(rng);
    // Inputs in the requested dtype (rounded); the unfused path gets them back as f32.
    const size_t el = dtype_size(dtype);
    std::vector<unsigned char> qs(qn * el), ks(kn * el), vs(kn * el);
    convert(qf.data(), DType::kF32, qs.data(), dtype, static_cast<int64_t>(qn));
    convert(kf.data(), DType::kF32, ks.data(), dtype, static_cast<int64_t>(kn));
    convert(vf.data(), DType::kF32, vs.data(), dtype, static_cast<int64_t>(kn));
    convert(qs.data(), dtype, qf.data(), DType::kF32, static_cast<int64_t>(qn));
    convert(ks.data(), dtype, kf.data(), DType::kF32, static_cast<int64_t>(kn));
    convert(vs.data(), dtype, vf.data(), DType::kF32, static_cast<int64_t>(kn));
    const TensorView q(qs.data(), dtype, {batch, seq_len, heads, d});
    const TensorView k(ks.data(), dtype, {batch, seq_len, kv_heads, d});
    const TensorView v(vs.data(), dtype, {batch, seq_len, kv_heads, d});
    const TensorView o(o_ours.data(), DType::kF32, {batch, seq_len, heads, d});
    // The backward's inputs and outputs: dout in the dtype, lse from the forward, f32 grads.
    std::vector<unsigned char> dos(qn * el);
    convert(dof.data(), DType::kF32, dos.data(), dtype, static_cast<int64_t>(qn));
    const TensorView dout(dos.data(), dtype, {batch, seq_len, heads, d});
    std::vector<float> lse_buf(static_cast<size_t>(batch * heads * seq_len)), dq(qn), dk(kn),
        dv(kn);
    const TensorView lse(lse_buf.data(), DType::kF32, {batch, heads, seq_len});
    const TensorView dqv(dq.data(), DType::kF32, {batch, seq_len, heads, d});
    const TensorView dkv(dk.data(), DType::kF32, {batch, seq_len, kv_heads, d});
    const TensorView dvv(dv.data(), DType::kF32, {batch, seq_len, kv_heads, d});
    std::vector<int64_t> pos(static_cast<size_t>(seq_len));
    for (int64_t i = 0; i < seq_len; ++i) pos[static_cast<size_t>(i)] = i;

    for (bool causal : {false, true}) {
      AttentionSpec spec;
      spec.causal = causal;
      const double flops =
          4.0 * static_cast<double>(seq_len) * seq_len * d * heads * batch * (causal ? 0.5 : 1.0);
      const double t_ours = best_of(repeats, [&] {
        cpu::attention(spec, q, pos.data(), k, v, pos.data(), nullptr, o, nullptr, threads);
      });
      const double t_unfused = best_of(repeats, [&] {
        unfused_attention(qf, kf, vf, o_unfused, batch, seq_len, heads, kv_heads, d, causal,
                          threads);
      });
      cpu::attention(spec, q, pos.data(), k, v, pos.data(), nullptr, o, &lse, threads);
      const double t_bwd = best_of(repeats, [&] {
        cpu::attention_backward(spec, q, pos.data(), k, v, pos.data(), nullptr, o, lse, dout, dqv,
                                dkv, dvv, nullptr, threads);
      });
      const double bwd = 2.5 * flops / t_bwd * 1e-9;
      double max_abs_diff = 0.0;
      for (size_t i = 0; i < qn; ++i) {
        max_abs_diff =
            std::max(max_abs_diff, static_cast<double>(std::fabs(o_ours[i] - o_unfused[i])));
      }
      const double ours = flops / t_ours * 1e-9, unfused = flops / t_unfused * 1e-9;
      std::printf("%5lld  %6s  %12.1f  %8.1f%%  %14.1f  %11.2fx  %11.1f  %8.1f%%\n",
                  static_cast<long long>(d), causal ? "yes" : "no", ours, 100.0 * ours / sgemm,
                  unfused, ours / unfused, bwd, 100.0 * bwd / sgemm);
      std::fflush(stdout);
      rows.push_back(Json()
                         .add("head_dim", d)
                         .add("causal", causal)
                         .add("ours_seconds", t_ours)
                         .add("ours_gflops", ours)
                         .add("pct_of_sgemm", 100.0 * ours / sgemm)
                         .add("unfused_seconds", t_unfused)
                         .add("unfused_gflops", unfused)
                         .add("ours_over_unfused", ours / unfused)
                         .add("max_abs_diff", max_abs_diff)
                         .add("backward_seconds", t_bwd)
                         .add("backward_gflops", bwd)
                         .add("backward_pct_of_sgemm", 100.0 * bwd / sgemm));
    }
  }
  if (!json_path.empty()) {
    Json()
        .add("bench", "kernel")
        .add("seq_len", seq_len)
        .add("heads", heads)
        .add("kv_heads", kv_heads)
        .add("head_dims", std::vector<double>(head_dims.begin(), head_dims.end()))
        .add("batch", batch)
        .add("threads", threads)
        .add("repeats", repeats)
        .add("dtype", dtype_name(dtype))
        .add("exp_isa", cpu::vec_isa_name(cpu::best_vec_isa()))
        .add("sgemm_size", static_cast<int64_t>(2048))
        .add("sgemm_gflops", sgemm)
        .add("results", rows)
        .write_file(json_path);
  }
  return 0;
}

// The benchmarks of `ringattn bench <name>`.
struct BenchEntry {
  const char* name;
  const char* summary;
  int (*run)(int argc, char** argv);
};
const BenchEntry kBenches[] = {
    {"kernel", "CPU attention kernel vs cblas_sgemm and the unfused path", bench_kernel},
    {"ring", "the same problem on 1 rank and on P ranks (run under mpirun)", run_bench_ring},
    {"decode", "KV cache decode latency per token, 1 rank and P ranks (run under mpirun)",
     run_bench_decode},
    {"gpu", "CUDA forward/backward TFLOP/s on one device (compare: scripts/bench_sdpa.py)",
     run_bench_gpu},
};

std::string bench_names() {
  std::string names;
  for (const BenchEntry& b : kBenches) names += (names.empty() ? "" : ", ") + std::string(b.name);
  return names;
}

}  // namespace

int run_bench(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::printf("usage: ringattn bench <name> [options]   (ringattn bench <name> --help)\n");
    for (const BenchEntry& b : kBenches) std::printf("  %-8s %s\n", b.name, b.summary);
    return argc < 2 ? 2 : 0;
  }
  const std::string which = argv[1];
  for (const BenchEntry& b : kBenches) {
    if (which == b.name) return b.run(argc - 1, argv + 1);
  }
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "unknown bench '", which, "': expected ",
                 bench_names());
}

}  // namespace ringattn::launch
