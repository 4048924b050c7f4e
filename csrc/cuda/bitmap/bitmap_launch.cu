// Launchers of the GPU bitmap packer: grids, dtype dispatch, launches on the caller's stream.
// Packing = index kernel + one-block scan (launch_bitmap_index), then the fill kernel
// (launch_bitmap_fill); the caller reads nnz in between to size `values`. Arguments are checked
// in cuda_api.cpp.
#include "bitmap/bitmap_kernel.cuh"
#include "duogpt/bitmap.h"
#include "launch.h"

namespace duogpt::cuda {
namespace {

using bitmap::kSide;

dim3 pack_grid(int64_t n, int64_t k) {
  return dim3(static_cast<unsigned>(ceil_div(k, kSide)), static_cast<unsigned>(bitmap_tiles(n)));
}

template <typename Raw>
LaunchStatus index_pass(const void* w, int64_t n, int64_t k, int32_t* bitmap, int32_t* offsets,
                        int64_t* nnz_out, cudaStream_t stream) {
  const int64_t words = bitmap_words(n), tiles = bitmap_tiles(n);
  bitmap::bitmap_index_kernel<Raw><<<pack_grid(n, k), dim3(kSide, kSide), 0, stream>>>(
      static_cast<const Raw*>(w), n, k, words, tiles, reinterpret_cast<uint32_t*>(bitmap), offsets);
  DUOGPT_CUDA_TRY(cudaGetLastError());
  bitmap::offsets_scan_kernel<<<1, bitmap::kScanThreads, 0, stream>>>(offsets, k * tiles, nnz_out);
  DUOGPT_CUDA_TRY(cudaGetLastError());
  return {};
}

template <typename Raw>
LaunchStatus fill_pass(const void* w, int64_t n, int64_t k, const int32_t* offsets, int64_t nnz,
                       void* values, cudaStream_t stream) {
  bitmap::bitmap_fill_kernel<Raw><<<pack_grid(n, k), dim3(kSide, kSide), 0, stream>>>(
      static_cast<const Raw*>(w), n, k, bitmap_tiles(n), offsets, nnz, static_cast<Raw*>(values));
  DUOGPT_CUDA_TRY(cudaGetLastError());
  return {};
}

template <typename Raw>
LaunchStatus unpack_pass(const int32_t* bitmap, const void* values, const int32_t* offsets,
                         int64_t n, int64_t k, int64_t nnz, void* w, cudaStream_t stream) {
  bitmap::bitmap_unpack_kernel<Raw><<<pack_grid(n, k), dim3(kSide, kSide), 0, stream>>>(
      reinterpret_cast<const uint32_t*>(bitmap), static_cast<const Raw*>(values), offsets, n, k,
      bitmap_words(n), bitmap_tiles(n), nnz, static_cast<Raw*>(w));
  DUOGPT_CUDA_TRY(cudaGetLastError());
  return {};
}

}  // namespace

LaunchStatus launch_bitmap_index(const void* w, Dtype dt, int64_t n, int64_t k, int32_t* bitmap,
                                 int32_t* offsets, int64_t* nnz_out, cudaStream_t stream) noexcept {
  if (dt == Dtype::kFloat32) return index_pass<uint32_t>(w, n, k, bitmap, offsets, nnz_out, stream);
  return index_pass<uint16_t>(w, n, k, bitmap, offsets, nnz_out, stream);
}

LaunchStatus launch_bitmap_fill(const void* w, Dtype dt, int64_t n, int64_t k,
                                const int32_t* offsets, int64_t nnz, void* values,
                                cudaStream_t stream) noexcept {
  if (dt == Dtype::kFloat32) return fill_pass<uint32_t>(w, n, k, offsets, nnz, values, stream);
  return fill_pass<uint16_t>(w, n, k, offsets, nnz, values, stream);
}

LaunchStatus launch_bitmap_unpack(const int32_t* bitmap, const void* values,
                                  const int32_t* offsets, Dtype dt, int64_t n, int64_t k,
                                  int64_t nnz, void* w, cudaStream_t stream) noexcept {
  if (dt == Dtype::kFloat32) return unpack_pass<uint32_t>(bitmap, values, offsets, n, k, nnz, w, stream);
  return unpack_pass<uint16_t>(bitmap, values, offsets, n, k, nnz, w, stream);
}

}  // namespace duogpt::cuda
