// y = x @ W^T with W kept in GGUF-style blocks of 32 along the input dimension, dequantized in
// registers: w = scale * q + min. That is exact for GGUF Q4_0, Q4_1, Q5_0 and Q8_0 (scale * q is
// exact in float32 for q of at most 8 bits and a float16 scale, so fma(q, scale, min) rounds once,
// like the reference dequantization), so the result differs from a float32 matmul over the
// dequantized weights only in summation order.
//
//   x      : (M, K) float32, K % 32 == 0
//   qs     : 4-bit: (N, K / 2) uint8, byte i of a block = element i (low nibble), i + 16 (high)
//            8-bit: (N, K) int8
//   scales : (N, K / 32) float32
//   mins   : (N, K / 32) float32 (zeros for symmetric formats)
//   y      : (M, N) float32
//
// Output rows are split over threads (at::parallel_for); each thread walks its rows of W once per
// group of up to 4 rows of x, so W streams from memory once per call for M <= 4 (decode of one to
// four sequences is memory-bound: this is where the 4-8x smaller weights pay).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 weights of one block as four vectors of 8 floats.
template <bool Q4>
inline void dequant_block(const uint8_t* q, __m256 d, __m256 m, __m256 w[4]) {
  if constexpr (Q4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask);                     // elements 0..15
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);  // elements 16..31
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d, m);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d, m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d, m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d, m);
  } else {
    for (int j = 0; j < 4; ++j) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j));
      w[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d, m);
    }
  }
}

// Rows [n0, n1) of W against MR rows of x. One row uses four accumulators (the FMA latency chain
// would otherwise bound it); more rows use two each, to stay within 16 vector registers.
template <bool Q4, int MR>
void rows_kernel(const float* x, int64_t ldx, const uint8_t* qs, const float* scales, const float* mins,
                 int64_t K, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int A = MR == 1 ? 4 : 2;
  const int64_t groups = K / 32;
  const int64_t qbytes = Q4 ? 16 : 32;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MR][A];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
    const uint8_t* q = qs + n * groups * qbytes;
    const float* sc = scales + n * groups;
    const float* mn = mins + n * groups;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 w[4];
      dequant_block<Q4>(q + g * qbytes, _mm256_set1_ps(sc[g]), _mm256_set1_ps(mn[g]), w);
      for (int r = 0; r < MR; ++r) {
        const float* xr = x + r * ldx + g * 32;
        for (int j = 0; j < 4; ++j) acc[r][j % A] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8 * j), w[j], acc[r][j % A]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      __m256 s = acc[r][0];
      for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[r][a]);
      y[r * ldy + n] = hsum(s);
    }
  }
}

template <bool Q4>
void qlinear_impl(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* scales, const float* mins,
                  float* y, int64_t N) {
  // ~16 KB of 4-bit weights per task: small enough to balance, large enough to amortize the spawn
  const int64_t grain = std::max<int64_t>(8, 16384 / std::max<int64_t>(1, K / 2));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M;) {
      const float* xm = x + m * K;
      float* ym = y + m * N;
      switch (std::min<int64_t>(4, M - m)) {
        case 4: rows_kernel<Q4, 4>(xm, K, qs, scales, mins, K, ym, N, n0, n1); m += 4; break;
        case 3: rows_kernel<Q4, 3>(xm, K, qs, scales, mins, K, ym, N, n0, n1); m += 3; break;
        case 2: rows_kernel<Q4, 2>(xm, K, qs, scales, mins, K, ym, N, n0, n1); m += 2; break;
        default: rows_kernel<Q4, 1>(xm, K, qs, scales, mins, K, ym, N, n0, n1); m += 1; break;
      }
    }
  });
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins,
                   int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "qlinear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "qlinear: x must be a 2-D float32 tensor");
  TORCH_CHECK(x.device().is_cpu() && qs.device().is_cpu(), "qlinear: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % 32 == 0, "qlinear: in_features must be a multiple of 32, got ", K);
  TORCH_CHECK(qs.dim() == 2 && qs.size(1) == (bits == 4 ? K / 2 : K) && qs.element_size() == 1 && qs.is_contiguous(),
              "qlinear: qs must be contiguous bytes of shape (N, ", bits == 4 ? K / 2 : K, ")");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * (K / 32),
              "qlinear: scales must be contiguous float32 of shape (N, K / 32)");
  TORCH_CHECK(mins.scalar_type() == at::kFloat && mins.is_contiguous() && mins.numel() == N * (K / 32),
              "qlinear: mins must be contiguous float32 of shape (N, K / 32)");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* q = reinterpret_cast<const uint8_t*>(qs.data_ptr());
  if (bits == 4)
    qlinear_impl<true>(xc.data_ptr<float>(), M, K, q, scales.data_ptr<float>(), mins.data_ptr<float>(), y.data_ptr<float>(), N);
  else
    qlinear_impl<false>(xc.data_ptr<float>(), M, K, q, scales.data_ptr<float>(), mins.data_ptr<float>(), y.data_ptr<float>(), N);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanserve, m) {
  m.def("qlinear(Tensor x, Tensor qs, Tensor scales, Tensor mins, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanserve, CPU, m) {
  m.impl("qlinear", &qlinear);
}
