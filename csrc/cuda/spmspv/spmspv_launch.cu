// Host side of the bitmap spMspV: checks, workspace layout, grids and dispatch.
//
// Workspace (bytes, 16-byte aligned, uninitialized; spmspv_cuda_workspace_bytes):
//   [0, 256)          tau [b] fp32, the per-token top-k thresholds (top-k rule only)
//   [256, ...)        partial [splits, b, tiles * 1024] fp32, written whole by the main kernel
// Instantiations: main kernel 3 value dtypes x BP in {1, 2, 4, 8} (b rounded up; padded tokens
// have zero activations and are never stored) = 12; reduce kernel 3; top-k kernel 1.
#include <cmath>

#include "duogpt/bitmap.h"
#include "duogpt/cuda_api.h"
#include "spmspv/spmspv_heuristics.h"
#include "spmspv/spmspv_kernel.cuh"

namespace duogpt {
namespace {

using namespace cuda::spmspv;  // NOLINT: kernels and tile constants of this family

constexpr int64_t kTauBytes = 256;

struct Plan {
  int64_t tiles, splits, slice, bytes;
};

Plan make_plan(int64_t b, int64_t k, int64_t n) {
  Plan plan{};
  plan.tiles = bitmap_tiles(n);
  plan.splits = choose_splits(b, k, n, cuda::sm_count());
  plan.slice = slice_channels(k, plan.splits);
  plan.bytes = kTauBytes + plan.splits * b * plan.tiles * kTileRows * int64_t(sizeof(float));
  return plan;
}

void check_sizes(int64_t b, int64_t k, int64_t n) {
  DUOGPT_CHECK(b >= 1 && b <= kMaxTokens, "b must be in [1, ", kMaxTokens, "], got ", b);
  DUOGPT_CHECK(k > 0 && n > 0, "sizes must be positive, got k=", k, " n=", n);
  DUOGPT_CHECK(k <= 0x7fffffff && n <= 0x7fffffff, "sizes must be below 2^31, got k=", k,
               " n=", n);
}

template <typename V, int BP>
void launch_main_bp(const Params& p, dim3 grid, cudaStream_t stream) {
  // Prefer shared memory to L1 (the kernel stages its values through shared memory and reads
  // little else), so that five CTAs fit an SM. Set once per process: a preference, not a need.
  static const bool carveout = [] {
    DUOGPT_CUDA_CHECK(cudaFuncSetAttribute(spmspv_kernel<V, BP>,
                                           cudaFuncAttributePreferredSharedMemoryCarveout,
                                           int(cudaSharedmemCarveoutMaxShared)));
    return true;
  }();
  (void)carveout;
  spmspv_kernel<V, BP><<<grid, kThreads, 0, stream>>>(p);
  DUOGPT_CUDA_CHECK(cudaGetLastError());
}

template <typename V>
void launch_main(const Params& p, dim3 grid, cudaStream_t stream) {
  if (p.b == 1) {
    launch_main_bp<V, 1>(p, grid, stream);
  } else if (p.b == 2) {
    launch_main_bp<V, 2>(p, grid, stream);
  } else if (p.b <= 4) {
    launch_main_bp<V, 4>(p, grid, stream);
  } else {
    launch_main_bp<V, 8>(p, grid, stream);
  }
}

template <typename Y>
void launch_reduce(const float* partial, int64_t splits, int64_t b, int64_t n, int64_t ld, void* y,
                   cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(cuda::ceil_div(b * n, 32));
  spmspv_reduce_kernel<Y><<<blocks, kReduceThreads, 0, stream>>>(partial, splits, b, n, ld,
                                                                 static_cast<Y*>(y));
  DUOGPT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int64_t spmspv_cuda_workspace_bytes(int64_t b, int64_t k, int64_t n) {
  check_sizes(b, k, n);
  return make_plan(b, k, n).bytes;
}

void spmspv_cuda(const void* x, Dtype x_dt, int64_t b, int64_t k, const int32_t* bitmap,
                 const void* values, const int32_t* offsets, Dtype v_dt, int64_t n, int64_t nnz,
                 ActivationRule rule, void* y, void* workspace, int64_t workspace_bytes,
                 void* stream) {
  DUOGPT_CHECK(valid_dtype(int64_t(x_dt)) && valid_dtype(int64_t(v_dt)), "unknown dtype code");
  check_sizes(b, k, n);
  DUOGPT_CHECK(nnz >= 0 && nnz < (int64_t(1) << 31), "nnz must be in [0, 2^31), got ", nnz);
  DUOGPT_CHECK(rule.threshold == nullptr || rule.topk_fraction < 0.0,
               "give either a threshold or a top-k fraction, not both");
  DUOGPT_CHECK(rule.topk_fraction < 1.0, "topk_fraction must be in [0, 1), got ",
               rule.topk_fraction);
  DUOGPT_CHECK(x != nullptr && bitmap != nullptr && offsets != nullptr && y != nullptr &&
                   (values != nullptr || nnz == 0),
               "spmspv_cuda: null pointer argument");
  const Plan plan = make_plan(b, k, n);
  DUOGPT_CHECK(workspace != nullptr && workspace_bytes >= plan.bytes, "spmspv_cuda needs ",
               plan.bytes, " bytes of workspace, got ", workspace_bytes);
  DUOGPT_CHECK(cuda::aligned16(workspace), "spmspv_cuda: the workspace must be 16-byte aligned");
  const cudaStream_t s = cuda::as_stream(stream);

  auto* ws = static_cast<char*>(workspace);
  float* tau = nullptr;
  if (rule.threshold == nullptr && rule.topk_fraction >= 0.0) {
    tau = reinterpret_cast<float*>(ws);
    int64_t drop = static_cast<int64_t>(std::floor(double(k) * rule.topk_fraction));
    drop = drop < 0 ? 0 : (drop > k - 1 ? k - 1 : drop);
    topk_threshold_kernel<<<static_cast<unsigned>(b), kSelectThreads, 0, s>>>(x, x_dt, k, drop,
                                                                              tau);
    DUOGPT_CUDA_CHECK(cudaGetLastError());
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
  p.partial = reinterpret_cast<float*>(ws + kTauBytes);
  p.slice = plan.slice;
  const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.splits));
  switch (v_dt) {
    case Dtype::kFloat32: launch_main<float>(p, grid, s); break;
    case Dtype::kFloat16: launch_main<__half>(p, grid, s); break;
    case Dtype::kBFloat16: launch_main<__nv_bfloat16>(p, grid, s); break;
  }

  const int64_t ld = plan.tiles * kTileRows;
  switch (x_dt) {
    case Dtype::kFloat32: launch_reduce<float>(p.partial, plan.splits, b, n, ld, y, s); break;
    case Dtype::kFloat16: launch_reduce<__half>(p.partial, plan.splits, b, n, ld, y, s); break;
    case Dtype::kBFloat16: launch_reduce<__nv_bfloat16>(p.partial, plan.splits, b, n, ld, y, s); break;
  }
}

}  // namespace duogpt
