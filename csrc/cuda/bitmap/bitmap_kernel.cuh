// Bitmap packing on the GPU (docs/format.md), device code only.
//
// Layout and lane mapping. The dense weight is row-major [n, k]; the format is channel-major. A
// 32 x 32 thread block owns 32 channels x one 1024-row offset tile. It walks the tile in 32 steps
// of 32 rows: the block loads a 32-row x 32-channel square (warp = row, lane = channel: coalesced
// reads of w), transposes it through shared memory, and then warp c handles channel c with
// lane = row: a ballot gives the channel's 32-bit bitmap word of that step, and the values are
// written at cursor + popcount(word & lanes below) (coalesced writes of `values`). Lane s keeps
// the word of step s, so the 32 words of a (channel, tile) are stored with one coalesced write.
//
// Kernels:
//   bitmap_index_kernel   bitmap words + per-(channel, tile) counts (into offsets[0, k*tiles))
//   offsets_scan_kernel   one block: counts -> exclusive prefix sum in place, offsets[m] = nnz
//   bitmap_fill_kernel    values, using the offsets of the scan
//   bitmap_unpack_kernel  the inverse: every dense element is written (zeros included)
//
// Elements are moved as raw bits (Raw = uint16_t for fp16/bf16, uint32_t for fp32); a weight is
// non-zero unless its bits without the sign are zero (-0.0 is zero, NaN is not).
#pragma once

#include <cstdint>

#include "common.cuh"
#include "duogpt/bitmap.h"

namespace duogpt::cuda::bitmap {

constexpr int kSide = 32;         // block = kSide x kSide threads, one word = kSide rows
constexpr int kStepsPerTile = 32; // 32 steps of 32 rows = one 1024-row tile
constexpr int kScanThreads = 1024;
constexpr int kScanItems = 4;

template <typename Raw>
__device__ __forceinline__ bool raw_nonzero(uint32_t bits);
template <>
__device__ __forceinline__ bool raw_nonzero<uint16_t>(uint32_t bits) { return (bits & 0x7fffu) != 0; }
template <>
__device__ __forceinline__ bool raw_nonzero<uint32_t>(uint32_t bits) {
  return (bits & 0x7fffffffu) != 0;
}

// Loads the 32 x 32 square (rows row0.., channels j0..) of w into tile[row][channel] as raw bits,
// zero outside the matrix.
template <typename Raw>
__device__ __forceinline__ void load_square(const Raw* __restrict__ w, int64_t n, int64_t k,
                                            int64_t row0, int64_t j0,
                                            uint32_t (&tile)[kSide][kSide + 1]) {
  const int64_t row = row0 + threadIdx.y, col = j0 + threadIdx.x;
  uint32_t v = 0;
  if (row < n && col < k) v = w[row * k + col];
  tile[threadIdx.y][threadIdx.x] = v;
}

template <typename Raw>
__global__ void __launch_bounds__(kSide * kSide)
    bitmap_index_kernel(const Raw* __restrict__ w, int64_t n, int64_t k, int64_t words,
                        int64_t tiles, uint32_t* __restrict__ bitmap, int32_t* __restrict__ counts) {
  __shared__ uint32_t tile[kSide][kSide + 1];
  const int lane = threadIdx.x;
  const int64_t j0 = int64_t(blockIdx.x) * kSide, t = blockIdx.y;
  const int64_t channel = j0 + threadIdx.y;  // the channel this warp packs
  uint32_t my_word = 0;                      // the word of step `lane`
  for (int s = 0; s < kStepsPerTile; ++s) {
    const int64_t row0 = t * kTileRows + int64_t(s) * kSide;
    if (row0 >= n) break;  // uniform over the block
    load_square(w, n, k, row0, j0, tile);
    __syncthreads();
    const uint32_t word = __ballot_sync(kFullMask, raw_nonzero<Raw>(tile[lane][threadIdx.y]));
    if (lane == s) my_word = word;
    __syncthreads();
  }
  if (channel < k) {
    const int64_t q = t * kStepsPerTile + lane;
    if (q < words) bitmap[channel * words + q] = my_word;
    const int count = warp_sum(__popc(my_word));
    if (lane == 0) counts[channel * tiles + t] = count;
  }
}

template <typename Raw>
__global__ void __launch_bounds__(kSide * kSide)
    bitmap_fill_kernel(const Raw* __restrict__ w, int64_t n, int64_t k, int64_t tiles,
                       const int32_t* __restrict__ offsets, int64_t nnz, Raw* __restrict__ values) {
  __shared__ uint32_t tile[kSide][kSide + 1];
  const int lane = threadIdx.x;
  const int64_t j0 = int64_t(blockIdx.x) * kSide, t = blockIdx.y;
  const int64_t channel = j0 + threadIdx.y;
  int64_t cursor = channel < k ? offsets[channel * tiles + t] : 0;
  for (int s = 0; s < kStepsPerTile; ++s) {
    const int64_t row0 = t * kTileRows + int64_t(s) * kSide;
    if (row0 >= n) break;
    load_square(w, n, k, row0, j0, tile);
    __syncthreads();
    const uint32_t bits = tile[lane][threadIdx.y];
    const bool nz = raw_nonzero<Raw>(bits);
    const uint32_t word = __ballot_sync(kFullMask, nz);
    const int64_t idx = cursor + __popc(word & lanemask_lt());
    if (nz && channel < k && idx >= 0 && idx < nnz) values[idx] = static_cast<Raw>(bits);
    cursor += __popc(word);
    __syncthreads();
  }
}

template <typename Raw>
__global__ void __launch_bounds__(kSide * kSide)
    bitmap_unpack_kernel(const uint32_t* __restrict__ bitmap, const Raw* __restrict__ values,
                         const int32_t* __restrict__ offsets, int64_t n, int64_t k, int64_t words,
                         int64_t tiles, int64_t nnz, Raw* __restrict__ w) {
  __shared__ uint32_t tile[kSide][kSide + 1];
  const int lane = threadIdx.x;
  const int64_t j0 = int64_t(blockIdx.x) * kSide, t = blockIdx.y;
  const int64_t channel = j0 + threadIdx.y;
  uint32_t my_word = 0;
  int64_t cursor = 0;
  if (channel < k) {
    const int64_t q = t * kStepsPerTile + lane;
    if (q < words) my_word = bitmap[channel * words + q];
    cursor = offsets[channel * tiles + t];
  }
  for (int s = 0; s < kStepsPerTile; ++s) {
    const int64_t row0 = t * kTileRows + int64_t(s) * kSide;
    if (row0 >= n) break;
    const uint32_t word = __shfl_sync(kFullMask, my_word, s);
    const int64_t idx = cursor + __popc(word & lanemask_lt());
    uint32_t v = 0;
    if (((word >> lane) & 1u) && idx >= 0 && idx < nnz) v = values[idx];
    cursor += __popc(word);
    tile[lane][threadIdx.y] = v;  // [row][channel]
    __syncthreads();
    const int64_t row = row0 + threadIdx.y, col = j0 + threadIdx.x;
    if (row < n && col < k) w[row * k + col] = static_cast<Raw>(tile[threadIdx.y][threadIdx.x]);
    __syncthreads();
  }
}

// One block of kScanThreads: counts[0, m) -> exclusive prefix sums in place (int64 carry),
// data[m] = total (wraps when total >= 2^31; the caller checks *total_out).
__global__ void __launch_bounds__(kScanThreads)
    offsets_scan_kernel(int32_t* __restrict__ data, int64_t m, int64_t* __restrict__ total_out) {
  __shared__ int64_t warp_totals[kScanThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t carry = 0;
  for (int64_t base = 0; base < m; base += int64_t(kScanThreads) * kScanItems) {
    const int64_t i0 = base + int64_t(threadIdx.x) * kScanItems;
    int32_t v[kScanItems];
    int64_t local = 0;
#pragma unroll
    for (int e = 0; e < kScanItems; ++e) {
      v[e] = i0 + e < m ? data[i0 + e] : 0;
      local += v[e];
    }
    const int64_t incl = warp_inclusive_scan(local);
    if (lane == 31) warp_totals[warp] = incl;
    __syncthreads();
    if (warp == 0) warp_totals[lane] = warp_inclusive_scan(warp_totals[lane]);
    __syncthreads();
    int64_t run = carry + (warp > 0 ? warp_totals[warp - 1] : 0) + incl - local;
#pragma unroll
    for (int e = 0; e < kScanItems; ++e) {
      if (i0 + e < m) data[i0 + e] = static_cast<int32_t>(run);
      run += v[e];
    }
    carry += warp_totals[kScanThreads / 32 - 1];
    __syncthreads();  // warp_totals is rewritten by the next round
  }
  if (threadIdx.x == 0) {
    data[m] = static_cast<int32_t>(carry);
    *total_out = carry;
  }
}

}  // namespace duogpt::cuda::bitmap
