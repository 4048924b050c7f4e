// Launcher of the dense decode GEMV: vector-path choice and dispatch over the weight dtype and
// the padded token count BP in {1, 2, 4, 8} (12 instantiations). Arguments are checked in
// cuda_api.cpp.
#include "dense/dense_gemv_kernel.cuh"
#include "launch.h"

namespace duogpt::cuda {
namespace {

using dense::dense_gemv_kernel;
using dense::kRowsPerBlock;
using dense::kThreads;

template <typename W, int BP>
LaunchStatus launch_bp(const void* x, Dtype x_dt, int64_t b, int64_t k, const void* w, int64_t n,
                       void* y, bool vec, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(ceil_div(n, kRowsPerBlock));
  dense_gemv_kernel<W, BP><<<blocks, kThreads, 0, stream>>>(
      x, x_dt, static_cast<int>(b), k, static_cast<const W*>(w), n, y, vec);
  DUOGPT_CUDA_TRY(cudaGetLastError());
  return {};
}

template <typename W>
LaunchStatus launch(const void* x, Dtype x_dt, int64_t b, int64_t k, const void* w, int64_t n,
                    void* y, cudaStream_t stream) {
  constexpr int64_t width = dense::WeightVec<W>::kWidth;
  const bool vec = k % width == 0 && aligned16(x) && aligned16(w);
  if (b == 1) return launch_bp<W, 1>(x, x_dt, b, k, w, n, y, vec, stream);
  if (b == 2) return launch_bp<W, 2>(x, x_dt, b, k, w, n, y, vec, stream);
  if (b <= 4) return launch_bp<W, 4>(x, x_dt, b, k, w, n, y, vec, stream);
  return launch_bp<W, 8>(x, x_dt, b, k, w, n, y, vec, stream);
}

}  // namespace

LaunchStatus launch_dense_gemv(const void* x, Dtype x_dt, int64_t b, int64_t k, const void* w,
                               Dtype w_dt, int64_t n, void* y, cudaStream_t stream) noexcept {
  if (w_dt == Dtype::kFloat32) return launch<float>(x, x_dt, b, k, w, n, y, stream);
  if (w_dt == Dtype::kFloat16) return launch<__half>(x, x_dt, b, k, w, n, y, stream);
  return launch<__nv_bfloat16>(x, x_dt, b, k, w, n, y, stream);
}

}  // namespace duogpt::cuda
