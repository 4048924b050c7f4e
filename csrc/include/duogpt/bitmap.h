/// The bitmap format (docs/format.md): W (n x k) stored input-channel-major as a bitmap over rows,
/// the packed non-zeros, and int32 offsets per (channel, 1024-row tile).
#pragma once

#include <cstdint>

#include "duogpt/types.h"

namespace duogpt {

constexpr int64_t kTileRows = 1024;  // rows per offset tile = 32 bitmap words
constexpr int64_t kWordBits = 32;

inline int64_t bitmap_words(int64_t n) { return (n + kWordBits - 1) / kWordBits; }
inline int64_t bitmap_tiles(int64_t n) { return (n + kTileRows - 1) / kTileRows; }

/// @brief First packing pass: the bitmap and the offsets of a dense matrix.
/// @return nnz, the number of values the second pass writes.
int64_t bitmap_index_cpu(const void* w,      // dense weight, row-major [n, k], dtype dt
                         Dtype dt, int64_t n, int64_t k,
                         int32_t* bitmap,    // out: [k, bitmap_words(n)]
                         int32_t* offsets);  // out: [k * bitmap_tiles(n) + 1]

/// @brief Second packing pass: copy the non-zeros of w into values, in format order.
void bitmap_fill_cpu(const void* w,            // dense weight, row-major [n, k], dtype dt
                     Dtype dt, int64_t n, int64_t k,
                     const int32_t* offsets,   // [k * bitmap_tiles(n) + 1] from bitmap_index_cpu
                     void* values);            // out: [nnz], dtype dt

/// @brief Check that offsets start at 0, end at nnz and step by the popcount of each tile of the
/// bitmap, and that padding bits are clear; raise ArgumentError naming the first violation.
/// Run on every packed matrix that comes from outside (a checkpoint) before any kernel reads it.
void bitmap_validate_cpu(const int32_t* bitmap,   // [k, bitmap_words(n)]
                         const int32_t* offsets,  // [k * bitmap_tiles(n) + 1]
                         int64_t n, int64_t k, int64_t nnz);

/// @brief Expand a packed matrix back to dense (validating it first).
void bitmap_unpack_cpu(const int32_t* bitmap,   // [k, bitmap_words(n)]
                       const void* values,      // [nnz], dtype dt
                       const int32_t* offsets,  // [k * bitmap_tiles(n) + 1]
                       Dtype dt, int64_t n, int64_t k, int64_t nnz,
                       void* w);                // out: row-major [n, k], dtype dt

}  // namespace duogpt
