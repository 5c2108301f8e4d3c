// Dense paged MLA decode, split-KV main kernel, v2: both matmuls on Hopper wgmma (sm_90a).
//
// Same schedule, masking, online softmax and epilogue as v1 (mma.sync; in git history at commit
// bab780f, removed once v2 beat it on every case); what changed is where the matmuls run and how
// shared memory is laid out:
//  * Q [64 x 576], each KV tile [64 x 576] and P [64 x 64] are stored as 64-column blocks of
//    [64 rows x 128 B] with the 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r % 8)),
//    every block 1024-byte aligned: the canonical layout wgmma reads through descriptors.
//  * Two warpgroups. Warpgroup w computes S[:, 32w:32w+32] = Q K^T with 36 wgmma m64n32k16
//    (A = Q, B = K, both K-major), and O[:, 256w:256w+256] += P V with 4 wgmma m64n256k16
//    (A = P K-major, B = V read from the same K tile as an MN-major operand).
//  * Accumulator fragments have the mma.sync C layout per 8 columns, so the softmax and the
//    epilogue are v1's: warp w%4 of a warpgroup owns rows 16(w%4).., thread rows g and g+8.
// Generic-proxy writes (cp.async, st.shared of P) are fenced (fence.proxy.async) before the
// barrier that precedes the wgmma reading them.
#pragma once

#include <cmath>

#include "kernels/common/decode_params.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/common/wgmma_ops.cuh"

namespace jfm {

template <typename T>
struct DenseDecodeV2 {
  static constexpr int kThreads = 256;
  static constexpr int kChunksPerRow = kDqk / 8;                         // 72 16-byte chunks
  static constexpr int kKBlocks = kDqk / 64;                              // 9 column blocks
  static constexpr int kBlockBytes = kBlockM * 128;                       // 8192: one column block
  static constexpr int kTileBytes = kKBlocks * kBlockBytes;               // 73728
  static constexpr int kLoadRows = kBlockM * 8 / kThreads;               // 2 rows per thread
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kTileBytes;                                // 2 tiles
  static constexpr int kPOff = 3 * kTileBytes;                            // 8192
  static constexpr int kRedOff = kPOff + kBlockBytes;                     // float[2][64]
  static constexpr size_t kSmemBytes = kRedOff + 2 * kBlockM * sizeof(float) + 1024;  // + align
  static_assert(sizeof(T) == 2, "16-bit types");
  static_assert(kLoadRows * 32 == kBlockM && kBlockM == kPageBlock, "loader: rows lr, lr + 32");

  // Byte offset of 16-byte chunk c (0..71) of row r inside a swizzled [64 x 576] tile.
  static __device__ __forceinline__ uint32_t tile_off(int r, int c) {
    return (c >> 3) * kBlockBytes + r * 128 + (((c & 7) ^ (r & 7)) << 4);
  }
};

template <typename T>
__global__ void __launch_bounds__(256, 1) dense_decode_v2_kernel(const DenseDecodeParams p) {
  using K = DenseDecodeV2<T>;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_base = smem_u32(smem_raw);
  const uint32_t base = (raw_base + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw_base);
  float* red = reinterpret_cast<float*>(smem + K::kRedOff);  // [2][64]

  const int part = blockIdx.x, mb = blockIdx.y, hk = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wr = warp & 3, wc = warp >> 2;  // wc = warpgroup
  const int g = lane >> 2, tq = lane & 3;

  const int hpk = p.h_q / p.h_kv;
  const int rows_total = p.s_q * hpk;
  const int row0 = mb * kBlockM;

  const int32_t* meta = p.tile_scheduler_metadata + part * kMetaInts;
  const int begin_seq = meta[0], begin_block = meta[1], end_seq = meta[2], end_block = meta[3];
  const int begin_split = meta[4];
  const float sl2 = p.softmax_scale * 1.4426950408889634f;

  const T* __restrict__ qg = reinterpret_cast<const T*>(p.q);
  const T* __restrict__ kvg = reinterpret_cast<const T*>(p.kv);
  const uint32_t sq = base + K::kQOff;
  const uint32_t sk0 = base + K::kKOff;
  const uint32_t sp = base + K::kPOff;
  // Loader mapping: 8 threads per row, so each copy instruction reads whole 128-byte lines (a
  // warp: 4 rows x 128 B). Thread copies rows lr + 32 h (h < kLoadRows), 16-byte chunks lq + 8 j
  // (j = 0..8): chunk lq + 8j is in-block chunk lq of column block j, one swizzled offset for all
  // (rows lr and lr + 32 share r % 8).
  const int lr = tid >> 3, lq = tid & 7;
  const uint32_t ld_off = static_cast<uint32_t>(lr * 128 + ((lq ^ (lr & 7)) << 4));
  // wgmma descriptors of the buffers' starts; advancing = adding (byte offset >> 4).
  const uint64_t desc_q = gmma_desc_sw128(sq, 16, 1024);
  const uint64_t desc_k = gmma_desc_sw128(sk0 + wc * 32 * 128, 16, 1024);
  const uint64_t desc_p = gmma_desc_sw128(sp, 16, 1024);
  const uint64_t desc_v = gmma_desc_sw128(sk0 + wc * 4 * K::kBlockBytes, K::kBlockBytes, 1024);

  for (int seq = begin_seq; seq <= end_seq; ++seq) {
    const int L = p.cache_seqlens[seq];
    const int nb = L > 0 ? min((L + kPageBlock - 1) / kPageBlock, p.max_blocks) : 0;
    const int blk_lo = seq == begin_seq ? begin_block : 0;
    const int blk_hi = seq == end_seq ? min(end_block, nb) : nb;
    const int split = seq == begin_seq ? begin_split : 0;
    const int split_base = p.num_splits[seq];
    const int nsplit = p.num_splits[seq + 1] - split_base;
    const int32_t* bt = p.block_table + static_cast<size_t>(seq) * p.max_blocks;

    __syncthreads();  // the previous sequence is done with every shared buffer

#pragma unroll
    for (int h = 0; h < K::kLoadRows; ++h) {
      const int grow = row0 + lr + 32 * h;
      const bool ok = grow < rows_total;
      const int s = ok ? grow / hpk : 0, hl = ok ? grow % hpk : 0;
      const T* src = ok ? qg + ((static_cast<size_t>(seq) * p.s_q + s) * p.h_q + hk * hpk + hl) * kDqk + lq * 8
                        : qg;
      const int bytes = ok ? 16 : 0;
#pragma unroll
      for (int j = 0; j < K::kKBlocks; ++j)
        cp_async_16(sq + j * K::kBlockBytes + h * 32 * 128 + ld_off, src + 64 * j, bytes);
    }
    auto load_k = [&](int buf, int n) {
      const int blk = bt[n];
      const bool blk_ok = blk >= 0 && blk < p.num_kv_blocks;
      const uint32_t dst = sk0 + buf * K::kTileBytes + ld_off;
#pragma unroll
      for (int h = 0; h < K::kLoadRows; ++h) {
        const int r = lr + 32 * h;
        const bool ok = blk_ok && (n * kPageBlock + r < L);
        const size_t row = static_cast<size_t>(blk_ok ? blk : 0) * kPageBlock + r;
        const T* src = ok ? kvg + (row * p.h_kv + hk) * kDqk + lq * 8 : kvg;
        const int bytes = ok ? 16 : 0;
#pragma unroll
        for (int j = 0; j < K::kKBlocks; ++j)
          cp_async_16(dst + j * K::kBlockBytes + h * 32 * 128, src + 64 * j, bytes);
      }
    };
    if (blk_lo < blk_hi) load_k(0, blk_lo);
    cp_async_commit();

    int rowlen[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int s = (row0 + wr * 16 + g + 8 * h) / hpk;
      rowlen[h] = p.causal ? L - p.s_q + s + 1 : L;
    }
    const int min_len = p.causal ? L - p.s_q + 1 : L;  // the shortest window of any real row
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;

    for (int n = blk_lo; n < blk_hi; ++n) {
      const int buf = (n - blk_lo) & 1;
      cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();
      if (n + 1 < blk_hi) load_k(buf ^ 1, n + 1);
      cp_async_commit();
      const uint32_t buf_desc = buf * (K::kTileBytes >> 4);

      // S[:, 32 wc .. +32] = Q K^T over 36 k-steps of 16.
      float sacc[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) sacc[i] = 0.f;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDqk / 16; ++kk) {
        const uint32_t koff = ((kk >> 2) * K::kBlockBytes + (kk & 3) * 32) >> 4;
        wgmma_m64n32k16_ss<T>(sacc, desc_q + koff, desc_k + buf_desc + koff);
      }
      wgmma_commit();
      wgmma_wait<0>();

      float mx[2] = {-INFINITY, -INFINITY};
      if ((n + 1) * kPageBlock > min_len) {  // CTA-uniform: some row's window ends in this tile
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int tok = n * kPageBlock + wc * 32 + nt * 8 + 2 * tq + (e & 1);
            if (tok >= rowlen[e >> 1]) sacc[nt * 4 + e] = -INFINITY;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < 16; ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], sacc[i]);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      }
      if (tq == 0) {
        red[wc * kBlockM + wr * 16 + g] = mx[0];
        red[wc * kBlockM + wr * 16 + g + 8] = mx[1];
      }
      __syncthreads();
      float corr[2], mscaled[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float other = red[(wc ^ 1) * kBlockM + wr * 16 + g + 8 * h];
        const float m_new = fmaxf(m_run[h], fmaxf(mx[h], other));
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        corr[h] = exp2f((m_run[h] - m_use) * sl2);
        mscaled[h] = m_use * sl2;
        m_run[h] = m_new;
        l_run[h] *= corr[h];
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        float pv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          pv[e] = exp2f(sacc[nt * 4 + e] * sl2 - mscaled[e >> 1]);
          l_run[e >> 1] += pv[e];
        }
        const int col = wc * 32 + nt * 8 + 2 * tq;  // token within the tile
        const int r0 = wr * 16 + g;
        const uint32_t a0 = sp + r0 * 128 + ((((col >> 3) ^ (r0 & 7))) << 4) + (col & 7) * 2;
        const uint32_t a1 = sp + (r0 + 8) * 128 + ((((col >> 3) ^ ((r0 + 8) & 7))) << 4) + (col & 7) * 2;
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a0), "r"(pack2<T>(pv[0], pv[1])));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a1), "r"(pack2<T>(pv[2], pv[3])));
      }
      if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          o[4 * i + 0] *= corr[0];
          o[4 * i + 1] *= corr[0];
          o[4 * i + 2] *= corr[1];
          o[4 * i + 3] *= corr[1];
        }
      }
      fence_proxy_async();
      __syncthreads();
      // O[:, 256 wc .. +256] += P V over the tile's 64 tokens (4 k-steps of 16).
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kPageBlock / 16; ++kk) {
        wgmma_m64n256k16_ss_tb<T>(o, desc_p + ((kk * 32) >> 4),
                                  desc_v + buf_desc + ((kk * 16 * 128) >> 4));
      }
      wgmma_commit();
      wgmma_wait<0>();
    }
    cp_async_wait<0>();

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    }
    __syncthreads();
    if (tq == 0) {
      red[wc * kBlockM + wr * 16 + g] = l_run[0];
      red[wc * kBlockM + wr * 16 + g + 8] = l_run[1];
    }
    __syncthreads();
    float inv[2], lse[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float l = red[wr * 16 + g + 8 * h] + red[kBlockM + wr * 16 + g + 8 * h];
      const bool empty = !(l > 0.f);
      inv[h] = empty ? 0.f : 1.f / l;
      lse[h] = empty ? (nsplit == 1 ? INFINITY : -INFINITY) : logf(l) + m_run[h] * p.softmax_scale;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int grow = row0 + wr * 16 + g + 8 * h;
      if (grow >= rows_total) continue;
      const int s = grow / hpk, hl = grow % hpk;
      const int head = hk * hpk + hl;
      if (nsplit == 1) {
        T* out = reinterpret_cast<T*>(p.out) +
                 ((static_cast<size_t>(seq) * p.s_q + s) * p.h_q + head) * kDv + wc * 256 + 2 * tq;
#pragma unroll
        for (int i = 0; i < 32; ++i)
          *reinterpret_cast<uint32_t*>(out + i * 8) =
              pack2<T>(o[4 * i + 2 * h] * inv[h], o[4 * i + 2 * h + 1] * inv[h]);
        if (wc == 0 && tq == 0) p.lse[(static_cast<size_t>(seq) * p.h_q + head) * p.s_q + s] = lse[h];
      } else {
        const size_t slot_row =
            (static_cast<size_t>(split_base + split) * p.h_kv + hk) * rows_total + grow;
        float* oa = p.o_accum + slot_row * kDv + wc * 256 + 2 * tq;
#pragma unroll
        for (int i = 0; i < 32; ++i)
          *reinterpret_cast<float2*>(oa + i * 8) =
              make_float2(o[4 * i + 2 * h] * inv[h], o[4 * i + 2 * h + 1] * inv[h]);
        if (wc == 0 && tq == 0) p.lse_accum[slot_row] = lse[h];
      }
    }
  }
}

template <typename T>
cudaError_t launch_dense_decode_v2(const DenseDecodeParams& p, cudaStream_t stream) {
  using K = DenseDecodeV2<T>;
  cudaError_t e = cudaFuncSetAttribute(dense_decode_v2_kernel<T>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(K::kSmemBytes));
  if (e != cudaSuccess) return e;
  dim3 grid(p.num_sm_parts, p.num_m_blocks, p.h_kv);
  dense_decode_v2_kernel<T><<<grid, K::kThreads, K::kSmemBytes, stream>>>(p);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  return launch_dense_combine<T>(p, stream);
}

}  // namespace jfm
