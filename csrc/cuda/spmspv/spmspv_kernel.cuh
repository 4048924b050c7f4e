// Bitmap spMspV on the GPU, device code only: y [b, n] = sparsify(x) [b, k] @ W^T, b <= 8,
// W in the channel-major bitmap format (docs/format.md), float32 accumulation, deterministic.
//
// Kernels, launched in this order on one stream (spmspv_launch.cu):
//   1. topk_threshold_kernel (top-k rule only): one CTA per token finds the exact value at
//      ascending rank floor(k * p_a) of the rule's magnitude (|x| with NaN above everything, see
//      common.cuh magnitude) by a 4-pass radix select over the
//      magnitudes' bit patterns (256-bin shared histogram, warp-aggregated with __match_any_sync);
//      the token keeps |x| >= that value. Written to the workspace (tau [b]).
//   2. spmspv_kernel: CTA (tile t, split s) owns the 1024 output rows of tile t and the input
//      channels [s * slice, (s + 1) * slice). For each chunk of kChunk channels it
//        a. classifies: two warps evaluate the rule for all b tokens of each channel and compact
//           the active channels (kept and non-zero for some token) with a ballot into shared
//           memory, with their float32 activations. Inactive channels are never read further.
//        b. decodes: one warp per active channel loads the tile's 32 bitmap words (one per lane,
//           coalesced) and the exclusive warp scan of their popcounts, into shared memory.
//        c. accumulates: warp w owns words [4w, 4w + 4) of the tile, i.e. 128 rows, with
//           lane = bit position: row 32 q + lane takes the value at
//           offsets[j * tiles + t] + prefix[q] + popc(word_q & lanes below). A word's values are
//           contiguous, so each load instruction reads one or two 32-byte sectors. Rows whose bit
//           is clear are never touched (a non-finite activation reaches only the non-zero
//           weights of its channel). Accumulators live in registers: 4 words x BP tokens.
//      It then writes its b x 1024 fp32 partial sums (coalesced) to the workspace.
//   3. spmspv_reduce_kernel: y = sum of the partials over the splits in split order, cast to
//      x's dtype. No atomics anywhere: the summation order depends only on the sizes and the SM
//      count, so repeated calls give identical bits.
//
// Bounds: every value load is checked against [0, nnz); bitmap words past the matrix read as 0;
// rows past n are computed into the padded partial rows and never reduced.
#pragma once

#include <cstdint>

#include "common.cuh"
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

template <typename V>
struct ValueLoad;
template <>
struct ValueLoad<float> {
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __ldg(static_cast<const float*>(p) + i);
  }
};
template <>
struct ValueLoad<__half> {
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(p) + i)));
  }
};
template <>
struct ValueLoad<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __uint_as_float(uint32_t(__ldg(static_cast<const unsigned short*>(p) + i)) << 16);
  }
};

// ---- 1. per-token top-k threshold ------------------------------------------------------------

__global__ void __launch_bounds__(kSelectThreads)
    topk_threshold_kernel(const void* __restrict__ x, Dtype x_dt, int64_t k, int64_t drop,
                          float* __restrict__ tau) {
  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_prefix, s_rank;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = blockIdx.x;
  uint32_t prefix = 0, mask = 0, rank = static_cast<uint32_t>(drop);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t base = 0; base < k; base += kSelectThreads) {  // uniform trip count
      const int64_t j = base + threadIdx.x;
      uint32_t key = 256;  // not a candidate of this pass
      if (j < k) {
        const uint32_t bits = magnitude_bits(load_as_float(x, x_dt, row * k + j));
        if ((bits & mask) == prefix) key = (bits >> shift) & 255u;
      }
      const unsigned peers = __match_any_sync(kFullMask, key);
      if (key < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[key], uint32_t(__popc(peers)));
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

template <typename V, int BP>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) spmspv_kernel(const Params p) {
  __shared__ int32_t s_channel[kChunk];
  __shared__ int32_t s_base[kChunk];
  __shared__ int s_count[kChunk / 32];
  __shared__ float s_x[kChunk][BP];
  __shared__ uint2 s_word[kChunk][kTileWords];  // (bitmap word, popcount of the words before it)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = blockIdx.x, split = blockIdx.y;
  const int64_t j_begin = split * p.slice;
  const int64_t j_end = j_begin + p.slice < p.k ? j_begin + p.slice : p.k;
  const uint32_t below = lanemask_lt();
  const uint32_t nnz = static_cast<uint32_t>(p.nnz);  // < 2^31, checked by the launcher

  float acc[kWordsPerWarp][BP];
#pragma unroll
  for (int i = 0; i < kWordsPerWarp; ++i) {
#pragma unroll
    for (int tt = 0; tt < BP; ++tt) acc[i][tt] = 0.0f;
  }

  for (int64_t c0 = j_begin; c0 < j_end; c0 += kChunk) {
    // a. classify and compact the chunk's channels.
    const int64_t j = c0 + threadIdx.x;
    float xs[BP];
    bool active = false;
#pragma unroll
    for (int tt = 0; tt < BP; ++tt) xs[tt] = 0.0f;
    unsigned ballot = 0;
    if (threadIdx.x < kChunk) {
      if (j < j_end) {
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
      s_channel[pos] = static_cast<int32_t>(j);
#pragma unroll
      for (int tt = 0; tt < BP; ++tt) s_x[pos][tt] = xs[tt];
    }
    __syncthreads();

    // b. the tile's bitmap words of every active channel and their popcount prefixes.
    for (int a = warp; a < n_act; a += kWarps) {
      const int64_t ch = s_channel[a];
      const int64_t q = t * kTileWords + lane;
      const uint32_t word = q < p.words ? __ldg(p.bitmap + ch * p.words + q) : 0u;
      const uint32_t cnt = __popc(word);
      s_word[a][lane] = make_uint2(word, warp_inclusive_scan(cnt) - cnt);
      if (lane == 0) s_base[a] = __ldg(p.offsets + ch * p.tiles + t);
    }
    __syncthreads();

    // c. accumulate this warp's 128 rows over the active channels, kChannelUnroll at a time so
    //    that kChannelUnroll * kWordsPerWarp value loads are in flight together.
    constexpr int kUnroll = kChannelUnroll<BP>;
    for (int a = 0; a < n_act; a += kUnroll) {
      float v[kUnroll][kWordsPerWarp];
      bool has[kUnroll][kWordsPerWarp];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int aa = a + u;
        const bool ok = aa < n_act;
        // 32-bit index arithmetic: nnz < 2^31, and a corrupted (negative) base wraps to a huge
        // unsigned value that fails the bound check.
        const uint32_t base = ok ? uint32_t(s_base[aa]) : 0u;
#pragma unroll
        for (int i = 0; i < kWordsPerWarp; ++i) {
          const uint2 wp = ok ? s_word[aa][warp * kWordsPerWarp + i] : make_uint2(0u, 0u);
          const uint32_t idx = base + wp.y + uint32_t(__popc(wp.x & below));
          has[u][i] = ((wp.x >> lane) & 1u) && idx < nnz;
          v[u][i] = has[u][i] ? ValueLoad<V>::load(p.values, idx) : 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int aa = a + u;
        if (aa < n_act) {
          float xv[BP];
#pragma unroll
          for (int tt = 0; tt < BP; ++tt) xv[tt] = s_x[aa][tt];
#pragma unroll
          for (int i = 0; i < kWordsPerWarp; ++i) {
            if (has[u][i]) {
#pragma unroll
              for (int tt = 0; tt < BP; ++tt) acc[i][tt] = fmaf(xv[tt], v[u][i], acc[i][tt]);
            }
          }
        }
      }
    }
    __syncthreads();  // the shared lists are rewritten by the next chunk
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

template <typename Y>
__global__ void __launch_bounds__(kReduceThreads)
    spmspv_reduce_kernel(const float* __restrict__ partial, int64_t splits, int64_t b, int64_t n,
                         int64_t ld, Y* __restrict__ y) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= b * n) return;
  const int64_t tt = i / n, r = i - tt * n;
  const float* src = partial + tt * ld + r;
  const int64_t stride = b * ld;
  float s = 0.0f;
#pragma unroll 4
  for (int64_t sp = 0; sp < splits; ++sp) s += src[sp * stride];
  y[i] = from_float<Y>(s);
}

}  // namespace duogpt::cuda::spmspv
