// The solver's column loop over one block, row-parallel (rows of W are independent once U1 and
// P1 are fixed). Compiled with -ffp-contract=off and written in the reference's operation order,
// so it matches duogpt/ops/reference.py::obs_prune_block bit for bit.
#include <omp.h>

#include <cmath>

#include "duogpt/check.h"
#include "duogpt/obs.h"

namespace duogpt {
namespace {

// Score order of torch.argsort(stable=True): ascending, NaN last, ties by index.
inline bool before(const float* s, int64_t c, int64_t a) {
  if (std::isnan(s[c]) || std::isnan(s[a])) return !std::isnan(s[c]) || (std::isnan(s[a]) && c < a);
  return s[c] < s[a] || (s[c] == s[a] && c < a);
}

// The N smallest scores of s[0..M) in that order, as a bit set.
uint64_t nm_prune_bits(const float* s, int64_t M, int64_t N) {
  uint64_t bits = 0;
  for (int64_t a = 0; a < M; ++a) {
    int64_t rank = 0;
    for (int64_t c = 0; c < M; ++c) rank += before(s, c, a);
    if (rank < N) bits |= uint64_t(1) << a;
  }
  return bits;
}

}  // namespace

void check_obs_block(int64_t n, int64_t B, const BlockPruneRule& rule) {
  DUOGPT_CHECK(n > 0 && B > 0, "block must have positive sizes, got ", n, " x ", B);
  if (rule.mask == nullptr) {
    DUOGPT_CHECK(rule.prunen > 0 && rule.prunen < rule.prunem && rule.prunem <= kMaxPruneM &&
                     B % rule.prunem == 0 && rule.score_coef != nullptr,
                 "N:M pruning needs 0 < N < M <= ", kMaxPruneM, ", M dividing the block width ",
                 B, " and score_coef; got ", rule.prunen, ":", rule.prunem);
  }
}

void obs_prune_block_cpu(float* W1, int64_t n, int64_t B, const float* U1, const float* P1,
                         BlockPruneRule rule, float* Err1, float* Wpre1) {
  check_obs_block(n, B, rule);
  // Every error is divided by U1's diagonal: a zero or non-finite entry would turn the rest of
  // the row into Inf/NaN without a word.
  for (int64_t i = 0; i < B; ++i) {
    const float d = U1[i * B + i];
    DUOGPT_CHECK(d > 0.0f && std::isfinite(d), "U1[", i, ", ", i, "] is ", d, ": U1 must be an "
                 "upper Cholesky factor, with a positive finite diagonal (damp H, e.g. a larger "
                 "percdamp, if the factorisation gave this)");
  }
  const bool nm = rule.mask == nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    float* w = W1 + r * B;
    float scores[kMaxPruneM];
    uint64_t nm_bits = 0;
    for (int64_t i = 0; i < B; ++i) {
      if (nm && i % rule.prunem == 0) {
        for (int64_t c = 0; c < rule.prunem; ++c) {
          scores[c] = w[i + c] * w[i + c] * rule.score_coef[i + c];
        }
        nm_bits = nm_prune_bits(scores, rule.prunem, rule.prunen);
      }
      const bool prune = nm ? (nm_bits >> (i % rule.prunem)) & 1 : rule.mask[r * B + i] != 0;
      const float wi = w[i];
      const float q = prune ? 0.0f : wi;
      const float e = (wi - q) / U1[i * B + i];
      w[i] = q;
      Err1[r * B + i] = e;
      Wpre1[r * B + i] = wi;
      const float* u = U1 + i * B;
      if (P1 != nullptr) {
        const float* p = P1 + i * B;
        for (int64_t j = i + 1; j < B; ++j) w[j] -= e * u[j] - wi * p[j];
      } else {
        for (int64_t j = i + 1; j < B; ++j) w[j] -= e * u[j];
      }
    }
  }
}

}  // namespace duogpt
