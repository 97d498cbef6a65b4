// The distributed KV cache (SPEC section 6). See kv_cache.h for the design; the notes here are
// about why the bookkeeping is right.
//
// Every rank keeps the same books: the token count of every rank (and, in streaming mode, the
// positions of every rank's tokens). The books change only through the prefill shards (a pure
// function of N, P and the layout), the placement of new tokens (a pure function of the counts)
// and eviction (a pure function of the positions), so they stay identical without a message.

#include "ringattn/kv_cache.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>

#include "kernels/softmax_state.h"
#include "runtime/src/sharding.h"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// First position a rank keeps after the prefill: sinks live in their own replica, and in
// streaming mode only the last W - 1 tokens can still be seen by a later query.
int64_t first_kept(const KVCacheConfig& c) {
  int64_t lo = c.spec.sinks;
  if (c.spec.window > 0) lo = std::max(lo, c.prefill_len - c.spec.window + 1);
  return lo;
}

// Tokens of rank r's prefill shard at positions >= lo.
int64_t kept_tokens(const Shard& shard, int64_t lo) {
  int64_t n = 0;
  for (const PosRange& run : shard.runs)
    n += std::max<int64_t>(0, run.end - std::max(run.begin, lo));
  return n;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void validate_config(const KVCacheConfig& c, int world) {
  validate_spec(c.spec);
  RINGATTN_CHECK(c.batch > 0 && c.heads > 0 && c.kv_heads > 0 && c.head_dim > 0,
                 "KV cache: batch, heads, kv_heads and head_dim must be > 0, got B=", c.batch,
                 " H=", c.heads, " H_kv=", c.kv_heads, " D=", c.head_dim);
  RINGATTN_CHECK(c.heads % c.kv_heads == 0,
                 "KV cache: heads must be a multiple of kv_heads (H % H_kv == 0), got H=", c.heads,
                 " H_kv=", c.kv_heads);
  RINGATTN_CHECK(c.max_step_tokens >= 1, "KV cache: max_step_tokens must be >= 1, got ",
                 c.max_step_tokens);
  RINGATTN_CHECK(c.max_len == 0 || c.max_len >= c.prefill_len, "KV cache: max_len (", c.max_len,
                 ") must be 0 or >= prefill_len (", c.prefill_len, ")");
  RINGATTN_CHECK(c.num_threads >= 0, "KV cache: num_threads must be >= 0, got ", c.num_threads);
  check_sharding(c.prefill_len, world, resolve_layout(c.spec.layout, c.spec.causal, c.spec.window),
                 c.spec.sinks);
}

// Copies tokens [first, first + count) of a [B, N, H_kv, D] view into slots of a [B, cap, H_kv, D]
// buffer: token i of batch row b goes to slot slots(i).
template <typename SlotFn>
void copy_tokens(const TensorView& src, int64_t first, int64_t count, char* dst, int64_t cap,
                 size_t row_bytes, SlotFn slots) {
  const size_t es = dtype_size(src.dtype());
  const int64_t kv_heads = src.size(2), d = src.size(3);
  const char* base = static_cast<const char*>(src.data());
  for (int64_t b = 0; b < src.size(0); ++b) {
    for (int64_t i = 0; i < count; ++i) {
      char* out = dst + (static_cast<size_t>(b * cap + slots(i))) * row_bytes;
      const int64_t tok = b * src.stride(0) + (first + i) * src.stride(1);
      if (src.stride(2) == d) {  // all heads of a token are one run
        std::memcpy(out, base + tok * es, row_bytes);
      } else {
        for (int64_t h = 0; h < kv_heads; ++h) {
          std::memcpy(out + h * d * es, base + (tok + h * src.stride(2)) * es, d * es);
        }
      }
    }
  }
}

// Every rank contributes the fields that must agree; one MAX allreduce of (x, -x).
void agree_fields(Communicator& comm, const char* const* names, const int64_t* fields, int n) {
  std::vector<int64_t> mm(static_cast<size_t>(2 * n));
  for (int i = 0; i < n; ++i) {
    mm[i] = fields[i];
    mm[n + i] = -fields[i];
  }
  comm.allreduce(mm.data(), mm.size(), ReduceType::kI64, ReduceOp::kMax);
  std::string diff;
  for (int i = 0; i < n; ++i) {
    if (mm[i] != -mm[n + i]) {
      diff += detail::str_cat(diff.empty() ? "" : ", ", names[i], " (min ", -mm[n + i], ", max ",
                              mm[i], ", here ", fields[i], ")");
    }
  }
  if (!diff.empty()) {
    throw AgreedError(ErrorCode::kInvalidArgument, "KV cache: mismatch across ranks: " + diff);
  }
}

// agree() for the decode hot path: the success check and the token count T travel in ONE
// allreduce (MIN of {first failing rank, T, -T}), where agree() plus a separate check of T
// would take two. On failure, agree_status (allreduce + broadcast) delivers the message; every
// rank takes that path because every rank saw the same reduced values.
template <typename Fn>
void agree_decode(Communicator& comm, int64_t& T, Fn&& local_step) {
  const detail::LocalStatus s = detail::run_local(std::forward<Fn>(local_step));
  int64_t r[3] = {s.failed ? comm.rank() : comm.size(), T, -T};
  comm.allreduce(r, 3, ReduceType::kI64, ReduceOp::kMin);
  if (r[0] < comm.size()) detail::agree_status(comm, s.failed, s.code, s.message);  // throws
  if (r[1] != -r[2]) {
    throw AgreedError(ErrorCode::kInvalidArgument,
                      detail::str_cat("KV cache: ranks decode different token counts (min ", r[1],
                                      ", max ", -r[2], ", here ", T, ")"));
  }
}

}  // namespace

int64_t KVCache::capacity_for(const KVCacheConfig& c, int world) {
  validate_config(c, world);
  const Layout layout = resolve_layout(c.spec.layout, c.spec.causal, c.spec.window);
  const int64_t lo = first_kept(c);
  int64_t prefill_max = 0;
  for (int r = 0; r < world; ++r) {
    prefill_max =
        std::max(prefill_max, kept_tokens(make_shard(c.prefill_len, world, r, layout), lo));
  }
  int64_t even;
  if (c.spec.window > 0) {
    even = ceil_div(c.spec.window - 1 + c.max_step_tokens, world);
  } else {
    const int64_t max_len = c.max_len > 0 ? c.max_len : c.prefill_len;
    even = ceil_div(max_len - c.spec.sinks, world);
  }
  return std::max<int64_t>({prefill_max, even, 1});
}

KVCache::KVCache(Communicator& comm, const KVCacheConfig& config)
    : comm_(comm), config_(config), rank_(comm.rank()), world_(comm.size()) {
  capacity_ = capacity_for(config_, world_);
  layout_ = resolve_layout(config_.spec.layout, config_.spec.causal, config_.spec.window);
  row_bytes_ = static_cast<size_t>(config_.kv_heads * config_.head_dim) * dtype_size(config_.dtype);
  const size_t B = static_cast<size_t>(config_.batch), S = static_cast<size_t>(config_.spec.sinks);
  const size_t T = static_cast<size_t>(config_.max_step_tokens);
  const size_t rows = streaming() ? static_cast<size_t>(world_) : 1;
  const size_t R = B * static_cast<size_t>(config_.heads) * T;
  RINGATTN_CHECK(config_.device == Device::kCPU || config_.device == Device::kCUDA,
                 "KV cache: device must be cpu or cuda, got ", device_name(config_.device));
  RINGATTN_CHECK(config_.device == Device::kCPU || comm_.accepts(config_.device), "KV cache: the ",
                 comm_.name(), " communicator does not accept ", device_name(config_.device),
                 " buffers (a CUDA cache needs NCCL or an in-process world of device buffers)");
  k_ = detail::ByteBuffer(config_.device);
  v_ = detail::ByteBuffer(config_.device);
  sink_k_ = detail::ByteBuffer(config_.device);
  sink_v_ = detail::ByteBuffer(config_.device);
  // Everything is allocated here, once: decode must not allocate (constant memory).
  k_.resize(B * static_cast<size_t>(capacity_) * row_bytes_);
  v_.resize(k_.size());
  pos_.assign(rows * static_cast<size_t>(capacity_), -1);
  heads_.assign(rows, 0);
  counts_.assign(static_cast<size_t>(world_), 0);
  sink_k_.resize(B * S * row_bytes_);
  sink_v_.resize(sink_k_.size());
  sink_pos_.resize(S);
  for (size_t j = 0; j < S; ++j) sink_pos_[j] = static_cast<int64_t>(j);
  if (on_cuda()) {
    // The softmax state, merge buffer and device positions live in the engine; the grouped
    // one-token GQA fold is a CPU-only optimisation (the CUDA kernels fold the plain q).
    engine_ = detail::make_engine(Device::kCUDA, config_.num_threads);
    engine_->reserve_decode(config_.batch, config_.max_step_tokens, config_.heads, config_.head_dim,
                            std::max<int64_t>(capacity_, config_.spec.sinks));
    q_pos_.resize(T);
    owner_.resize(T);
    plan_.resize(static_cast<size_t>(world_));
    return;
  }
  state_.reset(config_.batch, config_.max_step_tokens, config_.heads, config_.head_dim);
  merge_.resize(R * (2 + static_cast<size_t>(config_.head_dim)));
  const size_t G = static_cast<size_t>(config_.heads / config_.kv_heads);
  q_pos_.resize(std::max(T, G));
  // The grouped-query fold's state ([B, H_kv, G] rows), used when a call brings one token.
  group_state_.reset(config_.batch, config_.heads / config_.kv_heads, config_.kv_heads,
                     config_.head_dim);
  owner_.resize(T);
  plan_.resize(static_cast<size_t>(world_));
}

size_t KVCache::bytes_for(const KVCacheConfig& c, int world) {
  const size_t capacity = static_cast<size_t>(capacity_for(c, world));
  const size_t row_bytes = static_cast<size_t>(c.kv_heads * c.head_dim) * dtype_size(c.dtype);
  const size_t B = static_cast<size_t>(c.batch), S = static_cast<size_t>(c.spec.sinks);
  const size_t T = static_cast<size_t>(c.max_step_tokens);
  const size_t rows = c.spec.window > 0 ? static_cast<size_t>(world) : 1;
  const size_t R = B * static_cast<size_t>(c.heads) * T, D = static_cast<size_t>(c.head_dim);
  const size_t kv = 2 * B * capacity * row_bytes + 2 * B * S * row_bytes;
  if (c.device == Device::kCUDA) {
    // Device bytes only (see kv_cache.h): the storage and the engine's reserved buffers.
    return kv + detail::decode_bytes_for(
                    Device::kCUDA, c.batch, c.max_step_tokens, c.heads, c.head_dim,
                    std::max<int64_t>(static_cast<int64_t>(capacity), c.spec.sinks));
  }
  const size_t G = static_cast<size_t>(c.heads / c.kv_heads);
  const size_t books =
      (rows * capacity + rows + 2 * static_cast<size_t>(world) + S + T + std::max(T, G)) *
      sizeof(int64_t);
  // Softmax state and merge buffer for T tokens, and the grouped state for one token.
  const size_t R1 = B * static_cast<size_t>(c.heads);
  const size_t scratch = (2 * R + R * D) * sizeof(float) * 2 + (2 * R1 + R1 * D) * sizeof(float);
  return kv + books + scratch;
}

size_t KVCache::capacity_bytes() const { return bytes_for(config_, world_); }

size_t KVCache::bytes() const {
  if (on_cuda()) {
    return k_.size() + v_.size() + sink_k_.size() + sink_v_.size() + engine_->decode_bytes();
  }
  auto held = [](const auto& vec) { return vec.capacity() * sizeof(vec[0]); };
  // The softmax state was sized for max_step_tokens at construction; resetting it to fewer
  // rows (assign) keeps that allocation, so its size at construction is what it holds. The
  // grouped state is only ever reset to the same size.
  const size_t R = static_cast<size_t>(config_.batch * config_.heads * config_.max_step_tokens);
  const size_t state = (2 * R + R * static_cast<size_t>(config_.head_dim)) * sizeof(float) +
                       group_state_.nbytes();  // always sized [B, G, H_kv, D]
  return k_.size() + v_.size() + held(pos_) + held(heads_) + held(counts_) + sink_k_.size() +
         sink_v_.size() + held(sink_pos_) + held(merge_) + held(q_pos_) + held(owner_) +
         held(plan_) + state;
}

std::vector<int64_t> KVCache::local_positions() const {
  std::vector<int64_t> out;
  const int64_t row = own_row();
  for (int64_t i = 0; i < counts_[static_cast<size_t>(rank_)]; ++i) {
    out.push_back(pos_[static_cast<size_t>(row * capacity_ + slot(row, i))]);
  }
  return out;
}

void KVCache::check_prefill(const TensorView* q, const TensorView& k, const TensorView& v) {
  const KVCacheConfig& c = config_;
  agree(comm_, [&] {
    RINGATTN_CHECK(!prefilled_, "KV cache: prefill called twice (the cache already holds ", length_,
                   " tokens)");
    RINGATTN_CHECK(
        k.dtype() == c.dtype && v.dtype() == c.dtype && (q == nullptr || q->dtype() == c.dtype),
        "KV cache: prefill tensors must be ", dtype_name(c.dtype), " (the cache dtype), got k ",
        k.describe(), ", v ", v.describe());
    RINGATTN_CHECK(k.ndim() == 4 && v.ndim() == 4 && k.size(0) == c.batch &&
                       k.size(2) == c.kv_heads && k.size(3) == c.head_dim,
                   "KV cache: prefill expects k, v [B=", c.batch, ", N_local, H_kv=", c.kv_heads,
                   ", D=", c.head_dim, "], got k ", k.describe());
    if (q != nullptr) {
      RINGATTN_CHECK(q->ndim() == 4 && q->size(0) == c.batch && q->size(2) == c.heads &&
                         q->size(3) == c.head_dim,
                     "KV cache: prefill expects q [B=", c.batch, ", N_local, H=", c.heads,
                     ", D=", c.head_dim, "], got ", q->describe());
    }
    const int64_t n = make_shard(c.prefill_len, world_, rank_, layout_).size();
    RINGATTN_CHECK(k.size(1) == n && v.size(1) == n && v.size(0) == c.batch &&
                       v.size(2) == c.kv_heads && v.size(3) == c.head_dim,
                   "KV cache: the ", layout_name(layout_), " shard of rank ", rank_, " of ", world_,
                   " for N=", c.prefill_len, " holds ", n, " tokens: expected k and v [B=", c.batch,
                   ", ", n, ", H_kv=", c.kv_heads, ", D=", c.head_dim, "], got k ", k.describe(),
                   ", v ", v.describe());
    RINGATTN_CHECK(k.stride(3) == 1 && v.stride(3) == 1,
                   "KV cache: k and v need a contiguous innermost dimension");
    RINGATTN_CHECK(k.device() == c.device && v.device() == c.device &&
                       (q == nullptr || q->device() == c.device),
                   "KV cache: prefill tensors must be on the cache's device (",
                   device_name(c.device), "), got k ", k.describe(), ", v ", v.describe());
  });
  // The sizing parameters must agree too, or ranks would place tokens differently.
  const char* names[] = {"prefill_len", "max_len", "max_step_tokens", "capacity"};
  const int64_t fields[] = {c.prefill_len, c.max_len, c.max_step_tokens, capacity_};
  agree_fields(comm_, names, fields, 4);
}

RingStats KVCache::prefill(const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView* sink_logits, const TensorView& o,
                           const TensorView* lse, const RingOptions& options) {
  check_prefill(&q, k, v);
  const RingStats st =
      forward(comm_, config_.spec, config_.prefill_len, q, k, v, sink_logits, o, lse, options);
  keep_shard(k, v);
  return st;
}

void KVCache::load(const TensorView& k, const TensorView& v) {
  check_prefill(nullptr, k, v);
  keep_shard(k, v);
}

void KVCache::keep_shard(const TensorView& k, const TensorView& v) {
  const KVCacheConfig& c = config_;
  // Keep the shard: this rank's tokens at positions >= lo, in shard order (increasing).
  const int64_t lo = first_kept(c);
  const Shard mine = make_shard(c.prefill_len, world_, rank_, layout_);
  int64_t local = 0, kept = 0;
  for (const PosRange& run : mine.runs) {
    const int64_t begin = std::max(run.begin, lo);
    const int64_t n = std::max<int64_t>(0, run.end - begin);
    const int64_t first = local + (begin - run.begin);
    put(k, first, n, k_, capacity_, kept);
    put(v, first, n, v_, capacity_, kept);
    if (!streaming()) {
      for (int64_t i = 0; i < n; ++i) pos_[static_cast<size_t>(kept + i)] = begin + i;
    }
    kept += n;
    local += run.size();
  }
  // Every rank's books: counts (and positions, for eviction) from the shards alone.
  for (int r = 0; r < world_; ++r) {
    const Shard shard = make_shard(c.prefill_len, world_, r, layout_);
    int64_t n = 0;
    for (const PosRange& run : shard.runs) {
      for (int64_t p = std::max(run.begin, lo); p < run.end; ++p, ++n) {
        if (streaming()) pos_[static_cast<size_t>(r * capacity_ + n)] = p;
      }
    }
    RINGATTN_CHECK_CODE(ErrorCode::kInternal, n <= capacity_, "KV cache: rank ", r, " keeps ", n,
                        " prefill tokens but capacity_for() gave ", capacity_);
    counts_[static_cast<size_t>(r)] = n;
  }

  // The sink replica: rank 0's first run starts at position 0 (check_sharding), so its local
  // tokens 0..S-1 are the sinks.
  if (c.spec.sinks > 0) {
    if (rank_ == 0) {
      put(k, 0, c.spec.sinks, sink_k_, c.spec.sinks, 0);
      put(v, 0, c.spec.sinks, sink_v_, c.spec.sinks, 0);
    }
    if (engine_) engine_->sync();  // the copies landed before the transport reads them
    comm_.broadcast(sink_k_.data(), sink_k_.size(), 0);
    comm_.broadcast(sink_v_.data(), sink_v_.size(), 0);
  }
  if (engine_) engine_->sync();  // done with the caller's k and v
  length_ = c.prefill_len;
  prefilled_ = true;
}

void KVCache::put(const TensorView& src, int64_t first, int64_t n, detail::ByteBuffer& buf,
                  int64_t cap, int64_t slot) {
  if (engine_) {
    engine_->store_tokens(src, first, first + n, buf.data(), cap, slot);
    return;
  }
  copy_tokens(src, first, n, buf.data(), cap, row_bytes_, [&](int64_t i) { return slot + i; });
}

void KVCache::store_token(const TensorView& k_new, const TensorView& v_new, int64_t t, int64_t s) {
  put(k_new, t, 1, k_, capacity_, s);
  put(v_new, t, 1, v_, capacity_, s);
}

void KVCache::evict_before(int64_t next) {
  // A query at position >= next sees keys j > next - W (causal or not: later keys are newer).
  const int64_t keep_from = next - config_.spec.window + 1;
  for (int r = 0; r < world_; ++r) {
    int64_t& n = counts_[static_cast<size_t>(r)];
    int64_t& head = heads_[static_cast<size_t>(r)];
    // A rank's positions increase with age order, so the evicted tokens are a prefix.
    while (n > 0 && pos_[static_cast<size_t>(r * capacity_ + head)] < keep_from) {
      head = (head + 1) % capacity_;
      --n;
    }
  }
}

DecodeStats KVCache::decode(const TensorView& q_new, const TensorView& k_new,
                            const TensorView& v_new, const TensorView* sink_logits,
                            const TensorView& o, const TensorView* lse) {
  const Clock::time_point t_start = Clock::now();
  const KVCacheConfig& c = config_;
  DecodeStats st;
  int64_t T = 0;
  // 1. Validate and plan the placement: the emptiest rank takes each new token (ties: lowest
  // rank). Planned on a copy of the counts so a failure leaves the books untouched.
  agree_decode(comm_, T, [&] {
    RINGATTN_CHECK(prefilled_, "KV cache: decode called before prefill");
    const AttentionShape s =
        check_attention_args(c.spec, q_new, k_new, v_new, &o, lse, sink_logits);
    RINGATTN_CHECK(s.batch == c.batch && s.heads == c.heads && s.kv_heads == c.kv_heads &&
                       s.head_dim == c.head_dim,
                   "KV cache: decode expects q_new [B=", c.batch, ", T, H=", c.heads,
                   ", D=", c.head_dim, "] and k_new, v_new [B, T, H_kv=", c.kv_heads,
                   ", D] as at construction, got q_new ", q_new.describe(), ", k_new ",
                   k_new.describe());
    RINGATTN_CHECK(q_new.dtype() == c.dtype, "KV cache: decode tensors must be ",
                   dtype_name(c.dtype), " (the cache dtype), got ", q_new.describe());
    RINGATTN_CHECK(q_new.device() == c.device && k_new.device() == c.device &&
                       v_new.device() == c.device && o.device() == c.device,
                   "KV cache: decode tensors must be on the cache's device (",
                   device_name(c.device), "), got q_new ", q_new.describe(), ", k_new ",
                   k_new.describe(), ", v_new ", v_new.describe(), ", o ", o.describe());
    RINGATTN_CHECK((lse == nullptr || lse->data() == nullptr || lse->device() == c.device) &&
                       (sink_logits == nullptr || sink_logits->data() == nullptr ||
                        sink_logits->device() == c.device),
                   "KV cache: lse and sink_logits must be on the cache's device (",
                   device_name(c.device), ")");
    T = s.q_len;
    RINGATTN_CHECK(T == s.kv_len, "KV cache: q_new holds ", T, " tokens but k_new holds ",
                   s.kv_len);
    RINGATTN_CHECK(T >= 1 && T <= c.max_step_tokens, "KV cache: a decode call brings 1 to ",
                   c.max_step_tokens, " tokens (max_step_tokens), got ", T);
    if (!streaming()) {
      const int64_t max_len = c.max_len > 0 ? c.max_len : c.prefill_len;
      RINGATTN_CHECK(length_ + T <= max_len,
                     "KV cache: capacity exceeded: the cache was sized for ", max_len,
                     " tokens (max_len) and holds ", length_, "; cannot add ", T);
    }
    std::copy(counts_.begin(), counts_.end(), plan_.begin());
    for (int64_t t = 0; t < T; ++t) {
      const auto it = std::min_element(plan_.begin(), plan_.end());
      RINGATTN_CHECK_CODE(ErrorCode::kInternal, *it < capacity_, "KV cache: every rank is full (",
                          capacity_, " slots) at position ", length_ + t);
      owner_[static_cast<size_t>(t)] = it - plan_.begin();
      ++*it;
    }
  });

  // 2. Append: the owner stores each token; everyone updates the books.
  const int64_t own = own_row();
  for (int64_t t = 0; t < T; ++t) {
    const int r = static_cast<int>(owner_[static_cast<size_t>(t)]);
    const int64_t p = length_ + t;
    q_pos_[static_cast<size_t>(t)] = p;
    int64_t& n = counts_[static_cast<size_t>(r)];
    if (r == rank_) {
      const int64_t s = slot(own, n);
      store_token(k_new, v_new, t, s);
      pos_[static_cast<size_t>(own * capacity_ + s)] = p;
    } else if (streaming()) {
      pos_[static_cast<size_t>(r * capacity_ + slot(r, n))] = p;
    }
    ++n;
  }
  st.owner_of_first = static_cast<int>(owner_[0]);

  // 3. Attend over this rank's tokens (and the sinks, on one rank only: the one now holding
  // the fewest tokens, which balances the work).
  if (engine_) {
    attend_cuda(q_new, sink_logits, o, lse, T, st);
    length_ += T;
    if (streaming()) evict_before(length_);
    st.total_s = seconds_since(t_start);
    return st;
  }
  const Clock::time_point t_compute = Clock::now();
  // GQA with one new token: the G = H / H_kv query heads that share a kv head become G query
  // rows (at the same position) of that kv head, so every cached key is read once per kv head
  // instead of G times; decode is memory bound. q_new [B, 1, H, D] is viewed as
  // [B, G, H_kv, D]: head h = kh * G + g sits at kh * G * stride + g * stride.
  const int64_t G = c.heads / c.kv_heads;
  const bool grouped = T == 1 && G > 1;
  cpu::SoftmaxStateCpu& fold_state = grouped ? group_state_ : state_;
  TensorView q_fold = q_new;
  if (grouped) {
    const int64_t shape[4] = {c.batch, G, c.kv_heads, c.head_dim};
    const int64_t strides[4] = {q_new.stride(0), q_new.stride(2), G * q_new.stride(2),
                                q_new.stride(3)};
    q_fold = TensorView(q_new.data(), q_new.dtype(), 4, shape, strides, q_new.device(),
                        q_new.device_index());
    std::fill(q_pos_.begin(), q_pos_.begin() + G, q_pos_[0]);
  }
  fold_state.reset(c.batch, q_fold.size(1), q_fold.size(2), c.head_dim);
  const int sink_rank =
      static_cast<int>(std::min_element(counts_.begin(), counts_.end()) - counts_.begin());
  if (c.spec.sinks > 0 && rank_ == sink_rank) {
    const TensorView sk(sink_k_.data(), c.dtype, {c.batch, c.spec.sinks, c.kv_heads, c.head_dim});
    const TensorView sv(sink_v_.data(), c.dtype, {c.batch, c.spec.sinks, c.kv_heads, c.head_dim});
    cpu::fold_block(c.spec, q_fold, q_pos_.data(), sk, sv, sink_pos_.data(), fold_state,
                    c.num_threads);
    st.keys += c.spec.sinks;
  }
  const TensorView all_k(k_.data(), c.dtype, {c.batch, capacity_, c.kv_heads, c.head_dim});
  const TensorView all_v(v_.data(), c.dtype, {c.batch, capacity_, c.kv_heads, c.head_dim});
  const int64_t n_local = counts_[static_cast<size_t>(rank_)];
  for (const auto& run : live_runs()) {
    if (run.second <= run.first) continue;
    cpu::fold_block(c.spec, q_fold, q_pos_.data(), all_k.slice(1, run.first, run.second),
                    all_v.slice(1, run.first, run.second),
                    pos_.data() + own * capacity_ + run.first, fold_state, c.num_threads);
  }
  if (grouped) {
    // Back to the [B, H, 1] / [B, 1, H, D] layout: m and l have the same index
    // ((b * H_kv + kh) * G + g == b * H + h); acc rows move from (b, g, kh) to (b, h).
    state_.reset(c.batch, 1, c.heads, c.head_dim);
    const int64_t rows = c.batch * c.heads, D = c.head_dim;
    std::copy(group_state_.m(), group_state_.m() + rows, state_.m());
    std::copy(group_state_.l(), group_state_.l() + rows, state_.l());
    for (int64_t b = 0; b < c.batch; ++b) {
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t kh = 0; kh < c.kv_heads; ++kh) {
          std::copy_n(group_state_.acc() + ((b * G + g) * c.kv_heads + kh) * D, D,
                      state_.acc() + (b * c.heads + kh * G + g) * D);
        }
      }
    }
  }
  st.keys += n_local;
  st.compute_s = seconds_since(t_compute);

  // 4. Merge the partial states exactly: M = max over ranks of m, then the sums of
  // l * exp(m - M) and acc * exp(m - M). A rank with nothing visible has m = -inf and adds 0.
  if (world_ > 1) {
    const Clock::time_point t_merge = Clock::now();
    detail::merge_state_cpu(comm_, state_, merge_.data());
    st.merge_s = seconds_since(t_merge);
  }
  // Learned sink logits join the denominator once, after the merge.
  cpu::finalize(state_, sink_logits, o, lse);

  length_ += T;
  if (streaming()) evict_before(length_);
  st.total_s = seconds_since(t_start);
  return st;
}

std::array<std::pair<int64_t, int64_t>, 2> KVCache::live_runs() const {
  const int64_t n_local = counts_[static_cast<size_t>(rank_)];
  const int64_t head = heads_[static_cast<size_t>(own_row())];
  // The live slots are [head, head + n) modulo capacity: at most two runs.
  const int64_t first_run = std::min(n_local, capacity_ - head);
  return {std::pair<int64_t, int64_t>{head, head + first_run},
          std::pair<int64_t, int64_t>{0, n_local - first_run}};
}

void KVCache::attend_cuda(const TensorView& q_new, const TensorView* sink_logits,
                          const TensorView& o, const TensorView* lse, int64_t T, DecodeStats& st) {
  const KVCacheConfig& c = config_;
  const Clock::time_point t_compute = Clock::now();
  engine_->begin_forward(c.batch, T, c.heads, c.head_dim, q_pos_.data());
  const int sink_rank =
      static_cast<int>(std::min_element(counts_.begin(), counts_.end()) - counts_.begin());
  if (c.spec.sinks > 0 && rank_ == sink_rank) {
    const TensorView sk(sink_k_.data(), c.dtype, {c.batch, c.spec.sinks, c.kv_heads, c.head_dim},
                        Device::kCUDA);
    const TensorView sv(sink_v_.data(), c.dtype, {c.batch, c.spec.sinks, c.kv_heads, c.head_dim},
                        Device::kCUDA);
    engine_->fold(c.spec, q_new, sk, sv, sink_pos_.data());
    st.keys += c.spec.sinks;
  }
  const TensorView all_k(k_.data(), c.dtype, {c.batch, capacity_, c.kv_heads, c.head_dim},
                         Device::kCUDA);
  const TensorView all_v(v_.data(), c.dtype, {c.batch, capacity_, c.kv_heads, c.head_dim},
                         Device::kCUDA);
  const int64_t own = own_row();
  const int64_t n_local = counts_[static_cast<size_t>(rank_)];
  for (const auto& run : live_runs()) {
    if (run.second <= run.first) continue;
    engine_->fold(c.spec, q_new, all_k.slice(1, run.first, run.second),
                  all_v.slice(1, run.first, run.second), pos_.data() + own * capacity_ + run.first);
  }
  engine_->sync();
  st.keys += n_local;
  st.compute_s = seconds_since(t_compute);
  if (world_ > 1) {
    const Clock::time_point t_merge = Clock::now();
    engine_->merge_state(comm_);
    st.merge_s = seconds_since(t_merge);
  }
  // Learned sink logits join the denominator once, after the merge (blocking).
  engine_->finalize(sink_logits, o, lse);
}

}  // namespace ringattn
