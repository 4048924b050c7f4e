// The CUDA kernels' C API (duogpt/cuda_api.h), host side, compiled by the C++ compiler: argument
// checks (ArgumentError), launch plans and the translation of a launcher's CUDA failure into
// std::runtime_error. The launches themselves are in the *_launch.cu files (see launch.h for why
// the split).
#include "duogpt/cuda_api.h"

#include <atomic>
#include <stdexcept>

#include "duogpt/bitmap.h"
#include "duogpt/check.h"
#include "launch.h"
#include "spmspv/spmspv_heuristics.h"

namespace duogpt {
namespace {

// CUDA's grid limits. Sizes up to kMaxGridX keep every launch's grid in range, whatever rows or
// channels a block of that kernel covers.
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridY = 65535;

void throw_if_failed(const cuda::LaunchStatus& status) {
  if (status.error != cudaSuccess) {
    throw std::runtime_error(detail::concat(status.file, status.line, "CUDA error ",
                                            cudaGetErrorName(status.error), " (",
                                            cudaGetErrorString(status.error), ") in ",
                                            status.call));
  }
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

void check_pack_sizes(Dtype dt, int64_t n, int64_t k) {
  DUOGPT_CHECK(valid_dtype(int64_t(dt)), "unknown dtype code ", int64_t(dt));
  DUOGPT_CHECK(n > 0 && k > 0, "weight must have positive sizes, got ", n, " x ", k);
  DUOGPT_CHECK(bitmap_tiles(n) <= kMaxGridY, "out_features ", n,
               " exceeds the GPU packer's limit of ", kMaxGridY * kTileRows, " rows");
  DUOGPT_CHECK(k <= kMaxGridX, "in_features ", k, " is too large");
}

void check_nnz(int64_t nnz) {
  DUOGPT_CHECK(nnz >= 0 && nnz < (int64_t(1) << 31), "nnz must be in [0, 2^31), got ", nnz);
}

// The GEMVs' shared checks (spmspv.h), plus sizes that fit the grids.
void check_cuda_gemv_sizes(int64_t b, int64_t k, int64_t n) {
  check_gemv_sizes(b, k, n);
  DUOGPT_CHECK(k <= kMaxGridX && n <= kMaxGridX, "sizes must be below 2^31, got k=", k, " n=", n);
}

/// Number of SMs of the current device (no synchronization, legal while a stream is being
/// captured). Queried once per device: every spMspV call of a decode step plans twice (workspace
/// size, then launch).
int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices] = {};  // 0: not queried yet
  int device = 0;
  throw_if_failed({cudaGetDevice(&device), __FILE__, __LINE__, "cudaGetDevice"});
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    if (const int sms = known[device].load(std::memory_order_relaxed); sms > 0) return sms;
  }
  int sms = 0;
  throw_if_failed({cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), __FILE__,
                   __LINE__, "cudaDeviceGetAttribute(MultiProcessorCount)"});
  sms = sms > 0 ? sms : 1;
  if (cached) known[device].store(sms, std::memory_order_relaxed);
  return sms;
}

cuda::SpmspvPlan spmspv_plan(int64_t b, int64_t k, int64_t n) {
  cuda::SpmspvPlan plan{};
  plan.tiles = bitmap_tiles(n);
  plan.splits = cuda::spmspv::choose_splits(b, k, n, sm_count());
  plan.slice = cuda::spmspv::slice_channels(k, plan.splits);
  plan.bytes = cuda::kSpmspvTauBytes + plan.splits * b * plan.tiles * kTileRows * int64_t(sizeof(float));
  return plan;
}

}  // namespace

// ---- bitmap packing -----------------------------------------------------------------------------

void bitmap_index_cuda(const void* w, Dtype dt, int64_t n, int64_t k, int32_t* bitmap,
                       int32_t* offsets, int64_t* nnz_out, void* stream) {
  check_pack_sizes(dt, n, k);
  DUOGPT_CHECK(w != nullptr && bitmap != nullptr && offsets != nullptr && nnz_out != nullptr,
               "bitmap_index_cuda: null pointer argument");
  throw_if_failed(cuda::launch_bitmap_index(w, dt, n, k, bitmap, offsets, nnz_out,
                                            as_stream(stream)));
}

void bitmap_fill_cuda(const void* w, Dtype dt, int64_t n, int64_t k, const int32_t* offsets,
                      int64_t nnz, void* values, void* stream) {
  check_pack_sizes(dt, n, k);
  check_nnz(nnz);
  if (nnz == 0) return;  // nothing to write (values may be a null pointer)
  DUOGPT_CHECK(w != nullptr && offsets != nullptr && values != nullptr,
               "bitmap_fill_cuda: null pointer argument");
  throw_if_failed(cuda::launch_bitmap_fill(w, dt, n, k, offsets, nnz, values, as_stream(stream)));
}

void bitmap_unpack_cuda(const int32_t* bitmap, const void* values, const int32_t* offsets,
                        Dtype dt, int64_t n, int64_t k, int64_t nnz, void* w, void* stream) {
  check_pack_sizes(dt, n, k);
  check_nnz(nnz);
  DUOGPT_CHECK(bitmap != nullptr && offsets != nullptr && w != nullptr &&
                   (values != nullptr || nnz == 0),
               "bitmap_unpack_cuda: null pointer argument");
  throw_if_failed(cuda::launch_bitmap_unpack(bitmap, values, offsets, dt, n, k, nnz, w,
                                             as_stream(stream)));
}

// ---- decode GEMVs -------------------------------------------------------------------------------

int64_t spmspv_cuda_workspace_bytes(int64_t b, int64_t k, int64_t n) {
  check_cuda_gemv_sizes(b, k, n);
  return spmspv_plan(b, k, n).bytes;
}

void spmspv_cuda(const void* x, Dtype x_dt, int64_t b, int64_t k, const int32_t* bitmap,
                 const void* values, const int32_t* offsets, Dtype v_dt, int64_t n, int64_t nnz,
                 ActivationRule rule, void* y, void* workspace, int64_t workspace_bytes,
                 void* stream) {
  check_gemv_dtypes(x_dt, v_dt);
  check_cuda_gemv_sizes(b, k, n);
  check_nnz(nnz);
  check_activation_rule(rule);
  DUOGPT_CHECK(x != nullptr && bitmap != nullptr && offsets != nullptr && y != nullptr &&
                   (values != nullptr || nnz == 0),
               "spmspv_cuda: null pointer argument");
  DUOGPT_CHECK(workspace != nullptr, "spmspv_cuda: null workspace");
  DUOGPT_CHECK(reinterpret_cast<std::uintptr_t>(workspace) % 16 == 0,
               "spmspv_cuda: the workspace must be 16-byte aligned");
  const cuda::SpmspvPlan plan = spmspv_plan(b, k, n);
  DUOGPT_CHECK(workspace_bytes >= plan.bytes, "spmspv_cuda needs ", plan.bytes,
               " bytes of workspace, got ", workspace_bytes);
  throw_if_failed(cuda::launch_spmspv(x, x_dt, b, k, bitmap, values, offsets, v_dt, n, nnz, rule,
                                      y, workspace, plan, as_stream(stream)));
}

void dense_gemv_cuda(const void* x, Dtype x_dt, int64_t b, int64_t k, const void* w, Dtype w_dt,
                     int64_t n, void* y, void* stream) {
  check_gemv_dtypes(x_dt, w_dt);
  check_cuda_gemv_sizes(b, k, n);
  DUOGPT_CHECK(x != nullptr && w != nullptr && y != nullptr,
               "dense_gemv_cuda: null pointer argument");
  throw_if_failed(cuda::launch_dense_gemv(x, x_dt, b, k, w, w_dt, n, y, as_stream(stream)));
}

// ---- solver -------------------------------------------------------------------------------------

void obs_prune_block_cuda(float* W1, int64_t n, int64_t B, const float* U1, const float* P1,
                          BlockPruneRule rule, float* Err1, float* Wpre1, void* stream) {
  check_obs_block(n, B, rule);
  DUOGPT_CHECK(B <= kMaxObsBlock, "obs_prune_block_cuda handles blocks of at most ", kMaxObsBlock,
               " columns, got ", B);
  DUOGPT_CHECK(n <= kMaxGridX, "block has too many rows: ", n);
  DUOGPT_CHECK(W1 != nullptr && U1 != nullptr && Err1 != nullptr && Wpre1 != nullptr,
               "obs_prune_block_cuda: null pointer argument");
  throw_if_failed(cuda::launch_obs_prune_block(W1, n, B, U1, P1, rule, Err1, Wpre1,
                                               as_stream(stream)));
}

}  // namespace duogpt
