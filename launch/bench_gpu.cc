// `ringattn bench gpu`: TFLOP/s of our CUDA forward and backward kernels on one device, for the
// shapes FlashAttention reports (B=1, H=16, D=128, N = 4k..64k, causal and not), so the numbers
// sit next to PyTorch's scaled_dot_product_attention (scripts/bench_sdpa.py) with the same FLOP
// count: forward 4 B H N^2 D (half for causal), backward 2.5x the forward.
//
// The forward is what one rank does with all keys in one block: reset_state, fold_forward,
// finalize_forward (o and lse). The backward: backward_begin (delta, dq = 0), zeroed dk/dv
// accumulators, fold_backward, and the f32 -> dtype stores of dq, dk and dv.

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "launch/commands.h"
#include "launch/common.h"
#include "ringattn/attention.h"
#include "ringattn/config.h"
#include "ringattn/error.h"
#include "ringattn/tensor.h"

#if RINGATTN_WITH_CUDA
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/device.h"
#endif

namespace po = boost::program_options;

namespace ringattn::launch {
namespace {

struct GpuBenchArgs {
  std::string seq_lens = "4k,16k,64k", causal = "both", dtype = "bf16", kernel = "auto", json;
  int64_t batch = 1, heads = 16, kv_heads = 0, head_dim = 128;
  int warmup = 3, iters = 10;
  double max_seconds = 3.0;
  bool backward = true;
  uint64_t seed = 1;
};

void print_gpu_usage(const po::options_description& opts) {
  std::cout
      << "usage: ringattn bench gpu [options]\n"
         "  TFLOP/s of the CUDA forward (reset_state + fold_forward + finalize_forward) and\n"
         "  backward (backward_begin + fold_backward + stores of dq, dk, dv) on device 0, on\n"
         "  fresh random inputs, all keys in one block. FLOPs: forward 4 B H N^2 D (half for\n"
         "  causal), backward 2.5x the forward (FlashAttention's convention). Compare with\n"
         "  scripts/bench_sdpa.py (PyTorch SDPA, same shapes and convention).\n"
      << opts << std::endl;
}

std::vector<int64_t> parse_seq_lens(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(parse_count(item, "--seq-lens"));
  RINGATTN_CHECK(!out.empty(), "--seq-lens must not be empty");
  return out;
}

std::vector<bool> parse_causal(const std::string& text) {
  if (text == "both") return {false, true};
  if (text == "true" || text == "1" || text == "yes") return {true};
  if (text == "false" || text == "0" || text == "no") return {false};
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "--causal must be both, true or false, got '", text,
                 "'");
}

#if RINGATTN_WITH_CUDA

// Approximately standard normal values from (seed, index) alone: splitmix64 -> two uniforms ->
// Box-Muller. Filled by all cores (64k x 16 x 128 is 134M elements per tensor), stored in dtype.
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void fill_random(std::vector<unsigned char>& buf, DType dtype, int64_t n, uint64_t seed) {
  buf.resize(static_cast<size_t>(n) * dtype_size(dtype));
  const int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      const int64_t lo = t * chunk, hi = std::min(n, lo + chunk);
      for (int64_t i = lo; i < hi; ++i) {
        const uint64_t r = splitmix64(seed * 0x632be59bd9b4e019ull + static_cast<uint64_t>(i));
        // u1 in (0, 1], u2 in [0, 1): 32 bits each.
        const double u1 = (static_cast<double>(r >> 32) + 1.0) * (1.0 / 4294967296.0);
        const double u2 = static_cast<double>(r & 0xffffffffull) * (1.0 / 4294967296.0);
        const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
        store_from_float(buf.data(), dtype, i, static_cast<float>(z));
      }
    });
  }
  for (std::thread& th : pool) th.join();
}

// Seconds per call of fn: after `warmup` calls, `iters` calls queued back to back on `stream`
// and one wait at the end (launch overhead overlaps the kernels); the mean is returned and the
// calls made go to *used. A slow kernel gets fewer calls: the first warm-up call is timed alone
// and the counts are cut so that the measurement takes about `max_seconds`.
template <typename Fn>
double time_on_stream(const cuda::Stream& stream, int warmup, int iters, double max_seconds,
                      int* used, Fn&& fn) {
  double t0 = now_seconds();
  fn();
  stream.synchronize();
  const double first = now_seconds() - t0;
  if (first * (warmup + iters) > max_seconds) {
    iters = std::max(1, std::min(iters, static_cast<int>(max_seconds / std::max(first, 1e-9))));
    warmup = std::min(warmup, 1);
  }
  for (int i = 1; i < warmup; ++i) fn();
  stream.synchronize();
  t0 = now_seconds();
  for (int i = 0; i < iters; ++i) fn();
  stream.synchronize();
  *used = iters;
  return (now_seconds() - t0) / iters;
}

struct HostCheck {
  bool finite = true;
  bool nonzero = false;
};

HostCheck check_host(const std::vector<unsigned char>& host, DType dtype, int64_t n) {
  HostCheck c;
  for (int64_t i = 0; i < n; ++i) {
    const float x = load_as_float(host.data(), dtype, i);
    if (!std::isfinite(x)) {
      c.finite = false;
      return c;
    }
    if (x != 0.0f) c.nonzero = true;
  }
  return c;
}

int bench_gpu_cuda(const GpuBenchArgs& a, const std::vector<int64_t>& seq_lens,
                   const std::vector<bool>& masks, DType dtype, cuda::KernelChoice choice) {
  const int devices = cuda::device_count();
  RINGATTN_CHECK_CODE(ErrorCode::kCuda, devices > 0,
                      "bench gpu: no CUDA device is visible (driver missing or no GPU)");
  cuda::set_device(0);
  const std::string device = cuda::device_description(0);
  const int64_t B = a.batch, H = a.heads, Hkv = a.kv_heads, D = a.head_dim;
  const bool tensor_core =
      choice != cuda::KernelChoice::kGeneric && cuda::tensor_core_supported(dtype, D);
  const char* kernel_name = tensor_core ? "tensor_core" : "generic";

  std::printf(
      "ringattn bench gpu: %s\n  B=%lld H=%lld H_kv=%lld D=%lld dtype=%s kernel=%s warmup=%d "
      "iters=%d\n\n",
      device.c_str(), static_cast<long long>(B), static_cast<long long>(H),
      static_cast<long long>(Hkv), static_cast<long long>(D), dtype_name(dtype), kernel_name,
      a.warmup, a.iters);
  std::printf("%8s  %6s  %10s  %12s  %10s  %12s  %6s\n", "N", "causal", "fwd ms", "fwd TFLOP/s",
              "bwd ms", "bwd TFLOP/s", "check");
  std::fflush(stdout);

  cuda::Stream stream;
  const cudaStream_t s = stream.get();
  const size_t el = dtype_size(dtype);
  std::vector<Json> rows;
  bool all_ok = true;
  for (size_t li = 0; li < seq_lens.size(); ++li) {
    const int64_t N = seq_lens[li];
    const int64_t qn = B * N * H * D, kn = B * N * Hkv * D;
    // Fresh inputs for every length (seeded by --seed and N): q, k, v, dout.
    cuda::DeviceBuffer q(qn * el), k(kn * el), v(kn * el), o(qn * el), dout(qn * el);
    {
      std::vector<unsigned char> host;
      const uint64_t base = a.seed * 1000003ull + static_cast<uint64_t>(N) * 4;
      fill_random(host, dtype, qn, base + 0);
      cuda::copy_async(q.data(), host.data(), host.size(), s);
      stream.synchronize();
      fill_random(host, dtype, kn, base + 1);
      cuda::copy_async(k.data(), host.data(), host.size(), s);
      stream.synchronize();
      fill_random(host, dtype, kn, base + 2);
      cuda::copy_async(v.data(), host.data(), host.size(), s);
      stream.synchronize();
      fill_random(host, dtype, qn, base + 3);
      cuda::copy_async(dout.data(), host.data(), host.size(), s);
      stream.synchronize();
    }
    std::vector<int64_t> pos_host(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) pos_host[static_cast<size_t>(i)] = i;
    cuda::DeviceBuffer pos(static_cast<size_t>(N) * sizeof(int64_t));
    cuda::copy_async(pos.data(), pos_host.data(), pos.size(), s);

    // The state's three arrays in buffers of their own (each aligned as cudaMalloc aligns).
    cuda::DeviceBuffer st_m(B * H * N * 4), st_l(B * H * N * 4), st_acc(qn * 4), lse(B * H * N * 4);
    const cuda::ForwardState st{st_m.as<float>(), st_l.as<float>(), st_acc.as<float>(), B, N, H, D};

    const Device dev = Device::kCUDA;
    const TensorView qv(q.data(), dtype, {B, N, H, D}, dev);
    const TensorView kv(k.data(), dtype, {B, N, Hkv, D}, dev);
    const TensorView vv(v.data(), dtype, {B, N, Hkv, D}, dev);
    const TensorView ov(o.data(), dtype, {B, N, H, D}, dev);
    const TensorView dov(dout.data(), dtype, {B, N, H, D}, dev);
    const int64_t* qpos = pos.as<int64_t>();

    // Backward buffers: delta, f32 accumulators dq/dk/dv and the dtype outputs.
    cuda::DeviceBuffer delta, dq_acc, dk_acc, dv_acc, dq_out, dk_out, dv_out;
    if (a.backward) {
      delta.resize(B * H * N * 4);
      dq_acc.resize(qn * 4);
      dk_acc.resize(kn * 4);
      dv_acc.resize(kn * 4);
      dq_out.resize(qn * el);
      dk_out.resize(kn * el);
      dv_out.resize(kn * el);
    }
    const cuda::BackwardState bst{
        lse.as<float>(), delta.as<float>(), dq_acc.as<float>(), B, N, H, D};
    const TensorView dk_accv(dk_acc.data(), DType::kF32, {B, N, Hkv, D}, dev);
    const TensorView dv_accv(dv_acc.data(), DType::kF32, {B, N, Hkv, D}, dev);
    const TensorView dq_outv(dq_out.data(), dtype, {B, N, H, D}, dev);
    const TensorView dk_outv(dk_out.data(), dtype, {B, N, Hkv, D}, dev);
    const TensorView dv_outv(dv_out.data(), dtype, {B, N, Hkv, D}, dev);

    for (bool causal : masks) {
      AttentionSpec spec;
      spec.causal = causal;
      const double fwd_flops =
          4.0 * static_cast<double>(B) * H * static_cast<double>(N) * N * D * (causal ? 0.5 : 1.0);
      auto forward = [&] {
        cuda::reset_state(st, s);
        cuda::fold_forward(spec, qv, qpos, kv, vv, qpos, st, s, choice);
        cuda::finalize_forward(st, nullptr, ov, lse.as<float>(), s);
      };
      int fwd_iters = 0, bwd_iters = 0;
      const double t_fwd =
          time_on_stream(stream, a.warmup, a.iters, a.max_seconds, &fwd_iters, forward);
      // o and lse of the last forward feed the backward (and are checked below).
      forward();
      stream.synchronize();

      double t_bwd = 0.0;
      auto backward = [&] {
        cuda::backward_begin(ov, dov, bst, s);
        cuda::memset_async(dk_acc.data(), 0, dk_acc.size(), s);
        cuda::memset_async(dv_acc.data(), 0, dv_acc.size(), s);
        cuda::fold_backward(spec, qv, qpos, kv, vv, qpos, dov, bst, dk_accv, dv_accv, s, choice);
        cuda::store_f32(bst.dq, dq_outv, s);
        cuda::store_f32(dk_acc.as<float>(), dk_outv, s);
        cuda::store_f32(dv_acc.as<float>(), dv_outv, s);
      };
      if (a.backward) {
        t_bwd = time_on_stream(stream, a.warmup, a.iters, a.max_seconds, &bwd_iters, backward);
      }

      // Garbage fast is no result: o (and dq, dk, dv) must be finite and not all zero.
      std::vector<unsigned char> host(static_cast<size_t>(qn) * el);
      cuda::copy_async(host.data(), o.data(), host.size(), s);
      stream.synchronize();
      HostCheck c = check_host(host, dtype, qn);
      if (a.backward && c.finite && c.nonzero) {
        const std::pair<const cuda::DeviceBuffer*, int64_t> grads[] = {
            {&dq_out, qn}, {&dk_out, kn}, {&dv_out, kn}};
        for (const auto& g : grads) {
          host.resize(static_cast<size_t>(g.second) * el);
          cuda::copy_async(host.data(), g.first->data(), host.size(), s);
          stream.synchronize();
          const HostCheck gc = check_host(host, dtype, g.second);
          c.finite = c.finite && gc.finite;
          c.nonzero = c.nonzero && gc.nonzero;
        }
      }
      const bool ok = c.finite && c.nonzero;
      all_ok = all_ok && ok;

      const double fwd_tflops = fwd_flops / t_fwd * 1e-12;
      const double bwd_tflops = a.backward ? 2.5 * fwd_flops / t_bwd * 1e-12 : 0.0;
      if (a.backward) {
        std::printf("%8lld  %6s  %10.3f  %12.1f  %10.3f  %12.1f  %6s\n", static_cast<long long>(N),
                    causal ? "yes" : "no", t_fwd * 1e3, fwd_tflops, t_bwd * 1e3, bwd_tflops,
                    ok ? "ok" : (c.finite ? "zero" : "NaN"));
      } else {
        std::printf("%8lld  %6s  %10.3f  %12.1f  %10s  %12s  %6s\n", static_cast<long long>(N),
                    causal ? "yes" : "no", t_fwd * 1e3, fwd_tflops, "-", "-",
                    ok ? "ok" : (c.finite ? "zero" : "NaN"));
      }
      std::fflush(stdout);
      Json row;
      row.add("seq_len", N)
          .add("causal", causal)
          .add("forward_flops", fwd_flops)
          .add("forward_seconds", t_fwd)
          .add("forward_tflops", fwd_tflops)
          .add("forward_iters", fwd_iters);
      if (a.backward) {
        row.add("backward_flops", 2.5 * fwd_flops)
            .add("backward_seconds", t_bwd)
            .add("backward_tflops", bwd_tflops)
            .add("backward_iters", bwd_iters);
      }
      row.add("finite", c.finite).add("nonzero", c.nonzero);
      rows.push_back(row);
    }
  }
  if (!a.json.empty()) {
    std::vector<double> lens(seq_lens.begin(), seq_lens.end());
    Json()
        .add("bench", "gpu")
        .add("device", device)
        .add("batch", B)
        .add("heads", H)
        .add("kv_heads", Hkv)
        .add("head_dim", D)
        .add("dtype", dtype_name(dtype))
        .add("kernel", kernel_name)
        .add("warmup", a.warmup)
        .add("iters", a.iters)
        .add("seq_lens", lens)
        .add("flops_convention", "forward 4*B*H*N*N*D (x0.5 causal), backward 2.5x forward")
        .add("all_outputs_ok", all_ok)
        .add("results", rows)
        .write_file(a.json);
  }
  if (!all_ok) {
    std::fprintf(stderr, "ringattn bench gpu: some outputs were NaN/inf or all zero (see check)\n");
    return 1;
  }
  return 0;
}

#endif  // RINGATTN_WITH_CUDA

}  // namespace

int run_bench_gpu(int argc, char** argv) {
  GpuBenchArgs a;
  po::options_description opts("options");
  opts.add_options()("help,h", "print this help")(
      "seq-lens", po::value(&a.seq_lens)->default_value(a.seq_lens),
      "comma-separated sequence lengths N (queries = keys; suffixes k, M)")(
      "batch", po::value(&a.batch)->default_value(a.batch), "batch B")(
      "heads", po::value(&a.heads)->default_value(a.heads), "query heads H")(
      "kv-heads", po::value(&a.kv_heads)->default_value(a.kv_heads), "kv heads H_kv (0 = H)")(
      "head-dim", po::value(&a.head_dim)->default_value(a.head_dim), "head dimension D")(
      "causal", po::value(&a.causal)->default_value(a.causal), "both, true or false")(
      "dtype", po::value(&a.dtype)->default_value(a.dtype), "bf16, f16 or f32")(
      "kernel", po::value(&a.kernel)->default_value(a.kernel),
      "auto, mma (tensor cores) or generic")(
      "backward", po::value(&a.backward)->default_value(a.backward), "also time the backward")(
      "warmup", po::value(&a.warmup)->default_value(a.warmup), "untimed calls before timing")(
      "iters", po::value(&a.iters)->default_value(a.iters), "timed calls (the mean is reported)")(
      "max-seconds", po::value(&a.max_seconds)->default_value(a.max_seconds),
      "fewer calls for a slow case: about this long per measurement")(
      "seed", po::value(&a.seed)->default_value(a.seed), "seed of the random inputs")(
      "json", po::value(&a.json), "also write the results as JSON to this file");
  po::variables_map vm;
  po::store(po::command_line_parser(argc, argv).options(opts).run(), vm);
  if (vm.count("help")) {
    print_gpu_usage(opts);
    return 0;
  }
  po::notify(vm);
  const std::vector<int64_t> seq_lens = parse_seq_lens(a.seq_lens);
  const std::vector<bool> masks = parse_causal(a.causal);
  const DType dtype = parse_dtype(a.dtype);
  if (a.kv_heads == 0) a.kv_heads = a.heads;
  RINGATTN_CHECK(a.batch > 0 && a.heads > 0 && a.head_dim > 0,
                 "--batch, --heads and --head-dim must be > 0");
  RINGATTN_CHECK(a.kv_heads > 0 && a.heads % a.kv_heads == 0,
                 "--heads must be a multiple of --kv-heads, got ", a.heads, " and ", a.kv_heads);
  RINGATTN_CHECK(a.warmup >= 0 && a.iters > 0 && a.max_seconds > 0,
                 "--warmup must be >= 0, --iters and --max-seconds > 0");
  RINGATTN_CHECK(a.kernel == "auto" || a.kernel == "mma" || a.kernel == "generic",
                 "--kernel must be auto, mma or generic, got '", a.kernel, "'");
#if RINGATTN_WITH_CUDA
  const cuda::KernelChoice choice = a.kernel == "mma"       ? cuda::KernelChoice::kTensorCore
                                    : a.kernel == "generic" ? cuda::KernelChoice::kGeneric
                                                            : cuda::KernelChoice::kAuto;
  return bench_gpu_cuda(a, seq_lens, masks, dtype, choice);
#else
  (void)seq_lens;
  (void)masks;
  (void)dtype;
  RINGATTN_THROW(ErrorCode::kUnsupported,
                 "bench gpu needs a CUDA build, and this one has none (RINGATTN_WITH_CUDA=0): "
                 "reconfigure with -DRINGATTN_CUDA=ON");
#endif
}

}  // namespace ringattn::launch
