// gemv_avx512.cpp's kernels, run through avx512_emulation.h, against gemv_scalar.cpp's on random
// cases: every dtype, b = 1..8, bitmap words from empty to full, rows padded or not, dense row
// ranges with k not a multiple of 16, and an infinite activation. Buffers are exactly as long as
// the kernels may read, so under -fsanitize=address an over-read fails. Prints the case count and
// exits 1 on any mismatch. Built and run by tests/test_gemv.py; CPUs with AVX-512 run the real
// instructions through the Python tests instead.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "avx512_emulation.h"
#include "duogpt/types.h"

// gemv_avx512.cpp zeroes its expand sources with an inline-asm VPXORD, which this build cannot
// assemble for a 512-bit operand: its `asm volatile(...)` statement becomes `z = zero`.
#define asm
#define volatile(...) (z = emu::setzero_si512())
#include "gemv_avx512.cpp"
#undef volatile
#undef asm

namespace {

using duogpt::cpu::GemvKernels;

std::mt19937 rng(20261125);

float normal() { return std::normal_distribution<float>(0.0f, 1.0f)(rng); }

// n random values of dtype `code`, as raw bytes.
std::vector<unsigned char> random_values(int code, int64_t n) {
  const int64_t size = code == 0 ? 4 : 2;
  std::vector<unsigned char> out(n * size);
  for (int64_t i = 0; i < n; ++i) {
    const float f = normal();
    const uint16_t h = code == 1 ? duogpt::float_to_half(f) : duogpt::float_to_bf16(f);
    std::memcpy(out.data() + i * size, code == 0 ? static_cast<const void*>(&f) : &h, size);
  }
  return out;
}

bool same(float got, float want, float scale) {
  if (std::isnan(want) || std::isinf(want)) return std::isnan(want) ? std::isnan(got) : got == want;
  return std::fabs(got - want) <= 1e-5f * scale;
}

int cases = 0, failures = 0;

void report(bool ok, const char* what, int code, int64_t b, int64_t a, int64_t c) {
  ++cases;
  if (!ok && ++failures <= 10) std::printf("MISMATCH %s dtype %d b %lld (%lld, %lld)\n", what, code,
                                           (long long)b, (long long)a, (long long)c);
}

// One channel: `nwords` bitmap words with each bit set with probability `density` (plus a full
// and an empty word where there is room), into b accumulator rows of stride ld.
void check_accumulate(const GemvKernels& emulated, const GemvKernels& scalar, int code, int64_t b,
                      int64_t nwords, double density, int64_t pad, bool infinite_x) {
  std::vector<uint32_t> words(nwords);
  for (uint32_t& w : words)
    for (int i = 0; i < 32; ++i) w |= uint32_t(std::bernoulli_distribution(density)(rng)) << i;
  if (nwords >= 3) words[1] = 0xffffffffu, words[2] = 0;
  int64_t nnz = 0;
  for (uint32_t w : words) nnz += __builtin_popcount(w);
  // The AVX-512 kernel reads exactly the non-zeros: no kOverRead slack here.
  const std::vector<unsigned char> values = random_values(code, nnz);
  std::vector<float> x(b);
  for (float& e : x) e = normal();
  if (infinite_x) x[b - 1] = INFINITY;
  const int64_t ld = 32 * nwords + pad;
  std::vector<float> got(b * ld);
  for (float& e : got) e = normal();
  std::vector<float> want = got;
  emulated.accumulate[code](words.data(), nwords, values.data(), x.data(), b, got.data(), ld);
  scalar.accumulate[code](words.data(), nwords, values.data(), x.data(), b, want.data(), ld);
  bool ok = true;
  for (int64_t i = 0; i < b * ld; ++i) ok &= same(got[i], want[i], 1.0f + std::fabs(want[i]));
  report(ok, "accumulate", code, b, nwords, pad);
}

// Rows [r0, r1) of an n x k weight; the other rows of y stay as they were.
void check_dense(const GemvKernels& emulated, const GemvKernels& scalar, int code, int64_t b,
                 int64_t n, int64_t k, int64_t r0, int64_t r1) {
  const std::vector<unsigned char> w = random_values(code, n * k);
  std::vector<float> x(b * k);
  for (float& e : x) e = normal();
  std::vector<float> got(b * n, -7.0f), want(b * n, -7.0f);
  emulated.dense[code](w.data(), k, x.data(), b, r0, r1, got.data(), n);
  scalar.dense[code](w.data(), k, x.data(), b, r0, r1, want.data(), n);
  bool ok = true;
  // Summation orders differ; sqrt(k) bounds the size of a sum of k unit normal products.
  for (int64_t i = 0; i < b * n; ++i) ok &= same(got[i], want[i], std::sqrt(float(k)) * 8.0f);
  report(ok, "dense", code, b, n, k);
}

}  // namespace

int main() {
  struct Rows {
    int64_t n, r0, r1;
  };
  const GemvKernels& emulated = duogpt::cpu::gemv_kernels_avx512();
  const GemvKernels& scalar = duogpt::cpu::gemv_kernels_scalar();
  for (int code = 0; code < 3; ++code) {
    for (int64_t b = 1; b <= 8; ++b) {
      for (int64_t nwords : {1, 2, 3, 5})
        for (double density : {0.0, 0.1, 0.5, 0.9, 1.0})
          for (int64_t pad : {0, 7}) check_accumulate(emulated, scalar, code, b, nwords, density, pad, false);
      check_accumulate(emulated, scalar, code, b, 4, 0.5, 3, true);
      for (int64_t k : {1, 15, 16, 17, 40, 129})
        for (const Rows& r : {Rows{1, 0, 1}, Rows{9, 0, 9}, Rows{13, 2, 11}})
          check_dense(emulated, scalar, code, b, r.n, k, r.r0, r.r1);
    }
  }
  std::printf("%d cases, %d mismatches\n", cases, failures);
  return failures ? 1 : 0;
}
