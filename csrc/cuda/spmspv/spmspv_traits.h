// Compile-time tile configuration of the bitmap spMspV kernels (spmspv_kernel.cuh).
#pragma once

namespace duogpt::cuda::spmspv {

constexpr int kThreads = 256;                    // main kernel: 8 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kMinCtasPerSm = 2;                 // launch bounds: <= 128 registers per thread
constexpr int kTileWords = 32;                   // one 1024-row offset tile = 32 bitmap words
constexpr int kWordsPerWarp = kTileWords / kWarps;  // 4 words = 128 output rows per warp
constexpr int kChunk = 128;                      // channels classified per step of a CTA's slice
// Active channels staged in shared memory together (one warp copies each): a 1024-row span of
// values is 2 KB at 16 bits, 4 KB at 32; two stages of 8 or 4 slots take 33 KB.
template <typename V>
constexpr int kStage = sizeof(V) == 4 ? 4 : 8;
constexpr int kSelectThreads = 1024;             // top-k threshold kernel: one CTA per token,
constexpr int kSelectPerThread = 32;             // holding up to 32 x 1024 keys in registers
constexpr int kReduceThreads = 256;             // reduce kernel: 32 outputs x 8 split groups
constexpr int kMaxSplits = 1024;                 // bound of the partial-sum workspace

static_assert(kTileWords % kWarps == 0, "warps must split the tile's words evenly");
static_assert(kChunk <= kThreads && kChunk % 32 == 0, "classification uses whole warps");

}  // namespace duogpt::cuda::spmspv
