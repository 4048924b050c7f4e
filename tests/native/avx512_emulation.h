// The AVX-512 intrinsics csrc/cpu/gemv_avx512.cpp uses, written as scalar loops over the lanes
// after the pseudocode of Intel's intrinsics guide, so that the kernels' logic runs on a CPU
// without AVX-512 (CI's). Include after <immintrin.h>: each intrinsic's name then refers to the
// function here. Loads read only the elements the instruction reads (masked lanes and the lanes
// past an expand's popcount are not touched), so a sanitizer sees the same reads as the hardware
// makes. The fp16 conversion is the real F16C one, the FMA the correctly rounded std::fma.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace emu {

template <typename T, int N>
struct Lanes {
  T v[N];
};

template <typename T, typename V>
Lanes<T, sizeof(V) / sizeof(T)> lanes(const V& x) {
  Lanes<T, sizeof(V) / sizeof(T)> l;
  std::memcpy(l.v, &x, sizeof x);
  return l;
}

template <typename V, typename T, int N>
V vec(const Lanes<T, N>& l) {
  static_assert(sizeof(V) == sizeof(T) * N, "lane count");
  V x;
  std::memcpy(&x, l.v, sizeof x);
  return x;
}

template <typename T>
T element(const void* p, int i) {
  T e;
  std::memcpy(&e, static_cast<const char*>(p) + i * sizeof(T), sizeof(T));
  return e;
}

// Set lanes take consecutive elements from p; the others keep src.
template <typename T, typename V, typename M>
V mask_expandloadu(V src, M k, const void* p) {
  auto l = lanes<T>(src);
  for (int i = 0, j = 0; i < int(sizeof(V) / sizeof(T)); ++i)
    if ((k >> i) & 1) l.v[i] = element<T>(p, j++);
  return vec<V>(l);
}

// Set lanes take element i of p, the others are zero.
template <typename T, typename V, typename M>
V maskz_loadu(M k, const void* p) {
  Lanes<T, sizeof(V) / sizeof(T)> l{};
  for (int i = 0; i < int(sizeof(V) / sizeof(T)); ++i)
    if ((k >> i) & 1) l.v[i] = element<T>(p, i);
  return vec<V>(l);
}

template <typename To, typename From>
To bits(const From& x) {
  static_assert(sizeof(To) <= sizeof(From), "a cast takes the low part");
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

// The 256-bit half `imm` of a 512-bit vector.
template <typename To, typename From>
To half(const From& x, int imm) {
  To y;
  std::memcpy(&y, reinterpret_cast<const char*>(&x) + 32 * (imm & 1), 32);
  return y;
}

inline __m512 loadu_ps(const void* p) {
  __m512 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline __m512 maskz_loadu_ps(__mmask16 k, const void* p) { return maskz_loadu<float, __m512>(k, p); }
inline __m512 mask_expandloadu_ps(__m512 src, __mmask16 k, const void* p) {
  return mask_expandloadu<float>(src, k, p);
}
inline __m256i maskz_loadu_epi16(__mmask16 k, const void* p) { return maskz_loadu<uint16_t, __m256i>(k, p); }
inline __m512i mask_expandloadu_epi16(__m512i src, __mmask32 k, const void* p) {
  return mask_expandloadu<uint16_t>(src, k, p);
}
inline void storeu_ps(void* p, __m512 a) { std::memcpy(p, &a, sizeof a); }

inline __m512 setzero_ps() { return __m512{}; }
inline __m512i setzero_si512() { return __m512i{}; }
inline __m512 set1_ps(float a) {
  Lanes<float, 16> l;
  for (float& e : l.v) e = a;
  return vec<__m512>(l);
}

inline __m512 castsi512_ps(__m512i a) { return bits<__m512>(a); }
inline __m256i castsi512_si256(__m512i a) { return bits<__m256i>(a); }
inline __m256 castps512_ps256(__m512 a) { return bits<__m256>(a); }
inline __m256i extracti32x8_epi32(__m512i a, int imm) { return half<__m256i>(a, imm); }
inline __m256 extractf32x8_ps(__m512 a, int imm) { return half<__m256>(a, imm); }

inline __m512 cvtph_ps(__m256i a) {
  const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(a));
  const __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));
  __m512 r;
  std::memcpy(&r, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&r) + 32, &hi, 32);
  return r;
}
inline __m512i cvtepu16_epi32(__m256i a) {
  const auto in = lanes<uint16_t>(a);
  Lanes<uint32_t, 16> out;
  for (int i = 0; i < 16; ++i) out.v[i] = in.v[i];
  return vec<__m512i>(out);
}
inline __m512i slli_epi32(__m512i a, unsigned imm) {
  auto l = lanes<uint32_t>(a);
  for (uint32_t& e : l.v) e = imm > 31 ? 0 : e << imm;
  return vec<__m512i>(l);
}

inline __m512 fmadd_ps(__m512 a, __m512 b, __m512 c) {
  const auto la = lanes<float>(a), lb = lanes<float>(b);
  auto lc = lanes<float>(c);
  for (int i = 0; i < 16; ++i) lc.v[i] = std::fma(la.v[i], lb.v[i], lc.v[i]);
  return vec<__m512>(lc);
}
// Unset lanes keep c.
inline __m512 mask3_fmadd_ps(__m512 a, __m512 b, __m512 c, __mmask16 k) {
  const auto la = lanes<float>(a), lb = lanes<float>(b);
  auto lc = lanes<float>(c);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) lc.v[i] = std::fma(la.v[i], lb.v[i], lc.v[i]);
  return vec<__m512>(lc);
}

}  // namespace emu

// Some of these are macros in GCC's headers when not optimising.
#undef _mm512_extracti32x8_epi32
#undef _mm512_extractf32x8_ps
#undef _mm512_slli_epi32
#define _mm512_loadu_ps emu::loadu_ps
#define _mm512_maskz_loadu_ps emu::maskz_loadu_ps
#define _mm512_mask_expandloadu_ps emu::mask_expandloadu_ps
#define _mm256_maskz_loadu_epi16 emu::maskz_loadu_epi16
#define _mm512_mask_expandloadu_epi16 emu::mask_expandloadu_epi16
#define _mm512_storeu_ps emu::storeu_ps
#define _mm512_setzero_ps emu::setzero_ps
#define _mm512_set1_ps emu::set1_ps
#define _mm512_castsi512_ps emu::castsi512_ps
#define _mm512_castsi512_si256 emu::castsi512_si256
#define _mm512_castps512_ps256 emu::castps512_ps256
#define _mm512_extracti32x8_epi32 emu::extracti32x8_epi32
#define _mm512_extractf32x8_ps emu::extractf32x8_ps
#define _mm512_cvtph_ps emu::cvtph_ps
#define _mm512_cvtepu16_epi32 emu::cvtepu16_epi32
#define _mm512_slli_epi32 emu::slli_epi32
#define _mm512_fmadd_ps emu::fmadd_ps
#define _mm512_mask3_fmadd_ps emu::mask3_fmadd_ps
