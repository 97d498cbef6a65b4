#include <cmath>

#include "ringattn/attention.h"

namespace ringattn {

const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::kAuto:
      return "auto";
    case Layout::kContiguous:
      return "contiguous";
    case Layout::kZigzag:
      return "zigzag";
  }
  return "unknown";
}

Layout parse_layout(const std::string& name) {
  if (name == "auto") return Layout::kAuto;
  if (name == "contiguous") return Layout::kContiguous;
  if (name == "zigzag") return Layout::kZigzag;
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "unknown layout '", name,
                 "': expected auto, contiguous or zigzag");
}

float effective_scale(const AttentionSpec& spec, int64_t head_dim) {
  if (spec.scale != 0.0f) return spec.scale;
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
}

void validate_spec(const AttentionSpec& spec) {
  RINGATTN_CHECK(spec.window >= 0, "window must be >= 0 (0 = unlimited), got ", spec.window);
  RINGATTN_CHECK(spec.sinks >= 0, "sinks must be >= 0, got ", spec.sinks);
  RINGATTN_CHECK(std::isfinite(spec.scale) && spec.scale >= 0.0f,
                 "scale must be finite and > 0 (0 = 1/sqrt(head_dim)), got ", spec.scale);
  RINGATTN_CHECK(spec.layout == Layout::kAuto || spec.layout == Layout::kContiguous ||
                     spec.layout == Layout::kZigzag,
                 "unknown layout code ", static_cast<int>(spec.layout));
}

namespace {
void check_dtype_known(const TensorView& t, const char* name) {
  RINGATTN_CHECK_CODE(
      ErrorCode::kUnsupported,
      t.dtype() == DType::kF32 || t.dtype() == DType::kBF16 || t.dtype() == DType::kF16, name,
      " has unsupported dtype code ", static_cast<int>(t.dtype()), ": expected f32, bf16 or f16");
}
void check_rank(const TensorView& t, const char* name, int ndim, const char* dims) {
  RINGATTN_CHECK(t.ndim() == ndim, name, " must have shape ", dims, ", got ", t.describe());
  RINGATTN_CHECK(t.data() != nullptr || t.numel() == 0, name, " has no data");
}
}  // namespace

AttentionShape check_attention_args(const AttentionSpec& spec, const TensorView& q,
                                    const TensorView& k, const TensorView& v, const TensorView* o,
                                    const TensorView* lse, const TensorView* sink_logits) {
  validate_spec(spec);
  check_rank(q, "q", 4, "[B, N, H, D]");
  check_rank(k, "k", 4, "[B, N, H_kv, D]");
  check_rank(v, "v", 4, "[B, N, H_kv, D]");
  check_dtype_known(q, "q");
  check_dtype_known(k, "k");
  check_dtype_known(v, "v");
  AttentionShape s;
  s.batch = q.size(0);
  s.q_len = q.size(1);
  s.heads = q.size(2);
  s.head_dim = q.size(3);
  s.kv_len = k.size(1);
  s.kv_heads = k.size(2);
  RINGATTN_CHECK(s.heads > 0 && s.head_dim > 0, "q must have H > 0 and D > 0, got ", q.describe());
  RINGATTN_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype(),
                 "q, k and v must share a dtype, got q ", dtype_name(q.dtype()), ", k ",
                 dtype_name(k.dtype()), ", v ", dtype_name(v.dtype()));
  RINGATTN_CHECK(k.size(0) == s.batch && k.size(3) == s.head_dim,
                 "k must be [B, N, H_kv, D] with B=", s.batch, " and D=", s.head_dim, " as q, got ",
                 k.describe());
  RINGATTN_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0,
                 "heads must be a multiple of kv_heads (H % H_kv == 0), got H=", s.heads,
                 " H_kv=", s.kv_heads);
  RINGATTN_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2) &&
                     v.size(3) == k.size(3),
                 "v must have the shape of k ", k.describe(), ", got ", v.describe());
  for (const TensorView* t : {&q, &k, &v}) {
    RINGATTN_CHECK(t->stride(3) == 1, "the head dimension of q, k and v must be contiguous");
  }
  RINGATTN_CHECK(q.device() == k.device() && q.device() == v.device(),
                 "q, k and v must be on one device");
  if (o != nullptr) {
    check_rank(*o, "o", 4, "[B, N, H, D]");
    check_dtype_known(*o, "o");
    RINGATTN_CHECK(o->size(0) == s.batch && o->size(1) == s.q_len && o->size(2) == s.heads &&
                       o->size(3) == s.head_dim && o->stride(3) == 1,
                   "o must have the shape of q ", q.describe(), ", got ", o->describe());
    RINGATTN_CHECK(o->device() == q.device(), "o must be on the device of q (",
                   device_name(q.device()), "), got ", device_name(o->device()));
  }
  if (lse != nullptr && lse->data() != nullptr) {
    check_rank(*lse, "lse", 3, "[B, H, N]");
    RINGATTN_CHECK(lse->dtype() == DType::kF32, "lse must be f32, got ", dtype_name(lse->dtype()));
    RINGATTN_CHECK(lse->size(0) == s.batch && lse->size(1) == s.heads && lse->size(2) == s.q_len,
                   "lse must be [B, H, N] = [", s.batch, ", ", s.heads, ", ", s.q_len, "], got ",
                   lse->describe());
    RINGATTN_CHECK(lse->is_contiguous(), "lse must be contiguous");
    RINGATTN_CHECK(lse->device() == q.device(), "lse must be on the device of q (",
                   device_name(q.device()), "), got ", device_name(lse->device()));
  }
  if (sink_logits != nullptr && sink_logits->data() != nullptr) {
    RINGATTN_CHECK(sink_logits->ndim() == 1 && sink_logits->size(0) == s.heads &&
                       sink_logits->dtype() == DType::kF32 && sink_logits->is_contiguous(),
                   "sink_logits must be [H] f32 with H=", s.heads, ", got ",
                   sink_logits->describe());
    RINGATTN_CHECK(sink_logits->device() == q.device(), "sink_logits must be on the device of q (",
                   device_name(q.device()), "), got ", device_name(sink_logits->device()));
  }
  return s;
}

}  // namespace ringattn
