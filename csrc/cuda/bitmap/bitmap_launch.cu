// Host side of the GPU bitmap packer: size checks, grids, dtype dispatch, launches on the caller's
// stream. Packing = index kernel + one-block scan (bitmap_index_cuda), then the fill kernel
// (bitmap_fill_cuda); the caller reads nnz in between to size `values`.
#include "bitmap/bitmap_kernel.cuh"
#include "duogpt/bitmap.h"
#include "duogpt/cuda_api.h"

namespace duogpt {
namespace {

using cuda::as_stream;
using cuda::ceil_div;
using cuda::bitmap::kSide;

void check_sizes(Dtype dt, int64_t n, int64_t k) {
  DUOGPT_CHECK(valid_dtype(int64_t(dt)), "unknown dtype code ", int64_t(dt));
  DUOGPT_CHECK(n > 0 && k > 0, "weight must have positive sizes, got ", n, " x ", k);
  DUOGPT_CHECK(bitmap_tiles(n) <= 65535, "out_features ", n, " exceeds the GPU packer's limit of ",
               65535 * kTileRows, " rows");
  DUOGPT_CHECK(ceil_div(k, kSide) <= 0x7fffffff, "in_features ", k, " is too large");
}

dim3 pack_grid(int64_t n, int64_t k) {
  return dim3(static_cast<unsigned>(ceil_div(k, kSide)), static_cast<unsigned>(bitmap_tiles(n)));
}

template <typename Raw>
void launch_index(const void* w, int64_t n, int64_t k, int32_t* bitmap, int32_t* offsets,
                  int64_t* nnz_out, cudaStream_t stream) {
  const int64_t words = bitmap_words(n), tiles = bitmap_tiles(n);
  cuda::bitmap::bitmap_index_kernel<Raw><<<pack_grid(n, k), dim3(kSide, kSide), 0, stream>>>(
      static_cast<const Raw*>(w), n, k, words, tiles, reinterpret_cast<uint32_t*>(bitmap), offsets);
  DUOGPT_CUDA_CHECK(cudaGetLastError());
  cuda::bitmap::offsets_scan_kernel<<<1, cuda::bitmap::kScanThreads, 0, stream>>>(
      offsets, k * tiles, nnz_out);
  DUOGPT_CUDA_CHECK(cudaGetLastError());
}

template <typename Raw>
void launch_fill(const void* w, int64_t n, int64_t k, const int32_t* offsets, int64_t nnz,
                 void* values, cudaStream_t stream) {
  cuda::bitmap::bitmap_fill_kernel<Raw><<<pack_grid(n, k), dim3(kSide, kSide), 0, stream>>>(
      static_cast<const Raw*>(w), n, k, bitmap_tiles(n), offsets, nnz, static_cast<Raw*>(values));
  DUOGPT_CUDA_CHECK(cudaGetLastError());
}

template <typename Raw>
void launch_unpack(const int32_t* bitmap, const void* values, const int32_t* offsets, int64_t n,
                   int64_t k, int64_t nnz, void* w, cudaStream_t stream) {
  cuda::bitmap::bitmap_unpack_kernel<Raw><<<pack_grid(n, k), dim3(kSide, kSide), 0, stream>>>(
      reinterpret_cast<const uint32_t*>(bitmap), static_cast<const Raw*>(values), offsets, n, k,
      bitmap_words(n), bitmap_tiles(n), nnz, static_cast<Raw*>(w));
  DUOGPT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void bitmap_index_cuda(const void* w, Dtype dt, int64_t n, int64_t k, int32_t* bitmap,
                       int32_t* offsets, int64_t* nnz_out, void* stream) {
  check_sizes(dt, n, k);
  DUOGPT_CHECK(w != nullptr && bitmap != nullptr && offsets != nullptr && nnz_out != nullptr,
               "bitmap_index_cuda: null pointer argument");
  if (dt == Dtype::kFloat32) {
    launch_index<uint32_t>(w, n, k, bitmap, offsets, nnz_out, as_stream(stream));
  } else {
    launch_index<uint16_t>(w, n, k, bitmap, offsets, nnz_out, as_stream(stream));
  }
}

void bitmap_fill_cuda(const void* w, Dtype dt, int64_t n, int64_t k, const int32_t* offsets,
                      int64_t nnz, void* values, void* stream) {
  check_sizes(dt, n, k);
  DUOGPT_CHECK(nnz >= 0 && nnz < (int64_t(1) << 31), "nnz must be in [0, 2^31), got ", nnz);
  if (nnz == 0) return;  // nothing to write (values may be a null pointer)
  DUOGPT_CHECK(w != nullptr && offsets != nullptr && values != nullptr,
               "bitmap_fill_cuda: null pointer argument");
  if (dt == Dtype::kFloat32) {
    launch_fill<uint32_t>(w, n, k, offsets, nnz, values, as_stream(stream));
  } else {
    launch_fill<uint16_t>(w, n, k, offsets, nnz, values, as_stream(stream));
  }
}

void bitmap_unpack_cuda(const int32_t* bitmap, const void* values, const int32_t* offsets,
                        Dtype dt, int64_t n, int64_t k, int64_t nnz, void* w, void* stream) {
  check_sizes(dt, n, k);
  DUOGPT_CHECK(nnz >= 0 && nnz < (int64_t(1) << 31), "nnz must be in [0, 2^31), got ", nnz);
  DUOGPT_CHECK(bitmap != nullptr && offsets != nullptr && w != nullptr &&
                   (values != nullptr || nnz == 0),
               "bitmap_unpack_cuda: null pointer argument");
  if (dt == Dtype::kFloat32) {
    launch_unpack<uint32_t>(bitmap, values, offsets, n, k, nnz, w, as_stream(stream));
  } else {
    launch_unpack<uint16_t>(bitmap, values, offsets, n, k, nnz, w, as_stream(stream));
  }
}

}  // namespace duogpt
