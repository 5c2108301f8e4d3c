// Dense paged MLA decode, split-KV main kernel (v1: tensor cores through mma.sync m16n8k16).
//
// One CTA = one (sm part, 64-row query block, KV head). It walks the (sequence, tile range) list
// the scheduler gave its part. Per sequence: Q [64 x 576] to shared memory once, then KV pages of
// 64 tokens double-buffered with cp.async (rows past the sequence end zero-filled, so NaN in unused
// cache rows never reaches a product), S = Q K^T, online softmax in fp32 (exp2 domain),
// O += P V with V = the first 512 channels of the same K tile.
//
// 8 warps: warp w owns query rows 16*(w%4).. and column half w/4: for S the 32 tokens
// 32*(w/4).., for O the 256 channels 256*(w/4)... Row maxima and sums are exchanged between the two
// halves through shared memory; P goes through shared memory (bf16/fp16) to be the A operand of PV.
// Shared tiles are row-major with 16-byte chunks XOR-swizzled by (row % 8): conflict-free ldmatrix.
#pragma once

#include <cmath>

#include "kernels/common/decode_params.h"
#include "kernels/common/device_utils.cuh"

namespace jfm {

template <typename T>
struct DenseDecodeV1 {
  static constexpr int kThreads = 256;
  static constexpr int kChunksPerRow = kDqk / 8;               // 72 16-byte chunks
  static constexpr int kTileElems = kBlockM * kDqk;            // Q tile and K tile: 64 x 576
  static constexpr int kLoadIters = kBlockM * kChunksPerRow / kThreads;  // 18
  static_assert(kBlockM == kPageBlock, "one KV tile is one page");
  static_assert(kBlockM * kChunksPerRow % kThreads == 0, "even load split");

  struct Smem {
    T q[kTileElems];
    T k[2][kTileElems];
    T p[kBlockM * kPageBlock];
    float red[2][kBlockM];
  };
  static constexpr size_t kSmemBytes = sizeof(Smem);

  static __device__ __forceinline__ int swz(int row, int chunk) {
    return row * kDqk + ((chunk ^ (row & 7)) << 3);
  }
  static __device__ __forceinline__ int swz_p(int row, int chunk) {
    return row * kPageBlock + ((chunk ^ (row & 7)) << 3);
  }
};

template <typename T>
__global__ void __launch_bounds__(256, 1) dense_decode_v1_kernel(const DenseDecodeParams p) {
  using K = DenseDecodeV1<T>;
  using Mma = MmaOp<T>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<typename K::Smem*>(smem_raw);

  const int part = blockIdx.x, mb = blockIdx.y, hk = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wr = warp & 3, wc = warp >> 2;
  const int g = lane >> 2, tq = lane & 3;

  const int hpk = p.h_q / p.h_kv;
  const int rows_total = p.s_q * hpk;
  const int row0 = mb * kBlockM;
  const int valid_rows = min(kBlockM, rows_total - row0);
  const bool warp_active = wr * 16 < valid_rows;

  const int32_t* meta = p.tile_scheduler_metadata + part * kMetaInts;
  const int begin_seq = meta[0], begin_block = meta[1], end_seq = meta[2], end_block = meta[3];
  const int begin_split = meta[4];
  const float sl2 = p.softmax_scale * 1.4426950408889634f;

  const T* __restrict__ qg = reinterpret_cast<const T*>(p.q);
  const T* __restrict__ kvg = reinterpret_cast<const T*>(p.kv);
  const uint32_t sq_base = smem_u32(sm.q);
  const uint32_t sk0 = smem_u32(sm.k[0]);
  constexpr uint32_t kTileBytes = K::kTileElems * sizeof(T);
  const uint32_t sp_base = smem_u32(sm.p);

  for (int seq = begin_seq; seq <= end_seq; ++seq) {
    const int L = p.cache_seqlens[seq];
    // Tiles past the block table's width are never read (as in the reference: t < max_blocks*64).
    const int nb = L > 0 ? min((L + kPageBlock - 1) / kPageBlock, p.max_blocks) : 0;
    const int blk_lo = seq == begin_seq ? begin_block : 0;
    const int blk_hi = seq == end_seq ? min(end_block, nb) : nb;
    const int split = seq == begin_seq ? begin_split : 0;
    const int split_base = p.num_splits[seq];
    const int nsplit = p.num_splits[seq + 1] - split_base;
    const int32_t* bt = p.block_table + static_cast<size_t>(seq) * p.max_blocks;

    __syncthreads();  // the previous sequence is done with every shared buffer

    // Q rows of this block (padding rows zero-filled).
#pragma unroll
    for (int j = 0; j < K::kLoadIters; ++j) {
      const int id = tid + j * K::kThreads;
      const int r = id / K::kChunksPerRow, c = id % K::kChunksPerRow;
      const int grow = row0 + r;
      const bool ok = grow < rows_total;
      const int s = ok ? grow / hpk : 0, hl = ok ? grow % hpk : 0;
      const T* src = qg + ((static_cast<size_t>(seq) * p.s_q + s) * p.h_q + hk * hpk + hl) * kDqk + c * 8;
      cp_async_16(sq_base + K::swz(r, c) * sizeof(T), ok ? src : qg, ok ? 16 : 0);
    }
    auto load_k = [&](int buf, int n) {
      const int blk = bt[n];
      const bool blk_ok = blk >= 0 && blk < p.num_kv_blocks;
      const size_t blk_row = static_cast<size_t>(blk_ok ? blk : 0) * kPageBlock;
#pragma unroll
      for (int j = 0; j < K::kLoadIters; ++j) {
        const int id = tid + j * K::kThreads;
        const int r = id / K::kChunksPerRow, c = id % K::kChunksPerRow;
        const bool ok = blk_ok && (n * kPageBlock + r < L);
        const T* src = kvg + ((blk_row + r) * p.h_kv + hk) * kDqk + c * 8;
        cp_async_16(sk0 + buf * kTileBytes + K::swz(r, c) * sizeof(T), ok ? src : kvg, ok ? 16 : 0);
      }
    };
    if (blk_lo < blk_hi) load_k(0, blk_lo);
    cp_async_commit();

    // Attended length of this thread's two rows (g and g + 8 of the warp's 16).
    int rowlen[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int grow = row0 + wr * 16 + g + 8 * h;
      const int s = grow / hpk;
      rowlen[h] = p.causal ? L - p.s_q + s + 1 : L;
    }
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};
    float o[32][4];
#pragma unroll
    for (int i = 0; i < 32; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

    for (int n = blk_lo; n < blk_hi; ++n) {
      const int buf = (n - blk_lo) & 1;
      cp_async_wait<0>();
      __syncthreads();
      if (n + 1 < blk_hi) load_k(buf ^ 1, n + 1);
      cp_async_commit();

      float sacc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.f;
      if (warp_active) {
        const int a_row = wr * 16 + (lane & 15);
        const int mi = lane >> 3;
        const int b_tok = wc * 32 + (mi >> 1) * 8 + (lane & 7);
#pragma unroll 4
        for (int kk = 0; kk < kDqk / 16; ++kk) {
          uint32_t a[4];
          ldsm_x4(sq_base + K::swz(a_row, kk * 2 + (lane >> 4)) * sizeof(T), a[0], a[1], a[2], a[3]);
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            uint32_t b0, b1, b2, b3;
            ldsm_x4(sk0 + buf * kTileBytes + K::swz(b_tok + np * 16, kk * 2 + (mi & 1)) * sizeof(T), b0, b1, b2, b3);
            Mma::run(sacc[2 * np], a, b0, b1);
            Mma::run(sacc[2 * np + 1], a, b2, b3);
          }
        }
      }
      // Mask and row maxima of this half.
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = n * kPageBlock + wc * 32 + nt * 8 + 2 * tq + (e & 1);
          if (tok >= rowlen[e >> 1]) sacc[nt][e] = -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], sacc[nt][e]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      }
      if (tq == 0) {
        sm.red[wc][wr * 16 + g] = mx[0];
        sm.red[wc][wr * 16 + g + 8] = mx[1];
      }
      __syncthreads();
      float corr[2], mscaled[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float other = sm.red[wc ^ 1][wr * 16 + g + 8 * h];
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
          pv[e] = exp2f(sacc[nt][e] * sl2 - mscaled[e >> 1]);
          l_run[e >> 1] += pv[e];
        }
        const int col = wc * 32 + nt * 8 + 2 * tq;
        const int r0 = wr * 16 + g;
        *reinterpret_cast<uint32_t*>(&sm.p[K::swz_p(r0, col >> 3) + (col & 7)]) = Mma::pack(pv[0], pv[1]);
        *reinterpret_cast<uint32_t*>(&sm.p[K::swz_p(r0 + 8, col >> 3) + (col & 7)]) = Mma::pack(pv[2], pv[3]);
      }
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        o[i][0] *= corr[0];
        o[i][1] *= corr[0];
        o[i][2] *= corr[1];
        o[i][3] *= corr[1];
      }
      __syncthreads();
      if (warp_active) {
        const int a_row = wr * 16 + (lane & 15);
        const int mi = lane >> 3;
#pragma unroll
        for (int kk = 0; kk < kPageBlock / 16; ++kk) {
          uint32_t a[4];
          ldsm_x4(sp_base + K::swz_p(a_row, kk * 2 + (lane >> 4)) * sizeof(T), a[0], a[1], a[2], a[3]);
          const int v_tok = kk * 16 + (mi & 1) * 8 + (lane & 7);
#pragma unroll
          for (int np = 0; np < 16; ++np) {
            const int chunk = wc * 32 + np * 2 + (mi >> 1);
            uint32_t b0, b1, b2, b3;
            ldsm_x4_t(sk0 + buf * kTileBytes + K::swz(v_tok, chunk) * sizeof(T), b0, b1, b2, b3);
            Mma::run(o[2 * np], a, b0, b1);
            Mma::run(o[2 * np + 1], a, b2, b3);
          }
        }
      }
    }
    cp_async_wait<0>();

    // Row sums: across the quad, then across the two column halves.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    }
    __syncthreads();
    if (tq == 0) {
      sm.red[wc][wr * 16 + g] = l_run[0];
      sm.red[wc][wr * 16 + g + 8] = l_run[1];
    }
    __syncthreads();
    if (!warp_active) continue;
    float inv[2], lse[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float l = sm.red[0][wr * 16 + g + 8 * h] + sm.red[1][wr * 16 + g + 8 * h];
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
          *reinterpret_cast<uint32_t*>(out + i * 8) = Mma::pack(o[i][2 * h] * inv[h], o[i][2 * h + 1] * inv[h]);
        if (wc == 0 && tq == 0) p.lse[(static_cast<size_t>(seq) * p.h_q + head) * p.s_q + s] = lse[h];
      } else {
        const size_t slot_row =
            (static_cast<size_t>(split_base + split) * p.h_kv + hk) * rows_total + grow;
        float* oa = p.o_accum + slot_row * kDv + wc * 256 + 2 * tq;
#pragma unroll
        for (int i = 0; i < 32; ++i)
          *reinterpret_cast<float2*>(oa + i * 8) = make_float2(o[i][2 * h] * inv[h], o[i][2 * h + 1] * inv[h]);
        if (wc == 0 && tq == 0) p.lse_accum[slot_row] = lse[h];
      }
    }
  }
}

template <typename T>
cudaError_t launch_dense_decode_v1(const DenseDecodeParams& p, cudaStream_t stream) {
  using K = DenseDecodeV1<T>;
  cudaError_t e = cudaFuncSetAttribute(dense_decode_v1_kernel<T>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(K::kSmemBytes));
  if (e != cudaSuccess) return e;
  dim3 grid(p.num_sm_parts, p.num_m_blocks, p.h_kv);
  dense_decode_v1_kernel<T><<<grid, K::kThreads, K::kSmemBytes, stream>>>(p);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  return launch_dense_combine<T>(p, stream);
}

}  // namespace jfm
