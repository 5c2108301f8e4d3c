// The attention math of one 64-token KV tile, shared by the sm90 decode kernels (dense and sparse)
// and sparse prefill: they differ in how a tile reaches shared memory, not in what is done with it.
//
// CTA: 256 threads = 2 warpgroups (wc). Shared memory holds Q [64 rows x d_qk] and each KV tile
// [64 tokens x d_qk] as kKBlocks column blocks of [64 rows x 128 B] with the 128-byte swizzle
// (16-byte chunk c of row r at chunk c ^ (r % 8); blocks 1024-byte aligned): the canonical layout
// wgmma reads through descriptors. P [64 x 64] is one such block.
//  * S: warpgroup wc computes S[:, 32 wc .. +32] = Q K^T (wgmma m64n32k16, A = Q, B = K, K-major).
//  * Online softmax in fp32 / exp2; the two warpgroups exchange their row maxima through `red`.
//  * O: warpgroup wc accumulates O[:, 256 wc .. +256] += P V (wgmma m64n256k16, A = P K-major,
//    B = V read from the same K tile as an MN-major operand).
// Accumulator fragments have the mma.sync C layout per 8 columns: warp w % 4 of a warpgroup owns
// rows 16 (w % 4) .. +16, thread rows g and g + 8 (g = lane / 4), columns 2 (lane % 4) + {0, 1}.
#pragma once

#include <cmath>
#include <type_traits>

#include "kernels/params.h"
#include "kernels/sm90/common/device_utils.cuh"
#include "kernels/sm90/common/wgmma_ops.cuh"

namespace jfm {
namespace sm90 {

// The shared-memory plan of a 256-thread tile-attention CTA with a Q tile, two KV tiles, P and
// the row-statistics exchange buffer.
template <int kDqk>
struct TileSmem {
  static constexpr int kKBlocks = kDqk / 64;                // 64-column blocks per row
  static constexpr int kBlockBytes = kBlockM * 128;         // 8192: one column block
  static constexpr int kTileBytes = kKBlocks * kBlockBytes;
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kTileBytes;                  // 2 tiles
  static constexpr int kPOff = 3 * kTileBytes;
  static constexpr int kRedOff = kPOff + kBlockBytes;       // float[2][64]
  static constexpr int kValidOff = kRedOff + 2 * kBlockM * 4;  // uint8[2][64] (sparse kernels)
  static constexpr size_t kBytes = kValidOff + 2 * kTileTokens + 1024;  // + alignment slack
  static_assert(kDqk % 64 == 0, "d_qk in whole 64-column blocks");
  static_assert(kBlockM == kTileTokens, "square tiles: P is one column block");

  // Byte offset of 16-byte chunk c (0 .. 8 kKBlocks - 1) of row r inside a swizzled tile.
  static __device__ __forceinline__ uint32_t chunk_off(int r, int c) {
    return (c >> 3) * kBlockBytes + r * 128 + (((c & 7) ^ (r & 7)) << 4);
  }
};

// How the 256 math threads synchronize inside the tile functions: the whole CTA (kernels whose
// every thread does the math), or a named barrier over threads 0-255 only (warp-specialized
// kernels, whose producer warps run their own loop and never join it).
struct CtaSync {
  static __device__ __forceinline__ void sync() { __syncthreads(); }
};
struct MathWarpsSync {
  static constexpr int kBarrierId = 1;
  static __device__ __forceinline__ void sync() { named_barrier_sync(kBarrierId, 256); }
};

// Which rows and columns of the accumulators this thread holds.
struct Lane {
  int tid, wr, wc, g, tq;
  __device__ __forceinline__ Lane() : Lane(static_cast<int>(threadIdx.x)) {}
  __device__ __forceinline__ explicit Lane(int t) {
    tid = t;
    const int warp = tid >> 5, lane = tid & 31;
    wr = warp & 3;
    wc = warp >> 2;
    g = lane >> 2;
    tq = lane & 3;
  }
  __device__ __forceinline__ int row(int h) const { return wr * 16 + g + 8 * h; }  // h = 0, 1
  // Token (column of S) of accumulator element e of n-tile nt (e = 0..3).
  __device__ __forceinline__ int col(int nt, int e) const { return wc * 32 + nt * 8 + 2 * tq + (e & 1); }
};

// D[64 x kN] = A B^T over d_qk, both operands K-major swizzled tiles with d_qk / 64 column blocks
// (wgmma m64nNk16, d_qk / 16 k-steps): S = Q K^T (A = Q, B = K rows) or, transposed, S^T = K Q^T
// (A = the K tile, B = kN rows of Q). Zeroes D first; waits for the result.
template <int kN, typename T>
__device__ __forceinline__ void wgmma_k_major(float* d, uint64_t a, uint64_t b) {
  if constexpr (kN == 16) wgmma_m64n16k16_ss<T>(d, a, b);
  else if constexpr (kN == 32) wgmma_m64n32k16_ss<T>(d, a, b);
  else wgmma_m64n64k16_ss<T>(d, a, b);
}
// The wgmmas of D += A B^T over d_qk, both K-major (no fence, commit or wait: the callers').
// kBStride: the bytes from one 64-column block of B to the next (a compact Q of kN rows:
// kN * 128; JFM_FP8_BULK_STAGE_T32).
template <typename T, int kDqk, int kN, int kBStride = TileSmem<kDqk>::kBlockBytes>
__device__ __forceinline__ void tile_gemm_qk_mma(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b) {
  using S = TileSmem<kDqk>;
  static_assert(kN == 16 || kN == 32 || kN == 64, "wgmma N of a QK tile");
  static_assert(kBStride % 1024 == 0, "whole 128-byte swizzle atoms");
#pragma unroll
  for (int kk = 0; kk < kDqk / 16; ++kk) {
    const uint32_t koff = ((kk >> 2) * S::kBlockBytes + (kk & 3) * 32) >> 4;
    const uint32_t koff_b = ((kk >> 2) * kBStride + (kk & 3) * 32) >> 4;
    wgmma_k_major<kN, T>(d, desc_a + koff, desc_b + koff_b);
  }
}
template <typename T, int kDqk, int kN, int kBStride = TileSmem<kDqk>::kBlockBytes>
__device__ __forceinline__ void tile_gemm_qk(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b) {
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) d[i] = 0.f;
  wgmma_fence();
  tile_gemm_qk_mma<T, kDqk, kN, kBStride>(d, desc_a, desc_b);
  wgmma_commit();
  wgmma_wait<0>();
}

// S[:, 32 wc .. +32] = Q K^T over d_qk (m64n32). desc_k already points at this warpgroup's 32
// rows of the K tile.
template <typename T, int kDqk>
__device__ __forceinline__ void tile_qk(float (&s)[16], uint64_t desc_q, uint64_t desc_k) {
  tile_gemm_qk<T, kDqk, 32>(s, desc_q, desc_k);
}

// cp.async of 64 rows of kDqk T into the swizzled tile at dst, by threads tid = 0 .. kThreads - 1
// (8 per row, whole 128-byte lines: rows tid / 8 + kThreads / 8 h, chunks tid % 8 + 8 j). src_of(r)
// is row r's first element, or nullptr for a zero-filled row (never read; the copies then name
// `base` + 64 j, which must lie inside one row's worth of the same tensor). Committed by the
// caller's next cp_async_commit. kRows < 64: rows 0 .. kRows - 1 only (the rest left as they are);
// kStride: bytes per 64-column block (kRows * 128 for a compact tile). kBlocks < the tile's
// 64-column blocks: only the first kBlocks copied (a timing diagnostic, JFM_DIAG_FILL_BLOCKS).
template <typename T, int kDqk, int kThreads, int kRows = kBlockM,
          int kStride = TileSmem<kDqk>::kBlockBytes, int kBlocks = TileSmem<kDqk>::kKBlocks,
          typename SrcOf>
__device__ __forceinline__ void load_tile_rows(uint32_t dst, int tid, const T* base, SrcOf src_of) {
  using S = TileSmem<kDqk>;
  static_assert(kStride >= kRows * 128, "the rows fit a block");
  constexpr int kPassRows = kThreads / 8;
  static_assert(kPassRows % 8 == 0 && kBlockM % kPassRows == 0, "whole swizzle atoms per pass");
  static_assert(kRows % kPassRows == 0 && kRows <= kBlockM, "whole passes");
  const int lr = tid >> 3, lq = tid & 7;
  const uint32_t off = static_cast<uint32_t>(lr * 128 + ((lq ^ (lr & 7)) << 4));
#pragma unroll
  for (int h = 0; h < kRows / kPassRows; ++h) {
    const T* row = src_of(lr + kPassRows * h);
    const bool ok = row != nullptr;
    const T* src = ok ? row + lq * 8 : base;  // (base + 64 j: never read, src-size 0)
#pragma unroll
    for (int j = 0; j < (kBlocks < S::kKBlocks ? kBlocks : S::kKBlocks); ++j)
      cp_async_16(dst + j * kStride + h * kPassRows * 128 + off, src + 64 * j, ok ? 16 : 0);
  }
}

// Online-softmax state of this thread's two rows and its O accumulator slice.
struct RowState {
  float m[2], l[2];
  float o[128];
  __device__ __forceinline__ void init() {
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
  }
};

// This thread's two rows' maxima over its accumulator elements s (element i: row half
// (i >> 1) & 1), reduced over the quad, whose lanes hold the rest of the rows' columns.
template <int kRegs>
__device__ __forceinline__ void quad_row_max(const float (&s)[kRegs], float (&mx)[2]) {
  mx[0] = mx[1] = -INFINITY;
#pragma unroll
  for (int i = 0; i < kRegs; ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
  }
}

// One row's (or, transposed, one column's) online-softmax step: the new running max from this
// tile's max, the correction of the earlier sum / O, and the scaled max to subtract from the
// logits (0 while nothing has been attended, so exp2 of -inf logits stays 0, never NaN).
__device__ __forceinline__ void online_max(float& m, float& l, float tile_max, float sl2,
                                           float& corr, float& mscaled) {
  const float m_new = fmaxf(m, tile_max);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;
  corr = exp2f((m - m_use) * sl2);
  mscaled = m_use * sl2;
  m = m_new;
  l *= corr;
}

// Stores P at rows r0 and r0 + 8, columns col and col + 1 (col even), of the swizzled 64 x 64 P
// block at sp: pv = {(r0, col), (r0, col + 1), (r0 + 8, col), (r0 + 8, col + 1)}.
template <typename T>
__device__ __forceinline__ void store_p_pairs(uint32_t sp, int r0, int col, const float (&pv)[4]) {
  const uint32_t a0 = sp + r0 * 128 + ((((col >> 3) ^ (r0 & 7))) << 4) + (col & 7) * 2;
  const uint32_t a1 = sp + (r0 + 8) * 128 + ((((col >> 3) ^ ((r0 + 8) & 7))) << 4) + (col & 7) * 2;
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a0), "r"(pack2<T>(pv[0], pv[1])));
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a1), "r"(pack2<T>(pv[2], pv[3])));
}

// O's rows times the softmax correction of this tile (skipped when no row's max moved).
__device__ __forceinline__ void rescale_o(float (&o)[128], const float (&corr)[2]) {
  if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      o[4 * i + 0] *= corr[0];
      o[4 * i + 1] *= corr[0];
      o[4 * i + 2] *= corr[1];
      o[4 * i + 3] *= corr[1];
    }
  }
}

// Given masked logits s (-inf where a token is not attended), update the running max and sum,
// write P = exp2(s * sl2 - m) (as T) into the swizzled P block at `sp`, and rescale O.
// `red` is float[2][64] of shared memory. Contains one Sync::sync() (the max exchange); the
// caller fences and synchronizes before the PV wgmma reads P.
template <typename T, typename Sync = CtaSync>
__device__ __forceinline__ void tile_softmax(float (&s)[16], RowState& st, float* red, uint32_t sp,
                                             float sl2, const Lane& ln) {
  float mx[2];
  quad_row_max(s, mx);
  if (ln.tq == 0) {
    red[ln.wc * kBlockM + ln.row(0)] = mx[0];
    red[ln.wc * kBlockM + ln.row(1)] = mx[1];
  }
  Sync::sync();
  float corr[2], mscaled[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float other = red[(ln.wc ^ 1) * kBlockM + ln.row(h)];
    online_max(st.m[h], st.l[h], fmaxf(mx[h], other), sl2, corr[h], mscaled[h]);
  }
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    float pv[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      pv[e] = exp2f(s[nt * 4 + e] * sl2 - mscaled[e >> 1]);
      st.l[e >> 1] += pv[e];
    }
    store_p_pairs<T>(sp, ln.row(0), ln.col(nt, 0), pv);
  }
  rescale_o(st.o, corr);
}

// The wgmmas of O[:, 256 wc .. +256] += P V over the tile's 64 tokens (4 k-steps of 16);
// tile_pv_issue fences and commits them but does not wait: the caller overlaps independent work,
// then calls wgmma_wait<0>().
// [kK0, kK1): the k-steps (tokens 16 kk ..) issued, all four by default (JFM_WS_SPLIT_P issues
// them in two halves as P's halves are ready).
template <typename T, int kK0 = 0, int kK1 = kTileTokens / 16>
__device__ __forceinline__ void tile_pv_mma(RowState& st, uint64_t desc_p, uint64_t desc_v) {
#pragma unroll
  for (int kk = kK0; kk < kK1; ++kk)
    wgmma_m64n256k16_ss_tb<T>(st.o, desc_p + ((kk * 32) >> 4), desc_v + ((kk * 16 * 128) >> 4));
}
template <typename T, int kK0 = 0, int kK1 = kTileTokens / 16>
__device__ __forceinline__ void tile_pv_issue(RowState& st, uint64_t desc_p, uint64_t desc_v) {
  wgmma_fence();
  tile_pv_mma<T, kK0, kK1>(st, desc_p, desc_v);
  wgmma_commit();
}
// tile_pv_issue with P from this thread's registers: p is the softmax's output in S's m64n64
// accumulator layout, whose pairs (8 kk + 2 r, + 1) are register r of k-step kk's m64k16 A
// fragment (rows g / g + 8, tokens 16 kk + 2 tq (+ 8)). The warpgroup that computed P then needs
// no shared-memory round trip (stores, proxy fence, warpgroup barrier) before its own P V.
// [kK0, kK1): the k-steps issued (tile_pv_mma's).
template <typename T, int kK0 = 0, int kK1 = kTileTokens / 16>
__device__ __forceinline__ void tile_pv_issue_rs(RowState& st, const float (&p)[32], uint64_t desc_v) {
  uint32_t a[kTileTokens / 16][4];
#pragma unroll
  for (int kk = kK0; kk < kK1; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) a[kk][r] = pack2<T>(p[8 * kk + 2 * r], p[8 * kk + 2 * r + 1]);
  wgmma_fence();
#pragma unroll
  for (int kk = kK0; kk < kK1; ++kk)
    wgmma_m64n256k16_rs_tb<T>(st.o, a[kk], desc_v + ((kk * 16 * 128) >> 4));
  wgmma_commit();
}

// Row totals after the last tile: the sum over both warpgroups' columns. Returns per row the
// normalizer 1 / l (0 for a row with nothing attended) and the lse (natural log; a row with
// nothing attended gets `empty_lse`). Contains two Sync::sync().
template <typename Sync = CtaSync>
__device__ __forceinline__ void tile_finish(RowState& st, float* red, float softmax_scale,
                                            float empty_lse, float (&inv)[2], float (&lse)[2],
                                            const Lane& ln) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    st.l[h] += __shfl_xor_sync(0xffffffffu, st.l[h], 1);
    st.l[h] += __shfl_xor_sync(0xffffffffu, st.l[h], 2);
  }
  Sync::sync();
  if (ln.tq == 0) {
    red[ln.wc * kBlockM + ln.row(0)] = st.l[0];
    red[ln.wc * kBlockM + ln.row(1)] = st.l[1];
  }
  Sync::sync();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float l = red[ln.row(h)] + red[kBlockM + ln.row(h)];
    const bool empty = !(l > 0.f);
    inv[h] = empty ? 0.f : 1.f / l;
    lse[h] = empty ? empty_lse : logf(l) + st.m[h] * softmax_scale;
  }
}

// ---- Split by role (kernel_ws.cuh, "roles" math): warpgroup 0 computes the whole S tile and its
// softmax, writes P and the per-row correction to shared memory and does O[:, 0..256); warpgroup 1
// rescales and accumulates O[:, 256..512) from them. Rows and columns as above with wc = 0:
// warpgroup 0 owns whole rows, so no max exchange between warpgroups.

// S[:, 0..64) = Q K^T (m64n64); desc_k points at the K tile's row 0.
template <typename T, int kDqk>
__device__ __forceinline__ void tile_qk_rows(float (&s)[32], uint64_t desc_q, uint64_t desc_k) {
  tile_gemm_qk<T, kDqk, 64>(s, desc_q, desc_k);
}

// JFM_P_STMATRIX (off; =1 a candidate, not yet timed): store_p_rows writes P with stmatrix.x4,
// 4 per thread for the whole tile, instead of 16 4-byte st.shared. Why (2026-12-07 tenth session,
// SASS only): V4 kRolesWide's scores warpgroup spends 316 cycles per tile on its P stores against
// 136-173 in the CTA pairs (tile traces, seventh session), and upstream's V4 h_q 64 kernel writes
// the same P in 4 STSM per thread (`sass_scoreboards.py --role-loops`). Same bytes at the same
// addresses, so the results are bitwise those of the 4-byte form.
#ifndef JFM_P_STMATRIX
#define JFM_P_STMATRIX 0
#endif

// Writes warpgroup 0's P (all 64 columns; [8 kNt0, 8 kNt1) with a range) into the swizzled P
// block at sp (one column block of the tiles' swizzled layout: TileSmem::chunk_off).
template <typename T, int kNt0 = 0, int kNt1 = 8>
__device__ __forceinline__ void store_p_rows(uint32_t sp, const float (&s)[32], const Lane& ln) {
  if constexpr (JFM_P_STMATRIX != 0) {
    static_assert(kNt0 % 2 == 0 && kNt1 % 2 == 0, "stmatrix.x4 writes two 8-column groups");
    // Matrix j of each stmatrix: rows 0-7 (j even) or 8-15 (j odd) of this warp's 16, column
    // group nt (j < 2) or nt + 1; lane l gives row l % 8 of matrix l / 8 (stage_out_rows' order).
    const int lane = ln.tid & 31, j = lane >> 3;
    const int r = ln.wr * 16 + (lane & 7) + 8 * (j & 1);
#pragma unroll
    for (int nt = kNt0; nt < kNt1; nt += 2) {
      const int c = nt + (j >> 1);
      stmatrix_x4(sp + TileSmem<kDv>::chunk_off(r, c), pack2<T>(s[4 * nt], s[4 * nt + 1]),
                  pack2<T>(s[4 * nt + 2], s[4 * nt + 3]), pack2<T>(s[4 * nt + 4], s[4 * nt + 5]),
                  pack2<T>(s[4 * nt + 6], s[4 * nt + 7]));
    }
  } else {
#pragma unroll
    for (int nt = kNt0; nt < kNt1; ++nt) {
      const float pv[4] = {s[4 * nt], s[4 * nt + 1], s[4 * nt + 2], s[4 * nt + 3]};
      store_p_pairs<T>(sp, ln.row(0), nt * 8 + 2 * ln.tq, pv);
    }
  }
}

// JFM_WS_T_LAZY_MAX (default 1 since the ninth 2026-12-01 session, docs/PERFORMANCE.md): the
// transposed softmax keeps the running max m while no logit of the tile exceeds it by more than
// kLazySlack / sl2 (P stays <= 2^8: exact enough in fp32 sums and bf16 P), so most tiles skip the
// column-max exchange (12 shuffles, the `red` stores and loads, a 128-thread barrier) and O^T's
// rescale. Whether any thread needs the exchange is one barrier.red.or (`bar_or`) per tile. Any m
// gives the same softmax (lse = log l + m * scale); the true column maximum, which max_logits
// reports, is kept per thread (TMaxLogit) and reduced once after the last tile (t_finish_max).
// Why: ncu of the 16-row kernel (eighth session): its math warpgroup bounds the tile and spent
// ~28% of its time in this softmax. Measured: V3.2 h16 b64 57.0 -> 55.2 us, prefill h16 367.8 ->
// 351.8 us, V4 h16 24.7 -> 24.6 (so the shuffles' own latency was not the main limit).
#ifndef JFM_WS_T_LAZY_MAX
#define JFM_WS_T_LAZY_MAX 2
#endif
// =2 (default since the sixth 2026-12-04 session; =1 gives the 16-row kernels only: at 32 rows
// the per-thread maxima beside O^T's 128 registers first spilled 96 bytes): at 32 rows too, with
// 16 more registers for kTransposed32's math warpgroup (ws_reg_split; its producers then spill
// 8 bytes in V3.2, once per sequence). The 32-row kernels' tile traces (2026-12-04 fifth
// session) have the column-max exchange at ~990 cycles and the fence + barrier after the P^T
// stores at ~1500 (median) of a ~5900-cycle tile, the math warpgroup being the limit there.
// Measured (H200, kernel medians of 30, each build in its own process;
// docs/perf_logs/t_lazy_max2_abflags_h200_2026-12-04e.txt): prefill d576 h32 1876.8 -> 1707.2 us
// (-9.0%), V4 h32 topk 1152 s_q 2 -3.1%, V3.2 h32 -1.0 / -1.4%, dense h32 -0.4%, V4 h32 topk 512
// flat. Smoke, memcheck, racecheck and all GPU kernel tests passed on it (fifth and sixth
// 2026-12-04 sessions).
constexpr bool t_lazy_max(int n) {
  return (JFM_WS_T_LAZY_MAX != 0 && n == 16) || (JFM_WS_T_LAZY_MAX == 2 && n == 32);
}
constexpr float kLazySlack = 8.f;

// JFM_WS_ROWS_LAZY_MAX (on by default): the role split's row softmax keeps each row's running
// max while no logit of the tile exceeds it by more than kLazySlack / sl2, as the 16-row kernels'
// lazy max does (JFM_WS_T_LAZY_MAX). That row's correction is then 1, and where no row of a warp
// moved rescale_o skips O's 128 multiplies, in both math warpgroups: the scores warpgroup's are
// on the chain that bounds the 64-row kernels (ncu, dense h128). No exchange is needed (a
// warpgroup owns whole rows), so the saving is those multiplies and their wait on the previous
// P V's registers. lse takes the running max (any m gives the same softmax), max_logits the true
// one (`mt`, kept beside it). =0 gives the slack 0: the max moves with every larger logit (the
// exact online max). Measured (H200, 2026-12-02): dense h128 b128 -2.6%, MTP -2.7%, prefill
// d512 h64 -3.9%, V3.2 h128 (kRolesWide) -2.7%, V4 h64 -1%.
#ifndef JFM_WS_ROWS_LAZY_MAX
#define JFM_WS_ROWS_LAZY_MAX 1
#endif
constexpr float kRowsSlack = JFM_WS_ROWS_LAZY_MAX != 0 ? kLazySlack : 0.f;

// MUFU is not what bounds this softmax: moving 12 of a thread's 32 exponentials per tile to a
// degree-5 polynomial on the FP32 pipe (JFM_SOFTMAX_POLY_EXP=3, 2026-12-05 tenth session; the
// dense object's MUFU.EX2 104 -> 80) measured flat on the H100 (dense h128 b64-256 fixed, b128
// s_k 8K, s_q 2 / 4 causal within +-1.5%, prefill d512 / d576 +1.0 / +3.4%) and is gone.
// Online softmax over whole rows of the masked logits s (-inf: not attended): updates m (lazily,
// kRowsSlack) and l (l: this thread's partial sum of its 16 columns per row), turns s into
// P = exp2(s sl2 - m sl2) and returns the correction of the earlier O in corr; mt: this thread's
// rows' largest attended logits so far. No shared memory, no barrier.
// In two steps (JFM_WS_SPLIT_P runs the second in halves): tile_softmax_rows_max updates m, l's
// correction and mt and returns the scaled max the exponentials subtract; tile_softmax_rows_exp
// turns s[i], i in [kI0, kI1), into P and adds it to l (in i order, as the whole form does).
__device__ __forceinline__ void tile_softmax_rows_max(const float (&s)[32], RowState& st,
                                                      float (&corr)[2], float (&mt)[2], float sl2,
                                                      float (&mscaled)[2]) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < 32; ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    mt[h] = fmaxf(mt[h], mx[h]);
    // m = -inf: any attended logit moves it; -inf - -inf is NaN, which compares false.
    if ((mx[h] - st.m[h]) * sl2 > kRowsSlack) {
      online_max(st.m[h], st.l[h], mx[h], sl2, corr[h], mscaled[h]);
    } else {
      corr[h] = 1.f;
      mscaled[h] = st.m[h] == -INFINITY ? 0.f : st.m[h] * sl2;
    }
  }
}
template <int kI0 = 0, int kI1 = 32>
__device__ __forceinline__ void tile_softmax_rows_exp(float (&s)[32], RowState& st,
                                                      const float (&mscaled)[2], float sl2) {
#pragma unroll
  for (int i = kI0; i < kI1; ++i) {
    s[i] = exp2f(s[i] * sl2 - mscaled[(i >> 1) & 1]);
    st.l[(i >> 1) & 1] += s[i];
  }
}
__device__ __forceinline__ void tile_softmax_rows(float (&s)[32], RowState& st, float (&corr)[2],
                                                  float (&mt)[2], float sl2) {
  float mscaled[2];
  tile_softmax_rows_max(s, st, corr, mt, sl2, mscaled);
  tile_softmax_rows_exp(s, st, mscaled, sl2);
}

// ---- Transposed (kernel_ws.cuh, kTransposed* math, few query rows): one warpgroup computes
// S^T = K Q^T (M = the tile's 64 tokens, N = kN query rows, kN = 16 or 32) and O^T += V^T P^T
// (M = 64 of the 512 value columns per chunk, 8 chunks; V^T is the K tile read as an MN-major A
// operand). No padded rows: the math of a tile costs kN / 64 of the 64-row tile's.
// Accumulator element e of n-tile nt: row (token or value column) 16 wr + g + 8 (e >> 1), column
// (query row) 8 nt + 2 tq + (e & 1). This thread's query rows are j = 2 nt + (e & 1) of
// kN / 4: 8 (j >> 1) + 2 tq + (j & 1).
template <int kN>
struct TState {
  static constexpr int kCols = kN / 4;   // query rows per thread
  float m[kCols], l[kCols];              // running max (raw logits) and partial sums
  float o[8][kN / 2];                    // O^T, chunk c: value columns 64 c ..
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      m[j] = -INFINITY;
      l[j] = 0.f;
    }
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) o[c][i] = 0.f;
  }
  static __device__ __forceinline__ int col(int j, const Lane& ln) { return 8 * (j >> 1) + 2 * ln.tq + (j & 1); }
};

template <typename T, int kN>
__device__ __forceinline__ void wgmma_t_pv(float* d, uint64_t a, uint64_t b) {
  if constexpr (kN == 16) wgmma_m64n16k16_ss_ta<T>(d, a, b);
  else wgmma_m64n32k16_ss_ta<T>(d, a, b);
}

// S^T over d_qk: desc_k = the K tile (A, K-major, 64 token rows), desc_q = the Q tile (B, K-major,
// kN query rows).
// kQStride: the Q tile's bytes per 64-column block (tile_gemm_qk_mma's kBStride).
template <typename T, int kDqk, int kN, int kQStride = TileSmem<kDqk>::kBlockBytes>
__device__ __forceinline__ void tile_qk_t(float (&s)[kN / 2], uint64_t desc_k, uint64_t desc_q) {
  static_assert(kN == 16 || kN == 32, "wgmma N of the transposed tile");
  tile_gemm_qk<T, kDqk, kN, kQStride>(s, desc_k, desc_q);
}

// Online softmax down the columns of the masked S^T (-inf: token not attended), for one warpgroup:
// column maxima across the 64 tokens (lanes of a warp by shuffles, the 4 warps through `red`,
// float[4][kN], and named barrier `bar` of 128 threads), then P^T = exp2(s sl2 - m sl2) written
// into the swizzled P block at sp (row = query row, 64 token columns) and the correction of the
// earlier O^T in corr. The caller fences and synchronizes the warpgroup before the PV wgmma.
// In two steps, t_online_max and t_store_p, which the lazy variant below reuses (and the tile
// trace's build of ws_math_t, which stamps between them).
template <int kN>
__device__ __forceinline__ void t_online_max(const float (&s)[kN / 2], TState<kN>& st,
                                             float (&corr)[kN / 4], float (&mscaled)[kN / 4],
                                             float* red, float sl2, int bar, const Lane& ln) {
  constexpr int kCols = kN / 4;
  float mx[kCols];
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int nt = j >> 1, c = j & 1;
    mx[j] = fmaxf(s[4 * nt + c], s[4 * nt + 2 + c]);
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], x));
    if (ln.g == 0) red[ln.wr * kN + TState<kN>::col(j, ln)] = mx[j];
  }
  named_barrier_sync(bar, 128);
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int col = TState<kN>::col(j, ln);
    const float tile_max = fmaxf(fmaxf(red[col], red[kN + col]), fmaxf(red[2 * kN + col], red[3 * kN + col]));
    online_max(st.m[j], st.l[j], tile_max, sl2, corr[j], mscaled[j]);
  }
}
template <typename T, int kN>
__device__ __forceinline__ void t_store_p(const float (&s)[kN / 2], TState<kN>& st,
                                          const float (&mscaled)[kN / 4], uint32_t sp, float sl2,
                                          const Lane& ln) {
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = 2 * nt + (e & 1);
      const float pv = exp2f(s[4 * nt + e] * sl2 - mscaled[j]);
      st.l[j] += pv;
      const int row = TState<kN>::col(j, ln);               // query row of P^T
      const int tok = ln.wr * 16 + ln.g + 8 * (e >> 1);      // token column
      const uint32_t a = sp + row * 128 + (((tok >> 3) ^ (row & 7)) << 4) + (tok & 7) * 2;
      const T v = static_cast<T>(pv);
      asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(a), "h"(*reinterpret_cast<const unsigned short*>(&v)));
    }
  }
}
template <typename T, int kN>
__device__ __forceinline__ void tile_softmax_t(float (&s)[kN / 2], TState<kN>& st,
                                               float (&corr)[kN / 4], float* red, uint32_t sp,
                                               float sl2, int bar, const Lane& ln) {
  float mscaled[kN / 4];
  t_online_max<kN>(s, st, corr, mscaled, red, sl2, bar, ln);
  t_store_p<T, kN>(s, st, mscaled, sp, sl2, ln);
}

// Under the lazy max: this thread's max attended logit per column (max_logits). Its own struct,
// not a TState member: even unused, a member changed the default kernels' register allocation.
template <int kN>
struct TMaxLogit {
  float mt[kN / 4];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int j = 0; j < kN / 4; ++j) mt[j] = -INFINITY;
  }
};
struct TNoMaxLogit {
  __device__ __forceinline__ void init() {}
};
template <int kN>
using TMaxOf = std::conditional_t<t_lazy_max(kN), TMaxLogit<kN>, TNoMaxLogit>;
// Column j's max logit after the last tile: the running max, or under the lazy max the reduced mt.
template <int kN>
__device__ __forceinline__ float max_logit(const TState<kN>& st, const TNoMaxLogit&, int j) {
  return st.m[j];
}
template <int kN>
__device__ __forceinline__ float max_logit(const TState<kN>&, const TMaxLogit<kN>& t, int j) {
  return t.mt[j];
}

// Returns whether the running max moved (then O^T needs rescaling by corr; else corr is all 1).
template <typename T, int kN>
__device__ __forceinline__ bool tile_softmax_t_lazy(float (&s)[kN / 2], TState<kN>& st,
                                                    TMaxLogit<kN>& tm, float (&corr)[kN / 4],
                                                    float* red, uint32_t sp, float sl2, int bar,
                                                    int bar_or, const Lane& ln) {
  constexpr int kCols = kN / 4;
  bool grow = false;
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int nt = j >> 1, c = j & 1;
    const float mx = fmaxf(s[4 * nt + c], s[4 * nt + 2 + c]);
    tm.mt[j] = fmaxf(tm.mt[j], mx);
    // m = -inf: any attended logit grows it; -inf - -inf is NaN, which compares false.
    grow |= (mx - st.m[j]) * sl2 > kLazySlack;
  }
  float mscaled[kCols];
  const bool moved = named_barrier_or(bar_or, 128, grow);
  if (moved) {
    t_online_max<kN>(s, st, corr, mscaled, red, sl2, bar, ln);
  } else {
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      corr[j] = 1.f;
      mscaled[j] = st.m[j] == -INFINITY ? 0.f : st.m[j] * sl2;
    }
  }
  t_store_p<T, kN>(s, st, mscaled, sp, sl2, ln);
  return moved;
}

// The column maxima of every logit attended (TMaxLogit's, per thread) over the warpgroup (lanes by
// shuffles, warps through `red`, barrier `bar`: two waits), in place. For max_logits under the
// lazy max. The same exchange as t_online_max's, written out: every way of sharing one helper
// tried (four, the last two in the ninth session) changed the 32-row kernels' SASS, which the
// lazy max does not use.
template <int kN>
__device__ __forceinline__ void t_finish_max(float (&mt)[kN / 4], float* red, int bar, const Lane& ln) {
  constexpr int kCols = kN / 4;
  named_barrier_sync(bar, 128);  // earlier readers of `red` are done
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    float v = mt[j];
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, x));
    if (ln.g == 0) red[ln.wr * kN + TState<kN>::col(j, ln)] = v;
  }
  named_barrier_sync(bar, 128);
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int col = TState<kN>::col(j, ln);
    mt[j] = fmaxf(fmaxf(red[col], red[kN + col]), fmaxf(red[2 * kN + col], red[3 * kN + col]));
  }
}

// O^T's columns times this tile's corrections.
template <int kN>
__device__ __forceinline__ void rescale_o_t(TState<kN>& st, const float (&corr)[kN / 4]) {
#pragma unroll
  for (int c = 0; c < 8; ++c)
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) st.o[c][i] *= corr[2 * (i >> 2) + (i & 1)];
}

// O^T += V^T P^T over the tile's 64 tokens: 8 chunks of 64 value columns (A = the K tile's column
// block c, MN-major) x 4 k-steps of 16 tokens (B = P^T, K-major). Committed and waited for.
template <typename T, int kN>
__device__ __forceinline__ void tile_pv_t(TState<kN>& st, uint64_t desc_ktile, uint64_t desc_p) {
  wgmma_fence();
#pragma unroll
  for (int c = 0; c < 8; ++c)
#pragma unroll
    for (int kk = 0; kk < kTileTokens / 16; ++kk)
      wgmma_t_pv<T, kN>(st.o[c], desc_ktile + ((c * kBlockM * 128 + kk * 16 * 128) >> 4),
                        desc_p + ((kk * 32) >> 4));
  wgmma_commit();
  wgmma_wait<0>();
}

// Column totals after the last tile: every query row's sum over the 64 token rows (lanes by
// shuffles, warps through `red` and barrier `bar`), then per column of this thread 1 / l (0 for
// nothing attended) and the lse (`empty_lse` then). Two barrier waits.
template <int kN>
__device__ __forceinline__ void tile_finish_t(TState<kN>& st, float* red, float softmax_scale,
                                              float empty_lse, float (&inv)[kN / 4],
                                              float (&lse)[kN / 4], int bar, const Lane& ln) {
  constexpr int kCols = kN / 4;
  named_barrier_sync(bar, 128);  // the last tile's readers of `red` are done
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) st.l[j] += __shfl_xor_sync(0xffffffffu, st.l[j], x);
    if (ln.g == 0) red[ln.wr * kN + TState<kN>::col(j, ln)] = st.l[j];
  }
  named_barrier_sync(bar, 128);
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int col = TState<kN>::col(j, ln);
    const float l = red[col] + red[kN + col] + red[2 * kN + col] + red[3 * kN + col];
    const bool empty = !(l > 0.f);
    inv[j] = empty ? 0.f : 1.f / l;
    lse[j] = empty ? empty_lse : logf(l) + st.m[j] * softmax_scale;
  }
}

// JFM_WIDE_OUT_STORES (on; =0 for A/B): the bf16 sparse kernels' role split (prefill, bf16 sparse
// decode; store_token_rows' kWide) and the dense kernels (store_dense_rows) write their output rows
// in 16-byte stores. A thread holds two columns of each 8-column group (2 tq, + 1); the quad
// transposes four groups at a time (3 shuffles), so that lane tq stores group 4 j + tq whole: 16
// stores per thread and token instead of 64 4-byte ones. Why: ncu of sparse prefill d512 h64
// (2026-12-02, sixth session) put 15% of both math warpgroups' samples on those stores, stalled on
// lg_throttle (the global store queue). Measured (H200, same call, each build in its own process;
// profiler kernel medians): prefill d512 h64 s_q 4096 topk 512 616.6 -> 541.2 us (-12.2%), d512
// h128 topk 1024 2134.4 -> 1961.8 (-8.1%), d576 h128 topk 2048 4503.9 -> 4392.0 (-2.5%). Dense
// decode (2026-12-05, tenth session; it was JFM_DENSE_WIDE_OUT): the tile probe (H200, h128) put a
// sequence's final rows at 7.8-8.7K cycles from row totals to stores issued, on both math
// warpgroups' path at every sequence boundary; measured (H100, same call, each build in its own
// process, profiler medians of 30) h128 b64 s_k 4K fixed 132.5 -> 126.1 us (-4.9%), b128 s_k 2K
// fixed 141.9 -> 132.2 (-6.9%), b256 s_k 1K fixed 163.8 -> 147.6 (-9.9%), b128 s_k 8K and h64 b128
// s_k 4K flat (+-0.4%); same registers, no new spill; 183 dense + malformed GPU tests, memcheck and
// racecheck clean. Not in the FP8 kernels (their kRolesWide math warpgroups spilled 48-80 bytes
// with it); the split-KV partials (float) keep their 8-byte stores (a 16-byte form measured -0.3 to
// -0.8%, the noise level, and spilled with JFM_DENSE_EARLY_Q). An 8-byte form (a lane-pair swap)
// spilled 16 bytes and was not measured.
#ifndef JFM_WIDE_OUT_STORES
#define JFM_WIDE_OUT_STORES 1
#endif
constexpr bool kWideOutStores = JFM_WIDE_OUT_STORES != 0;
// v[i] for a runtime i in [0, 4) without local memory.
__device__ __forceinline__ uint32_t pick4(const uint32_t (&v)[4], int i) {
  return (i & 2) ? ((i & 1) ? v[3] : v[2]) : ((i & 1) ? v[1] : v[0]);
}
// The quad's lanes (they share a row; callers skip padded rows per quad, so a full-warp mask
// could name lanes that never reach the shuffle).
__device__ __forceinline__ unsigned quad_mask() { return 0xfu << (threadIdx.x & 28); }

// Store this thread's slice of row h of O (times `scale`) as T (final output, 256 wc + 2 tq +
// 8 i) or float (split-KV partials). dst: this thread's first column (2 tq).
// kProbeShared (a timing probe's, JFM_FP8_PROBE bit 3): kWide's stores go to shared memory (the
// first 64 KB of the CTA's tiles, garbage there) instead of dst: the conversions without the
// global stores.
template <typename T, bool kWide = false, bool kProbeShared = false>
__device__ __forceinline__ void store_out_row(T* dst, const RowState& st, int h, float scale) {
  if constexpr (kWide) {
    // Groups 4 j .. 4 j + 3: lane tq takes group 4 j + tq (w[c] = lane c's v[tq]; r[d] comes
    // from lane tq ^ d and is w[tq ^ d]).
    const int tq = threadIdx.x & 3;
    T* base = dst - 2 * tq + 8 * tq;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      uint32_t v[4], r[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        v[u] = pack2<T>(st.o[4 * (4 * j + u) + 2 * h] * scale, st.o[4 * (4 * j + u) + 2 * h + 1] * scale);
      r[0] = pick4(v, tq);
#pragma unroll
      for (int d = 1; d < 4; ++d) r[d] = __shfl_xor_sync(quad_mask(), pick4(v, tq ^ d), d);
      const uint4 out = make_uint4(pick4(r, tq), pick4(r, 1 ^ tq), pick4(r, 2 ^ tq), pick4(r, 3 ^ tq));
      if constexpr (kProbeShared) {
        extern __shared__ unsigned char probe_smem[];
        const uint32_t a = ((static_cast<uint32_t>(__cvta_generic_to_shared(probe_smem)) + 1023u) & ~1023u) +
                           (static_cast<uint32_t>(reinterpret_cast<uintptr_t>(base + 32 * j)) & 0xfff0u);
        asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(out.x), "r"(out.y),
                     "r"(out.z), "r"(out.w));
      } else {
        *reinterpret_cast<uint4*>(base + 32 * j) = out;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 32; ++i)
      *reinterpret_cast<uint32_t*>(dst + i * 8) =
          pack2<T>(st.o[4 * i + 2 * h] * scale, st.o[4 * i + 2 * h + 1] * scale);
  }
}
// This thread's two rows of the warpgroup's O half (times scale[h]) as T into shared memory at
// dst: 64 rows x 256 columns as four 64-column blocks of the tiles' swizzled layout (chunk_off),
// the boxes of a 128-byte-swizzle TMA store. 16 stmatrix.x4, each two 8-column groups of both
// rows (matrices: rows 0-7 / 8-15 of the warp's 16, group i / i + 1).
// kFreshLane: with a Lane built from %tid.x read here (volatile, so ptxas cannot hoist its terms
// out of the caller's loops and hold them, spilled, across every tile), not the caller's ln.
template <typename T, bool kFreshLane = false>
__device__ __forceinline__ void stage_out_rows(uint32_t dst, const RowState& st, const float (&scale)[2],
                                               const Lane& ln) {
  if constexpr (kFreshLane) {
    uint32_t t;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
    stage_out_rows<T>(dst, st, scale, Lane(static_cast<int>(t)));
    return;
  }
  const int lane = ln.tid & 31, j = lane >> 3;
  const int r = ln.wr * 16 + (lane & 7) + 8 * (j & 1);  // the row whose address this lane gives
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const int gi = i + (j >> 1);  // its 8-column group: the half's 16-byte chunk gi of row r
    const uint32_t addr = dst + TileSmem<kDv>::chunk_off(r, gi);
    stmatrix_x4(addr, pack2<T>(st.o[4 * i] * scale[0], st.o[4 * i + 1] * scale[0]),
                pack2<T>(st.o[4 * i + 2] * scale[1], st.o[4 * i + 3] * scale[1]),
                pack2<T>(st.o[4 * i + 4] * scale[0], st.o[4 * i + 5] * scale[0]),
                pack2<T>(st.o[4 * i + 6] * scale[1], st.o[4 * i + 7] * scale[1]));
  }
}
__device__ __forceinline__ void store_partial_row(float* dst, const RowState& st, int h, float scale) {
#pragma unroll
  for (int i = 0; i < 32; ++i)
    *reinterpret_cast<float2*>(dst + i * 8) =
        make_float2(st.o[4 * i + 2 * h] * scale, st.o[4 * i + 2 * h + 1] * scale);
}

}  // namespace sm90
}  // namespace jfm
