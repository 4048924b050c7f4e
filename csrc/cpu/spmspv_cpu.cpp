// The CPU decode GEMVs around their ISA-specific inner loops:
//   1. x -> float32, the activation rule zeroes the dropped entries of every token;
//   2. the active channels (kept and non-zero for at least one token) are listed with their
//      activations, so dropped channels are never touched;
//   3. threads take contiguous slices of the active list holding equal numbers of non-zeros and
//      accumulate into private float32 buffers (no atomics, a fixed summation order per slice);
//   4. the buffers are summed into y in x's dtype.
// A decode step calls these hundreds of times with the same shapes, and each call is only tens to
// hundreds of microseconds of memory traffic, so the bookkeeping around the kernels is written to
// stay a few percent of it: per-thread scratch reused across calls, branch-free loops the compiler
// vectorises, and one parallel region per call.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "duogpt/bitmap.h"
#include "duogpt/check.h"
#include "duogpt/spmspv.h"
#include "gemv_isa.h"

namespace duogpt {
namespace {

// ---- scratch ------------------------------------------------------------------------------------

// A grow-only buffer aligned to a cache line, so that the kernels' 64-byte vectors never straddle
// two lines.
template <typename T>
class Buffer {
 public:
  T* get(int64_t count) {
    if (count > capacity_) {
      const size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
      data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      DUOGPT_CHECK(data_ != nullptr, "cannot allocate ", bytes, " bytes of GEMV scratch");
      capacity_ = count;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  int64_t capacity_ = 0;
};

// Scratch of the calling thread (the OpenMP team shares it through the caller).
struct Scratch {
  Buffer<float> xs;      // [b, k] activations in fp32, dropped entries zeroed
  Buffer<int32_t> active;  // [n_active] channel indices
  Buffer<float> xa;      // [n_active, b] their activations
  Buffer<int64_t> work;  // [n_active + 1] running count of their non-zeros
  Buffer<uint32_t> keys;  // [threads, k] top-k candidates
  Buffer<float> acc;     // [threads, b, ld] per-thread accumulators; dense: [b, n] output
  Buffer<char> tail;     // [threads, reach] a zero-padded copy of one of the last channels' values
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// ---- conversions --------------------------------------------------------------------------------

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Branch-free forms of half_to_float / float_to_half / float_to_bf16 (types.h), bit-identical to them for every
// input (checked exhaustively) and written with masks so that the loops over a row vectorise.
inline float half_to_float_vec(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + (112u << 23);        // rebias the exponent
  const uint32_t special = (em << 13) | 0x7f800000u;        // inf / NaN, payload kept
  const uint32_t sub = bits_of(float(int32_t(em)) * 0x1p-24f);  // exact: em < 2^10
  const uint32_t is_special = 0u - uint32_t(em >= 0x7c00u), is_normal = 0u - uint32_t(em >= 0x400u);
  return float_of(sign | (special & is_special) | (normal & is_normal & ~is_special) | (sub & ~is_normal));
}

inline uint16_t float_to_half_vec(float f) {
  const uint32_t all = bits_of(f), sign = (all >> 16) & 0x8000u, x = all & 0x7fffffffu;
  const uint32_t r = x - 0x38000000u;                                  // rebias the exponent
  const uint32_t normal = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;       // round to nearest even
  // Adding 0.5 puts the half's subnormal step (2^-24) at the float's last mantissa bit, so the
  // addition itself rounds to nearest even; inputs the CPU may flush (float subnormals) give 0
  // either way.
  const uint32_t sub = bits_of(float_of(x) + 0.5f) - 0x3f000000u;
  const uint32_t nan = 0x7e00u | ((x >> 13) & 0x3ffu);
  const uint32_t is_nan = 0u - uint32_t(x > 0x7f800000u), is_big = 0u - uint32_t(x >= 0x477ff000u);
  const uint32_t is_sub = 0u - uint32_t(x < 0x38800000u);
  return uint16_t(sign | (nan & is_nan) | (0x7c00u & is_big & ~is_nan) | (sub & is_sub) |
                  (normal & ~is_big & ~is_sub));
}

inline uint16_t float_to_bf16_vec(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const uint32_t is_nan = 0u - uint32_t((u & 0x7fffffffu) > 0x7f800000u);
  return uint16_t((((u >> 16) | 0x40u) & is_nan) | (rounded & ~is_nan));  // NaN stays quiet
}

void to_float(const void* src, Dtype dt, int64_t count, float* dst) {
  const auto* h = static_cast<const uint16_t*>(src);
  if (dt == Dtype::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(count) * 4);
  } else if (dt == Dtype::kFloat16) {
    for (int64_t i = 0; i < count; ++i) dst[i] = half_to_float_vec(h[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) dst[i] = float_of(uint32_t(h[i]) << 16);
  }
}

// dst[i] = src[i] in dtype dt, i < count.
void from_float(const float* src, int64_t count, Dtype dt, void* dst) {
  auto* h = static_cast<uint16_t*>(dst);
  if (dt == Dtype::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(count) * 4);
  } else if (dt == Dtype::kFloat16) {
    for (int64_t i = 0; i < count; ++i) h[i] = float_to_half_vec(src[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) h[i] = float_to_bf16_vec(src[i]);
  }
}

// ---- activation rule ----------------------------------------------------------------------------

// |v| as an integer that orders like the magnitude, NaN ranked with +inf: non-finite activations
// are always kept.
inline uint32_t magnitude_key(float v) { return std::min(bits_of(v) & 0x7fffffffu, 0x7f800000u); }

// The key of ascending rank `rank` among the magnitudes of x[0, k). A histogram of the top bits
// finds its bucket in one pass; nth_element finishes among the few keys of that bucket.
uint32_t select_magnitude(const float* x, int64_t k, int64_t rank, uint32_t* cand) {
  constexpr int kShift = 20;  // keys are below 2^31: 2048 buckets of 2^20
  constexpr int kStride = 16;  // buckets summed per step of the scan (it divides 2048)
  uint32_t hist[1u << (31 - kShift)] = {};
  for (int64_t j = 0; j < k; ++j) ++hist[magnitude_key(x[j]) >> kShift];
  // The scan walks ~1000 buckets to the median of activation-like data: kStride at a time, the
  // sums vectorised, then one by one. Bucket by bucket it was a quarter of the selection.
  uint32_t bucket = 0;
  int64_t below = 0;
  for (;;) {
    uint32_t sum = 0;
    for (int i = 0; i < kStride; ++i) sum += hist[bucket + i];
    if (below + sum > rank) break;
    below += sum;
    bucket += kStride;
  }
  while (below + hist[bucket] <= rank) below += hist[bucket++];
  int64_t count = 0;
  for (int64_t j = 0; j < k; ++j) {
    const uint32_t key = magnitude_key(x[j]);
    cand[count] = key;
    count += (key >> kShift) == bucket;
  }
  std::nth_element(cand, cand + (rank - below), cand + count);
  return cand[rank - below];
}

// Zero the entries of xs [b, k] that the rule drops (see spmspv.h). `cand` holds k keys per thread.
void apply_rule(float* xs, int64_t b, int64_t k, const ActivationRule& rule, uint32_t* cand) {
  if (rule.threshold != nullptr) {
    for (int64_t t = 0; t < b; ++t) {
      float* xt = xs + t * k;
      for (int64_t j = 0; j < k; ++j) {
        const float m = float_of(magnitude_key(xt[j]));
        xt[j] = m > rule.threshold[j] ? xt[j] : 0.0f;
      }
    }
  } else if (rule.topk_fraction >= 0.0) {
    const int64_t drop = topk_drop(k, rule.topk_fraction);
    if (drop == 0) return;
    auto select = [&](int64_t t, uint32_t* keys) {
      float* xt = xs + t * k;
      const uint32_t tau = select_magnitude(xt, k, drop, keys);
      for (int64_t j = 0; j < k; ++j) xt[j] = magnitude_key(xt[j]) >= tau ? xt[j] : 0.0f;
    };
    // Tokens select independently. From 3 tokens on, the threads share them: one more fork/join
    // (~1 us) against ~2 us of selection per token on 576 channels, 1.0-1.17x at b = 4 and 8 on
    // SmolLM2's shapes (bench/results/cpu-module-call-and-bounds-2026-11-24.md); at b = 2 it
    // did not pay.
    if (b <= 2) {
      for (int64_t t = 0; t < b; ++t) select(t, cand);
    } else {
#pragma omp parallel for schedule(static)
      for (int64_t t = 0; t < b; ++t) select(t, cand + omp_get_thread_num() * k);
    }
  }
}

// ---- active channels ----------------------------------------------------------------------------

struct ActiveChannels {
  int64_t count;  // n_active
  bool finite;    // every activation is finite
};

// The channels of xs [b, k] that are non-zero for at least one token into active [n_active], their
// activations into xa [n_active, b] and the running count of their non-zeros into
// work [n_active + 1], compacted without branches (whether a channel is active is a coin flip
// under top-k); whether every activation is finite comes along. A function of its own, specialised
// for the token count: written inside spmspv_cpu, whose parallel region takes the counters'
// addresses, the loop kept them in memory and paid a token-loop setup per channel: 8-12 TSC cycles
// a channel against 5-8 (bench/results/cpu-gemv-call-overhead-2026-11-24.md).
template <int B>
ActiveChannels list_active_tokens(const float* xs, int64_t k, const int32_t* offsets, int64_t tiles,
                                  int32_t* active, float* xa, int64_t* work) {
  int64_t n_active = 0, total = 0;
  bool finite = true;
  // With the ends checked by the caller, channel starts that ascend all lie in [0, nnz]. Checked
  // here, on offsets this loop reads anyway: a loop of its own costs 3-5 % of a call on 576-wide
  // weights.
  bool ascending = true;
  work[0] = 0;
  for (int64_t j = 0; j < k; ++j) {
    bool any = false;
    for (int t = 0; t < B; ++t) {
      const float v = xs[t * k + j];
      xa[n_active * B + t] = v;
      any |= v != 0.0f;
      finite &= (v - v) == 0.0f;
    }
    const int32_t start = offsets[j * tiles], next = offsets[(j + 1) * tiles];
    ascending &= start <= next;
    active[n_active] = static_cast<int32_t>(j);
    work[n_active + 1] = total + (next - start);
    total += (next - start) & -int64_t(any);
    n_active += any;
  }
  DUOGPT_CHECK(ascending, "offsets descend between input channels: the packed weight is corrupted "
               "(BitmapWeight.from_state_dict validates it and names the first bad entry)");
  return {n_active, finite};
}

ActiveChannels list_active(const float* xs, int64_t b, int64_t k, const int32_t* offsets,
                           int64_t tiles, int32_t* active, float* xa, int64_t* work) {
  ActiveChannels found;
  cpu::with_tokens(b, [&](auto B) {
    found = list_active_tokens<decltype(B)::value>(xs, k, offsets, tiles, active, xa, work);
  });
  return found;
}

// ---- around the kernels -------------------------------------------------------------------------

// `count` values (of `vsize` bytes) from v into copy, zero-padded to `reach`: a channel near the end
// of values as far as a kernel may read it. Out of line: it runs for a few channels per call.
[[gnu::noinline]] const char* padded_copy(const char* v, int64_t count, int64_t reach, int64_t vsize,
                                          char* copy) {
  if (count > 0) std::memcpy(copy, v, count * vsize);  // v is null when values is empty
  std::memset(copy + count * vsize, 0, (reach - count) * vsize);
  return copy;
}

// Rows [r0, r1) of thread th out of threads, in blocks of 16 rows so that no two threads write one
// cache line of a float32 row.
inline void row_range(int64_t n, int th, int threads, int64_t& r0, int64_t& r1) {
  const int64_t chunk = ((n + threads - 1) / threads + 15) / 16 * 16;
  r0 = std::min(n, th * chunk);
  r1 = std::min(n, r0 + chunk);
}

}  // namespace

void check_gemv_dtypes(Dtype x_dt, Dtype w_dt) {
  DUOGPT_CHECK(valid_dtype(int64_t(x_dt)) && valid_dtype(int64_t(w_dt)), "unknown dtype code");
}

void check_gemv_sizes(int64_t b, int64_t k, int64_t n) {
  DUOGPT_CHECK(b >= 1 && b <= kMaxTokens, "b must be in [1, ", kMaxTokens, "], got ", b);
  DUOGPT_CHECK(k > 0 && n > 0, "sizes must be positive, got k=", k, " n=", n);
}

void check_activation_rule(const ActivationRule& rule) {
  DUOGPT_CHECK(rule.threshold == nullptr || rule.topk_fraction < 0.0,
               "give either a threshold or a top-k fraction, not both");
  DUOGPT_CHECK(rule.topk_fraction < 1.0, "topk_fraction must be in [0, 1), got ", rule.topk_fraction);
}

void spmspv_cpu(const void* x, Dtype x_dt, int64_t b, int64_t k, const int32_t* bitmap,
                const void* values, const int32_t* offsets, Dtype v_dt, int64_t n, int64_t nnz,
                ActivationRule rule, void* y) {
  check_gemv_dtypes(x_dt, v_dt);
  check_gemv_sizes(b, k, n);
  check_activation_rule(rule);
  const int64_t words = bitmap_words(n), tiles = bitmap_tiles(n);
  DUOGPT_CHECK(offsets[0] == 0 && offsets[k * tiles] == nnz, "offsets run from ", offsets[0], " to ",
               offsets[k * tiles], " but values holds ", nnz, " non-zeros: offsets must run from 0 "
               "to the length of values (pass the tensors of one packed weight)");
  // One spare cache line per accumulator row: rows a multiple of 4 KiB apart would make every
  // load of one token's row wait on the store to the previous token's (4K aliasing).
  const int64_t ld = words * kWordBits + 16;
  // What a kernel may read from a channel's first value, whatever its bitmap holds (gemv_isa.h).
  const int64_t reach = words * kWordBits + cpu::kOverRead;
  Scratch& s = scratch();

  float* xs = s.xs.get(b * k);
  to_float(x, x_dt, b * k, xs);
  apply_rule(xs, b, k, rule, s.keys.get(omp_get_max_threads() * k));

  int32_t* active = s.active.get(k);
  float* xa = s.xa.get(k * b);
  int64_t* work = s.work.get(k + 1);
  const ActiveChannels found = list_active(xs, b, k, offsets, tiles, active, xa, work);
  const int64_t n_active = found.count;

  if (n_active == 0) {
    float* zeros = s.acc.get(b * n);
    std::fill_n(zeros, b * n, 0.0f);
    from_float(zeros, b * n, x_dt, y);
    return;
  }

  const cpu::GemvKernels& kernels = cpu::active_gemv_kernels();
  const auto accumulate = kernels.accumulate[int64_t(v_dt)];
  const auto groups = kernels.accumulate_groups[int64_t(v_dt)];
  // The group kernel multiplies zero weights by x: with a non-finite activation (kept by every
  // rule), each channel goes alone.
  const bool grouped = groups != nullptr && found.finite;
  const auto* bm = reinterpret_cast<const uint32_t*>(bitmap);
  const char* vbytes = static_cast<const char*>(values);
  const int64_t vsize = dtype_size(v_dt);
  const int threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), n_active));
  float* acc = s.acc.get(threads * b * ld);
  char* tails = s.tail.get(threads * reach * vsize);
  const int64_t total = work[n_active];

#pragma omp parallel num_threads(threads)
  {
    // The team may be smaller than asked for (OMP_THREAD_LIMIT, OMP_DYNAMIC, nesting): the work is
    // split over the threads that came, or the missing ones' slices and rows would be skipped.
    const int team = omp_get_num_threads(), th = omp_get_thread_num();
    // Slice boundaries: the first active channel whose running count reaches th / team.
    auto bound = [&](int i) {
      return std::lower_bound(work, work + n_active, total * i / team) - work;
    };
    const int64_t a0 = bound(th), a1 = th + 1 == team ? n_active : bound(th + 1);
    float* mine = acc + th * b * ld;
    std::fill_n(mine, b * ld, 0.0f);
    char* tail = tails + th * reach * vsize;
    // A channel with fewer than `reach` values after its start (one of the last of the matrix)
    // goes through a zero-padded copy: no kernel reads past the end of values.
    auto near_end = [&](int64_t start) { return start + reach > nnz; };
    auto one = [&](int64_t a) {
      const int64_t j = active[a], start = offsets[j * tiles];
      const char* v = vbytes + start * vsize;
      if (near_end(start)) v = padded_copy(v, nnz - start, reach, vsize, tail);
      accumulate(bm + j * words, words, v, xa + a * b, b, mine, ld);
    };
    // Group i takes entry i of each of the kGroup equal runs of this slice. Each of the kernel's
    // kGroup value (and bitmap) streams then goes on in the next group where it ended, one long
    // stream that the hardware prefetcher follows. With consecutive channels in a group, every
    // stream would end where the next one began, and the prefetcher would restart kGroup streams
    // per group: this order is 0.99-1.39x as fast, median 1.1x, on 576 rows or more
    // (bench/results/cpu-gemv-strided-2026-11-24.md).
    const int64_t run = grouped ? (a1 - a0) / cpu::kGroup : 0;
    cpu::GroupedSlice g{bm, words, values, offsets, tiles, active, xa, b, a0, run, run};
    // Channels start in ascending order, so a group's last channel starts last and the groups
    // that reach the end of values come last: they go channel by channel, through the copies.
    auto last_start = [&](int64_t i) { return offsets[active[a0 + (cpu::kGroup - 1) * run + i] * tiles]; };
    while (g.groups > 0 && near_end(last_start(g.groups - 1))) --g.groups;
    if (g.groups > 0) groups(g, mine, ld);
    for (int64_t i = g.groups; i < run; ++i) {
      for (int c = 0; c < cpu::kGroup; ++c) one(a0 + c * run + i);
    }
    for (int64_t a = a0 + cpu::kGroup * run; a < a1; ++a) one(a);
#pragma omp barrier
    // Sum the buffers into thread 0's, then convert, over this thread's rows.
    int64_t r0, r1;
    row_range(n, th, team, r0, r1);
    for (int64_t t = 0; t < b && r0 < r1; ++t) {
      float* sum = acc + t * ld;
      for (int other = 1; other < team; ++other) {
        const float* part = acc + (other * b + t) * ld;
        for (int64_t r = r0; r < r1; ++r) sum[r] += part[r];
      }
      from_float(sum + r0, r1 - r0, x_dt, static_cast<char*>(y) + (t * n + r0) * dtype_size(x_dt));
    }
  }
}

void dense_gemv_cpu(const void* x, Dtype x_dt, int64_t b, int64_t k, const void* w, Dtype w_dt,
                    int64_t n, void* y) {
  check_gemv_dtypes(x_dt, w_dt);
  check_gemv_sizes(b, k, n);
  Scratch& s = scratch();
  float* xf = s.xs.get(b * k);
  float* yf = s.acc.get(b * n);
  to_float(x, x_dt, b * k, xf);
  const auto dense = cpu::active_gemv_kernels().dense[int64_t(w_dt)];
#pragma omp parallel
  {
    int64_t r0, r1;
    row_range(n, omp_get_thread_num(), omp_get_num_threads(), r0, r1);
    if (r0 < r1) {
      dense(w, k, xf, b, r0, r1, yf, n);
      for (int64_t t = 0; t < b; ++t) {
        from_float(yf + t * n + r0, r1 - r0, x_dt, static_cast<char*>(y) + (t * n + r0) * dtype_size(x_dt));
      }
    }
  }
}

}  // namespace duogpt
