// The boundary between the CUDA host API (cuda_api.cpp, compiled by the C++ compiler: argument
// checks, launch plans, exceptions) and the kernel launchers (*_launch.cu, compiled by nvcc).
//
// Launchers are noexcept and return the first failed CUDA call as a LaunchStatus. A C++ exception
// thrown from nvcc-compiled host code crashed the process on one toolchain (gcc 13.3 + nvcc 13.0,
// bench/results/cuda-h100-2026-11-24.md) where the same exception thrown from g++-compiled code
// reached Python, so nothing compiled by nvcc throws. Launchers trust their arguments: cuda_api.cpp
// has checked them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "duogpt/obs.h"
#include "duogpt/spmspv.h"
#include "duogpt/types.h"

namespace duogpt::cuda {

/// The first CUDA call of a launcher that failed (error != cudaSuccess), where, and what it was.
struct LaunchStatus {
  cudaError_t error = cudaSuccess;
  const char* file = "";
  int line = 0;
  const char* call = "";
};

// DUOGPT_CUDA_TRY(expr): in a launcher, return the failure of the CUDA runtime call expr.
#define DUOGPT_CUDA_TRY(expr)                                                 \
  do {                                                                        \
    const cudaError_t duogpt_err_ = (expr);                                   \
    if (duogpt_err_ != cudaSuccess) {                                         \
      return ::duogpt::cuda::LaunchStatus{duogpt_err_, __FILE__, __LINE__, #expr}; \
    }                                                                         \
  } while (0)

// ---- bitmap packing (bitmap/bitmap_launch.cu) -------------------------------------------------

LaunchStatus launch_bitmap_index(const void* w, Dtype dt, int64_t n, int64_t k, int32_t* bitmap,
                                 int32_t* offsets, int64_t* nnz_out, cudaStream_t stream) noexcept;
LaunchStatus launch_bitmap_fill(const void* w, Dtype dt, int64_t n, int64_t k,
                                const int32_t* offsets, int64_t nnz, void* values,
                                cudaStream_t stream) noexcept;
LaunchStatus launch_bitmap_unpack(const int32_t* bitmap, const void* values,
                                  const int32_t* offsets, Dtype dt, int64_t n, int64_t k,
                                  int64_t nnz, void* w, cudaStream_t stream) noexcept;

// ---- decode GEMVs (spmspv/spmspv_launch.cu, dense/dense_gemv_launch.cu) -----------------------

/// The spMspV grid and workspace for one (b, k, n) on one device (cuda_api.cpp::spmspv_plan).
/// Workspace, `bytes` long, 16-byte aligned, uninitialized:
///   [0, kSpmspvTauBytes)      tau [b] fp32, the per-token top-k thresholds (top-k rule only)
///   [kSpmspvTauBytes, bytes)  partial [splits, b, tiles * 1024] fp32, written whole by the
///                             main kernel
struct SpmspvPlan {
  int64_t tiles, splits, slice, bytes;
};
constexpr int64_t kSpmspvTauBytes = 256;

LaunchStatus launch_spmspv(const void* x, Dtype x_dt, int64_t b, int64_t k,
                           const int32_t* bitmap, const void* values, const int32_t* offsets,
                           Dtype v_dt, int64_t n, int64_t nnz, ActivationRule rule, void* y,
                           void* workspace, const SpmspvPlan& plan, cudaStream_t stream) noexcept;

LaunchStatus launch_dense_gemv(const void* x, Dtype x_dt, int64_t b, int64_t k, const void* w,
                               Dtype w_dt, int64_t n, void* y, cudaStream_t stream) noexcept;

// ---- solver (obs/obs_launch.cu) ---------------------------------------------------------------

LaunchStatus launch_obs_prune_block(float* W1, int64_t n, int64_t B, const float* U1,
                                    const float* P1, BlockPruneRule rule, float* Err1,
                                    float* Wpre1, cudaStream_t stream) noexcept;

}  // namespace duogpt::cuda
