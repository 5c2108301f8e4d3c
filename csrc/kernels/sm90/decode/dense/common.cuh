// What the dense decode kernels (kernel.cuh, kernel_ws.cuh) share: loading a CTA's Q rows and
// storing its results.
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

// The CTA's rows after a batch element's last page: this thread's two rows of O (times 1 / l) and
// their lse, as the output (not split) or the partial of split slot `slot` (rows past
// rows_total skipped). Warpgroup wc holds O[:, 256 wc .. +256].
template <typename T>
__device__ __forceinline__ void store_dense_rows(const DenseDecodeParams& p, const RowState& st,
                                                 const float (&inv)[2], const float (&lse)[2],
                                                 int seq, int slot, int nsplit, int row0, int hk,
                                                 int hpk, int rows_total, const Lane& ln) {
  const RowMap map{p.s_q, p.s_q, p.h_q, hpk};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int grow = row0 + ln.row(h);
    if (grow >= rows_total) continue;
    const int s = grow / hpk, head = hk * hpk + grow % hpk;
    if (nsplit == 1) {
      store_out_row<T, kWideOutStores>(
          reinterpret_cast<T*>(p.out) + map.out_row(seq, s, head) * kDv + ln.wc * 256 + 2 * ln.tq,
          st, h, inv[h]);
      if (ln.wc == 0 && ln.tq == 0) p.lse[map.lse_index(seq, s, head)] = lse[h];
    } else {
      const size_t slot_row = (static_cast<size_t>(slot) * p.h_kv + hk) * rows_total + grow;
      store_partial_row(p.o_accum + slot_row * kDv + ln.wc * 256 + 2 * ln.tq, st, h, inv[h]);
      if (ln.wc == 0 && ln.tq == 0) p.lse_accum[slot_row] = lse[h];
    }
  }
}

}  // namespace sm90
}  // namespace jfm
