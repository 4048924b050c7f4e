// Compile-time tile configuration of the bitmap spMspV kernels (spmspv_kernel.cuh).
#pragma once

namespace duogpt::cuda::spmspv {

constexpr int kThreads = 256;                    // main kernel: 8 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kMinCtasPerSm = 2;                 // launch bounds: <= 128 registers per thread
constexpr int kTileWords = 32;                   // one 1024-row offset tile = 32 bitmap words
constexpr int kWordsPerWarp = kTileWords / kWarps;  // 4 words = 128 output rows per warp
constexpr int kChunk = 64;                       // channels classified per step of a CTA's slice
// Active channels whose value loads a warp issues together (kWordsPerWarp loads each): 4 for
// b <= 2 (16 loads in flight per warp), 2 for larger b, whose accumulators take the registers.
template <int BP>
constexpr int kChannelUnroll = BP <= 2 ? 4 : 2;
constexpr int kSelectThreads = 1024;             // top-k threshold kernel: one CTA per token
constexpr int kReduceThreads = 256;
constexpr int kMaxSplits = 1024;                 // bound of the partial-sum workspace

static_assert(kTileWords % kWarps == 0, "warps must split the tile's words evenly");
static_assert(kChunk <= kThreads && kChunk % 32 == 0, "classification uses whole warps");

}  // namespace duogpt::cuda::spmspv
