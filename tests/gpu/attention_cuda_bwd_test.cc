// The CUDA backward (backward_begin, fold_backward, sink_logits_backward, store_f32) against the
// f64 oracle's backward (ref::attention_backward) with a normalised error, for both kernel
// families: the whole K/V as one block, and K/V cut into uneven blocks folded in a shuffled
// order (each block adding into its own slice of the dk/dv accumulators, dq across blocks).
// Accumulators start at a non-zero value (folds add, never overwrite), the dq output is
// poisoned with NaN before store_f32, and padding around strided tensors holds NaN (inputs) or
// a sentinel (accumulators) that must come back untouched. Plus zigzag positions, rows that see
// nothing, more than 32 query tiles, the utilities and bad input.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/attention_ref.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/cuda_memory.h"
#include "tests/common/test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace ringattn::cuda {
namespace {

constexpr float kAccInit = 0.25f;        // dk/dv accumulators start here
constexpr float kDsinkInit = 0.5f;       // and dsink here
constexpr float kPadSentinel = 1234.5f;  // padding of f32 accumulators: never written
const float kNaN = std::numeric_limits<float>::quiet_NaN();

using test::download;
using test::gradient_error;
using test::iota_pos;
using test::randn;
using test::round_to;
using test::upload;

// A [B, N, H, D] tensor on the device whose head rows are padded to D + pad elements; the
// padding holds pad_value. Values are given and returned contiguous, as f32.
struct DeviceTensor {
  DeviceBuffer buf;
  TensorView view;
  std::vector<int64_t> shape;
  int64_t pad = 0;

  DeviceTensor(const std::vector<float>& vals, DType dt, std::vector<int64_t> shp, int64_t row_pad,
               float pad_value, const Stream& s)
      : shape(std::move(shp)), pad(row_pad) {
    const int64_t b = shape[0], n = shape[1], h = shape[2], d = shape[3], row = d + pad;
    const int64_t elems = b * n * h * row;
    std::vector<unsigned char> bytes(static_cast<size_t>(elems) * dtype_size(dt));
    for (int64_t r = 0; r < b * n * h; ++r) {
      for (int64_t c = 0; c < row; ++c) {
        const float x = c < d ? vals[static_cast<size_t>(r * d + c)] : pad_value;
        store_from_float(bytes.data(), dt, r * row + c, x);
      }
    }
    buf.resize(bytes.size());
    copy_async(buf.data(), bytes.data(), bytes.size(), s.get());
    s.synchronize();
    const int64_t strides[4] = {n * h * row, h * row, row, 1};
    view = TensorView(buf.data(), dt, 4, shape.data(), strides, Device::kCUDA);
  }

  // The values (contiguous) and, when pads is given, every padding element.
  std::vector<float> download(const Stream& s, std::vector<float>* pads = nullptr) const {
    const int64_t d = shape[3], row = d + pad, rows = shape[0] * shape[1] * shape[2];
    std::vector<unsigned char> bytes(buf.size());
    copy_async(bytes.data(), buf.data(), bytes.size(), s.get());
    s.synchronize();
    std::vector<float> out;
    out.reserve(static_cast<size_t>(rows * d));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < row; ++c) {
        const float x = load_as_float(bytes.data(), view.dtype(), r * row + c);
        if (c < d) {
          out.push_back(x);
        } else if (pads != nullptr) {
          pads->push_back(x);
        }
      }
    }
    return out;
  }
};

double tolerance(DType dt) {
  switch (dt) {
    case DType::kBF16:
      return 2e-2;
    case DType::kF16:
      return 5e-3;
    default:
      return 1e-4;
  }
}

const char* choice_name(KernelChoice c) {
  switch (c) {
    case KernelChoice::kGeneric:
      return "generic";
    case KernelChoice::kTensorCore:
      return "tensor-core";
    default:
      return "auto";
  }
}

struct Problem {
  std::string name;
  int64_t batch = 1, nq = 1, nk = 1, heads = 1, kv_heads = 1, dim = 64;
  DType dtype = DType::kF32;
  AttentionSpec spec;
  std::vector<int64_t> q_pos, k_pos;  // empty: 0..n-1
  std::vector<float> sink;            // learned sink logits; empty: none
  int blocks = 3;                     // blocks of the shuffled multi-block run
  std::vector<int64_t> cuts;          // explicit block boundaries (else drawn from the seed)
  int64_t pad = 0;                    // padding of every head row (strided views)
  uint32_t seed = 1;
};

void PrintTo(const Problem& p, std::ostream* os) { *os << p.name; }

struct Grads {
  std::vector<float> dq, dk, dv, dsink;
  std::vector<float> dq_pads, dk_pads, dv_pads;
};

class Case {
 public:
  explicit Case(Problem prob) : p_(std::move(prob)) {
    if (p_.q_pos.empty()) p_.q_pos = iota_pos(p_.nq);
    if (p_.k_pos.empty()) p_.k_pos = iota_pos(p_.nk);
    std::mt19937 rng(p_.seed);
    if (p_.cuts.empty()) p_.cuts = test::uneven_cuts(p_.nk, p_.blocks, rng);
    const size_t qn = static_cast<size_t>(p_.batch * p_.nq * p_.heads * p_.dim);
    const size_t kn = static_cast<size_t>(p_.batch * p_.nk * p_.kv_heads * p_.dim);
    q_ = randn(qn, rng, p_.dtype);
    k_ = randn(kn, rng, p_.dtype);
    v_ = randn(kn, rng, p_.dtype);
    dout_ = randn(qn, rng, p_.dtype);
    // The oracle reads the rounded values as f32 (the same numbers the kernels see).
    const TensorView qh = host_view(q_, q_shape()), kh = host_view(k_, k_shape());
    const TensorView vh = host_view(v_, k_shape()), dh = host_view(dout_, q_shape());
    TensorView zh(p_.sink.data(), DType::kF32, {p_.heads});
    const TensorView* sink = p_.sink.empty() ? nullptr : &zh;
    const ref::RefOutput fwd =
        ref::attention_forward(p_.spec, qh, p_.q_pos.data(), kh, vh, p_.k_pos.data(), sink);
    ref_ = ref::attention_backward(p_.spec, qh, p_.q_pos.data(), kh, vh, p_.k_pos.data(), sink, dh);
    // The forward's outputs as the ring hands them over: o in the input dtype, lse f32.
    std::vector<float> o(fwd.o.size());
    for (size_t i = 0; i < o.size(); ++i) o[i] = round_to(static_cast<float>(fwd.o[i]), p_.dtype);
    lse_.assign(fwd.lse.begin(), fwd.lse.end());

    d_q_ = std::make_unique<DeviceTensor>(q_, p_.dtype, q_shape(), p_.pad, kNaN, stream_);
    d_k_ = std::make_unique<DeviceTensor>(k_, p_.dtype, k_shape(), p_.pad, kNaN, stream_);
    d_v_ = std::make_unique<DeviceTensor>(v_, p_.dtype, k_shape(), p_.pad, kNaN, stream_);
    d_dout_ = std::make_unique<DeviceTensor>(dout_, p_.dtype, q_shape(), p_.pad, kNaN, stream_);
    d_o_ = std::make_unique<DeviceTensor>(o, p_.dtype, q_shape(), p_.pad, kNaN, stream_);
    d_lse_ = upload(lse_, stream_);
    d_q_pos_ = upload(p_.q_pos, stream_);
    d_k_pos_ = upload(p_.k_pos, stream_);
    if (!p_.sink.empty()) d_sink_ = upload(p_.sink, stream_);
  }

  const Problem& problem() const { return p_; }
  const ref::RefGrads& ref() const { return ref_; }
  const std::vector<float>& lse() const { return lse_; }

  // One backward on the device: the blocks of `cuts`, in shuffled order when asked.
  Grads run(KernelChoice choice, const std::vector<int64_t>& cuts, bool shuffle) {
    const int64_t qn = p_.batch * p_.nq * p_.heads * p_.dim;
    const int64_t kn = p_.batch * p_.nk * p_.kv_heads * p_.dim;
    DeviceBuffer delta(static_cast<size_t>(p_.batch * p_.heads * p_.nq) * sizeof(float));
    DeviceBuffer dq_acc(static_cast<size_t>(qn) * sizeof(float));
    const BackwardState st{d_lse_.as<float>(),
                           delta.as<float>(),
                           dq_acc.as<float>(),
                           p_.batch,
                           p_.nq,
                           p_.heads,
                           p_.dim};
    const std::vector<float> init(static_cast<size_t>(kn), kAccInit);
    DeviceTensor dk(init, DType::kF32, k_shape(), p_.pad, kPadSentinel, stream_);
    DeviceTensor dv(init, DType::kF32, k_shape(), p_.pad, kPadSentinel, stream_);

    backward_begin(d_o_->view, d_dout_->view, st, stream_.get());
    std::vector<size_t> order(cuts.size() - 1);
    std::iota(order.begin(), order.end(), 0);
    if (shuffle) {
      std::mt19937 rng(p_.seed + 99);
      std::shuffle(order.begin(), order.end(), rng);
      if (order.size() > 1 && std::is_sorted(order.begin(), order.end())) {
        std::reverse(order.begin(), order.end());
      }
    }
    for (size_t bi : order) {
      const int64_t b0 = cuts[bi], b1 = cuts[bi + 1];
      fold_backward(p_.spec, d_q_->view, d_q_pos_.as<int64_t>(), d_k_->view.slice(1, b0, b1),
                    d_v_->view.slice(1, b0, b1), d_k_pos_.as<int64_t>() + b0, d_dout_->view, st,
                    dk.view.slice(1, b0, b1), dv.view.slice(1, b0, b1), stream_.get(), choice);
    }
    // dq output in the input dtype, every byte poisoned (all-ones bits are NaN in all dtypes).
    DeviceTensor dq_out(std::vector<float>(static_cast<size_t>(qn), 0.0f), p_.dtype, q_shape(),
                        p_.pad, 0.0f, stream_);
    memset_async(dq_out.buf.data(), 0xff, dq_out.buf.size(), stream_.get());
    store_f32(dq_acc.as<float>(), dq_out.view, stream_.get());
    DeviceBuffer dsink =
        upload(std::vector<float>(static_cast<size_t>(p_.heads), kDsinkInit), stream_);
    if (!p_.sink.empty()) {
      sink_logits_backward(st, d_sink_.as<float>(), dsink.as<float>(), stream_.get());
    }
    stream_.synchronize();

    Grads g;
    g.dq = dq_out.download(stream_, &g.dq_pads);
    g.dk = dk.download(stream_, &g.dk_pads);
    g.dv = dv.download(stream_, &g.dv_pads);
    for (float& x : g.dk) x -= kAccInit;
    for (float& x : g.dv) x -= kAccInit;
    g.dsink = download<float>(dsink, stream_);
    for (float& x : g.dsink) x -= kDsinkInit;
    return g;
  }

  // Kernel families to test: generic always, tensor cores where they apply.
  std::vector<KernelChoice> choices() const {
    std::vector<KernelChoice> c = {KernelChoice::kGeneric};
    if (tensor_core_supported(p_.dtype, p_.dim) && p_.pad % 8 == 0) {
      c.push_back(KernelChoice::kTensorCore);
    }
    return c;
  }

  void expect_grads(const Grads& g, double tol, const std::string& what) const {
    EXPECT_LE(gradient_error(g.dq, ref_.dq), tol) << "dq, " << what;
    EXPECT_LE(gradient_error(g.dk, ref_.dk), tol) << "dk, " << what;
    EXPECT_LE(gradient_error(g.dv, ref_.dv), tol) << "dv, " << what;
    EXPECT_LE(gradient_error(g.dsink, ref_.dsink), tol) << "dsink, " << what;
    // Padding: the poisoned dq output keeps its NaN pads, the accumulators their sentinel.
    for (float x : g.dq_pads) ASSERT_TRUE(std::isnan(x)) << "dq padding written, " << what;
    for (float x : g.dk_pads) ASSERT_EQ(x, kPadSentinel) << "dk padding written, " << what;
    for (float x : g.dv_pads) ASSERT_EQ(x, kPadSentinel) << "dv padding written, " << what;
  }

  // Every kernel family, one block and the shuffled blocks, against the oracle.
  void expect_matches(double tol) {
    for (KernelChoice choice : choices()) {
      const std::vector<int64_t> one_block = {0, p_.nk};
      expect_grads(run(choice, one_block, false), tol,
                   std::string(choice_name(choice)) + " kernel, one block");
      expect_grads(run(choice, p_.cuts, true), tol,
                   std::string(choice_name(choice)) + " kernel, " +
                       std::to_string(p_.cuts.size() - 1) + " blocks shuffled");
    }
  }

 private:
  std::vector<int64_t> q_shape() const { return {p_.batch, p_.nq, p_.heads, p_.dim}; }
  std::vector<int64_t> k_shape() const { return {p_.batch, p_.nk, p_.kv_heads, p_.dim}; }
  static TensorView host_view(std::vector<float>& x, const std::vector<int64_t>& shape) {
    return TensorView(x.data(), DType::kF32, {shape[0], shape[1], shape[2], shape[3]});
  }

  Problem p_;
  Stream stream_;
  std::vector<float> q_, k_, v_, dout_, lse_;
  ref::RefGrads ref_;
  std::unique_ptr<DeviceTensor> d_q_, d_k_, d_v_, d_dout_, d_o_;
  DeviceBuffer d_lse_, d_q_pos_, d_k_pos_, d_sink_;
};

// ---- the sweep: shapes, masks and dtypes
// ---------------------------------------------------------

std::vector<Problem> sweep_problems() {
  std::vector<Problem> v;
  auto add = [&](Problem p) {
    p.seed = static_cast<uint32_t>(1000 + v.size() * 7);
    v.push_back(std::move(p));
  };
  {
    Problem p;
    p.name = "causal_gqa_bf16_d64";
    p.batch = 2, p.nq = p.nk = 301, p.heads = 4, p.kv_heads = 2, p.dim = 64;
    p.dtype = DType::kBF16;
    p.spec.causal = true;
    add(p);
  }
  {
    Problem p;
    p.name = "full_f16_d128_nq77_nk140";
    p.nq = 77, p.nk = 140, p.heads = 2, p.kv_heads = 2, p.dim = 128;
    p.dtype = DType::kF16;
    p.blocks = 2;
    add(p);
  }
  {
    Problem p;
    p.name = "causal_window_sinks_mqa_bf16_d128_learned_sinks";
    p.batch = 2, p.nq = p.nk = 301, p.heads = 4, p.kv_heads = 1, p.dim = 128;
    p.dtype = DType::kBF16;
    p.spec.causal = true, p.spec.window = 40, p.spec.sinks = 4;
    p.sink = {2.0f, -1.5f, 0.5f, 0.0f};
    add(p);
  }
  {
    Problem p;
    p.name = "full_window_sinks_f16_d64_strided_learned_sinks";
    p.nq = p.nk = 200, p.heads = 2, p.kv_heads = 1, p.dim = 64;
    p.dtype = DType::kF16;
    p.spec.window = 30, p.spec.sinks = 2;
    p.sink = {1.0f, -0.5f};
    p.pad = 8;
    add(p);
  }
  {
    Problem p;
    p.name = "causal_gqa_f16_d128_scale";
    p.batch = 2, p.nq = p.nk = 130, p.heads = 4, p.kv_heads = 2, p.dim = 128;
    p.dtype = DType::kF16;
    p.spec.causal = true, p.spec.scale = 0.05f;
    add(p);
  }
  {
    Problem p;
    p.name = "causal_window_sinks_gqa_f32_d40";
    p.batch = 2, p.nq = p.nk = 77, p.heads = 4, p.kv_heads = 2, p.dim = 40;
    p.dtype = DType::kF32;
    p.spec.causal = true, p.spec.window = 16, p.spec.sinks = 3;
    add(p);
  }
  {
    Problem p;
    p.name = "full_mqa_f32_d128_learned_sinks_strided";
    p.nq = p.nk = 130, p.heads = 2, p.kv_heads = 1, p.dim = 128;
    p.dtype = DType::kF32;
    p.sink = {0.5f, -1.0f};
    p.pad = 3;
    add(p);
  }
  {
    Problem p;
    p.name = "causal_f32_d256";
    p.nq = p.nk = 70, p.heads = 2, p.kv_heads = 1, p.dim = 256;
    p.dtype = DType::kF32;
    p.spec.causal = true;
    add(p);
  }
  {
    Problem p;
    p.name = "causal_bf16_d32";
    p.batch = 2, p.nq = p.nk = 100, p.heads = 2, p.kv_heads = 2, p.dim = 32;
    p.dtype = DType::kBF16;
    p.spec.causal = true;
    add(p);
  }
  {
    Problem p;
    p.name = "window_f16_d96_learned_sinks";
    p.nq = p.nk = 90, p.heads = 3, p.kv_heads = 1, p.dim = 96;
    p.dtype = DType::kF16;
    p.spec.window = 25, p.spec.sinks = 1;
    p.sink = {0.0f, 1.0f, -1.0f};
    add(p);
  }
  {
    Problem p;
    p.name = "full_f32_d7_odd";
    p.nq = 33, p.nk = 41, p.heads = 2, p.kv_heads = 1, p.dim = 7;
    p.dtype = DType::kF32;
    add(p);
  }
  {
    Problem p;
    p.name = "causal_window_bf16_d64_strided";
    p.batch = 2, p.nq = p.nk = 150, p.heads = 2, p.kv_heads = 2, p.dim = 64;
    p.dtype = DType::kBF16;
    p.spec.causal = true, p.spec.window = 70;
    p.pad = 16;
    add(p);
  }
  return v;
}

class AttentionCudaBwdSweep : public ::testing::TestWithParam<Problem> {};

TEST_P(AttentionCudaBwdSweep, MatchesOracle) {
  RINGATTN_REQUIRE_GPU();
  Case c(GetParam());
  c.expect_matches(tolerance(GetParam().dtype));
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionCudaBwdSweep, ::testing::ValuesIn(sweep_problems()),
                         [](const ::testing::TestParamInfo<Problem>& info) {
                           return info.param.name;
                         });

// ---- positions
// -----------------------------------------------------------------------------------

// Rank 1's zigzag shard against the three ranks' shards in ring order, causal with and without a
// window: positions are neither contiguous nor sorted, and tiles straddle the two chunks.
TEST(AttentionCudaBwd, ZigzagPositions) {
  RINGATTN_REQUIRE_GPU();
  const int64_t n = 600, chunk = n / 6;
  auto shard = [&](int r) { return test::zigzag_positions(chunk, 3, r); };
  for (DType dt : {DType::kBF16, DType::kF32}) {
    for (int64_t window : {0, 150}) {
      Problem p;
      p.heads = 4, p.kv_heads = 2, p.dim = 64;
      p.dtype = dt;
      p.nq = 2 * chunk;
      p.nk = n;
      p.spec.causal = true;
      p.spec.window = window;
      p.spec.sinks = window ? 4 : 0;
      p.q_pos = shard(1);
      for (int r : {1, 0, 2}) {
        const std::vector<int64_t> s = shard(r);
        p.k_pos.insert(p.k_pos.end(), s.begin(), s.end());
      }
      p.cuts = {0, 2 * chunk, 4 * chunk, 6 * chunk};
      p.seed = static_cast<uint32_t>(window + 3);
      SCOPED_TRACE(std::string(dtype_name(dt)) + ", window " + std::to_string(window));
      Case c(p);
      c.expect_matches(tolerance(dt));
    }
  }
}

// More query tiles than a warp tests at once (33+ of 64 rows), a window that skips most of them,
// and sink keys in the first key tile only.
TEST(AttentionCudaBwd, ManyQueryTilesWindowAndSinks) {
  RINGATTN_REQUIRE_GPU();
  for (DType dt : {DType::kBF16, DType::kF32}) {
    Problem p;
    p.nq = p.nk = 2150;
    p.heads = 2, p.kv_heads = 1, p.dim = 64;
    p.dtype = dt;
    p.spec.causal = true, p.spec.window = 100, p.spec.sinks = 4;
    p.sink = {0.3f, -0.7f};
    p.seed = 77;
    SCOPED_TRACE(dtype_name(dt));
    Case c(p);
    c.expect_matches(tolerance(dt));
  }
}

// Causal queries whose keys all lie in the future: lse = -inf, every gradient exactly 0, no NaN;
// then mixed with rows that see keys (rows with lse = -inf inside computed tiles), and with
// learned sinks (lse = z for the rows that see no key).
TEST(AttentionCudaBwd, RowsThatSeeNothing) {
  RINGATTN_REQUIRE_GPU();
  for (DType dt : {DType::kBF16, DType::kF32}) {
    SCOPED_TRACE(dtype_name(dt));
    Problem p;
    p.heads = 2, p.dim = 64;
    p.dtype = dt;
    p.nq = 20;
    p.nk = 300;
    p.spec.causal = true;
    p.q_pos = iota_pos(p.nq);
    p.k_pos = iota_pos(p.nk, 100);
    p.cuts = {0, 130, 300};
    {
      Case c(p);
      for (float x : c.lse()) ASSERT_EQ(x, -std::numeric_limits<float>::infinity());
      for (KernelChoice choice : c.choices()) {
        const Grads g = c.run(choice, p.cuts, true);
        for (float x : g.dq) ASSERT_EQ(x, 0.0f) << choice_name(choice);
        for (float x : g.dk) ASSERT_EQ(x, 0.0f) << choice_name(choice);
        for (float x : g.dv) ASSERT_EQ(x, 0.0f) << choice_name(choice);
      }
    }
    p.q_pos = iota_pos(p.nq, 90);
    {
      Case c(p);
      c.expect_matches(tolerance(dt));
    }
    p.sink = {0.5f, -2.0f};
    {
      Case c(p);
      c.expect_matches(tolerance(dt));
    }
  }
}

// bf16 rows whose strides are not multiples of 8 elements: kAuto takes the generic kernel (and
// is right), an explicit kTensorCore is refused.
TEST(AttentionCudaBwd, MisalignedStridesFallBackToGeneric) {
  RINGATTN_REQUIRE_GPU();
  Problem p;
  p.nq = p.nk = 100, p.heads = 2, p.kv_heads = 1, p.dim = 64;
  p.dtype = DType::kBF16;
  p.spec.causal = true;
  p.pad = 4;
  Case c(p);
  const std::vector<int64_t> one_block = {0, p.nk};
  if (kernel_choice_from_env() != KernelChoice::kTensorCore) {
    c.expect_grads(c.run(KernelChoice::kAuto, one_block, false), tolerance(p.dtype), "auto");
  }
  try {
    c.run(KernelChoice::kTensorCore, one_block, false);
    ADD_FAILURE() << "kTensorCore accepted misaligned strides";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported) << e.what();
  }
}

// ---- utilities
// -----------------------------------------------------------------------------------

// store_f32 rounds to nearest even into every dtype (ties, overflow, subnormals, NaN, -0) and
// writes nothing but the rows of the view.
TEST(AttentionCudaBwd, StoreF32RoundsIntoStridedViews) {
  RINGATTN_REQUIRE_GPU();
  Stream s;
  const std::vector<int64_t> shape = {2, 5, 3, 33};
  const size_t n = 2 * 5 * 3 * 33;
  std::mt19937 rng(5);
  std::vector<float> acc = randn(n, rng, DType::kF32);
  const float specials[] = {1.0f + 1.0f / 256.0f,   // bf16 tie -> 1.0 (even)
                            1.0f + 3.0f / 256.0f,   // bf16 tie -> 1 + 2/128 (even)
                            1.0f + 1.0f / 2048.0f,  // f16 tie -> 1.0
                            70000.0f,               // f16 overflow -> inf
                            -1e-6f,                 // f16 subnormal
                            -0.0f,
                            kNaN,
                            std::numeric_limits<float>::infinity(),
                            3.0e38f};
  for (size_t i = 0; i < std::size(specials); ++i) acc[i * 7] = specials[i];
  DeviceBuffer d_acc = upload(acc, s);
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(dtype_name(dt));
    DeviceTensor out(std::vector<float>(n, 0.0f), dt, shape, 5, 0.0f, s);
    memset_async(out.buf.data(), 0xff, out.buf.size(), s.get());
    store_f32(d_acc.as<float>(), out.view, s.get());
    s.synchronize();
    std::vector<float> pads;
    const std::vector<float> got = out.download(s, &pads);
    for (size_t i = 0; i < n; ++i) {
      const float want = round_to(acc[i], dt);
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(got[i])) << i;
      } else {
        EXPECT_EQ(float_bits(got[i]), float_bits(want)) << i << ": " << acc[i];
      }
    }
    for (float x : pads) ASSERT_TRUE(std::isnan(x)) << "padding written";
  }
}

// add_f32: dst += src for views with different strides; exact in f32.
TEST(AttentionCudaBwd, AddF32Strided) {
  RINGATTN_REQUIRE_GPU();
  Stream s;
  const std::vector<int64_t> shape = {3, 7, 2, 20};
  const size_t n = 3 * 7 * 2 * 20;
  std::mt19937 rng(9);
  const std::vector<float> a = randn(n, rng, DType::kF32), b = randn(n, rng, DType::kF32);
  DeviceTensor dst(a, DType::kF32, shape, 5, kPadSentinel, s);
  DeviceTensor src(b, DType::kF32, shape, 2, kNaN, s);
  add_f32(dst.view, src.view, s.get());
  s.synchronize();
  std::vector<float> pads;
  const std::vector<float> got = dst.download(s, &pads);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], a[i] + b[i]) << i;
  for (float x : pads) ASSERT_EQ(x, kPadSentinel);
}

// backward_begin: delta = rowsum(dout * o) for o and dout of different dtypes and strides, and
// dq = 0 whatever it held.
TEST(AttentionCudaBwd, BackwardBeginDeltaAndZeroDq) {
  RINGATTN_REQUIRE_GPU();
  Stream s;
  const int64_t B = 2, N = 37, H = 3, D = 50;
  const size_t n = static_cast<size_t>(B * N * H * D);
  std::mt19937 rng(11);
  const std::vector<float> o = randn(n, rng, DType::kBF16), dout = randn(n, rng, DType::kF32);
  DeviceTensor d_o(o, DType::kBF16, {B, N, H, D}, 6, kNaN, s);
  DeviceTensor d_dout(dout, DType::kF32, {B, N, H, D}, 0, kNaN, s);
  DeviceBuffer lse(static_cast<size_t>(B * H * N) * 4), delta(static_cast<size_t>(B * H * N) * 4);
  DeviceBuffer dq(n * 4);
  memset_async(dq.data(), 0xff, dq.size(), s.get());
  const BackwardState st{lse.as<float>(), delta.as<float>(), dq.as<float>(), B, N, H, D};
  backward_begin(d_o.view, d_dout.view, st, s.get());
  const std::vector<float> got = download<float>(delta, s);
  const std::vector<float> got_dq = download<float>(dq, s);
  for (float x : got_dq) ASSERT_EQ(x, 0.0f);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < N; ++i) {
        double want = 0.0;
        for (int64_t c = 0; c < D; ++c) {
          const size_t e = static_cast<size_t>(((b * N + i) * H + h) * D + c);
          want += static_cast<double>(o[e]) * dout[e];
        }
        EXPECT_NEAR(got[static_cast<size_t>((b * H + h) * N + i)], want,
                    1e-4 * (1 + std::abs(want)));
      }
    }
  }
}

// ---- bad input
// -----------------------------------------------------------------------------------

template <typename F>
ErrorCode error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kInternal;  // "no error"
}

TEST(AttentionCudaBwd, RejectsBadInput) {
  RINGATTN_REQUIRE_GPU();
  Stream s;
  const int64_t B = 1, N = 16, H = 2, D = 64;
  DeviceBuffer mem(static_cast<size_t>(B * N * H * D) * 4 * 8);
  void* m = mem.data();
  const TensorView q(m, DType::kBF16, {B, N, H, D}, Device::kCUDA);
  const TensorView k(m, DType::kBF16, {B, N, 1, D}, Device::kCUDA);
  const TensorView acc(m, DType::kF32, {B, N, 1, D}, Device::kCUDA);
  const int64_t* pos = static_cast<const int64_t*>(m);
  const BackwardState st{
      static_cast<float*>(m), static_cast<float*>(m), static_cast<float*>(m), B, N, H, D};
  AttentionSpec spec;
  auto fold = [&](const TensorView& qq, const TensorView& kk, const TensorView& dd,
                  const TensorView& dk, const BackwardState& state, KernelChoice choice) {
    return error_of(
        [&] { fold_backward(spec, qq, pos, kk, kk, pos, dd, state, dk, acc, s.get(), choice); });
  };
  // Tensor cores for f32 or an unsupported head dim.
  const TensorView q32(m, DType::kF32, {B, N, H, D}, Device::kCUDA);
  const TensorView k32(m, DType::kF32, {B, N, 1, D}, Device::kCUDA);
  EXPECT_EQ(fold(q32, k32, q32, acc, st, KernelChoice::kTensorCore), ErrorCode::kUnsupported);
  const TensorView q40(m, DType::kBF16, {B, N, H, 40}, Device::kCUDA);
  const TensorView k40(m, DType::kBF16, {B, N, 1, 40}, Device::kCUDA);
  const TensorView acc40(m, DType::kF32, {B, N, 1, 40}, Device::kCUDA);
  const BackwardState st40{st.lse, st.delta, st.dq, B, N, H, 40};
  EXPECT_EQ(fold(q40, k40, q40, acc40, st40, KernelChoice::kTensorCore), ErrorCode::kUnsupported);
  // Host memory.
  const TensorView q_host(m, DType::kBF16, {B, N, H, D}, Device::kCPU);
  EXPECT_EQ(fold(q_host, k, q, acc, st, KernelChoice::kAuto), ErrorCode::kInvalidArgument);
  // dk of the wrong shape or dtype.
  const TensorView acc_bad(m, DType::kF32, {B, N + 1, 1, D}, Device::kCUDA);
  EXPECT_EQ(fold(q, k, q, acc_bad, st, KernelChoice::kAuto), ErrorCode::kInvalidArgument);
  const TensorView acc_bf16(m, DType::kBF16, {B, N, 1, D}, Device::kCUDA);
  EXPECT_EQ(fold(q, k, q, acc_bf16, st, KernelChoice::kAuto), ErrorCode::kInvalidArgument);
  // dout of another dtype; H not a multiple of H_kv; a state sized for another q.
  EXPECT_EQ(fold(q, k, q32, acc, st, KernelChoice::kAuto), ErrorCode::kInvalidArgument);
  const TensorView q3(m, DType::kBF16, {B, N, 3, D}, Device::kCUDA);
  const TensorView k2(m, DType::kBF16, {B, N, 2, D}, Device::kCUDA);
  const TensorView acc2(m, DType::kF32, {B, N, 2, D}, Device::kCUDA);
  const BackwardState st3{st.lse, st.delta, st.dq, B, N, 3, D};
  EXPECT_EQ(fold(q3, k2, q3, acc2, st3, KernelChoice::kAuto), ErrorCode::kInvalidArgument);
  const BackwardState st_bad{st.lse, st.delta, st.dq, B, N + 1, H, D};
  EXPECT_EQ(fold(q, k, q, acc, st_bad, KernelChoice::kAuto), ErrorCode::kInvalidArgument);
  // Utilities.
  EXPECT_EQ(error_of([&] { store_f32(st.dq, q_host, s.get()); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(error_of([&] { add_f32(acc, k, s.get()); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(error_of([&] { sink_logits_backward(st, nullptr, st.dq, s.get()); }),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(error_of([&] { backward_begin(q_host, q, st, s.get()); }), ErrorCode::kInvalidArgument);
  s.synchronize();  // nothing was queued
}

}  // namespace
}  // namespace ringattn::cuda
