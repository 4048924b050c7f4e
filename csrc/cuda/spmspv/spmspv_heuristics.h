// How many channel slices ("splits") the spMspV main kernel cuts the input channels into: a pure
// function of the sizes, b and the SM count, so a given device and shape always sum in one order.
//
// Every CTA owns one (1024-row tile, channel slice) pair and writes b x 1024 fp32 partial sums
// that the reduce kernel adds in a fixed order. More splits put more CTAs (and more copies in
// flight) on the SMs but move more partial sums through L2, so:
//   target  = kCtasPerSm x SMs CTAs (4 resident CTAs, each with a stage of 8 channel spans in
//             flight, ~32 KB per SM at 50 % fp16 density; ~3 TB/s at ~700 ns needs ~16 KB,
//             yet an H100 reaches only ~1 TB/s: bench/results/cuda-h100-2026-11-24.md);
//   a slice holds at least kMinSliceBase x ceil(b / 2) channels, so the partials stay a modest
//             fraction of the weight bytes a CTA reads.
// Worked example, H100 (132 SMs), out x in = 4096 x 11008, b = 1:
//   tiles = 4; target 528 CTAs -> splits = 132; slice = ceil(11008 / 132) = 84 >= 32;
//   partials = 132 x 1 x 4096 x 4 B = 2.2 MB against 25 MB read at 50 % weight + 50 % activation
//   sparsity. With b = 8: min slice 128 -> splits = 86, partials 11 MB against ~50 MB read.
// 28672 x 8192, b = 1: tiles = 28 -> splits = 19, slice = 432, 532 CTAs.
#pragma once

#include <algorithm>
#include <cstdint>

#include "spmspv/spmspv_traits.h"

namespace duogpt::cuda::spmspv {

constexpr int64_t kCtasPerSm = 4;
constexpr int64_t kMinSliceBase = 32;

inline int64_t choose_splits(int64_t b, int64_t k, int64_t n, int sms) {
  const int64_t tiles = (n + 1023) / 1024;
  const int64_t target = std::max<int64_t>(1, kCtasPerSm * sms);
  const int64_t min_slice = kMinSliceBase * ((b + 1) / 2);
  int64_t splits = (target + tiles - 1) / tiles;
  splits = std::min(splits, (k + min_slice - 1) / min_slice);
  splits = std::min<int64_t>(std::max<int64_t>(splits, 1), kMaxSplits);
  // Re-derive from the slice so that no split is empty.
  const int64_t slice = (k + splits - 1) / splits;
  return (k + slice - 1) / slice;
}

inline int64_t slice_channels(int64_t k, int64_t splits) { return (k + splits - 1) / splits; }

}  // namespace duogpt::cuda::spmspv
