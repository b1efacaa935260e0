// y = x @ W^T with W kept in GGUF-style blocks of 32 along the input dimension, dequantized in
// registers: w = scale * q + min. That is exact for GGUF Q4_0/1, Q5_0/1 and Q8_0 (scale * q is
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
//            5-bit: the 4-bit layout's bytes for the low 4 bits of each value (0..31), then a
//            uint32 a block: bit i is bit 4 of the block's value i (GGUF Q5's qh).
//            8-bit: (N, K) int8, in order.
//   scales : (N, K / 32) float32 or float16 (GGUF's own scales are float16; K-quants' scale times
//            sub-scale is exact only in float32). 8-bit only: (N, K / 16) float32, a scale per half
//            block (Q6_K's blocks of 16).
//   mins   : (N, K / 32) in the scales' dtype (one per 32 values in either case), or (N, 0) where
//            every min is zero (Q8_0, Q5_0, Q6_K): nothing to read
//   y      : (M, N) in x's dtype (float32 accumulation)
//
// Output rows are split over threads (at::parallel_for); each thread walks its rows of W once per
// group of up to 8 rows of x, so W streams from memory once per call for M <= 8 (decode of a few
// sequences is memory-bound: this is where the 4-8x smaller weights pay) and from cache after that.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>
#include <unistd.h>

#include "cpu_features.h"

#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <string>
#include <tuple>
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

// W's per-block scales and mins (S: float or c10::Half); mins null where they are all zero
template <typename S>
struct BlockParams {
  const S* scales;
  const S* mins;
};

inline float sval(const float* p, int64_t i) { return p[i]; }
inline float sval(const c10::Half* p, int64_t i) { return _cvtsh_ss(p[i].x); }

// A row's count scales (or mins) as float32: float32 ones as they are, float16 ones converted 8 at a
// time into buf, which holds kRowScales (a per-block scalar conversion in the inner loops cost 10-20%
// of an in-cache call; a std::vector per row cost more than that)
constexpr int64_t kRowScales = 4096;  // K up to 65,536 (131,072 for 8-bit values with a scale per 16)
inline const float* as_float(const float* p, int64_t, float*) { return p; }
inline const float* as_float(const c10::Half* p, int64_t count, float* buf) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
  for (; i < count; ++i) buf[i] = _cvtsh_ss(p[i].x);
  return buf;
}

// a row's bytes kPrefetchRows rows ahead: q, sc and mn point at the current row's blocks, scales
// and mins (mn null where there are none); a row has sc_count scales and groups mins
template <typename S>
inline void prefetch_row(const uint8_t* q, const S* sc, const S* mn, int64_t row_bytes, int64_t sc_count, int64_t groups) {
  const uint8_t* ahead = q + kPrefetchRows * row_bytes;
  for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + b), _MM_HINT_T0);
  const int64_t per_line = 64 / sizeof(S);
  for (int64_t b = 0; b < sc_count; b += per_line)
    _mm_prefetch(reinterpret_cast<const char*>(sc + kPrefetchRows * sc_count + b), _MM_HINT_T0);
  for (int64_t b = 0; mn && b < groups; b += per_line)
    _mm_prefetch(reinterpret_cast<const char*>(mn + kPrefetchRows * groups + b), _MM_HINT_T0);
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

// A row's bytes of values: B = 4 or 5 bits in pairs of blocks (32 bytes a pair; 5 bits: then a
// uint32 of high bits a block), 8 bits one byte a value
template <int B>
inline int64_t value_bytes(int64_t K) {
  const int64_t groups = K / 32;
  return B == 8 ? K : (groups + 1) / 2 * 32 + (B == 5 ? 4 * groups : 0);
}

// block g's high bits (5 bits: bit i is bit 4 of value i), where the row's nibble pairs end
inline uint32_t high_bits(const uint8_t* q, int64_t groups, int64_t g) {
  uint32_t h;
  std::memcpy(&h, q + (groups + 1) / 2 * 32 + 4 * g, 4);
  return h;
}

// 16 in the lanes of values 8j .. 8j + 7 of a block whose bit 4 is set in h, else 0 (AVX2)
inline __m256i high8(uint32_t h, int j) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(((h >> (8 * j)) & 0xFF) << 4)), lane),
                          _mm256_set1_epi32(16));
}

// B: bits of the values (4, 5 or 8); H (8-bit only): a scale per half block of 16 (Q6_K), the mins still per 32
template <int B, bool H, int MR, typename Out, typename S, int A = (MR == 1 ? 4 : MR <= 3 ? 2 : 1)>
void rows_kernel(const float* x, int64_t ldx, const uint8_t* qs, const BlockParams<S>& P, int64_t K, Out* y, int64_t ldy,
                 int64_t n0, int64_t n1) {
  const int64_t groups = K / 32, per_row = H ? 2 * groups : groups;
  const int64_t row_bytes = value_bytes<B>(K);
  const __m256i nibble = _mm256_set1_epi32(0xF);
  alignas(64) float sbuf[kRowScales], mbuf[kRowScales];
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MR][A];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
    const uint8_t* q = qs + n * row_bytes;
    if (n + kPrefetchRows < n1)
      prefetch_row(q, P.scales + n * per_row, P.mins ? P.mins + n * groups : nullptr, row_bytes, per_row, groups);
    const float* sc = as_float(P.scales + n * per_row, per_row, sbuf);
    const float* mn = P.mins ? as_float(P.mins + n * groups, groups, mbuf) : nullptr;
    if constexpr (B != 8) {
      // a pair of blocks per 32 bytes: the low nibbles are block g, the high ones block g + 1
      for (int64_t g = 0; g < groups; g += 2) {
        const __m256 d0 = _mm256_set1_ps(sval(sc, g)), m0 = _mm256_set1_ps(mn ? sval(mn, g) : 0.f);
        const bool second = g + 1 < groups;
        const __m256 d1 = _mm256_set1_ps(second ? sval(sc, g + 1) : 0.f), m1 = _mm256_set1_ps(second && mn ? sval(mn, g + 1) : 0.f);
        const uint32_t h0 = B == 5 ? high_bits(q, groups, g) : 0, h1 = B == 5 && second ? high_bits(q, groups, g + 1) : 0;
        for (int j = 0; j < 4; ++j) {
          const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + g * 16 + 8 * j)));
          __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_srli_epi32(v, 4);
          if constexpr (B == 5) {
            lo = _mm256_or_si256(lo, high8(h0, j));
            hi = _mm256_or_si256(hi, high8(h1, j));
          }
          fma_rows<MR, A>(x + g * 32, ldx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), d0, m0), j, acc);
          if (second) fma_rows<MR, A>(x + g * 32 + 32, ldx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), d1, m1), j, acc);
        }
      }
    } else {
      for (int64_t g = 0; g < groups; ++g) {
        const __m256 d = _mm256_set1_ps(sval(sc, H ? 2 * g : g)), m = _mm256_set1_ps(mn ? sval(mn, g) : 0.f);
        const __m256 d1 = H ? _mm256_set1_ps(sval(sc, 2 * g + 1)) : d;
        for (int j = 0; j < 4; ++j) {
          const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + g * 32 + 8 * j));
          fma_rows<MR, A>(x + g * 32, ldx, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), j < 2 ? d : d1, m), j, acc);
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

template <int B, bool H, typename Out, typename S>
void qlinear_impl(const float* x, int64_t M, int64_t K, const uint8_t* qs, const BlockParams<S>& P, Out* y, int64_t N) {
  const int64_t grain = grain_rows(K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for_row_groups(M, [&](auto mr, int64_t m) {
      rows_kernel<B, H, decltype(mr)::value, Out, S>(x + m * K, K, qs, P, K, y + m * N, N, n0, n1);
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
// bits of each 16-bit index (so a byte's high nibble may stay in bit 4); B = 5: bf16(j), a 5-bit value
template <int B>
const uint16_t* nibble_bf16() {
  alignas(64) static uint16_t table[32];
  static const bool filled = [] {
    for (int j = 0; j < 32; ++j) table[j] = c10::BFloat16(static_cast<float>(B == 5 ? j : j & 15)).x;
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

LS_AVX512 inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
LS_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

template <int B, bool H, int MR, typename S, int A = (MR == 1 ? 2 : 1)>
LS_AVX512 void rows_bf16_avx512(const c10::BFloat16* x, const float* xf, int64_t ldx, const float* xsum, const uint8_t* qs,
                                const BlockParams<S>& P, int64_t K, c10::BFloat16* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t groups = K / 32, per_row = H ? 2 * groups : groups;
  const int64_t row_bytes = value_bytes<B>(K);
  const __m512i low = _mm512_load_si512(nibble_bf16<B>());
  const __m512i nib = _mm512_set1_epi16(0xF), sixteen = _mm512_set1_epi16(16);
  alignas(64) float sbuf[kRowScales], mbuf[kRowScales];
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MR][A];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
    const uint8_t* q = qs + n * row_bytes;
    if (n + kPrefetchRows < n1)
      prefetch_row(q, P.scales + n * per_row, P.mins ? P.mins + n * groups : nullptr, row_bytes, per_row, groups);
    const float* sc = as_float(P.scales + n * per_row, per_row, sbuf);
    const float* mn = P.mins ? as_float(P.mins + n * groups, groups, mbuf) : nullptr;  // only where there are mins
    if constexpr (B != 8) {  // 32 bytes: block g in the low nibbles, block g + 1 in the high ones
      for (int64_t g = 0; g < groups; g += 2) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g * 16)));
        __m512i lo = v, hi = _mm512_srli_epi16(v, 4);
        if constexpr (B == 5) {  // bit 4 of each index from the block's high bits, a mask bit a value
          lo = _mm512_and_si512(v, nib);
          lo = _mm512_mask_add_epi16(lo, high_bits(q, groups, g), lo, sixteen);
          if (g + 1 < groups) hi = _mm512_mask_add_epi16(hi, high_bits(q, groups, g + 1), hi, sixteen);
        }
        block<MR, A>(x, ldx, g, (__m512bh)_mm512_permutexvar_epi16(lo, low), sval(sc, g), acc[0] + 0);
        if (g + 1 < groups)
          block<MR, A>(x, ldx, g + 1, (__m512bh)_mm512_permutexvar_epi16(hi, low), sval(sc, g + 1), acc[0] + (1 % A));  // the second accumulator, where there are two
      }
    } else {  // int8: widened to float32 (one conversion per 16, against two lookups and dot products)
      for (int64_t g = 0; g < groups; ++g) {
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 32))));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 32 + 16))));
        if constexpr (H) {  // a scale per half block
          const __m512 d0 = _mm512_set1_ps(sval(sc, 2 * g)), d1 = _mm512_set1_ps(sval(sc, 2 * g + 1));
          for (int r = 0; r < MR; ++r) {
            const float* xr = xf + r * ldx + 32 * g;
            __m512& a = acc[r][g % A];
            a = _mm512_fmadd_ps(_mm512_mul_ps(w0, _mm512_loadu_ps(xr)), d0, a);
            a = _mm512_fmadd_ps(_mm512_mul_ps(w1, _mm512_loadu_ps(xr + 16)), d1, a);
          }
        } else {
          const __m512 d = _mm512_set1_ps(sval(sc, g));
          for (int r = 0; r < MR; ++r) {
            const float* xr = xf + r * ldx + 32 * g;
            const __m512 dot = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xr)));
            acc[r][g % A] = _mm512_fmadd_ps(dot, d, acc[r][g % A]);
          }
        }
      }
    }
    for (int64_t g = 0; mn && g < groups; g += 16) {  // + m_g * sum(x_g), 16 blocks per FMA
      const __mmask16 k = groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (groups - g)) - 1);
      const __m512 m = load16(mn + g, k);
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

template <int B, bool H, typename S>
LS_AVX512 void qlinear_bf16_avx512(const c10::BFloat16* x, int64_t M, int64_t K, const uint8_t* qs, const BlockParams<S>& P,
                                   c10::BFloat16* y, int64_t N) {
  const int64_t groups = K / 32;
  static thread_local std::vector<float> xsum;  // (M, groups): sum of each block of each row, for the mins
  xsum.resize(P.mins ? M * groups : 0);
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);  // bf16 1.0
  for (int64_t i = 0; i < static_cast<int64_t>(xsum.size()); ++i)
    xsum[i] = _mm512_reduce_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(x + 32 * i), ones));
  const float* xs = xsum.data();
  static thread_local std::vector<float> xw;  // 8-bit: the rows widened to float32
  if (B == 8) {
    xw.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) xw[i] = static_cast<float>(x[i]);
  }
  const float* xf = xw.data();  // thread-local: the pointer, not the name, goes to the workers
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
    for_row_groups(M, [&](auto mr, int64_t m) {
      rows_bf16_avx512<B, H, decltype(mr)::value, S>(x + m * K, B == 8 ? xf + m * K : nullptr, K, xs + m * groups, qs, P, K, y + m * N, N, n0, n1);
    });
  });
}

// The arguments' shapes, checked once for both ops; returns (M, K, N).
std::tuple<int64_t, int64_t, int64_t> check_args(const char* op, const at::Tensor& x, const at::Tensor& qs,
                                                 const at::Tensor& scales, const at::Tensor& mins, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, op, ": bits must be 4, 5 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              op, ": x must be a 2-D float32 or bfloat16 tensor");
  TORCH_CHECK(x.device().is_cpu() && qs.device().is_cpu(), op, ": CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % 32 == 0 && K / 16 <= kRowScales, op, ": in_features must be a multiple of 32 and at most ", kRowScales * 16,
              ", got ", K);
  const int64_t row_bytes = bits == 4 ? value_bytes<4>(K) : bits == 5 ? value_bytes<5>(K) : value_bytes<8>(K);
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.size(1) * qs.element_size() == row_bytes &&
                  qs.element_size() == (bits == 8 ? 1 : 4),
              op, ": qs must be contiguous ", bits == 8 ? "int8" : "int32", " rows of ", row_bytes, " bytes");
  const bool half_blocks = bits == 8 && scales.numel() == N * (K / 16);
  TORCH_CHECK((scales.scalar_type() == at::kFloat || (scales.scalar_type() == at::kHalf && !half_blocks)) &&
                  scales.is_contiguous() && (scales.numel() == N * (K / 32) || half_blocks),
              op, ": scales must be contiguous float32 or float16 of shape (N, K / 32), or 8-bit only float32 (N, K / 16)");
  TORCH_CHECK(mins.scalar_type() == scales.scalar_type() && mins.is_contiguous() &&
                  (mins.numel() == N * (K / 32) || mins.numel() == 0),
              op, ": mins must be contiguous of the scales' dtype and shape (N, K / 32), or empty for all-zero mins");
  return {M, K, N};
}

// Calls f(std::integral_constant<int, B>{}, std::bool_constant<H>{}, BlockParams<S>) for the weight's
// format (K: x's columns; a scale per 16 values where there are K / 16 a row: 8-bit only)
template <typename F>
void with_format(const at::Tensor& scales, const at::Tensor& mins, int64_t bits, int64_t K, F&& f) {
  auto by_bits = [&](const auto& P, auto half_blocks) {
    if (bits == 4) f(std::integral_constant<int, 4>{}, std::false_type{}, P);
    else if (bits == 5) f(std::integral_constant<int, 5>{}, std::false_type{}, P);
    else f(std::integral_constant<int, 8>{}, half_blocks, P);
  };
  if (scales.scalar_type() == at::kHalf) {
    by_bits(BlockParams<c10::Half>{scales.data_ptr<c10::Half>(), mins.numel() ? mins.data_ptr<c10::Half>() : nullptr},
            std::false_type{});
    return;
  }
  const BlockParams<float> P{scales.data_ptr<float>(), mins.numel() ? mins.data_ptr<float>() : nullptr};
  if (scales.numel() == scales.size(0) * (K / 16)) by_bits(P, std::true_type{});
  else by_bits(P, std::false_type{});
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins,
                   int64_t bits) {
  const auto [M, K, N] = check_args("qlinear", x, qs, scales, mins, bits);
  const auto* q = reinterpret_cast<const uint8_t*>(qs.data_ptr());
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor xc = x.contiguous();
  const bool avx512 = x.scalar_type() == at::kBFloat16 && leanserve_cpu::use_avx512_bf16();
  // bfloat16 without AVX512-BF16: the rows (at most a few dozen) are widened into a reused buffer and the outputs
  // rounded as they are stored; no ATen conversions (two more dispatches per matmul at batch 1)
  static thread_local std::vector<float> xw;
  const float* xf = nullptr;
  if (x.scalar_type() == at::kFloat) {
    xf = xc.data_ptr<float>();
  } else if (!avx512) {
    xw.resize(M * K);
    const c10::BFloat16* xb = xc.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < M * K; ++i) xw[i] = static_cast<float>(xb[i]);
    xf = xw.data();
  }
  const int64_t m = M, k = K, n = N;  // (structured bindings are not captured by lambdas before C++20)
  with_format(scales, mins, bits, K, [&](auto b, auto h, const auto& P) {
    constexpr int B = decltype(b)::value;
    constexpr bool H = decltype(h)::value;
    using S = std::remove_const_t<std::remove_pointer_t<decltype(P.scales)>>;
    if (x.scalar_type() == at::kFloat) qlinear_impl<B, H, float, S>(xf, m, k, q, P, y.data_ptr<float>(), n);
    else if (avx512) qlinear_bf16_avx512<B, H, S>(xc.data_ptr<c10::BFloat16>(), m, k, q, P, y.data_ptr<c10::BFloat16>(), n);
    else qlinear_impl<B, H, c10::BFloat16, S>(xf, m, k, q, P, y.data_ptr<c10::BFloat16>(), n);
  });
  return y;
}

// ---- many rows: dequantize a tile of W, then the dense matmul ----------------------------------------
// Past a few dozen rows of x a matmul is bound by FLOPs, not by reading W, and BLAS (float32) or
// oneDNN (bfloat16) multiply faster than a kernel that dequantizes in its inner loop. So W is
// dequantized a tile of rows at a time into a buffer in x's dtype, and the tile's columns of y come
// from one at::mm_out. The model keeps no float copy of W. Each thread takes an equal share of W's
// rows and walks it in tiles that fit its core's L2 cache, dequantizing each and multiplying it at
// once, single-threaded: the tile never leaves the core. (The first design, one tile of up to 8 MB
// dequantized by all threads and then multiplied by all, ran as fast as the float copy while the
// shared L3 was quiet and 1.3x slower than it when it was not: the tile went out to L3 and back,
// docs/quantization.md; per-core tiles measured as fast as the float copy in both.)
// A dequantized value is fma(q, scale, min) in float32, rounded once to bfloat16 for bfloat16 rows
// (round to nearest even, as torch's .to()): the values a float copy made at load would hold, so
// this is F.linear(x, dequantize(W).to(x.dtype)) up to the matmul's summation order.

// a core's L2 bytes (sysconf; 1 MB where it does not say): a thread's tile is at most this
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v >= (64 << 10) ? static_cast<int64_t>(v) : int64_t{1} << 20;
  }();
  return bytes;
}

// 8 floats -> 8 bfloat16, round to nearest even (finite values: dequantized weights are)
inline __m128i to_bf16(__m256 v) {
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
inline void store8(c10::BFloat16* out, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(out), to_bf16(v)); }

// Row n of W, dequantized into out (K values of Out)
template <int B, bool H, typename Out, typename S>
void dequant_row(const uint8_t* qs, const BlockParams<S>& P, int64_t K, int64_t n, Out* out) {
  const int64_t groups = K / 32, per_row = H ? 2 * groups : groups;
  const int64_t row_bytes = value_bytes<B>(K);
  const uint8_t* q = qs + n * row_bytes;
  const S* sc = P.scales + n * per_row;
  const S* mn = P.mins ? P.mins + n * groups : nullptr;
  const __m256i nibble = _mm256_set1_epi32(0xF);
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 d = _mm256_set1_ps(sval(sc, H ? 2 * g : g)), m = _mm256_set1_ps(mn ? sval(mn, g) : 0.f);
    const __m256 d1 = H ? _mm256_set1_ps(sval(sc, 2 * g + 1)) : d;
    const uint32_t h = B == 5 ? high_bits(q, groups, g) : 0;
    for (int j = 0; j < 4; ++j) {
      __m256i v;
      if constexpr (B != 8) {  // block g: the low nibbles of its pair's 32 bytes if g is even, else the high ones
        v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + (g / 2) * 32 + 8 * j)));
        v = _mm256_and_si256(g % 2 ? _mm256_srli_epi32(v, 4) : v, nibble);
        if constexpr (B == 5) v = _mm256_or_si256(v, high8(h, j));
      } else {
        v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + g * 32 + 8 * j)));
      }
      store8(out + g * 32 + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), j < 2 ? d : d1, m));
    }
  }
}

// The same with AVX-512: 32 weights (a block) per step, two 16-lane FMAs, and for bfloat16 one
// VCVTNE2PS2BF16 (round to nearest even, like the AVX2 code's integer rounding for finite values)
// block g's 32 values (2 x 16 int32 q) dequantized into out: fma(q, scale, min), stored in Out
template <bool H, typename Out, typename S>
LS_AVX512 inline void store_block(const S* sc, const S* mn, int64_t g, __m512i lo, __m512i hi, Out* out) {
  const __m512 d = _mm512_set1_ps(sval(sc, H ? 2 * g : g)), m = _mm512_set1_ps(mn ? sval(mn, g) : 0.f);
  const __m512 d1 = H ? _mm512_set1_ps(sval(sc, 2 * g + 1)) : d;
  const __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m), b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d1, m);
  if constexpr (std::is_same_v<Out, float>) {
    _mm512_storeu_ps(out + g * 32, a);
    _mm512_storeu_ps(out + g * 32 + 16, b);
  } else {
    _mm512_storeu_si512(out + g * 32, (__m512i)_mm512_cvtne2ps_pbh(b, a));
  }
}

template <int B, bool H, typename Out, typename S>
LS_AVX512 void dequant_row_avx512(const uint8_t* qs, const BlockParams<S>& P, int64_t K, int64_t n, Out* out) {
  const int64_t groups = K / 32, per_row = H ? 2 * groups : groups;
  const int64_t row_bytes = value_bytes<B>(K);
  const uint8_t* q = qs + n * row_bytes;
  const S* sc = P.scales + n * per_row;
  const S* mn = P.mins ? P.mins + n * groups : nullptr;
  if constexpr (B != 8) {  // a pair of blocks per 32 bytes, read once: block g the low nibbles, g + 1 the high ones
    const __m512i nib = _mm512_set1_epi32(0xF), sixteen = _mm512_set1_epi32(16);
    for (int64_t g = 0; g < groups; g += 2) {
      const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 16)));
      const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 16 + 16)));
      __m512i lo = _mm512_and_si512(v0, nib), hi = _mm512_and_si512(v1, nib);
      if constexpr (B == 5) {  // bit 4 of value i: bit i of the block's high bits
        const uint32_t h = high_bits(q, groups, g);
        lo = _mm512_mask_add_epi32(lo, static_cast<__mmask16>(h & 0xFFFF), lo, sixteen);
        hi = _mm512_mask_add_epi32(hi, static_cast<__mmask16>(h >> 16), hi, sixteen);
      }
      store_block<H>(sc, mn, g, lo, hi, out);
      if (g + 1 == groups) break;
      lo = _mm512_srli_epi32(v0, 4);  // bytes zero-extended: the high nibble alone
      hi = _mm512_srli_epi32(v1, 4);
      if constexpr (B == 5) {
        const uint32_t h = high_bits(q, groups, g + 1);
        lo = _mm512_mask_add_epi32(lo, static_cast<__mmask16>(h & 0xFFFF), lo, sixteen);
        hi = _mm512_mask_add_epi32(hi, static_cast<__mmask16>(h >> 16), hi, sixteen);
      }
      store_block<H>(sc, mn, g + 1, lo, hi, out);
    }
  } else {
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 32)));
      const __m512i hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 32 + 16)));
      store_block<H>(sc, mn, g, lo, hi, out);
    }
  }
}

// The calling thread's tile buffer, at least `bytes`, kept between calls: a fresh buffer a call came
// from the OS each time (freed, then faulted in again page by page), which cost more than the
// dequantization. 64-byte aligned.
inline uint8_t* thread_tile(int64_t bytes) {
  static thread_local std::vector<uint8_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < bytes + 64) buffer.resize(bytes + 64);
  const auto addr = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + (64 - addr % 64) % 64;
}

at::Tensor qlinear_dense(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins,
                         int64_t bits, int64_t tile_rows) {
  const auto [M, K, N] = check_args("qlinear_dense", x, qs, scales, mins, bits);
  const auto* q = reinterpret_cast<const uint8_t*>(qs.data_ptr());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const int64_t row_bytes = K * static_cast<int64_t>(x.element_size());
  if (tile_rows <= 0) tile_rows = std::max<int64_t>(16, l2_bytes() / row_bytes);
  // each thread's share of W's rows in equal tiles of at most tile_rows (a multiple of 16 where it can be)
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t share = (N + threads - 1) / threads, tiles = (share + tile_rows - 1) / tile_rows;
  int64_t rows = (share + tiles - 1) / tiles;
  if (rows > 16) rows = std::min(tile_rows, (rows + 15) / 16 * 16);
  const bool inference = c10::InferenceMode::is_enabled();
  const bool wide = leanserve_cpu::use_avx512_bf16();
  const int64_t k = K, n_all = N, num_tiles = (N + rows - 1) / rows;
  with_format(scales, mins, bits, K, [&](auto b, auto h, const auto& P) {
    constexpr int B = decltype(b)::value;
    constexpr bool H = decltype(h)::value;
    using S = std::remove_const_t<std::remove_pointer_t<decltype(P.scales)>>;
    auto run = [&](auto out_type) {  // out_type: a value of x's element type
      using Out = decltype(out_type);
      const auto dequant = wide ? &dequant_row_avx512<B, H, Out, S> : &dequant_row<B, H, Out, S>;
      at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
        // InferenceMode is per thread: the workers take the caller's (writing y, an inference tensor
        // when the caller is in inference mode, from outside that mode fails)
        c10::InferenceMode guard(inference);
        Out* tile = reinterpret_cast<Out*>(thread_tile(rows * row_bytes));
        const at::Tensor w = at::from_blob(tile, {rows, k}, x.options());
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n0 = t * rows, n1 = std::min(n_all, n0 + rows);
          for (int64_t n = n0; n < n1; ++n) dequant(q, P, k, n, tile + (n - n0) * k);
          at::Tensor out = y.narrow(1, n0, n1 - n0);  // (M, tile) with row stride N: the matmul writes it in place
          at::mm_out(out, xc, w.narrow(0, 0, n1 - n0).t());  // single-threaded here, inside the parallel region
        }
      });
    };
    if (x.scalar_type() == at::kFloat) run(float{});
    else run(c10::BFloat16{});
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanserve, m) {
  m.def("qlinear(Tensor x, Tensor qs, Tensor scales, Tensor mins, int bits) -> Tensor");
  // the same product for many rows: tiles of W dequantized, then at::mm, each thread its own tiles
  // (tile_rows <= 0: as many rows as fit a core's L2 cache)
  m.def("qlinear_dense(Tensor x, Tensor qs, Tensor scales, Tensor mins, int bits, int tile_rows=0) -> Tensor");
  // whether the AVX512-BF16 paths (here, in paged_attention.cpp and fused.cpp) run; for start-up logs
  m.def("avx512_bf16_available() -> bool", [] { return leanserve_cpu::use_avx512_bf16(); });
}

TORCH_LIBRARY_IMPL(leanserve, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("qlinear_dense", &qlinear_dense);
}
