// AVX-512 GEMV inner loops (F/BW/VL/DQ, VBMI2 for the 16-bit expand-loads).
//
// This file is compiled with AVX-512 flags (CMakeLists.txt) and only entered after the CPU check
// in cpu_features.cpp. Everything but the table accessor has internal linkage and no std template
// is instantiated here, so no function built for AVX-512 can be merged by the linker into code
// that runs on older CPUs.
// GCC 12's AVX-512 headers initialise their "undefined" vectors from themselves, which
// -Wuninitialized reports at every inlined use (fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

#include "gemv_isa.h"

namespace duogpt::cpu {
namespace avx512 {
namespace {

// A zeroed register the compiler cannot fold into a zero-masking instruction. Zen 4 executes
// zero-masked VPEXPANDW / VEXPANDPS as a merge, i.e. with a dependency on the old destination;
// in a loop that chains every word's expand to the previous word's convert and FMA (17 cycles a
// word instead of 6 measured on EPYC Zen 4). Merging into a fresh zero idiom breaks the chain.
inline __m512i fresh_zero() {
  __m512i z;
  asm volatile("vpxord %0, %0, %0" : "=v"(z));
  return z;
}

// Weight loads by value type: 16 contiguous values widened to fp32 (dense), and the expansion of
// the packed non-zeros of one bitmap word into 32 rows (spMspV). Masked loads and expand-loads
// do not fault on the elements they do not read, so no tail needs a scalar path.
struct F32 {
  using T = float;
  static __m512 load16(const T* p) { return _mm512_loadu_ps(p); }
  static __m512 load16(const T* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  static const T* expand32(const T* v, uint32_t m, __m512& w0, __m512& w1) {
    const auto lo = static_cast<__mmask16>(m), hi = static_cast<__mmask16>(m >> 16);
    w0 = _mm512_mask_expandloadu_ps(_mm512_castsi512_ps(fresh_zero()), lo, v);
    v += _mm_popcnt_u32(lo);
    w1 = _mm512_mask_expandloadu_ps(_mm512_castsi512_ps(fresh_zero()), hi, v);
    return v + _mm_popcnt_u32(hi);
  }
};

struct F16 {
  using T = uint16_t;
  static __m512 load16(const T* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 load16(const T* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
  static const T* expand32(const T* v, uint32_t m, __m512& w0, __m512& w1) {
    const __m512i h = _mm512_mask_expandloadu_epi16(fresh_zero(), m, v);
    w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    w1 = _mm512_cvtph_ps(_mm512_extracti32x8_epi32(h, 1));
    return v + _mm_popcnt_u32(m);
  }
};

struct BF16 {
  using T = uint16_t;
  // bfloat16 is the top half of a float32: widen and shift into place.
  static __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static __m512 load16(const T* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 load16(const T* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
  static const T* expand32(const T* v, uint32_t m, __m512& w0, __m512& w1) {
    const __m512i h = _mm512_mask_expandloadu_epi16(fresh_zero(), m, v);
    w0 = widen(_mm512_castsi512_si256(h));
    w1 = widen(_mm512_extracti32x8_epi32(h, 1));
    return v + _mm_popcnt_u32(m);
  }
};

// ---- spMspV: one input channel into b accumulator rows ----------------------------------------

// The FMAs are masked by the bitmap word, so a non-finite x[t] reaches only the rows whose weight
// is non-zero (x * 0 would be NaN in the others), exactly as the format's semantics require.
template <typename V, int B>
void accumulate_tokens(const uint32_t* words, int64_t nwords, const typename V::T* v,
                       const float* x, float* acc, int64_t ld) {
  __m512 xb[B];
  for (int t = 0; t < B; ++t) xb[t] = _mm512_set1_ps(x[t]);
  for (int64_t q = 0; q < nwords; ++q) {
    const uint32_t m = words[q];
    if (m == 0) continue;
    __m512 w0, w1;
    v = V::expand32(v, m, w0, w1);
    const auto lo = static_cast<__mmask16>(m), hi = static_cast<__mmask16>(m >> 16);
    float* a = acc + q * 32;
    for (int t = 0; t < B; ++t) {
      float* at = a + t * ld;
      _mm512_storeu_ps(at, _mm512_mask3_fmadd_ps(xb[t], w0, _mm512_loadu_ps(at), lo));
      _mm512_storeu_ps(at + 16, _mm512_mask3_fmadd_ps(xb[t], w1, _mm512_loadu_ps(at + 16), hi));
    }
  }
}

template <typename V>
void accumulate(const uint32_t* words, int64_t nwords, const void* values, const float* x,
                int64_t b, float* acc, int64_t ld) {
  const auto* v = static_cast<const typename V::T*>(values);
  with_tokens(b, [&](auto B) {
    accumulate_tokens<V, decltype(B)::value>(words, nwords, v, x, acc, ld);
  });
}

// ---- dense rows ---------------------------------------------------------------------------------

inline float hsum(__m512 v) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// R rows x B tokens of fp32 accumulators stay in registers over the whole of k: each weight vector
// is loaded and widened once for B tokens, each x vector once for R rows. R * B + R + 1 <= 32.
template <typename V, int B, int R>
void dense_block(const typename V::T* w, int64_t k, const float* x, int64_t r, float* y, int64_t n) {
  __m512 acc[R][B];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < B; ++t) acc[i][t] = _mm512_setzero_ps();
  const typename V::T* row = w + r * k;
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    __m512 wv[R];
    for (int i = 0; i < R; ++i) wv[i] = V::load16(row + i * k + j);
    for (int t = 0; t < B; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * k + j);
      for (int i = 0; i < R; ++i) acc[i][t] = _mm512_fmadd_ps(wv[i], xv, acc[i][t]);
    }
  }
  if (j < k) {
    const auto tail = static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<uint32_t>(k - j)));
    __m512 wv[R];
    for (int i = 0; i < R; ++i) wv[i] = V::load16(row + i * k + j, tail);
    for (int t = 0; t < B; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + t * k + j);
      for (int i = 0; i < R; ++i) acc[i][t] = _mm512_fmadd_ps(wv[i], xv, acc[i][t]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < B; ++t) y[t * n + r + i] = hsum(acc[i][t]);
}

template <typename V, int B>
void dense_tokens(const typename V::T* w, int64_t k, const float* x, int64_t r0, int64_t r1,
                  float* y, int64_t n) {
  // Four rows give b = 1 four independent FMA chains (the FMA latency); larger b needs fewer.
  constexpr int R = B <= 4 ? 4 : 3;
  int64_t r = r0;
  for (; r + R <= r1; r += R) dense_block<V, B, R>(w, k, x, r, y, n);
  for (; r < r1; ++r) dense_block<V, B, 1>(w, k, x, r, y, n);
}

template <typename V>
void dense(const void* w, int64_t k, const float* x, int64_t b, int64_t r0, int64_t r1, float* y,
           int64_t n) {
  const auto* wt = static_cast<const typename V::T*>(w);
  with_tokens(b, [&](auto B) {
    dense_tokens<V, decltype(B)::value>(wt, k, x, r0, r1, y, n);
  });
}

}  // namespace
}  // namespace avx512

const GemvKernels& gemv_kernels_avx512() {
  using namespace avx512;
  static const GemvKernels k{"avx512",
                             {accumulate<F32>, accumulate<F16>, accumulate<BF16>},
                             {nullptr, nullptr, nullptr},
                             {dense<F32>, dense<F16>, dense<BF16>}};
  return k;
}

}  // namespace duogpt::cpu
