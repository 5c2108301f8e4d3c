// What the dense decode kernels (kernel.cuh, kernel_ws.cuh) share: loading a CTA's Q rows.
#pragma once

#include "kernels/params.h"
#include "kernels/sm90/decode/tile_attention.cuh"

namespace jfm {
namespace sm90 {

// cp.async of the CTA's 64 query rows row0 .. into the swizzled Q tile at sq: row r of KV head
// hk is query token r / hpk, head hk * hpk + r % hpk of batch element seq (rows past rows_total
// zero-filled). Threads 0 .. kThreads - 1, 8 per row (whole 128-byte lines): rows
// tid / 8 + kThreads / 8 h, chunks tid % 8 + 8 j. Committed by the caller's next cp_async_commit.
template <typename T, int kThreads>
__device__ __forceinline__ void load_dense_q_tile(const DenseDecodeParams& p, int seq, int row0,
                                                  int hk, int hpk, int rows_total, uint32_t sq) {
  using S = TileSmem<kDenseDqk>;
  constexpr int kPassRows = kThreads / 8;
  static_assert(kPassRows % 8 == 0 && kBlockM % kPassRows == 0, "whole swizzle atoms per pass");
  const T* __restrict__ qg = reinterpret_cast<const T*>(p.q);
  const int lr = threadIdx.x >> 3, lq = threadIdx.x & 7;
  const uint32_t off = static_cast<uint32_t>(lr * 128 + ((lq ^ (lr & 7)) << 4));
#pragma unroll
  for (int h = 0; h < kBlockM / kPassRows; ++h) {
    const int grow = row0 + lr + kPassRows * h;
    const bool ok = grow < rows_total;
    const int s = ok ? grow / hpk : 0, hl = ok ? grow % hpk : 0;
    const T* src =
        ok ? qg + ((static_cast<size_t>(seq) * p.s_q + s) * p.h_q + hk * hpk + hl) * kDenseDqk + lq * 8
           : qg;
#pragma unroll
    for (int j = 0; j < S::kKBlocks; ++j)
      cp_async_16(sq + j * S::kBlockBytes + h * kPassRows * 128 + off, src + 64 * j, ok ? 16 : 0);
  }
}

}  // namespace sm90
}  // namespace jfm
