// Host side of the dense decode GEMV: checks, vector-path choice, dispatch over the weight dtype
// and the padded token count BP in {1, 2, 4, 8} (12 instantiations).
#include "dense/dense_gemv_kernel.cuh"
#include "duogpt/cuda_api.h"

namespace duogpt {
namespace {

using cuda::dense::dense_gemv_kernel;
using cuda::dense::kRowsPerBlock;
using cuda::dense::kThreads;

template <typename W, int BP>
void launch_bp(const void* x, Dtype x_dt, int64_t b, int64_t k, const void* w, int64_t n, void* y,
               bool vec, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(cuda::ceil_div(n, kRowsPerBlock));
  dense_gemv_kernel<W, BP><<<blocks, kThreads, 0, stream>>>(
      x, x_dt, static_cast<int>(b), k, static_cast<const W*>(w), n, y, vec);
  DUOGPT_CUDA_CHECK(cudaGetLastError());
}

template <typename W>
void launch(const void* x, Dtype x_dt, int64_t b, int64_t k, const void* w, int64_t n, void* y,
            cudaStream_t stream) {
  constexpr int64_t width = cuda::dense::WeightVec<W>::kWidth;
  const bool vec = k % width == 0 && cuda::aligned16(x) && cuda::aligned16(w);
  if (b == 1) {
    launch_bp<W, 1>(x, x_dt, b, k, w, n, y, vec, stream);
  } else if (b == 2) {
    launch_bp<W, 2>(x, x_dt, b, k, w, n, y, vec, stream);
  } else if (b <= 4) {
    launch_bp<W, 4>(x, x_dt, b, k, w, n, y, vec, stream);
  } else {
    launch_bp<W, 8>(x, x_dt, b, k, w, n, y, vec, stream);
  }
}

}  // namespace

void dense_gemv_cuda(const void* x, Dtype x_dt, int64_t b, int64_t k, const void* w, Dtype w_dt,
                     int64_t n, void* y, void* stream) {
  DUOGPT_CHECK(valid_dtype(int64_t(x_dt)) && valid_dtype(int64_t(w_dt)), "unknown dtype code");
  DUOGPT_CHECK(b >= 1 && b <= kMaxTokens, "b must be in [1, ", kMaxTokens, "], got ", b);
  DUOGPT_CHECK(k > 0 && n > 0, "sizes must be positive, got k=", k, " n=", n);
  DUOGPT_CHECK(cuda::ceil_div(n, kRowsPerBlock) <= 0x7fffffff, "out_features ", n, " is too large");
  DUOGPT_CHECK(x != nullptr && w != nullptr && y != nullptr, "dense_gemv_cuda: null pointer argument");
  const cudaStream_t s = cuda::as_stream(stream);
  switch (w_dt) {
    case Dtype::kFloat32: launch<float>(x, x_dt, b, k, w, n, y, s); break;
    case Dtype::kFloat16: launch<__half>(x, x_dt, b, k, w, n, y, s); break;
    case Dtype::kBFloat16: launch<__nv_bfloat16>(x, x_dt, b, k, w, n, y, s); break;
  }
}

}  // namespace duogpt
