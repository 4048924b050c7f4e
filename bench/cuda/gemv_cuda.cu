// Decode GEMV benchmark on the GPU: duogpt's spmspv_cuda (bitmap weight x sparsified activations)
// against cuBLAS dense (cublasGemmEx, fp16 in/out, fp32 compute) and duogpt's dense_gemv_cuda,
// on LLaMA-sized layers, with a device-to-device copy measured in the same run as the roofline.
//
// For every (shape, weight sparsity): a random fp16 weight is packed on the GPU (bitmap_index_cuda
// + bitmap_fill_cuda) and on the CPU, and the two packings must be identical. For every
// (b, activation sparsity) with independent random activations per token: spmspv_cuda is checked
// against spmspv_cpu (and cuBLAS against dense_gemv_cpu) before any timing; a mismatch exits 1.
// Timing: >= 1000 repetitions after warm-up, each after an L2 flush (a read of 4x the L2 size),
// CUDA events per repetition, min and mean in microseconds. spmspv is timed as enqueued on a
// stream (3 launches with the top-k rule) and as one replayed CUDA graph.
//
// "touched" is the bytes spmspv must read: bitmap words, offsets and values of the channels that
// are active for at least one token, plus x and y; "ideal" = dense bytes / touched bytes, the
// speed-up of a kernel that runs both at the same bandwidth.
//
// Usage: gemv_cuda [--quick] [--reps N] [--rule topk|threshold] [--shape OUTxIN]... [--json PATH]
//   --quick: weight sparsity 50 % and activation sparsity 0 / 50 % only (else 50/60/70 x 0/30/50/70)
#include <cublas_v2.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include "bench_common.cuh"
#include "duogpt/bitmap.h"
#include "duogpt/cuda_api.h"
#include "duogpt/spmspv.h"
#include "duogpt/types.h"

#define BENCH_CUBLAS_CHECK(expr)                                                              \
  do {                                                                                        \
    const cublasStatus_t bench_st_ = (expr);                                                  \
    if (bench_st_ != CUBLAS_STATUS_SUCCESS) {                                                 \
      throw std::runtime_error(::duogpt::detail::concat(__FILE__, __LINE__, "cuBLAS status ", \
                                                        int(bench_st_), " in ", #expr));      \
    }                                                                                         \
  } while (0)

namespace duogpt::bench {
namespace {

struct Options {
  bool quick = false;
  int reps = 1000;
  std::string rule = "topk";
  std::string json = "gemv_cuda.json";
  std::vector<std::string> shapes;  // "OUTxIN" filters; empty = all of kShapes
};

struct Shape {
  int64_t n, k;  // out, in
};

const Shape kShapes[] = {{4096, 4096}, {11008, 4096}, {4096, 11008},
                         {8192, 8192}, {28672, 8192}, {8192, 28672}};

struct Row {
  Shape shape;
  double wsp, asp;
  int64_t b;
  double active_frac, touched_mb, dense_mb;
  Timing sp_stream, sp_graph, cublas, dense_ours;
};

// The threshold t with P(|z| <= t) = p for z ~ N(0, 1): erf(t / sqrt 2) = p, by bisection.
float abs_normal_quantile(double p) {
  double lo = 0, hi = 10;
  for (int i = 0; i < 100; ++i) {
    const double mid = 0.5 * (lo + hi);
    (std::erf(mid / std::sqrt(2.0)) < p ? lo : hi) = mid;
  }
  return float(0.5 * (lo + hi));
}

// Which channels are kept by the rule for at least one token (the host's view of the rule).
std::vector<uint8_t> active_channels(const std::vector<float>& x, int64_t b, int64_t k,
                                     const ActivationRule& rule_host) {
  std::vector<uint8_t> any(k, 0);
  std::vector<float> mag(k);
  for (int64_t t = 0; t < b; ++t) {
    const float* xt = x.data() + t * k;
    float tau = -1.0f;
    if (rule_host.topk_fraction >= 0.0) {
      for (int64_t j = 0; j < k; ++j) mag[j] = std::fabs(xt[j]);
      const auto drop = static_cast<int64_t>(std::floor(double(k) * rule_host.topk_fraction));
      std::nth_element(mag.begin(), mag.begin() + drop, mag.end());
      tau = mag[drop];
    }
    for (int64_t j = 0; j < k; ++j) {
      const float m = std::fabs(xt[j]);
      const bool keep = rule_host.threshold != nullptr ? m > rule_host.threshold[j]
                        : rule_host.topk_fraction >= 0 ? m >= tau
                                                        : true;
      if (keep && xt[j] != 0.0f) any[j] = 1;
    }
  }
  return any;
}

bool close_enough(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  double ms = 0;
  for (float v : want) ms += double(v) * v;
  const double rms = std::sqrt(ms / std::max<size_t>(1, want.size()));
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol = 2e-3 * std::fabs(want[i]) + 2e-3 * rms + 1e-6;
    if (!(std::fabs(double(got[i]) - want[i]) <= tol)) {
      if (bad < 5) std::fprintf(stderr, "  %s mismatch at %zu: got %g, want %g\n", what, i, got[i], want[i]);
      ++bad;
    }
  }
  if (bad) std::fprintf(stderr, "%s: %zu of %zu outputs outside tolerance\n", what, bad, want.size());
  return bad == 0;
}

std::vector<float> halves_to_float(const std::vector<uint16_t>& h) {
  std::vector<float> f(h.size());
  for (size_t i = 0; i < h.size(); ++i) f[i] = half_to_float(h[i]);
  return f;
}

class GemvBench {
 public:
  explicit GemvBench(const Options& opt) : opt_(opt) {
    BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    BENCH_CUBLAS_CHECK(cublasCreate(&cublas_));
    BENCH_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    timer_ = std::make_unique<Timer>(stream_, opt.reps, std::max(10, opt.reps / 20));
  }
  ~GemvBench() {
    timer_.reset();
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  std::vector<Row> run() {
    using List = std::vector<double>;
    const List wsps = opt_.quick ? List{0.5} : List{0.5, 0.6, 0.7};
    const List asps = opt_.quick ? List{0.0, 0.5} : List{0.0, 0.3, 0.5, 0.7};
    std::vector<Row> rows;
    for (const Shape& s : kShapes) {
      const std::string name = std::to_string(s.n) + "x" + std::to_string(s.k);
      if (!opt_.shapes.empty() &&
          std::find(opt_.shapes.begin(), opt_.shapes.end(), name) == opt_.shapes.end()) {
        continue;
      }
      std::map<int64_t, std::pair<Timing, Timing>> dense_times;  // per b: cuBLAS, dense_gemv_cuda
      for (double wsp : wsps) run_weight(s, wsp, asps, dense_times, rows);
    }
    return rows;
  }

 private:
  void run_weight(const Shape& s, double wsp, const std::vector<double>& asps,
                  std::map<int64_t, std::pair<Timing, Timing>>& dense_times, std::vector<Row>& rows) {
    const int64_t n = s.n, k = s.k, words = bitmap_words(n), tiles = bitmap_tiles(n);
    std::vector<uint16_t> w(size_t(n) * k);
    const uint64_t seed = 1000 + uint64_t(wsp * 100) + uint64_t(n) * 7 + uint64_t(k) * 13;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n * k; ++i) {
      w[i] = uniform01(seed, uint64_t(i)) < wsp ? 0 : float_to_half(0.05f * normal(seed + 1, uint64_t(i)));
    }
    DeviceBuffer<uint16_t> d_w(w.size());
    d_w.upload(w);

    // Pack on the GPU and on the CPU; the two must agree bit for bit.
    DeviceBuffer<int32_t> d_bitmap(size_t(k) * words), d_offsets(size_t(k) * tiles + 1);
    DeviceBuffer<int64_t> d_nnz(1);
    bitmap_index_cuda(d_w.get(), Dtype::kFloat16, n, k, d_bitmap.get(), d_offsets.get(), d_nnz.get(),
                      stream_);
    BENCH_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const int64_t nnz = d_nnz.download()[0];
    DeviceBuffer<uint16_t> d_values(static_cast<size_t>(nnz));
    bitmap_fill_cuda(d_w.get(), Dtype::kFloat16, n, k, d_offsets.get(), nnz, d_values.get(), stream_);
    std::vector<int32_t> bitmap(size_t(k) * words), offsets(size_t(k) * tiles + 1);
    const int64_t nnz_cpu = bitmap_index_cpu(w.data(), Dtype::kFloat16, n, k, bitmap.data(), offsets.data());
    std::vector<uint16_t> values(static_cast<size_t>(nnz_cpu));
    bitmap_fill_cpu(w.data(), Dtype::kFloat16, n, k, offsets.data(), values.data());
    BENCH_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (nnz != nnz_cpu || d_bitmap.download() != bitmap || d_offsets.download() != offsets ||
        d_values.download() != values) {
      throw std::runtime_error("GPU packing differs from CPU packing for " + std::to_string(n) + "x" +
                               std::to_string(k));
    }

    for (int64_t b : {1, 2, 4, 8}) {
      std::vector<uint16_t> x(size_t(b) * k);
      for (int64_t t = 0; t < b; ++t) {
        const uint64_t token_seed = 77 + uint64_t(t) * 1315423911ull + uint64_t(wsp * 10);
        for (int64_t j = 0; j < k; ++j) x[t * k + j] = float_to_half(normal(token_seed, uint64_t(j)));
      }
      const std::vector<float> xf = halves_to_float(x);
      DeviceBuffer<uint16_t> d_x(x.size()), d_y(size_t(b) * n), d_yd(size_t(b) * n);
      d_x.upload(x);

      if (dense_times.count(b) == 0) dense_times[b] = time_dense(d_w, d_x, d_yd, xf, w, b, n, k);
      for (double asp : asps) {
        Row row{s, wsp, asp, b, 0, 0, 0, {}, {}, {}, {}};
        row.cublas = dense_times[b].first;
        row.dense_ours = dense_times[b].second;
        time_sparse(row, d_x, d_y, xf, d_bitmap, d_values, d_offsets, nnz, bitmap, values, offsets);
        rows.push_back(row);
        print_row(row);
      }
    }
  }

  std::pair<Timing, Timing> time_dense(const DeviceBuffer<uint16_t>& d_w, const DeviceBuffer<uint16_t>& d_x,
                                       DeviceBuffer<uint16_t>& d_y, const std::vector<float>& xf,
                                       const std::vector<uint16_t>& w, int64_t b, int64_t n, int64_t k) {
    const float alpha = 1.0f, beta = 0.0f;
    // y^T [n, b] (column-major) = W [n, k] (row-major = column-major W^T [k, n], so op T) x^T.
    auto gemm = [&] {
      BENCH_CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(b), int(k), &alpha,
                                      d_w.get(), CUDA_R_16F, int(k), d_x.get(), CUDA_R_16F, int(k),
                                      &beta, d_y.get(), CUDA_R_16F, int(n), CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
    };
    auto ours = [&] {
      dense_gemv_cuda(d_x.get(), Dtype::kFloat16, b, k, d_w.get(), Dtype::kFloat16, n, d_y.get(), stream_);
    };
    std::vector<float> want(size_t(b) * n);
    dense_gemv_cpu(xf.data(), Dtype::kFloat32, b, k, w.data(), Dtype::kFloat16, n, want.data());
    gemm();
    BENCH_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (!close_enough(halves_to_float(d_y.download()), want, "cuBLAS")) {
      throw std::runtime_error("cuBLAS validation failed");
    }
    ours();
    BENCH_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (!close_enough(halves_to_float(d_y.download()), want, "dense_gemv_cuda")) {
      throw std::runtime_error("dense_gemv_cuda validation failed");
    }
    return {timer_->run(gemm), timer_->run(ours)};
  }

  void time_sparse(Row& row, const DeviceBuffer<uint16_t>& d_x, DeviceBuffer<uint16_t>& d_y,
                   const std::vector<float>& xf, const DeviceBuffer<int32_t>& d_bitmap,
                   const DeviceBuffer<uint16_t>& d_values, const DeviceBuffer<int32_t>& d_offsets,
                   int64_t nnz, const std::vector<int32_t>& bitmap, const std::vector<uint16_t>& values,
                   const std::vector<int32_t>& offsets) {
    const int64_t n = row.shape.n, k = row.shape.k, b = row.b;
    const int64_t words = bitmap_words(n), tiles = bitmap_tiles(n);
    // The rule: none at 0 %, else per-token top-k (exact sparsity) or a per-channel threshold.
    std::vector<float> thr_host;
    DeviceBuffer<float> d_thr;
    ActivationRule rule_host, rule_dev;
    if (row.asp > 0 && opt_.rule == "threshold") {
      thr_host.assign(size_t(k), abs_normal_quantile(row.asp));
      d_thr.resize(static_cast<size_t>(k));
      d_thr.upload(thr_host);
      rule_host.threshold = thr_host.data();
      rule_dev.threshold = d_thr.get();
    } else if (row.asp > 0) {
      rule_host.topk_fraction = rule_dev.topk_fraction = row.asp;
    }
    const std::vector<uint8_t> act = active_channels(xf, b, k, rule_host);
    int64_t n_active = 0;
    double touched = double(b) * (k + n) * 2;
    for (int64_t j = 0; j < k; ++j) {
      if (!act[j]) continue;
      ++n_active;
      touched += 4.0 * words + 4.0 * tiles + 2.0 * double(offsets[(j + 1) * tiles] - offsets[j * tiles]);
    }
    row.active_frac = double(n_active) / double(k);
    row.touched_mb = touched / 1e6;
    row.dense_mb = (2.0 * double(n) * k + double(b) * (k + n) * 2) / 1e6;

    DeviceBuffer<uint8_t> ws(size_t(spmspv_cuda_workspace_bytes(b, k, n)));
    auto launch = [&] {
      spmspv_cuda(d_x.get(), Dtype::kFloat16, b, k, d_bitmap.get(), d_values.get(), d_offsets.get(),
                  Dtype::kFloat16, n, nnz, rule_dev, d_y.get(), ws.get(), int64_t(ws.bytes()), stream_);
    };
    std::vector<float> want(size_t(b) * n);
    spmspv_cpu(xf.data(), Dtype::kFloat32, b, k, bitmap.data(), values.data(), offsets.data(),
               Dtype::kFloat16, n, nnz, rule_host, want.data());
    launch();
    BENCH_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (!close_enough(halves_to_float(d_y.download()), want, "spmspv_cuda")) {
      throw std::runtime_error("spmspv_cuda validation failed");
    }
    row.sp_stream = timer_->run(launch);
    cudaGraphExec_t graph = capture_graph(stream_, launch);
    row.sp_graph = timer_->run([&] { BENCH_CUDA_CHECK(cudaGraphLaunch(graph, stream_)); });
    BENCH_CUDA_CHECK(cudaGraphExecDestroy(graph));
  }

  void print_row(const Row& r) {
    if (!header_printed_) {
      std::printf("%-12s %4s %4s %2s %6s %8s %8s | %17s %17s %17s %9s | %7s %7s %6s %7s\n",
                  "out x in", "wsp", "asp", "b", "active", "touch MB", "dense MB", "spmspv us min/avg",
                  "graph us min/avg", "cuBLAS us min/avg", "ours us", "x strm", "x graph", "ideal",
                  "GB/s");
      header_printed_ = true;
    }
    char shape[32];
    std::snprintf(shape, sizeof shape, "%ldx%ld", long(r.shape.n), long(r.shape.k));
    std::printf("%-12s %4.2f %4.2f %2ld %6.3f %8.2f %8.2f | %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %9.2f"
                " | %7.2f %7.2f %6.2f %7.0f\n",
                shape, r.wsp, r.asp, long(r.b), r.active_frac, r.touched_mb, r.dense_mb,
                r.sp_stream.min_us, r.sp_stream.mean_us, r.sp_graph.min_us, r.sp_graph.mean_us,
                r.cublas.min_us, r.cublas.mean_us, r.dense_ours.mean_us,
                r.cublas.mean_us / r.sp_stream.mean_us, r.cublas.mean_us / r.sp_graph.mean_us,
                r.dense_mb / r.touched_mb, r.touched_mb * 1e6 / (r.sp_graph.min_us * 1e3));
    std::printf("RESULT\tgemv_cuda\t%s\t%.2f\t%.2f\t%ld\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\n", shape,
                r.wsp, r.asp, long(r.b), r.sp_stream.mean_us, r.sp_graph.min_us, r.sp_graph.mean_us,
                r.cublas.min_us, r.cublas.mean_us, r.dense_ours.mean_us, r.active_frac);
    std::fflush(stdout);
  }

  Options opt_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  std::unique_ptr<Timer> timer_;
  bool header_printed_ = false;
};

void timing_json(std::ostream& os, const char* name, const Timing& t) {
  os << "\"" << name << "_us\": {\"min\": " << t.min_us << ", \"mean\": " << t.mean_us << "}";
}

void write_json(const std::string& path, const DeviceSheet& dev, const Options& opt,
                const std::vector<Row>& rows) {
  std::ofstream os(path);
  os << "{\n  \"benchmark\": \"gemv_cuda\",\n  \"device\": {\"name\": \"" << json_escape(dev.name)
     << "\", \"sms\": " << dev.sms << ", \"l2_bytes\": " << dev.l2_bytes
     << ", \"d2d_copy_gbps\": " << dev.copy_gbps << "},\n  \"reps\": " << opt.reps
     << ", \"rule\": \"" << opt.rule << "\", \"values\": \"float16\", \"l2_flush\": true,\n  \"rows\": [\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    os << "    {\"out\": " << r.shape.n << ", \"in\": " << r.shape.k << ", \"weight_sparsity\": " << r.wsp
       << ", \"activation_sparsity\": " << r.asp << ", \"b\": " << r.b
       << ", \"active_fraction\": " << r.active_frac
       << ", \"touched_mb\": " << r.touched_mb << ", \"dense_mb\": " << r.dense_mb << ", ";
    timing_json(os, "spmspv_stream", r.sp_stream);
    os << ", ";
    timing_json(os, "spmspv_graph", r.sp_graph);
    os << ", ";
    timing_json(os, "cublas", r.cublas);
    os << ", ";
    timing_json(os, "dense_gemv_cuda", r.dense_ours);
    os << ", \"speedup_graph_vs_cublas_mean\": " << r.cublas.mean_us / r.sp_graph.mean_us << "}"
       << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  os << "  ]\n}\n";
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--reps" && i + 1 < argc) {
      o.reps = std::atoi(argv[++i]);
    } else if (a == "--rule" && i + 1 < argc) {
      o.rule = argv[++i];
    } else if (a == "--json" && i + 1 < argc) {
      o.json = argv[++i];
    } else if (a == "--shape" && i + 1 < argc) {
      o.shapes.push_back(argv[++i]);
    } else {
      throw std::invalid_argument(
          "usage: gemv_cuda [--quick] [--reps N] [--rule topk|threshold] [--shape OUTxIN]... "
          "[--json PATH]");
    }
  }
  if (o.reps < 1 || (o.rule != "topk" && o.rule != "threshold")) {
    throw std::invalid_argument("--reps must be positive and --rule topk or threshold");
  }
  return o;
}

}  // namespace
}  // namespace duogpt::bench

int main(int argc, char** argv) {
  using namespace duogpt::bench;  // NOLINT
  try {
    const Options opt = parse(argc, argv);
    cudaStream_t s = nullptr;
    BENCH_CUDA_CHECK(cudaStreamCreate(&s));
    const DeviceSheet dev = device_sheet(s);
    BENCH_CUDA_CHECK(cudaStreamDestroy(s));
    std::printf("device: %s, %d SMs, L2 %.1f MB, device-to-device copy %.0f GB/s (read + write)\n",
                dev.name.c_str(), dev.sms, dev.l2_bytes / 1e6, dev.copy_gbps);
    std::printf("rule: %s, reps: %d, values fp16, activations fp16, L2 flushed before every rep\n",
                opt.rule.c_str(), opt.reps);
    GemvBench bench(opt);
    const std::vector<Row> rows = bench.run();
    write_json(opt.json, dev, opt, rows);
    std::printf("wrote %s\n", opt.json.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gemv_cuda: %s\n", e.what());
    return 1;
  }
}
