// The solver's column loop over one block (obs_prune_block), fused in one kernel; device code.
//
// For each column i of the block, with w = W1[:, i] before its decision:
//   q = w with pruned entries zeroed; e = (w - q) / U1[i, i];
//   W1[:, i] = q;  W1[:, j] -= e * U1[i, j] - w * P1[i, j]   for j > i   (P1 optional)
// Rows are independent. Lane mapping: one warp per row; lane l holds columns 32 c + l
// (c < NC, NC * 32 >= B) of its row in registers, together with the row's Err1 and Wpre1
// entries, so the row is read once and written once (coalesced). Column i's value is
// broadcast from its owner lane with a shuffle; every lane computes the same e; each lane then
// updates its own columns j > i, reading U1[i, j] and P1[i, j] (coalesced over the lanes; all
// warps of an SM read the same rows, which stay in L1).
//
// Bit-exact rounding: every operation uses a round-to-nearest intrinsic (__fmul_rn, __fsub_rn,
// __fdiv_rn), which nvcc never contracts into an FMA, in the reference's order:
// e = (w - q) / u_ii and w_j = w_j - ((e * u_ij) - (w * p_ij)).
//
// N:M: every M columns the warp scores its row's next M columns, s = (w * w) * score_coef, in
// shared memory, and lanes a and a + 32 rank candidate a by counting the scores that sort before
// it (ascending, NaN last, ties by index: the reference's stable argsort); the N lowest ranks
// are pruned. Otherwise the mask byte mask[row, i] decides (a uniform load per warp).
#pragma once

#include <cstdint>

#include "common.cuh"
#include "duogpt/obs.h"

namespace duogpt::cuda::obs {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;
constexpr int kMaxM = int(kMaxPruneM);  // N:M groups: the score buffer row per warp

struct Params {
  float* W1;               // [n, B]
  int64_t n;
  int B;
  const float* U1;         // [B, B]
  const float* P1;         // [B, B] or nullptr
  const uint8_t* mask;     // [n, B] (1 = prune) or nullptr for N:M
  int prunen, prunem;
  const float* score_coef; // [B], N:M only
  float* Err1;             // out: [n, B]
  float* Wpre1;            // out: [n, B]
};

// Whether score sc of candidate c sorts before score sa of candidate a.
__device__ __forceinline__ bool sorts_before(float sc, int c, float sa, int a) {
  const bool nan_c = isnan(sc), nan_a = isnan(sa);
  if (nan_c || nan_a) return nan_a && (!nan_c || c < a);
  return sc < sa || (sc == sa && c < a);
}

template <int NC>
__device__ __forceinline__ uint64_t nm_prune_bits(const Params& p, const float (&w)[NC], int i,
                                                  float* scores) {
  const int lane = threadIdx.x & 31, M = p.prunem;
  __syncwarp();  // the previous group's ranks are done with `scores`
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int j = 32 * c + lane;
    if (j >= i && j < i + M) scores[j - i] = __fmul_rn(__fmul_rn(w[c], w[c]), __ldg(p.score_coef + j));
  }
  __syncwarp();
  bool prune_lo = false, prune_hi = false;
  if (lane < M) {
    const float sa = scores[lane];
    int rank = 0;
    for (int c = 0; c < M; ++c) rank += sorts_before(scores[c], c, sa, lane);
    prune_lo = rank < p.prunen;
  }
  if (lane + 32 < M) {
    const float sa = scores[lane + 32];
    int rank = 0;
    for (int c = 0; c < M; ++c) rank += sorts_before(scores[c], c, sa, lane + 32);
    prune_hi = rank < p.prunen;
  }
  const uint32_t lo = __ballot_sync(kFullMask, prune_lo), hi = __ballot_sync(kFullMask, prune_hi);
  return uint64_t(lo) | (uint64_t(hi) << 32);
}

template <int NC>
__global__ void __launch_bounds__(kThreads) obs_prune_block_kernel(const Params p) {
  __shared__ float s_scores[kRowsPerBlock][kMaxM];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + warp;
  if (row >= p.n) return;  // uniform over the warp; the kernel has no block-wide barrier
  const int B = p.B;
  float* wrow = p.W1 + row * B;
  float w[NC], err[NC], pre[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int j = 32 * c + lane;
    w[c] = j < B ? wrow[j] : 0.0f;
    err[c] = 0.0f;
    pre[c] = 0.0f;
  }
  const bool nm = p.mask == nullptr;
  const uint8_t* mrow = nm ? nullptr : p.mask + row * B;
  uint64_t nm_bits = 0;

#pragma unroll
  for (int c0 = 0; c0 < NC; ++c0) {
    for (int l = 0; l < 32; ++l) {
      const int i = 32 * c0 + l;
      if (i >= B) break;
      if (nm && i % p.prunem == 0) nm_bits = nm_prune_bits<NC>(p, w, i, s_scores[warp]);
      const float wi = __shfl_sync(kFullMask, w[c0], l);
      const bool prune = nm ? ((nm_bits >> (i % p.prunem)) & 1u) != 0 : __ldg(mrow + i) != 0;
      const float q = prune ? 0.0f : wi;
      const float* urow = p.U1 + int64_t(i) * B;
      const float e = __fdiv_rn(__fsub_rn(wi, q), __ldg(urow + i));
      if (lane == l) {
        w[c0] = q;
        err[c0] = e;
        pre[c0] = wi;
      }
      const float* prow = p.P1 != nullptr ? p.P1 + int64_t(i) * B : nullptr;
#pragma unroll
      for (int c = c0; c < NC; ++c) {
        const int j = 32 * c + lane;
        if (j > i && j < B) {
          float update = __fmul_rn(e, __ldg(urow + j));
          if (prow != nullptr) update = __fsub_rn(update, __fmul_rn(wi, __ldg(prow + j)));
          w[c] = __fsub_rn(w[c], update);
        }
      }
    }
  }

#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int j = 32 * c + lane;
    if (j < B) {
      wrow[j] = w[c];
      p.Err1[row * B + j] = err[c];
      p.Wpre1[row * B + j] = pre[c];
    }
  }
}

}  // namespace duogpt::cuda::obs
