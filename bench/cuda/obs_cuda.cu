// Solver block benchmark on the GPU: duogpt's fused obs_prune_block_cuda against an eager
// column loop, for 4096 x 128 and 11008 x 128 blocks (LLaMA-2-7B layer heights), SparseGPT
// (no P1) and DuoGPT (with P1), unstructured mask and 2:4.
//
// The eager loop is what PyTorch eager does, reduced to its minimum: per column one kernel that
// decides the column (q, e, Err1, Wpre1) and one kernel for the rank-1 update of the columns to
// its right, plus one scoring kernel every M columns for N:M, i.e. 2-3 launches per column where
// PyTorch launches 6-10; it is therefore a lower bound of the eager time. It is timed both as
// launched on a stream and replayed from a CUDA graph (MoE-Quant's remedy). All three are checked
// bit for bit against obs_prune_block_cpu before timing (exit 1 on a mismatch). Each repetition
// restores W1 first (outside the timed interval); no L2 flush, since in the solver the block was
// just written by the previous block's lazy update and is hot.
//
// Usage: obs_cuda [--reps N] [--json PATH]
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "bench_common.cuh"
#include "duogpt/cuda_api.h"
#include "duogpt/obs.h"

namespace duogpt::bench {
namespace {

constexpr int kEagerThreads = 256;

// Column i: q, e = (w - q) / U1[i, i], W1[:, i] = q, Err1, Wpre1 (one thread per row).
// prune[r * prune_ld + prune_col] != 0 prunes row r.
__global__ void eager_decide_kernel(float* W1, int64_t n, int B, int i, const float* U1,
                                    const uint8_t* prune, int prune_ld, int prune_col, float* Err1,
                                    float* Wpre1) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const float w = W1[r * B + i];
  const float q = prune[r * prune_ld + prune_col] ? 0.0f : w;
  const float e = __fdiv_rn(__fsub_rn(w, q), U1[int64_t(i) * B + i]);
  W1[r * B + i] = q;
  Err1[r * B + i] = e;
  Wpre1[r * B + i] = w;
}

// W1[:, j] -= e * U1[i, j] - w * P1[i, j] for j > i (one thread per element).
__global__ void eager_update_kernel(float* W1, int64_t n, int B, int i, const float* U1,
                                    const float* P1, const float* Err1, const float* Wpre1) {
  const int width = B - i - 1;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (width <= 0 || idx >= n * width) return;
  const int64_t r = idx / width;
  const int j = i + 1 + int(idx - r * width);
  float update = __fmul_rn(Err1[r * B + i], U1[int64_t(i) * B + j]);
  if (P1 != nullptr) update = __fsub_rn(update, __fmul_rn(Wpre1[r * B + i], P1[int64_t(i) * B + j]));
  W1[r * B + j] = __fsub_rn(W1[r * B + j], update);
}

// N:M at column i: prune[r, c] for the group's M columns, the N lowest (w^2 * coef), ties by index.
__global__ void eager_nm_kernel(const float* W1, int64_t n, int B, int i, int N, int M,
                                const float* coef, uint8_t* prune) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  float s[64];
  for (int c = 0; c < M; ++c) {
    const float w = W1[r * B + i + c];
    s[c] = __fmul_rn(__fmul_rn(w, w), coef[i + c]);
  }
  for (int a = 0; a < M; ++a) {
    int rank = 0;
    for (int c = 0; c < M; ++c) rank += s[c] < s[a] || (s[c] == s[a] && c < a);
    prune[r * M + a] = rank < N;
  }
}

struct Case {
  int64_t n;
  int B;
  bool with_P, nm;
};

struct Result {
  Case c;
  Timing fused, eager, eager_graph;
};

class ObsBench {
 public:
  ObsBench(int reps, cudaStream_t stream) : stream_(stream), timer_(stream, reps, std::max(5, reps / 50)) {}

  Result run(const Case& c) {
    const int64_t n = c.n, nb = n * c.B;
    const int B = c.B;
    // A well-conditioned block: U1 upper triangular with a dominant diagonal; P1 small.
    std::vector<float> W(size_t(nb), 0.0f), U(size_t(B) * B, 0.0f), P(size_t(B) * B, 0.0f);
    std::vector<float> coef(static_cast<size_t>(B));
    std::vector<uint8_t> mask(static_cast<size_t>(nb));
    for (int64_t i = 0; i < nb; ++i) {
      W[i] = normal(11, uint64_t(i));
      mask[i] = uniform01(12, uint64_t(i)) < 0.5f;
    }
    for (int i = 0; i < B; ++i) {
      U[size_t(i) * B + i] = 0.5f + uniform01(13, uint64_t(i));
      coef[i] = 1.0f / (U[size_t(i) * B + i] * U[size_t(i) * B + i]);
      for (int j = i + 1; j < B; ++j) {
        U[size_t(i) * B + j] = 0.1f * normal(14, uint64_t(i) * B + j);
        P[size_t(i) * B + j] = 0.01f * normal(15, uint64_t(i) * B + j);
      }
    }
    const BlockPruneRule rule_h = c.nm ? BlockPruneRule{nullptr, 2, 4, coef.data()}
                                       : BlockPruneRule{mask.data(), 0, 0, nullptr};
    std::vector<float> want_W(W), want_E(static_cast<size_t>(nb)), want_P(static_cast<size_t>(nb));
    obs_prune_block_cpu(want_W.data(), n, B, U.data(), c.with_P ? P.data() : nullptr, rule_h,
                        want_E.data(), want_P.data());

    DeviceBuffer<float> d_W0(nb), d_W(nb), d_E(nb), d_Pre(nb), d_U(U.size()), d_P(P.size()), d_coef(B);
    DeviceBuffer<uint8_t> d_mask(nb), d_nm(size_t(n) * 4);
    d_W0.upload(W);
    d_U.upload(U);
    d_P.upload(P);
    d_coef.upload(coef);
    d_mask.upload(mask);
    const float* P1 = c.with_P ? d_P.get() : nullptr;
    const BlockPruneRule rule_d = c.nm ? BlockPruneRule{nullptr, 2, 4, d_coef.get()}
                                       : BlockPruneRule{d_mask.get(), 0, 0, nullptr};
    auto restore = [&] {
      BENCH_CUDA_CHECK(cudaMemcpyAsync(d_W.get(), d_W0.get(), nb * sizeof(float),
                                       cudaMemcpyDeviceToDevice, stream_));
    };
    auto fused = [&] {
      obs_prune_block_cuda(d_W.get(), n, B, d_U.get(), P1, rule_d, d_E.get(), d_Pre.get(), stream_);
    };
    auto eager = [&] {
      const auto rows = static_cast<unsigned>(cuda::ceil_div(n, kEagerThreads));
      for (int i = 0; i < B; ++i) {
        if (c.nm && i % 4 == 0) {
          eager_nm_kernel<<<rows, kEagerThreads, 0, stream_>>>(d_W.get(), n, B, i, 2, 4, d_coef.get(),
                                                                d_nm.get());
          BENCH_CUDA_CHECK(cudaGetLastError());
        }
        eager_decide_kernel<<<rows, kEagerThreads, 0, stream_>>>(
            d_W.get(), n, B, i, d_U.get(), c.nm ? d_nm.get() : d_mask.get(), c.nm ? 4 : B,
            c.nm ? i % 4 : i, d_E.get(), d_Pre.get());
        BENCH_CUDA_CHECK(cudaGetLastError());
        const auto upd = static_cast<unsigned>(
            std::max<int64_t>(1, cuda::ceil_div(n * (B - i - 1), kEagerThreads)));
        eager_update_kernel<<<upd, kEagerThreads, 0, stream_>>>(d_W.get(), n, B, i, d_U.get(), P1,
                                                                 d_E.get(), d_Pre.get());
        BENCH_CUDA_CHECK(cudaGetLastError());
      }
    };
    check(restore, fused, want_W, want_E, want_P, d_W, d_E, d_Pre, "fused");
    check(restore, eager, want_W, want_E, want_P, d_W, d_E, d_Pre, "eager");
    cudaGraphExec_t graph = capture_graph(stream_, eager);
    auto eager_graph = [&] { BENCH_CUDA_CHECK(cudaGraphLaunch(graph, stream_)); };
    check(restore, eager_graph, want_W, want_E, want_P, d_W, d_E, d_Pre, "eager graph");

    Result res{c, {}, {}, {}};
    res.fused = time_restored(restore, fused);
    res.eager = time_restored(restore, eager);
    res.eager_graph = time_restored(restore, eager_graph);
    BENCH_CUDA_CHECK(cudaGraphExecDestroy(graph));
    return res;
  }

 private:
  template <typename R, typename F>
  void check(R&& restore, F&& launch, const std::vector<float>& W, const std::vector<float>& E,
             const std::vector<float>& Pre, const DeviceBuffer<float>& d_W, const DeviceBuffer<float>& d_E,
             const DeviceBuffer<float>& d_Pre, const char* what) {
    restore();
    launch();
    BENCH_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const bool ok = std::memcmp(d_W.download().data(), W.data(), W.size() * 4) == 0 &&
                    std::memcmp(d_E.download().data(), E.data(), E.size() * 4) == 0 &&
                    std::memcmp(d_Pre.download().data(), Pre.data(), Pre.size() * 4) == 0;
    if (!ok) throw std::runtime_error(std::string(what) + " differs from obs_prune_block_cpu");
  }

  // Times launch() with W1 restored before each repetition (the restore is not timed).
  template <typename R, typename F>
  Timing time_restored(R&& restore, F&& launch) {
    return timer_.run(launch, false, restore);
  }

  cudaStream_t stream_;
  Timer timer_;
};

std::string case_name(const Case& c) {
  return std::to_string(c.n) + "x" + std::to_string(c.B) + (c.with_P ? " duogpt" : " sparsegpt") +
         (c.nm ? " 2:4" : " mask");
}

}  // namespace
}  // namespace duogpt::bench

int main(int argc, char** argv) {
  using namespace duogpt::bench;  // NOLINT
  try {
    int reps = 1000;
    std::string json = "obs_cuda.json";
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--reps" && i + 1 < argc) {
        reps = std::atoi(argv[++i]);
      } else if (a == "--json" && i + 1 < argc) {
        json = argv[++i];
      } else {
        throw std::invalid_argument("usage: obs_cuda [--reps N] [--json PATH]");
      }
    }
    if (reps < 1) throw std::invalid_argument("--reps must be positive");
    cudaStream_t stream = nullptr;
    BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const DeviceSheet dev = device_sheet(stream);
    std::printf("device: %s, %d SMs; reps %d (eager: 2 launches per column + 1 per N:M group)\n",
                dev.name.c_str(), dev.sms, reps);
    std::printf("%-26s | %17s | %17s | %17s | %8s %8s\n", "block", "fused us min/avg",
                "eager us min/avg", "eager graph us", "x eager", "x graph");
    std::vector<Result> results;
    {
      ObsBench bench(reps, stream);
      for (int64_t n : {4096, 11008}) {
        for (bool with_P : {false, true}) {
          for (bool nm : {false, true}) {
            const Result r = bench.run(Case{n, 128, with_P, nm});
            results.push_back(r);
            std::printf("%-26s | %8.2f %8.2f | %8.2f %8.2f | %8.2f %8.2f | %8.1f %8.1f\n",
                        case_name(r.c).c_str(), r.fused.min_us, r.fused.mean_us, r.eager.min_us,
                        r.eager.mean_us, r.eager_graph.min_us, r.eager_graph.mean_us,
                        r.eager.mean_us / r.fused.mean_us, r.eager_graph.mean_us / r.fused.mean_us);
            std::printf("RESULT\tobs_cuda\t%s\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\n",
                        case_name(r.c).c_str(), r.fused.min_us, r.fused.mean_us, r.eager.min_us,
                        r.eager.mean_us, r.eager_graph.min_us, r.eager_graph.mean_us);
            std::fflush(stdout);
          }
        }
      }
    }
    std::ofstream os(json);
    os << "{\n  \"benchmark\": \"obs_cuda\",\n  \"device\": {\"name\": \"" << json_escape(dev.name)
       << "\", \"sms\": " << dev.sms << "},\n  \"reps\": " << reps << ",\n  \"rows\": [\n";
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      os << "    {\"rows\": " << r.c.n << ", \"B\": " << r.c.B
         << ", \"P1\": " << (r.c.with_P ? "true" : "false")
         << ", \"rule\": \"" << (r.c.nm ? "2:4" : "mask") << "\", \"fused_us\": {\"min\": " << r.fused.min_us
         << ", \"mean\": " << r.fused.mean_us << "}, \"eager_us\": {\"min\": " << r.eager.min_us
         << ", \"mean\": " << r.eager.mean_us << "}, \"eager_graph_us\": {\"min\": " << r.eager_graph.min_us
         << ", \"mean\": " << r.eager_graph.mean_us << "}}" << (i + 1 < results.size() ? "," : "") << "\n";
    }
    os << "  ]\n}\n";
    std::printf("wrote %s\n", json.c_str());
    BENCH_CUDA_CHECK(cudaStreamDestroy(stream));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "obs_cuda: %s\n", e.what());
    return 1;
  }
}
