// The inner loops of the CPU GEMVs, one implementation per instruction set, picked at run time
// (cpu_features.cpp). Everything around them (activation selection, threading, dtype conversion
// of x and y) lives once in spmspv_cpu.cpp.
#pragma once

#include <cstdint>

namespace duogpt::cpu {

/// Values a kernel may read past the last non-zero of a channel's bitmap row (a vector load of 8
/// at the last set bit). With at most 32 * nwords set bits, a kernel reads at most
/// 32 * nwords + kOverRead values from a channel's first: the caller makes that many readable,
/// whatever the bitmap holds.
constexpr int64_t kOverRead = 8;

/// acc[t * ld + r] += x[t] * W[r, j] for every non-zero W[r, j] of one input channel j, t < b.
/// Rows are padded to 32 * nwords <= ld, so a word can be written whole. `values` points at the
/// channel's first value.
using AccumulateChannelFn = void (*)(const uint32_t* words, int64_t nwords, const void* values,
                                     const float* x, int64_t b, float* acc, int64_t ld);

/// Channels taken together by AccumulateGroupFn.
constexpr int kGroup = 4;

/// kGroup active channels: channel c has its bitmap row `words[c]`, its values from `values[c]` and
/// its b activations `x[c]`.
struct ChannelGroup {
  const uint32_t* words[kGroup];
  const char* values[kGroup];
  const float* x[kGroup];
};

/// The same for the kGroup channels of `g` at once, so that each accumulator vector is loaded and
/// stored once per group instead of once per channel. Channel c's activations x[c][t] are all
/// finite (the zero lanes of an expansion contribute x * 0 = 0). Null for instruction sets
/// without one: the caller then goes channel by channel.
using AccumulateGroupFn = void (*)(const ChannelGroup& g, int64_t nwords, int64_t b, float* acc,
                                   int64_t ld);

/// y[t * n + r] = sum_j x[t * k + j] * w[r * k + j] for rows r in [r0, r1), t < b.
using DenseRowsFn = void (*)(const void* w, int64_t k, const float* x, int64_t b, int64_t r0,
                             int64_t r1, float* y, int64_t n);

/// One instruction set's kernels, indexed by the weight's Dtype code.
struct GemvKernels {
  const char* name;
  AccumulateChannelFn accumulate[3];
  AccumulateGroupFn accumulate_group[3];
  DenseRowsFn dense[3];
};

/// Calls f(Tokens<B>{}) with B = b, 1 <= b <= 8: the SIMD loops are specialised for the token
/// count so that their per-token vectors live in registers. (A plain struct rather than
/// std::integral_constant: the ISA files instantiate no std template, see gemv_avx2.cpp.)
template <int B>
struct Tokens {
  static constexpr int value = B;
};
template <typename F>
inline void with_tokens(int64_t b, F&& f) {
  switch (b) {
    case 1: return f(Tokens<1>{});
    case 2: return f(Tokens<2>{});
    case 3: return f(Tokens<3>{});
    case 4: return f(Tokens<4>{});
    case 5: return f(Tokens<5>{});
    case 6: return f(Tokens<6>{});
    case 7: return f(Tokens<7>{});
    default: return f(Tokens<8>{});
  }
}

const GemvKernels& gemv_kernels_scalar();
#if defined(DUOGPT_X86_SIMD)
const GemvKernels& gemv_kernels_avx2();
const GemvKernels& gemv_kernels_avx512();
#endif

/// The kernels in use: the best the CPU supports unless set_cpu_isa chose a lower one.
const GemvKernels& active_gemv_kernels();

}  // namespace duogpt::cpu
