// One-token decode steps of GPA's LLM on the CPU, fused: what torch would run as ~40 small ops per layer.
//
// At one to a few rows per step, a decoder layer's time on a CPU is mostly per-op overhead and the read
// of the KV cache, not arithmetic. decode_trunk runs every layer in one call from Python:
//   attend_decode: QK-norm + rotary embedding of the new q/k heads, the K/V write into the cache at each
//     row's own slot and position, and grouped-query attention over positions [0, pos] (so stale entries
//     beyond a row's position, left by an earlier request in the slot, are never read); with AVX512-BF16
//     and a bfloat16 cache, the products run as bf16 pairs with float32 sums;
//   add_rms_norm: the residual add and the next RMSNorm in one pass;
//   silu_mul: SwiGLU's activation over the fused gate/up output;
//   linear: torch's dense or int8 kernel, or int4_matmul (below: integer products, AVX512-VNNI; torch's int4
//     kernel without it),
//     whichever the layer's weights are.
// Math is float32 inside; activations and the cache may be float32 or bfloat16. int4_dequantize unpacks int4
// weights to bfloat16 for long prefills, where a bf16 GEMM beats the int4 product. Beside the decode step:
// snake, BiCodec's Snake activation fused for bf16 audio decoding.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#if defined(__AVX512BF16__) || defined(__AVX512VNNI__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

inline float to_f(float v) { return v; }
inline float to_f(double v) { return static_cast<float>(v); }
inline float to_f(int8_t v) { return static_cast<float>(v); }  // an int8 cache's codes (its scales apply apart)
inline float to_f(c10::BFloat16 v) {  // a shift and a bit cast, which the compiler vectorizes
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T> inline T from_f(float v) { return static_cast<T>(v); }

// exp(x) for x <= 0 (softmax after subtracting the maximum), in plain arithmetic so loops over it vectorize
// (libm's expf is a call per element): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7
// (error below 1e-8 relative), 2^n put into the exponent bits. x is clamped at -87 (e^-87 ~ 1.6e-38: nothing
// next to the maximum's weight of 1).
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln 2 split in two parts
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr int64_t kBlock = 64;  // value columns summed at once (four 16-lane registers)
constexpr int64_t kLanes = 16;  // independent partial sums: lets the compiler keep the loop in vector registers

template <typename K>
inline float dot(const float* q, const K* k, int64_t n) {
  float part[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) part[j] += q[i + j] * to_f(k[i + j]);
  for (; i < n; ++i) part[i % kLanes] += q[i] * to_f(k[i]);
  // a tree of independent adds (a running sum would be a chain of kLanes dependent adds per key)
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t j = 0; j < width; ++j) part[j] += part[j + width];
  return part[0];
}

// scores[g * n + t] = scale * q_g . key_t for G query heads (G, D) float32 over n key rows (n, D).
template <typename C>
void score_keys_loop(const float* q, int64_t G, int64_t D, const C* keys, int64_t n, float* scores, float scale,
                     float* row) {
  for (int64_t t = 0; t < n; ++t) {
    const C* k = keys + t * D;
    for (int64_t d = 0; d < D; ++d) row[d] = to_f(k[d]);  // converted once for all G heads
    for (int64_t g = 0; g < G; ++g) scores[g * n + t] = dot(q + g * D, row, D) * scale;
  }
}

template <typename C>
void score_keys(const float* q, int64_t G, int64_t D, const C* keys, int64_t n, float* scores, float scale,
                float* row) {
  score_keys_loop(q, G, D, keys, n, scores, scale, row);
}


// out (G, D) = p (G, n) @ values (n, D): the weighted sums of value rows, kBlock columns at a time (the block's
// sums stay in registers over all n rows).
template <typename C>
void weigh_values_loop(const float* p, int64_t G, int64_t D, const C* values, int64_t n, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* pg = p + g * n;
    for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
      const int64_t width = std::min(kBlock, D - d0);
      float block[kBlock] = {0.f};
      if (width == kBlock) {
        for (int64_t t = 0; t < n; ++t) {
          const C* v = values + t * D + d0;
          for (int64_t j = 0; j < kBlock; ++j) block[j] += pg[t] * to_f(v[j]);
        }
      } else {
        for (int64_t t = 0; t < n; ++t)
          for (int64_t j = 0; j < width; ++j) block[j] += pg[t] * to_f(values[t * D + d0 + j]);
      }
      for (int64_t j = 0; j < width; ++j) out[g * D + d0 + j] = block[j];
    }
  }
}

template <typename C>
void weigh_values(const float* p, int64_t G, int64_t D, const C* values, int64_t n, float* out) {
  weigh_values_loop(p, G, D, values, n, out);
}

#if defined(__AVX512F__)
inline __m512 exp_nonpositive_v(__m512 x) {  // exp_nonpositive on 16 lanes (vscalefps puts 2^n in)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// The sums of four 16-lane vectors, lane j = the sum of a_j's lanes: two rounds of interleaving adds leave each
// 128-bit lane holding (a0, a1, a2, a3) partial sums, then the four 128-bit lanes are added. ~13 instructions
// for four sums where four separate reductions take ~36.
inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512d x01 = _mm512_castps_pd(s01), x23 = _mm512_castps_pd(s23);
  const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x01, x23)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(x01, x23)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline __m128i sum4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
  const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
  const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
  const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

inline float sum_all(__m512 a) { return _mm512_reduce_add_ps(a); }
inline float sum_all(__m512i a) { return static_cast<float>(_mm512_reduce_add_epi32(a)); }
inline __m128 as_float(__m128 a) { return a; }
inline __m128 as_float(__m128i a) { return _mm_cvtepi32_ps(a); }
inline __m512 as_float(__m512 a) { return a; }
inline __m512 as_float(__m512i a) { return _mm512_cvtepi32_ps(a); }
#endif

// The vector products over one (row, K/V head) for the two cache formats that have them, as a traits type: the
// queries' form (Query), one 32-column chunk of a key or value row loaded for the product (load), the product
// accumulate (dot), and the weights' form for a pair of value rows (pair_weights). G and CH (32-column chunks per
// head) are template parameters so that the accumulators stay in registers.
#if defined(__AVX512BF16__)
inline uint32_t bf16_bits(float x) { return static_cast<uint32_t>(c10::BFloat16(x).x); }  // round to nearest even

// bfloat16: products as bf16 pairs with float32 sums (vdpbf16ps, 32 per instruction); queries and weights are
// rounded to bf16 once.
struct Bf16Products {
  using Cache = c10::BFloat16;
  using Acc = __m512;
  static constexpr int64_t kFlushPairs = 0;  // float sums need no flushing
  static Acc zero() { return _mm512_setzero_ps(); }
  static __m512i load(const Cache* src) { return _mm512_loadu_si512(src); }
  static Acc dot(Acc acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  // 32 query values as bf16, in order; the factor that turns a sum into the score (before the key's scale)
  static __m512i query(const float* src, float) {
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
  }
  static float query_factor(const float*, int64_t, float scale) { return scale; }
  static float weight_factor(const float*, int64_t) { return 1.f; }  // weights go in as they are (rounded)
  static uint32_t weight_pair(float a, float b, float) { return bf16_bits(a) | bf16_bits(b) << 16; }
};
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
inline __m512i int16_of(const int8_t* src) {  // 32 int8 widened to int16
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}

// int8 (with per-row scales, applied by the caller): rows widened to int16 meet int16 queries and weights in
// vpdpwssd (pairs of int16 products summed into int32 lanes, 32 per instruction). A query head is scaled to int16
// by its largest magnitude (relative error 1.5e-5, far below the keys' own int8 rounding), a head's weights by
// their largest; integer sums move into float32 every kFlushPairs row pairs (512 rows x 32767 x 128 < 2^31: no
// overflow whatever the weights).
struct Int8Products {
  using Cache = int8_t;
  using Acc = __m512i;
  static constexpr int64_t kFlushPairs = 256;
  static Acc zero() { return _mm512_setzero_si512(); }
  static __m512i load(const Cache* src) { return int16_of(src); }
  static Acc dot(Acc acc, __m512i a, __m512i b) { return _mm512_dpwssd_epi32(acc, a, b); }
  static __m512i query(const float* src, float factor) {  // 32 floats times factor, rounded to int16, in order
    const __m512 f = _mm512_set1_ps(factor);
    const __m256i lo = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src), f)));
    const __m256i hi = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + 16), f)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
  static float largest(const float* x, int64_t n) {
    float top = 0.f;
#pragma omp simd reduction(max : top)
    for (int64_t i = 0; i < n; ++i) top = std::max(top, std::fabs(x[i]));
    return top;
  }
  // query(src, scale_in(q)) * query_factor = q: the factor into int16, and the one back out
  static float query_factor(const float* q, int64_t D, float scale) { return largest(q, D) / 32767.f * scale; }
  static float weight_factor(const float* p, int64_t n) { return largest(p, n) / 32767.f; }
  static uint32_t weight_pair(float a, float b, float into) {
    return static_cast<uint16_t>(static_cast<int16_t>(std::nearbyint(a * into))) |
           static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(std::nearbyint(b * into)))) << 16;
  }
};
#endif

#if defined(__AVX512F__)
// scores[g * n + t] = scale * q_g . key_t (the int8 cache's key scale applied by the caller), four keys at a time
// so that one shuffle tree sums 4 accumulators.
template <typename P, int G, int CH>
void score_block(const float* q, const typename P::Cache* keys, int64_t n, float* scores, float scale) {
  constexpr int64_t D = 32 * CH;
  __m512i qv[G][CH];
  float back[G];  // the factor from a sum to the score
  for (int g = 0; g < G; ++g) {
    back[g] = P::query_factor(q + g * D, D, scale);
    const float into = back[g] > 0.f ? scale / back[g] : 0.f;
    for (int c = 0; c < CH; ++c) qv[g][c] = P::query(q + g * D + c * 32, into);
  }
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    typename P::Acc acc[4][G];
    for (int j = 0; j < 4; ++j) {
      __m512i kv[CH];
      for (int c = 0; c < CH; ++c) kv[c] = P::load(keys + (t + j) * D + c * 32);
      for (int g = 0; g < G; ++g) {
        acc[j][g] = P::zero();
        for (int c = 0; c < CH; ++c) acc[j][g] = P::dot(acc[j][g], qv[g][c], kv[c]);
      }
    }
    for (int g = 0; g < G; ++g)
      _mm_storeu_ps(scores + g * n + t,
                    _mm_mul_ps(as_float(sum4(acc[0][g], acc[1][g], acc[2][g], acc[3][g])), _mm_set1_ps(back[g])));
  }
  for (; t < n; ++t) {
    __m512i kv[CH];
    for (int c = 0; c < CH; ++c) kv[c] = P::load(keys + t * D + c * 32);
    for (int g = 0; g < G; ++g) {
      typename P::Acc acc = P::zero();
      for (int c = 0; c < CH; ++c) acc = P::dot(acc, qv[g][c], kv[c]);
      scores[g * n + t] = sum_all(acc) * back[g];
    }
  }
}

// out (G, D) = p (G, n) @ values (n, D), p >= 0: two value rows at a time, their elements interleaved into pairs
// (row t, row t + 1) that one instruction multiplies by the pair of weights. unpacklo/hi interleave within 128-bit
// lanes, so the sums come out in a fixed column order, put back when stored: lane L of `lo` holds columns
// 8L..8L+3 of its 32-column chunk, of `hi` 8L+4..8L+7. CB chunks per pass over the rows keep 2 G CB accumulators.
template <typename P, int G, int CH>
void weigh_block(const float* p, const typename P::Cache* values, int64_t n, float* out) {
  constexpr int64_t D = 32 * CH;
  constexpr int CB = G <= 2 ? CH : (CH < 2 ? CH : 2);
  const int64_t pairs = (n + 1) / 2;
  std::vector<uint32_t> w(G * pairs);
  float back[G];
  for (int g = 0; g < G; ++g) {
    const float* pg = p + g * n;
    back[g] = P::weight_factor(pg, n);
    const float into = back[g] > 0.f ? 1.f / back[g] : 0.f;
    for (int64_t i = 0; i < pairs; ++i)
      w[g * pairs + i] = P::weight_pair(pg[2 * i], 2 * i + 1 < n ? pg[2 * i + 1] : 0.f, into);
  }
  const int64_t flush = P::kFlushPairs > 0 ? P::kFlushPairs : pairs;
  for (int c0 = 0; c0 < CH; c0 += CB) {
    // the float32 sums in memory, touched once per flush: kept in registers too, they pushed the integer
    // accumulators out of theirs
    alignas(64) float lo_f[G][CB][16] = {}, hi_f[G][CB][16] = {};
    for (int64_t i0 = 0; i0 < pairs; i0 += flush) {
      const int64_t i1 = std::min(pairs, i0 + flush);
      typename P::Acc lo[G][CB], hi[G][CB];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < CB; ++c) lo[g][c] = hi[g][c] = P::zero();
      // one pass over row pairs (t, t + 1): an odd n's last row pairs with zeros, outside the loop (a branch in
      // it cost the accumulators their registers)
      auto pass = [&](int64_t i, bool pair) __attribute__((always_inline)) {
        const int64_t t = 2 * i;
#pragma GCC unroll 8
        for (int c = 0; c < CB; ++c) {
          const int64_t col = (c0 + c) * 32;
          const __m512i a = P::load(values + t * D + col);
          const __m512i b = pair ? P::load(values + (t + 1) * D + col) : _mm512_setzero_si512();
          const __m512i low = _mm512_unpacklo_epi16(a, b), high = _mm512_unpackhi_epi16(a, b);
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g) {
            const __m512i weight = _mm512_set1_epi32(static_cast<int32_t>(w[g * pairs + i]));
            lo[g][c] = P::dot(lo[g][c], weight, low);
            hi[g][c] = P::dot(hi[g][c], weight, high);
          }
        }
      };
      const int64_t full = std::min(i1, n / 2);  // pairs [i0, full) have both rows
      for (int64_t i = i0; i < full; ++i) pass(i, true);
      if (full < i1) pass(full, false);
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < CB; ++c) {
          _mm512_store_ps(lo_f[g][c], _mm512_add_ps(_mm512_load_ps(lo_f[g][c]), as_float(lo[g][c])));
          _mm512_store_ps(hi_f[g][c], _mm512_add_ps(_mm512_load_ps(hi_f[g][c]), as_float(hi[g][c])));
        }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CB; ++c) {
        alignas(64) float l[16], h[16];
        const __m512 factor = _mm512_set1_ps(back[g]);
        _mm512_store_ps(l, _mm512_mul_ps(_mm512_load_ps(lo_f[g][c]), factor));
        _mm512_store_ps(h, _mm512_mul_ps(_mm512_load_ps(hi_f[g][c]), factor));
        float* o = out + g * D + (c0 + c) * 32;
        for (int lane = 0; lane < 4; ++lane)
          for (int j = 0; j < 4; ++j) {
            o[8 * lane + j] = l[4 * lane + j];
            o[8 * lane + 4 + j] = h[4 * lane + j];
          }
      }
  }
}

// The (G, head size) pairs with vector kernels: the 0.3B model's (2, 128), GPA-nano's (5, 64), and neighbours.
#define GPA_ATTENTION_SHAPES(X) X(1, 2) X(1, 4) X(2, 2) X(2, 4) X(4, 2) X(4, 4) X(5, 2) X(5, 4)

template <typename P>
bool score_vector(const float* q, int64_t G, int64_t D, const typename P::Cache* keys, int64_t n, float* scores,
                  float scale) {
#define GPA_SCORE(g, ch) \
  if (G == g && D == 32 * ch) return score_block<P, g, ch>(q, keys, n, scores, scale), true;
  GPA_ATTENTION_SHAPES(GPA_SCORE)
#undef GPA_SCORE
  return false;
}

template <typename P>
bool weigh_vector(const float* p, int64_t G, int64_t D, const typename P::Cache* values, int64_t n, float* out) {
#define GPA_WEIGH(g, ch) \
  if (G == g && D == 32 * ch) return weigh_block<P, g, ch>(p, values, n, out), true;
  GPA_ATTENTION_SHAPES(GPA_WEIGH)
#undef GPA_WEIGH
  return false;
}
#endif

#if defined(__AVX512BF16__)
template <>
void score_keys<c10::BFloat16>(const float* q, int64_t G, int64_t D, const c10::BFloat16* keys, int64_t n,
                               float* scores, float scale, float* row) {
  if (!score_vector<Bf16Products>(q, G, D, keys, n, scores, scale))
    score_keys_loop(q, G, D, keys, n, scores, scale, row);
}

template <>
void weigh_values<c10::BFloat16>(const float* p, int64_t G, int64_t D, const c10::BFloat16* values, int64_t n,
                                 float* out) {
  if (!weigh_vector<Bf16Products>(p, G, D, values, n, out)) weigh_values_loop(p, G, D, values, n, out);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <>
void score_keys<int8_t>(const float* q, int64_t G, int64_t D, const int8_t* keys, int64_t n, float* scores,
                        float scale, float* row) {
  if (!score_vector<Int8Products>(q, G, D, keys, n, scores, scale))
    score_keys_loop(q, G, D, keys, n, scores, scale, row);
}

template <>
void weigh_values<int8_t>(const float* p, int64_t G, int64_t D, const int8_t* values, int64_t n, float* out) {
  if (!weigh_vector<Int8Products>(p, G, D, values, n, out)) weigh_values_loop(p, G, D, values, n, out);
}
#endif

// Softmax over one head's n scores in place; each score first times before[t] and each weight then times
// after[t] where given (an int8 cache's key and value scales).
inline void softmax_scaled(float* sc, int64_t n, const float* before, const float* after) {
#if defined(__AVX512F__)
  auto mask = [n](int64_t t) { return t + 16 <= n ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - t)) - 1); };
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = mask(t);
    __m512 x = _mm512_maskz_loadu_ps(m, sc + t);
    if (before) {
      x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps(m, before + t));
      _mm512_mask_storeu_ps(sc + t, m, x);
    }
    top = _mm512_mask_max_ps(top, m, top, x);
  }
  const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = mask(t);
    const __m512 e = exp_nonpositive_v(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + t), peak));
    _mm512_mask_storeu_ps(sc + t, m, e);
    total = _mm512_mask_add_ps(total, m, total, e);
  }
  const __m512 norm = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = mask(t);
    const __m512 f = after ? _mm512_mul_ps(norm, _mm512_maskz_loadu_ps(m, after + t)) : norm;
    _mm512_mask_storeu_ps(sc + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sc + t), f));
  }
#else
  if (before)
    for (int64_t t = 0; t < n; ++t) sc[t] *= before[t];
  float top = sc[0];
  for (int64_t t = 1; t < n; ++t) top = std::max(top, sc[t]);
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < n; ++t) {
    sc[t] = exp_nonpositive(sc[t] - top);
    total += sc[t];
  }
  const float norm = 1.f / total;
  for (int64_t t = 0; t < n; ++t) sc[t] *= after ? norm * after[t] : norm;
#endif
}

// n float32 values into `out` (float32 or bfloat16, rounded to nearest even).
template <typename A>
inline void store_floats(const float* src, int64_t n, A* out) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<A, c10::BFloat16>)
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) out[i] = from_f<A>(src[i]);
}

// One K or V row into the cache: float32 or bfloat16 as it is; int8 as codes round(x / scale) with
// scale = max |x| / 127 stored beside them (gpa.kv_cache.KVCache quantizes prefills by the same rule).
template <typename C>
inline void store_row(const float* x, int64_t D, C* target, float* scale) {
  if constexpr (std::is_same_v<C, int8_t>) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {  // the same arithmetic on 16 lanes (division and rounding are exact operations either way)
      __m512 big = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) big = _mm512_max_ps(big, _mm512_abs_ps(_mm512_loadu_ps(x + d)));
      const float s = _mm512_reduce_max_ps(big) / 127.f;
      *scale = s;
      const __m512 step = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
      for (int64_t d = 0; d < D; d += 16) {
        __m512 code = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + d), step),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        code = s > 0.f ? _mm512_min_ps(hi, _mm512_max_ps(lo, code)) : _mm512_setzero_ps();
        _mm_storeu_si128(reinterpret_cast<__m128i*>(target + d), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(code)));
      }
      return;
    }
#endif
    float top = 0.f;
    for (int64_t d = 0; d < D; ++d) top = std::max(top, std::fabs(x[d]));
    const float s = top / 127.f;
    *scale = s;
    for (int64_t d = 0; d < D; ++d) {
      const float code = s > 0.f ? std::nearbyint(x[d] / s) : 0.f;
      target[d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, code)));
    }
  } else {
    for (int64_t d = 0; d < D; ++d) target[d] = from_f<C>(x[d]);
  }
}

// qkv: (B, (H + 2 KV) * D); norm_w: (H + KV, D) fp32 (q_norm's weight per query head, then k_norm's);
// cos, sin: (L, D) fp32 with sin's first half negated (x * cos + roll(x, D/2) * sin);
// positions, slots: (B,) int64; k_cache, v_cache: (slots, KV, S, D); with an int8 cache k_scale, v_scale:
// (slots, KV, S) float32 (else null). Returns (B, H * D) in qkv's dtype.
template <typename A, typename C>
Tensor attend_impl(const Tensor& qkv, const Tensor& norm_w, double eps, const Tensor& cos, const Tensor& sin,
                   const Tensor& positions, const Tensor& slots, Tensor& k_cache, Tensor& v_cache, float* k_scale,
                   float* v_scale, int64_t H, int64_t KV) {
  constexpr bool kScaled = std::is_same_v<C, int8_t>;
  const int64_t B = qkv.size(0), D = k_cache.size(3), S = k_cache.size(2), G = H / KV;
  const int64_t n_slots = k_cache.size(0);
  auto out = at::empty({B, H * D}, qkv.options());
  auto q_buf = at::empty({B, H, D}, qkv.options().dtype(at::kFloat));
  const A* src = qkv.data_ptr<A>();
  const float* nw = norm_w.data_ptr<float>();
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  C* kc = k_cache.data_ptr<C>();
  C* vc = v_cache.data_ptr<C>();
  float* qb = q_buf.data_ptr<float>();
  A* dst = out.data_ptr<A>();
  const int64_t width = (H + 2 * KV) * D, half = D / 2;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < S, "position ", pos[b], " outside the KV cache's ", S);
    TORCH_CHECK(pos[b] < cos.size(0), "position ", pos[b], " outside the rotary table's ", cos.size(0));
    TORCH_CHECK(slot[b] >= 0 && slot[b] < n_slots, "slot ", slot[b], " outside the KV cache's ", n_slots);
  }

  // 1. Normalise and rotate q and k heads, write k and v into the cache.
  at::parallel_for(0, B * (H + KV), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(D), y(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (H + KV), h = task % (H + KV);
      const A* row = src + b * width + h * D;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) {
        x[d] = to_f(row[d]);
        ss += x[d] * x[d];
      }
      const float inv = 1.f / std::sqrt(ss / D + static_cast<float>(eps));
      const float* w = nw + h * D;
      for (int64_t d = 0; d < D; ++d) x[d] = x[d] * inv * w[d];
      const float* c = cs + pos[b] * D;
      const float* s = sn + pos[b] * D;
      float* rotated = h < H ? qb + (b * H + h) * D : y.data();
      for (int64_t d = 0; d < half; ++d) rotated[d] = x[d] * c[d] + x[d + half] * s[d];  // x * cos + roll(x) * sin
      for (int64_t d = half; d < D; ++d) rotated[d] = x[d] * c[d] + x[d - half] * s[d];
      if (h >= H) {  // this K/V head's key, and its values unchanged
        const int64_t at = (slot[b] * KV + (h - H)) * S + pos[b];
        store_row(y.data(), D, kc + at * D, kScaled ? k_scale + at : nullptr);
        const A* v = src + b * width + (H + KV + (h - H)) * D;
        for (int64_t d = 0; d < D; ++d) y[d] = to_f(v[d]);
        store_row(y.data(), D, vc + at * D, kScaled ? v_scale + at : nullptr);
      }
    }
  });

  // 2. Attention of each row's G query heads per K/V head over that row's positions 0..pos.
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, row(D), mixed(G * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, kvh = task % KV, n = pos[b] + 1, first = (slot[b] * KV + kvh) * S;
      const C* keys = kc + first * D;
      const C* values = vc + first * D;
      const float* q = qb + (b * H + kvh * G) * D;
      scores.resize(G * n);
      score_keys<C>(q, G, D, keys, n, scores.data(), scale, row.data());
      for (int64_t g = 0; g < G; ++g)  // an int8 cache's scales: keys' on the scores, values' on the weights
        softmax_scaled(scores.data() + g * n, n, kScaled ? k_scale + first : nullptr,
                       kScaled ? v_scale + first : nullptr);
      weigh_values<C>(scores.data(), G, D, values, n, mixed.data());
      A* o = dst + b * H * D + kvh * G * D;
      store_floats(mixed.data(), G * D, o);
    }
  });
  return out;
}

template <typename A>
Tensor attend_cache(const Tensor& qkv, const Tensor& norm_w, double eps, const Tensor& cos, const Tensor& sin,
                    const Tensor& p, const Tensor& s, Tensor& k_cache, Tensor& v_cache, float* k_scale,
                    float* v_scale, int64_t n_heads, int64_t n_kv) {
  switch (k_cache.scalar_type()) {
    case at::kBFloat16:
      return attend_impl<A, c10::BFloat16>(qkv, norm_w, eps, cos, sin, p, s, k_cache, v_cache, nullptr, nullptr,
                                           n_heads, n_kv);
    case at::kChar:
      return attend_impl<A, int8_t>(qkv, norm_w, eps, cos, sin, p, s, k_cache, v_cache, k_scale, v_scale, n_heads,
                                    n_kv);
    default:
      return attend_impl<A, float>(qkv, norm_w, eps, cos, sin, p, s, k_cache, v_cache, nullptr, nullptr, n_heads,
                                   n_kv);
  }
}

Tensor attend_decode(const Tensor& qkv, const Tensor& norm_w, double eps, const Tensor& cos, const Tensor& sin,
                     const Tensor& positions, const Tensor& slots, Tensor k_cache, Tensor v_cache,
                     const c10::optional<Tensor>& k_scale, const c10::optional<Tensor>& v_scale, int64_t n_heads,
                     int64_t n_kv) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv must be a contiguous (B, (H + 2 KV) * D) tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "the cache layer must be contiguous (slots, KV, S, D)");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "keys and values must share a dtype");
  const int64_t D = k_cache.size(3);
  TORCH_CHECK(k_cache.size(1) == n_kv && qkv.size(1) == (n_heads + 2 * n_kv) * D && n_heads % n_kv == 0,
              "qkv, cache and head counts disagree");
  TORCH_CHECK(norm_w.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
              sin.scalar_type() == at::kFloat, "norm weights and rotary tables must be float32");
  TORCH_CHECK(norm_w.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == D,
              "norm weights and rotary tables must be contiguous, rotary tables (L, D)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
              positions.numel() == qkv.size(0) && slots.numel() == qkv.size(0), "positions, slots: (B,) int64");
  const auto a = qkv.scalar_type(), c = k_cache.scalar_type();
  TORCH_CHECK(a == at::kBFloat16 || a == at::kFloat, "activations must be float32 or bfloat16");
  TORCH_CHECK(c == at::kBFloat16 || c == at::kFloat || c == at::kChar, "the cache must be float32, bfloat16 or int8");
  const bool scaled = c == at::kChar;
  TORCH_CHECK(scaled == (k_scale.has_value() && v_scale.has_value()),
              scaled ? "an int8 cache needs k_scale and v_scale" : "scales are for an int8 cache only");
  float* ks = nullptr;
  float* vs = nullptr;
  if (scaled) {
    for (const Tensor* t : {&*k_scale, &*v_scale})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 &&
                  t->size(0) == k_cache.size(0) && t->size(1) == n_kv && t->size(2) == k_cache.size(2),
                  "the int8 cache's scales must be contiguous float32 (slots, KV, S)");
    ks = k_scale->data_ptr<float>();
    vs = v_scale->data_ptr<float>();
  }
  auto p = positions.contiguous();
  auto s = slots.contiguous();
  if (a == at::kBFloat16)
    return attend_cache<c10::BFloat16>(qkv, norm_w, eps, cos, sin, p, s, k_cache, v_cache, ks, vs, n_heads, n_kv);
  return attend_cache<float>(qkv, norm_w, eps, cos, sin, p, s, k_cache, v_cache, ks, vs, n_heads, n_kv);
}

// Rows of x (..., D) float32 or bfloat16 as an int8 cache stores them (store_row's rule, which
// gpa.kv_cache.quantize_rows also states in torch): int8 codes (..., D) and float32 scales (...).
std::vector<Tensor> quantize_rows(const Tensor& x_in) {
  TORCH_CHECK(x_in.dim() >= 1 && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "quantize_rows: a float32 or bfloat16 tensor (..., D)");
  const auto x = x_in.contiguous();
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  auto codes = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto scale_shape = x.sizes().vec();
  scale_shape.pop_back();
  auto scales = at::empty(scale_shape, x.options().dtype(at::kFloat));
  int8_t* c = codes.data_ptr<int8_t>();
  float* s = scales.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "quantize_rows", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> row(D);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t d = 0; d < D; ++d) row[d] = to_f(src[r * D + d]);
        store_row(row.data(), D, c + r * D, s + r);
      }
    });
  });
  return {codes, scales};
}

// The inverse of quantize_rows as torch's attention reads an int8 cache: codes (B, KV, S, D) (rows of D
// contiguous, any other strides: a view of the cache) times scales (B, KV, S), rounded once to bfloat16;
// returns a contiguous (B, KV, S, D) tensor.
Tensor dequantize_rows(const Tensor& codes, const Tensor& scales) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 4 && codes.stride(3) == 1,
              "dequantize_rows: int8 codes (B, KV, S, D) with rows of D contiguous");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 3 && scales.sizes() == codes.sizes().slice(0, 3),
              "dequantize_rows: float32 scales (B, KV, S) matching the codes");
  const int64_t B = codes.size(0), KV = codes.size(1), S = codes.size(2), D = codes.size(3);
  auto out = at::empty(codes.sizes(), codes.options().dtype(at::kBFloat16));
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, B * KV * S, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (KV * S), h = (r / S) % KV, t = r % S;
      const int8_t* src = c + b * codes.stride(0) + h * codes.stride(1) + t * codes.stride(2);
      const float step = sc[b * scales.stride(0) + h * scales.stride(1) + t * scales.stride(2)];
      for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(src[d]) * step;
      store_floats(row.data(), D, o + r * D);
    }
  });
  return out;
}

// residual (B, C) float32 is updated in place by delta (B, C) (any float dtype, or none);
// returns rms_norm(residual) * weight in out_dtype.
template <typename Dl, typename O>
void add_norm_impl(Tensor& residual, const Tensor* delta, const Tensor& weight, double eps, Tensor& out) {
  const int64_t B = residual.size(0), C = residual.size(1);
  float* r = residual.data_ptr<float>();
  const Dl* dl = delta ? delta->data_ptr<Dl>() : nullptr;
  const float* w = weight.data_ptr<float>();
  O* o = out.data_ptr<O>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* x = r + b * C;
      float ss = 0.f;
      for (int64_t i = 0; i < C; ++i) {
        if (dl) x[i] += to_f(dl[b * C + i]);
        ss += x[i] * x[i];
      }
      const float inv = 1.f / std::sqrt(ss / C + static_cast<float>(eps));
      for (int64_t i = 0; i < C; ++i) o[b * C + i] = from_f<O>(x[i] * inv * w[i]);
    }
  });
}

Tensor add_rms_norm(Tensor residual, const c10::optional<Tensor>& delta, const Tensor& weight, double eps,
                    at::ScalarType out_dtype) {
  TORCH_CHECK(residual.dim() == 2 && residual.is_contiguous() && residual.scalar_type() == at::kFloat,
              "the residual must be a contiguous (B, C) float32 tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == residual.size(1), "weight: (C,) float32");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, "out_dtype must be float32 or bfloat16");
  auto out = at::empty_like(residual, residual.options().dtype(out_dtype));
  Tensor d;
  if (delta.has_value()) {
    d = delta->contiguous().view({residual.size(0), residual.size(1)});
    TORCH_CHECK(d.scalar_type() == at::kFloat || d.scalar_type() == at::kBFloat16, "delta: float32 or bfloat16");
  }
  const bool d_bf16 = delta.has_value() && d.scalar_type() == at::kBFloat16;
  const Tensor* dp = delta.has_value() ? &d : nullptr;
  if (out_dtype == at::kBFloat16) {
    if (d_bf16) add_norm_impl<c10::BFloat16, c10::BFloat16>(residual, dp, weight, eps, out);
    else add_norm_impl<float, c10::BFloat16>(residual, dp, weight, eps, out);
  } else {
    if (d_bf16) add_norm_impl<c10::BFloat16, float>(residual, dp, weight, eps, out);
    else add_norm_impl<float, float>(residual, dp, weight, eps, out);
  }
  return out;
}

template <typename A>
void silu_mul_impl(const Tensor& gate_up, Tensor& out) {
  const int64_t B = gate_up.size(0), I = gate_up.size(1) / 2;
  const A* x = gate_up.data_ptr<A>();
  A* o = out.data_ptr<A>();
  at::parallel_for(0, B * I, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t b = j / I, i = j % I;
      const float g = to_f(x[b * 2 * I + i]), u = to_f(x[b * 2 * I + I + i]);
      o[j] = from_f<A>(g / (1.f + std::exp(-g)) * u);
    }
  });
}

// gate_up: (B, 2 I), gate then up -> silu(gate) * up, (B, I).
Tensor silu_mul(const Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be a contiguous (B, 2 I) tensor");
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kBFloat16) silu_mul_impl<c10::BFloat16>(gate_up, out);
  else if (gate_up.scalar_type() == at::kFloat) silu_mul_impl<float>(gate_up, out);
  else TORCH_CHECK(false, "gate_up must be float32 or bfloat16");
  return out;
}

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define GPA_INT4_VNNI 1
constexpr int64_t kInt4Group = 64;

inline __m512 bf16_high_half(__m512i pairs) {  // the bf16 in each dword's high 16 bits, as float32
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline __m512 bf16_low_half(__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }

// int4 weights times a few rows in integer arithmetic (AVX512-VNNI): each row of x is quantized per group of 64
// inputs to int8 (scale sx = max |x| / 127, code = round(x / sx)), and the nibbles q (0..15) meet the codes in
// vpdpbusd, 64 exact u8 x s8 products per instruction; per group, with w = (q - 8) * scale + zero:
//   out[m, j] = sum_g sx[m, g] * scale[g, j] * Q[m, g, j] + (zero[g, j] - 8 scale[g, j]) * xsum[m, g],
//   Q[m, g, j] = sum over the group's inputs k of q[j, k] * code[m, k],  xsum[m, g] = sx[m, g] * sum of those codes,
// i.e. exactly the weights times the quantized row (xsum of x itself would leave the codes' rounding times the
// uncentred q * scale: ~2-4x the error). In torch's layout (per block of 64 rows, input k's 32 bytes hold rows j
// (low nibble) and j + 32 (high), so a 64-byte line holds inputs k and k + 1), one two-source byte permutation of lines k/k+1 and k+2/k+3 gives 16 rows'
// four inputs per 32-bit lane; masking and shifting the nibbles gives rows j and j + 32. Per 256 weights that is
// ~13 instructions against ~28 for bf16 products of the nibbles (gpa's earlier AVX512-BF16 kernel), which left
// one row's decode step bound by arithmetic at about half the memory bandwidth (0.3B, 28 layers at one row:
// 6.5 ms, ~19 GB/s). Rounding x to int8 costs ~0.6 % relative on a product (0.2 % in bf16), int4 itself ~9 %.
constexpr int64_t kRowTile = 4;  // rows of x per pass over a block: 4 x 4 int32 accumulators

template <int MT>
void int4_vnni_block(const uint8_t* block, const c10::BFloat16* sz, int64_t n, int64_t row0, int64_t groups,
                     const int8_t* xq, int64_t k, const float* sx, const float* xsum, c10::BFloat16* out) {
  alignas(64) uint8_t idx_bytes[2][64];
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 16; ++i) {
      idx_bytes[h][4 * i] = static_cast<uint8_t>(16 * h + i);            // input k: line a, byte j
      idx_bytes[h][4 * i + 1] = static_cast<uint8_t>(32 + 16 * h + i);   // k + 1: line a, byte 32 + j
      idx_bytes[h][4 * i + 2] = static_cast<uint8_t>(64 + 16 * h + i);   // k + 2: line b, byte j
      idx_bytes[h][4 * i + 3] = static_cast<uint8_t>(96 + 16 * h + i);   // k + 3: line b, byte 32 + j
    }
  const __m512i idx0 = _mm512_load_si512(idx_bytes[0]), idx1 = _mm512_load_si512(idx_bytes[1]);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  alignas(64) float tot[MT][64] = {};  // rows 0-15, 16-31 (low nibbles), 32-47, 48-63 (high)
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[MT][4];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_si512();
    const uint8_t* bytes = block + g * kInt4Group * 32;
    for (int64_t p = 0; p < kInt4Group / 4; ++p) {
      const __m512i a = _mm512_loadu_si512(bytes + p * 128), b = _mm512_loadu_si512(bytes + p * 128 + 64);
      const __m512i p0 = _mm512_permutex2var_epi8(a, idx0, b), p1 = _mm512_permutex2var_epi8(a, idx1, b);
      const __m512i w0 = _mm512_and_si512(p0, low4), w1 = _mm512_and_si512(p1, low4);
      const __m512i w2 = _mm512_and_si512(_mm512_srli_epi16(p0, 4), low4);
      const __m512i w3 = _mm512_and_si512(_mm512_srli_epi16(p1, 4), low4);
      for (int m = 0; m < MT; ++m) {
        int32_t quad;
        std::memcpy(&quad, xq + m * k + g * kInt4Group + 4 * p, sizeof(quad));
        const __m512i xv = _mm512_set1_epi32(quad);
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], w0, xv);
        acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], w1, xv);
        acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], w2, xv);
        acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], w3, xv);
      }
    }
    for (int r = 0; r < 4; ++r) {  // (scale, zero) bf16 pairs of the 16 rows
      const __m512i pairs = _mm512_loadu_si512(sz + (g * n + row0 + 16 * r) * 2);
      const __m512 scale = bf16_low_half(pairs);
      const __m512 zero = _mm512_fmadd_ps(_mm512_set1_ps(-8.f), scale, bf16_high_half(pairs));
      for (int m = 0; m < MT; ++m) {
        const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(sx[m * groups + g]));
        const __m512 offset = _mm512_mul_ps(zero, _mm512_set1_ps(xsum[m * groups + g]));
        const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][r]), step, offset);
        _mm512_store_ps(tot[m] + 16 * r, _mm512_add_ps(_mm512_load_ps(tot[m] + 16 * r), sum));
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < 4; ++r)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * n + row0 + 16 * r),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(tot[m] + 16 * r)));
}

// Rows of x quantized per group of kInt4Group inputs as int4_vnni_block reads them (store_row's int8 rule per
// group): codes (M, K) int8, scales and the groups' sums of the quantized x (M, K / kInt4Group) float32.
void quantize_groups(const c10::BFloat16* x, int64_t rows, int64_t k, int8_t* codes, float* sx, float* xsum) {
  const int64_t groups = k / kInt4Group;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float vals[kInt4Group];
      for (int64_t c = 0; c < kInt4Group; ++c) vals[c] = to_f(x[m * k + g * kInt4Group + c]);
      int8_t* group = codes + m * k + g * kInt4Group;
      store_row(vals, kInt4Group, group, sx + m * groups + g);
      int32_t total = 0;
      for (int64_t c = 0; c < kInt4Group; ++c) total += group[c];
      xsum[m * groups + g] = sx[m * groups + g] * static_cast<float>(total);  // the product is then w . x_q
    }
}

// x (M, K) bfloat16 @ an int4 layer's weights (torch's CPU packing: weight (N, K / 2) uint8, scale_zero
// (K / 64, N, 2) bfloat16) -> (M, N) bfloat16, with x quantized to int8 per group of 64 inputs and integer
// products (see int4_vnni_block).
Tensor int4_matmul(const Tensor& x_in, const Tensor& weight, const Tensor& scale_zero) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "x: (rows, in) bfloat16");
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2 && weight.is_contiguous(),
              "weight: a contiguous (out, in / 2) uint8 tensor");
  const auto x = x_in.contiguous();
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0), groups = k / kInt4Group;
  TORCH_CHECK(weight.size(1) * 2 == k && n % 64 == 0 && k % kInt4Group == 0, "int4_matmul: x is (rows, ", k,
              "), weight (", n, ", ", weight.size(1), "); out must be a multiple of 64, in of ", kInt4Group);
  TORCH_CHECK(scale_zero.scalar_type() == at::kBFloat16 && scale_zero.is_contiguous() && scale_zero.dim() == 3 &&
              scale_zero.size(0) == groups && scale_zero.size(1) == n && scale_zero.size(2) == 2,
              "scale_zero: a contiguous (in / 64, out, 2) bfloat16 tensor");
  auto out = at::empty({rows, n}, x.options());
  std::vector<int8_t> codes(rows * k);
  std::vector<float> sx(rows * groups), xsum(rows * groups);
  quantize_groups(x.data_ptr<c10::BFloat16>(), rows, k, codes.data(), sx.data(), xsum.data());
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const c10::BFloat16* sz = scale_zero.data_ptr<c10::BFloat16>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, n / 64, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const uint8_t* block = w + blk * 64 * (k / 2);
      for (int64_t m = 0; m < rows; m += kRowTile) {
        const int8_t* xm = codes.data() + m * k;
        const float* sm = sx.data() + m * groups;
        const float* xs = xsum.data() + m * groups;
        c10::BFloat16* om = o + m * n;
        switch (std::min<int64_t>(kRowTile, rows - m)) {
          case 4: int4_vnni_block<4>(block, sz, n, blk * 64, groups, xm, k, sm, xs, om); break;
          case 3: int4_vnni_block<3>(block, sz, n, blk * 64, groups, xm, k, sm, xs, om); break;
          case 2: int4_vnni_block<2>(block, sz, n, blk * 64, groups, xm, k, sm, xs, om); break;
          default: int4_vnni_block<1>(block, sz, n, blk * 64, groups, xm, k, sm, xs, om); break;
        }
      }
    }
  });
  return out;
}
#endif

// A linear layer of any of gpa's weight formats: kind 0 dense (at::linear); 1 int8 with per-row scales, its
// kernel up to `param` rows, dequantized to bf16 beyond; 2 int4 in groups of `param` inputs (int4_matmul where
// the CPU has AVX512-VNNI and VBMI, torch's kernel elsewhere).
Tensor linear(const Tensor& x, const Tensor& w, const Tensor& scales, int64_t kind, int64_t param) {
  if (kind == 2) {
#if defined(GPA_INT4_VNNI)
    if (param == kInt4Group && x.scalar_type() == at::kBFloat16) return int4_matmul(x, w, scales);
#endif
    return at::_weight_int4pack_mm_for_cpu(x, w, param, scales);
  }
  if (kind == 1) {
    if (x.size(0) <= param) return at::_weight_int8pack_mm(x, w, scales);
    return at::linear(x, w.to(at::kBFloat16) * scales.unsqueeze(1));
  }
  return at::linear(x, w);
}

// Every decoder layer for one token per row, in one call: per layer 4 linears (qkv, o, gate_up, down: weights,
// scales, kinds and params of `linear`, 4 per layer in that order), 2 norms (input, post-attention) plus the final norm at the
// end, the QK-norm weights; k_cache, v_cache: (layers, slots, KV, S, D) (int8: with k_scale, v_scale
// (layers, slots, KV, S), else None). x: (B, C) float32 embeddings, the
// residual stream (updated in place). Returns the final-norm hidden states (B, C) in act's dtype.
Tensor decode_trunk(Tensor x, const std::vector<Tensor>& weights, const std::vector<Tensor>& scales,
                    const std::vector<int64_t>& kinds, const std::vector<int64_t>& params,
                    const std::vector<Tensor>& norms,
                    const std::vector<Tensor>& qk_norms, double eps, const Tensor& cos, const Tensor& sin,
                    const Tensor& positions, const Tensor& slots, Tensor k_cache, Tensor v_cache,
                    const c10::optional<Tensor>& k_scale, const c10::optional<Tensor>& v_scale, int64_t n_heads,
                    int64_t n_kv, at::ScalarType act) {
  const int64_t layers = static_cast<int64_t>(qk_norms.size());
  TORCH_CHECK(weights.size() == 4 * qk_norms.size() && scales.size() == weights.size() &&
              kinds.size() == weights.size() && params.size() == weights.size() && norms.size() == 2 * qk_norms.size() + 1,
              "decode_trunk: 4 linears and 2 norms per layer, plus the final norm");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == layers, "the cache must be (layers, slots, KV, S, D)");
  auto h = add_rms_norm(x, c10::nullopt, norms[0], eps, act);
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t l = 4 * i;
    auto qkv = linear(h, weights[l], scales[l], kinds[l], params[l]);
    c10::optional<Tensor> ks, vs;  // an int8 cache's scales, (layers, slots, KV, S)
    if (k_scale.has_value()) ks = k_scale->select(0, i);
    if (v_scale.has_value()) vs = v_scale->select(0, i);
    auto heads = attend_decode(qkv, qk_norms[i], eps, cos, sin, positions, slots, k_cache.select(0, i),
                               v_cache.select(0, i), ks, vs, n_heads, n_kv);
    auto attn = linear(heads, weights[l + 1], scales[l + 1], kinds[l + 1], params[l + 1]);
    h = add_rms_norm(x, attn, norms[2 * i + 1], eps, act);
    auto gate_up = linear(h, weights[l + 2], scales[l + 2], kinds[l + 2], params[l + 2]);
    auto down = linear(silu_mul(gate_up), weights[l + 3], scales[l + 3], kinds[l + 3], params[l + 3]);
    h = add_rms_norm(x, down, norms[2 * i + 2], eps, act);
  }
  return h;
}

// BiCodec's Snake activation x + sin^2(alpha x) / (alpha + 1e-9), per channel alpha, fused for bfloat16 decoding:
// torch runs it as five passes with a bf16 rounding after each (~15 % of a bf16 decode); here one pass in float32
// rounded once. sin^2 y = sin^2 r for y = n pi + r, |r| <= pi / 2 (pi in two parts, so r is exact for |n| < 2^12 and
// good to float rounding far beyond); sin r by its Taylor series to r^11 (error < 6e-8). Arguments beyond
// kSnakeFast (none in practice) take std::sin; a NaN stays NaN.
constexpr float kSnakeFast = 1e5f;

inline float sin_squared(float y) {
  const float n = (y * 0.318309886183790672f + 12582912.f) - 12582912.f;  // nearest integer (1.5 * 2^23 trick)
  const float r = (y - n * 3.140625f) - n * 9.67653589793e-4f;
  const float r2 = r * r;
  float p = -2.50521084e-8f;
  p = p * r2 + 2.75573192e-6f;
  p = p * r2 - 1.98412698e-4f;
  p = p * r2 + 8.33333333e-3f;
  p = p * r2 - 1.66666667e-1f;
  p = p * r2 + 1.f;
  const float sr = r * p;
  return sr * sr;
}

inline uint16_t round_bf16(float v) {  // round to nearest even (finite values), as c10::BFloat16 does
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// x: (B, C, T) bfloat16, alpha: C values (any float dtype) -> (B, C, T) bfloat16.
Tensor snake(const Tensor& x_in, const Tensor& alpha_in) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.scalar_type() == at::kBFloat16, "snake: x must be (B, C, T) bfloat16");
  const auto x = x_in.contiguous();
  const int64_t channels = x.size(1), t = x.size(2);
  const auto alpha = alpha_in.reshape(-1).to(at::kFloat).contiguous();
  TORCH_CHECK(alpha.numel() == channels, "snake: ", alpha.numel(), " alphas for ", channels, " channels");
  auto out = at::empty_like(x);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const float* a = alpha.data_ptr<float>();
  at::parallel_for(0, x.size(0) * channels, std::max<int64_t>(1, 16384 / std::max<int64_t>(t, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float al = a[row % channels], inv = 1.f / (al + 1e-9f);
      const uint16_t* xr = src + row * t;
      uint16_t* yr = dst + row * t;
      int beyond = 0;  // an integer flag: a float max reduction would not vectorize
      for (int64_t i = 0; i < t; ++i) {
        const uint32_t bits = static_cast<uint32_t>(xr[i]) << 16;
        float v;
        std::memcpy(&v, &bits, sizeof(v));
        const float y = al * v;
        beyond |= std::fabs(y) > kSnakeFast;
        yr[i] = round_bf16(v + inv * sin_squared(y));
      }
      if (beyond) {
        for (int64_t i = 0; i < t; ++i) {
          const float v = to_f(c10::BFloat16(xr[i], c10::BFloat16::from_bits()));
          const float sv = std::sin(al * v);
          yr[i] = round_bf16(v + inv * sv * sv);
        }
      }
    }
  });
  return out;
}

#if defined(__AVX512BF16__)
#define GPA_FLASH_BF16 1

// Causal grouped-query attention over a prefill's T queries, flash style with AVX512-BF16: torch's float32
// flash kernel runs at ~85 GFLOP/s here (0.5 s of a 10 s ASR prompt's 629-token prefill on the 0.3B model).
// Per (row, K/V head, tile of 16 query positions): key blocks of 16 are packed as bf16 pairs along the head
// dimension (lanes = keys) for the scores, and along keys (lanes = head dims) for the values, so both products
// are vdpbf16ps with one operand broadcast; softmax runs online in float32 (running max and sum per query).
// Queries and probabilities are rounded to bf16 once, as the decode kernel does for its queries.
constexpr int64_t kTile = 16;
constexpr int kGroup = 4;  // queries per key block at once in the flash kernel


template <typename C>
inline uint16_t bf16_of(C v) {
  return round_bf16(to_f(v));
}

// The keys and values of one (row, K/V head), packed once for every query tile, per block of 16 keys: keys as
// kp[p * 16 + j] = (k[s0 + j][2p], k[s0 + j][2p + 1]) (lanes = keys), values as vp[sp * D + d] = (v[s0 + 2sp][d],
// v[s0 + 2sp + 1][d]) (lanes = head dims); bf16 pairs in 32 bits, zero past the last key.
template <typename C>
void pack_block(const C* keys, const C* values, int64_t D, int64_t s0, int64_t ns, uint32_t* kp, uint32_t* vp) {
  for (int64_t j = 0; j < kTile; ++j)
    for (int64_t p = 0; p < D / 2; ++p)
      kp[p * kTile + j] = j < ns ? (static_cast<uint32_t>(bf16_of(keys[(s0 + j) * D + 2 * p])) |
                                    (static_cast<uint32_t>(bf16_of(keys[(s0 + j) * D + 2 * p + 1])) << 16)) : 0u;
  for (int64_t sp = 0; sp < kTile / 2; ++sp)
    for (int64_t d = 0; d < D; ++d) {
      const uint32_t lo = 2 * sp < ns ? bf16_of(values[(s0 + 2 * sp) * D + d]) : 0u;
      const uint32_t hi = 2 * sp + 1 < ns ? bf16_of(values[(s0 + 2 * sp + 1) * D + d]) : 0u;
      vp[sp * D + d] = lo | (hi << 16);
    }
}

// One (row, K/V head, query tile): G heads x up to 16 positions [t0, t1), keys [0, offset + t] each, from the
// packed blocks (kpack, vpack: D * 8 words per block each). q rows and out rows are D contiguous values.
// One key block for NG queries at once (their key and value loads shared; NG independent chains hide the
// latency of each query's scores -> max -> exp -> weighted values): qi[j] the query's bf16 pairs, visible[j] >= 1
// the keys of the block it sees, acc[j] its D float32 sums, run_max/run_sum[j] its online softmax state.
template <int CHUNKS, int NG>
inline void flash_block(const uint32_t* const* qi, const int64_t* visible, const uint32_t* kp, const uint32_t* vp,
                        float scale, float* const* acc, float* run_max, float* run_sum) {
  constexpr int64_t D = 16 * CHUNKS, pairs = D / 2;
  __m512 part[NG][4];  // independent sums: one chain of D / 2 dependent vdpbf16ps would wait on its latency
  for (int j = 0; j < NG; ++j)
    for (int u = 0; u < 4; ++u) part[j][u] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < pairs; p0 += 4)  // pairs is a multiple of 16
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512bh keys = (__m512bh)_mm512_loadu_si512(kp + (p0 + u) * kTile);
#pragma GCC unroll 4
      for (int j = 0; j < NG; ++j)
        part[j][u] = _mm512_dpbf16_ps(part[j][u], keys,
                                      (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(qi[j][p0 + u])));
    }
  alignas(64) uint32_t pp[NG][kTile / 2];  // probabilities as bf16 pairs (keys 2sp, 2sp + 1)
  __m512 corr[NG];
  for (int j = 0; j < NG; ++j) {
    const __mmask16 seen = visible[j] >= kTile ? static_cast<__mmask16>(0xFFFF)
                                               : static_cast<__mmask16>((1u << visible[j]) - 1u);
    __m512 sc = _mm512_add_ps(_mm512_add_ps(part[j][0], part[j][1]), _mm512_add_ps(part[j][2], part[j][3]));
    sc = _mm512_mask_blend_ps(seen, _mm512_set1_ps(-INFINITY), _mm512_mul_ps(sc, _mm512_set1_ps(scale)));
    const float new_max = std::max(run_max[j], _mm512_reduce_max_ps(sc));
    const float correction = run_max[j] == -INFINITY ? 0.f : std::exp(run_max[j] - new_max);
    const __m512 e = _mm512_maskz_mov_ps(seen, exp_nonpositive_v(_mm512_sub_ps(sc, _mm512_set1_ps(new_max))));
    run_sum[j] = run_sum[j] * correction + _mm512_reduce_add_ps(e);
    run_max[j] = new_max;
    _mm256_store_si256(reinterpret_cast<__m256i*>(pp[j]), (__m256i)_mm512_cvtneps_pbh(e));  // lanes in order
    corr[j] = _mm512_set1_ps(correction);
  }
  for (int c = 0; c < CHUNKS; ++c) {  // 16 output dims at a time
    __m512 o[NG];
    for (int j = 0; j < NG; ++j) o[j] = _mm512_mul_ps(_mm512_loadu_ps(acc[j] + 16 * c), corr[j]);
    for (int64_t sp = 0; sp < kTile / 2; ++sp) {  // value pair row sp
      const __m512bh vals = (__m512bh)_mm512_loadu_si512(vp + sp * D + 16 * c);
      for (int j = 0; j < NG; ++j)
        o[j] = _mm512_dpbf16_ps(o[j], vals, (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pp[j][sp])));
    }
    for (int j = 0; j < NG; ++j) _mm512_storeu_ps(acc[j] + 16 * c, o[j]);
  }
}

// flash_block over kSpan key blocks at once that every one of the NG queries sees in full (the bulk of a long
// prefill, away from the causal frontier): the online softmax's reductions and correction run once per 64 keys
// instead of once per 16, the NG x kSpan score sums are independent chains, and the weighted values accumulate
// in two sets per query (even and odd value pair rows) so that their chains are half as long.
constexpr int kSpan = 4;

template <int CHUNKS, int NG>
inline void flash_span(const uint32_t* const* qi, const uint32_t* kp, const uint32_t* vp, float scale,
                       float* const* acc, float* run_max, float* run_sum) {
  constexpr int64_t D = 16 * CHUNKS, pairs = D / 2, block_words = D * kTile / 2;
  __m512 sc[NG][kSpan];
  for (int j = 0; j < NG; ++j)
    for (int b = 0; b < kSpan; ++b) sc[j][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i q[NG];
#pragma GCC unroll 4
    for (int j = 0; j < NG; ++j) q[j] = _mm512_set1_epi32(static_cast<int32_t>(qi[j][p]));
#pragma GCC unroll 4
    for (int b = 0; b < kSpan; ++b) {
      const __m512bh keys = (__m512bh)_mm512_loadu_si512(kp + b * block_words + p * kTile);
#pragma GCC unroll 4
      for (int j = 0; j < NG; ++j) sc[j][b] = _mm512_dpbf16_ps(sc[j][b], keys, (__m512bh)q[j]);
    }
  }
  alignas(64) uint32_t pp[NG][kSpan * kTile / 2];  // probabilities as bf16 pairs (keys 2sp, 2sp + 1 of the span)
  __m512 corr[NG];
  const __m512 factor = _mm512_set1_ps(scale);
#pragma GCC unroll 4
  for (int j = 0; j < NG; ++j) {
    __m512 x[kSpan];  // the scores, scaled (sc is only read here: written back, it lost its registers)
    __m512 top = x[0] = _mm512_mul_ps(sc[j][0], factor);
#pragma GCC unroll 4
    for (int b = 1; b < kSpan; ++b) {
      x[b] = _mm512_mul_ps(sc[j][b], factor);
      top = _mm512_max_ps(top, x[b]);
    }
    const float new_max = std::max(run_max[j], _mm512_reduce_max_ps(top));
    const float correction = run_max[j] == -INFINITY ? 0.f : std::exp(run_max[j] - new_max);
    __m512 total = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int b = 0; b < kSpan; ++b) {
      const __m512 e = exp_nonpositive_v(_mm512_sub_ps(x[b], _mm512_set1_ps(new_max)));
      total = _mm512_add_ps(total, e);
      _mm256_store_si256(reinterpret_cast<__m256i*>(pp[j] + b * kTile / 2), (__m256i)_mm512_cvtneps_pbh(e));
    }
    run_sum[j] = run_sum[j] * correction + _mm512_reduce_add_ps(total);
    run_max[j] = new_max;
    corr[j] = _mm512_set1_ps(correction);
  }
  for (int c = 0; c < CHUNKS; ++c) {  // 16 output dims at a time
    __m512 even[NG], odd[NG];
    for (int j = 0; j < NG; ++j) {
      even[j] = _mm512_mul_ps(_mm512_loadu_ps(acc[j] + 16 * c), corr[j]);
      odd[j] = _mm512_setzero_ps();
    }
    for (int b = 0; b < kSpan; ++b)
      for (int64_t sp = 0; sp < kTile / 2; sp += 2) {  // value pair rows sp (even) and sp + 1 (odd) of block b
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vp + b * block_words + sp * D + 16 * c);
        const __m512bh v1 = (__m512bh)_mm512_loadu_si512(vp + b * block_words + (sp + 1) * D + 16 * c);
        const int64_t at = b * kTile / 2 + sp;
        for (int j = 0; j < NG; ++j) {
          even[j] = _mm512_dpbf16_ps(even[j], v0, (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pp[j][at])));
          odd[j] = _mm512_dpbf16_ps(odd[j], v1, (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pp[j][at + 1])));
        }
      }
    for (int j = 0; j < NG; ++j) _mm512_storeu_ps(acc[j] + 16 * c, _mm512_add_ps(even[j], odd[j]));
  }
}

// Which keys a query sees: the query at position p (= offset + its index) sees keys [0, end(p)): p + 1 (causal),
// the end of p's block of `block` positions (block-causal: causal, plus everything in its own block; GLM's
// tokenizer), or all S keys (block < 0: no mask; wav2vec2). end(p) never decreases with p.
struct Visibility {
  int64_t offset, block, keys;
  int64_t end(int64_t p) const {
    if (block < 0) return keys;
    if (block == 0) return p + 1;
    return std::min(keys, (p / block + 1) * block);
  }
};

template <typename Q, int CHUNKS>
void flash_tile(const Q* q, int64_t q_tstride, int64_t q_hstride, const uint32_t* kpack, const uint32_t* vpack,
                int64_t G, int64_t t0, int64_t t1, const Visibility& vis, float scale, Q* out, int64_t o_tstride,
                int64_t o_hstride) {
  constexpr int64_t D = 16 * CHUNKS, pairs = D / 2, block_words = D * kTile / 2;
  const int64_t nq = (t1 - t0) * G;  // query i: position t0 + i / G, head i % G
  std::vector<uint32_t> qp(nq * pairs);  // each query as bf16 pairs (d, d + 1)
  std::vector<float> acc(nq * D, 0.f), run_max(nq, -INFINITY), run_sum(nq, 0.f);
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const Q* src = q + t * q_tstride + g * q_hstride;
      uint32_t* dst = qp.data() + ((t - t0) * G + g) * pairs;
      for (int64_t p = 0; p < pairs; ++p)
        dst[p] = static_cast<uint32_t>(bf16_of(src[2 * p])) | (static_cast<uint32_t>(bf16_of(src[2 * p + 1])) << 16);
    }
  const int64_t last_key = vis.end(vis.offset + t1 - 1) - 1;  // the tile's last query sees keys up to here
  const int64_t all_see = vis.end(vis.offset + t0);  // keys [0, all_see) are visible to every query of the tile
  int64_t s0 = 0;
  for (; s0 + kSpan * kTile <= all_see; s0 += kSpan * kTile) {
    const uint32_t* kp = kpack + (s0 / kTile) * block_words;
    const uint32_t* vp = vpack + (s0 / kTile) * block_words;
    int64_t i = 0;
    for (; i + kGroup <= nq; i += kGroup) {
      const uint32_t* qi[kGroup];
      float* ai[kGroup];
      for (int n = 0; n < kGroup; ++n) {
        qi[n] = qp.data() + (i + n) * pairs;
        ai[n] = acc.data() + (i + n) * D;
      }
      flash_span<CHUNKS, kGroup>(qi, kp, vp, scale, ai, run_max.data() + i, run_sum.data() + i);
    }
    for (; i < nq; ++i) {
      const uint32_t* qi[1] = {qp.data() + i * pairs};
      float* ai[1] = {acc.data() + i * D};
      flash_span<CHUNKS, 1>(qi, kp, vp, scale, ai, run_max.data() + i, run_sum.data() + i);
    }
  }
  for (; s0 <= last_key; s0 += kTile) {  // the causal frontier, block by block
    const uint32_t* kp = kpack + (s0 / kTile) * block_words;
    const uint32_t* vp = vpack + (s0 / kTile) * block_words;
    int64_t i = 0;
    while (i < nq) {  // up to kGroup queries at once: those of them that see keys of this block
      int64_t visible[kGroup];
      const uint32_t* qi[kGroup];
      float* ai[kGroup];
      int n = 0;
      for (; n < kGroup && i + n < nq; ++n) {
        visible[n] = vis.end(vis.offset + t0 + (i + n) / G) - s0;
        if (visible[n] <= 0) break;
        qi[n] = qp.data() + (i + n) * pairs;
        ai[n] = acc.data() + (i + n) * D;
      }
      float* m = run_max.data() + i;
      float* l = run_sum.data() + i;
      if (n == 4) flash_block<CHUNKS, 4>(qi, visible, kp, vp, scale, ai, m, l);
      else if (n == 3) flash_block<CHUNKS, 3>(qi, visible, kp, vp, scale, ai, m, l);
      else if (n == 2) flash_block<CHUNKS, 2>(qi, visible, kp, vp, scale, ai, m, l);
      else if (n == 1) flash_block<CHUNKS, 1>(qi, visible, kp, vp, scale, ai, m, l);
      i += std::max(n, 1);  // n == 0: query i sees none of this block (it comes later in the tile)
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t t = t0 + i / G, g = i % G;
    const float inv = 1.f / run_sum[i];
    Q* dst = out + t * o_tstride + g * o_hstride;
    for (int64_t d = 0; d < D; ++d) dst[d] = from_f<Q>(acc[i * D + d] * inv);
  }
}

// flash_tile for D = 128, 64 or 32.
template <typename Q>
void run_flash_tile(int64_t D, const Q* q, int64_t q_tstride, int64_t q_hstride, const uint32_t* kpack,
                    const uint32_t* vpack, int64_t G, int64_t t0, int64_t t1, const Visibility& vis, float scale,
                    Q* out, int64_t o_tstride, int64_t o_hstride) {
  if (D == 128)
    flash_tile<Q, 8>(q, q_tstride, q_hstride, kpack, vpack, G, t0, t1, vis, scale, out, o_tstride, o_hstride);
  else if (D == 64)
    flash_tile<Q, 4>(q, q_tstride, q_hstride, kpack, vpack, G, t0, t1, vis, scale, out, o_tstride, o_hstride);
  else
    flash_tile<Q, 2>(q, q_tstride, q_hstride, kpack, vpack, G, t0, t1, vis, scale, out, o_tstride, o_hstride);
}

// q: (B, T, H, D) float32 or bfloat16 (any strides, D contiguous); k, v: (B, KV, S, D) with S >= T, rows of D
// contiguous and positions D apart (a view of the KV cache); query t sits at position S - T + t and sees keys as
// `block` says (Visibility: 0 causal, > 0 block-causal, < 0 all). Returns (B, T, H, D) contiguous in q's dtype.
Tensor prefill_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t block) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prefill_attention: q (B, T, H, D), k and v (B, KV, S, D)");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), KV = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && S >= T && H % KV == 0 &&
              (D == 32 || D == 64 || D == 128),
              "prefill_attention: shapes q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == D && v.stride(2) == D &&
              k.strides() == v.strides(), "prefill_attention: rows of D contiguous, positions D apart");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "prefill_attention: k and v of one dtype");
  const int64_t G = H / KV, tiles = (T + kTile - 1) / kTile, blocks = (S + kTile - 1) / kTile;
  const int64_t block_words = D * kTile / 2;
  auto out = at::empty({B, T, H, D}, q.options());
  std::vector<uint32_t> kpack(B * KV * blocks * block_words), vpack(kpack.size());
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const Visibility vis{S - T, block, S};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, k.scalar_type(), "prefill_attention_kv", [&] {
    const scalar_t* kd = k.data_ptr<scalar_t>();
    const scalar_t* vd = v.data_ptr<scalar_t>();
    at::parallel_for(0, B * KV * blocks, 4, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / blocks, blk = task % blocks, b = bh / KV, h = bh % KV;
        const int64_t base = b * k.stride(0) + h * k.stride(1);
        pack_block(kd + base, vd + base, D, blk * kTile, std::min<int64_t>(kTile, S - blk * kTile),
                   kpack.data() + task * block_words, vpack.data() + task * block_words);
      }
    });
  });
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "prefill_attention_q", [&] {
    const scalar_t* qd = q.data_ptr<scalar_t>();
    scalar_t* od = out.data_ptr<scalar_t>();
    // largest tiles first: causal tiles near the end see the most keys
    at::parallel_for(0, B * KV * tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / tiles, b = bh / KV, h = bh % KV, tile = tiles - 1 - task % tiles;
        const int64_t t0 = tile * kTile, t1 = std::min(T, t0 + kTile);
        const scalar_t* qt = qd + b * q.stride(0) + h * G * q.stride(2);
        const uint32_t* kt = kpack.data() + bh * blocks * block_words;
        const uint32_t* vt = vpack.data() + bh * blocks * block_words;
        scalar_t* ot = od + ((b * T) * H + h * G) * D;
        run_flash_tile(D, qt, q.stride(1), q.stride(2), kt, vt, G, t0, t1, vis, scale, ot, H * D, D);
      }
    });
  });
  return out;
}
#endif

// The (out, in) bfloat16 weights of an int4 layer: (q - 8) * scale + zero per group of `group` inputs, unpacked
// from torch's CPU int4 layout (per block of 64 rows, input k's 32 bytes hold rows j (low nibble) and j + 32
// (high), j < 32); computed in float32, rounded once. weight: (out, in / 2) uint8; scale_zero: (in / group, out, 2).
Tensor int4_dequantize(const Tensor& weight, const Tensor& scale_zero, int64_t group) {
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2 && weight.is_contiguous(),
              "weight: a contiguous (out, in / 2) uint8 tensor");
  const int64_t n = weight.size(0), k = weight.size(1) * 2;
  TORCH_CHECK(n % 64 == 0 && group > 0 && k % group == 0, "rows must come in blocks of 64, inputs in groups");
  TORCH_CHECK(scale_zero.dim() == 3 && scale_zero.size(0) == k / group && scale_zero.size(1) == n &&
              scale_zero.size(2) == 2, "scale_zero: (in / group, out, 2)");
  auto sz = scale_zero.to(at::kFloat).contiguous();
  auto out = at::empty({n, k}, weight.options().dtype(at::kBFloat16));
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const float* s = sz.data_ptr<float>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  // One block of 64 rows and one group of columns at a time: the block's bytes for a column are contiguous (32),
  // the values go to a float tile in L1, then each row's group of columns is rounded and stored contiguously.
  at::parallel_for(0, n / 64, 1, [&](int64_t begin, int64_t end) {
    float scale[64], zero[64];
    std::vector<float> tile(64 * group);
    for (int64_t blk = begin; blk < end; ++blk) {
      const uint8_t* bytes = w + blk * 64 * (k / 2);
      uint16_t* rows = reinterpret_cast<uint16_t*>(o + blk * 64 * k);
      for (int64_t g = 0; g < k / group; ++g) {
        for (int64_t j = 0; j < 64; ++j) {
          scale[j] = s[(g * n + blk * 64 + j) * 2];
          zero[j] = s[(g * n + blk * 64 + j) * 2 + 1] - 8.f * scale[j];
        }
        for (int64_t c = 0; c < group; ++c) {
          const uint8_t* col = bytes + (g * group + c) * 32;
          for (int64_t j = 0; j < 32; ++j) {
            tile[j * group + c] = static_cast<float>(col[j] & 0xF) * scale[j] + zero[j];
            tile[(j + 32) * group + c] = static_cast<float>(col[j] >> 4) * scale[j + 32] + zero[j + 32];
          }
        }
        for (int64_t j = 0; j < 64; ++j) {
          uint16_t* dst_row = rows + j * k + g * group;
          const float* src_row = tile.data() + j * group;
          for (int64_t c = 0; c < group; ++c) dst_row[c] = round_bf16(src_row[c]);
        }
      }
    }
  });
  return out;
}

// A linear layer in int8 arithmetic: rows of x (M, K) float32 or bfloat16 quantized as quantize_rows does (per
// row: code = round(x / scale), scale = max |x| / 127), times int8 weights wt (K, N) (a column per output, each with
// its float32 scale in w_scale (N,)) in torch's int8 GEMM (exact int32 sums: VNNI, twice bf16's rate here), each sum
// then scaled by its row's and column's scales, plus bias (N,) float32 when given. Returns (M, N) in out_dtype
// (float32 or bfloat16; default x's dtype).
Tensor int8_linear(const Tensor& x_in, const Tensor& wt, const Tensor& w_scale, const c10::optional<Tensor>& bias,
                   c10::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x_in.dim() == 2 && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "int8_linear: x must be (M, K) float32 or bfloat16");
  TORCH_CHECK(wt.scalar_type() == at::kChar && wt.dim() == 2 && wt.size(0) == x_in.size(1),
              "int8_linear: wt must be int8 (K, N) with K = x.size(1)");
  const int64_t M = x_in.size(0), N = wt.size(1);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 && w_scale.size(0) == N &&
              w_scale.is_contiguous(), "int8_linear: w_scale must be contiguous float32 (N,)");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                "int8_linear: bias must be contiguous float32 (N,)");
    b = bias->data_ptr<float>();
  }
  const auto dtype = out_dtype.value_or(x_in.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int8_linear: out_dtype must be float32 or bfloat16");
  auto out = at::empty({M, N}, x_in.options().dtype(dtype));
  if (M == 0) return out;
  const auto quantized = quantize_rows(x_in);
  const auto sums = at::_int_mm(quantized[0], wt).contiguous();  // (M, N) int32
  const int32_t* acc = sums.data_ptr<int32_t>();
  const float* xs = quantized[1].data_ptr<float>();
  const float* ws = w_scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "int8_linear", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> row(N);
      for (int64_t m = begin; m < end; ++m) {
        const int32_t* a = acc + m * N;
        const float s = xs[m];
        for (int64_t n = 0; n < N; ++n) row[n] = static_cast<float>(a[n]) * (s * ws[n]);
        if (b)  // a second pass: the product rounded before the bias is added (no fused multiply-add)
          for (int64_t n = 0; n < N; ++n) row[n] += b[n];
        store_floats(row.data(), N, o + m * N);
      }
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend_decode", &attend_decode, "QK-norm, RoPE, KV write and attention for one token per row");
  m.def("decode_trunk", &decode_trunk, "every decoder layer for one token per row");
#if defined(GPA_INT4_VNNI)
  m.def("int4_matmul", &int4_matmul, "bfloat16 rows (int8 per 64 inputs) times an int4 layer's weights (VNNI)");
#endif
#if defined(GPA_FLASH_BF16)
  m.def("prefill_attention", &prefill_attention, "grouped-query attention of a prefill (AVX512-BF16)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("block") = 0);
#endif
  m.def("snake", &snake, "BiCodec's Snake activation on bfloat16 (B, C, T)");
  m.def("quantize_rows", &quantize_rows, "rows (..., D) as an int8 KV cache stores them: codes and scales");
  m.def("dequantize_rows", &dequantize_rows, "an int8 KV cache view read back as bfloat16");
  m.def("int4_dequantize", &int4_dequantize, "an int4 layer's weights as bfloat16 (out, in)");
  m.def("int8_linear", &int8_linear, "rows quantized to int8 times int8 weights (K, N), scaled, plus bias",
        py::arg("x"), py::arg("wt"), py::arg("w_scale"), py::arg("bias") = py::none(),
        py::arg("out_dtype") = py::none());
}
