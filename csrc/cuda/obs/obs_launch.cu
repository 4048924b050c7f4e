// Launcher of the fused block solver: the block-width dispatch (NC = 32-column chunks per row in
// {1, 2, 4, 8}: 4 instantiations). Arguments are checked in cuda_api.cpp.
#include "duogpt/cuda_api.h"
#include "launch.h"
#include "obs/obs_kernel.cuh"

namespace duogpt::cuda {
namespace {

using obs::kMaxM;
using obs::kRowsPerBlock;
using obs::kThreads;

// Shared memory per CTA: the N:M score buffer, one row of kMaxM floats per warp.
constexpr size_t kObsSharedBytes = sizeof(float) * kRowsPerBlock * kMaxM;
static_assert(kObsSharedBytes <= 48 * 1024, "obs kernel must fit the default shared memory");
static_assert(kMaxObsBlock <= 32 * 8, "NC = 8 chunks of 32 columns cover the widest block");

template <int NC>
LaunchStatus launch(const obs::Params& p, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(ceil_div(p.n, kRowsPerBlock));
  obs::obs_prune_block_kernel<NC><<<blocks, kThreads, 0, stream>>>(p);
  DUOGPT_CUDA_TRY(cudaGetLastError());
  return {};
}

}  // namespace

LaunchStatus launch_obs_prune_block(float* W1, int64_t n, int64_t B, const float* U1,
                                    const float* P1, BlockPruneRule rule, float* Err1,
                                    float* Wpre1, cudaStream_t stream) noexcept {
  const bool nm = rule.mask == nullptr;
  obs::Params p{};
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
  if (B <= 32) return launch<1>(p, stream);
  if (B <= 64) return launch<2>(p, stream);
  if (B <= 128) return launch<4>(p, stream);
  return launch<8>(p, stream);
}

}  // namespace duogpt::cuda
