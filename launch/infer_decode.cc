// `ringattn infer --decode-tokens T | --stream-tokens N`: decode through the distributed KV cache
// after the prefill. Decode inputs are replicated: every rank generates the same new token
// (a hash of seed, layer, tensor and its global position, as fill_synthetic does for the
// prefill), so the decoded outputs do not depend on P either.

#include "launch/infer_decode.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "launch/ranks.h"
#include "ringattn/memory.h"

namespace ringattn::launch {
namespace {

constexpr double kMinLatency = 1e-6;
constexpr int kBinsPerDecade = 1000, kDecades = 8;

}  // namespace

LatencyHistogram::LatencyHistogram() : bins_(static_cast<size_t>(kBinsPerDecade * kDecades), 0) {}

void LatencyHistogram::add(double seconds) {
  const double x = std::log10(std::max(seconds, kMinLatency) / kMinLatency) * kBinsPerDecade;
  const int64_t bin = std::min<int64_t>(static_cast<int64_t>(x), bins_.size() - 1);
  ++bins_[static_cast<size_t>(bin)];
  ++count_;
}

double LatencyHistogram::quantile(double q) const {
  if (count_ == 0) return 0.0;
  const int64_t rank = std::min<int64_t>(count_ - 1, static_cast<int64_t>(q * count_));
  int64_t seen = 0;
  for (size_t b = 0; b < bins_.size(); ++b) {
    seen += bins_[b];
    if (seen > rank) return kMinLatency * std::pow(10.0, (b + 0.5) / kBinsPerDecade);
  }
  return kMinLatency * std::pow(10.0, kDecades);
}

InferDecode::InferDecode(Communicator& comm, const DecodeSetup& setup)
    : comm_(comm), setup_(setup) {
  for (int layer = 0; layer < setup_.layers; ++layer) {
    caches_.push_back(std::make_unique<KVCache>(comm_, setup_.cache));
  }
}

void InferDecode::run() {
  const KVCacheConfig& c = setup_.cache;
  const int64_t B = c.batch, H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
  const size_t es = dtype_size(c.dtype);
  std::vector<char> qb(static_cast<size_t>(B * H * D) * es),
      kb(static_cast<size_t>(B * Hkv * D) * es);
  std::vector<char> vb(kb.size()), ob(qb.size());
  std::vector<float> lseb(static_cast<size_t>(B * H));
  TensorView q(qb.data(), c.dtype, {B, 1, H, D}), o(ob.data(), c.dtype, {B, 1, H, D});
  TensorView k(kb.data(), c.dtype, {B, 1, Hkv, D}), v(vb.data(), c.dtype, {B, 1, Hkv, D});
  TensorView lse(lseb.data(), DType::kF32, {B, H, 1});
  // A CUDA cache decodes device tensors: the synthetic tokens are generated on the host and
  // copied up, o comes back for the checksum. Memory is the accounted bytes of that device.
  const bool on_device = c.device != Device::kCPU;
  std::unique_ptr<TensorBuffer> qd, kd, vd, od, ld;
  if (on_device) {
    qd = std::make_unique<TensorBuffer>(c.device, c.dtype,
                                        std::initializer_list<int64_t>{B, 1, H, D});
    kd = std::make_unique<TensorBuffer>(c.device, c.dtype,
                                        std::initializer_list<int64_t>{B, 1, Hkv, D});
    vd = std::make_unique<TensorBuffer>(c.device, c.dtype,
                                        std::initializer_list<int64_t>{B, 1, Hkv, D});
    od = std::make_unique<TensorBuffer>(c.device, c.dtype,
                                        std::initializer_list<int64_t>{B, 1, H, D});
    ld = std::make_unique<TensorBuffer>(c.device, DType::kF32,
                                        std::initializer_list<int64_t>{B, H, 1});
    q = qd->view();
    k = kd->view();
    v = vd->view();
    o = od->view();
    lse = ld->view();
  }
  const bool rank0 = comm_.rank() == 0;

  comm_.barrier();
  mem_start_ = mem_min_ = mem_max_ = memory_stats(c.device).current_bytes;
  rss_start_ = current_rss_bytes();
  reset_memory_peak(c.device);
  Progress progress("decode", setup_.tokens, rank0 && !setup_.streaming);
  const double t0 = now_seconds();
  for (int64_t i = 0; i < setup_.tokens; ++i) {
    const int64_t p = caches_[0]->length();
    Shard token;
    token.runs.push_back(PosRange{p, p + 1});
    double token_s = 0.0;
    for (int layer = 0; layer < setup_.layers; ++layer) {
      fill_synthetic(token, B, H, D, setup_.seed, layer, 0, c.dtype, qb.data());
      fill_synthetic(token, B, Hkv, D, setup_.seed, layer, 1, c.dtype, kb.data());
      fill_synthetic(token, B, Hkv, D, setup_.seed, layer, 2, c.dtype, vb.data());
      if (on_device) {
        qd->upload(qb.data());
        kd->upload(kb.data());
        vd->upload(vb.data());
      }
      const double s0 = now_seconds();
      const DecodeStats st = caches_[static_cast<size_t>(layer)]->decode(q, k, v, nullptr, o, &lse);
      token_s += now_seconds() - s0;
      compute_s_ += st.compute_s;
      merge_s_ += st.merge_s;
    }
    latency_.add(token_s);
    if (on_device) od->download(ob.data());
    for (int64_t x = 0; x < o.numel(); ++x) checksum_ += load_as_float(ob.data(), c.dtype, x);
    const bool report = setup_.report_every > 0 && ((i + 1) % setup_.report_every == 0);
    if (report) {
      // The largest figures over ranks: one small collective every report_every tokens.
      const int64_t now = memory_stats(c.device).current_bytes;
      mem_min_ = std::min(mem_min_, now);
      mem_max_ = std::max(mem_max_, now);
      int64_t m[2] = {now, current_rss_bytes()};
      comm_.allreduce(m, 2, ReduceType::kI64, ReduceOp::kMax);
      if (rank0) {
        const double el = now_seconds() - t0;
        std::printf(
            "  %10lld tokens  %8.1f s  %9.0f tokens/s  accounted %10s  rss %10s  (max over "
            "ranks)\n",
            static_cast<long long>(i + 1), el, (i + 1) / el,
            format_bytes(static_cast<double>(m[0])).c_str(),
            format_bytes(static_cast<double>(m[1])).c_str());
        std::fflush(stdout);
      }
    } else if (!setup_.streaming && (i + 1) % std::max<int64_t>(1, setup_.tokens / 10) == 0) {
      progress.update(i + 1, "token " + std::to_string(i + 1));
    }
  }
  comm_.barrier();
  wall_s_ = now_seconds() - t0;
  progress.finish();
  mem_end_ = memory_stats(c.device).current_bytes;
  mem_peak_ = memory_stats(c.device).peak_bytes;
  mem_min_ = std::min(mem_min_, mem_end_);
  mem_max_ = std::max(mem_max_, mem_end_);
  rss_end_ = current_rss_bytes();
}

Json InferDecode::report() {
  const int rank = comm_.rank(), world = comm_.size();
  constexpr int kCols = 10;
  std::vector<double> table(static_cast<size_t>(world * kCols), 0.0);
  double* row = &table[static_cast<size_t>(rank * kCols)];
  size_t cache_bytes = 0;
  for (const auto& cache : caches_) cache_bytes += cache->bytes();
  row[0] = static_cast<double>(caches_[0]->local_tokens());
  row[1] = static_cast<double>(cache_bytes);
  row[2] = static_cast<double>(mem_start_);
  row[3] = static_cast<double>(mem_end_);
  row[4] = static_cast<double>(mem_peak_);
  row[5] = static_cast<double>(rss_start_);
  row[6] = static_cast<double>(rss_end_);
  row[7] = compute_s_;
  row[8] = merge_s_;
  row[9] = static_cast<double>(mem_max_ - mem_min_);
  comm_.allreduce(table.data(), table.size(), ReduceType::kF64, ReduceOp::kSum);

  const double p50 = latency_.quantile(0.5), p99 = latency_.quantile(0.99);
  const double tps = setup_.tokens / std::max(wall_s_, 1e-12);
  Json j;
  j.add("tokens", setup_.tokens)
      .add("stream_tokens_run", setup_.streaming)
      .add("streaming_cache", caches_[0]->streaming())
      .add("layers", setup_.layers)
      .add("final_length", caches_[0]->length())
      .add("capacity_tokens_per_rank", caches_[0]->capacity())
      .add("time_s", wall_s_)
      .add("tokens_per_s", tps)
      .add("latency_p50_ms", p50 * 1e3)
      .add("latency_p99_ms", p99 * 1e3)
      .add("output_checksum", checksum_);
  std::vector<Json> ranks;
  if (rank == 0) {
    std::printf(
        "\n  decode: %lld tokens x %d layers in %.2f s, %.1f tokens/s, per-token latency p50 "
        "%.3f ms, p99 %.3f ms; sequence now %lld tokens\n",
        static_cast<long long>(setup_.tokens), setup_.layers, wall_s_, tps, p50 * 1e3, p99 * 1e3,
        static_cast<long long>(caches_[0]->length()));
    std::printf("  %-5s %12s %12s %12s %12s %12s %12s %12s %10s %10s\n", "rank", "cache_tokens",
                "cache_bytes", "mem_start", "mem_end", "mem_drift", "rss_start", "rss_end",
                "compute_s", "merge_s");
  }
  for (int r = 0; r < world; ++r) {
    const double* t = &table[static_cast<size_t>(r * kCols)];
    if (rank == 0) {
      std::printf("  %-5d %12.0f %12s %12s %12s %12s %12s %12s %10.2f %10.2f\n", r, t[0],
                  format_bytes(t[1]).c_str(), format_bytes(t[2]).c_str(),
                  format_bytes(t[3]).c_str(), format_bytes(t[9]).c_str(),
                  format_bytes(t[5]).c_str(), format_bytes(t[6]).c_str(), t[7], t[8]);
    }
    ranks.push_back(Json()
                        .add("rank", r)
                        .add("cache_tokens", static_cast<int64_t>(t[0]))
                        .add("cache_bytes", static_cast<int64_t>(t[1]))
                        .add("accounted_bytes_start", static_cast<int64_t>(t[2]))
                        .add("accounted_bytes_end", static_cast<int64_t>(t[3]))
                        .add("accounted_bytes_peak", static_cast<int64_t>(t[4]))
                        .add("accounted_bytes_drift", static_cast<int64_t>(t[9]))
                        .add("rss_bytes_start", static_cast<int64_t>(t[5]))
                        .add("rss_bytes_end", static_cast<int64_t>(t[6]))
                        .add("compute_s", t[7])
                        .add("merge_s", t[8]));
  }
  if (rank == 0) {
    std::printf(
        "  decode output checksum %.6e (mem_drift: max - min accounted bytes while decoding)\n",
        checksum_);
  }
  j.add("per_rank", ranks);
  return j;
}

}  // namespace ringattn::launch
