// Dense paged MLA decode, warp-specialized (sm90a): the work of kernel.cuh (one CTA per (sm part,
// 64 query rows, KV head), walking its part of the split-KV schedule page by page) on
// ws_pipeline.cuh, with the page copies moved off the math warps.
//
// The producer warpgroup reads each page's id one tile ahead and copies the page's 64 rows of this
// KV head (the role split's whole pages by TMA: JFM_DENSE_TMA, params.h; the rest by cp.async)
// straight into the swizzled tile (rows past the sequence's length and pages
// whose id is outside the pool zero-filled, never read), writes a validity byte per token and
// arrives on the full barrier twice per thread: after the bytes, and when its copies land.
// Masks: a token is attended when its validity byte is set and (causal) its position is inside the
// row's window.
#pragma once

#include <cmath>

#include "kernels/params.h"
#include "kernels/sm90/decode/dense/common.cuh"
#include "kernels/sm90/decode/ws_pipeline.cuh"

namespace jfm {
namespace sm90 {

template <typename T_>
struct DenseWsTask {
  using T = T_;
  static constexpr int kDqk = kDenseDqk;
  static constexpr bool kFenceAfterFull = true;
  static constexpr bool kCpAsyncTiles = true;
  static constexpr bool kShortSeqs = false;  // a sequence is a whole context
  static constexpr bool kRolesRegP = false;  // (JFM_WS_SCORES_REG_P=4: unpaired, P from shared memory)
  static constexpr uint32_t kFullCount = 256;
  static_assert(kPageBlock == kTileTokens, "one page is one tile");

  const DenseDecodeParams& p;
  ScheduleRow sched;
  int begin_seq, end_seq;
  int hk, hpk, rows_total, row0;
  float softmax_scale;

  __device__ __forceinline__ explicit DenseWsTask(const DenseDecodeParams& params)
      : p(params), sched(params.tile_scheduler_metadata + blockIdx.x * kMetaInts) {
    begin_seq = sched.begin_seq;
    end_seq = sched.end_seq;
    hk = blockIdx.z;
    hpk = p.h_q / p.h_kv;
    rows_total = p.s_q * hpk;
    row0 = blockIdx.y * kBlockM;
    softmax_scale = p.softmax_scale;
  }

  // One batch element: its pages of this CTA, its clamped length and, for this thread's two
  // accumulator rows (math warps), the end of each row's window.
  struct Seq {
    int index, first, t_hi, len, slot, nsplit;
    const int32_t* table;
    int rowlen[2];
    __device__ __forceinline__ int next(int n) const { return n; }  // every page is a tile
  };
  __device__ __forceinline__ Seq seq(int s) const {
    Seq q;
    q.index = s;
    q.len = min(max(p.cache_seqlens[s], 0), p.max_blocks * kPageBlock);
    const int nb = (q.len + kPageBlock - 1) / kPageBlock;
    q.first = s == begin_seq ? sched.begin_tile : 0;
    q.t_hi = s == end_seq ? min(sched.end_tile, nb) : nb;
    const int split_base = p.num_splits[s];
    q.nsplit = p.num_splits[s + 1] - split_base;
    q.slot = split_base + (s == begin_seq ? sched.begin_split : 0);
    q.table = p.block_table + static_cast<size_t>(s) * p.max_blocks;
    const Lane ln;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int sq_row = (row0 + ln.row(h)) / hpk;
      q.rowlen[h] = p.causal ? q.len - p.s_q + sq_row + 1 : q.len;
    }
    return q;
  }
  template <int kThreads>
  __device__ __forceinline__ void load_q(const Seq& q, uint32_t sq) const {
    load_dense_q_tile<T, kThreads>(p, q.index, row0, hk, hpk, rows_total, sq);
  }
  __device__ __forceinline__ bool masked(const Seq& q, int n, const uint8_t* valid, int h,
                                         int col) const {
    return !valid[col] || n * kPageBlock + col >= q.rowlen[h];
  }
  // Page n of the sequence (its id inside the pool: blk_ok) goes by TMA (JFM_DENSE_TMA, the role
  // split's producer): the map exists and all 64 rows are inside the sequence.
  __device__ __forceinline__ bool tma_page(const Seq& q, int n, bool blk_ok) const {
    return p.kv_map_ok && blk_ok && (n + 1) * kPageBlock <= q.len;
  }
  __device__ __forceinline__ bool window_full(const Seq& q, int n) const {
    return (n + 1) * kPageBlock <= min(q.rowlen[0], q.rowlen[1]);
  }
  // kTransposed*: query row r of the CTA's tile (its own window end, computed here).
  __device__ __forceinline__ bool masked_t(const Seq& q, int n, const uint8_t* valid, int token,
                                           int r) const {
    const int rowlen = p.causal ? q.len - p.s_q + (row0 + r) / hpk + 1 : q.len;
    return !valid[token] || n * kPageBlock + token >= rowlen;
  }
  __device__ __forceinline__ WsRowOut<T> row_out(const Seq& q, int r, float inv, float lse, float,
                                                 bool write_stats) const {
    const int grow = row0 + r;
    if (grow >= rows_total) return {nullptr, nullptr, 0.f};
    const int s = grow / hpk, head = hk * hpk + grow % hpk;
    if (q.nsplit == 1) {
      const RowMap map{p.s_q, p.s_q, p.h_q, hpk};
      if (write_stats) p.lse[map.lse_index(q.index, s, head)] = lse;
      return {reinterpret_cast<T*>(p.out) + map.out_row(q.index, s, head) * kDv, nullptr, inv};
    }
    const size_t slot_row = (static_cast<size_t>(q.slot) * p.h_kv + hk) * rows_total + grow;
    if (write_stats) p.lse_accum[slot_row] = lse;
    return {nullptr, p.o_accum + slot_row * kDv, inv};
  }
  __device__ __forceinline__ float empty_lse(const Seq& q) const {
    return q.nsplit == 1 ? INFINITY : -INFINITY;
  }
  template <bool kScoresRole, bool kPair>
  __device__ __forceinline__ void store_rows(const Seq& q, const RowState& st, const float (&inv)[2],
                                             const float (&lse)[2], const float (&)[2],
                                             const Lane& ln) const {
    store_dense_rows<T>(p, st, inv, lse, q.index, q.slot, q.nsplit, row0, hk, hpk, rows_total, ln);
  }

  // A producer warpgroup (`which` of `stride`: the tiles k % stride == which): each page's 64 rows
  // of this KV head by load_tile_rows (128 threads: rows lr + 16 h); the page id of its next tile
  // is loaded while this one is waited for and copied.
  // kSole: the role split's producer, the one that loads whole pages by TMA (JFM_DENSE_TMA).
  template <bool kWide, bool kPair, bool kSole = false, bool = false>  // (no staging registers)
  __device__ __forceinline__ void produce(const WsShared& sh, int which, int stride) const {
    static_assert(!kPair || kDensePair, "the dense CTA pair: JFM_DENSE_PAIR");
    const T* __restrict__ kvg = reinterpret_cast<const T*>(p.kv);
    const int ptid = threadIdx.x & 127;
    const int lr = ptid >> 3, lq = ptid & 7;
    uint32_t k0 = 0;  // the CTA's tiles before this sequence's
    for (int s = begin_seq; s <= end_seq; ++s) {
      const Seq q = seq(s);
      // Every page of [first, t_hi) is a tile: the CTA's (k0 + n - first)-th.
      const int skip = (which - static_cast<int>(k0 % stride) + stride) % stride;
      int blk = q.first + skip < q.t_hi ? q.table[q.first + skip] : -1;
      for (int n = q.first + skip; n < q.t_hi; n += stride) {
        const uint32_t k = k0 + (n - q.first);
        const int blk_next = n + stride < q.t_hi ? q.table[n + stride] : -1;
        const bool blk_ok = blk >= 0 && blk < p.num_kv_blocks;
        const WsFill<kPair> fill(sh, k);
        fill.wait_empty();
        tile_trace(k, kTrProdEmpty);
        if (kDenseTma && kSole && tma_page(q, n, blk_ok)) {
          // A whole page by TMA (JFM_DENSE_TMA): thread 0 expects the tile's bytes and issues its
          // column blocks; every thread makes its two arrivals (kFullCount).
          // kPair (JFM_DENSE_PAIR): rank r issues the boxes j % 2 == r with multicast into both
          // CTAs, counted on full (rank 0's boxes) and peer_full (rank 1's) of each. Both CTAs of
          // the pair take the same branch here: same page, same length.
          using S = TileSmem<kDqk>;
#pragma unroll
          for (int h = 0; h < 4; ++h)
            if (lq == 0) fill.valid[lr + 16 * h] = 1;
          if (ptid == 0) {
            if constexpr (kPair) {
              mbarrier_arrive_expect_tx(fill.full, (S::kKBlocks + 1) / 2 * S::kBlockBytes);
              mbarrier_arrive_expect_tx(fill.peer_full, S::kKBlocks / 2 * S::kBlockBytes);
              const uint32_t bar = sh.rank == 0 ? fill.full : fill.peer_full;
#pragma unroll
              for (int j = 0; j < S::kKBlocks; ++j)
                if ((j & 1) == static_cast<int>(sh.rank))
                  tma_load_3d_multicast(fill.tile + j * S::kBlockBytes, &p.kv_map, bar, 64 * j,
                                        hk, blk * kPageBlock, 0x3);
            } else {
              mbarrier_arrive_expect_tx(fill.full, S::kTileBytes);
#pragma unroll
              for (int j = 0; j < S::kKBlocks; ++j)
                tma_load_3d(fill.tile + j * S::kBlockBytes, &p.kv_map, fill.full, 64 * j, hk,
                            blk * kPageBlock);
            }
            if constexpr (kDenseL2Ahead && kPair) {
              // (JFM_DENSE_L2_AHEAD; the CTA pair only) the page of this producer's next fill,
              // asked of L2 a fill ahead: the next page of this sequence, else the next
              // sequence's first (page 0: a later sequence of the part starts there); an id
              // outside the pool asks nothing.
              const int ahead = n + 1 < q.t_hi ? blk_next
                                : s < end_seq ? p.block_table[static_cast<size_t>(s + 1) * p.max_blocks]
                                              : -1;
              if (ahead >= 0 && ahead < p.num_kv_blocks) {
#pragma unroll
                for (int j = 0; j < S::kKBlocks; ++j)
                  if ((j & 1) == static_cast<int>(sh.rank))
                    tma_prefetch_l2_3d(&p.kv_map, 64 * j, hk, ahead * kPageBlock);
              }
            }
          } else {
            mbarrier_arrive(fill.full);
          }
          mbarrier_arrive(fill.full);
          tile_trace(k, kTrProdIssued);
          blk = blk_next;
          continue;
        }
        // kPair: each CTA copies a partial or invalid page for itself; nothing comes from the peer.
        if constexpr (kPair)
          if (ptid == 0) mbarrier_arrive(fill.peer_full);
        auto present = [&](int r) { return blk_ok && n * kPageBlock + r < q.len; };
        load_tile_rows<T, kDqk, 128>(fill.tile, ptid, kvg, [&](int r) -> const T* {
          const size_t row = static_cast<size_t>(blk) * kPageBlock + r;
          return present(r) ? kvg + (row * p.h_kv + hk) * kDqk : nullptr;
        });
#pragma unroll
        for (int h = 0; h < 4; ++h)
          if (lq == 0) fill.valid[lr + 16 * h] = present(lr + 16 * h);
        mbarrier_arrive(fill.full);                  // the validity bytes
        cp_async_mbarrier_arrive_noinc(fill.full);   // the rows, when they land
        tile_trace(k, kTrProdIssued);
        blk = blk_next;
      }
      k0 += max(q.t_hi - q.first, 0);
    }
    cp_async_wait_all();  // no copy outlives its thread
  }
};

template <typename T, WsMath kMath>
__global__ void __launch_bounds__(384, 1) dense_decode_ws_kernel(const __grid_constant__ DenseDecodeParams p) {
  using Task = DenseWsTask<T>;
  cta_trace(false);  // (tile_trace.cuh; nothing without JFM_TILE_TRACE)
  pdl_attention_start();  // (pdl.cuh) the combine may be placed on SMs this grid's tail frees
  extern __shared__ unsigned char smem_raw[];
  const WsShared sh =
      ws_setup<Task::kDqk, kMath, ws_split_p<Task, ws_pair(kMath)>()>(smem_raw, Task::kFullCount);
  pdl_attention_inputs();  // (JFM_PDL_MAIN) the previous kernel's writes, before the first read
  const Task task(p);
  ws_run<kMath>(task, sh);
  cta_trace(true);
}

// kRolesPair (JFM_DENSE_PAIR): clusters of two consecutive row blocks; cudaErrorNotSupported,
// launching nothing, where the pair does not apply (odd num_m_blocks, no tensor map) or the device
// cannot hold every pair at once (launch_clusters_with_smem): the caller falls back to kRoles.
template <typename T, WsMath kMath>
cudaError_t launch_dense_decode_ws(const DenseDecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_sm_parts, p.num_m_blocks, p.h_kv);
  return tile_trace_launch("dense_decode_ws_kernel", static_cast<int>(kMath), stream, [&] {
    if constexpr (ws_pair(kMath)) {
      if (p.num_m_blocks % 2 != 0 || !p.kv_map_ok) return cudaErrorNotSupported;
      return launch_clusters_with_smem<dense_decode_ws_kernel<T, kMath>>(
          grid, dim3(1, 2, 1), 384, WsSmem<kDenseDqk>::kBytes, stream, p, kPdlMain);
    } else {
      return launch_with_smem(dense_decode_ws_kernel<T, kMath>, grid, 384,
                              WsSmem<kDenseDqk>::kBytes, stream, p, kPdlMain);
    }
  });
}

}  // namespace sm90
}  // namespace jfm
