// Portable GEMV inner loops: the fallback on any CPU and the simplest statement of each loop.
#include <cstring>

#include "duogpt/types.h"
#include "gemv_isa.h"

namespace duogpt::cpu {
namespace {

inline float load(const float* p, int64_t i) { return p[i]; }

struct Half {
  uint16_t bits;
};
struct BHalf {
  uint16_t bits;
};
inline float load(const Half* p, int64_t i) { return half_to_float(p[i].bits); }
inline float load(const BHalf* p, int64_t i) { return bf16_to_float(p[i].bits); }

template <typename T>
void accumulate(const uint32_t* words, int64_t nwords, const void* values, const float* x,
                int64_t b, float* acc, int64_t ld) {
  const T* v = static_cast<const T*>(values);
  int64_t p = 0;
  for (int64_t q = 0; q < nwords; ++q) {
    for (uint32_t m = words[q]; m; m &= m - 1) {
      const int64_t r = q * 32 + __builtin_ctz(m);
      const float wv = load(v, p++);
      for (int64_t t = 0; t < b; ++t) acc[t * ld + r] += x[t] * wv;
    }
  }
}

template <typename T>
void dense(const void* w, int64_t k, const float* x, int64_t b, int64_t r0, int64_t r1, float* y,
           int64_t n) {
  const T* wt = static_cast<const T*>(w);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < b; ++t) {
      float s = 0.0f;
      for (int64_t j = 0; j < k; ++j) s += x[t * k + j] * load(wt + r * k, j);
      y[t * n + r] = s;
    }
  }
}

}  // namespace

const GemvKernels& gemv_kernels_scalar() {
  static const GemvKernels k{"scalar",
                             {accumulate<float>, accumulate<Half>, accumulate<BHalf>},
                             {nullptr, nullptr, nullptr},
                             {dense<float>, dense<Half>, dense<BHalf>}};
  return k;
}

}  // namespace duogpt::cpu
