// `ringattn attend --decode-from N0`: the prefill through the ring, then token-by-token decode
// through the distributed KV cache, producing the same output files as a plain attend.

#include "launch/attend_decode.h"

#include <algorithm>
#include <chrono>

#include "launch/ranks.h"
#include "launch/sharded_io.h"
#include "ringattn/kv_cache.h"

namespace ringattn::launch {

void check_decode_from(int64_t decode_from, int64_t seq_len, int world, const AttentionSpec& spec) {
  RINGATTN_CHECK(decode_from >= 1 && decode_from <= seq_len,
                 "--decode-from must be in 1..N (N=", seq_len, "), got ", decode_from);
  RINGATTN_CHECK(decode_from >= world, "--decode-from must be >= the number of ranks (", world,
                 ": every rank holds part of the prefill), got ", decode_from);
  RINGATTN_CHECK(spec.causal,
                 "--decode-from needs --causal: without it a query also sees later tokens, "
                 "which decode has not seen yet");
  check_sharding(decode_from, world, resolve_layout(spec.layout, spec.causal, spec.window),
                 spec.sinks);
}

DecodeFromResult run_decode_from(Communicator& comm, const AttentionSpec& spec, int64_t decode_from,
                                 int64_t seq_len, const TensorView& q, const TensorView& k,
                                 const TensorView& v, const TensorView* sink_logits,
                                 const TensorView& o, const TensorView& lse,
                                 const std::string* paths, const npy::Header* headers,
                                 int num_threads) {
  const int64_t B = q.size(0), H = q.size(2), Hkv = k.size(2), D = q.size(3);
  const int64_t n_dec = seq_len - decode_from;
  const DType dtype = q.dtype();
  KVCacheConfig cfg;
  cfg.spec = spec;
  cfg.batch = B;
  cfg.heads = H;
  cfg.kv_heads = Hkv;
  cfg.head_dim = D;
  cfg.dtype = dtype;
  cfg.prefill_len = decode_from;
  cfg.max_len = seq_len;
  cfg.max_step_tokens = 1;
  cfg.num_threads = num_threads;
  cfg.device = q.device();  // the prefill's tensors' device: the cache lives there too
  KVCache cache(comm, cfg);
  RingOptions options;
  options.num_threads = num_threads;

  DecodeFromResult r;
  r.prefill = cache.prefill(q, k, v, sink_logits, o, &lse, options);

  // Every rank reads the decode tokens: decode inputs are replicated.
  r.decoded.runs.push_back(PosRange{decode_from, seq_len});
  std::vector<float> qd(static_cast<size_t>(B * n_dec * H * D));
  std::vector<float> kd(static_cast<size_t>(B * n_dec * Hkv * D)), vd(kd.size());
  agree(comm, [&] {
    read_token_shard(paths[0], headers[0], r.decoded, qd.data());
    read_token_shard(paths[1], headers[1], r.decoded, kd.data());
    read_token_shard(paths[2], headers[2], r.decoded, vd.data());
  });
  // In the compute dtype, like the prefill shards (same rounding, so the same answer).
  const size_t es = dtype_size(dtype);
  std::vector<char> qs(qd.size() * es), ks(kd.size() * es), vs(vd.size() * es);
  convert(qd.data(), DType::kF32, qs.data(), dtype, static_cast<int64_t>(qd.size()));
  convert(kd.data(), DType::kF32, ks.data(), dtype, static_cast<int64_t>(kd.size()));
  convert(vd.data(), DType::kF32, vs.data(), dtype, static_cast<int64_t>(vd.size()));
  // On the device of the cache (copies for a CUDA cache; the host buffers themselves on the
  // CPU), and so are the per-step outputs, copied back after every step.
  const Device dev = cfg.device;
  const bool on_host = dev == Device::kCPU;
  const int64_t nd = on_host ? 0 : n_dec, one = on_host ? 0 : 1;  // nothing extra on the CPU
  TensorBuffer qb(dev, dtype, {B, nd, H, D}), kb(dev, dtype, {B, nd, Hkv, D}),
      vb(dev, dtype, {B, nd, Hkv, D});
  TensorBuffer ob(dev, DType::kF32, {B, one, H, D}), lb(dev, DType::kF32, {B, H, one});
  if (!on_host) {
    qb.upload(qs.data());
    kb.upload(ks.data());
    vb.upload(vs.data());
  }
  const TensorView tq = on_host ? TensorView(qs.data(), dtype, {B, n_dec, H, D}) : qb.view();
  const TensorView tk = on_host ? TensorView(ks.data(), dtype, {B, n_dec, Hkv, D}) : kb.view();
  const TensorView tv = on_host ? TensorView(vs.data(), dtype, {B, n_dec, Hkv, D}) : vb.view();

  r.o.assign(static_cast<size_t>(B * n_dec * H * D), 0.0f);
  r.lse.assign(static_cast<size_t>(B * H * n_dec), 0.0f);
  std::vector<float> o_step(static_cast<size_t>(B * H * D)), lse_step(static_cast<size_t>(B * H));
  const TensorView to = on_host ? TensorView(o_step.data(), DType::kF32, {B, 1, H, D}) : ob.view();
  const TensorView tl = on_host ? TensorView(lse_step.data(), DType::kF32, {B, H, 1}) : lb.view();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t t = 0; t < n_dec; ++t) {
    cache.decode(tq.slice(1, t, t + 1), tk.slice(1, t, t + 1), tv.slice(1, t, t + 1), sink_logits,
                 to, &tl);
    if (!on_host) {
      ob.download(o_step.data());
      lb.download(lse_step.data());
    }
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(&o_step[static_cast<size_t>(b * H * D)], H * D,
                  &r.o[static_cast<size_t>((b * n_dec + t) * H * D)]);
      for (int64_t h = 0; h < H; ++h) {
        r.lse[static_cast<size_t>((b * H + h) * n_dec + t)] =
            lse_step[static_cast<size_t>(b * H + h)];
      }
    }
  }
  r.decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace ringattn::launch
