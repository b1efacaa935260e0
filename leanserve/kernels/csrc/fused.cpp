// Fused float32 operators for the small steps of a decoder layer: RMSNorm, rotary embedding and the
// gated activation of the MLP. At batch 1 each is a chain of 5-15 aten ops whose dispatch (a few us
// each) costs more than the arithmetic; here each is one call. The math follows the PyTorch code in
// leanserve/model/layers.py operation by operation, with the same roundings, so the results agree
// to float32 rounding: rotary_ and silu bit for bit, rms_norm within a few ulp (the sum of squares
// is added in another order), gelu within a few ulp (computed as x * sigmoid(2u), see act8).
//
//   rms_norm(x (..., D), weight (D), eps, offset) -> (x * rsqrt(mean(x^2) + eps)) * (offset + weight)
//   rotary_(q (T, H, D), k (T, Hkv, D), cos (P, D/2), sin (P, D/2), positions (T) int64): in place,
//           "rotate half": halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) at row positions[t]
//   act_mul(gate_up (..., 2I), act) -> act(gate) * up with gate, up the two halves; act 0 = silu,
//           1 = gelu with the tanh approximation

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>

// Every multiply-add in this file that rounds once is an explicit _mm256_fmadd_ps; keep the compiler
// from fusing the others (GCC does by default), which would change roundings against PyTorch's.
#pragma GCC optimize("fp-contract=off")

namespace {

// Rows per parallel task so that a task has ~32K floats: batch-1 calls stay on the calling thread.
inline int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 2^q for integer q in [-126, 127]: the biased exponent shifted into place
inline __m256 pow2i(__m256i q) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(127)), 23));
}

// exp of 8 floats, step by step SLEEF's expf_u10 (FMA build), which is what torch's Vectorized<float>
// ::exp calls, so silu matches F.silu bit for bit.
inline __m256 exp8(__m256 d) {
  const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d, _mm256_set1_ps(1.442695040888963407359924681001892137f)));
  const __m256 qf = _mm256_cvtepi32_ps(q);
  __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-0.693145751953125f), d);  // d - q ln2 in two parts
  s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-1.428606765330187045e-06f), s);
  __m256 u = _mm256_set1_ps(0.000198527617612853646278381f);
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00139304355252534151077271f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00833336077630519866943359f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.0416664853692054748535156f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.166666671633720397949219f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
  u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
  const __m256i h = _mm256_srai_epi32(q, 1);  // 2^q in two factors: q reaches +-150
  u = _mm256_mul_ps(_mm256_mul_ps(u, pow2i(h)), pow2i(_mm256_sub_epi32(q, h)));
  u = _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_LT_OQ), u);
  return _mm256_blendv_ps(u, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(_mm256_set1_ps(100.0f), d, _CMP_LT_OQ));
}

constexpr float kGeluBeta = 0.7978845608028654f;  // sqrt(2 / pi), as torch's float kGeluBeta
constexpr float kGeluKappa = 0.044715f;

// act(g) for 8 floats. silu: g / (1 + exp(-g)), torch's formula. gelu: 0.5 g (1 + tanh(u)) equals
// g / (1 + exp(-2u)) exactly; this form needs no vector tanh and does not cancel for g < 0.
template <int ACT>
inline __m256 act8(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  if constexpr (ACT == 0) return _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f)))));
  const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
  const __m256 inner = _mm256_add_ps(g, _mm256_mul_ps(_mm256_set1_ps(kGeluKappa), cube));
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(kGeluBeta), inner);
  return _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u))));
}

template <int ACT>
inline float act1(float g) {  // the tail, as torch's scalar loop computes it
  if constexpr (ACT == 0) return g / (1.0f + std::exp(-g));
  const float u = kGeluBeta * (g + kGeluKappa * (g * g * g));
  return 0.5f * g * (1.0f + std::tanh(u));
}

template <int ACT>
void act_mul_rows(const float* x, int64_t ldx, float* y, int64_t I, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* g = x + r * ldx;
    const float* up = g + I;
    float* yr = y + r * I;
    int64_t j = 0;
    for (; j + 16 <= I; j += 16)  // torch's loop: pairs of vectors, then scalars for the rest
      for (int64_t v = j; v < j + 16; v += 8)
        _mm256_storeu_ps(yr + v, _mm256_mul_ps(act8<ACT>(_mm256_loadu_ps(g + v)), _mm256_loadu_ps(up + v)));
    for (; j < I; ++j) yr[j] = act1<ACT>(g[j]) * up[j];
  }
}

at::Tensor act_mul(const at::Tensor& gate_up, int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "act_mul: act must be 0 (silu) or 1 (gelu tanh), got ", act);
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.device().is_cpu() && gate_up.dim() >= 1,
              "act_mul: gate_up must be a float32 CPU tensor");
  const int64_t I2 = gate_up.size(-1), I = I2 / 2;
  TORCH_CHECK(I2 % 2 == 0, "act_mul: the last dimension (gate | up) must be even, got ", I2);
  at::Tensor x = gate_up.reshape({-1, I2});  // a view for the (T, 2I) output of a linear layer
  if (x.stride(1) != 1) x = x.contiguous();
  std::vector<int64_t> sizes(gate_up.sizes().begin(), gate_up.sizes().end());
  sizes.back() = I;
  at::Tensor y = at::empty(sizes, gate_up.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, x.size(0), grain_rows(I2), [&](int64_t r0, int64_t r1) {
    if (act == 0) act_mul_rows<0>(xp, ldx, yp, I, r0, r1);
    else act_mul_rows<1>(xp, ldx, yp, I, r0, r1);
  });
  return y;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1,
              "rms_norm: x must be a float32 CPU tensor");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.device().is_cpu() && weight.dim() == 1 &&
                  weight.size(0) == D,
              "rms_norm: weight must be float32 of shape (", D, "), got ", weight.sizes());
  // Rows as (A, B, D) with strides (sa, sb, 1), so per-head views (T, H, D) of the fused qkv output
  // need no copy.
  at::Tensor x3 = x.dim() == 3 ? x : x.dim() == 2 ? x.unsqueeze(0) : x.reshape({1, -1, D});
  if (x3.stride(2) != 1) x3 = x3.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const float* xp = x3.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t B = x3.size(1), sa = x3.stride(0), sb = x3.stride(1);
  const float epsf = static_cast<float>(eps), n = static_cast<float>(D), off = static_cast<float>(offset);
  const bool has_off = offset != 0.0;  // Llama multiplies by the weight itself, Gemma by offset + weight
  at::parallel_for(0, x3.size(0) * B, grain_rows(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + (r / B) * sa + (r % B) * sb;
      float* yr = yp + r * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();  // two chains hide the FMA latency
      int64_t j = 0;
      for (; j + 16 <= D; j += 16) {
        const __m256 v0 = _mm256_loadu_ps(xr + j), v1 = _mm256_loadu_ps(xr + j + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
      }
      for (; j + 8 <= D; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + j), _mm256_loadu_ps(xr + j), a0);
      float ss = hsum(_mm256_add_ps(a0, a1));
      for (; j < D; ++j) ss += xr[j] * xr[j];
      const float inv = 1.0f / std::sqrt(ss / n + epsf);  // torch: sum / D, + eps, rsqrt = 1 / sqrt
      const __m256 iv = _mm256_set1_ps(inv), ov = _mm256_set1_ps(off);
      for (j = 0; j + 8 <= D; j += 8) {
        const __m256 wv = has_off ? _mm256_add_ps(ov, _mm256_loadu_ps(wp + j)) : _mm256_loadu_ps(wp + j);
        _mm256_storeu_ps(yr + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + j), iv), wv));
      }
      for (; j < D; ++j) yr[j] = (xr[j] * inv) * (has_off ? off + wp[j] : wp[j]);
    }
  });
  return y;
}

// One head in place: x = [x1 | x2], each half h floats, against the cos/sin rows of its position.
inline void rotate_head(float* x, const float* c, const float* s, int64_t h) {
  int64_t j = 0;
  for (; j + 8 <= h; j += 8) {
    const __m256 x1 = _mm256_loadu_ps(x + j), x2 = _mm256_loadu_ps(x + h + j);
    const __m256 cv = _mm256_loadu_ps(c + j), sv = _mm256_loadu_ps(s + j);
    _mm256_storeu_ps(x + j, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)));
    _mm256_storeu_ps(x + h + j, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)));
  }
  for (; j < h; ++j) {
    const float x1 = x[j], x2 = x[h + j];
    x[j] = x1 * c[j] - x2 * s[j];
    x[h + j] = x2 * c[j] + x1 * s[j];
  }
}

void rotary_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
             const at::Tensor& positions) {
  for (const at::Tensor* t : {&q, &k})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->dim() == 3 && t->stride(2) == 1,
                "rotary_: q and k must be float32 CPU tensors (tokens, heads, head_dim) with a contiguous last "
                "dimension");
  const int64_t T = q.size(0), D = q.size(2), half = D / 2;
  TORCH_CHECK(k.size(0) == T && k.size(2) == D && D % 2 == 0,
              "rotary_: q ", q.sizes(), " and k ", k.sizes(), " need the same tokens and the same even head_dim");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == half,
              "rotary_: cos and sin must be contiguous float32 of shape (max_positions, ", half, ")");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == T,
              "rotary_: positions must be int64 of shape (", T, ")");
  const at::Tensor pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t P = cos.size(0);
  for (int64_t t = 0; t < T; ++t)  // check before writing anything
    TORCH_CHECK(pp[t] >= 0 && pp[t] < P, "rotary_: position ", pp[t], " out of range [0, ", P, ")");
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t H = q.size(1), Hk = k.size(1);
  at::parallel_for(0, T, grain_rows((H + Hk) * D), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cp + pp[t] * half;
      const float* s = sp + pp[t] * half;
      for (int64_t i = 0; i < H; ++i) rotate_head(qp + t * q.stride(0) + i * q.stride(1), c, s, half);
      for (int64_t i = 0; i < Hk; ++i) rotate_head(kp + t * k.stride(0) + i * k.stride(1), c, s, half);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor positions) -> ()");
  m.def("act_mul(Tensor gate_up, int act) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("act_mul", &act_mul);
}
