// Sparse MLA attention, warp-specialized (sm90a): the same work and math as kernel.cuh (one CTA
// per 64 heads of a query token or of a schedule row; tile_attention.cuh's tile), with the gather
// moved off the math warps.
//
// CTA: 384 threads.
//  * Warpgroups 0-1, the math warps: Q tile, then per 64-position tile: wait until the tile's
//    buffer is full, S = Q K^T, masked online softmax, O += P V, mark the buffer empty. They never
//    touch the KV pool. Two ways to split the math (WsMath):
//    - kColumns: v1.1's split (tile_attention.cuh): each warpgroup computes S for 32 of the 64
//      positions, the two exchange row maxima through shared memory, and each accumulates half of
//      O's columns from the shared P.
//    - kRoles: warpgroup 0 (scores) computes the whole S tile (m64n64) and its softmax without any
//      exchange, writes P and each row's correction factor to shared memory (named barrier
//      "P ready"), and accumulates O[:, 0..256); warpgroup 1 (values) rescales and accumulates
//      O[:, 256..512) and hands P back ("P free"). Warpgroup 0's S of the next tile then runs
//      while warpgroup 1 still accumulates the previous one.
//  * Warpgroup 2, the producer (setmaxnreg down to kProducerRegs): walks the same tiles, loads the
//    indices one tile ahead, and fills buffer k % 2 for the k-th tile of this CTA once the math
//    warps have emptied it: FP8 rows fetched into registers (issued before waiting for the empty
//    buffer, so the loads overlap the math of the tile before) and dequantized into the swizzled
//    bf16 tile in two rounds of 32 tokens; bf16 rows by cp.async straight into the tile.
// Hand-off: two mbarriers per buffer. full[b]: FP8, the 128 producer threads arrive after their
// stores and a proxy fence; bf16, each producer thread arrives once after its validity-byte
// stores and once more (cp.async.mbarrier.arrive.noinc) when its copies land, and the math
// warps fence before reading. empty[b]: one arrival per math warp once its wgmmas that read the
// buffer have completed. The k-th use of buffer b waits for phase parity (k / 2) & 1 (full) and
// its complement (empty: the first use of each buffer passes at once).
// The 256 math threads synchronize among themselves through named barrier 1 (MathWarpsSync),
// never with the producer.
#pragma once

#include <cmath>

#include "kernels/params.h"
#include "kernels/sm90/decode/sparse/common.cuh"
#include "kernels/sm90/decode/tile_attention.cuh"

namespace jfm {
namespace sm90 {

// Register split: the CTA is launched with 168 per thread (65536 / 384 rounded down to a multiple
// of 8); the math warpgroups take more and the producer gives the difference back:
// 128 * (math warpgroup 0 + math warpgroup 1 + producer) <= 384 * 168. kRoles: warpgroup 0 holds
// S (32) beside its O half (128), warpgroup 1 only the O half.
constexpr int kProducerRegs = 88;
template <WsMath kMath>
struct WsRegs {
  static constexpr int kWg0 = kMath == WsMath::kColumns ? 208 : 232;
  static constexpr int kWg1 = kMath == WsMath::kColumns ? 208 : 184;
  static_assert(kWg0 + kWg1 + kProducerRegs <= 3 * 168, "register pool of a 384-thread CTA");
};

// Named barriers (0 is __syncthreads', 1 MathWarpsSync's).
constexpr int kBarPReady = 2;   // kRoles: warpgroup 0 wrote P and the corrections (128 + 128)
constexpr int kBarPFree = 3;    // kRoles: warpgroup 1 is done with them (128 + 128)
constexpr int kBarScores = 4;   // kRoles: warpgroup 0 alone (128)

template <int kDqk>
struct WsSmem : TileSmem<kDqk> {
  using Base = TileSmem<kDqk>;
  static constexpr int kBarOff = Base::kValidOff + 2 * kTileTokens;  // full[2], empty[2]
  static constexpr int kCorrOff = kBarOff + 4 * 8;                     // float[64] (kRoles)
  static constexpr size_t kBytes = kCorrOff + kBlockM * 4 + 1024;      // + alignment slack
  static_assert(kBarOff % 8 == 0, "mbarriers are 8-byte aligned");
  static_assert(kBytes <= 227 * 1024, "shared memory of one sm90 CTA");
};

// The producer warpgroup: fills the KV tile buffers for the math warps (see the file comment).
template <KvFormat kFmt, int kDqk>
__device__ __forceinline__ void ws_produce(const SparseDecodeParams& p, const CtaWork& work,
                                           uint32_t sk0, uint8_t* valid_s, uint32_t bar_full,
                                           uint32_t bar_empty) {
  using S = TileSmem<kDqk>;
  constexpr bool kFp8 = kFmt != KvFormat::kBf16;
  const int ptid = threadIdx.x - 256;  // 0..127
  // FP8: a quarter (j) of token t in round 0 and of token t + 32 in round 1 (Fp8Slot's map over
  // four warps). bf16: rows lr + 16 h (h < 4), 16-byte chunks lq + 8 j (whole 128-byte lines).
  const Fp8Slot slot(ptid);
  const int lr = ptid >> 3, lq = ptid & 7;
  const uint32_t ld_off = static_cast<uint32_t>(lr * 128 + ((lq ^ (lr & 7)) << 4));
  typename Fp8Stage<kFmt == KvFormat::kBf16 ? KvFormat::kFp8V32 : kFmt>::type stage;
  stage.j_ = slot.j;

  uint32_t k = 0;  // tiles this CTA has produced
  for (int seq = work.begin_seq; seq <= work.end_seq; ++seq) {
    const TokenRows rows(p, seq);
    const int t_hi = work.tile_hi(seq);
    // This thread's positions of tile n: FP8 t, t + 32; bf16 lr + 16 h.
    auto load_indices = [&](int n, int (&idx)[4]) {
      if (n >= t_hi) return;
      if constexpr (kFp8) {
        idx[0] = rows.index_at(n, slot.t);
        idx[1] = rows.index_at(n, slot.t + 32);
      } else {
#pragma unroll
        for (int h = 0; h < 4; ++h) idx[h] = rows.index_at(n, lr + 16 * h);
      }
    };
    int n = rows.next_live(work.tile_lo(seq), t_hi);
    int idx[4] = {-1, -1, -1, -1};
    load_indices(n, idx);
    while (n < t_hi) {
      const int n_next = rows.next_live(n + 1, t_hi);
      int idx_next[4] = {-1, -1, -1, -1};
      const uint32_t buf = k & 1;
      const uint32_t full = bar_full + 8 * buf, empty = bar_empty + 8 * buf;
      const uint32_t tile = sk0 + buf * S::kTileBytes;
      uint8_t* valid = valid_s + buf * kTileTokens;
      const int pool_id = rows.pool_of(n);
      const SparsePool& pool = p.pool[pool_id];
      if constexpr (kFp8) {
        stage.fetch(pool, rows.row_of(idx[0], pool_id));  // in flight while we wait
        load_indices(n_next, idx_next);
        mbarrier_wait(empty, ((k >> 1) & 1) ^ 1);
        stage.store(tile, slot.t);
        if (slot.j == 0) valid[slot.t] = stage.valid;
        stage.fetch(pool, rows.row_of(idx[1], pool_id));
        stage.store(tile, slot.t + 32);
        if (slot.j == 0) valid[slot.t + 32] = stage.valid;
        fence_proxy_async();  // the stores, before the math warps' wgmma reads them
        mbarrier_arrive(full);
      } else {
        load_indices(n_next, idx_next);
        mbarrier_wait(empty, ((k >> 1) & 1) ^ 1);
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const int64_t r = rows.row_of(idx[h], pool_id);
          const bf16* src = reinterpret_cast<const bf16*>(pool.data) + (r >= 0 ? r : 0) * kDqk + lq * 8;
#pragma unroll
          for (int j = 0; j < S::kKBlocks; ++j)
            cp_async_16(tile + j * S::kBlockBytes + h * 16 * 128 + ld_off, src + 64 * j, r >= 0 ? 16 : 0);
          if (lq == 0) valid[lr + 16 * h] = r >= 0;
        }
        mbarrier_arrive(full);                  // the validity bytes
        cp_async_mbarrier_arrive_noinc(full);   // the rows, when they land
      }
#pragma unroll
      for (int h = 0; h < 4; ++h) idx[h] = idx_next[h];
      n = n_next;
      ++k;
    }
  }
  if constexpr (!kFp8) cp_async_wait_all();  // no copy outlives its thread
}

// Shared-memory addresses of a warp-specialized CTA.
struct WsShared {
  float* red;          // float[2][64]: row statistics
  float* corr;         // float[64]: kRoles, each row's correction of the previous O
  uint8_t* valid;      // uint8[2][64]: which positions of each buffer hold a row
  uint32_t sq, sk0, sp;
  uint32_t bar_full, bar_empty;  // mbarriers [2] each
};

// What a math warpgroup does: both halves of the column split, or one side of the role split.
enum class WsRole : int { kColumns, kScores, kValues };

// The math warps' loop over this CTA's tokens and tiles (see the file comment). One instantiation
// per role, so that each warpgroup's code is register-allocated within its own setmaxnreg budget.
template <KvFormat kFmt, int kDqk, WsRole kRole>
__device__ __forceinline__ void ws_math(const SparseDecodeParams& p, const CtaWork& work,
                                        const WsShared& sh) {
  using S = TileSmem<kDqk>;
  using Sync = MathWarpsSync;
  constexpr bool kFp8 = kFmt != KvFormat::kBf16;
  const Lane ln;
  const int head0 = blockIdx.y * kBlockM;
  const float sl2 = p.softmax_scale * 1.4426950408889634f;
  const uint64_t desc_q = gmma_desc_sw128(sh.sq, 16, 1024);
  // kColumns: this warpgroup's 32 rows of the K tile; kScores: all 64.
  const uint64_t desc_k =
      gmma_desc_sw128(sh.sk0 + (kRole == WsRole::kColumns ? ln.wc * 32 * 128 : 0), 16, 1024);
  const uint64_t desc_p = gmma_desc_sw128(sh.sp, 16, 1024);
  const uint64_t desc_v = gmma_desc_sw128(sh.sk0 + ln.wc * 4 * S::kBlockBytes, S::kBlockBytes, 1024);

  uint32_t k = 0;  // tiles this CTA has consumed (the producer's count, in step)
  for (int seq = work.begin_seq; seq <= work.end_seq; ++seq) {
    const TokenRows rows(p, seq);
    const int t_hi = work.tile_hi(seq);
    const int split_base = work.scheduled ? p.num_splits[seq] : 0;
    const int nsplit = work.scheduled ? p.num_splits[seq + 1] - split_base : 1;

    Sync::sync();  // every math warp is done with the previous token's Q, P and `red`
    load_q_tile<kDqk>(p, seq, head0, sh.sq);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    Sync::sync();

    RowState st;
    st.init();
    const int first = rows.next_live(work.tile_lo(seq), t_hi);
    for (int n = first; n < t_hi; ++k) {
      const int n_next = rows.next_live(n + 1, t_hi);
      const uint32_t buf = k & 1;
      mbarrier_wait(sh.bar_full + 8 * buf, (k >> 1) & 1);
      if constexpr (!kFp8) fence_proxy_async();  // cp.async rows, read by wgmma
      const uint32_t buf_desc = buf * (S::kTileBytes >> 4);
      const uint8_t* valid = sh.valid + buf * kTileTokens;

      if constexpr (kRole == WsRole::kColumns) {
        float sacc[16];
        tile_qk<bf16, kDqk>(sacc, desc_q, desc_k + buf_desc);
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!valid[ln.col(nt, e)]) sacc[nt * 4 + e] = -INFINITY;
        }
        tile_softmax<bf16, Sync>(sacc, st, sh.red, sh.sp, sl2, ln);
        fence_proxy_async();
        Sync::sync();
      } else if constexpr (kRole == WsRole::kScores) {
        float sacc[32];
        tile_qk_rows<bf16, kDqk>(sacc, desc_q, desc_k + buf_desc);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!valid[nt * 8 + 2 * ln.tq + (e & 1)]) sacc[nt * 4 + e] = -INFINITY;
        }
        float corr[2];
        tile_softmax_rows(sacc, st, corr, sl2);
        if (n != first) named_barrier_sync(kBarPFree, 256);  // values done with the last P
        store_p_rows<bf16>(sh.sp, sacc, ln);
        if (ln.tq == 0) {
          sh.corr[ln.row(0)] = corr[0];
          sh.corr[ln.row(1)] = corr[1];
        }
        fence_proxy_async();
        named_barrier_arrive(kBarPReady, 256);
        named_barrier_sync(kBarScores, 128);  // all of P, before this warpgroup's wgmma reads it
        rescale_o(st.o, corr);
      } else {  // kValues
        named_barrier_sync(kBarPReady, 256);
        const float corr[2] = {sh.corr[ln.row(0)], sh.corr[ln.row(1)]};
        rescale_o(st.o, corr);
      }
      tile_pv_issue<bf16>(st, desc_p, desc_v + buf_desc);
      wgmma_wait<0>();
      if (kRole == WsRole::kValues && n_next < t_hi) named_barrier_arrive(kBarPFree, 256);
      __syncwarp();
      if ((ln.tid & 31) == 0) mbarrier_arrive(sh.bar_empty + 8 * buf);  // this warp is done with it
      n = n_next;
    }
    const int slot = split_base + work.split(seq);
    if constexpr (kRole == WsRole::kColumns) finish_token<Sync>(p, st, sh.red, seq, head0, slot, nsplit, ln);
    else finish_token_roles<Sync>(p, st, sh.red, seq, head0, slot, nsplit, ln);
  }
}

template <KvFormat kFmt, int kDqk, WsMath kMath>
__global__ void __launch_bounds__(384, 1)
    sparse_attention_ws_kernel(const __grid_constant__ SparseDecodeParams p) {
  using S = TileSmem<kDqk>;
  using W = WsSmem<kDqk>;
  using Regs = WsRegs<kMath>;
  constexpr bool kFp8 = kFmt != KvFormat::kBf16;
  static_assert(!kFp8 || kDqk == (kFmt == KvFormat::kFp8V32 ? 576 : 512), "FP8 layout fixes d_qk");
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_base = smem_u32(smem_raw);
  const uint32_t base = (raw_base + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw_base);
  WsShared sh;
  sh.red = reinterpret_cast<float*>(smem + S::kRedOff);
  sh.corr = reinterpret_cast<float*>(smem + W::kCorrOff);
  sh.valid = smem + S::kValidOff;
  sh.sq = base + S::kQOff;
  sh.sk0 = base + S::kKOff;
  sh.sp = base + S::kPOff;
  sh.bar_full = base + W::kBarOff;
  sh.bar_empty = sh.bar_full + 16;

  if (threadIdx.x == 0) {
    for (int b = 0; b < 2; ++b) {
      mbarrier_init(sh.bar_full + 8 * b, kFp8 ? 128 : 256);
      mbarrier_init(sh.bar_empty + 8 * b, 8);  // the math warps
    }
  }
  __syncthreads();  // the last CTA-wide barrier: the roles part here

  const CtaWork work(p);
  const int wg = threadIdx.x / 128;
  if (wg == 2) {
    setmaxnreg_dec<kProducerRegs>();
    ws_produce<kFmt, kDqk>(p, work, sh.sk0, sh.valid, sh.bar_full, sh.bar_empty);
  } else if constexpr (kMath == WsMath::kColumns) {
    setmaxnreg_inc<Regs::kWg0>();
    ws_math<kFmt, kDqk, WsRole::kColumns>(p, work, sh);
  } else if (wg == 0) {
    setmaxnreg_inc<Regs::kWg0>();
    ws_math<kFmt, kDqk, WsRole::kScores>(p, work, sh);
  } else {
    setmaxnreg_inc<Regs::kWg1>();
    ws_math<kFmt, kDqk, WsRole::kValues>(p, work, sh);
  }
}

template <KvFormat kFmt, int kDqk, WsMath kMath>
cudaError_t launch_sparse_attention_ws(const SparseDecodeParams& p, cudaStream_t stream) {
  using W = WsSmem<kDqk>;
  cudaError_t e = cudaFuncSetAttribute(sparse_attention_ws_kernel<kFmt, kDqk, kMath>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(W::kBytes));
  if (e != cudaSuccess) return e;
  const int num_tokens = p.batch * p.s_q;
  dim3 grid(p.tile_scheduler_metadata != nullptr ? p.num_sm_parts : num_tokens, p.num_m_blocks);
  sparse_attention_ws_kernel<kFmt, kDqk, kMath><<<grid, 384, W::kBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace jfm
