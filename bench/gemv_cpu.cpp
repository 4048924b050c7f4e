// Decode GEMV benchmark: spmspv_cpu (bitmap weight x top-k sparsified activations) against
// dense_gemv_cpu (the dense baseline over the same weights), with ceilings measured in the same
// run: the machine's large-copy and read bandwidths (the faster of memcpy and a non-temporal AVX2
// copy; of a summing loop and an AVX2 read), and spmspv's own rate with its weight in L2.
//
// Every timed call reads weights that are not in cache: each case rotates over copies of its
// matrices totalling at least 256 MiB (8x the 32 MiB L3 of the reference machine), and over 16
// activation vectors so that the set of active channels changes from call to call. The kernels
// are checked against each other (sparse vs dense on the masked activations) before any timing.
//
// Usage: gemv_cpu [--isa scalar|avx2|avx512] [--quick] [--json PATH] [--shape OUTxIN]...
// (--shape replaces the default shapes, e.g. --shape 1536x576 for a SmolLM2 projection)
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "duogpt/bitmap.h"
#include "duogpt/check.h"
#include "duogpt/cpu_features.h"
#include "duogpt/spmspv.h"
#include "duogpt/types.h"

namespace duogpt {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kRotateBytes = size_t(256) << 20;  // distinct weight bytes each case cycles over
constexpr int kActivationSets = 16;
constexpr double kWeightSparsity = 0.5;

struct Options {
  std::string isa;
  bool quick = false;
  std::string json_path;
  std::vector<std::array<int64_t, 2>> shapes;  // (out, in); none given: the LLaMA-2-7B ones
};

// Call `fn(rep)` until both `min_reps` calls and `min_seconds` have passed (at most `max_reps`),
// after `warmup` untimed calls; return the per-call times in seconds, sorted.
template <typename Fn>
std::vector<double> time_calls(Fn&& fn, int warmup, int min_reps, int max_reps, double min_seconds) {
  for (int i = 0; i < warmup; ++i) fn(i);
  std::vector<double> t;
  const auto start = Clock::now();
  for (int rep = 0; rep < max_reps; ++rep) {
    const auto t0 = Clock::now();
    fn(warmup + rep);
    const auto t1 = Clock::now();
    t.push_back(std::chrono::duration<double>(t1 - t0).count());
    if (rep + 1 >= min_reps && std::chrono::duration<double>(t1 - start).count() >= min_seconds) break;
  }
  std::sort(t.begin(), t.end());
  return t;
}

double median(const std::vector<double>& sorted) {
  const size_t m = sorted.size() / 2;
  return sorted.size() % 2 ? sorted[m] : 0.5 * (sorted[m - 1] + sorted[m]);
}

#if defined(__x86_64__)
// The fastest large copy and read this CPU does, as references that memcpy and a plain summing
// loop understate: 32-byte loads, four in flight, and for the copy non-temporal stores, which
// skip reading each destination line before writing it (memcpy's ordinary stores pay that read,
// which the read+write convention does not count). `bytes` is a multiple of 128, `dst` 32-aligned.
__attribute__((target("avx2"))) void stream_copy_avx2(char* dst, const char* src, size_t bytes) {
  for (size_t i = 0; i < bytes; i += 128) {
    const auto* s = reinterpret_cast<const __m256i*>(src + i);
    auto* d = reinterpret_cast<__m256i*>(dst + i);
    const __m256i a = _mm256_loadu_si256(s), b = _mm256_loadu_si256(s + 1);
    const __m256i c = _mm256_loadu_si256(s + 2), e = _mm256_loadu_si256(s + 3);
    _mm256_stream_si256(d, a), _mm256_stream_si256(d + 1, b);
    _mm256_stream_si256(d + 2, c), _mm256_stream_si256(d + 3, e);
  }
  _mm_sfence();
}

__attribute__((target("avx2"))) uint64_t stream_read_avx2(const char* src, size_t bytes) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i < bytes; i += 128) {
    const auto* s = reinterpret_cast<const __m256i*>(src + i);
    s0 = _mm256_add_epi64(s0, _mm256_loadu_si256(s));
    s1 = _mm256_add_epi64(s1, _mm256_loadu_si256(s + 1));
    s2 = _mm256_add_epi64(s2, _mm256_loadu_si256(s + 2));
    s3 = _mm256_add_epi64(s3, _mm256_loadu_si256(s + 3));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

bool has_avx2() { return __builtin_cpu_supports("avx2"); }
#else
void stream_copy_avx2(char*, const char*, size_t) {}
uint64_t stream_read_avx2(const char*, size_t) { return 0; }
bool has_avx2() { return false; }
#endif

struct Bandwidth {
  double memcpy_gbs;  // bytes copied / s by memcpy
  double stream_gbs;  // bytes copied / s by the non-temporal AVX2 copy (0 without AVX2)
  double traffic_gbs; // bytes read + written / s by the faster copy (the STREAM "Copy" convention)
  double read_gbs;    // bytes read / s by the faster of a summing loop and the AVX2 read
};

// Large copies and reads with all threads, rotating over 4 pairs of 64 MiB blocks.
Bandwidth measure_bandwidth(bool quick) {
  constexpr size_t kBlock = size_t(64) << 20, kBlocks = 4;
  std::vector<char> src(kBlock * kBlocks, 1), dst_storage(kBlock * kBlocks + 32, 2);
  char* dst = dst_storage.data() + (32 - reinterpret_cast<uintptr_t>(dst_storage.data()) % 32) % 32;
  const int reps = quick ? 8 : 40;
  // Calls f(offset, bytes) on each thread's share of one block; shares are multiples of 128 bytes.
  auto per_thread = [&](int rep, auto f) {
    const size_t off = (rep % kBlocks) * kBlock;
#pragma omp parallel
    {
      const size_t share = kBlock / omp_get_num_threads() / 128 * 128, t = omp_get_thread_num();
      const size_t end = t + 1 == size_t(omp_get_num_threads()) ? kBlock : (t + 1) * share;
      f(off + t * share, end - t * share);
    }
  };
  auto timed = [&](auto call) { return median(time_calls(call, kBlocks, reps, reps, 0.0)); };
  const double memcpy_s = timed([&](int rep) {
    per_thread(rep, [&](size_t at, size_t n) { std::memcpy(dst + at, src.data() + at, n); });
  });
  const double stream_s = !has_avx2() ? 0.0 : timed([&](int rep) {
    per_thread(rep, [&](size_t at, size_t n) { stream_copy_avx2(dst + at, src.data() + at, n); });
  });
  std::vector<uint64_t> sums(omp_get_max_threads(), 0);
  const double loop_s = timed([&](int rep) {
    per_thread(rep, [&](size_t at, size_t n) {
      const auto* p = reinterpret_cast<const uint64_t*>(src.data() + at);
      uint64_t s = 0;
      for (size_t i = 0; i < n / 8; ++i) s += p[i];
      sums[omp_get_thread_num()] += s;
    });
  });
  const double avx2_read_s = !has_avx2() ? 0.0 : timed([&](int rep) {
    per_thread(rep, [&](size_t at, size_t n) {
      sums[omp_get_thread_num()] += stream_read_avx2(src.data() + at, n);
    });
  });
  DUOGPT_CHECK(std::any_of(sums.begin(), sums.end(), [](uint64_t v) { return v != 0; }),
               "read pass optimised away");
  DUOGPT_CHECK(std::memcmp(dst, src.data(), kBlock * kBlocks) == 0, "a copy is wrong");
  const double copy_s = stream_s > 0 ? std::min(memcpy_s, stream_s) : memcpy_s;
  const double read_s = avx2_read_s > 0 ? std::min(loop_s, avx2_read_s) : loop_s;
  return {kBlock / memcpy_s / 1e9, stream_s > 0 ? kBlock / stream_s / 1e9 : 0.0,
          2.0 * kBlock / copy_s / 1e9, kBlock / read_s / 1e9};
}

// ---- problem data -------------------------------------------------------------------------------

struct Packed {
  std::vector<int32_t> bitmap, offsets;
  std::vector<uint16_t> values;
};

// |x| as ranked by the top-k rule (NaN never occurs here).
std::vector<uint8_t> topk_keep(const std::vector<float>& x, int b, int64_t k, double fraction) {
  std::vector<uint8_t> keep(b * k, 1);
  if (fraction <= 0.0) return keep;
  const auto drop = static_cast<int64_t>(std::floor(double(k) * fraction));
  std::vector<float> mag(k);
  for (int t = 0; t < b; ++t) {
    for (int64_t j = 0; j < k; ++j) mag[j] = std::fabs(x[t * k + j]);
    std::vector<float> sorted(mag);
    std::nth_element(sorted.begin(), sorted.begin() + drop, sorted.end());
    for (int64_t j = 0; j < k; ++j) keep[t * k + j] = mag[j] >= sorted[drop];
  }
  return keep;
}

struct Activations {
  std::vector<uint16_t> x16;  // [b, k] fp16, as timed
  std::vector<float> x32;     // the same values in fp32
  std::vector<uint8_t> keep;  // [b, k] under the case's rule
  int64_t read_bytes = 0;     // what spmspv reads for it: bitmap + values of active channels + offsets
};

Activations make_activations(std::mt19937& rng, int b, int64_t k, int64_t n, double act_sparsity,
                             const Packed& p) {
  Activations a;
  std::normal_distribution<float> normal;
  a.x16.resize(b * k);
  a.x32.resize(b * k);
  for (int64_t i = 0; i < b * k; ++i) {
    a.x16[i] = float_to_half(normal(rng));
    a.x32[i] = half_to_float(a.x16[i]);
  }
  a.keep = topk_keep(a.x32, b, k, act_sparsity);
  const int64_t words = bitmap_words(n), tiles = bitmap_tiles(n);
  a.read_bytes = int64_t(p.offsets.size()) * 4;
  for (int64_t j = 0; j < k; ++j) {
    bool active = false;
    for (int t = 0; t < b; ++t) active |= a.keep[t * k + j] && a.x32[t * k + j] != 0.0f;
    if (active) a.read_bytes += words * 4 + int64_t(p.offsets[(j + 1) * tiles] - p.offsets[j * tiles]) * 2;
  }
  return a;
}

std::vector<uint16_t> random_weight(std::mt19937& rng, int64_t n, int64_t k) {
  std::vector<uint16_t> w(n * k);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform;
  for (auto& v : w) {
    const float f = normal(rng) * 0.02f;
    v = uniform(rng) < kWeightSparsity || f == 0.0f ? 0 : float_to_half(f);
    if (v == 0x8000) v = 0;  // -0.0 counts as zero (docs/format.md)
  }
  return w;
}

Packed pack(const std::vector<uint16_t>& w, int64_t n, int64_t k) {
  Packed p;
  p.bitmap.resize(bitmap_words(n) * k);
  p.offsets.resize(k * bitmap_tiles(n) + 1);
  const int64_t nnz = bitmap_index_cpu(w.data(), Dtype::kFloat16, n, k, p.bitmap.data(), p.offsets.data());
  p.values.resize(nnz);
  bitmap_fill_cpu(w.data(), Dtype::kFloat16, n, k, p.offsets.data(), p.values.data());
  return p;
}

// ---- the kernel's own speed ---------------------------------------------------------------------

// spmspv's throughput with memory out of the way, per thread: one thread on a 1024 x 384 weight (50 %
// sparse, 0.44 MiB packed) that stays in its core's L2 (512 KiB on Zen 3) and is read again at
// every call; b = 1, every activation kept. Times the thread count (the cores are not SMT
// siblings), it is the most a DRAM-resident case can read with the kernel's instructions. An 8 MiB
// weight is no such ceiling: on the shared reference VM it was not kept in the L3 and read about as
// slowly as from DRAM.
double measure_spmspv_in_l2(bool quick) {
  std::mt19937 rng(7);
  constexpr int64_t n = 1024, k = 384;
  const Packed p = pack(random_weight(rng, n, k), n, k);
  const Activations a = make_activations(rng, 1, k, n, 0.0, p);
  std::vector<uint16_t> y(n);
  auto call = [&](int) {
    spmspv_cpu(a.x16.data(), Dtype::kFloat16, 1, k, p.bitmap.data(), p.values.data(), p.offsets.data(),
               Dtype::kFloat16, n, int64_t(p.values.size()), ActivationRule{}, y.data());
  };
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const int reps = quick ? 20 : 4000;
  const double seconds = median(time_calls(call, 10, reps, reps, 0.0));
  omp_set_num_threads(threads);
  return double(a.read_bytes) / seconds / 1e9;
}

// ---- validation ---------------------------------------------------------------------------------

// spmspv on x against dense_gemv on x with the dropped entries zeroed, in fp32 and fp16 I/O.
bool validate(const std::vector<uint16_t>& w, const Packed& p, int64_t n, int64_t k, int b,
              double act_sparsity, const Activations& a) {
  ActivationRule rule;
  if (act_sparsity > 0.0) rule.topk_fraction = act_sparsity;
  std::vector<float> xm32(a.x32);
  std::vector<uint16_t> xm16(a.x16);
  for (int64_t i = 0; i < b * k; ++i) {
    if (!a.keep[i]) xm32[i] = 0.0f, xm16[i] = 0;
  }
  std::vector<float> ys(b * n), yd(b * n);
  std::vector<uint16_t> ys16(b * n), yd16(b * n);
  spmspv_cpu(a.x32.data(), Dtype::kFloat32, b, k, p.bitmap.data(), p.values.data(), p.offsets.data(),
             Dtype::kFloat16, n, int64_t(p.values.size()), rule, ys.data());
  dense_gemv_cpu(xm32.data(), Dtype::kFloat32, b, k, w.data(), Dtype::kFloat16, n, yd.data());
  spmspv_cpu(a.x16.data(), Dtype::kFloat16, b, k, p.bitmap.data(), p.values.data(), p.offsets.data(),
             Dtype::kFloat16, n, int64_t(p.values.size()), rule, ys16.data());
  dense_gemv_cpu(xm16.data(), Dtype::kFloat16, b, k, w.data(), Dtype::kFloat16, n, yd16.data());
  float scale = 0.0f;
  for (float v : yd) scale = std::max(scale, std::fabs(v));
  double err32 = 0.0, err16 = 0.0;
  for (int64_t i = 0; i < b * n; ++i) {
    err32 = std::max(err32, double(std::fabs(ys[i] - yd[i])));
    // Both fp16 outputs round the same fp32 sum up to summation order: one fp16 ulp apart at most.
    const float s16 = half_to_float(ys16[i]), d16 = half_to_float(yd16[i]);
    err16 = std::max(err16, double(std::fabs(s16 - d16)) / std::max(std::fabs(d16), 1e-2f * scale));
  }
  const bool ok = err32 <= 1e-4 * scale && err16 <= 2.0 / 1024;
  if (!ok) {
    std::fprintf(stderr, "MISMATCH %lldx%lld b=%d act_sparsity=%.2f: fp32 max err %.3g (scale %.3g), "
                 "fp16 max rel err %.3g\n", (long long)n, (long long)k, b, act_sparsity, err32, scale, err16);
  }
  return ok;
}

// ---- the run ------------------------------------------------------------------------------------

struct Result {
  int64_t n, k;
  int b;
  double act_sparsity;
  const char* kernel;
  std::vector<double> t;
  double bytes;  // mean bytes read per call
};

std::string shape_str(int64_t n, int64_t k) { return std::to_string(n) + "x" + std::to_string(k); }

int run(const Options& opt) {
  if (!opt.isa.empty()) set_cpu_isa(opt.isa);
  const Bandwidth bw = measure_bandwidth(opt.quick);
  const int threads = omp_get_max_threads();
  std::printf("isa %s, %d threads\n", cpu_isa().c_str(), threads);
  std::printf("large copy: memcpy %.1f GB/s copied, non-temporal AVX2 copy %.1f GB/s copied; the faster "
              "moves %.1f GB/s read+write (%%copy); read-only pass %.1f GB/s (%%read)\n",
              bw.memcpy_gbs, bw.stream_gbs, bw.traffic_gbs, bw.read_gbs);
  const double in_l2_gbs = measure_spmspv_in_l2(opt.quick);
  std::printf("spmspv with its weight in L2 (one thread, b = 1, 50 %%/0 %%): %.1f GB/s of packed data, "
              "x %d threads = %.1f GB/s\n\n", in_l2_gbs, threads, in_l2_gbs * threads);

  const int batches[] = {1, 2, 4, 8};
  const double act_sparsities[] = {0.0, 0.5};
  const int min_reps = opt.quick ? 5 : 100, max_reps = opt.quick ? 20 : 2000;
  const double min_seconds = opt.quick ? 0.0 : 0.5;
  std::mt19937 rng(1234);
  std::vector<Result> results;

  for (const auto& shape : opt.shapes) {
    const int64_t n = shape[0], k = shape[1];
    const std::vector<uint16_t> w = random_weight(rng, n, k);
    const Packed p = pack(w, n, k);
    const size_t dense_bytes = w.size() * 2;
    const size_t sparse_bytes = (p.bitmap.size() + p.offsets.size()) * 4 + p.values.size() * 2;
    const size_t dense_copies = (kRotateBytes + dense_bytes - 1) / dense_bytes;
    const size_t sparse_copies = (kRotateBytes + sparse_bytes - 1) / sparse_bytes;
    const std::vector<std::vector<uint16_t>> wc(dense_copies, w);
    const std::vector<Packed> pc(sparse_copies, p);

    for (int b : batches) {
      std::vector<float> y32(b * n);
      std::vector<uint16_t> y(b * n);
      const std::vector<uint16_t> x0 = make_activations(rng, b, k, n, 0.0, p).x16;
      auto dense = [&](int rep) {
        dense_gemv_cpu(x0.data(), Dtype::kFloat16, b, k, wc[rep % dense_copies].data(),
                       Dtype::kFloat16, n, y.data());
      };
      results.push_back({n, k, b, 0.0, "dense_gemv",
                         time_calls(dense, int(dense_copies) + 2, min_reps, max_reps, min_seconds),
                         double(dense_bytes)});

      for (double as : act_sparsities) {
        std::vector<Activations> acts;
        for (int i = 0; i < kActivationSets; ++i) acts.push_back(make_activations(rng, b, k, n, as, p));
        for (int i = 0; i < 2; ++i) {
          if (!validate(w, p, n, k, b, as, acts[i])) return 1;
        }
        ActivationRule rule;
        if (as > 0.0) rule.topk_fraction = as;
        auto sparse = [&](int rep) {
          const Packed& q = pc[rep % sparse_copies];
          spmspv_cpu(acts[rep % kActivationSets].x16.data(), Dtype::kFloat16, b, k, q.bitmap.data(),
                     q.values.data(), q.offsets.data(), Dtype::kFloat16, n, int64_t(q.values.size()),
                     rule, y.data());
        };
        double bytes = 0.0;
        for (const Activations& a : acts) bytes += double(a.read_bytes) / kActivationSets;
        results.push_back({n, k, b, as, "spmspv",
                           time_calls(sparse, int(sparse_copies) + 2, min_reps, max_reps, min_seconds),
                           bytes});
      }
    }
  }

  // Table and JSON. Speedups compare medians against the dense run of the same shape and b.
  std::printf("%-11s %2s %6s %-10s %10s %10s %8s %9s %8s %7s\n", "out x in", "b", "act_sp", "kernel",
              "min_us", "median_us", "speedup", "eff_GB/s", "%copy", "%read");
  std::ostringstream js;
  js << "{\n  \"isa\": \"" << cpu_isa() << "\",\n  \"threads\": " << threads
     << ",\n  \"weight_dtype\": \"float16\",\n  \"activation_dtype\": \"float16\",\n"
     << "  \"weight_sparsity\": " << kWeightSparsity << ",\n"
     << "  \"memcpy_GBps\": " << bw.memcpy_gbs << ",\n  \"stream_copy_GBps\": " << bw.stream_gbs
     << ",\n  \"copy_read_write_GBps\": " << bw.traffic_gbs
     << ",\n  \"read_GBps\": " << bw.read_gbs << ",\n  \"spmspv_in_l2_per_thread_GBps\": " << in_l2_gbs
     << ",\n  \"cases\": [";
  double dense_median = 0.0;
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    const double med = median(r.t), gbs = r.bytes / med / 1e9;
    if (std::strcmp(r.kernel, "dense_gemv") == 0) dense_median = med;
    const double speedup = dense_median / med;
    std::printf("%-11s %2d %5.0f%% %-10s %10.1f %10.1f %7.2fx %9.1f %7.0f%% %6.0f%%\n",
                shape_str(r.n, r.k).c_str(), r.b, 100 * r.act_sparsity, r.kernel, r.t.front() * 1e6,
                med * 1e6, speedup, gbs, 100 * gbs / bw.traffic_gbs, 100 * gbs / bw.read_gbs);
    js << (i ? "," : "") << "\n    {\"out\": " << r.n << ", \"in\": " << r.k << ", \"b\": " << r.b
       << ", \"act_sparsity\": " << r.act_sparsity << ", \"kernel\": \"" << r.kernel
       << "\", \"reps\": " << r.t.size() << ", \"min_us\": " << r.t.front() * 1e6
       << ", \"median_us\": " << med * 1e6 << ", \"speedup_vs_dense\": " << speedup
       << ", \"bytes_read\": " << int64_t(r.bytes) << ", \"eff_GBps\": " << gbs
       << ", \"frac_copy_read_write\": " << gbs / bw.traffic_gbs << ", \"frac_read\": " << gbs / bw.read_gbs
       << "}";
  }
  js << "\n  ]\n}\n";
  std::printf("\n%s", js.str().c_str());
  if (!opt.json_path.empty()) std::ofstream(opt.json_path) << js.str();
  return 0;
}

}  // namespace
}  // namespace duogpt

int main(int argc, char** argv) {
  duogpt::Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    long long out = 0, in = 0;
    char tail = 0;
    if (a == "--shape" && i + 1 < argc && std::sscanf(argv[++i], "%lldx%lld%c", &out, &in, &tail) == 2 &&
        out > 0 && in > 0) {
      opt.shapes.push_back({out, in});
    } else if (a == "--quick") {
      opt.quick = true;
    } else if (a == "--isa" && i + 1 < argc) {
      opt.isa = argv[++i];
    } else if (a == "--json" && i + 1 < argc) {
      opt.json_path = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--isa scalar|avx2|avx512] [--quick] [--json PATH] [--shape OUTxIN]...\n",
                   argv[0]);
      return 2;
    }
  }
  if (opt.shapes.empty()) opt.shapes = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  try {
    return duogpt::run(opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
