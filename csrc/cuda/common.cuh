// Shared by every CUDA kernel family: element conversions between the storage dtypes and float32,
// warp scans, and small host helpers of the launchers. Nothing here allocates, synchronizes,
// prints, exits or throws (launch.h says why nothing compiled by nvcc throws).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "duogpt/types.h"

namespace duogpt::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- host helpers --------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// ---- element conversions (device) ---------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, like torch's float32 -> float16 / bfloat16 casts.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

/// Element i of an activation-like array whose dtype is known only at run time (warp-uniform).
__device__ __forceinline__ float load_as_float(const void* p, Dtype dt, int64_t i) {
  if (dt == Dtype::kFloat32) return static_cast<const float*>(p)[i];
  if (dt == Dtype::kFloat16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ void store_from_float(void* p, Dtype dt, int64_t i, float v) {
  if (dt == Dtype::kFloat32) {
    static_cast<float*>(p)[i] = v;
  } else if (dt == Dtype::kFloat16) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
}

/// The activation rule's magnitude, as duogpt/ops/reference.py::_magnitude computes it: |x| with
/// NaN mapped to +inf, so every non-finite activation ties for the largest magnitude.
__device__ __forceinline__ float magnitude(float v) { return isnan(v) ? INFINITY : fabsf(v); }

/// magnitude(v) as an order-preserving uint32 key: non-negative floats compare like their bits.
__device__ __forceinline__ uint32_t magnitude_bits(float v) {
  return isnan(v) ? 0x7f800000u : (__float_as_uint(v) & 0x7fffffffu);
}

// ---- warp primitives ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const T u = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += u;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFullMask, v, d);
  return v;
}

__device__ __forceinline__ uint32_t lanemask_lt() { return (1u << (threadIdx.x & 31)) - 1u; }

}  // namespace duogpt::cuda
