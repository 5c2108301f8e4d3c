// Sparse MLA attention over gathered KV rows (sm90a, wgmma): DeepSeek Sparse Attention decode over
// one or two pools (bf16, FP8 V3.2 or FP8 V4 caches) and, with no schedule, sparse prefill.
//
// Work: query token i = (b, s) attends the valid rows its index lists name, in tiles of 64
// positions (tile_attention.cuh's math); a CTA takes 64 heads of one token (grid.y = row block).
// With a schedule (decode) CTA x walks its part of the split-KV schedule, whose "sequences" are
// the query tokens; without one (prefill) CTA x is token x and never splits.
//
// Loading a tile:
//  * bf16 rows: cp.async of whole rows into the swizzled tile, double-buffered as in dense decode.
//  * FP8 rows: each thread loads a quarter of one token's bytes into registers for the NEXT tile
//    before this tile's math, then dequantizes (fp8 * power-of-two scale -> bf16) into the other
//    tile buffer while this tile's PV wgmma runs. The quarter-to-thread map makes every load a
//    sector-contiguous run per token and every 16-byte shared store bank-conflict free.
// A position whose index is -1, out of the pool's range, or past topk_length is zero-filled (never
// read) and masked out of the softmax through a per-tile validity byte in shared memory.
#pragma once

#include <cmath>

#include "kernels/params.h"
#include "kernels/sm90/decode/sparse/common.cuh"
#include "kernels/sm90/decode/tile_attention.cuh"

namespace jfm {
namespace sm90 {

template <KvFormat kFmt, int kDqk>
__global__ void __launch_bounds__(256, 1) sparse_attention_kernel(const __grid_constant__ SparseDecodeParams p) {
  using S = TileSmem<kDqk>;
  constexpr bool kFp8 = kFmt != KvFormat::kBf16;
  static_assert(!kFp8 || kDqk == (kFmt == KvFormat::kFp8V32 ? 576 : 512), "FP8 layout fixes d_qk");
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_base = smem_u32(smem_raw);
  const uint32_t base = (raw_base + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw_base);
  float* red = reinterpret_cast<float*>(smem + S::kRedOff);
  uint8_t* valid_s = smem + S::kValidOff;  // [2][64]
  const Lane ln;

  const int mb = blockIdx.y;
  const int head0 = mb * kBlockM;
  const CtaWork work(p);
  const bool scheduled = work.scheduled;
  const float sl2 = p.softmax_scale * 1.4426950408889634f;

  const uint32_t sq = base + S::kQOff;
  const uint32_t sk0 = base + S::kKOff;
  const uint32_t sp = base + S::kPOff;
  const int lr = ln.tid >> 3, lq = ln.tid & 7;  // bf16 rows lr, lr + 32; chunks lq + 8 j
  const uint32_t ld_off = static_cast<uint32_t>(lr * 128 + ((lq ^ (lr & 7)) << 4));
  const Fp8Slot slot(ln.tid);
  const uint64_t desc_q = gmma_desc_sw128(sq, 16, 1024);
  const uint64_t desc_k = gmma_desc_sw128(sk0 + ln.wc * 32 * 128, 16, 1024);
  const uint64_t desc_p = gmma_desc_sw128(sp, 16, 1024);
  const uint64_t desc_v = gmma_desc_sw128(sk0 + ln.wc * 4 * S::kBlockBytes, S::kBlockBytes, 1024);

  typename Fp8Stage<kFmt == KvFormat::kBf16 ? KvFormat::kFp8V32 : kFmt>::type stage;
  stage.j_ = slot.j;

  for (int s = work.begin_seq; s <= work.end_seq; ++s) {
    const int seq = work.token(s);  // the query token
    const TokenRows rows(p, seq);
    const int t_lo = work.tile_lo(s);
    const int t_hi = work.tile_hi(s);
    const int split = work.split(s);
    const int split_base = scheduled ? p.num_splits[seq] : 0;
    const int nsplit = scheduled ? p.num_splits[seq + 1] - split_base : 1;

    __syncthreads();  // the previous sequence is done with every shared buffer

    load_q_tile<kDqk>(p, seq, head0, sq);  // (waited for with the first tile's rows)
    // Tile n into buffer buf: bf16 rows by cp.async; FP8 rows fetched into registers by
    // `fetch_fp8` and written by `store_fp8` later. The indices (`idx`: this thread's rows of a
    // tile) are loaded one tile earlier than the rows they name.
    auto load_bf16 = [&](int buf, int n, const int (&idx)[2]) {
      const uint32_t dst = sk0 + buf * S::kTileBytes + ld_off;
      const int pool_id = rows.pool_of(n);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int t = lr + 32 * h;
        const int64_t r = rows.row_of(idx[h], pool_id);
        const bf16* src = reinterpret_cast<const bf16*>(p.pool[pool_id].data) +
                          (r >= 0 ? r : 0) * kDqk + lq * 8;
#pragma unroll
        for (int j = 0; j < S::kKBlocks; ++j)
          cp_async_16(dst + j * S::kBlockBytes + h * 32 * 128, src + 64 * j, r >= 0 ? 16 : 0);
        if (lq == 0) valid_s[buf * kTileTokens + t] = r >= 0;
      }
    };
    auto fetch_fp8 = [&](int n, const int (&idx)[2]) {
      const int pool_id = rows.pool_of(n);
      stage.fetch(p.pool[pool_id], rows.row_of(idx[0], pool_id));
    };
    auto store_fp8 = [&](int buf) {
      store_stage(stage, sk0 + buf * S::kTileBytes, slot.t);
      if (slot.j == 0) valid_s[buf * kTileTokens + slot.t] = stage.valid;
    };
    // This thread's positions of a tile: FP8 one token (slot.t), bf16 two rows (lr, lr + 32).
    auto load_indices = [&](int n, int (&idx)[2]) {
      if (n >= t_hi) return;
      if constexpr (kFp8) {
        idx[0] = rows.index_at(n, slot.t);
      } else {
        idx[0] = rows.index_at(n, lr);
        idx[1] = rows.index_at(n, lr + 32);
      }
    };

    int n = rows.next_live(t_lo, t_hi);
    int idx_n[2] = {-1, -1}, idx_next[2] = {-1, -1};
    load_indices(n, idx_n);
    if (n < t_hi) {
      if constexpr (kFp8) {
        fetch_fp8(n, idx_n);
        store_fp8(0);
      } else {
        load_bf16(0, n, idx_n);
      }
    }
    cp_async_commit();
    int n_next = rows.next_live(n + 1, t_hi);
    load_indices(n_next, idx_next);

    RowState st;
    st.init();
    for (int buf = 0; n < t_hi; buf ^= 1) {
      cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();
      // Indices of the tile after next, then the next tile's rows (their indices arrived during
      // the previous tile).
      const int n_after = n_next < t_hi ? rows.next_live(n_next + 1, t_hi) : t_hi;
      int idx_after[2] = {-1, -1};
      load_indices(n_after, idx_after);
      if (n_next < t_hi) {
        if constexpr (kFp8) fetch_fp8(n_next, idx_next);
        else load_bf16(buf ^ 1, n_next, idx_next);
      }
      cp_async_commit();
      const uint32_t buf_desc = buf * (S::kTileBytes >> 4);

      float sacc[16];
      tile_qk<bf16, kDqk>(sacc, desc_q, desc_k + buf_desc);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!valid_s[buf * kTileTokens + ln.col(nt, e)]) sacc[nt * 4 + e] = -INFINITY;
      }
      tile_softmax<bf16>(sacc, st, red, sp, sl2, ln);
      fence_proxy_async();
      __syncthreads();
      tile_pv_issue<bf16>(st, desc_p, desc_v + buf_desc);
      if constexpr (kFp8) {
        if (n_next < t_hi) store_fp8(buf ^ 1);  // overlaps the PV wgmma
      }
      wgmma_wait<0>();
      n = n_next;
      n_next = n_after;
      idx_next[0] = idx_after[0];
      idx_next[1] = idx_after[1];
    }
    cp_async_wait<0>();

    finish_token<CtaSync>(p, st, red, seq, head0, split_base + split, nsplit, ln);
  }
}

template <KvFormat kFmt, int kDqk>
cudaError_t launch_sparse_attention(const SparseDecodeParams& p, cudaStream_t stream) {
  return launch_with_smem(sparse_attention_kernel<kFmt, kDqk>, sparse_grid(p), 256,
                          TileSmem<kDqk>::kBytes, stream, p);
}

}  // namespace sm90
}  // namespace jfm
