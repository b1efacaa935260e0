// Decode attention read straight from the paged KV cache: each sequence's one query token (the
// last position of its context) attends to its K/V rows in place, found through the block table,
// so nothing is gathered into a padded copy and no masked-out padding is computed.
//
//   q            : (S, H, D) float32 or bfloat16, D % 8 == 0
//   k/v_cache    : (num_blocks, block_size, KVH, D) of q's dtype, contiguous; or the 8-bit cache:
//                  (num_blocks, block_size, KVH, D + D / 16) int8 bytes, a row D values and a
//                  float16 scale per 32 of them, each block head-major (values, then scales: see Problem)
//   block_tables : (S, max_blocks) int64; row s uses its first ceil(len_s / block_size) entries
//   context_lens : (S,) int64, 1 <= len_s <= max_blocks * block_size
//   window       : 0 = full attention, else position p sees positions p - window + 1 .. p
//   out          : (S, H, D) of q's dtype
//
// One task per (sequence, KV head), spread over threads with at::parallel_for. The task's
// G = H / KVH query heads (adjacent in q) share every K and V row it loads, so GQA reads K/V once
// without repeating it. Two passes over the visible rows: scores q.k (float32, max-subtracted
// softmax with a vectorized exp), then the probability-weighted sum of the V rows. Rows go four at
// a time: four independent FMA chains per dot product, and one load/store of the output
// accumulator per four V rows instead of per row. bfloat16 runs the same code (a template over the
// element type): each K/V load widens to float32 exactly, all the math is float32, and the output is
// rounded to bfloat16 once at the end, to nearest even like torch's .to(torch.bfloat16). The 8-bit
// cache too (a second template type): values widen exactly and are multiplied by their group's
// scale as they are loaded, the rest as for a float cache.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include "cpu_features.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// The four sums of four accumulators, as one vector (scores of four rows in one store).
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// e^x for x <= 0 (softmax after max subtraction), Cephes polynomial: a few ulp, like expf. Scalar
// expf per score would cost as much as reading K/V. Below -87 (and for -inf) it returns exactly 0
// rather than a denormal, so padding scores of -inf drop out of the sums.
inline __m256 exp256(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2 with ln2 in two parts, so r keeps its low bits
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// int8 (the 8-bit cache's values): sign-extend to 32 bits, convert (exact)
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// bfloat16 is the high half of a float32: zero-extend to 32 bits and shift up (exact)
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The rows of one KV head are strided (KVH * D elements apart) inside a block and the blocks are
// scattered, which the hardware prefetcher follows poorly: each loop asks for the four rows PF ahead
// (on one core of the dev machine: 5 -> 7.5 GB/s of K/V from DRAM).
constexpr int64_t PF = 24;
template <typename C>
inline void prefetch_rows(const C* base, const int64_t* offs, int64_t D) {
  for (int r = 0; r < 4; ++r)  // one prefetch per 64-byte cache line
    for (int64_t d = 0; d < D; d += 64 / static_cast<int64_t>(sizeof(C)))
      _mm_prefetch(reinterpret_cast<const char*>(base + offs[r] + d), _MM_HINT_T0);
}

// The 8-bit cache (kv_cache_dtype int8): a row's values in groups of kGroup (GGUF Q8_0's 32), each
// with a float16 scale; a head_dim that is not a multiple of 32 is one group.
constexpr int64_t kGroup = 32;
inline int64_t kv_group(int64_t D) { return D % kGroup == 0 ? kGroup : D; }
inline int64_t kv_int8_width(int64_t D) { return D + 2 * (D / kv_group(D)); }  // bytes of a row

// T: the element type of q and out (float or c10::BFloat16); C: the caches' (T, or int8_t).
//
// A float cache block is (block_size, KVH, D) elements. The 8-bit cache is sized (num_blocks,
// block_size, KVH, kv_int8_width(D)) bytes, and a block's bytes are laid out head-major: first the
// int8 values (KVH, block_size, D), so one KV head's rows of a block are contiguous (at D = 64, each
// row one 64-byte cache line), then the float16 scales (KVH, block_size, D / G); value d of a row is
// value[d] * scale[d / G]. model/attention.py int8_cache_views is the same layout in Python.
template <typename T, typename C = T>
struct Problem {
  const T* q;
  const C *k, *v;
  const int64_t *tables, *lens;
  T* out;
  int64_t H, KVH, D, block_size, max_blocks, window;
  float scale;
  // row j of block b, KV head h starts at b * block_stride + h * head_stride + j * row_stride
  int64_t block_stride, head_stride, row_stride;
  int64_t G, NS;  // the 8-bit cache: values per scale, scales per row (a float cache: D and 1)
};

template <typename T, typename C>
Problem<T, C> make_problem(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const int64_t* tables, const int64_t* lens, at::Tensor& out, int64_t max_blocks,
                           int64_t window, float scale) {
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2), D = q.size(2);
  const bool int8 = std::is_same_v<C, int8_t>;
  const int64_t G = int8 ? kv_group(D) : D;
  return {q.data_ptr<T>(), k_cache.data_ptr<C>(), v_cache.data_ptr<C>(), tables, lens, out.data_ptr<T>(),
          q.size(1), KVH, D, bs, max_blocks, window, scale,
          bs * KVH * k_cache.size(3), int8 ? bs * D : D, int8 ? D : KVH * D, G, D / G};
}

// The 8-bit cache's NS scales of row j of block b, KV head h, as float32 into out.
inline void scales_of(const int8_t* cache, int64_t block_stride, int64_t bs, int64_t KVH, int64_t D, int64_t NS,
                      int64_t b, int64_t h, int64_t j, float* out) {
  const auto* sp = reinterpret_cast<const uint16_t*>(cache + b * block_stride + bs * KVH * D) + (h * bs + j) * NS;
  for (int64_t i = 0; i < NS; ++i) out[i] = _cvtsh_ss(sp[i]);  // F16C: exact
}

// Offset in the cache of each visible row of sequence s, KV head h (positions lo .. len-1); the
// padding up to np repeats the last row so the four-row loops need no tail (its scores are
// replaced by -inf, its probabilities are 0).
// The 8-bit cache: also each row's K and V scales as float32, row t's at sc[t * NS ..] (K) and
// sc[(np + t) * NS ..] (V); the padding's are 0.
template <typename T, typename C>
void row_offsets(const Problem<T, C>& P, int64_t s, int64_t h, int64_t lo, int64_t np, std::vector<int64_t>& offs,
                 std::vector<float>& sc) {
  const int64_t bs = P.block_size, len = P.lens[s], n = len - lo, NS = P.NS;
  constexpr bool int8 = std::is_same_v<C, int8_t>;
  offs.resize(np);
  if (int8) sc.assign(2 * np * NS, 0.0f);
  const int64_t* table = P.tables + s * P.max_blocks;
  for (int64_t b = lo / bs, t = lo; t < len; ++b)  // block by block: no division per row
    for (int64_t j = t - b * bs; j < bs && t < len; ++j, ++t) {
      offs[t - lo] = table[b] * P.block_stride + h * P.head_stride + j * P.row_stride;
      if constexpr (int8) {
        scales_of(P.k, P.block_stride, bs, P.KVH, P.D, NS, table[b], h, j, sc.data() + (t - lo) * NS);
        scales_of(P.v, P.block_stride, bs, P.KVH, P.D, NS, table[b], h, j, sc.data() + (np + t - lo) * NS);
      }
    }
  for (int64_t t = n; t < np; ++t) offs[t] = offs[n - 1];
}

// scores (G, np), n of each row real: in place exp(score - row max), the padding -> 0; inv[g] = 1 / row sum.
// first (optional): per row, the columns before it are not its own either (rows of one sequence
// grouped, each seeing its own causal prefix: see attend()); n_of (optional): per row, its own n.
inline void softmax_numerators(float* scores, int64_t G, int64_t n, int64_t np, float* inv,
                               const int64_t* first = nullptr, const int64_t* n_of = nullptr) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * np;
    for (int64_t t = n_of ? n_of[g] : n; t < np; ++t) sg[t] = -INFINITY;
    for (int64_t t = 0; first && t < first[g]; ++t) sg[t] = -INFINITY;
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < np; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(sg + t));
    const __m256 mx = _mm256_set1_ps(hmax(m));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < np; t += 8) {
      const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(sg + t), mx));
      _mm256_storeu_ps(sg + t, p);
      sum = _mm256_add_ps(sum, p);
    }
    inv[g] = 1.0f / hsum(sum);  // the sum is >= 1: the max row contributes exp(0)
  }
}

// Query heads h*G .. h*G+G-1 of rows s .. s+R-1 against the visible K/V rows of KV head h. The R
// rows are consecutive positions of one sequence (the same block table, context lengths len,
// len + 1, ...: a speculative step's drafts, a short chunk): their R * G query heads share every K
// and V row loaded, so K/V is read once for the group, not once per row, and each row masks the
// columns past its own position (and, with a window, before its own start). A row's scores,
// maximum, sums and accumulation are the same operations in the same order as alone: the extra
// columns only add exact zeros.
// offs and buf are the calling thread's scratch, reused across its tasks.
template <typename T, typename C>
void attend(const Problem<T, C>& P, int64_t s, int64_t R, int64_t h, std::vector<int64_t>& offs, std::vector<float>& buf,
            std::vector<float>& sc) {
  const int64_t G = P.H / P.KVH, D = P.D, len = P.lens[s + R - 1], GR = G * R;
  const int64_t lo = P.window > 0 ? std::max<int64_t>(0, P.lens[s] - P.window) : 0;
  const int64_t n = len - lo, np = (n + 7) / 8 * 8;  // visible rows of the group; padded to whole vectors
  row_offsets(P, s + R - 1, h, lo, np, offs, sc);
  buf.resize(GR * np + 2 * GR * D + GR + 1 + 4 * GR);
  float* scores = buf.data();      // (GR, np)
  float* acc = scores + GR * np;   // (GR, D) unnormalized output
  float* qs = acc + GR * D;        // (GR, D) the queries, pre-scaled
  float* inv = qs + GR * D;        // (GR,) 1 / softmax denominator
  int64_t* first = reinterpret_cast<int64_t*>(inv + GR + (GR & 1));  // (GR,) each row's first column
  int64_t* n_of = first + GR;                                          // (GR,) each row's end column
  for (int64_t r = 0; r < R; ++r) {
    const int64_t lr = P.lens[s + r];
    const int64_t lo_r = P.window > 0 ? std::max<int64_t>(0, lr - P.window) : 0;
    const T* q = P.q + ((s + r) * P.H + h * G) * D;
    for (int64_t i = 0; i < G * D; ++i) qs[r * G * D + i] = static_cast<float>(q[i]) * P.scale;
    for (int64_t g = 0; g < G; ++g) {
      first[r * G + g] = lo_r - lo;
      n_of[r * G + g] = lr - lo;
    }
  }

  for (int64_t t = 0; t < np; t += 4) {  // pass 1: scores
    const C *k0 = P.k + offs[t], *k1 = P.k + offs[t + 1], *k2 = P.k + offs[t + 2], *k3 = P.k + offs[t + 3];
    if (t + PF + 4 <= np) prefetch_rows(P.k, offs.data() + t + PF, D);
    for (int64_t g = 0; g < GR; ++g) {
      const float* qg = qs + g * D;
      __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      if constexpr (std::is_same_v<C, int8_t>) {  // the 8-bit cache: each group of values times its scale
        const float* ks = sc.data() + t * P.NS;  // rows t .. t+3, NS scales each
        for (int64_t i = 0; i < P.NS; ++i) {  // each group's dot products, then times the group's scales
          __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
          for (int64_t d = i * P.G; d < (i + 1) * P.G; d += 8) {
            const __m256 x = _mm256_loadu_ps(qg + d);
            p0 = _mm256_fmadd_ps(x, load8(k0 + d), p0);
            p1 = _mm256_fmadd_ps(x, load8(k1 + d), p1);
            p2 = _mm256_fmadd_ps(x, load8(k2 + d), p2);
            p3 = _mm256_fmadd_ps(x, load8(k3 + d), p3);
          }
          c0 = _mm256_fmadd_ps(p0, _mm256_set1_ps(ks[i]), c0);
          c1 = _mm256_fmadd_ps(p1, _mm256_set1_ps(ks[P.NS + i]), c1);
          c2 = _mm256_fmadd_ps(p2, _mm256_set1_ps(ks[2 * P.NS + i]), c2);
          c3 = _mm256_fmadd_ps(p3, _mm256_set1_ps(ks[3 * P.NS + i]), c3);
        }
      } else {
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 x = _mm256_loadu_ps(qg + d);
          c0 = _mm256_fmadd_ps(x, load8(k0 + d), c0);
          c1 = _mm256_fmadd_ps(x, load8(k1 + d), c1);
          c2 = _mm256_fmadd_ps(x, load8(k2 + d), c2);
          c3 = _mm256_fmadd_ps(x, load8(k3 + d), c3);
        }
      }
      _mm_storeu_ps(scores + g * np + t, hsum4(c0, c1, c2, c3));
    }
  }

  softmax_numerators(scores, GR, n, np, inv, R > 1 ? first : nullptr, R > 1 ? n_of : nullptr);

  std::fill(acc, acc + GR * D, 0.0f);
  for (int64_t t = 0; t < np; t += 4) {  // pass 2: sum of p * v, four rows per accumulator update
    const C *v0 = P.v + offs[t], *v1 = P.v + offs[t + 1], *v2 = P.v + offs[t + 2], *v3 = P.v + offs[t + 3];
    if (t + PF + 4 <= np) prefetch_rows(P.v, offs.data() + t + PF, D);
    const float* vs = std::is_same_v<C, int8_t> ? sc.data() + (np + t) * P.NS : nullptr;  // rows t .. t+3
    for (int64_t g = 0; g < GR; ++g) {
      const float* pg = scores + g * np + t;
      float* ag = acc + g * D;
      for (int64_t i = 0; i < P.NS; ++i) {  // the 8-bit cache: each probability times the scale of the group
        __m256 p0, p1, p2, p3;
        if constexpr (std::is_same_v<C, int8_t>) {
          p0 = _mm256_set1_ps(pg[0] * vs[i]), p1 = _mm256_set1_ps(pg[1] * vs[P.NS + i]);
          p2 = _mm256_set1_ps(pg[2] * vs[2 * P.NS + i]), p3 = _mm256_set1_ps(pg[3] * vs[3 * P.NS + i]);
        } else {
          p0 = _mm256_set1_ps(pg[0]), p1 = _mm256_set1_ps(pg[1]), p2 = _mm256_set1_ps(pg[2]), p3 = _mm256_set1_ps(pg[3]);
        }
        for (int64_t d = i * P.G; d < (i + 1) * P.G; d += 8) {
          __m256 a = _mm256_loadu_ps(ag + d);
          a = _mm256_fmadd_ps(p0, load8(v0 + d), a);
          a = _mm256_fmadd_ps(p1, load8(v1 + d), a);
          a = _mm256_fmadd_ps(p2, load8(v2 + d), a);
          a = _mm256_fmadd_ps(p3, load8(v3 + d), a);
          _mm256_storeu_ps(ag + d, a);
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    T* out = P.out + ((s + r) * P.H + h * G) * D;
    const float* ar = acc + r * G * D;
    for (int64_t g = 0; g < G; ++g)  // the one rounding to T (bfloat16: nearest even, NaN kept)
      for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(ar[g * D + d] * inv[r * G + g]);
  }
}

// Rows that attend() takes together: runs of consecutive rows whose context lengths go up by one
// over the same block table (the positions of one sequence), at most kMaxGroup rows a run.
constexpr int64_t kMaxGroup = 16;
inline std::vector<std::pair<int64_t, int64_t>> row_groups(const int64_t* tables, const int64_t* lens, int64_t S,
                                                           int64_t max_blocks, int64_t bs, bool allow) {
  std::vector<std::pair<int64_t, int64_t>> groups;  // (first row, rows)
  for (int64_t s = 0; s < S;) {
    int64_t r = 1;
    while (allow && s + r < S && r < kMaxGroup && lens[s + r] == lens[s + r - 1] + 1 &&
           std::memcmp(tables + s * max_blocks, tables + (s + r) * max_blocks,
                       sizeof(int64_t) * ((lens[s + r] - 1) / bs + 1)) == 0)
      ++r;
    groups.emplace_back(s, r);
    s += r;
  }
  return groups;
}

// ---- bfloat16 with AVX512-BF16 (picked at run time; the code above is the fallback) ----------
// Same two passes, same float32 results up to summation order: q.k is VDPBF16PS over the bf16 q and
// K (each product of two bf16 is exact in float32, so this equals widening both and fusing the
// multiply-adds; the scale multiplies the finished dot product, as in the reference), and the
// output accumulators of a group of query heads stay in registers over all V rows, so nothing but
// the rows themselves moves per row. Measured: benchmarks/attention.py --dtype bfloat16.

LS_AVX512 inline __m256 half_sum(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

LS_AVX512 inline __m512 widen16(const c10::BFloat16* p) {  // 16 bf16 -> float32, exact
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

LS_AVX512 inline __m512 widen16(const int8_t* p) {  // 16 int8 -> float32, exact
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

LS_AVX512 inline __m512bh load32bh(const c10::BFloat16* p) {
  return (__m512bh)_mm512_loadu_si512(p);
}

// Query heads g0 .. g0+GN-1 of the task, dims d0 .. d0+16*NZ-1: sum over the n visible V rows of
// p[g][t] * V[t], the accumulators held in GN x NZ registers; the result (unnormalized) into acc.
// vsc (the 8-bit cache, else nullptr): row t's scales at vsc[t * NS ..], one per G values.
template <int GN, int NZ, typename C>
LS_AVX512 void pv_block(const C* v, const int64_t* offs, int64_t n, const float* scores, int64_t np,
                        int64_t g0, int64_t d0, int64_t D, float* acc, const float* vsc, int64_t G, int64_t NS) {
  __m512 a[GN][NZ];
  for (int g = 0; g < GN; ++g)
    for (int z = 0; z < NZ; ++z) a[g][z] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const C* row = v + offs[t] + d0;  // in cache: pass 1 prefetched it
    __m512 x[NZ];
    for (int z = 0; z < NZ; ++z) x[z] = widen16(row + 16 * z);
    if constexpr (std::is_same_v<C, int8_t>)
      for (int z = 0; z < NZ; ++z) x[z] = _mm512_mul_ps(x[z], _mm512_set1_ps(vsc[t * NS + (d0 + 16 * z) / G]));
    for (int g = 0; g < GN; ++g) {
      const __m512 p = _mm512_set1_ps(scores[(g0 + g) * np + t]);
      for (int z = 0; z < NZ; ++z) a[g][z] = _mm512_fmadd_ps(p, x[z], a[g][z]);
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int z = 0; z < NZ; ++z) _mm512_storeu_ps(acc + (g0 + g) * D + d0 + 16 * z, a[g][z]);
}

template <int NZ, typename C>
LS_AVX512 void pv_all(const C* v, const int64_t* offs, int64_t n, const float* scores, int64_t np,
                      int64_t G, int64_t D, float* acc, const float* vsc = nullptr, int64_t VG = 0, int64_t NS = 0) {
  for (int64_t d0 = 0; d0 < D; d0 += 16 * NZ)
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      switch (std::min<int64_t>(4, G - g0)) {
        case 1: pv_block<1, NZ>(v, offs, n, scores, np, g0, d0, D, acc, vsc, VG, NS); break;
        case 2: pv_block<2, NZ>(v, offs, n, scores, np, g0, d0, D, acc, vsc, VG, NS); break;
        case 3: pv_block<3, NZ>(v, offs, n, scores, np, g0, d0, D, acc, vsc, VG, NS); break;
        default: pv_block<4, NZ>(v, offs, n, scores, np, g0, d0, D, acc, vsc, VG, NS); break;
      }
    }
}

// attend() for bfloat16 with D % 32 == 0, on a CPU with AVX512-BF16.
LS_AVX512 void attend_bf16_avx512(const Problem<c10::BFloat16>& P, int64_t s, int64_t h, std::vector<int64_t>& offs,
                                  std::vector<float>& buf, std::vector<float>& sc) {
  using T = c10::BFloat16;
  const int64_t G = P.H / P.KVH, D = P.D, len = P.lens[s];
  const int64_t lo = P.window > 0 ? std::max<int64_t>(0, len - P.window) : 0;
  const int64_t n = len - lo, np = (n + 7) / 8 * 8;
  row_offsets(P, s, h, lo, np, offs, sc);
  buf.resize(G * np + G * D + G);
  float* scores = buf.data();    // (G, np)
  float* acc = scores + G * np;  // (G, D)
  float* inv = acc + G * D;      // (G,)
  const T* q = P.q + (s * P.H + h * G) * D;
  const __m128 scale = _mm_set1_ps(P.scale);
  for (int64_t t = 0; t + 4 <= std::min(PF, np); t += 4) {  // the rows before the loop's prefetches reach
    prefetch_rows(P.k, offs.data() + t, D);
    prefetch_rows(P.v, offs.data() + t, D);
  }

  for (int64_t t = 0; t < np; t += 4) {  // pass 1: scores, four rows at a time; K and V rows PF ahead
    const T *k0 = P.k + offs[t], *k1 = P.k + offs[t + 1], *k2 = P.k + offs[t + 2], *k3 = P.k + offs[t + 3];
    if (t + PF + 4 <= np) {  // V too: pass 2 then reads it from cache
      prefetch_rows(P.k, offs.data() + t + PF, D);
      prefetch_rows(P.v, offs.data() + t + PF, D);
    }
    for (int64_t g = 0; g < G; ++g) {
      const T* qg = q + g * D;
      __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t d = 0; d < D; d += 32) {
        const __m512bh x = load32bh(qg + d);
        c0 = _mm512_dpbf16_ps(c0, x, load32bh(k0 + d));
        c1 = _mm512_dpbf16_ps(c1, x, load32bh(k1 + d));
        c2 = _mm512_dpbf16_ps(c2, x, load32bh(k2 + d));
        c3 = _mm512_dpbf16_ps(c3, x, load32bh(k3 + d));
      }
      _mm_storeu_ps(scores + g * np + t,
                    _mm_mul_ps(hsum4(half_sum(c0), half_sum(c1), half_sum(c2), half_sum(c3)), scale));
    }
  }

  softmax_numerators(scores, G, n, np, inv);

  if (D % 64 == 0)  // pass 2: p-weighted V rows
    pv_all<4>(P.v, offs.data(), n, scores, np, G, D, acc);
  else
    pv_all<2>(P.v, offs.data(), n, scores, np, G, D, acc);
  T* out = P.out + (s * P.H + h * G) * D;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(acc[g * D + d] * inv[g]);
}

// attend() over the 8-bit cache with D % 16 == 0, on a CPU with AVX-512: the same two passes as
// attend_bf16_avx512 with the float32 queries (pre-scaled, as in attend()) against rows widened
// 16 values at a time and multiplied by their group's scale.
template <typename T>
LS_AVX512 void attend_int8_avx512(const Problem<T, int8_t>& P, int64_t s, int64_t h, std::vector<int64_t>& offs,
                                  std::vector<float>& buf, std::vector<float>& sc) {
  const int64_t G = P.H / P.KVH, D = P.D, len = P.lens[s], NS = P.NS, VG = P.G;
  const int64_t lo = P.window > 0 ? std::max<int64_t>(0, len - P.window) : 0;
  const int64_t n = len - lo, np = (n + 7) / 8 * 8;
  row_offsets(P, s, h, lo, np, offs, sc);
  buf.resize(G * np + 2 * G * D + G);
  float* scores = buf.data();    // (G, np)
  float* acc = scores + G * np;  // (G, D)
  float* qs = acc + G * D;       // (G, D) the queries, pre-scaled
  float* inv = qs + G * D;       // (G,)
  const T* q = P.q + (s * P.H + h * G) * D;
  for (int64_t i = 0; i < G * D; ++i) qs[i] = static_cast<float>(q[i]) * P.scale;
  for (int64_t t = 0; t + 4 <= std::min(PF, np); t += 4) {
    prefetch_rows(P.k, offs.data() + t, D);
    prefetch_rows(P.v, offs.data() + t, D);
  }

  for (int64_t t = 0; t < np; t += 4) {  // pass 1: scores, four rows at a time; K and V rows PF ahead
    const int8_t *k0 = P.k + offs[t], *k1 = P.k + offs[t + 1], *k2 = P.k + offs[t + 2], *k3 = P.k + offs[t + 3];
    if (t + PF + 4 <= np) {
      prefetch_rows(P.k, offs.data() + t + PF, D);
      prefetch_rows(P.v, offs.data() + t + PF, D);
    }
    const float* ks = sc.data() + t * NS;  // rows t .. t+3, NS scales each
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qs + g * D;
      __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t i = 0; i < NS; ++i) {  // each group's dot products, then times the group's scales
        __m512 p0 = _mm512_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
        for (int64_t d = i * VG; d < (i + 1) * VG; d += 16) {
          const __m512 x = _mm512_loadu_ps(qg + d);
          p0 = _mm512_fmadd_ps(x, widen16(k0 + d), p0);
          p1 = _mm512_fmadd_ps(x, widen16(k1 + d), p1);
          p2 = _mm512_fmadd_ps(x, widen16(k2 + d), p2);
          p3 = _mm512_fmadd_ps(x, widen16(k3 + d), p3);
        }
        c0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(ks[i]), c0);
        c1 = _mm512_fmadd_ps(p1, _mm512_set1_ps(ks[NS + i]), c1);
        c2 = _mm512_fmadd_ps(p2, _mm512_set1_ps(ks[2 * NS + i]), c2);
        c3 = _mm512_fmadd_ps(p3, _mm512_set1_ps(ks[3 * NS + i]), c3);
      }
      _mm_storeu_ps(scores + g * np + t, hsum4(half_sum(c0), half_sum(c1), half_sum(c2), half_sum(c3)));
    }
  }

  softmax_numerators(scores, G, n, np, inv);

  const float* vsc = sc.data() + np * NS;
  if (D % 64 == 0)  // pass 2: p-weighted V rows (a register's 16 values lie in one group: VG % 16 == 0)
    pv_all<4>(P.v, offs.data(), n, scores, np, G, D, acc, vsc, VG, NS);
  else if (D % 32 == 0)
    pv_all<2>(P.v, offs.data(), n, scores, np, G, D, acc, vsc, VG, NS);
  else
    pv_all<1>(P.v, offs.data(), n, scores, np, G, D, acc, vsc, VG, NS);
  T* out = P.out + (s * P.H + h * G) * D;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(acc[g * D + d] * inv[g]);
}

template <typename T, typename C = T>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* tables,
         const int64_t* lens, at::Tensor& out, int64_t max_blocks, int64_t window, float scale, int64_t grain) {
  const int64_t KVH = k_cache.size(2);
  const Problem<T, C> P = make_problem<T, C>(q, k_cache, v_cache, tables, lens, out, max_blocks, window, scale);
  bool wide = false;
  if constexpr (std::is_same_v<C, int8_t>)
    wide = P.D % 16 == 0 && leanserve_cpu::use_avx512_bf16();
  else if constexpr (std::is_same_v<T, c10::BFloat16>)
    wide = P.D % 32 == 0 && leanserve_cpu::use_avx512_bf16();
  // the AVX-512 paths take one row at a time
  const auto groups = row_groups(tables, lens, q.size(0), max_blocks, P.block_size, !wide);
  const int64_t NG = static_cast<int64_t>(groups.size());
  at::parallel_for(0, NG * KVH, std::max<int64_t>(1, grain * NG / std::max<int64_t>(1, q.size(0))),
                   [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> offs;
    std::vector<float> buf, sc;
    for (int64_t i = t0; i < t1; ++i) {
      const auto [s, R] = groups[i / KVH];
      if constexpr (std::is_same_v<C, int8_t>) {
        if (wide) {
          attend_int8_avx512(P, s, i % KVH, offs, buf, sc);
          continue;
        }
      } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (wide) {
          attend_bf16_avx512(P, s, i % KVH, offs, buf, sc);
          continue;
        }
      }
      attend(P, s, R, i % KVH, offs, buf, sc);
    }
  });
}

#define PA_CHECK(cond, ...) TORCH_CHECK(cond, "paged_attention_decode: ", __VA_ARGS__)

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window) {
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  PA_CHECK(q.dim() == 3 && (q.scalar_type() == at::kFloat || bf16) && q.is_cpu(),
           "q must be a (num_seqs, num_heads, head_dim) float32 or bfloat16 CPU tensor, got ", q.sizes(), " ",
           q.scalar_type());
  const bool int8 = k_cache.scalar_type() == at::kChar;  // the 8-bit cache: rows of D values and their scales
  PA_CHECK((k_cache.scalar_type() == q.scalar_type() || int8) && v_cache.scalar_type() == k_cache.scalar_type(),
           "k_cache and v_cache must both have q's dtype or both be int8 (the 8-bit cache), got q ", q.scalar_type(), ", k_cache ",
           k_cache.scalar_type(), ", v_cache ", v_cache.scalar_type());
  PA_CHECK(k_cache.dim() == 4 && k_cache.is_cpu() && k_cache.is_contiguous(),
           "k_cache must be a contiguous (num_blocks, block_size, num_kv_heads, head_dim) CPU tensor, got ",
           k_cache.sizes());
  PA_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.is_cpu() && v_cache.is_contiguous(),
           "v_cache must be contiguous of k_cache's shape ", k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), KVH = k_cache.size(2);
  PA_CHECK(k_cache.size(3) == (int8 ? kv_int8_width(D) : D), "head_dim of q (", D, ") and cache (", k_cache.size(3),
           int8 ? " bytes: head_dim and 2 per 32 for the scales" : "", ") differ");
  PA_CHECK(D > 0 && D % 8 == 0, "head_dim must be a multiple of 8, got ", D);
  PA_CHECK(KVH > 0 && H % KVH == 0, "num_heads (", H, ") must be a multiple of num_kv_heads (", KVH, ")");
  PA_CHECK(block_tables.dim() == 2 && block_tables.size(0) == S && block_tables.scalar_type() == at::kLong,
           "block_tables must be (num_seqs=", S, ", max_blocks) int64, got ", block_tables.sizes(), " ",
           block_tables.scalar_type());
  PA_CHECK(context_lens.dim() == 1 && context_lens.size(0) == S && context_lens.scalar_type() == at::kLong,
           "context_lens must be (num_seqs=", S, ",) int64, got ", context_lens.sizes(), " ", context_lens.scalar_type());
  PA_CHECK(window >= 0, "window must be >= 0 (0 = full attention), got ", window);
  const at::Tensor qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const int64_t max_blocks = tables.size(1);
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  // Every row the tasks will read must lie inside the cache: checked here, once, not per row.
  int64_t total_rows = 0;
  for (int64_t s = 0; s < S; ++s) {
    PA_CHECK(lp[s] >= 1 && lp[s] <= max_blocks * bs, "context_lens[", s, "] = ", lp[s],
             " is outside [1, max_blocks * block_size = ", max_blocks * bs, "]");
    const int64_t first = window > 0 ? std::max<int64_t>(0, lp[s] - window) : 0;
    for (int64_t b = first / bs; b <= (lp[s] - 1) / bs; ++b) {
      const int64_t id = tp[s * max_blocks + b];
      PA_CHECK(id >= 0 && id < num_blocks, "block_tables[", s, ", ", b, "] = ", id, " is not a block of the cache (",
               num_blocks, " blocks)");
    }
    total_rows += lp[s] - first;
  }
  at::Tensor out = at::empty({S, H, D}, q.options());
  // Waking a thread should pay: each one gets tasks of about 2048 K/V rows at the least.
  const int64_t grain = std::max<int64_t>(1, 2048 * S / std::max<int64_t>(1, total_rows));
  const float sc = static_cast<float>(scale);
  if (bf16 && int8)
    run<c10::BFloat16, int8_t>(qc, k_cache, v_cache, tp, lp, out, max_blocks, window, sc, grain);
  else if (bf16)
    run<c10::BFloat16>(qc, k_cache, v_cache, tp, lp, out, max_blocks, window, sc, grain);
  else if (int8)
    run<float, int8_t>(qc, k_cache, v_cache, tp, lp, out, max_blocks, window, sc, grain);
  else
    run<float>(qc, k_cache, v_cache, tp, lp, out, max_blocks, window, sc, grain);
  return out;
}

// The 8-bit cache's row of one token and KV head, G values at a time: scale = max |x| / 127 rounded
// to float16, value[d] = x[d] / scale rounded to nearest even (0 where the scale is 0 or the quotient
// is not a number), clamped to [-127, 127]. model/attention.py quantize_kv is the reference, bit for bit.
template <typename S>
void quantize_row(const S* x, int64_t D, int64_t G, int8_t* out, c10::Half* scales) {
  for (int64_t g0 = 0; g0 < D; g0 += G) {
    float amax = 0.0f;
    for (int64_t d = g0; d < g0 + G; ++d) amax = std::max(amax, std::fabs(static_cast<float>(x[d])));
    const c10::Half half_scale(amax / 127.0f);
    const float scale = static_cast<float>(half_scale);
    for (int64_t d = g0; d < g0 + G; ++d) {
      float v = scale > 0.0f ? std::nearbyint(static_cast<float>(x[d]) / scale) : 0.0f;
      v = v == v ? std::min(127.0f, std::max(-127.0f, v)) : 0.0f;
      out[d] = static_cast<int8_t>(v);
    }
    scales[g0 / G] = half_scale;
  }
}

// The new tokens' K and V rows into their cache slots: one call per layer for both, a memcpy of
// KVH * D elements per token, where two index_copy_ calls cost ~36 us each at 80 tokens; into the
// 8-bit cache, each (token, KV head) row quantized on the way.
void write_kv_(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slot_mapping) {
  PA_CHECK(k_cache.dim() == 4 && k_cache.is_cpu() && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
               v_cache.is_contiguous() && v_cache.scalar_type() == k_cache.scalar_type(),
           "write_kv_: k_cache and v_cache must be contiguous CPU tensors of one shape and dtype, got ",
           k_cache.sizes(), " and ", v_cache.sizes());
  const bool int8 = k_cache.scalar_type() == at::kChar;
  const int64_t T = slot_mapping.numel(), bs = k_cache.size(1), KVH = k_cache.size(2), W = k_cache.size(3);
  const int64_t D = int8 ? (k.dim() > 0 ? k.size(-1) : 0) : W, slots = k_cache.size(0) * bs, row = KVH * D;
  PA_CHECK(!int8 || (k.dim() == 3 && D > 0 && W == kv_int8_width(D)), "write_kv_: the 8-bit cache's rows are ",
           W, " bytes, not those of head_dim ", D, " (head_dim and 2 per 32 for the scales)");
  for (const at::Tensor* t : {&k, &v})
    PA_CHECK(t->dim() == 3 && t->size(0) == T && t->size(1) == KVH && t->size(2) == D && D > 0 &&
                 (int8 ? t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16
                       : t->scalar_type() == k_cache.scalar_type()) &&
                 t->scalar_type() == k.scalar_type() && t->stride(2) == 1 && t->stride(1) == D,
             "write_kv_: k and v must be (", T, ", ", KVH, ", ", D, ") ",
             int8 ? "float32 or bfloat16" : std::string(c10::toString(k_cache.scalar_type())),
             " with each token's heads contiguous, got ", t->sizes(), " ", t->scalar_type(), " strides ", t->strides());
  PA_CHECK(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
           "write_kv_: slot_mapping must be a contiguous 1-D int64 tensor");
  const int64_t* sp = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i)
    PA_CHECK(sp[i] >= 0 && sp[i] < slots, "write_kv_: slot_mapping[", i, "] = ", sp[i], " is outside the cache (",
             slots, " slots)");
  if (int8) {
    int8_t *kc = k_cache.data_ptr<int8_t>(), *vc = v_cache.data_ptr<int8_t>();
    const int64_t G = kv_group(D), NS = D / G;
    auto quantize = [&](auto* kp, auto* vp) {  // into the block's head-major values and scales (see Problem)
      for (int64_t i = 0; i < T; ++i) {
        const int64_t b = sp[i] / bs, j = sp[i] % bs, base = b * bs * KVH * W;
        for (int64_t h = 0; h < KVH; ++h) {
          const int64_t value = base + (h * bs + j) * D, scale = base + bs * KVH * D + (h * bs + j) * NS * 2;
          quantize_row(kp + i * k.stride(0) + h * D, D, G, kc + value, reinterpret_cast<c10::Half*>(kc + scale));
          quantize_row(vp + i * v.stride(0) + h * D, D, G, vc + value, reinterpret_cast<c10::Half*>(vc + scale));
        }
      }
    };
    if (k.scalar_type() == at::kFloat)
      quantize(k.data_ptr<float>(), v.data_ptr<float>());
    else
      quantize(k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>());
    return;
  }
  const int64_t es = k_cache.element_size();
  char *kc = static_cast<char*>(k_cache.data_ptr()), *vc = static_cast<char*>(v_cache.data_ptr());
  const char *kp = static_cast<const char*>(k.data_ptr()), *vp = static_cast<const char*>(v.data_ptr());
  for (int64_t i = 0; i < T; ++i) {
    std::memcpy(kc + sp[i] * row * es, kp + i * k.stride(0) * es, row * es);
    std::memcpy(vc + sp[i] * row * es, vp + i * v.stride(0) * es, row * es);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanserve, m) {
  m.def("paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window) -> Tensor");
  m.def("write_kv_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(leanserve, CPU, m) {
  m.impl("paged_attention_decode", &paged_attention_decode);
  m.impl("write_kv_", &write_kv_);
}
