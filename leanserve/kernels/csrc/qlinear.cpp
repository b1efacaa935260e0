// y = x @ W^T with W kept in GGUF-style blocks of 32 along the input dimension, dequantized in
// registers: w = scale * q + min. That is exact for GGUF Q4_0, Q4_1, Q5_0 and Q8_0 (scale * q is
// exact in float32 for q of at most 8 bits and a float16 scale, so fma(q, scale, min) rounds once,
// like the reference dequantization), so the result differs from a float32 matmul over the
// dequantized weights only in summation order. (The AVX512-BF16 path for bfloat16 rows, below,
// sums per block first and scales after: the same sum, rounded in another order.)
//
//   x      : (M, K) float32 or bfloat16, K % 32 == 0
//   qs     : 4-bit: (N, ceil(K / 64) * 8) int32 holding bytes. Blocks go in pairs, 32 bytes a
//            pair: byte i holds weight i of the first block in its low nibble and weight i of the
//            second in its high one, so one widening load feeds both blocks (a mask or a shift
//            apart). An odd last block leaves the high nibbles zero.
//            8-bit: (N, K) int8, in order.
//   scales : (N, K / 32) float32
//   mins   : (N, K / 32) float32, or (N, 0) where every min is zero (Q8_0, Q5_0): nothing to read
//   y      : (M, N) in x's dtype (float32 accumulation)
//
// Output rows are split over threads (at::parallel_for); each thread walks its rows of W once per
// group of up to 8 rows of x, so W streams from memory once per call for M <= 8 (decode of a few
// sequences is memory-bound: this is where the 4-8x smaller weights pay) and from cache after that.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "cpu_features.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows [n0, n1) of W against MR rows of x: each dequantized vector of weights feeds MR FMAs, so
// the dequantization is paid once per MR rows. A rows: accumulators per row of x; FMA latency needs
// about 8 independent chains to keep both FMA units busy (one row: 4; two or three: 2 each; more: 1).
template <int MR, int A>
inline void fma_rows(const float* x, int64_t ldx, __m256 w, int j, __m256 (&acc)[MR][A]) {
  for (int r = 0; r < MR; ++r) acc[r][j % A] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + 8 * j), w, acc[r][j % A]);
}

// Rows of W ahead of the one being read whose bytes are prefetched: the hardware prefetcher alone
// left a cold 1-row call at a quarter of the machine's read bandwidth (three streams per row).
constexpr int64_t kPrefetchRows = 12;

// W's per-block scales and mins; mins null where they are all zero
struct BlockParams {
  const float* scales;
  const float* mins;
};

// a row's bytes kPrefetchRows rows ahead: q, sc and mn point at the current row's blocks, scales
// and mins (mn null where there are none)
inline void prefetch_row(const uint8_t* q, const float* sc, const float* mn, int64_t row_bytes, int64_t groups) {
  const uint8_t* ahead = q + kPrefetchRows * row_bytes;
  for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + b), _MM_HINT_T0);
  for (int64_t b = 0; b < groups; b += 16) {  // 16 floats a cache line
    _mm_prefetch(reinterpret_cast<const char*>(sc + kPrefetchRows * groups + b), _MM_HINT_T0);
    if (mn) _mm_prefetch(reinterpret_cast<const char*>(mn + kPrefetchRows * groups + b), _MM_HINT_T0);
  }
}

// Calls f(std::integral_constant<int, MR>{}, m) for the rows of x in groups of 8, then the rest,
// so each kernel is compiled for a fixed number of rows.
template <typename F>
inline void for_row_groups(int64_t M, F&& f) {
  for (int64_t m = 0; m < M;) {
    const int64_t mr = std::min<int64_t>(8, M - m);
    switch (mr) {
      case 8: f(std::integral_constant<int, 8>{}, m); break;
      case 7: f(std::integral_constant<int, 7>{}, m); break;
      case 6: f(std::integral_constant<int, 6>{}, m); break;
      case 5: f(std::integral_constant<int, 5>{}, m); break;
      case 4: f(std::integral_constant<int, 4>{}, m); break;
      case 3: f(std::integral_constant<int, 3>{}, m); break;
      case 2: f(std::integral_constant<int, 2>{}, m); break;
      default: f(std::integral_constant<int, 1>{}, m); break;
    }
    m += mr;
  }
}

template <bool Q4, int MR, typename Out, int A = (MR == 1 ? 4 : MR <= 3 ? 2 : 1)>
void rows_kernel(const float* x, int64_t ldx, const uint8_t* qs, const BlockParams& P, int64_t K, Out* y, int64_t ldy,
                 int64_t n0, int64_t n1) {
  const int64_t groups = K / 32;
  const int64_t row_bytes = Q4 ? (groups + 1) / 2 * 32 : K;
  const __m256i nibble = _mm256_set1_epi32(0xF);
  std::vector<float> zeros(P.mins ? 0 : groups);  // the mins of a format without them
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MR][A];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
    const uint8_t* q = qs + n * row_bytes;
    const float* sc = P.scales + n * groups;
    const float* mn = P.mins ? P.mins + n * groups : zeros.data();
    if (n + kPrefetchRows < n1) prefetch_row(q, sc, P.mins ? mn : nullptr, row_bytes, groups);
    if constexpr (Q4) {
      // a pair of blocks per 32 bytes: the low nibbles are block g, the high ones block g + 1
      for (int64_t g = 0; g < groups; g += 2) {
        const __m256 d0 = _mm256_set1_ps(sc[g]), m0 = _mm256_set1_ps(mn[g]);
        const bool second = g + 1 < groups;
        const __m256 d1 = _mm256_set1_ps(second ? sc[g + 1] : 0.f), m1 = _mm256_set1_ps(second ? mn[g + 1] : 0.f);
        for (int j = 0; j < 4; ++j) {
          const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + g * 16 + 8 * j)));
          fma_rows<MR, A>(x + g * 32, ldx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, nibble)), d0, m0), j, acc);
          if (second)
            fma_rows<MR, A>(x + g * 32 + 32, ldx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), d1, m1), j, acc);
        }
      }
    } else {
      for (int64_t g = 0; g < groups; ++g) {
        const __m256 d = _mm256_set1_ps(sc[g]), m = _mm256_set1_ps(mn[g]);
        for (int j = 0; j < 4; ++j) {
          const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + g * 32 + 8 * j));
          fma_rows<MR, A>(x + g * 32, ldx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d, m), j, acc);
        }
      }
    }
    for (int r = 0; r < MR; ++r) {
      __m256 s = acc[r][0];
      for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[r][a]);
      y[r * ldy + n] = Out(hsum(s));  // bfloat16: c10's round-to-nearest-even, as torch's .to()
    }
  }
}

// ~16 KB of 4-bit weights per task: small enough to balance, large enough to amortize the spawn
inline int64_t grain_rows(int64_t K) { return std::max<int64_t>(8, 16384 / std::max<int64_t>(1, K / 2)); }

template <bool Q4, typename Out>
void qlinear_impl(const float* x, int64_t M, int64_t K, const uint8_t* qs, const BlockParams& P, Out* y, int64_t N) {
  const int64_t grain = grain_rows(K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for_row_groups(M, [&](auto mr, int64_t m) {
      rows_kernel<Q4, decltype(mr)::value, Out>(x + m * K, K, qs, P, K, y + m * N, N, n0, n1);
    });
  });
}

// ---- bfloat16 rows with AVX512-BF16 (picked at run time; the code above is the fallback) ----------
// The block's scale and min come out of the sum: sum_i x_i (d q_i + m) = d * sum_i x_i q_i + m * sum_i x_i.
// 4-bit values become bf16 by a VPERMW table lookup, exactly (small integers), and VDPBF16PS
// multiplies them with the bf16 rows of x (products of two bf16 are exact in float32) and sums in
// float32: per 32 weights half a widening load, one lookup, one dot product and one FMA with the
// scale, against 4 x 5 instructions on the AVX2 path, which left the cores, not memory, the limit
// at one row (14-16 GB/s over SmolLM2's blocks; now about the machine's read bandwidth). 8-bit
// values are widened to float32 and multiplied with the rows widened once per call: on the Xeon
// this was measured on, VDPBF16PS issues once per ~2 cycles, and splitting an int8 into two exact
// bf16 halves (two lookups, two dot products) was slower. The sums of x per block are computed
// once per call, and the min terms join the accumulators as one more 16-lane FMA per 16 blocks.

// bf16(j & 15) for j < 32: a 4-bit value as bf16 (exact), looked up by VPERMW, which reads the low 5
// bits of each 16-bit index (so a byte's high nibble may stay in bit 4)
const uint16_t* nibble_bf16() {
  alignas(64) static uint16_t table[32];
  static const bool filled = [] {
    for (int j = 0; j < 32; ++j) table[j] = c10::BFloat16(static_cast<float>(j & 15)).x;
    return true;
  }();
  (void)filled;
  return table;
}

// Block g of W (its 32 values w in bf16, scale d) against MR rows of x: acc[r] += d * (x_r,g . w);
// acc points at accumulator a of row 0, the rows' accumulators A apart.
template <int MR, int A>
LS_AVX512 inline void block(const c10::BFloat16* x, int64_t ldx, int64_t g, __m512bh w, float scale, __m512* acc) {
  const __m512 d = _mm512_set1_ps(scale);
  for (int r = 0; r < MR; ++r) {
    const __m512bh xg = (__m512bh)_mm512_loadu_si512(x + r * ldx + 32 * g);
    acc[r * A] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), xg, w), d, acc[r * A]);
  }
}

template <bool Q4, int MR, int A = (MR == 1 ? 2 : 1)>
LS_AVX512 void rows_bf16_avx512(const c10::BFloat16* x, const float* xf, int64_t ldx, const float* xsum, const uint8_t* qs,
                                const BlockParams& P, int64_t K, c10::BFloat16* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t groups = K / 32;
  const int64_t row_bytes = Q4 ? (groups + 1) / 2 * 32 : K;
  const __m512i low = _mm512_load_si512(nibble_bf16());
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MR][A];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
    const uint8_t* q = qs + n * row_bytes;
    const float* sc = P.scales + n * groups;
    const float* mn = P.mins ? P.mins + n * groups : nullptr;  // read only where there are mins
    if (n + kPrefetchRows < n1) prefetch_row(q, sc, mn, row_bytes, groups);
    if constexpr (Q4) {  // 32 bytes: block g in the low nibbles, block g + 1 in the high ones
      for (int64_t g = 0; g < groups; g += 2) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g * 16)));
        block<MR, A>(x, ldx, g, (__m512bh)_mm512_permutexvar_epi16(v, low), sc[g], acc[0] + 0);
        if (g + 1 < groups)
          block<MR, A>(x, ldx, g + 1, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), low), sc[g + 1], acc[0] + (1 % A));  // the second accumulator, where there are two
      }
    } else {  // int8: widened to float32 (one conversion per 16, against two lookups and dot products)
      for (int64_t g = 0; g < groups; ++g) {
        const __m512 d = _mm512_set1_ps(sc[g]);
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 32))));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 32 + 16))));
        for (int r = 0; r < MR; ++r) {
          const float* xr = xf + r * ldx + 32 * g;
          const __m512 dot = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xr)));
          acc[r][g % A] = _mm512_fmadd_ps(dot, d, acc[r][g % A]);
        }
      }
    }
    for (int64_t g = 0; P.mins && g < groups; g += 16) {  // + m_g * sum(x_g), 16 blocks per FMA
      const __mmask16 k = groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (groups - g)) - 1);
      const __m512 m = _mm512_maskz_loadu_ps(k, mn + g);
      for (int r = 0; r < MR; ++r)
        acc[r][0] = _mm512_fmadd_ps(m, _mm512_maskz_loadu_ps(k, xsum + r * groups + g), acc[r][0]);
    }
    for (int r = 0; r < MR; ++r) {
      __m512 s = acc[r][0];
      for (int a = 1; a < A; ++a) s = _mm512_add_ps(s, acc[r][a]);
      y[r * ldy + n] = c10::BFloat16(_mm512_reduce_add_ps(s));
    }
  }
}

template <bool Q4>
LS_AVX512 void qlinear_bf16_avx512(const c10::BFloat16* x, int64_t M, int64_t K, const uint8_t* qs, const BlockParams& P,
                                   c10::BFloat16* y, int64_t N) {
  const int64_t groups = K / 32;
  static thread_local std::vector<float> xsum;  // (M, groups): sum of each block of each row, for the mins
  xsum.resize(P.mins ? M * groups : 0);
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);  // bf16 1.0
  for (int64_t i = 0; i < static_cast<int64_t>(xsum.size()); ++i)
    xsum[i] = _mm512_reduce_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(x + 32 * i), ones));
  const float* xs = xsum.data();
  static thread_local std::vector<float> xw;  // 8-bit: the rows widened to float32
  if (!Q4) {
    xw.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) xw[i] = static_cast<float>(x[i]);
  }
  const float* xf = xw.data();  // thread-local: the pointer, not the name, goes to the workers
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
    for_row_groups(M, [&](auto mr, int64_t m) {
      rows_bf16_avx512<Q4, decltype(mr)::value>(x + m * K, Q4 ? nullptr : xf + m * K, K, xs + m * groups, qs, P, K, y + m * N, N, n0, n1);
    });
  });
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins,
                   int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "qlinear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "qlinear: x must be a 2-D float32 or bfloat16 tensor");
  TORCH_CHECK(x.device().is_cpu() && qs.device().is_cpu(), "qlinear: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % 32 == 0, "qlinear: in_features must be a multiple of 32, got ", K);
  const int64_t row_bytes = bits == 4 ? (K / 32 + 1) / 2 * 32 : K;
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.size(1) * qs.element_size() == row_bytes &&
                  qs.element_size() == (bits == 4 ? 4 : 1),
              "qlinear: qs must be contiguous ", bits == 4 ? "int32" : "int8", " rows of ", row_bytes, " bytes");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * (K / 32),
              "qlinear: scales must be contiguous float32 of shape (N, K / 32)");
  TORCH_CHECK(mins.scalar_type() == at::kFloat && mins.is_contiguous() && (mins.numel() == N * (K / 32) || mins.numel() == 0),
              "qlinear: mins must be contiguous float32 of shape (N, K / 32), or empty for all-zero mins");
  const auto* q = reinterpret_cast<const uint8_t*>(qs.data_ptr());
  const BlockParams P{scales.data_ptr<float>(), mins.numel() ? mins.data_ptr<float>() : nullptr};
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor xc = x.contiguous();
  if (x.scalar_type() == at::kFloat) {
    if (bits == 4) qlinear_impl<true>(xc.data_ptr<float>(), M, K, q, P, y.data_ptr<float>(), N);
    else qlinear_impl<false>(xc.data_ptr<float>(), M, K, q, P, y.data_ptr<float>(), N);
    return y;
  }
  if (leanserve_cpu::use_avx512_bf16()) {
    const auto* xb = xc.data_ptr<c10::BFloat16>();
    auto* yb = y.data_ptr<c10::BFloat16>();
    if (bits == 4) qlinear_bf16_avx512<true>(xb, M, K, q, P, yb, N);
    else qlinear_bf16_avx512<false>(xb, M, K, q, P, yb, N);
    return y;
  }
  // bfloat16 without AVX512-BF16: the rows (at most a few dozen) are widened into a reused buffer and the outputs
  // rounded as they are stored; no ATen conversions (two more dispatches per matmul at batch 1)
  static thread_local std::vector<float> xf;
  xf.resize(M * K);
  const c10::BFloat16* xb = xc.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xb[i]);
  auto* yb = y.data_ptr<c10::BFloat16>();
  if (bits == 4) qlinear_impl<true>(xf.data(), M, K, q, P, yb, N);
  else qlinear_impl<false>(xf.data(), M, K, q, P, yb, N);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanserve, m) {
  m.def("qlinear(Tensor x, Tensor qs, Tensor scales, Tensor mins, int bits) -> Tensor");
  // whether the AVX512-BF16 paths (here, in paged_attention.cpp and fused.cpp) run; for start-up logs
  m.def("avx512_bf16_available() -> bool", [] { return leanserve_cpu::use_avx512_bf16(); });
}

TORCH_LIBRARY_IMPL(leanserve, CPU, m) {
  m.impl("qlinear", &qlinear);
}
