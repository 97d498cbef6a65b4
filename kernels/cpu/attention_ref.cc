// The oracle. Deliberately the most direct transcription of SPEC section 2 that we could write:
// for every (b, h, i) build the full row of logits, mask it from global positions, softmax in
// f64 with the learned sink term in the denominator, and contract with v.

#include "kernels/cpu/attention_ref.h"

#include <cmath>
#include <limits>

namespace ringattn::ref {
namespace {

double at(const TensorView& t, int64_t b, int64_t n, int64_t h, int64_t c) {
  const int64_t off = b * t.stride(0) + n * t.stride(1) + h * t.stride(2) + c * t.stride(3);
  return static_cast<double>(load_as_float(t.data(), t.dtype(), off));
}

struct Problem {
  AttentionShape s;
  double scale;
  bool has_sink;
  std::vector<double> z;
};

Problem setup(const AttentionSpec& spec, const TensorView& q, const TensorView& k,
              const TensorView& v, const TensorView* sink_logits) {
  Problem p;
  p.s = check_attention_args(spec, q, k, v, nullptr, nullptr, sink_logits);
  p.scale = static_cast<double>(effective_scale(spec, p.s.head_dim));
  p.has_sink = sink_logits != nullptr && sink_logits->data() != nullptr;
  if (p.has_sink) {
    for (int64_t h = 0; h < p.s.heads; ++h) p.z.push_back(sink_logits->data_as<const float>()[h]);
  }
  return p;
}

// Probabilities of one query row over all keys (0 where masked) and its lse.
double row_probs(const AttentionSpec& spec, const Problem& p, const TensorView& q,
                 const int64_t* q_pos, const TensorView& k, const int64_t* k_pos, int64_t b,
                 int64_t h, int64_t i, std::vector<double>& prob) {
  const double ninf = -std::numeric_limits<double>::infinity();
  const int64_t hk = h / p.s.group();
  prob.assign(static_cast<size_t>(p.s.kv_len), ninf);
  double mx = p.has_sink ? p.z[h] : ninf;
  for (int64_t j = 0; j < p.s.kv_len; ++j) {
    if (!visible(spec, q_pos[i], k_pos[j])) continue;
    double dot = 0.0;
    for (int64_t c = 0; c < p.s.head_dim; ++c) dot += at(q, b, i, h, c) * at(k, b, j, hk, c);
    prob[j] = dot * p.scale;
    mx = std::max(mx, prob[j]);
  }
  if (mx == ninf) {
    for (double& x : prob) x = 0.0;
    return ninf;
  }
  double sum = p.has_sink ? std::exp(p.z[h] - mx) : 0.0;
  for (double& x : prob) {
    x = (x == ninf) ? 0.0 : std::exp(x - mx);
    sum += x;
  }
  for (double& x : prob) x /= sum;
  return mx + std::log(sum);
}

}  // namespace

RefOutput attention_forward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                            const TensorView& k, const TensorView& v, const int64_t* k_pos,
                            const TensorView* sink_logits) {
  const Problem p = setup(spec, q, k, v, sink_logits);
  const AttentionShape& s = p.s;
  RefOutput out;
  out.o.assign(static_cast<size_t>(s.batch * s.q_len * s.heads * s.head_dim), 0.0);
  out.lse.assign(static_cast<size_t>(s.batch * s.heads * s.q_len), 0.0);
  std::vector<double> prob;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.heads; ++h) {
      const int64_t hk = h / s.group();
      for (int64_t i = 0; i < s.q_len; ++i) {
        out.lse[(b * s.heads + h) * s.q_len + i] =
            row_probs(spec, p, q, q_pos, k, k_pos, b, h, i, prob);
        double* o = &out.o[((b * s.q_len + i) * s.heads + h) * s.head_dim];
        for (int64_t j = 0; j < s.kv_len; ++j) {
          if (prob[j] == 0.0) continue;
          for (int64_t c = 0; c < s.head_dim; ++c) o[c] += prob[j] * at(v, b, j, hk, c);
        }
      }
    }
  }
  return out;
}

RefGrads attention_backward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                            const TensorView& k, const TensorView& v, const int64_t* k_pos,
                            const TensorView* sink_logits, const TensorView& dout) {
  const Problem p = setup(spec, q, k, v, sink_logits);
  const AttentionShape& s = p.s;
  RINGATTN_CHECK(dout.ndim() == 4 && dout.size(0) == s.batch && dout.size(1) == s.q_len &&
                     dout.size(2) == s.heads && dout.size(3) == s.head_dim,
                 "dout must have the shape of q ", q.describe(), ", got ", dout.describe());
  const RefOutput fwd = attention_forward(spec, q, q_pos, k, v, k_pos, sink_logits);
  RefGrads g;
  g.dq.assign(static_cast<size_t>(s.batch * s.q_len * s.heads * s.head_dim), 0.0);
  g.dk.assign(static_cast<size_t>(s.batch * s.kv_len * s.kv_heads * s.head_dim), 0.0);
  g.dv.assign(g.dk.size(), 0.0);
  g.dsink.assign(static_cast<size_t>(s.heads), 0.0);
  std::vector<double> prob;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.heads; ++h) {
      const int64_t hk = h / s.group();
      for (int64_t i = 0; i < s.q_len; ++i) {
        const double lse = row_probs(spec, p, q, q_pos, k, k_pos, b, h, i, prob);
        const double* o = &fwd.o[((b * s.q_len + i) * s.heads + h) * s.head_dim];
        // Delta_i = rowsum(do_i * o_i); dS_ij = P_ij (dO_i . v_j - Delta_i).
        double delta = 0.0;
        for (int64_t c = 0; c < s.head_dim; ++c) delta += at(dout, b, i, h, c) * o[c];
        // With a learned sink, lse >= z is finite: dz = -sum_i exp(z - lse_i) * Delta_i.
        if (p.has_sink) g.dsink[h] -= std::exp(p.z[h] - lse) * delta;
        for (int64_t j = 0; j < s.kv_len; ++j) {
          if (prob[j] == 0.0) continue;
          double dpv = 0.0;
          for (int64_t c = 0; c < s.head_dim; ++c) dpv += at(dout, b, i, h, c) * at(v, b, j, hk, c);
          const double ds = prob[j] * (dpv - delta) * p.scale;
          double* dq = &g.dq[((b * s.q_len + i) * s.heads + h) * s.head_dim];
          double* dk = &g.dk[((b * s.kv_len + j) * s.kv_heads + hk) * s.head_dim];
          double* dv = &g.dv[((b * s.kv_len + j) * s.kv_heads + hk) * s.head_dim];
          for (int64_t c = 0; c < s.head_dim; ++c) {
            dq[c] += ds * at(k, b, j, hk, c);
            dk[c] += ds * at(q, b, i, h, c);
            dv[c] += prob[j] * at(dout, b, i, h, c);
          }
        }
      }
    }
  }
  return g;
}

}  // namespace ringattn::ref
