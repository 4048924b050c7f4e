// Dense decode GEMV on the GPU, device code only: y [b, n] = x [b, k] @ w [n, k]^T, b <= 8,
// float32 accumulation. The like-for-like baseline of spmspv for the Python op (the C++
// benchmark compares against cuBLAS instead).
//
// Lane mapping: one warp per output row. In the vector path (k a multiple of the vector width,
// x and w 16-byte aligned) each lane loads 16 bytes of the row per step (8 fp16/bf16 or 4 fp32
// weights) and the matching activations of each token; otherwise one element per lane per step.
// The lanes' sums are combined with a fixed xor-shuffle tree (deterministic) and lane 0 stores y
// in x's dtype. Rows past n exit before any load.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace duogpt::cuda::dense {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;

// 8 packed 16-bit floats -> float32.
__device__ __forceinline__ void unpack8(const uint4 q, bool bf16, float (&out)[8]) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const uint32_t lo = words[e] & 0xffffu, hi = words[e] >> 16;
    out[2 * e] = bf16 ? __uint_as_float(lo << 16) : __half2float(__ushort_as_half((unsigned short)lo));
    out[2 * e + 1] = bf16 ? __uint_as_float(hi << 16) : __half2float(__ushort_as_half((unsigned short)hi));
  }
}

template <typename W>
struct WeightVec;
template <>
struct WeightVec<float> {
  static constexpr int kWidth = 4;
  static __device__ __forceinline__ void load(const float* p, float (&out)[4]) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = q.x;
    out[1] = q.y;
    out[2] = q.z;
    out[3] = q.w;
  }
};
template <>
struct WeightVec<__half> {
  static constexpr int kWidth = 8;
  static __device__ __forceinline__ void load(const __half* p, float (&out)[8]) {
    unpack8(__ldg(reinterpret_cast<const uint4*>(p)), false, out);
  }
};
template <>
struct WeightVec<__nv_bfloat16> {
  static constexpr int kWidth = 8;
  static __device__ __forceinline__ void load(const __nv_bfloat16* p, float (&out)[8]) {
    unpack8(__ldg(reinterpret_cast<const uint4*>(p)), true, out);
  }
};

// N consecutive activations starting at element i (i a multiple of N, base 16-byte aligned).
template <int N>
__device__ __forceinline__ void load_x_vec(const void* x, Dtype dt, int64_t i, float (&out)[N]) {
  if (dt == Dtype::kFloat32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(x) + i);
#pragma unroll
    for (int v = 0; v < N / 4; ++v) {
      const float4 q = __ldg(p + v);
      out[4 * v] = q.x;
      out[4 * v + 1] = q.y;
      out[4 * v + 2] = q.z;
      out[4 * v + 3] = q.w;
    }
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(x) + i;
    const bool bf16 = dt == Dtype::kBFloat16;
    if constexpr (N == 8) {
      unpack8(__ldg(reinterpret_cast<const uint4*>(h)), bf16, out);
    } else {
      static_assert(N == 4, "vector width is 4 or 8");
      const uint2 q = __ldg(reinterpret_cast<const uint2*>(h));
      float tmp[8];
      unpack8(make_uint4(q.x, q.y, 0u, 0u), bf16, tmp);
#pragma unroll
      for (int e = 0; e < 4; ++e) out[e] = tmp[e];
    }
  }
}

template <typename W, int BP>
__global__ void __launch_bounds__(kThreads)
    dense_gemv_kernel(const void* __restrict__ x, Dtype x_dt, int b, int64_t k,
                      const W* __restrict__ w, int64_t n, void* __restrict__ y, bool vec) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + warp;
  if (row >= n) return;  // uniform over the warp
  const W* wr = w + row * k;
  float acc[BP];
#pragma unroll
  for (int tt = 0; tt < BP; ++tt) acc[tt] = 0.0f;
  if (vec) {
    constexpr int N = WeightVec<W>::kWidth;
#pragma unroll 2
    for (int64_t c = int64_t(lane) * N; c < k; c += 32 * N) {
      float wv[N];
      WeightVec<W>::load(wr + c, wv);
#pragma unroll
      for (int tt = 0; tt < BP; ++tt) {
        if (tt < b) {
          float xv[N];
          load_x_vec<N>(x, x_dt, tt * k + c, xv);
#pragma unroll
          for (int e = 0; e < N; ++e) acc[tt] = fmaf(xv[e], wv[e], acc[tt]);
        }
      }
    }
  } else {
    for (int64_t c = lane; c < k; c += 32) {
      const float wv = to_float(wr[c]);
#pragma unroll
      for (int tt = 0; tt < BP; ++tt) {
        if (tt < b) acc[tt] = fmaf(load_as_float(x, x_dt, tt * k + c), wv, acc[tt]);
      }
    }
  }
#pragma unroll
  for (int tt = 0; tt < BP; ++tt) {
    const float s = warp_sum(acc[tt]);
    if (lane == 0 && tt < b) store_from_float(y, x_dt, tt * n + row, s);
  }
}

}  // namespace duogpt::cuda::dense
