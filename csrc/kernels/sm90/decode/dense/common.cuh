// What the dense decode kernels (kernel.cuh, kernel_ws.cuh) share: loading a CTA's Q rows.
#pragma once

#include "kernels/params.h"
#include "kernels/sm90/decode/tile_attention.cuh"

namespace jfm {
namespace sm90 {

// cp.async of the CTA's 64 query rows row0 .. into the swizzled Q tile at sq: row r of KV head
// hk is query token r / hpk, head hk * hpk + r % hpk of batch element seq (rows past rows_total
// zero-filled), by threads 0 .. kThreads - 1 (load_tile_rows).
template <typename T, int kThreads>
__device__ __forceinline__ void load_dense_q_tile(const DenseDecodeParams& p, int seq, int row0,
                                                  int hk, int hpk, int rows_total, uint32_t sq) {
  const T* __restrict__ qg = reinterpret_cast<const T*>(p.q);
  load_tile_rows<T, kDenseDqk, kThreads>(sq, threadIdx.x, qg, [&](int r) -> const T* {
    const int grow = row0 + r;
    if (grow >= rows_total) return nullptr;
    const int s = grow / hpk, hl = grow % hpk;
    return qg + ((static_cast<size_t>(seq) * p.s_q + s) * p.h_q + hk * hpk + hl) * kDenseDqk;
  });
}

}  // namespace sm90
}  // namespace jfm
