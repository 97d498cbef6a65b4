#pragma once
/// Host helpers shared by the unit, MPI and GPU tests: random inputs rounded to a dtype, host
/// tensors stored in a dtype, positions and key blocks, a rank's shard of a global tensor, the
/// normalised error against the f64 oracle, ring cases and their names, and the expected values
/// of communicator tests. Header-only, no CUDA types (device helpers: tests/gpu/gpu_test_util.h).

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "ringattn/attention.h"
#include "ringattn/tensor.h"
#include "runtime/src/sharding.h"

namespace ringattn::test {

// ---- random inputs ------------------------------------------------------------------------------

/// x rounded to dtype (nearest even) and back: the value a kernel reading dtype sees.
inline float round_to(float x, DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return bf16_to_float(float_to_bf16(x));
    case DType::kF16:
      return f16_to_float(float_to_f16(x));
    default:
      return x;
  }
}

/// n draws of N(0, sigma^2) from a fresh distribution, each rounded to dtype, so the f64
/// oracle reads exactly what the kernels read.
inline std::vector<float> randn(size_t n, std::mt19937& rng, float sigma = 1.0f,
                                DType dtype = DType::kF32) {
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> x(n);
  for (float& e : x) e = round_to(dist(rng), dtype);
  return x;
}

/// n draws of N(0, 1), each rounded to dtype.
inline std::vector<float> randn(size_t n, std::mt19937& rng, DType dtype) {
  return randn(n, rng, 1.0f, dtype);
}

/// The values stored contiguously in dtype (nearest even).
inline std::vector<unsigned char> to_bytes(const std::vector<float>& x, DType dtype) {
  std::vector<unsigned char> b(x.size() * dtype_size(dtype));
  for (size_t i = 0; i < x.size(); ++i)
    store_from_float(b.data(), dtype, static_cast<int64_t>(i), x[i]);
  return b;
}

/// A contiguous host tensor that owns its storage in `dtype`, made from f32 values (rounded).
class HostTensor {
 public:
  HostTensor(const std::vector<float>& values, DType dtype, std::vector<int64_t> shape)
      : bytes_(to_bytes(values, dtype)), dtype_(dtype), shape_(std::move(shape)) {}

  /// A row-major view of the storage (the kernels may write through it).
  TensorView view() {
    std::vector<int64_t> strides(shape_.size(), 1);
    for (int i = static_cast<int>(shape_.size()) - 2; i >= 0; --i) {
      strides[i] = strides[i + 1] * shape_[i + 1];
    }
    return TensorView(bytes_.data(), dtype_, static_cast<int>(shape_.size()), shape_.data(),
                      strides.data());
  }
  /// Element i as f32, read from the storage.
  float at(size_t i) const { return load_as_float(bytes_.data(), dtype_, static_cast<int64_t>(i)); }

 private:
  std::vector<unsigned char> bytes_;
  DType dtype_;
  std::vector<int64_t> shape_;
};

// ---- positions and key blocks -------------------------------------------------------------------

/// start, start + 1, ..., start + n - 1.
inline std::vector<int64_t> iota_pos(int64_t n, int64_t start = 0) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

/// Global positions of `rank`'s zigzag shard of 2 * world chunks of `chunk` tokens (SPEC
/// section 3): chunk rank, then chunk 2 * world - 1 - rank.
inline std::vector<int64_t> zigzag_positions(int64_t chunk, int world, int rank) {
  std::vector<int64_t> pos = iota_pos(chunk, rank * chunk);
  const std::vector<int64_t> hi = iota_pos(chunk, (2 * world - 1 - rank) * chunk);
  pos.insert(pos.end(), hi.begin(), hi.end());
  return pos;
}

/// Cuts [0, n) into at most `blocks` uneven non-empty pieces (fewer when boundaries drawn from
/// rng coincide): {0, c1, ..., n}.
inline std::vector<int64_t> uneven_cuts(int64_t n, int blocks, std::mt19937& rng) {
  std::vector<int64_t> cuts = {0, n};
  std::uniform_int_distribution<int64_t> pick(1, std::max<int64_t>(1, n - 1));
  for (int i = 1; i < blocks && n > 1; ++i) cuts.push_back(pick(rng));
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  return cuts;
}

// ---- shards of global tensors -------------------------------------------------------------------

/// The rows of a global [batch, seq_len, row] tensor at the shard's positions, as the
/// contiguous [batch, n, row] local tensor (T = char with `row` in bytes moves stored rows).
template <typename T>
std::vector<T> gather_rows(const std::vector<T>& global, int64_t batch, int64_t seq_len,
                           int64_t row, const Shard& shard) {
  const int64_t n = shard.size();
  std::vector<T> out(static_cast<size_t>(batch * n * row));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < n; ++t) {
      std::copy_n(&global[static_cast<size_t>((b * seq_len + shard.position(t)) * row)], row,
                  &out[static_cast<size_t>((b * n + t) * row)]);
    }
  }
  return out;
}

/// As gather_rows for f32 values, stored in dtype (bytes).
inline std::vector<char> gather_rows(const std::vector<float>& global, int64_t batch,
                                     int64_t seq_len, int64_t row, const Shard& shard,
                                     DType dtype) {
  const int64_t n = shard.size();
  const size_t es = dtype_size(dtype);
  std::vector<char> out(static_cast<size_t>(batch * n * row) * es);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < n; ++t) {
      const float* src = &global[static_cast<size_t>((b * seq_len + shard.position(t)) * row)];
      convert(src, DType::kF32, out.data() + static_cast<size_t>((b * n + t) * row) * es, dtype,
              row);
    }
  }
  return out;
}

/// Writes a local [batch, n, row] tensor into its shard's rows of the global
/// [batch, seq_len, row] tensor. lse [B, H, n] is batch B * H, row 1.
template <typename T, typename U>
void scatter_rows(const std::vector<T>& local, int64_t batch, int64_t seq_len, int64_t row,
                  const Shard& shard, std::vector<U>& global) {
  const int64_t n = shard.size();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t dst = (b * seq_len + shard.position(t)) * row, src = (b * n + t) * row;
      for (int64_t x = 0; x < row; ++x) {
        global[static_cast<size_t>(dst + x)] = static_cast<U>(local[static_cast<size_t>(src + x)]);
      }
    }
  }
}

// ---- errors against the oracle ------------------------------------------------------------------

namespace detail {
template <typename T>
double relative_error(const std::vector<T>& a, const std::vector<double>& ref, bool zero_ref_rms,
                      std::string* why) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (why) why->clear();
  if (a.size() != ref.size()) {
    if (why) *why = "size " + std::to_string(a.size()) + ", expected " + std::to_string(ref.size());
    return nan;
  }
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]);
    if (std::isnan(x)) {
      if (why) *why = "element " + std::to_string(i) + " is NaN (never written?)";
      return nan;
    }
    if (std::isinf(ref[i])) {
      if (x != ref[i]) {
        if (why) {
          *why = "element " + std::to_string(i) + " = " + std::to_string(x) + ", expected " +
                 std::to_string(ref[i]);
        }
        return std::numeric_limits<double>::infinity();
      }
      continue;
    }
    num += (x - ref[i]) * (x - ref[i]);
    den += ref[i] * ref[i];
  }
  if (den > 0.0) return std::sqrt(num / den);
  if (zero_ref_rms) return a.empty() ? 0.0 : std::sqrt(num / static_cast<double>(a.size()));
  return num == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
}
}  // namespace detail

/// ||a - ref|| / ||ref|| over the elements where ref is finite; where ref is infinite (lse of a
/// row that sees nothing: -inf) a must equal it exactly. NaN anywhere in a, or another size,
/// gives NaN, which fails every `<=`; a mismatched infinity gives +inf. An all-zero reference
/// needs an all-zero answer. `why`, when given, says what broke.
template <typename T>
double normalised_error(const std::vector<T>& a, const std::vector<double>& ref,
                        std::string* why = nullptr) {
  return detail::relative_error(a, ref, false, why);
}

/// normalised_error for gradients, except that an all-zero reference is compared by the RMS of
/// a: a gradient that is exactly 0 in exact arithmetic (a query that sees only one key:
/// dS = P (dP - Delta) = dP - dP) comes out of f32 as rounding noise of its unit-scale terms.
template <typename T>
double gradient_error(const std::vector<T>& a, const std::vector<double>& ref,
                      std::string* why = nullptr) {
  return detail::relative_error(a, ref, true, why);
}

// ---- ring cases ---------------------------------------------------------------------------------

/// One ring problem: `world` ranks over n tokens of [batch, n, heads, head_dim] inputs in dtype;
/// sink_logits adds learned sink logits z [heads].
struct RingCase {
  int world;
  int64_t n;
  Layout layout;
  bool causal;
  int64_t window, sinks;
  bool sink_logits;
  int64_t heads, kv_heads, head_dim, batch;
  DType dtype;
};

/// "P3_N61_zigzag_causal_W5_S1_z_H4x2_D32_B1_f32": names the instances of a suite over RingCase.
inline std::string ring_case_name(const ::testing::TestParamInfo<RingCase>& info) {
  const RingCase& c = info.param;
  std::ostringstream os;
  os << "P" << c.world << "_N" << c.n << "_" << layout_name(c.layout)
     << (c.causal ? "_causal" : "_full") << "_W" << c.window << "_S" << c.sinks
     << (c.sink_logits ? "_z" : "") << "_H" << c.heads << "x" << c.kv_heads << "_D" << c.head_dim
     << "_B" << c.batch << "_" << dtype_name(c.dtype);
  return os.str();
}

/// The mask of a case.
inline AttentionSpec spec_of(const RingCase& c) {
  AttentionSpec spec;
  spec.causal = c.causal;
  spec.window = c.window;
  spec.sinks = c.sinks;
  spec.layout = c.layout;
  return spec;
}

/// Global inputs of a ring case, N(0, 1) rounded to the case's dtype, drawn in the order q, k,
/// v (then dout when asked); z holds sink logits (-1, 2.5, -1, ...) for every head.
struct RingInputs {
  std::vector<float> q, k, v, dout, z;
};

inline RingInputs make_ring_inputs(const RingCase& c, uint32_t seed, bool with_dout) {
  std::mt19937 gen(seed);
  const size_t qn = static_cast<size_t>(c.batch * c.n * c.heads * c.head_dim);
  const size_t kn = static_cast<size_t>(c.batch * c.n * c.kv_heads * c.head_dim);
  RingInputs g;
  g.q = randn(qn, gen, 1.0f, c.dtype);
  g.k = randn(kn, gen, 1.0f, c.dtype);
  g.v = randn(kn, gen, 1.0f, c.dtype);
  if (with_dout) g.dout = randn(qn, gen, 1.0f, c.dtype);
  for (int64_t h = 0; h < c.heads; ++h) g.z.push_back(h % 2 ? 2.5f : -1.0f);
  return g;
}

// ---- communicators: expected values from (rank, tag, index), nccl-tests style -------------------

/// Byte i of the message `source` sends on `tag`.
inline uint8_t pattern(int source, int tag, size_t i) {
  return static_cast<uint8_t>(source * 131 + tag * 31 + i * 7 + (i >> 8) * 3);
}

inline void fill_pattern(std::vector<uint8_t>& buf, int source, int tag) {
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = pattern(source, tag, i);
}

/// Bytes of buf that differ from what `source` sent on `tag`.
inline size_t count_mismatches(const std::vector<uint8_t>& buf, int source, int tag) {
  size_t bad = 0;
  for (size_t i = 0; i < buf.size(); ++i) bad += buf[i] != pattern(source, tag, i);
  return bad;
}

/// Allreduce input of `rank`: small integers, exact in every type, so the result does not
/// depend on the order of the sum and each rank computes it alone.
template <typename T>
std::vector<T> allreduce_input(int rank, size_t count) {
  std::vector<T> v(count);
  for (size_t i = 0; i < count; ++i) {
    v[i] = static_cast<T>(static_cast<int64_t>((rank + 1) * 37 + i * 13) % 101 - 50);
  }
  return v;
}

/// What an allreduce of allreduce_input over `world` ranks gives.
template <typename T>
std::vector<T> allreduce_expected(int world, ReduceOp op, size_t count) {
  std::vector<T> out = allreduce_input<T>(0, count);
  for (int r = 1; r < world; ++r) {
    const std::vector<T> in = allreduce_input<T>(r, count);
    for (size_t i = 0; i < count; ++i) {
      if (op == ReduceOp::kSum) out[i] += in[i];
      if (op == ReduceOp::kMax) out[i] = std::max(out[i], in[i]);
      if (op == ReduceOp::kMin) out[i] = std::min(out[i], in[i]);
    }
  }
  return out;
}

/// Allreduces allreduce_input on a host buffer; returns the elements that came out wrong.
template <typename T>
size_t allreduce_mismatches(Communicator& comm, ReduceType type, ReduceOp op, size_t count) {
  std::vector<T> data = allreduce_input<T>(comm.rank(), count);
  const std::vector<T> expected = allreduce_expected<T>(comm.size(), op, count);
  comm.allreduce(data.data(), count, type, op);
  size_t bad = 0;
  for (size_t i = 0; i < count; ++i) bad += data[i] != expected[i];
  return bad;
}

inline const char* op_name(ReduceOp op) {
  return op == ReduceOp::kSum ? "sum" : op == ReduceOp::kMax ? "max" : "min";
}

/// Allreduces allreduce_input of every element type (f32, f64, i64) on host buffers and
/// expects every element exact.
inline void expect_exact_allreduce(Communicator& comm, ReduceOp op, size_t count) {
  const std::string where = std::string(op_name(op)) + ", count " + std::to_string(count);
  EXPECT_EQ(allreduce_mismatches<float>(comm, ReduceType::kF32, op, count), 0u) << "f32, " << where;
  EXPECT_EQ(allreduce_mismatches<double>(comm, ReduceType::kF64, op, count), 0u)
      << "f64, " << where;
  EXPECT_EQ(allreduce_mismatches<int64_t>(comm, ReduceType::kI64, op, count), 0u)
      << "i64, " << where;
}

}  // namespace ringattn::test
