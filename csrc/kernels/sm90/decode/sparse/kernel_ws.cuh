// Sparse MLA attention, warp-specialized (sm90a): the same work and math as kernel.cuh (one CTA
// per 64 heads of a query token or of a schedule row; tile_attention.cuh's tile), with the gather
// moved off the math warps.
//
// CTA: 384 threads.
//  * Warpgroups 0-1, the math warps (setmaxnreg up to kMathRegs): Q tile, then per 64-position
//    tile: wait until the tile's buffer is full, S = Q K^T, masked online softmax, O += P V, mark
//    the buffer empty. They never touch the KV pool.
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
// 2 * 128 * kMathRegs + 128 * kProducerRegs <= 384 * 168.
constexpr int kMathRegs = 208;
constexpr int kProducerRegs = 88;
static_assert(2 * kMathRegs + kProducerRegs <= 3 * 168, "register pool of a 384-thread CTA");

template <int kDqk>
struct WsSmem : TileSmem<kDqk> {
  using Base = TileSmem<kDqk>;
  static constexpr int kBarOff = Base::kValidOff + 2 * kTileTokens;  // full[2], empty[2]
  static constexpr size_t kBytes = kBarOff + 4 * 8 + 1024;            // + alignment slack
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

template <KvFormat kFmt, int kDqk>
__global__ void __launch_bounds__(384, 1)
    sparse_attention_ws_kernel(const __grid_constant__ SparseDecodeParams p) {
  using S = TileSmem<kDqk>;
  using W = WsSmem<kDqk>;
  using Sync = MathWarpsSync;
  constexpr bool kFp8 = kFmt != KvFormat::kBf16;
  static_assert(!kFp8 || kDqk == (kFmt == KvFormat::kFp8V32 ? 576 : 512), "FP8 layout fixes d_qk");
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_base = smem_u32(smem_raw);
  const uint32_t base = (raw_base + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw_base);
  float* red = reinterpret_cast<float*>(smem + S::kRedOff);
  uint8_t* valid_s = smem + S::kValidOff;  // [2][64]
  const uint32_t sq = base + S::kQOff;
  const uint32_t sk0 = base + S::kKOff;
  const uint32_t sp = base + S::kPOff;
  const uint32_t bar_full = base + W::kBarOff, bar_empty = bar_full + 16;  // [2] each

  if (threadIdx.x == 0) {
    for (int b = 0; b < 2; ++b) {
      mbarrier_init(bar_full + 8 * b, kFp8 ? 128 : 256);
      mbarrier_init(bar_empty + 8 * b, 8);  // the math warps
    }
  }
  __syncthreads();  // the last CTA-wide barrier: the roles part here

  const CtaWork work(p);
  if (threadIdx.x >= 256) {
    setmaxnreg_dec<kProducerRegs>();
    ws_produce<kFmt, kDqk>(p, work, sk0, valid_s, bar_full, bar_empty);
    return;
  }
  setmaxnreg_inc<kMathRegs>();

  const Lane ln;
  const int head0 = blockIdx.y * kBlockM;
  const float sl2 = p.softmax_scale * 1.4426950408889634f;
  const uint64_t desc_q = gmma_desc_sw128(sq, 16, 1024);
  const uint64_t desc_k = gmma_desc_sw128(sk0 + ln.wc * 32 * 128, 16, 1024);
  const uint64_t desc_p = gmma_desc_sw128(sp, 16, 1024);
  const uint64_t desc_v = gmma_desc_sw128(sk0 + ln.wc * 4 * S::kBlockBytes, S::kBlockBytes, 1024);

  uint32_t k = 0;  // tiles this CTA has consumed (the producer's count, in step)
  for (int seq = work.begin_seq; seq <= work.end_seq; ++seq) {
    const TokenRows rows(p, seq);
    const int t_hi = work.tile_hi(seq);
    const int split_base = work.scheduled ? p.num_splits[seq] : 0;
    const int nsplit = work.scheduled ? p.num_splits[seq + 1] - split_base : 1;

    Sync::sync();  // every math warp is done with the previous token's Q, P and `red`
    load_q_tile<kDqk>(p, seq, head0, sq);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    Sync::sync();

    RowState st;
    st.init();
    for (int n = rows.next_live(work.tile_lo(seq), t_hi); n < t_hi; n = rows.next_live(n + 1, t_hi), ++k) {
      const uint32_t buf = k & 1;
      mbarrier_wait(bar_full + 8 * buf, (k >> 1) & 1);
      if constexpr (!kFp8) fence_proxy_async();  // cp.async rows, read by wgmma
      const uint32_t buf_desc = buf * (S::kTileBytes >> 4);

      float sacc[16];
      tile_qk<bf16, kDqk>(sacc, desc_q, desc_k + buf_desc);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!valid_s[buf * kTileTokens + ln.col(nt, e)]) sacc[nt * 4 + e] = -INFINITY;
      }
      tile_softmax<bf16, Sync>(sacc, st, red, sp, sl2, ln);
      fence_proxy_async();
      Sync::sync();
      tile_pv_issue<bf16>(st, desc_p, desc_v + buf_desc);
      wgmma_wait<0>();
      __syncwarp();
      if ((ln.tid & 31) == 0) mbarrier_arrive(bar_empty + 8 * buf);  // this warp is done with it
    }
    finish_token<Sync>(p, st, red, seq, head0, split_base + work.split(seq), nsplit, ln);
  }
}

template <KvFormat kFmt, int kDqk>
cudaError_t launch_sparse_attention_ws(const SparseDecodeParams& p, cudaStream_t stream) {
  using W = WsSmem<kDqk>;
  cudaError_t e = cudaFuncSetAttribute(sparse_attention_ws_kernel<kFmt, kDqk>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(W::kBytes));
  if (e != cudaSuccess) return e;
  const int num_tokens = p.batch * p.s_q;
  dim3 grid(p.tile_scheduler_metadata != nullptr ? p.num_sm_parts : num_tokens, p.num_m_blocks);
  sparse_attention_ws_kernel<kFmt, kDqk><<<grid, 384, W::kBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace jfm
