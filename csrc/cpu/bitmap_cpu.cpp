// Bitmap packing on the CPU (docs/format.md). Work is split by 1024-row tiles: a tile owns its
// bitmap words and its value range in every channel, so threads never share a cache line of output
// except at tile borders of the values array.
#include <omp.h>

#include <cstring>
#include <vector>

#include "duogpt/bitmap.h"
#include "duogpt/check.h"

namespace duogpt {
namespace {

// A weight counts as non-zero unless it compares equal to zero (-0.0 is zero, NaN is not).
template <typename T>
bool nonzero(T v);
template <>
bool nonzero<float>(float v) { return v != 0.0f; }
template <>
bool nonzero<uint16_t>(uint16_t v) { return (v & 0x7fffu) != 0; }  // fp16 and bf16 alike

template <typename T>
void index_tiles(const T* w, int64_t n, int64_t k, uint32_t* bitmap, int64_t* counts) {
  const int64_t words = bitmap_words(n), tiles = bitmap_tiles(n);
  std::memset(bitmap, 0, sizeof(uint32_t) * k * words);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r1 = std::min(n, (t + 1) * kTileRows);
    for (int64_t r = t * kTileRows; r < r1; ++r) {
      const T* row = w + r * k;
      const uint32_t bit = 1u << (r % kWordBits);
      uint32_t* col_word = bitmap + r / kWordBits;
      for (int64_t j = 0; j < k; ++j) {
        if (nonzero(row[j])) col_word[j * words] |= bit;
      }
    }
    const int64_t w0 = t * (kTileRows / kWordBits), w1 = std::min(words, w0 + kTileRows / kWordBits);
    for (int64_t j = 0; j < k; ++j) {
      int64_t c = 0;
      for (int64_t q = w0; q < w1; ++q) c += __builtin_popcount(bitmap[j * words + q]);
      counts[j * tiles + t] = c;
    }
  }
}

template <typename T>
void fill_tiles(const T* w, int64_t n, int64_t k, const int32_t* offsets, T* values) {
  const int64_t tiles = bitmap_tiles(n);
#pragma omp parallel
  {
    std::vector<int64_t> cursor(k);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tiles; ++t) {
      for (int64_t j = 0; j < k; ++j) cursor[j] = offsets[j * tiles + t];
      const int64_t r1 = std::min(n, (t + 1) * kTileRows);
      for (int64_t r = t * kTileRows; r < r1; ++r) {
        const T* row = w + r * k;
        for (int64_t j = 0; j < k; ++j) {
          if (nonzero(row[j])) values[cursor[j]++] = row[j];
        }
      }
    }
  }
}

template <typename T>
void unpack_tiles(const uint32_t* bitmap, const T* values, const int32_t* offsets, int64_t n,
                  int64_t k, T* w) {
  const int64_t words = bitmap_words(n);
  std::memset(static_cast<void*>(w), 0, sizeof(T) * n * k);
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < k; ++j) {
    int64_t p = offsets[j * bitmap_tiles(n)];
    for (int64_t q = 0; q < words; ++q) {
      for (uint32_t m = bitmap[j * words + q]; m; m &= m - 1) {
        w[(q * kWordBits + __builtin_ctz(m)) * k + j] = values[p++];
      }
    }
  }
}

void check_sizes(int64_t n, int64_t k) {
  DUOGPT_CHECK(n > 0 && k > 0, "weight must have positive sizes, got ", n, " x ", k);
}

}  // namespace

int64_t bitmap_index_cpu(const void* w, Dtype dt, int64_t n, int64_t k, int32_t* bitmap,
                         int32_t* offsets) {
  check_sizes(n, k);
  const int64_t tiles = bitmap_tiles(n);
  std::vector<int64_t> counts(k * tiles);
  auto* bm = reinterpret_cast<uint32_t*>(bitmap);
  if (dt == Dtype::kFloat32) {
    index_tiles(static_cast<const float*>(w), n, k, bm, counts.data());
  } else {
    index_tiles(static_cast<const uint16_t*>(w), n, k, bm, counts.data());
  }
  int64_t total = 0;
  for (int64_t i = 0; i < k * tiles; ++i) {
    offsets[i] = static_cast<int32_t>(total);
    total += counts[i];
    DUOGPT_CHECK(total < (int64_t(1) << 31), "the weight has ", total,
                 "+ non-zeros; the bitmap format's int32 offsets hold fewer than 2^31: "
                 "split the matrix");
  }
  offsets[k * tiles] = static_cast<int32_t>(total);
  return total;
}

void bitmap_fill_cpu(const void* w, Dtype dt, int64_t n, int64_t k, const int32_t* offsets,
                     void* values) {
  check_sizes(n, k);
  if (dt == Dtype::kFloat32) {
    fill_tiles(static_cast<const float*>(w), n, k, offsets, static_cast<float*>(values));
  } else {
    fill_tiles(static_cast<const uint16_t*>(w), n, k, offsets, static_cast<uint16_t*>(values));
  }
}

void bitmap_validate_cpu(const int32_t* bitmap, const int32_t* offsets, int64_t n, int64_t k,
                         int64_t nnz) {
  check_sizes(n, k);
  const int64_t words = bitmap_words(n), tiles = bitmap_tiles(n);
  const auto* bm = reinterpret_cast<const uint32_t*>(bitmap);
  DUOGPT_CHECK(offsets[0] == 0, "corrupted bitmap weight: offsets[0] is ", offsets[0], ", not 0");
  DUOGPT_CHECK(offsets[k * tiles] == nnz, "corrupted bitmap weight: offsets end at ",
               offsets[k * tiles], " but there are ", nnz, " values");
  const uint32_t pad_mask = (n % kWordBits) ? ~((1u << (n % kWordBits)) - 1u) : 0u;
  // Each offset against the running count in int64: differences of int32 offsets would pass
  // offsets that wrapped past 2^31 with more set bits than values.
  int64_t count = 0;
  for (int64_t j = 0; j < k; ++j) {
    DUOGPT_CHECK((bm[j * words + words - 1] & pad_mask) == 0,
                 "corrupted bitmap weight: channel ", j, " has bits set past row ", n);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t i = j * tiles + t;
      DUOGPT_CHECK(offsets[i] == count, "corrupted bitmap weight: channel ", j, " tile ", t,
                   " starts at value ", offsets[i], " but the bits before it count ", count);
      const int64_t w0 = t * (kTileRows / kWordBits), w1 = std::min(words, w0 + kTileRows / kWordBits);
      for (int64_t q = w0; q < w1; ++q) count += __builtin_popcount(bm[j * words + q]);
    }
  }
  DUOGPT_CHECK(count == nnz, "corrupted bitmap weight: the bitmap has ", count, " bits set but there are ",
               nnz, " values");
}

void bitmap_unpack_cpu(const int32_t* bitmap, const void* values, const int32_t* offsets, Dtype dt,
                       int64_t n, int64_t k, int64_t nnz, void* w) {
  bitmap_validate_cpu(bitmap, offsets, n, k, nnz);
  const auto* bm = reinterpret_cast<const uint32_t*>(bitmap);
  if (dt == Dtype::kFloat32) {
    unpack_tiles(bm, static_cast<const float*>(values), offsets, n, k, static_cast<float*>(w));
  } else {
    unpack_tiles(bm, static_cast<const uint16_t*>(values), offsets, n, k, static_cast<uint16_t*>(w));
  }
}

}  // namespace duogpt
