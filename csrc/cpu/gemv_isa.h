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

/// Channels taken together by AccumulateGroupsFn.
constexpr int kGroup = 4;

/// Groups of kGroup active channels from a thread's slice: group i < groups holds the active
/// entries first + c * run + i, c < kGroup, one from each of the slice's kGroup runs, so that each
/// of the kernel's kGroup weight streams goes on in the next group where it ended.
struct GroupedSlice {
  const uint32_t* bitmap;   // [k, nwords]
  int64_t nwords;
  const void* values;       // channel j's non-zeros from values[offsets[j * tiles]]
  const int32_t* offsets;
  int64_t tiles;
  const int32_t* active;    // [n_active] channel indices
  const float* xa;          // [n_active, b] their activations, all finite
  int64_t b;
  int64_t first, run, groups;
};

/// Every group of `s` into acc: per 8 rows, the kGroup expanded weight vectors are summed into
/// each token's accumulator with one load and one store (the zero lanes of an expansion
/// contribute x * 0 = 0, as all x are finite). Every channel of these groups is readable for
/// 32 * nwords + kOverRead values. One call per slice keeps the per-group work to the group's
/// own pointers. Null for instruction sets without one: the caller then goes channel by channel.
using AccumulateGroupsFn = void (*)(const GroupedSlice& s, float* acc, int64_t ld);

/// y[t * n + r] = sum_j x[t * k + j] * w[r * k + j] for rows r in [r0, r1), t < b.
using DenseRowsFn = void (*)(const void* w, int64_t k, const float* x, int64_t b, int64_t r0,
                             int64_t r1, float* y, int64_t n);

/// One instruction set's kernels, indexed by the weight's Dtype code.
struct GemvKernels {
  const char* name;
  AccumulateChannelFn accumulate[3];
  AccumulateGroupsFn accumulate_groups[3];
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
