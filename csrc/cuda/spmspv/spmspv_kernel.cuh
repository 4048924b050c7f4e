// Bitmap spMspV on the GPU, device code only: y [b, n] = sparsify(x) [b, k] @ W^T, b <= 8,
// W in the channel-major bitmap format (docs/format.md), float32 accumulation, deterministic.
//
// Kernels, launched in this order on one stream (spmspv_launch.cu):
//   1. topk_threshold_kernel (top-k rule only): one CTA per token finds the exact value at
//      ascending rank floor(k * p_a) of the rule's magnitude (|x| with NaN above everything, see
//      common.cuh magnitude) by a 4-pass radix select over the magnitudes' bit patterns, held
//      in registers (256-bin shared histogram, warp-aggregated with __match_any_sync);
//      the token keeps |x| >= that value. Written to the workspace (tau [b]).
//   2. spmspv_kernel: CTA (tile t, split s) owns the 1024 output rows of tile t and the input
//      channels [s * slice, (s + 1) * slice). For each chunk of kChunk channels it
//        a. classifies: four warps evaluate the rule for all b tokens of each channel and compact
//           the active channels (kept and non-zero for some token) with a ballot into shared
//           memory, with their float32 activations and the tile's span of values (from the
//           offsets). Inactive channels are never read further.
//        b. stages kStage active channels at a time in shared memory, double-buffered: one warp
//           per channel queues cp.async copies of the span (16-byte vectors, aligned in absolute
//           addresses, so whole sectors move at full width) and of the tile's 32 bitmap words;
//           the next stage's copies are in flight while this one is accumulated. One warp per
//           channel then writes the words' exclusive popcount prefixes.
//        c. accumulates: warp w owns words [4w, 4w + 4) of the tile, i.e. 128 rows, with
//           lane = bit position: row 32 q + lane takes the staged value at
//           prefix[q] + popc(word_q & lanes below). Rows whose bit is clear are never touched
//           (a non-finite activation reaches only the non-zero weights of its channel).
//           Accumulators live in registers: 4 words x BP tokens.
//      It then writes its b x 1024 fp32 partial sums (coalesced) to the workspace.
//   3. spmspv_reduce_kernel: y = sum of the partials over the splits in a fixed order, cast to
//      x's dtype. No atomics anywhere: the summation order depends only on the sizes and the SM
//      count, so repeated calls give identical bits.
//
// Bounds: spans are clamped to [0, nnz) and to 1024 values, no copy leaves values, and a value
// index past its span's length is skipped, so a bitmap inconsistent with its offsets gives a wrong
// y, never a stray read; bitmap words past the matrix read as 0; rows past n are computed into the
// padded partial rows and never reduced.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "duogpt/bitmap.h"
#include "spmspv/spmspv_traits.h"

namespace duogpt::cuda::spmspv {

struct Params {
  const void* x;             // [b, k], dtype x_dt
  Dtype x_dt;
  int b;
  int64_t k;
  const uint32_t* bitmap;    // [k, words]
  const void* values;        // [nnz]
  const int32_t* offsets;    // [k * tiles + 1]
  int64_t nnz;
  int64_t n, words, tiles;
  const float* threshold;    // [k] (threshold rule) or nullptr
  const float* tau;          // [b] (top-k rule, from topk_threshold_kernel) or nullptr
  float* partial;            // out: [splits, b, tiles * 1024]
  int64_t slice;             // channels per split
};

// ---- 1. per-token top-k threshold ------------------------------------------------------------

__global__ void __launch_bounds__(kSelectThreads)
    topk_threshold_kernel(const void* __restrict__ x, Dtype x_dt, int64_t k, int64_t drop,
                          float* __restrict__ tau) {
  constexpr uint32_t kNoKey = 0xffffffffu;  // an empty register slot (magnitude keys are smaller)
  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_prefix, s_rank;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = blockIdx.x;
  // The token's keys are read once: element threadIdx.x + e * kSelectThreads stays in keys[e].
  // Only elements past kSelectPerThread * kSelectThreads (k > 32768) are re-read in every pass.
  uint32_t keys[kSelectPerThread];
#pragma unroll
  for (int e = 0; e < kSelectPerThread; ++e) {
    const int64_t j = threadIdx.x + int64_t(e) * kSelectThreads;
    keys[e] = j < k ? magnitude_bits(load_as_float(x, x_dt, row * k + j)) : kNoKey;
  }
  uint32_t prefix = 0, mask = 0, rank = static_cast<uint32_t>(drop);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    // Counts one key per thread into the histogram of this pass's digit (called warp-uniformly).
    auto count = [&](uint32_t bits) {
      uint32_t key = 256;  // not a candidate of this pass
      if (bits != kNoKey && (bits & mask) == prefix) key = (bits >> shift) & 255u;
      const unsigned peers = __match_any_sync(kFullMask, key);
      if (key < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[key], uint32_t(__popc(peers)));
    };
#pragma unroll
    for (int e = 0; e < kSelectPerThread; ++e) {
      if (int64_t(e) * kSelectThreads < k) count(keys[e]);  // uniform: skips slots nobody holds
    }
    for (int64_t base = int64_t(kSelectPerThread) * kSelectThreads; base < k; base += kSelectThreads) {
      const int64_t j = base + threadIdx.x;
      count(j < k ? magnitude_bits(load_as_float(x, x_dt, row * k + j)) : kNoKey);
    }
    __syncthreads();
    if (warp == 0) {  // find the bin holding rank: lane l scans bins [8 l, 8 l + 8)
      uint32_t local[8], sum = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        local[e] = hist[lane * 8 + e];
        sum += local[e];
      }
      const uint32_t incl = warp_inclusive_scan(sum), excl = incl - sum;
      const unsigned owner = __ballot_sync(kFullMask, excl <= rank && rank < incl);
      if (owner == 0) {
        if (lane == 0) {  // unreachable when the counts are consistent; keep a defined result
          s_prefix = prefix;
          s_rank = rank;
        }
      } else if (lane == __ffs(owner) - 1) {
        uint32_t r = rank - excl;
        int digit = 7;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (r < local[e]) {
            digit = e;
            break;
          }
          r -= local[e];
        }
        s_prefix = prefix | (uint32_t(lane * 8 + digit) << shift);
        s_rank = r;
      }
    }
    __syncthreads();
    prefix = s_prefix;
    rank = s_rank;
    mask |= 255u << shift;
  }
  if (threadIdx.x == 0) tau[row] = __uint_as_float(prefix);
}

// ---- 2. main kernel --------------------------------------------------------------------------

/// Asynchronous global -> shared copies (sm_80+): the copy engine moves the bytes without
/// registers, so a warp queues a whole channel span and goes on.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename V, int BP>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) spmspv_kernel(const Params p) {
  constexpr int G = kStage<V>;                    // active channels per stage
  constexpr int VE = 16 / int(sizeof(V));         // values per 16-byte vector
  constexpr int kSlotVecs = kTileRows / VE + 1;   // a tile's span plus its misalignment
  __shared__ int32_t s_channel[kChunk];
  __shared__ int32_t s_lo[kChunk], s_len[kChunk];  // the tile's span in values, clamped
  __shared__ int s_count[kChunk / 32];
  __shared__ float s_x[kChunk][BP];
  __shared__ __align__(16) uint4 s_vals[2][G][kSlotVecs];
  __shared__ __align__(16) uint32_t s_word[2][G][kTileWords];
  __shared__ __align__(16) uint32_t s_pre[2][G][kTileWords];  // popcount of the words before
  __shared__ int s_shift[2][G];                   // index in the slot of the span's first value

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = blockIdx.x, split = blockIdx.y;
  const int64_t j_begin = split * p.slice;
  const int64_t j_end = j_begin + p.slice < p.k ? j_begin + p.slice : p.k;
  const uint32_t below = lanemask_lt();
  const auto* values = static_cast<const V*>(p.values);
  // Vectors are aligned in absolute addresses: element g of values sits at u = g + head in an
  // index space whose vector m covers u in [m VE, m VE + VE).
  const int64_t head = int64_t((reinterpret_cast<uintptr_t>(values) & 15) / sizeof(V));

  float acc[kWordsPerWarp][BP];
#pragma unroll
  for (int i = 0; i < kWordsPerWarp; ++i) {
#pragma unroll
    for (int tt = 0; tt < BP; ++tt) acc[i][tt] = 0.0f;
  }

  // Queue the copies of active channels [g0, g0 + G) into stage buffer buf: warp w copies
  // channel g0 + w (its span's vectors and the tile's 32 bitmap words).
  auto issue = [&](int g0, int n_act, int buf) {
    const int a = g0 + warp;
    if (warp < G && a < n_act) {
      const int64_t ch = s_channel[a];
      const int64_t q = t * kTileWords + lane;
      if (q < p.words) {
        cp_async4(&s_word[buf][warp][lane], p.bitmap + ch * p.words + q);
      } else {
        s_word[buf][warp][lane] = 0u;
      }
      const int64_t lo = s_lo[a], hi = lo + s_len[a];
      const int64_t m0 = (lo + head) / VE, m1 = (hi + head + VE - 1) / VE;
      if (lane == 0) s_shift[buf][warp] = int(lo + head - m0 * VE);
      for (int64_t m = m0 + lane; m < m1; m += 32) {
        const int64_t g = m * VE - head;  // first element of vector m
        uint4* dst = &s_vals[buf][warp][m - m0];
        if (g >= 0 && g + VE <= p.nnz) {
          cp_async16(dst, values + g);
        } else {  // a vector that sticks out of values (its first or last): element by element
          V* d = reinterpret_cast<V*>(dst);
#pragma unroll
          for (int e = 0; e < VE; ++e) {
            if (g + e >= 0 && g + e < p.nnz) d[e] = values[g + e];
          }
        }
      }
    }
    cp_async_commit();
  };

  for (int64_t c0 = j_begin; c0 < j_end; c0 += kChunk) {
    // a. classify the chunk's channels and compact the active ones (kept and non-zero for some
    //    token) with their activations and this tile's span of values.
    const int64_t j = c0 + threadIdx.x;
    float xs[BP];
    bool active = false;
    int32_t lo = 0, hi = 0;
#pragma unroll
    for (int tt = 0; tt < BP; ++tt) xs[tt] = 0.0f;
    unsigned ballot = 0;
    if (threadIdx.x < kChunk) {
      if (j < j_end) {
        lo = __ldg(p.offsets + j * p.tiles + t);
        hi = __ldg(p.offsets + j * p.tiles + t + 1);
        const float thr = p.threshold != nullptr ? p.threshold[j] : 0.0f;
#pragma unroll
        for (int tt = 0; tt < BP; ++tt) {
          if (tt < p.b) {
            const float v = load_as_float(p.x, p.x_dt, tt * p.k + j);
            const float mag = magnitude(v);
            const bool keep = p.threshold != nullptr ? mag > thr
                              : p.tau != nullptr     ? mag >= p.tau[tt]
                                                     : true;
            xs[tt] = keep ? v : 0.0f;
            active = active || xs[tt] != 0.0f;
          }
        }
      }
      ballot = __ballot_sync(kFullMask, active);
      if (lane == 0) s_count[warp] = __popc(ballot);
    }
    __syncthreads();
    int n_act = 0, before = 0;
#pragma unroll
    for (int w = 0; w < kChunk / 32; ++w) {
      before += w < warp ? s_count[w] : 0;
      n_act += s_count[w];
    }
    if (active) {  // only threads < kChunk can be active
      const int pos = before + __popc(ballot & below);
      // A corrupted offset may not move a read out of values or a span past its slot.
      const int64_t clo = lo < 0 ? 0 : (lo > p.nnz ? p.nnz : lo);
      const int64_t chi = hi < clo ? clo : (hi > p.nnz ? p.nnz : hi);
      s_channel[pos] = static_cast<int32_t>(j);
      s_lo[pos] = static_cast<int32_t>(clo);
      s_len[pos] = static_cast<int32_t>(chi - clo < kTileRows ? chi - clo : kTileRows);
#pragma unroll
      for (int tt = 0; tt < BP; ++tt) s_x[pos][tt] = xs[tt];
    }
    __syncthreads();

    // b. stages of G active channels, double-buffered: the copies of stage s + 1 are in flight
    //    while stage s is accumulated.
    if (n_act > 0) issue(0, n_act, 0);
    for (int g0 = 0, buf = 0; g0 < n_act; g0 += G, buf ^= 1) {
      if (g0 + G < n_act) {
        issue(g0 + G, n_act, buf ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      if (warp < G && g0 + warp < n_act) {  // popcount prefixes of the words, one warp a channel
        const uint32_t cnt = __popc(s_word[buf][warp][lane]);
        s_pre[buf][warp][lane] = warp_inclusive_scan(cnt) - cnt;
      }
      __syncthreads();

      // c. accumulate: warp w owns words [4w, 4w + 4) of the tile (128 rows), lane = bit: row
      //    32 q + lane takes the slot's value shift + pre[q] + popc(word_q & lanes below).
      const int ng = n_act - g0 < G ? n_act - g0 : G;
      for (int a = 0; a < ng; ++a) {
        const uint4 words = *reinterpret_cast<const uint4*>(&s_word[buf][a][warp * kWordsPerWarp]);
        const uint4 pres = *reinterpret_cast<const uint4*>(&s_pre[buf][a][warp * kWordsPerWarp]);
        const uint32_t wq[kWordsPerWarp] = {words.x, words.y, words.z, words.w};
        const uint32_t pq[kWordsPerWarp] = {pres.x, pres.y, pres.z, pres.w};
        const V* slot = reinterpret_cast<const V*>(s_vals[buf][a]) + s_shift[buf][a];
        const uint32_t len = uint32_t(s_len[g0 + a]);
        float xv[BP];
#pragma unroll
        for (int tt = 0; tt < BP; ++tt) xv[tt] = s_x[g0 + a][tt];
#pragma unroll
        for (int i = 0; i < kWordsPerWarp; ++i) {
          const uint32_t idx = pq[i] + uint32_t(__popc(wq[i] & below));
          // idx < len: a bitmap with more bits than its span has values reads nothing stale.
          if (((wq[i] >> lane) & 1u) && idx < len) {
            const float v = to_float(slot[idx]);
#pragma unroll
            for (int tt = 0; tt < BP; ++tt) acc[i][tt] = fmaf(xv[tt], v, acc[i][tt]);
          }
        }
      }
      __syncthreads();  // buffer buf is refilled by the stage after next, the lists by the next chunk
    }
  }

  const int64_t ld = p.tiles * (kTileWords * 32);
#pragma unroll
  for (int i = 0; i < kWordsPerWarp; ++i) {
    const int64_t row = t * (kTileWords * 32) + (warp * kWordsPerWarp + i) * 32 + lane;
#pragma unroll
    for (int tt = 0; tt < BP; ++tt) {
      if (tt < p.b) p.partial[(split * p.b + tt) * ld + row] = acc[i][tt];
    }
  }
}

// ---- 3. fixed-order reduction over the splits ------------------------------------------------

// CTA: 32 consecutive outputs (lane) x kReduceWarps warps; warp w sums splits w, w + 8, ... in
// order, with coalesced 128-byte loads, and warp 0 adds the warps' sums in warp order. A fixed
// order, so repeated calls give identical bits.
template <typename Y>
__global__ void __launch_bounds__(kReduceThreads)
    spmspv_reduce_kernel(const float* __restrict__ partial, int64_t splits, int64_t b, int64_t n,
                         int64_t ld, Y* __restrict__ y) {
  constexpr int kReduceWarps = kReduceThreads / 32;
  __shared__ float s_sum[kReduceWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t i = int64_t(blockIdx.x) * 32 + lane;
  float s = 0.0f;
  if (i < b * n) {
    const int64_t tt = i / n, r = i - tt * n;
    const float* src = partial + tt * ld + r;
    const int64_t stride = b * ld;
#pragma unroll 8
    for (int64_t sp = warp; sp < splits; sp += kReduceWarps) s += src[sp * stride];
  }
  s_sum[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && i < b * n) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kReduceWarps; ++w) total += s_sum[w][lane];
    y[i] = from_float<Y>(total);
  }
}

}  // namespace duogpt::cuda::spmspv
