// AVX2 GEMV inner loops (with FMA, F16C, BMI2, POPCNT).
//
// This file is compiled with AVX2 flags (CMakeLists.txt) and only entered after the CPU check in
// cpu_features.cpp. Everything but the table accessor has internal linkage and no std template is
// instantiated here, so no function built for AVX2 can be merged by the linker into code that runs
// on older CPUs.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "gemv_isa.h"

namespace duogpt::cpu {
namespace avx2 {
namespace {

// AVX2 has no expand instruction: one table entry per bitmap byte moves the next popcount(byte)
// packed values to the set-bit lanes of an 8-lane vector. `half[m]` is a PSHUFB control for eight
// 16-bit values (0x80 zeroes a lane); `bf16[m]` one that puts eight bfloat16 values, broadcast to
// both 128-bit halves, into the top halves of eight float32 lanes (the widening done by the
// shuffle); `word[m]` a VPERMPS index for eight 32-bit values whose sign bit marks the lanes to
// zero.
struct ExpandTables {
  alignas(16) uint8_t half[256][16];
  alignas(32) uint8_t bf16[256][32];
  int8_t word[256][8];
};

constexpr ExpandTables make_expand_tables() {
  ExpandTables t{};
  for (int m = 0; m < 256; ++m) {
    int next = 0;
    for (int lane = 0; lane < 8; ++lane) {
      const bool set = (m >> lane) & 1;
      t.half[m][2 * lane] = set ? uint8_t(2 * next) : 0x80;
      t.half[m][2 * lane + 1] = set ? uint8_t(2 * next + 1) : 0x80;
      t.bf16[m][4 * lane] = t.bf16[m][4 * lane + 1] = 0x80;
      t.bf16[m][4 * lane + 2] = t.half[m][2 * lane];
      t.bf16[m][4 * lane + 3] = t.half[m][2 * lane + 1];
      t.word[m][lane] = set ? int8_t(next) : int8_t(-128);
      next += set;
    }
  }
  return t;
}

constexpr ExpandTables kExpand = make_expand_tables();

// Weight loads by value type: 8 contiguous values widened to fp32 (dense), and the expansion of
// the next popcount(m) packed values into the set lanes of byte m (spMspV), reading 8 values.
struct F32 {
  using T = float;
  static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static float load1(const T* p) { return *p; }
  static __m256 expand8(const T* v, size_t m) {
    const __m256i idx = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kExpand.word[m])));
    const __m256 w = _mm256_permutevar8x32_ps(_mm256_loadu_ps(v), idx);
    return _mm256_blendv_ps(w, _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
  }
};

struct F16 {
  using T = uint16_t;
  static __m256 load8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static float load1(const T* p) { return _cvtsh_ss(*p); }
  static __m256 expand8(const T* v, size_t m) {
    const __m128i ctl = _mm_load_si128(reinterpret_cast<const __m128i*>(kExpand.half[m]));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)), ctl));
  }
};

struct BF16 {
  using T = uint16_t;
  // bfloat16 is the top half of a float32: widen and shift into place.
  static __m256 widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static __m256 load8(const T* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static float load1(const T* p) { return _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128(int(*p) << 16))); }
  static __m256 expand8(const T* v, size_t m) {
    const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.bf16[m]));
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(both, ctl));
  }
};

// ---- spMspV: one input channel into b accumulator rows ----------------------------------------

// One value at a time, touching only rows with a non-zero weight: the path for a channel whose
// activations are not all finite (x * 0 must not turn the zero lanes into NaN).
template <typename V>
const typename V::T* accumulate_word_scalar(uint32_t m, const typename V::T* v, const float* x,
                                            int64_t b, float* a, int64_t ld) {
  for (; m != 0; m &= m - 1) {
    const float w = V::load1(v++);
    const int r = static_cast<int>(_tzcnt_u32(m));
    for (int64_t t = 0; t < b; ++t) a[t * ld + r] += x[t] * w;
  }
  return v;
}

// Each byte's expansion reads 8 values (kOverRead) from its first, which the caller makes readable.
template <typename V, int B>
void accumulate_tokens(const uint32_t* words, int64_t nwords, const typename V::T* v,
                       const float* x, float* acc, int64_t ld) {
  __m256 xb[B];
  for (int t = 0; t < B; ++t) xb[t] = _mm256_set1_ps(x[t]);
  for (int64_t q = 0; q < nwords; ++q) {
    const uint32_t m = words[q];
    if (m == 0) continue;
    float* a = acc + q * 32;
    for (int byte = 0; byte < 4; ++byte) {
      const uint32_t mb = (m >> (8 * byte)) & 0xffu;
      const __m256 w = V::expand8(v, mb);
      v += _mm_popcnt_u32(mb);
      for (int t = 0; t < B; ++t) {
        float* at = a + t * ld + 8 * byte;
        _mm256_storeu_ps(at, _mm256_fmadd_ps(xb[t], w, _mm256_loadu_ps(at)));
      }
    }
  }
}

template <typename V>
void accumulate(const uint32_t* words, int64_t nwords, const void* values, const float* x,
                int64_t b, float* acc, int64_t ld) {
  const auto* v = static_cast<const typename V::T*>(values);
  bool finite = true;
  for (int64_t t = 0; t < b; ++t) finite &= (x[t] - x[t]) == 0.0f;
  if (!finite) {
    for (int64_t q = 0; q < nwords; ++q) v = accumulate_word_scalar<V>(words[q], v, x, b, acc + q * 32, ld);
    return;
  }
  with_tokens(b, [&](auto B) {
    accumulate_tokens<V, decltype(B)::value>(words, nwords, v, x, acc, ld);
  });
}

// PREFETCHT0 as a volatile asm: GCC 12 drops _mm_prefetch from loops like these (objdump shows no
// prefetch instruction), as it may any builtin without a visible effect.
inline void prefetch(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }

// Cache lines of a channel's values and of its bitmap row that prefetch_head asks for: the best of
// 1, 2, 4, 8 and 16 on SmolLM2's shapes at b = 1, 50 %/50 %
// (bench/results/cpu-gemv-head-prefetch-2026-11-24.md).
constexpr int64_t kHeadLines = 4;

// The first kHeadLines lines of channel j's values and bitmap row (fewer if it is shorter).
template <typename V>
void prefetch_head(const GroupedSlice& s, int64_t j) {
  const int64_t first = s.offsets[j * s.tiles], count = s.offsets[(j + 1) * s.tiles] - first;
  const char* v = static_cast<const char*>(s.values) + first * int64_t(sizeof(typename V::T));
  const char* bits = reinterpret_cast<const char*>(s.bitmap + j * s.nwords);
  const int64_t value_lines = (count * int64_t(sizeof(typename V::T)) + 63) / 64;
  const int64_t bitmap_lines = (s.nwords * 4 + 63) / 64;
  for (int64_t l = 0; l < kHeadLines && l < value_lines; ++l) prefetch(v + 64 * l);
  for (int64_t l = 0; l < kHeadLines && l < bitmap_lines; ++l) prefetch(bits + 64 * l);
}

// The bitmap byte at p, and its popcount in `count`. From the plain C++ GCC 12 copies the byte to
// another register and counts it in place there (avoiding POPCNT's false output dependency on
// Intel): one more instruction per channel and 8 rows, in a loop bound by instruction issue.
// Written out, the group kernel takes 0.95x the time (bench/results/cpu-gemv-popcnt-2026-11-24.md).
// Both are size_t, as is expand8's byte: a 32-bit byte costs a zero extension before the table load.
inline size_t load_byte_and_count(const uint8_t* p, size_t& count) {
  size_t m;
  asm("movzbl %2, %k0\n\tpopcntl %k0, %k1" : "=r"(m), "=r"(count) : "m"(*p));
  return m;
}

// The groups of a slice into b accumulator rows (AccumulateGroupsFn).
template <typename V, int B>
void accumulate_groups_tokens(const GroupedSlice& s, float* acc, int64_t ld) {
  const auto* values = static_cast<const typename V::T*>(s.values);
  for (int64_t i = 0; i < s.groups; ++i) {
    // Under an activation rule a stream's next channel is often not the one after this in memory.
    // The hardware prefetcher then finds the new stream only after a few misses, most of a short
    // channel (576 rows at 50 % are 9 lines of fp16 values), so the head of such a channel is
    // asked for one group ahead. Where channels follow on (every channel kept) nothing is asked.
    // Only for one token: at b = 2 the union of the tokens' channels breaks fewer streams, and
    // asking gained a few per cent on 4096-row channels but lost on SmolLM2's 192- and 576-row
    // ones (bench/results/cpu-gemv-nine-runs-2026-11-24.md).
    if (B == 1 && i + 1 < s.groups) {
      for (int c = 0; c < kGroup; ++c) {
        const int32_t* next = s.active + s.first + c * s.run + i + 1;
        if (next[0] != next[-1] + 1) prefetch_head<V>(s, next[0]);
      }
    }
    const typename V::T* v[kGroup];
    const uint8_t* bits[kGroup];  // the bitmap read byte by byte (x86 is little-endian)
    __m256 xb[kGroup][B];
    for (int c = 0; c < kGroup; ++c) {
      const int64_t a = s.first + c * s.run + i, j = s.active[a];
      v[c] = values + s.offsets[j * s.tiles];
      bits[c] = reinterpret_cast<const uint8_t*>(s.bitmap + j * s.nwords);
      for (int t = 0; t < B; ++t) xb[c][t] = _mm256_set1_ps(s.xa[a * B + t]);
    }
    for (int64_t q = 0; q < s.nwords; ++q) {
      float* a = acc + q * 32;
      for (int byte = 0; byte < 4; ++byte) {
        __m256 w[kGroup];
        for (int c = 0; c < kGroup; ++c) {
          size_t count;
          const size_t mb = load_byte_and_count(bits[c] + 4 * q + byte, count);
          w[c] = V::expand8(v[c], mb);
          v[c] += count;
          // Keep the advanced pointer in a register of its own. Otherwise GCC 12 folds the
          // advance into the next load's address (old pointer + count), which keeps both alive:
          // the bf16 kernels then spill pointers to the stack and take 1.04-1.39x as long at
          // b = 1 and 2 (bench/results/cpu-gemv-bf16-spills-2026-11-24.md). Emits no instruction.
          asm("" : "+r"(v[c]));
        }
        for (int t = 0; t < B; ++t) {
          float* at = a + t * ld + 8 * byte;
          // One FMA chain from the loaded accumulator: two instructions fewer per 8 rows than a
          // pairwise sum, which pays where the loop is bound by instruction issue
          // (bench/results/cpu-gemv-fma-chain-2026-11-24.md). Its latency is hidden: each 8 rows
          // start a chain of their own.
          __m256 sum = _mm256_fmadd_ps(xb[0][t], w[0], _mm256_loadu_ps(at));
          for (int c = 1; c < kGroup; ++c) sum = _mm256_fmadd_ps(xb[c][t], w[c], sum);
          _mm256_storeu_ps(at, sum);
        }
      }
    }
  }
}

template <typename V>
void accumulate_groups(const GroupedSlice& s, float* acc, int64_t ld) {
  with_tokens(s.b, [&](auto B) { accumulate_groups_tokens<V, decltype(B)::value>(s, acc, ld); });
}

// ---- dense rows ---------------------------------------------------------------------------------

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// R rows x B tokens of fp32 accumulators stay in registers over the whole of k: each weight vector
// is loaded and widened once for B tokens, each x vector once for R rows. R * B + R + 1 <= 16.
template <typename V, int B, int R>
void dense_block(const typename V::T* w, int64_t k, const float* x, int64_t r, float* y, int64_t n) {
  __m256 acc[R][B];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < B; ++t) acc[i][t] = _mm256_setzero_ps();
  const typename V::T* row = w + r * k;
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    __m256 wv[R];
    for (int i = 0; i < R; ++i) wv[i] = V::load8(row + i * k + j);
    for (int t = 0; t < B; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * k + j);
      for (int i = 0; i < R; ++i) acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int t = 0; t < B; ++t) {
      float s = hsum(acc[i][t]);
      for (int64_t jt = j; jt < k; ++jt) s += V::load1(row + i * k + jt) * x[t * k + jt];
      y[t * n + r + i] = s;
    }
  }
}

// Tokens in groups of G (the last one smaller) over the same R rows.
template <typename V, int B, int G, int R, int T0 = 0>
void token_groups(const typename V::T* w, int64_t k, const float* x, int64_t r, float* y, int64_t n) {
  constexpr int P = B - T0 < G ? B - T0 : G;
  dense_block<V, P, R>(w, k, x + T0 * k, r, y + T0 * n, n);
  if constexpr (T0 + P < B) token_groups<V, B, G, R, T0 + P>(w, k, x, r, y, n);
}

template <typename V, int B, int G, int R>
void row_blocks(const typename V::T* w, int64_t k, const float* x, int64_t r0, int64_t r1, float* y,
                int64_t n) {
  int64_t r = r0;
  for (; r + R <= r1; r += R) token_groups<V, B, G, R>(w, k, x, r, y, n);
  for (; r < r1; ++r) dense_block<V, B, 1>(w, k, x, r, y, n);
}

// The size of x (b x k in fp32) up to which the all-token blocks find it in L1: the 32 KiB L1 data
// cache of Zen 3 and of most x86 cores.
constexpr int64_t kDenseL1Bytes = 32 << 10;

template <typename V, int B>
void dense_tokens(const typename V::T* w, int64_t k, const float* x, int64_t r0, int64_t r1,
                  float* y, int64_t n) {
  // Four rows give four independent FMA chains per token and share each x load. With all b tokens
  // at once, b > 2 leaves registers for fewer rows, down to one at b > 4. That is right while x
  // is in L1. Past L1, each weight vector's b x loads come from L2 (128 KiB of x at b = 8,
  // k = 4096), and b = 8 ran at a third of b = 1's rate. There the tokens go in pairs over the
  // same four rows, whose weights come from DRAM for the first pair and from cache for the
  // others (bench/results/cpu-dense-gemv-batch-2026-11-24.md).
  if constexpr (B <= 2) {
    row_blocks<V, B, B, 4>(w, k, x, r0, r1, y, n);
  } else if (B * k * int64_t(sizeof(float)) <= kDenseL1Bytes) {
    row_blocks<V, B, B, (B <= 4 ? 2 : 1)>(w, k, x, r0, r1, y, n);
  } else {
    row_blocks<V, B, 2, 4>(w, k, x, r0, r1, y, n);
  }
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
}  // namespace avx2

const GemvKernels& gemv_kernels_avx2() {
  using namespace avx2;
  static const GemvKernels k{"avx2",
                             {accumulate<F32>, accumulate<F16>, accumulate<BF16>},
                             {accumulate_groups<F32>, accumulate_groups<F16>, accumulate_groups<BF16>},
                             {dense<F32>, dense<F16>, dense<BF16>}};
  return k;
}

}  // namespace duogpt::cpu
