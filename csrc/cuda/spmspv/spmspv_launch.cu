// Launcher of the bitmap spMspV: the top-k threshold, main and reduce kernels on one stream, with
// the grid and workspace of the plan cuda_api.cpp made (launch.h::SpmspvPlan). Instantiations:
// main kernel 3 value dtypes x BP in {1, 2, 4, 8} (b rounded up; padded tokens have zero
// activations and are never stored) = 12; reduce kernel 3; top-k kernel 1.
#include <atomic>

#include "duogpt/bitmap.h"
#include "launch.h"
#include "spmspv/spmspv_kernel.cuh"

namespace duogpt::cuda {
namespace {

using namespace spmspv;  // NOLINT: kernels and tile constants of this family

template <typename V, int BP>
LaunchStatus launch_main_bp(const Params& p, dim3 grid, cudaStream_t stream) {
  // Prefer shared memory to L1 (the kernel stages its values through shared memory and reads
  // little else), so that five CTAs fit an SM. The attribute belongs to the current device's copy
  // of the kernel: set once per device (a bit each, devices 0-63; others on every call), or again
  // on the next call after a failure; concurrent first calls set the same value.
  static std::atomic<uint64_t> carveout_set{0};
  int device = 0;
  DUOGPT_CUDA_TRY(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (!(carveout_set.load(std::memory_order_relaxed) & bit)) {
    DUOGPT_CUDA_TRY(cudaFuncSetAttribute(spmspv_kernel<V, BP>,
                                         cudaFuncAttributePreferredSharedMemoryCarveout,
                                         int(cudaSharedmemCarveoutMaxShared)));
    carveout_set.fetch_or(bit, std::memory_order_relaxed);
  }
  spmspv_kernel<V, BP><<<grid, kThreads, 0, stream>>>(p);
  DUOGPT_CUDA_TRY(cudaGetLastError());
  return {};
}

template <typename V>
LaunchStatus launch_main(const Params& p, dim3 grid, cudaStream_t stream) {
  if (p.b == 1) return launch_main_bp<V, 1>(p, grid, stream);
  if (p.b == 2) return launch_main_bp<V, 2>(p, grid, stream);
  if (p.b <= 4) return launch_main_bp<V, 4>(p, grid, stream);
  return launch_main_bp<V, 8>(p, grid, stream);
}

template <typename Y>
LaunchStatus launch_reduce(const float* partial, int64_t splits, int64_t b, int64_t n, int64_t ld,
                           void* y, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(ceil_div(b * n, 32));
  spmspv_reduce_kernel<Y><<<blocks, kReduceThreads, 0, stream>>>(partial, splits, b, n, ld,
                                                                 static_cast<Y*>(y));
  DUOGPT_CUDA_TRY(cudaGetLastError());
  return {};
}

}  // namespace

LaunchStatus launch_spmspv(const void* x, Dtype x_dt, int64_t b, int64_t k,
                           const int32_t* bitmap, const void* values, const int32_t* offsets,
                           Dtype v_dt, int64_t n, int64_t nnz, ActivationRule rule, void* y,
                           void* workspace, const SpmspvPlan& plan, cudaStream_t stream) noexcept {
  auto* ws = static_cast<char*>(workspace);
  float* tau = nullptr;
  const int64_t drop = rule.topk_fraction >= 0.0 ? topk_drop(k, rule.topk_fraction) : 0;
  if (rule.threshold == nullptr && drop > 0) {
    tau = reinterpret_cast<float*>(ws);
    topk_threshold_kernel<<<static_cast<unsigned>(b), kSelectThreads, 0, stream>>>(x, x_dt, k,
                                                                                   drop, tau);
    DUOGPT_CUDA_TRY(cudaGetLastError());
  }

  Params p{};
  p.x = x;
  p.x_dt = x_dt;
  p.b = static_cast<int>(b);
  p.k = k;
  p.bitmap = reinterpret_cast<const uint32_t*>(bitmap);
  p.values = values;
  p.offsets = offsets;
  p.nnz = nnz;
  p.n = n;
  p.words = bitmap_words(n);
  p.tiles = plan.tiles;
  p.threshold = rule.threshold;
  p.tau = tau;
  p.partial = reinterpret_cast<float*>(ws + kSpmspvTauBytes);
  p.slice = plan.slice;
  const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.splits));
  LaunchStatus status;
  if (v_dt == Dtype::kFloat32) {
    status = launch_main<float>(p, grid, stream);
  } else if (v_dt == Dtype::kFloat16) {
    status = launch_main<__half>(p, grid, stream);
  } else {
    status = launch_main<__nv_bfloat16>(p, grid, stream);
  }
  if (status.error != cudaSuccess) return status;

  const int64_t ld = plan.tiles * kTileRows;
  if (x_dt == Dtype::kFloat32) return launch_reduce<float>(p.partial, plan.splits, b, n, ld, y, stream);
  if (x_dt == Dtype::kFloat16) return launch_reduce<__half>(p.partial, plan.splits, b, n, ld, y, stream);
  return launch_reduce<__nv_bfloat16>(p.partial, plan.splits, b, n, ld, y, stream);
}

}  // namespace duogpt::cuda
