// y = x @ W^T with W kept in GGUF-style blocks of 32 along the input dimension, dequantized in
// registers: w = scale * q + min. That is exact for GGUF Q4_0, Q4_1, Q5_0 and Q8_0 (scale * q is
// exact in float32 for q of at most 8 bits and a float16 scale, so fma(q, scale, min) rounds once,
// like the reference dequantization), so the result differs from a float32 matmul over the
// dequantized weights only in summation order.
//
//   x      : (M, K) float32 or bfloat16 (widened to float32 first), K % 32 == 0
//   qs     : 4-bit: (N, ceil(K / 64) * 8) int32 read as uint32. Blocks go in pairs (64 weights,
//            one 256-bit load); nibble s of 32-bit lane i is weight 8s + i of the pair, so a shift
//            and a mask give 8 consecutive weights in 8 lanes with no byte shuffles. An odd last
//            block fills nibbles 0-3 only.
//            8-bit: (N, K) int8, in order.
//   scales : (N, K / 32) float32
//   mins   : (N, K / 32) float32 (zeros for symmetric formats)
//   y      : (M, N) in x's dtype (float32 accumulation)
//
// Output rows are split over threads (at::parallel_for); each thread walks its rows of W once per
// group of up to 8 rows of x, so W streams from memory once per call for M <= 8 (decode of a few
// sequences is memory-bound: this is where the 4-8x smaller weights pay) and from cache after that.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

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

template <bool Q4, int MR, typename Out, int A = (MR == 1 ? 4 : MR <= 3 ? 2 : 1)>
void rows_kernel(const float* x, int64_t ldx, const uint8_t* qs, const float* scales, const float* mins,
                 int64_t K, Out* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t groups = K / 32;
  const int64_t row_bytes = Q4 ? (groups + 1) / 2 * 32 : K;
  const __m256i nibble = _mm256_set1_epi32(0xF);
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MR][A];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
    const uint8_t* q = qs + n * row_bytes;
    const float* sc = scales + n * groups;
    const float* mn = mins + n * groups;
    if (n + kPrefetchRows < n1) {  // weights stream from DRAM once per call: ask for them early
      const uint8_t* ahead = q + kPrefetchRows * row_bytes;
      for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + b), _MM_HINT_T0);
      for (int64_t b = 0; b < groups; b += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(sc + kPrefetchRows * groups + b), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(mn + kPrefetchRows * groups + b), _MM_HINT_T0);
      }
    }
    if constexpr (Q4) {
      // shift counts are compile-time constants (immediate shifts), hence the unrolled pair
      auto block = [&](__m256i lanes, int64_t g, auto first) {
        const __m256 d = _mm256_set1_ps(sc[g]), m = _mm256_set1_ps(mn[g]);
        constexpr int base = decltype(first)::value ? 0 : 16;
        const __m256i q0 = _mm256_and_si256(_mm256_srli_epi32(lanes, base + 0), nibble);
        const __m256i q1 = _mm256_and_si256(_mm256_srli_epi32(lanes, base + 4), nibble);
        const __m256i q2 = _mm256_and_si256(_mm256_srli_epi32(lanes, base + 8), nibble);
        const __m256i q3 = _mm256_and_si256(_mm256_srli_epi32(lanes, base + 12), nibble);
        fma_rows<MR, A>(x + g * 32, ldx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), d, m), 0, acc);
        fma_rows<MR, A>(x + g * 32, ldx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), d, m), 1, acc);
        fma_rows<MR, A>(x + g * 32, ldx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q2), d, m), 2, acc);
        fma_rows<MR, A>(x + g * 32, ldx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q3), d, m), 3, acc);
      };
      for (int64_t g = 0; g < groups; g += 2) {
        const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g * 16));
        block(lanes, g, std::true_type{});
        if (g + 1 < groups) block(lanes, g + 1, std::false_type{});
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

template <bool Q4, typename Out>
void qlinear_impl(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* scales, const float* mins,
                  Out* y, int64_t N) {
  // ~16 KB of 4-bit weights per task: small enough to balance, large enough to amortize the spawn
  const int64_t grain = std::max<int64_t>(8, 16384 / std::max<int64_t>(1, K / 2));  // rows per task
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M;) {  // rows of x in groups of 8, then the rest
      const float* xm = x + m * K;
      Out* ym = y + m * N;
      const int64_t mr = std::min<int64_t>(8, M - m);
      switch (mr) {
        case 8: rows_kernel<Q4, 8, Out>(xm, K, qs, scales, mins, K, ym, N, n0, n1); break;
        case 7: rows_kernel<Q4, 7, Out>(xm, K, qs, scales, mins, K, ym, N, n0, n1); break;
        case 6: rows_kernel<Q4, 6, Out>(xm, K, qs, scales, mins, K, ym, N, n0, n1); break;
        case 5: rows_kernel<Q4, 5, Out>(xm, K, qs, scales, mins, K, ym, N, n0, n1); break;
        case 4: rows_kernel<Q4, 4, Out>(xm, K, qs, scales, mins, K, ym, N, n0, n1); break;
        case 3: rows_kernel<Q4, 3, Out>(xm, K, qs, scales, mins, K, ym, N, n0, n1); break;
        case 2: rows_kernel<Q4, 2, Out>(xm, K, qs, scales, mins, K, ym, N, n0, n1); break;
        default: rows_kernel<Q4, 1, Out>(xm, K, qs, scales, mins, K, ym, N, n0, n1); break;
      }
      m += mr;
    }
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
  TORCH_CHECK(mins.scalar_type() == at::kFloat && mins.is_contiguous() && mins.numel() == N * (K / 32),
              "qlinear: mins must be contiguous float32 of shape (N, K / 32)");
  const auto* q = reinterpret_cast<const uint8_t*>(qs.data_ptr());
  const float* sc = scales.data_ptr<float>();
  const float* mn = mins.data_ptr<float>();
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor xc = x.contiguous();
  if (x.scalar_type() == at::kFloat) {
    if (bits == 4) qlinear_impl<true>(xc.data_ptr<float>(), M, K, q, sc, mn, y.data_ptr<float>(), N);
    else qlinear_impl<false>(xc.data_ptr<float>(), M, K, q, sc, mn, y.data_ptr<float>(), N);
    return y;
  }
  // bfloat16: the rows (at most a few dozen) are widened into a reused buffer and the outputs
  // rounded as they are stored; no ATen conversions (two more dispatches per matmul at batch 1)
  static thread_local std::vector<float> xf;
  xf.resize(M * K);
  const c10::BFloat16* xb = xc.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xb[i]);
  auto* yb = y.data_ptr<c10::BFloat16>();
  if (bits == 4) qlinear_impl<true>(xf.data(), M, K, q, sc, mn, yb, N);
  else qlinear_impl<false>(xf.data(), M, K, q, sc, mn, yb, N);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanserve, m) {
  m.def("qlinear(Tensor x, Tensor qs, Tensor scales, Tensor mins, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanserve, CPU, m) {
  m.impl("qlinear", &qlinear);
}
