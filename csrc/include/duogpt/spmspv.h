/// Decode-time GEMVs: y (b x n) = sparsify(x) (b x k) @ W^T, with fp32 accumulation.
#pragma once

#include <cstdint>

#include "duogpt/types.h"

namespace duogpt {

constexpr int64_t kMaxTokens = 8;  // b: the decode batch the GEMV kernels are written for

/// @brief Throw ArgumentError unless the dtype codes are known, 1 <= b <= kMaxTokens and k, n > 0
/// (the CPU and CUDA GEMVs).
void check_gemv_dtypes(Dtype x_dt, Dtype w_dt);
void check_gemv_sizes(int64_t b, int64_t k, int64_t n);

/// Activation rule fused into spmspv. Exactly one of the two is active, or neither (keep all).
struct ActivationRule {
  const float* threshold = nullptr;  // [k] fp32: keep x[t, j] iff |x[t, j]| > threshold[j]
  double topk_fraction = -1.0;       // in [0, 1): per token, zero the floor(k * p_a) smallest |x|
};

/// @brief The activations per token that the top-k rule drops: floor(k * p_a), at most k - 1 (the
/// product may round up to k for p_a just below 1). 0 keeps every activation: no selection runs.
inline int64_t topk_drop(int64_t k, double topk_fraction) {
  const auto drop = static_cast<int64_t>(double(k) * topk_fraction);
  return drop < k - 1 ? drop : k - 1;
}

/// @brief Throw ArgumentError unless at most one rule is given and a top-k fraction is below 1
/// (the CPU and CUDA spMspV).
void check_activation_rule(const ActivationRule& rule);

/// @brief Bitmap spMspV. Channels whose activation is zero for all b tokens are never read.
/// Non-finite activations count as the largest magnitudes: they are kept and propagate into y
/// through the non-zero weights of their channel.
/// Offsets that do not start at 0, end at nnz and ascend between channels raise ArgumentError
/// (checked as the channels are listed, at no extra cost). The bitmap is not validated per call
/// (bitmap_validate_cpu does that once): whatever its bits, no read leaves values[0, nnz), and an
/// inconsistent bitmap only gives a wrong y.
void spmspv_cpu(const void* x,            // [b, k], dtype x_dt (y has the same dtype)
                Dtype x_dt, int64_t b, int64_t k,
                const int32_t* bitmap,    // [k, bitmap_words(n)]
                const void* values,       // [nnz], dtype v_dt
                const int32_t* offsets,   // [k * bitmap_tiles(n) + 1]
                Dtype v_dt, int64_t n,
                int64_t nnz,              // the length of values
                ActivationRule rule,
                void* y);                 // out: [b, n], dtype x_dt

/// @brief Dense GEMV of the same shapes: the like-for-like baseline.
void dense_gemv_cpu(const void* x,  // [b, k], dtype x_dt (y has the same dtype)
                    Dtype x_dt, int64_t b, int64_t k,
                    const void* w,  // row-major [n, k], dtype w_dt
                    Dtype w_dt, int64_t n,
                    void* y);       // out: [b, n], dtype x_dt

}  // namespace duogpt
