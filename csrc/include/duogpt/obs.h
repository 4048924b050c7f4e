/// The solver's column loop over one block of B columns (docs/algorithm.md 3.5, step 6.3).
#pragma once

#include <cstdint>

namespace duogpt {

constexpr int64_t kMaxPruneM = 64;  // N:M groups: M <= 64, one 64-bit word of decisions

/// Which weights a block prunes: a mask chosen before the loop, or an N:M rule applied inside
/// the loop on the updated weights (score = W1^2 * score_coef, the N smallest of every M).
struct BlockPruneRule {
  const uint8_t* mask = nullptr;         // [n, B], 1 = prune; or nullptr for N:M
  int64_t prunen = 0, prunem = 0;        // N:M when mask is nullptr
  const float* score_coef = nullptr;     // [B] per-column score factor, N:M only
};

/// @brief Throw ArgumentError unless an n x B block and `rule` are valid (CPU and CUDA kernels).
void check_obs_block(int64_t n, int64_t B, const BlockPruneRule& rule);

/// @brief Prune one block in place. For each column i, with w = W1[:, i] before its decision:
///   q = w with pruned entries zeroed; e = (w - q) / U1[i, i];
///   W1[:, i] = q;  W1[:, j] -= e * U1[i, j] - w * P1[i, j]   for j > i.
/// Rows are independent and run in parallel. Throws ArgumentError, before touching W1, unless
/// U1's diagonal is positive and finite.
void obs_prune_block_cpu(float* W1,         // [n, B] fp32, in: block weights, out: pruned block
                         int64_t n, int64_t B,
                         const float* U1,   // [B, B] fp32, upper Cholesky factor of H^-1 block
                         const float* P1,   // [B, B] fp32 compensation term, or nullptr (SparseGPT)
                         BlockPruneRule rule,
                         float* Err1,       // out: [n, B] fp32, e per column
                         float* Wpre1);     // out: [n, B] fp32, w per column (pre-decision)

}  // namespace duogpt
