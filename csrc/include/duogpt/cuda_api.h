/// The CUDA kernels' C API: the CPU API (bitmap.h, spmspv.h, obs.h) with device pointers and a
/// trailing `void* stream` (a cudaStream_t). Every function only enqueues work on that stream:
/// no allocation, no host synchronization, so all of them can be captured in a CUDA graph.
/// Sizes are validated on the host (DUOGPT_CHECK -> ArgumentError) before any CUDA call; CUDA
/// failures throw std::runtime_error (both from csrc/cuda/cuda_api.cpp; csrc/cuda/launch.h says
/// why there). The kernels bound-check every global load, so a corrupted packed matrix gives
/// wrong numbers, never an out-of-bounds access.
#pragma once

#include <cstdint>

#include "duogpt/obs.h"
#include "duogpt/spmspv.h"
#include "duogpt/types.h"

namespace duogpt {

// ---- bitmap packing (docs/format.md) -----------------------------------------------------------

/// @brief First packing pass: the bitmap and the offsets of a dense matrix, plus nnz.
/// Unlike bitmap_index_cpu it cannot return nnz without a host sync: it writes it to `nnz_out`.
/// When nnz >= 2^31 the int32 offsets wrap; the caller must check *nnz_out (duogpt/ops does).
void bitmap_index_cuda(const void* w,       // dense weight, row-major [n, k], dtype dt
                       Dtype dt, int64_t n, int64_t k,
                       int32_t* bitmap,     // out: [k, bitmap_words(n)]
                       int32_t* offsets,    // out: [k * bitmap_tiles(n) + 1]
                       int64_t* nnz_out,    // out: [1], the value count (exact, int64)
                       void* stream);

/// @brief Second packing pass: copy the non-zeros of w into values, in format order.
void bitmap_fill_cuda(const void* w,           // dense weight, row-major [n, k], dtype dt
                      Dtype dt, int64_t n, int64_t k,
                      const int32_t* offsets,  // [k * bitmap_tiles(n) + 1] from bitmap_index_cuda
                      int64_t nnz,             // number of values (writes past it are skipped)
                      void* values,            // out: [nnz], dtype dt
                      void* stream);

/// @brief Expand a packed matrix to dense. No validation pass (that would need a host sync):
/// run bitmap_validate_cpu on untrusted data first; reads stay inside [0, nnz) regardless.
void bitmap_unpack_cuda(const int32_t* bitmap,   // [k, bitmap_words(n)]
                        const void* values,      // [nnz], dtype dt
                        const int32_t* offsets,  // [k * bitmap_tiles(n) + 1]
                        Dtype dt, int64_t n, int64_t k, int64_t nnz,
                        void* w,                 // out: row-major [n, k], dtype dt
                        void* stream);

// ---- decode GEMVs -------------------------------------------------------------------------------

/// @brief Bytes of workspace spmspv_cuda needs for these sizes on the current device.
int64_t spmspv_cuda_workspace_bytes(int64_t b, int64_t k, int64_t n);

/// @brief Bitmap spMspV, y = sparsify(x) @ W^T with float32 accumulation (see spmspv_cpu).
/// Channels whose activation is zero (or dropped) for all b tokens are never read. Results are
/// deterministic: partial sums per channel slice are reduced in a fixed order, no atomics.
/// The rule's magnitude is reference.py's |x| with NaN mapped to +inf, as in spmspv_cpu: every
/// non-finite activation ties for the largest magnitude.
void spmspv_cuda(const void* x,            // [b, k], dtype x_dt (y has the same dtype)
                 Dtype x_dt, int64_t b, int64_t k,
                 const int32_t* bitmap,    // [k, bitmap_words(n)]
                 const void* values,       // [nnz], dtype v_dt
                 const int32_t* offsets,   // [k * bitmap_tiles(n) + 1]
                 Dtype v_dt, int64_t n,
                 int64_t nnz,              // values.numel(): loads are bound-checked against it
                 ActivationRule rule,      // rule.threshold is a device pointer [k] fp32
                 void* y,                  // out: [b, n], dtype x_dt
                 void* workspace,          // [workspace_bytes], 16-byte aligned, uninitialized
                 int64_t workspace_bytes,  // >= spmspv_cuda_workspace_bytes(b, k, n)
                 void* stream);

/// @brief Dense GEMV of the same shapes: y = x @ w^T with float32 accumulation.
void dense_gemv_cuda(const void* x,  // [b, k], dtype x_dt (y has the same dtype)
                     Dtype x_dt, int64_t b, int64_t k,
                     const void* w,  // row-major [n, k], dtype w_dt
                     Dtype w_dt, int64_t n,
                     void* y,        // out: [b, n], dtype x_dt
                     void* stream);

// ---- solver -------------------------------------------------------------------------------------

constexpr int64_t kMaxObsBlock = 256;  // the widest block obs_prune_block_cuda accepts

/// @brief Prune one block in place: the solver's column loop (see obs_prune_block_cpu), bit for
/// bit equal to duogpt/ops/reference.py::obs_prune_block (round-to-nearest intrinsics, no FMA
/// contraction). N:M ranks NaN scores above every number, as the reference's sort does.
/// U1's diagonal is not checked (that would wait on the GPU): where it is not positive and
/// finite, that column's errors are non-finite, where obs_prune_block_cpu throws.
void obs_prune_block_cuda(float* W1,         // [n, B] fp32, in: block weights, out: pruned block
                          int64_t n, int64_t B,  // 1 <= B <= kMaxObsBlock
                          const float* U1,   // [B, B] fp32, upper Cholesky factor of H^-1 block
                          const float* P1,   // [B, B] fp32 compensation term, or nullptr
                          BlockPruneRule rule,  // device pointers: mask [n, B], score_coef [B]
                          float* Err1,       // out: [n, B] fp32, e per column
                          float* Wpre1,      // out: [n, B] fp32, w per column (pre-decision)
                          void* stream);

}  // namespace duogpt
