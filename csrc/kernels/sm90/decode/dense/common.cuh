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

// JFM_DENSE_WIDE_OUT (off until its GPU tests and sanitizers have run; =1 on): the dense kernels'
// final output rows (bf16 / fp16) in 16-byte stores (store_out_row's kWide, as the bf16 sparse
// kernels' since JFM_WIDE_OUT_STORES: 8 stores per thread and row instead of 32 4-byte ones).
// Why: the tile probe's end stamps (H200, 2026-12-05 ninth session, dense h128) put a sequence's
// final rows at 7.8-8.7K cycles from the row totals to the stores issued, ~2.5 tiles, on both
// math warpgroups' path at every sequence boundary (JFM_WIDE_OUT_STORES had left dense out as
// storing once per 64-tile sequence); the partial rows' 8-byte stores took 3.2-4.2K.
// Measured (H100, same call, each build in its own process, profiler kernel medians of 30):
// h128 b64 s_k 4K fixed 133.0 -> 126.5 us (-4.9%), b256 s_k 1K fixed 163.9 -> 148.2 (-9.6%; again
// in a second call 163.4 -> 148.0), b16 s_k 16K fixed, b128 s_k 8K and h64 b128 s_k 4K flat
// (+-0.5%); h128 s_q 2 causal b128 s_k 8K +5.2% in the first call and +0.4% / -5.4% in the second
// (this row moves +-5% between runs of one build on the H100: power). ptxas: same registers, no
// new spill. With it and 16-byte float partials (a lane-pair swap; -0.3 to -0.8% more, the noise
// level; removed: with JFM_DENSE_EARLY_Q they spilled 16-20 bytes) 67 of the dense GPU tests
// passed before the call's time ran out; not yet run: the rest, memcheck, racecheck.
#ifndef JFM_DENSE_WIDE_OUT
#define JFM_DENSE_WIDE_OUT 0
#endif
constexpr bool kDenseWideOut = JFM_DENSE_WIDE_OUT != 0;

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
      store_out_row<T, kDenseWideOut>(
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
