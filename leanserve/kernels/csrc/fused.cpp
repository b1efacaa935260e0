// Fused operators for the small steps of a decoder layer: RMSNorm, rotary embedding and the gated
// activation of the MLP, on float32 or bfloat16 tensors. At batch 1 each is a chain of 5-15 aten ops
// whose dispatch (a few us each) costs more than the arithmetic; here each is one call. The math
// follows the PyTorch code in leanserve/model/layers.py operation by operation, with the same
// roundings: bfloat16 is widened to float32, computed as torch computes it and rounded to bfloat16
// (nearest even) wherever torch rounds. So the results agree to the last bit, except: rms_norm adds
// the sum of squares in another order (float32: a few ulp; bfloat16: ~2e-5 of the elements 1 ulp off,
// 2 with Llama's two roundings), and gelu is computed as x * sigmoid(2u), see act8, which does not
// cancel for x < -3 as torch's 0.5 x (1 + tanh(u)) does (float32: a few ulp; bfloat16: bit for bit for
// x > -2.9, within 1.6e-5 below).
//
//   rms_norm(x (..., D), weight (D), eps, offset) -> (x * rsqrt(mean(x^2) + eps)) * (offset + weight)
//   rotary_(q (T, H, D), k (T, Hkv, D), cos (P, D/2), sin (P, D/2), positions (T) int64): in place,
//           "rotate half": halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) at row positions[t]
//   act_mul(gate_up (..., 2I), act) -> act(gate) * up with gate, up the two halves; act 0 = silu,
//           1 = gelu with the tanh approximation

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "cpu_features.h"

#include <cmath>
#include <type_traits>

// Every multiply-add in this file that rounds once is an explicit _mm256_fmadd_ps; keep the compiler
// from fusing the others (GCC does by default), which would change roundings against PyTorch's.
#pragma GCC optimize("fp-contract=off")

namespace {

using bf16 = c10::BFloat16;

// Rows per parallel task so that a task has ~32K floats: batch-1 calls stay on the calling thread.
inline int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)); }

// The element type T is float or bfloat16; bfloat16 is computed in float32. Scalars convert with
// static_cast: c10::BFloat16(float) rounds to nearest even, as torch's .to(torch.bfloat16) does.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {  // the high half of a float32: zero-extend and shift up (exact)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The nearest bfloat16 (ties to even) in the low half of each lane, as c10::BFloat16(float): add
// 0x7fff + the lowest kept bit, keep the high half; a NaN, which the add can carry into an infinity
// or zero, becomes 0x7fc0.
inline __m256i bf16_bits(__m256 v) {
  const __m256i i = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(i, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {
  const __m256i r = bf16_bits(v);  // lanes < 2^16: packus narrows them unsaturated (per 128-bit half)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

// v rounded to T and widened back: where torch rounds an intermediate result to the tensor's dtype
template <typename T>
inline __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<T, bf16>) return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16));
  else return v;
}
template <typename T>
inline float round1(float v) { return static_cast<float>(static_cast<T>(v)); }

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

// torch's elementwise loop takes two of its vectors per step and the rest of a row one by one with the
// scalar formula. bfloat16 follows its vector width (256 or 512 bits, as torch dispatches on this CPU);
// float32 keeps AVX2's 2 x 8 (under AVX512, torch's scalar path takes up to 16 more of a row: <= 1 ulp).
int64_t vector_step(bool bfloat16) {
  static const bool avx512 = at::get_cpu_capability() == "AVX512";
  return bfloat16 ? (avx512 ? 64 : 32) : 16;
}

// act(gate) * up in T: torch rounds act(gate) to T, then the product
template <typename T, int ACT>
void act_mul_rows(const T* x, int64_t ldx, T* y, int64_t I, int64_t step, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = x + r * ldx;
    const T* up = g + I;
    T* yr = y + r * I;
    int64_t j = 0;
    for (; j + step <= I; j += step)
      for (int64_t v = j; v < j + step; v += 8)
        store8(yr + v, _mm256_mul_ps(round8<T>(act8<ACT>(load8(g + v))), load8(up + v)));
    for (; j < I; ++j)
      yr[j] = static_cast<T>(round1<T>(act1<ACT>(static_cast<float>(g[j]))) * static_cast<float>(up[j]));
  }
}

// ---- act_mul with AVX-512: the same operations 16 lanes at a time (lane for lane the same results) ----
LS_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LS_AVX512 inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

LS_AVX512 inline __m512i bf16_bits16(__m512 v) {  // as bf16_bits
  const __m512i i = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(i, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
}

LS_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
LS_AVX512 inline void store16(bf16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits16(v)));
}

template <typename T>
LS_AVX512 inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, bf16>) return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(v), 16));
  else return v;
}

LS_AVX512 inline __m512 pow2i16(__m512i q) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(127)), 23));
}

LS_AVX512 inline __m512 exp16(__m512 d) {  // exp8, step by step
  const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(d, _mm512_set1_ps(1.442695040888963407359924681001892137f)));
  const __m512 qf = _mm512_cvtepi32_ps(q);
  __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-0.693145751953125f), d);
  s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-1.428606765330187045e-06f), s);
  __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
  u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
  const __m512i h = _mm512_srai_epi32(q, 1);
  u = _mm512_mul_ps(_mm512_mul_ps(u, pow2i16(h)), pow2i16(_mm512_sub_epi32(q, h)));
  u = _mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_LT_OQ), u);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), d, _CMP_LT_OQ), u, _mm512_set1_ps(INFINITY));
}

template <int ACT>
LS_AVX512 inline __m512 act16(__m512 g) {  // act8, step by step
  const __m512 one = _mm512_set1_ps(1.0f);
  if constexpr (ACT == 0)
    return _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(0x80000000))))));
  const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
  const __m512 inner = _mm512_add_ps(g, _mm512_mul_ps(_mm512_set1_ps(kGeluKappa), cube));
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(kGeluBeta), inner);
  return _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u))));
}

// act_mul_rows with 16 lanes; step % 16 == 0
template <typename T, int ACT>
LS_AVX512 void act_mul_rows16(const T* x, int64_t ldx, T* y, int64_t I, int64_t step, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = x + r * ldx;
    const T* up = g + I;
    T* yr = y + r * I;
    int64_t j = 0;
    for (; j + step <= I; j += step)
      for (int64_t v = j; v < j + step; v += 16)
        store16(yr + v, _mm512_mul_ps(round16<T>(act16<ACT>(load16(g + v))), load16(up + v)));
    for (; j < I; ++j)
      yr[j] = static_cast<T>(round1<T>(act1<ACT>(static_cast<float>(g[j]))) * static_cast<float>(up[j]));
  }
}

inline bool float_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

template <typename T>
void act_mul_impl(const at::Tensor& x, at::Tensor& y, int64_t act) {
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t ldx = x.stride(0), I = y.size(-1), step = vector_step(std::is_same_v<T, bf16>);
  const bool wide = step % 16 == 0 && leanserve_cpu::use_avx512_bf16();  // LEANSERVE_AVX512=0: AVX2
  at::parallel_for(0, x.size(0), grain_rows(2 * I), [&](int64_t r0, int64_t r1) {
    if (wide) {
      if (act == 0) act_mul_rows16<T, 0>(xp, ldx, yp, I, step, r0, r1);
      else act_mul_rows16<T, 1>(xp, ldx, yp, I, step, r0, r1);
    } else if (act == 0) {
      act_mul_rows<T, 0>(xp, ldx, yp, I, step, r0, r1);
    } else {
      act_mul_rows<T, 1>(xp, ldx, yp, I, step, r0, r1);
    }
  });
}

at::Tensor act_mul(const at::Tensor& gate_up, int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "act_mul: act must be 0 (silu) or 1 (gelu tanh), got ", act);
  TORCH_CHECK(float_or_bf16(gate_up) && gate_up.device().is_cpu() && gate_up.dim() >= 1,
              "act_mul: gate_up must be a float32 or bfloat16 CPU tensor");
  const int64_t I2 = gate_up.size(-1), I = I2 / 2;
  TORCH_CHECK(I2 % 2 == 0, "act_mul: the last dimension (gate | up) must be even, got ", I2);
  at::Tensor x = gate_up.reshape({-1, I2});  // a view for the (T, 2I) output of a linear layer
  if (x.stride(1) != 1) x = x.contiguous();
  std::vector<int64_t> sizes(gate_up.sizes().begin(), gate_up.sizes().end());
  sizes.back() = I;
  at::Tensor y = at::empty(sizes, gate_up.options());
  if (x.scalar_type() == at::kBFloat16) act_mul_impl<bf16>(x, y, act);
  else act_mul_impl<float>(x, y, act);
  return y;
}

// x3: rows as (A, B, D) with strides (sa, sb, 1); y: contiguous, x's shape
template <typename T>
void rms_norm_impl(const at::Tensor& x3, const at::Tensor& w, at::Tensor& y, float epsf, float off) {
  const T* xp = x3.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t D = x3.size(2), B = x3.size(1), sa = x3.stride(0), sb = x3.stride(1);
  const float n = static_cast<float>(D);
  // Gemma multiplies by offset + weight in float32; Llama rounds x / rms to T first, then multiplies
  // by the weight in T (a no-op rounding for float32)
  const bool has_off = off != 0.0f;
  at::parallel_for(0, x3.size(0) * B, grain_rows(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = xp + (r / B) * sa + (r % B) * sb;
      T* yr = yp + r * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();  // two chains hide the FMA latency
      int64_t j = 0;
      for (; j + 16 <= D; j += 16) {
        const __m256 v0 = load8(xr + j), v1 = load8(xr + j + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
      }
      for (; j + 8 <= D; j += 8) a0 = _mm256_fmadd_ps(load8(xr + j), load8(xr + j), a0);
      float ss = hsum(_mm256_add_ps(a0, a1));
      for (; j < D; ++j) ss += static_cast<float>(xr[j]) * static_cast<float>(xr[j]);
      const float inv = 1.0f / std::sqrt(ss / n + epsf);  // torch: sum / D, + eps, rsqrt = 1 / sqrt
      const __m256 iv = _mm256_set1_ps(inv), ov = _mm256_set1_ps(off);
      for (j = 0; j + 8 <= D; j += 8) {
        const __m256 xn = _mm256_mul_ps(load8(xr + j), iv);
        store8(yr + j, has_off ? _mm256_mul_ps(xn, _mm256_add_ps(ov, load8(wp + j)))
                               : _mm256_mul_ps(round8<T>(xn), load8(wp + j)));
      }
      for (; j < D; ++j) {
        const float xn = static_cast<float>(xr[j]) * inv, wj = static_cast<float>(wp[j]);
        yr[j] = static_cast<T>(has_off ? xn * (off + wj) : round1<T>(xn) * wj);
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset) {
  TORCH_CHECK(float_or_bf16(x) && x.device().is_cpu() && x.dim() >= 1,
              "rms_norm: x must be a float32 or bfloat16 CPU tensor");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device().is_cpu() && weight.dim() == 1 &&
                  weight.size(0) == D,
              "rms_norm: weight must have x's dtype (", x.scalar_type(), ") and shape (", D, "), got ",
              weight.scalar_type(), " ", weight.sizes());
  // Rows as (A, B, D) with strides (sa, sb, 1), so per-head views (T, H, D) of the fused qkv output
  // need no copy.
  at::Tensor x3 = x.dim() == 3 ? x : x.dim() == 2 ? x.unsqueeze(0) : x.reshape({1, -1, D});
  if (x3.stride(2) != 1) x3 = x3.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const float epsf = static_cast<float>(eps), off = static_cast<float>(offset);
  if (x.scalar_type() == at::kBFloat16) rms_norm_impl<bf16>(x3, w, y, epsf, off);
  else rms_norm_impl<float>(x3, w, y, epsf, off);
  return y;
}

// One head in place: x = [x1 | x2], each half h elements, against the float32 cos/sin rows of its
// position; computed in float32, rounded to T once, as _rotate does.
template <typename T>
inline void rotate_head(T* x, const float* c, const float* s, int64_t h) {
  int64_t j = 0;
  for (; j + 8 <= h; j += 8) {
    const __m256 x1 = load8(x + j), x2 = load8(x + h + j);
    const __m256 cv = _mm256_loadu_ps(c + j), sv = _mm256_loadu_ps(s + j);
    store8(x + j, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)));
    store8(x + h + j, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)));
  }
  for (; j < h; ++j) {
    const float x1 = static_cast<float>(x[j]), x2 = static_cast<float>(x[h + j]);
    x[j] = static_cast<T>(x1 * c[j] - x2 * s[j]);
    x[h + j] = static_cast<T>(x2 * c[j] + x1 * s[j]);
  }
}

template <typename T>
void rotary_impl(const at::Tensor& q, const at::Tensor& k, const float* cp, const float* sp, const int64_t* pp) {
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const int64_t tokens = q.size(0), H = q.size(1), Hk = k.size(1), D = q.size(2), half = D / 2;
  at::parallel_for(0, tokens, grain_rows((H + Hk) * D), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cp + pp[t] * half;
      const float* s = sp + pp[t] * half;
      for (int64_t i = 0; i < H; ++i) rotate_head(qp + t * q.stride(0) + i * q.stride(1), c, s, half);
      for (int64_t i = 0; i < Hk; ++i) rotate_head(kp + t * k.stride(0) + i * k.stride(1), c, s, half);
    }
  });
}

void rotary_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
             const at::Tensor& positions) {
  for (const at::Tensor* t : {&q, &k})
    TORCH_CHECK(float_or_bf16(*t) && t->device().is_cpu() && t->dim() == 3 && t->stride(2) == 1,
                "rotary_: q and k must be float32 or bfloat16 CPU tensors (tokens, heads, head_dim) with a "
                "contiguous last dimension");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "rotary_: q (", q.scalar_type(), ") and k (", k.scalar_type(),
              ") must have the same dtype");
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
  if (q.scalar_type() == at::kBFloat16) rotary_impl<bf16>(q, k, cos.data_ptr<float>(), sin.data_ptr<float>(), pp);
  else rotary_impl<float>(q, k, cos.data_ptr<float>(), sin.data_ptr<float>(), pp);
}

// ---- argmax_rows: greedy sampling's argmax over the vocabulary --------------------------------
// Index of the first maximum of each row, torch.max(dim=-1).indices's answer: a NaN counts as the
// maximum (the first NaN wins). torch's bf16 max over (80, 49152) logits took 2.8 ms on two cores;
// this reads the row once, 8 (AVX2) or 16 (AVX-512) lanes each keeping its strictly-greater
// maximum (so its first): 80 rows x 49,152 bf16 in cache, 16 lanes 0.15 ms against 0.50 for 8.

// How far the vector loop of argmax_row got: the next index to read, the best value and its index
// so far, and whether it saw a NaN.
struct ArgmaxScan {
  int64_t j = 0, best_j = 0;
  float best = 0.f;
  bool nan = false;
};

// The lanes' maxima, each lane's index the first of its maximum: the largest, and of equals the
// first index.
inline void merge_lanes(const float* mv, const int32_t* iv, int lanes, ArgmaxScan& r) {
  r.best = mv[0], r.best_j = iv[0];
  for (int l = 1; l < lanes; ++l)
    if (mv[l] > r.best || (mv[l] == r.best && iv[l] < r.best_j)) r.best = mv[l], r.best_j = iv[l];
}

// Four independent (max, index) accumulators of eight lanes, each over every fourth vector: one
// chain of compare + blend per vector would bound the loop by its latency. n >= 32.
template <typename T>
ArgmaxScan argmax_lanes8(const T* x, int64_t n) {
  constexpr int A = 4, W = 8 * A;
  ArgmaxScan r;
  __m256 nan = _mm256_setzero_ps();
  __m256 m[A];
  __m256i mi[A], idx[A];
  for (int a = 0; a < A; ++a) {
    m[a] = load8(x + 8 * a);
    idx[a] = mi[a] = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * a));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(m[a], m[a], _CMP_UNORD_Q));
  }
  const __m256i step = _mm256_set1_epi32(W);
  for (r.j = W; r.j + W <= n; r.j += W)
    for (int a = 0; a < A; ++a) {
      idx[a] = _mm256_add_epi32(idx[a], step);
      const __m256 v = load8(x + r.j + 8 * a);
      const __m256 gt = _mm256_cmp_ps(v, m[a], _CMP_GT_OQ);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      m[a] = _mm256_blendv_ps(m[a], v, gt);
      mi[a] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(mi[a]), _mm256_castsi256_ps(idx[a]), gt));
    }
  alignas(32) float mv[W];
  alignas(32) int32_t iv[W];
  for (int a = 0; a < A; ++a) {
    _mm256_store_ps(mv + 8 * a, m[a]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(iv + 8 * a), mi[a]);
  }
  merge_lanes(mv, iv, W, r);
  r.nan = _mm256_movemask_ps(nan) != 0;
  return r;
}

// The same with AVX-512, sixteen lanes a vector and compare masks instead of blends. n >= 64.
template <typename T>
LS_AVX512 ArgmaxScan argmax_lanes16(const T* x, int64_t n) {
  constexpr int A = 4, W = 16 * A;
  ArgmaxScan r;
  __mmask16 nan = 0;
  __m512 m[A];
  __m512i mi[A], idx[A];
  for (int a = 0; a < A; ++a) {
    m[a] = load16(x + 16 * a);
    idx[a] = mi[a] = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                      _mm512_set1_epi32(16 * a));
    nan |= _mm512_cmp_ps_mask(m[a], m[a], _CMP_UNORD_Q);
  }
  const __m512i step = _mm512_set1_epi32(W);
  for (r.j = W; r.j + W <= n; r.j += W)
    for (int a = 0; a < A; ++a) {
      idx[a] = _mm512_add_epi32(idx[a], step);
      const __m512 v = load16(x + r.j + 16 * a);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, m[a], _CMP_GT_OQ);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      m[a] = _mm512_mask_mov_ps(m[a], gt, v);
      mi[a] = _mm512_mask_mov_epi32(mi[a], gt, idx[a]);
    }
  alignas(64) float mv[W];
  alignas(64) int32_t iv[W];
  for (int a = 0; a < A; ++a) {
    _mm512_store_ps(mv + 16 * a, m[a]);
    _mm512_store_si512(iv + 16 * a, mi[a]);
  }
  merge_lanes(mv, iv, W, r);
  r.nan = nan != 0;
  return r;
}

template <typename T>
int64_t argmax_row(const T* x, int64_t n, bool wide) {
  ArgmaxScan r;
  if (wide && n >= 64) r = argmax_lanes16(x, n);
  else if (n >= 32) r = argmax_lanes8(x, n);
  else r.j = 1, r.best = static_cast<float>(x[0]);
  for (; r.j < n; ++r.j) {  // the tail (and short rows)
    const float v = static_cast<float>(x[r.j]);
    r.nan |= std::isnan(v);
    if (v > r.best) r.best = v, r.best_j = r.j;
  }
  if (r.nan || std::isnan(static_cast<float>(x[0])))
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(static_cast<float>(x[j]))) return j;
  return r.best_j;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && float_or_bf16(x) && x.is_cpu() && x.stride(1) == 1 && x.size(1) > 0,
              "argmax_rows: x must be a (rows, n > 0) float32 or bfloat16 CPU tensor with contiguous rows, got ",
              x.sizes(), " ", x.scalar_type(), " strides ", x.strides());
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t n = x.size(1), ld = x.stride(0);
  const bool wide = leanserve_cpu::use_avx512_bf16();  // LEANSERVE_AVX512=0: the 8-lane loop
  at::parallel_for(0, x.size(0), grain_rows(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      op[r] = x.scalar_type() == at::kFloat ? argmax_row(x.data_ptr<float>() + r * ld, n, wide)
                                            : argmax_row(x.data_ptr<bf16>() + r * ld, n, wide);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor positions) -> ()");
  m.def("act_mul(Tensor gate_up, int act) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("act_mul", &act_mul);
  m.impl("argmax_rows", &argmax_rows);
}
