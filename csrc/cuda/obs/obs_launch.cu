// Host side of the fused block solver: the CPU kernel's checks, the block-width dispatch
// (NC = 32-column chunks per row in {1, 2, 4, 8}: 4 instantiations) and the launch.
#include "duogpt/cuda_api.h"
#include "obs/obs_kernel.cuh"

namespace duogpt {
namespace {

using cuda::obs::kMaxM;
using cuda::obs::kRowsPerBlock;
using cuda::obs::kThreads;

// Shared memory per CTA: the N:M score buffer, one row of kMaxM floats per warp.
constexpr size_t kObsSharedBytes = sizeof(float) * kRowsPerBlock * kMaxM;
static_assert(kObsSharedBytes <= 48 * 1024, "obs kernel must fit the default shared memory");
static_assert(kMaxObsBlock <= 32 * 8, "NC = 8 chunks of 32 columns cover the widest block");

template <int NC>
void launch(const cuda::obs::Params& p, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(cuda::ceil_div(p.n, kRowsPerBlock));
  cuda::obs::obs_prune_block_kernel<NC><<<blocks, kThreads, 0, stream>>>(p);
  DUOGPT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void obs_prune_block_cuda(float* W1, int64_t n, int64_t B, const float* U1, const float* P1,
                          BlockPruneRule rule, float* Err1, float* Wpre1, void* stream) {
  DUOGPT_CHECK(n > 0 && B > 0, "block must have positive sizes, got ", n, " x ", B);
  DUOGPT_CHECK(B <= kMaxObsBlock, "obs_prune_block_cuda handles blocks of at most ", kMaxObsBlock,
               " columns, got ", B);
  DUOGPT_CHECK(cuda::ceil_div(n, kRowsPerBlock) <= 0x7fffffff, "block has too many rows: ", n);
  const bool nm = rule.mask == nullptr;
  if (nm) {
    DUOGPT_CHECK(rule.prunen > 0 && rule.prunen < rule.prunem && rule.prunem <= kMaxM &&
                     B % rule.prunem == 0 && rule.score_coef != nullptr,
                 "N:M pruning needs 0 < N < M <= ", kMaxM, ", M dividing the block width ", B,
                 " and score_coef; got ", rule.prunen, ":", rule.prunem);
  }
  DUOGPT_CHECK(W1 != nullptr && U1 != nullptr && Err1 != nullptr && Wpre1 != nullptr,
               "obs_prune_block_cuda: null pointer argument");
  cuda::obs::Params p{};
  p.W1 = W1;
  p.n = n;
  p.B = static_cast<int>(B);
  p.U1 = U1;
  p.P1 = P1;
  p.mask = rule.mask;
  p.prunen = static_cast<int>(nm ? rule.prunen : 0);
  p.prunem = static_cast<int>(nm ? rule.prunem : 1);
  p.score_coef = rule.score_coef;
  p.Err1 = Err1;
  p.Wpre1 = Wpre1;
  const cudaStream_t s = cuda::as_stream(stream);
  if (B <= 32) {
    launch<1>(p, s);
  } else if (B <= 64) {
    launch<2>(p, s);
  } else if (B <= 128) {
    launch<4>(p, s);
  } else {
    launch<8>(p, s);
  }
}

}  // namespace duogpt
