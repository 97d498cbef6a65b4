// Argument validation (check_attention_args, validate_spec, parse_layout) and the Error type
// (codes, names, ScopedRank prefixes).

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "ringattn/attention.h"
#include "ringattn/error.h"
#include "ringattn/tensor.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// Runs f, which must throw ringattn::Error with `code` and a message containing each of
// `parts`.
void expect_error(const std::function<void()>& f, ErrorCode code,
                  const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown; expected one mentioning '" << parts.front() << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const std::string& p : parts) EXPECT_THAT(e.what(), HasSubstr(p));
  }
}

// Backing storage large enough for every view below.
struct Buffers {
  std::vector<float> data = std::vector<float>(1 << 12, 0.0f);
  float* ptr() { return data.data(); }
};

// A valid GQA problem: q [2, 8, 4, 16], k, v [2, 8, 2, 16], o like q, lse [2, 4, 8], z [4].
struct Args {
  Buffers buf;
  AttentionSpec spec;
  TensorView q{buf.ptr(), DType::kF32, {2, 8, 4, 16}};
  TensorView k{buf.ptr(), DType::kF32, {2, 8, 2, 16}};
  TensorView v{buf.ptr(), DType::kF32, {2, 8, 2, 16}};
  TensorView o{buf.ptr(), DType::kF32, {2, 8, 4, 16}};
  TensorView lse{buf.ptr(), DType::kF32, {2, 4, 8}};
  TensorView z{buf.ptr(), DType::kF32, {4}};
  AttentionShape check() { return check_attention_args(spec, q, k, v, &o, &lse, &z); }
};

TEST(CheckAttentionArgs, AcceptsValidGqaAndReturnsShape) {
  Args a;
  const AttentionShape s = a.check();
  EXPECT_EQ(s.batch, 2);
  EXPECT_EQ(s.q_len, 8);
  EXPECT_EQ(s.kv_len, 8);
  EXPECT_EQ(s.heads, 4);
  EXPECT_EQ(s.kv_heads, 2);
  EXPECT_EQ(s.head_dim, 16);
  EXPECT_EQ(s.group(), 2);
  // Optional tensors may be omitted; q and k may have different lengths (a shard of keys).
  a.k = TensorView(a.buf.ptr(), DType::kF32, {2, 3, 1, 16});
  a.v = TensorView(a.buf.ptr(), DType::kF32, {2, 3, 1, 16});
  const AttentionShape m = check_attention_args(a.spec, a.q, a.k, a.v, nullptr, nullptr, nullptr);
  EXPECT_EQ(m.kv_len, 3);
  EXPECT_EQ(m.group(), 4);
}

TEST(CheckAttentionArgs, RejectsBatchMismatch) {
  Args a;
  a.k = TensorView(a.buf.ptr(), DType::kF32, {3, 8, 2, 16});
  a.v = a.k;
  expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"k", "B=2", "[3, 8, 2, 16]"});
}

TEST(CheckAttentionArgs, RejectsHeadDimMismatch) {
  Args a;
  a.k = TensorView(a.buf.ptr(), DType::kF32, {2, 8, 2, 8});
  a.v = a.k;
  expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"D=16", "[2, 8, 2, 8]"});
}

TEST(CheckAttentionArgs, RejectsHeadsNotMultipleOfKvHeads) {
  Args a;
  a.k = TensorView(a.buf.ptr(), DType::kF32, {2, 8, 3, 16});
  a.v = a.k;
  expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"H % H_kv", "H=4", "H_kv=3"});
  a.k = TensorView(a.buf.ptr(), DType::kF32, {2, 8, 0, 16});
  a.v = a.k;
  expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"H_kv=0"});
  a.k = TensorView(a.buf.ptr(), DType::kF32, {2, 8, 8, 16});  // more kv heads than heads
  a.v = a.k;
  expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"H % H_kv"});
}

TEST(CheckAttentionArgs, RejectsVShapeDifferentFromK) {
  for (auto shape : {std::vector<int64_t>{2, 7, 2, 16}, std::vector<int64_t>{2, 8, 1, 16},
                     std::vector<int64_t>{2, 8, 2, 15}, std::vector<int64_t>{1, 8, 2, 16}}) {
    Args a;
    a.v = TensorView(a.buf.ptr(), DType::kF32, {shape[0], shape[1], shape[2], shape[3]});
    expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"v", a.v.describe()});
  }
}

TEST(CheckAttentionArgs, RejectsWrongRank) {
  Args a;
  a.q = TensorView(a.buf.ptr(), DType::kF32, {8, 4, 16});
  expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"q", "[8, 4, 16]"});
}

TEST(CheckAttentionArgs, RejectsZeroHeadsOrHeadDim) {
  Args a;
  a.q = TensorView(a.buf.ptr(), DType::kF32, {2, 8, 0, 16});
  expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"H > 0"});
}

TEST(CheckAttentionArgs, RejectsDtypeMismatch) {
  Args a;
  a.k = TensorView(a.buf.ptr(), DType::kBF16, {2, 8, 2, 16});
  expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"dtype", "bf16"});
  Args b;
  b.v = TensorView(b.buf.ptr(), DType::kF16, {2, 8, 2, 16});
  expect_error([&] { b.check(); }, ErrorCode::kInvalidArgument, {"dtype", "f16"});
}

TEST(CheckAttentionArgs, AcceptsHalfPrecisionWithF32LseAndSink) {
  Args a;
  a.q = TensorView(a.buf.ptr(), DType::kBF16, {2, 8, 4, 16});
  a.k = TensorView(a.buf.ptr(), DType::kBF16, {2, 8, 2, 16});
  a.v = a.k;
  a.o = a.q;
  EXPECT_NO_THROW(a.check());
}

TEST(CheckAttentionArgs, RejectsUnsupportedDtypeCode) {
  const DType bad = static_cast<DType>(7);
  for (int which = 0; which < 3; ++which) {
    Args a;
    TensorView t(a.buf.ptr(), bad, {2, 8, which == 0 ? 4 : 2, 16});
    (which == 0 ? a.q : which == 1 ? a.k : a.v) = t;
    expect_error([&] { a.check(); }, ErrorCode::kUnsupported, {"unsupported dtype", "7"});
  }
  Args o;
  o.o = TensorView(o.buf.ptr(), bad, {2, 8, 4, 16});
  expect_error([&] { o.check(); }, ErrorCode::kUnsupported, {"o", "7"});
}

TEST(CheckAttentionArgs, RejectsWrongOutputShape) {
  Args a;
  a.o = TensorView(a.buf.ptr(), DType::kF32, {2, 8, 2, 16});
  expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"o", "[2, 8, 2, 16]"});
}

TEST(CheckAttentionArgs, RejectsWrongLseShapeOrDtype) {
  {
    Args a;
    a.lse = TensorView(a.buf.ptr(), DType::kF32, {2, 8, 4});  // [B, N, H]: transposed
    expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument,
                 {"lse", "[2, 4, 8]", "[2, 8, 4]"});
  }
  {
    Args a;
    a.lse = TensorView(a.buf.ptr(), DType::kF32, {2, 4, 8, 1});
    expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"lse", "[B, H, N]"});
  }
  {
    Args a;
    a.lse = TensorView(a.buf.ptr(), DType::kBF16, {2, 4, 8});
    expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"lse must be f32", "bf16"});
  }
  {
    Args a;  // right shape, not contiguous
    const int64_t shape[3] = {2, 4, 8};
    const int64_t strides[3] = {64, 16, 1};
    a.lse = TensorView(a.buf.ptr(), DType::kF32, 3, shape, strides);
    expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"lse", "contiguous"});
  }
}

TEST(CheckAttentionArgs, RejectsWrongSinkLogits) {
  {
    Args a;
    a.z = TensorView(a.buf.ptr(), DType::kF32, {2});
    expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument,
                 {"sink_logits", "H=4", "[2] f32"});
  }
  {
    Args a;
    a.z = TensorView(a.buf.ptr(), DType::kF32, {1, 4});
    expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"sink_logits", "[1, 4]"});
  }
  {
    Args a;
    a.z = TensorView(a.buf.ptr(), DType::kBF16, {4});
    expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"sink_logits", "[4] bf16"});
  }
}

TEST(CheckAttentionArgs, RejectsNonContiguousHeadDim) {
  Args a;
  const int64_t shape[4] = {2, 8, 4, 16};
  const int64_t strides[4] = {1024, 128, 32, 2};
  a.q = TensorView(a.buf.ptr(), DType::kF32, 4, shape, strides);
  expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"head dimension", "contiguous"});
}

TEST(CheckAttentionArgs, SpecIsValidatedToo) {
  Args a;
  a.spec.window = -1;
  expect_error([&] { a.check(); }, ErrorCode::kInvalidArgument, {"window", "-1"});
}

// ---------------------------------------------------------------------------------------------

TEST(ValidateSpec, AcceptsDefaultsAndTypicalValues) {
  EXPECT_NO_THROW(validate_spec(AttentionSpec{}));
  AttentionSpec s;
  s.causal = true;
  s.window = 4096;
  s.sinks = 4;
  s.scale = 0.125f;
  s.layout = Layout::kZigzag;
  EXPECT_NO_THROW(validate_spec(s));
}

TEST(ValidateSpec, RejectsNegativeWindow) {
  AttentionSpec s;
  s.window = -5;
  expect_error([&] { validate_spec(s); }, ErrorCode::kInvalidArgument, {"window", "-5"});
}

TEST(ValidateSpec, RejectsNegativeSinks) {
  AttentionSpec s;
  s.sinks = -2;
  expect_error([&] { validate_spec(s); }, ErrorCode::kInvalidArgument, {"sinks", "-2"});
}

TEST(ValidateSpec, RejectsNanInfOrNegativeScale) {
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), -0.5f, std::numeric_limits<float>::infinity(),
        -std::numeric_limits<float>::infinity()}) {
    AttentionSpec s;
    s.scale = bad;
    expect_error([&] { validate_spec(s); }, ErrorCode::kInvalidArgument, {"scale"});
  }
}

TEST(ValidateSpec, RejectsUnknownLayoutCode) {
  AttentionSpec s;
  s.layout = static_cast<Layout>(9);
  expect_error([&] { validate_spec(s); }, ErrorCode::kInvalidArgument, {"layout", "9"});
}

TEST(EffectiveScale, DefaultIsInverseSqrtHeadDim) {
  AttentionSpec s;
  EXPECT_FLOAT_EQ(effective_scale(s, 64), 0.125f);
  EXPECT_FLOAT_EQ(effective_scale(s, 2), static_cast<float>(1.0 / std::sqrt(2.0)));
  s.scale = 0.3f;
  EXPECT_EQ(effective_scale(s, 64), 0.3f);
}

TEST(ParseLayout, NamesRoundTripAndBadNamesAreRejected) {
  for (Layout l : {Layout::kAuto, Layout::kContiguous, Layout::kZigzag}) {
    EXPECT_EQ(parse_layout(layout_name(l)), l);
  }
  expect_error([] { parse_layout("ring"); }, ErrorCode::kInvalidArgument, {"'ring'", "zigzag"});
  expect_error([] { parse_layout(""); }, ErrorCode::kInvalidArgument, {"''"});
}

TEST(Visible, SpecTableOfCases) {
  // (causal, W, S, i, j) -> visible
  EXPECT_TRUE(visible(false, 0, 0, 0, 9));
  EXPECT_FALSE(visible(true, 0, 0, 0, 1));
  EXPECT_TRUE(visible(true, 0, 0, 5, 5));
  EXPECT_TRUE(visible(true, 3, 0, 5, 3));   // i - j = 2 < 3
  EXPECT_FALSE(visible(true, 3, 0, 5, 2));  // i - j = 3
  EXPECT_TRUE(visible(false, 3, 0, 2, 4));
  EXPECT_FALSE(visible(false, 3, 0, 2, 5));  // |i - j| = 3
  EXPECT_TRUE(visible(true, 3, 2, 100, 1));  // sink
  EXPECT_FALSE(visible(true, 3, 2, 100, 2));
  EXPECT_FALSE(visible(true, 3, 4, 1, 3));  // sink in the future
  EXPECT_TRUE(visible(false, 1, 4, 0, 3));  // non-causal sink ahead
}

// ---------------------------------------------------------------------------------------------

TEST(Error, CodeNames) {
  EXPECT_STREQ(error_code_name(ErrorCode::kInvalidArgument), "invalid argument");
  EXPECT_STREQ(error_code_name(ErrorCode::kUnsupported), "unsupported");
  EXPECT_STREQ(error_code_name(ErrorCode::kCuda), "cuda");
  EXPECT_STREQ(error_code_name(ErrorCode::kNccl), "nccl");
  EXPECT_STREQ(error_code_name(ErrorCode::kMpi), "mpi");
  EXPECT_STREQ(error_code_name(ErrorCode::kIo), "io");
  EXPECT_STREQ(error_code_name(ErrorCode::kInternal), "internal");
  EXPECT_STREQ(error_code_name(static_cast<ErrorCode>(42)), "unknown");
  // The C ABI relies on these numeric values.
  EXPECT_EQ(static_cast<int>(ErrorCode::kInvalidArgument), 1);
  EXPECT_EQ(static_cast<int>(ErrorCode::kInternal), 7);
}

TEST(Error, CheckMacroThrowsWithStreamedMessage) {
  const int got = 3;
  try {
    RINGATTN_CHECK(got == 4, "expected 4, got ", got);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_EQ(e.message(), "expected 4, got 3");
  }
  EXPECT_NO_THROW(RINGATTN_CHECK(got == 3, "unused"));
  try {
    RINGATTN_CHECK_CODE(ErrorCode::kMpi, false, "mpi ", 1.5);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kMpi);
    EXPECT_EQ(e.message(), "mpi 1.5");
  }
}

TEST(Error, NoRankNoPrefix) {
  EXPECT_EQ(current_rank(), -1);
  const Error e(ErrorCode::kIo, "disk full");
  EXPECT_STREQ(e.what(), "disk full");
}

TEST(Error, ScopedRankPrefixesNestsAndRestores) {
  {
    ScopedRank r3(3);
    EXPECT_EQ(current_rank(), 3);
    expect_error([] { RINGATTN_CHECK(false, "boom"); }, ErrorCode::kInvalidArgument, {"boom"});
    try {
      RINGATTN_THROW(ErrorCode::kInternal, "boom ", 7);
    } catch (const Error& e) {
      EXPECT_STREQ(e.what(), "[rank 3] boom 7");
      EXPECT_EQ(e.message(), "boom 7");  // message() has no prefix
    }
    {
      ScopedRank r12(12);
      EXPECT_EQ(current_rank(), 12);
      EXPECT_THAT(Error(ErrorCode::kMpi, "x").what(), StartsWith("[rank 12] "));
    }
    EXPECT_EQ(current_rank(), 3);
    EXPECT_THAT(Error(ErrorCode::kMpi, "x").what(), StartsWith("[rank 3] x"));
    {
      ScopedRank r0(0);
      EXPECT_STREQ(Error(ErrorCode::kMpi, "y").what(), "[rank 0] y");
    }
  }
  EXPECT_EQ(current_rank(), -1);
  EXPECT_STREQ(Error(ErrorCode::kMpi, "z").what(), "z");
}

TEST(Error, RankIsPerThread) {
  ScopedRank main_rank(1);
  std::string other;
  int other_rank = 0;
  std::thread t([&] {
    other_rank = current_rank();  // a new thread has no rank
    ScopedRank r(5);
    other = Error(ErrorCode::kInternal, "t").what();
  });
  t.join();
  EXPECT_EQ(other_rank, -1);
  EXPECT_EQ(other, "[rank 5] t");
  EXPECT_EQ(current_rank(), 1);
  EXPECT_STREQ(Error(ErrorCode::kInternal, "m").what(), "[rank 1] m");
}

TEST(Error, ValidationErrorsCarryTheRankPrefix) {
  ScopedRank r(3);
  Args a;
  a.k = TensorView(a.buf.ptr(), DType::kF32, {2, 8, 3, 16});
  a.v = a.k;
  try {
    a.check();
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), StartsWith("[rank 3] "));
    EXPECT_THAT(e.what(), HasSubstr("H % H_kv"));
  }
}

}  // namespace
}  // namespace ringattn
