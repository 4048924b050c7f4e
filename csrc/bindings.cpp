// pybind11 bindings: pointers and sizes as integers onto the C API, nothing else. Tensors are
// validated in duogpt/ops; the C++ side re-checks sizes and raises ValueError (ArgumentError).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "duogpt/bitmap.h"
#include "duogpt/check.h"
#include "duogpt/cpu_features.h"
#include "duogpt/obs.h"
#include "duogpt/spmspv.h"
#if defined(DUOGPT_WITH_CUDA)
#include "duogpt/cuda_api.h"
#endif

namespace py = pybind11;
using duogpt::Dtype;
using std::uintptr_t;

namespace {

template <typename T>
T* p(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

Dtype dtype(int64_t code) {
  DUOGPT_CHECK(duogpt::valid_dtype(code), "unknown dtype code ", code);
  return static_cast<Dtype>(code);
}

duogpt::ActivationRule rule(uintptr_t threshold, double topk_fraction) {
  return {p<const float>(threshold), topk_fraction};
}

duogpt::BlockPruneRule block_rule(uintptr_t mask, int64_t prunen, int64_t prunem,
                                  uintptr_t score_coef) {
  return {p<const uint8_t>(mask), prunen, prunem, p<const float>(score_coef)};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "duogpt native kernels (pointer-level API; use duogpt.ops)";
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("bitmap_index_cpu", [](uintptr_t w, int64_t dt, int64_t n, int64_t k, uintptr_t bitmap,
                               uintptr_t offsets) {
    return duogpt::bitmap_index_cpu(p<const void>(w), dtype(dt), n, k, p<int32_t>(bitmap),
                                    p<int32_t>(offsets));
  }, nogil);
  m.def("bitmap_fill_cpu", [](uintptr_t w, int64_t dt, int64_t n, int64_t k, uintptr_t offsets,
                              uintptr_t values) {
    duogpt::bitmap_fill_cpu(p<const void>(w), dtype(dt), n, k, p<const int32_t>(offsets),
                            p<void>(values));
  }, nogil);
  m.def("bitmap_validate_cpu", [](uintptr_t bitmap, uintptr_t offsets, int64_t n, int64_t k,
                                  int64_t nnz) {
    duogpt::bitmap_validate_cpu(p<const int32_t>(bitmap), p<const int32_t>(offsets), n, k, nnz);
  }, nogil);
  m.def("bitmap_unpack_cpu", [](uintptr_t bitmap, uintptr_t values, uintptr_t offsets, int64_t dt,
                                int64_t n, int64_t k, int64_t nnz, uintptr_t w) {
    duogpt::bitmap_unpack_cpu(p<const int32_t>(bitmap), p<const void>(values),
                              p<const int32_t>(offsets), dtype(dt), n, k, nnz, p<void>(w));
  }, nogil);
  m.def("spmspv_cpu", [](uintptr_t x, int64_t x_dt, int64_t b, int64_t k, uintptr_t bitmap,
                         uintptr_t values, uintptr_t offsets, int64_t v_dt, int64_t n,
                         uintptr_t threshold, double topk_fraction, uintptr_t y, int64_t nnz) {
    duogpt::spmspv_cpu(p<const void>(x), dtype(x_dt), b, k, p<const int32_t>(bitmap),
                       p<const void>(values), p<const int32_t>(offsets), dtype(v_dt), n, nnz,
                       rule(threshold, topk_fraction), p<void>(y));
  }, nogil);
  m.def("dense_gemv_cpu", [](uintptr_t x, int64_t x_dt, int64_t b, int64_t k, uintptr_t w,
                             int64_t w_dt, int64_t n, uintptr_t y) {
    duogpt::dense_gemv_cpu(p<const void>(x), dtype(x_dt), b, k, p<const void>(w), dtype(w_dt), n,
                           p<void>(y));
  }, nogil);
  m.def("obs_prune_block_cpu", [](uintptr_t W1, int64_t n, int64_t B, uintptr_t U1, uintptr_t P1,
                                  uintptr_t mask, int64_t prunen, int64_t prunem,
                                  uintptr_t score_coef, uintptr_t Err1, uintptr_t Wpre1) {
    duogpt::obs_prune_block_cpu(p<float>(W1), n, B, p<const float>(U1), p<const float>(P1),
                                block_rule(mask, prunen, prunem, score_coef), p<float>(Err1),
                                p<float>(Wpre1));
  }, nogil);

  m.def("supported_cpu_isas", &duogpt::supported_cpu_isas);
  m.def("cpu_isa", &duogpt::cpu_isa);
  m.def("set_cpu_isa", &duogpt::set_cpu_isa);
  m.def("cpu_features", &duogpt::cpu_features);

#if defined(DUOGPT_WITH_CUDA)
  m.def("cuda_compiled", [] { return true; });
  m.def("cuda_archs", [] { return std::string(DUOGPT_CUDA_ARCHS); });
  m.attr("max_obs_block") = duogpt::kMaxObsBlock;
  // CUDA kernels: device pointers and the cudaStream_t as integers; each call only enqueues work.
  m.def("bitmap_index_cuda", [](uintptr_t w, int64_t dt, int64_t n, int64_t k, uintptr_t bitmap,
                                uintptr_t offsets, uintptr_t nnz_out, uintptr_t stream) {
    duogpt::bitmap_index_cuda(p<const void>(w), dtype(dt), n, k, p<int32_t>(bitmap),
                              p<int32_t>(offsets), p<int64_t>(nnz_out), p<void>(stream));
  }, nogil);
  m.def("bitmap_fill_cuda", [](uintptr_t w, int64_t dt, int64_t n, int64_t k, uintptr_t offsets,
                               int64_t nnz, uintptr_t values, uintptr_t stream) {
    duogpt::bitmap_fill_cuda(p<const void>(w), dtype(dt), n, k, p<const int32_t>(offsets), nnz,
                             p<void>(values), p<void>(stream));
  }, nogil);
  m.def("bitmap_unpack_cuda", [](uintptr_t bitmap, uintptr_t values, uintptr_t offsets, int64_t dt,
                                 int64_t n, int64_t k, int64_t nnz, uintptr_t w, uintptr_t stream) {
    duogpt::bitmap_unpack_cuda(p<const int32_t>(bitmap), p<const void>(values),
                               p<const int32_t>(offsets), dtype(dt), n, k, nnz, p<void>(w),
                               p<void>(stream));
  }, nogil);
  m.def("spmspv_cuda_workspace_bytes", &duogpt::spmspv_cuda_workspace_bytes, nogil);
  m.def("spmspv_cuda", [](uintptr_t x, int64_t x_dt, int64_t b, int64_t k, uintptr_t bitmap,
                          uintptr_t values, uintptr_t offsets, int64_t v_dt, int64_t n,
                          uintptr_t threshold, double topk_fraction, uintptr_t y, int64_t nnz,
                          uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
    duogpt::spmspv_cuda(p<const void>(x), dtype(x_dt), b, k, p<const int32_t>(bitmap),
                        p<const void>(values), p<const int32_t>(offsets), dtype(v_dt), n, nnz,
                        rule(threshold, topk_fraction), p<void>(y), p<void>(workspace),
                        workspace_bytes, p<void>(stream));
  }, nogil);
  m.def("dense_gemv_cuda", [](uintptr_t x, int64_t x_dt, int64_t b, int64_t k, uintptr_t w,
                              int64_t w_dt, int64_t n, uintptr_t y, uintptr_t stream) {
    duogpt::dense_gemv_cuda(p<const void>(x), dtype(x_dt), b, k, p<const void>(w), dtype(w_dt), n,
                            p<void>(y), p<void>(stream));
  }, nogil);
  m.def("obs_prune_block_cuda", [](uintptr_t W1, int64_t n, int64_t B, uintptr_t U1, uintptr_t P1,
                                   uintptr_t mask, int64_t prunen, int64_t prunem,
                                   uintptr_t score_coef, uintptr_t Err1, uintptr_t Wpre1,
                                   uintptr_t stream) {
    duogpt::obs_prune_block_cuda(p<float>(W1), n, B, p<const float>(U1), p<const float>(P1),
                                 block_rule(mask, prunen, prunem, score_coef), p<float>(Err1),
                                 p<float>(Wpre1), p<void>(stream));
  }, nogil);
#else
  m.def("cuda_compiled", [] { return false; });
  m.def("cuda_archs", [] { return std::string(); });
#endif
}
