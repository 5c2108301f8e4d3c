// Dense paged MLA decode, split-KV main kernel (sm90a, wgmma). One CTA per (sm part, 64 query rows,
// KV head): it walks its part of the schedule, (sequence, page) by (sequence, page). Pages arrive by
// cp.async, double-buffered, straight into the swizzled tile layout; the math of each tile is
// tile_attention.cuh's. Rows past a sequence's end and pages whose id is outside the pool are
// zero-filled and masked (never read). Generic-proxy writes (cp.async, st.shared of P) are fenced
// (fence.proxy.async) before the barrier that precedes the wgmma reading them.
// The combine (split sequences) is launched by the FFI handler after this kernel.
#pragma once

#include <cmath>

#include "kernels/params.h"
#include "kernels/sm90/decode/dense/common.cuh"
#include "kernels/sm90/decode/tile_attention.cuh"

namespace jfm {
namespace sm90 {

template <typename T>
__global__ void __launch_bounds__(256, 1) dense_decode_kernel(const DenseDecodeParams p) {
  using S = TileSmem<kDenseDqk>;
  static_assert(sizeof(T) == 2, "16-bit types");
  constexpr int kLoadRows = kBlockM * 8 / 256;  // 2 rows per thread
  static_assert(kLoadRows * 32 == kBlockM && kBlockM == kPageBlock, "loader: rows lr, lr + 32");
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_base = smem_u32(smem_raw);
  const uint32_t base = (raw_base + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw_base);
  float* red = reinterpret_cast<float*>(smem + S::kRedOff);
  const Lane ln;

  const int part = blockIdx.x, mb = blockIdx.y, hk = blockIdx.z;
  const int hpk = p.h_q / p.h_kv;
  const int rows_total = p.s_q * hpk;
  const int row0 = mb * kBlockM;

  const ScheduleRow sched(p.tile_scheduler_metadata + part * kMetaInts);
  const int begin_seq = sched.begin_seq, begin_block = sched.begin_tile;
  const int end_seq = sched.end_seq, end_block = sched.end_tile, begin_split = sched.begin_split;
  const float sl2 = p.softmax_scale * 1.4426950408889634f;

  const T* __restrict__ kvg = reinterpret_cast<const T*>(p.kv);
  const uint32_t sq = base + S::kQOff;
  const uint32_t sk0 = base + S::kKOff;
  const uint32_t sp = base + S::kPOff;
  // Loader mapping: 8 threads per row, so each copy instruction reads whole 128-byte lines (a
  // warp: 4 rows x 128 B). Thread copies rows lr + 32 h (h < kLoadRows), 16-byte chunks lq + 8 j
  // (j = 0..8): chunk lq + 8j is in-block chunk lq of column block j, one swizzled offset for all
  // (rows lr and lr + 32 share r % 8).
  const int lr = ln.tid >> 3, lq = ln.tid & 7;
  const uint32_t ld_off = static_cast<uint32_t>(lr * 128 + ((lq ^ (lr & 7)) << 4));
  // wgmma descriptors of the buffers' starts; advancing = adding (byte offset >> 4).
  const uint64_t desc_q = gmma_desc_sw128(sq, 16, 1024);
  const uint64_t desc_k = gmma_desc_sw128(sk0 + ln.wc * 32 * 128, 16, 1024);
  const uint64_t desc_p = gmma_desc_sw128(sp, 16, 1024);
  const uint64_t desc_v = gmma_desc_sw128(sk0 + ln.wc * 4 * S::kBlockBytes, S::kBlockBytes, 1024);

  for (int seq = begin_seq; seq <= end_seq; ++seq) {
    const int L = min(max(p.cache_seqlens[seq], 0), p.max_blocks * kPageBlock);  // clamped length
    const int nb = (L + kPageBlock - 1) / kPageBlock;
    const int blk_lo = seq == begin_seq ? begin_block : 0;
    const int blk_hi = seq == end_seq ? min(end_block, nb) : nb;
    const int split = seq == begin_seq ? begin_split : 0;
    const int split_base = p.num_splits[seq];
    const int nsplit = p.num_splits[seq + 1] - split_base;
    const int32_t* bt = p.block_table + static_cast<size_t>(seq) * p.max_blocks;

    __syncthreads();  // the previous sequence is done with every shared buffer

    load_dense_q_tile<T, 256>(p, seq, row0, hk, hpk, rows_total, sq);  // (waited for with page 0)
    auto load_k = [&](int buf, int n) {
      const int blk = bt[n];
      const bool blk_ok = blk >= 0 && blk < p.num_kv_blocks;
      const uint32_t dst = sk0 + buf * S::kTileBytes + ld_off;
#pragma unroll
      for (int h = 0; h < kLoadRows; ++h) {
        const int r = lr + 32 * h;
        const bool ok = blk_ok && (n * kPageBlock + r < L);
        const size_t row = static_cast<size_t>(blk_ok ? blk : 0) * kPageBlock + r;
        const T* src = ok ? kvg + (row * p.h_kv + hk) * kDenseDqk + lq * 8 : kvg;
        const int bytes = ok ? 16 : 0;
#pragma unroll
        for (int j = 0; j < S::kKBlocks; ++j)
          cp_async_16(dst + j * S::kBlockBytes + h * 32 * 128, src + 64 * j, bytes);
      }
    };
    if (blk_lo < blk_hi) load_k(0, blk_lo);
    cp_async_commit();

    int rowlen[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int s = (row0 + ln.row(h)) / hpk;
      rowlen[h] = p.causal ? L - p.s_q + s + 1 : L;
    }
    const int min_len = p.causal ? L - p.s_q + 1 : L;  // the shortest window of any real row
    RowState st;
    st.init();

    for (int n = blk_lo; n < blk_hi; ++n) {
      const int buf = (n - blk_lo) & 1;
      cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();
      if (n + 1 < blk_hi) load_k(buf ^ 1, n + 1);
      cp_async_commit();
      const uint32_t buf_desc = buf * (S::kTileBytes >> 4);
      // A page id outside the pool marks the page's tokens absent (SEMANTICS.md): masked below.
      const int blk = bt[n];
      const bool page_ok = blk >= 0 && blk < p.num_kv_blocks;

      float sacc[16];
      tile_qk<T, kDenseDqk>(sacc, desc_q, desc_k + buf_desc);
      if (!page_ok) {
#pragma unroll
        for (int i = 0; i < 16; ++i) sacc[i] = -INFINITY;
      } else if ((n + 1) * kPageBlock > min_len) {  // CTA-uniform: some row's window ends here
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (n * kPageBlock + ln.col(nt, e) >= rowlen[e >> 1]) sacc[nt * 4 + e] = -INFINITY;
          }
        }
      }
      tile_softmax<T>(sacc, st, red, sp, sl2, ln);
      fence_proxy_async();
      __syncthreads();
      tile_pv_issue<T>(st, desc_p, desc_v + buf_desc);
      wgmma_wait<0>();
    }
    cp_async_wait<0>();

    float inv[2], lse[2];
    tile_finish(st, red, p.softmax_scale, nsplit == 1 ? INFINITY : -INFINITY, inv, lse, ln);
    store_dense_rows<T>(p, st, inv, lse, seq, split_base + split, nsplit, row0, hk, hpk, rows_total, ln);
  }
}

template <typename T>
cudaError_t launch_dense_decode(const DenseDecodeParams& p, cudaStream_t stream) {
  return launch_with_smem(dense_decode_kernel<T>, dim3(p.num_sm_parts, p.num_m_blocks, p.h_kv), 256,
                          TileSmem<kDenseDqk>::kBytes, stream, p);
}

}  // namespace sm90
}  // namespace jfm
