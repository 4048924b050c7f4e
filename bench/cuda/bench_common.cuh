// Shared by the CUDA benchmarks: device buffers, a deterministic parallel RNG, the L2 flush,
// the per-repetition CUDA-event timer and the device sheet. Benchmarks are programs: they print,
// and main() turns any exception into a non-zero exit.
#pragma once

#include <cuda_runtime.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"  // from the duogpt_cuda library's include path
#include "duogpt/check.h"

// BENCH_CUDA_CHECK(expr): throw std::runtime_error("file:line: CUDA error ...") unless expr
// returns cudaSuccess.
#define BENCH_CUDA_CHECK(expr)                                                              \
  do {                                                                                      \
    const cudaError_t bench_err_ = (expr);                                                  \
    if (bench_err_ != cudaSuccess) {                                                        \
      throw std::runtime_error(::duogpt::detail::concat(__FILE__, __LINE__, "CUDA error ",  \
                                                        cudaGetErrorName(bench_err_), " (", \
                                                        cudaGetErrorString(bench_err_), ") in ", #expr)); \
    }                                                                                       \
  } while (0)

namespace duogpt::bench {

template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t count = 0) { resize(count); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void resize(size_t count) {
    release();
    count_ = count;
    if (count > 0) BENCH_CUDA_CHECK(cudaMalloc(&ptr_, count * sizeof(T)));
  }
  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }
  void upload(const std::vector<T>& h) {
    BENCH_CUDA_CHECK(cudaMemcpy(ptr_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> h(count_);
    if (count_ > 0) BENCH_CUDA_CHECK(cudaMemcpy(h.data(), ptr_, bytes(), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  void release() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// ---- deterministic random numbers, independent of the thread count ------------------------------

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
inline float uniform01(uint64_t seed, uint64_t i) {
  return float(splitmix64(seed * 0x632be59bd9b4e019ull ^ i) >> 40) * 0x1p-24f;
}
inline float normal(uint64_t seed, uint64_t i) {
  const float u1 = std::max(uniform01(seed, 2 * i), 1e-7f), u2 = uniform01(seed, 2 * i + 1);
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853f * u2);
}

// ---- timing -------------------------------------------------------------------------------------

struct Timing {
  double min_us = 0, mean_us = 0;
};

__global__ void l2_flush_kernel(const int4* __restrict__ p, size_t n, int* sink) {
  int acc = 0;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const int4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x5eed5eed) *sink = acc;  // keeps the loads alive; practically never taken
}

/// Times a launch sequence `reps` times, each preceded (outside the timed interval) by a read of
/// a buffer of 4x the L2 size, so every repetition starts with cold weights. Events of all
/// repetitions are queued first and read after one synchronization: no host sync between reps.
class Timer {
 public:
  Timer(cudaStream_t stream, int reps, int warmup) : stream_(stream), reps_(reps), warmup_(warmup) {
    int device = 0, l2 = 0;
    BENCH_CUDA_CHECK(cudaGetDevice(&device));
    BENCH_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    flush_.resize(std::max<size_t>(size_t(4) * size_t(l2), size_t(64) << 20) / sizeof(int4));
    BENCH_CUDA_CHECK(cudaMemset(flush_.get(), 1, flush_.bytes()));
    sink_.resize(1);
    events_.resize(2 * size_t(reps));
    for (auto& e : events_) BENCH_CUDA_CHECK(cudaEventCreate(&e));
  }
  ~Timer() {
    for (auto& e : events_) cudaEventDestroy(e);
  }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  void flush() {
    l2_flush_kernel<<<1024, 256, 0, stream_>>>(flush_.get(), flush_.size(), sink_.get());
    BENCH_CUDA_CHECK(cudaGetLastError());
  }

  template <typename F>
  Timing run(F&& launch, bool flush_l2 = true) {
    return run(launch, flush_l2, [] {});
  }

  /// As run(launch, flush_l2), with before() enqueued ahead of every repetition, untimed (e.g. to
  /// restore an input that the launch updates in place).
  template <typename F, typename B>
  Timing run(F&& launch, bool flush_l2, B&& before) {
    for (int i = 0; i < warmup_; ++i) {
      before();
      launch();
    }
    for (int r = 0; r < reps_; ++r) {
      before();
      if (flush_l2) flush();
      BENCH_CUDA_CHECK(cudaEventRecord(events_[2 * r], stream_));
      launch();
      BENCH_CUDA_CHECK(cudaEventRecord(events_[2 * r + 1], stream_));
    }
    BENCH_CUDA_CHECK(cudaStreamSynchronize(stream_));
    Timing t;
    t.min_us = 1e30;
    for (int r = 0; r < reps_; ++r) {
      float ms = 0;
      BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[2 * r], events_[2 * r + 1]));
      t.min_us = std::min(t.min_us, 1e3 * ms);
      t.mean_us += 1e3 * ms / reps_;
    }
    return t;
  }

 private:
  cudaStream_t stream_;
  int reps_, warmup_;
  DeviceBuffer<int4> flush_;
  DeviceBuffer<int> sink_;
  std::vector<cudaEvent_t> events_;
};

/// Captures `launch` (which must enqueue on `stream`) into an instantiated CUDA graph.
template <typename F>
cudaGraphExec_t capture_graph(cudaStream_t stream, F&& launch) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  BENCH_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  launch();
  BENCH_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  BENCH_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  BENCH_CUDA_CHECK(cudaGraphDestroy(graph));
  return exec;
}

// ---- device sheet --------------------------------------------------------------------------------

struct DeviceSheet {
  std::string name;
  int sms = 0, l2_bytes = 0;
  double copy_gbps = 0;  // measured device-to-device copy, counting read + write bytes
};

inline DeviceSheet device_sheet(cudaStream_t stream) {
  DeviceSheet d;
  int device = 0;
  BENCH_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  BENCH_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  d.name = prop.name;
  d.sms = prop.multiProcessorCount;
  d.l2_bytes = prop.l2CacheSize;
  const size_t bytes = size_t(512) << 20;
  DeviceBuffer<char> src(bytes), dst(bytes);
  BENCH_CUDA_CHECK(cudaMemset(src.get(), 1, bytes));
  Timer timer(stream, 20, 3);
  const Timing t = timer.run([&] {
    BENCH_CUDA_CHECK(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, stream));
  }, false);
  d.copy_gbps = 2.0 * double(bytes) / (t.min_us * 1e3);
  return d;
}

inline std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace duogpt::bench
