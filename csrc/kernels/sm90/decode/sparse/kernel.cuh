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

#include <cuda_fp8.h>

#include <climits>
#include <cmath>

#include "kernels/params.h"
#include "kernels/sm90/decode/tile_attention.cuh"

namespace jfm {
namespace sm90 {

using bf16 = __nv_bfloat16;

// Two e4m3 values (low byte first) times a power-of-two scale, as a packed bf16 pair (exact).
__device__ __forceinline__ uint32_t fp8x2_to_bf16x2(uint32_t two, float scale) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu),
                                                    __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  return pack2<bf16>(f.x * scale, f.y * scale);
}
// Eight e4m3 values (a uint2) -> eight bf16 (a uint4).
__device__ __forceinline__ uint4 fp8x8_to_bf16x8(uint2 v, float scale) {
  return make_uint4(fp8x2_to_bf16x2(v.x, scale), fp8x2_to_bf16x2(v.x >> 16, scale),
                    fp8x2_to_bf16x2(v.y, scale), fp8x2_to_bf16x2(v.y >> 16, scale));
}
__device__ __forceinline__ void st_shared_16(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w));
}
__device__ __forceinline__ void st_shared_8(uint32_t addr, uint2 v) {
  asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(addr), "r"(v.x), "r"(v.y));
}
__device__ __forceinline__ uint4 ld_nc_16(const uint8_t* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ uint2 ld_nc_8(const uint8_t* p) {
  return __ldg(reinterpret_cast<const uint2*>(p));
}

// Position -> (pool, flat row) for one query token, and which tiles hold any counted position.
struct TokenRows {
  const SparseDecodeParams& p;
  int token;        // b * s_q + s
  int len[2];       // counted positions per pool (topk_length applied)
  int tiles0;       // tiles of pool 0's (padded) positions

  __device__ __forceinline__ TokenRows(const SparseDecodeParams& params, int tok)
      : p(params), token(tok) {
    const int b = tok / p.s_q;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const SparsePool& pool = p.pool[k];
      int n = k < p.num_pools ? pool.topk : 0;
      if (k < p.num_pools && pool.topk_length != nullptr) n = min(max(pool.topk_length[b], 0), n);
      len[k] = n;
    }
    tiles0 = sparse_pool0_tiles(p);
  }
  // The first tile at or after n that holds a counted position (or `end`).
  __device__ __forceinline__ int next_live(int n, int end) const {
    if (n < tiles0 && n * kTileTokens >= len[0]) n = tiles0;
    if (n >= tiles0 && (n - tiles0) * kTileTokens >= len[1]) n = end;
    return min(n, end);
  }
  // The raw index at tile n's position t (-1 past the counted positions), as a load issued
  // now and read later: the loop fetches it one tile ahead so no tile waits on an index load.
  __device__ __forceinline__ int index_at(int n, int t) const {
    const int pool_id = n < tiles0 ? 0 : 1;
    const int pos = (n - (pool_id ? tiles0 : 0)) * kTileTokens + t;
    if (pos >= (pool_id ? len[1] : len[0])) return -1;  // (no dynamic index: no local memory)
    const SparsePool& pool = p.pool[pool_id];
    return __ldg(pool.indices + static_cast<int64_t>(token) * pool.topk + pos);
  }
  // The pool of tile n, and the flat row an index names (-1: none, never dereferenced).
  __device__ __forceinline__ int pool_of(int n) const { return n < tiles0 ? 0 : 1; }
  __device__ __forceinline__ int64_t row_of(int index, int pool_id) const {
    const int64_t rows = p.pool[pool_id].num_rows;
    return (index >= 0 && index < rows) ? index : -1;
  }
};

// ---- FP8 tile loaders: registers for one thread's quarter of one token ------------------------
// Thread map: token t = 8 * warp + lane % 8, quarter j = lane / 8 (a quarter-warp store phase is
// 8 consecutive tokens with one j: distinct swizzle slots).
struct Fp8Slot {
  int t, j;
  __device__ __forceinline__ Fp8Slot(int tid) : t(((tid >> 5) << 3) | (tid & 7)), j((tid >> 3) & 3) {}
};

// V3.2: 656-byte tokens (512 e4m3 in 4 tiles of 128 | 4 float32 scales | 64 bf16 RoPE).
struct StageV32 {
  uint4 nope[8];   // 16-byte chunks 4k + j of the NoPE bytes
  uint4 scales;    // the 4 float32 scales
  uint4 rope[2];   // RoPE chunks j and 4 + j
  bool valid;

  __device__ __forceinline__ void fetch(const SparsePool& pool, int64_t row) {
    valid = row >= 0;
    const uint8_t* tok = pool.data + (valid ? row : 0) * 656;
#pragma unroll
    for (int k = 0; k < 8; ++k) nope[k] = valid ? ld_nc_16(tok + 16 * (4 * k + j_)) : make_uint4(0, 0, 0, 0);
    scales = valid ? ld_nc_16(tok + 512) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int k = 0; k < 2; ++k) rope[k] = valid ? ld_nc_16(tok + 528 + 16 * (4 * k + j_)) : make_uint4(0, 0, 0, 0);
  }
  // Dequantize into row t of the swizzled [64 x 576] bf16 tile at `tile`.
  __device__ __forceinline__ void store(uint32_t tile, int t) const {
    using S = TileSmem<576>;
    const float sc[4] = {__uint_as_float(scales.x), __uint_as_float(scales.y),
                         __uint_as_float(scales.z), __uint_as_float(scales.w)};
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int c = 4 * k + j_;            // NoPE chunk: fp8 values [16 c, 16 c + 16)
      const float s = sc[k >> 1];          // tile of 128 values: (16 c) / 128 = k / 2
      st_shared_16(tile + S::chunk_off(t, 2 * c), fp8x8_to_bf16x8(make_uint2(nope[k].x, nope[k].y), s));
      st_shared_16(tile + S::chunk_off(t, 2 * c + 1), fp8x8_to_bf16x8(make_uint2(nope[k].z, nope[k].w), s));
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) st_shared_16(tile + S::chunk_off(t, 64 + 4 * k + j_), rope[k]);
  }
  int j_;
};

// V4: per-block layout; token tt of block blk: 448 e4m3 (7 tiles of 64) + 64 bf16 RoPE at
// blk * bs * 584 + 576 tt, 7 e8m0 scales at blk * bs * 584 + 576 bs + 8 tt. Only 8-byte alignment
// is guaranteed (584 * bs need not be a multiple of 16), so the loads are 8 bytes wide.
struct StageV4 {
  uint2 nope[14];  // 8-byte pieces 4k + j of the NoPE bytes
  uint2 scales;    // 7 e8m0 exponents + pad
  uint2 rope[4];   // RoPE pieces j, 4 + j, 8 + j, 12 + j (4 bf16 each)
  bool valid;
  int j_;

  __device__ __forceinline__ void fetch(const SparsePool& pool, int64_t row) {
    valid = row >= 0;
    const int64_t r = valid ? row : 0;
    const int64_t blk = r / pool.block_size, tt = r - blk * pool.block_size;
    const uint8_t* block = pool.data + blk * pool.block_size * 584;
    const uint8_t* rec = block + 576 * tt;
#pragma unroll
    for (int k = 0; k < 14; ++k) nope[k] = valid ? ld_nc_8(rec + 8 * (4 * k + j_)) : make_uint2(0, 0);
    scales = valid ? ld_nc_8(block + 576 * static_cast<int64_t>(pool.block_size) + 8 * tt) : make_uint2(0, 0);
#pragma unroll
    for (int k = 0; k < 4; ++k) rope[k] = valid ? ld_nc_8(rec + 448 + 8 * (4 * k + j_)) : make_uint2(0, 0);
  }
  __device__ __forceinline__ void store(uint32_t tile, int t) const {
    using S = TileSmem<512>;
#pragma unroll
    for (int k = 0; k < 14; ++k) {
      const int piece = 4 * k + j_;        // fp8 values [8 piece, +8) = bf16 chunk `piece`
      const int tile_idx = k >> 1;         // (8 piece) / 64
      const uint32_t e = ((tile_idx < 4 ? scales.x >> (8 * tile_idx) : scales.y >> (8 * (tile_idx - 4)))) & 0xffu;
      const float s = __uint_as_float(e << 23);  // 2 ** (e - 127)
      st_shared_16(tile + S::chunk_off(t, piece), fp8x8_to_bf16x8(nope[k], s));
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int q = 4 * k + j_;            // bf16 RoPE values [448 + 4 q, +4)
      st_shared_8(tile + S::chunk_off(t, 56 + (q >> 1)) + (q & 1) * 8, rope[k]);
    }
  }
};

template <KvFormat kFmt>
struct Fp8Stage;
template <>
struct Fp8Stage<KvFormat::kFp8V32> { using type = StageV32; };
template <>
struct Fp8Stage<KvFormat::kFp8V4> { using type = StageV4; };

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
  const RowMap map{1, p.s_q, p.h_q, p.h_q};
  const int ntiles = (sparse_positions(p) + kTileTokens - 1) / kTileTokens;
  int begin_seq, begin_tile, end_seq, end_tile, begin_split;
  const bool scheduled = p.tile_scheduler_metadata != nullptr;
  if (scheduled) {
    const int32_t* meta = p.tile_scheduler_metadata + blockIdx.x * kMetaInts;
    begin_seq = meta[0];
    begin_tile = meta[1];
    end_seq = meta[2];
    end_tile = meta[3];
    begin_split = meta[4];
  } else {
    begin_seq = end_seq = blockIdx.x;
    begin_tile = 0;
    end_tile = ntiles;
    begin_split = 0;
  }
  const float sl2 = p.softmax_scale * 1.4426950408889634f;

  const bf16* __restrict__ qg = reinterpret_cast<const bf16*>(p.q);
  const uint32_t sq = base + S::kQOff;
  const uint32_t sk0 = base + S::kKOff;
  const uint32_t sp = base + S::kPOff;
  const int lr = ln.tid >> 3, lq = ln.tid & 7;  // bf16 rows and Q: rows lr, lr + 32; chunks lq + 8 j
  const uint32_t ld_off = static_cast<uint32_t>(lr * 128 + ((lq ^ (lr & 7)) << 4));
  const Fp8Slot slot(ln.tid);
  const uint64_t desc_q = gmma_desc_sw128(sq, 16, 1024);
  const uint64_t desc_k = gmma_desc_sw128(sk0 + ln.wc * 32 * 128, 16, 1024);
  const uint64_t desc_p = gmma_desc_sw128(sp, 16, 1024);
  const uint64_t desc_v = gmma_desc_sw128(sk0 + ln.wc * 4 * S::kBlockBytes, S::kBlockBytes, 1024);

  typename Fp8Stage<kFmt == KvFormat::kBf16 ? KvFormat::kFp8V32 : kFmt>::type stage;
  stage.j_ = slot.j;

  for (int seq = begin_seq; seq <= end_seq; ++seq) {
    const TokenRows rows(p, seq);
    const int t_lo = seq == begin_seq ? begin_tile : 0;
    const int t_hi = seq == end_seq ? min(end_tile, ntiles) : ntiles;
    const int split = seq == begin_seq ? begin_split : 0;
    const int split_base = scheduled ? p.num_splits[seq] : 0;
    const int nsplit = scheduled ? p.num_splits[seq + 1] - split_base : 1;

    __syncthreads();  // the previous sequence is done with every shared buffer

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int head = head0 + lr + 32 * h;
      const bool ok = head < p.h_q;
      const bf16* src = ok ? qg + (static_cast<size_t>(seq) * p.h_q + head) * kDqk + lq * 8 : qg;
#pragma unroll
      for (int j = 0; j < S::kKBlocks; ++j)
        cp_async_16(sq + j * S::kBlockBytes + h * 32 * 128 + ld_off, src + 64 * j, ok ? 16 : 0);
    }
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
      stage.store(sk0 + buf * S::kTileBytes, slot.t);
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

    float inv[2], lse[2];
    tile_finish(st, red, p.softmax_scale, nsplit == 1 ? INFINITY : -INFINITY, inv, lse, ln);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int head = head0 + ln.row(h);
      if (head >= p.h_q) continue;
      if (nsplit == 1) {
        float scale = inv[h];
        if (p.attn_sink != nullptr && isfinite(lse[h])) scale /= 1.f + expf(p.attn_sink[head] - lse[h]);
        store_out_row<bf16>(reinterpret_cast<bf16*>(p.out) + map.out_row(seq, 0, head) * kDv +
                                ln.wc * 256 + 2 * ln.tq, st, h, scale);
        if (ln.wc == 0 && ln.tq == 0) {
          p.lse[map.lse_index(seq, 0, head)] = lse[h];
          if (p.max_logits != nullptr)
            p.max_logits[static_cast<size_t>(seq) * p.h_q + head] =
                st.m[h] == -INFINITY ? -INFINITY : st.m[h] * p.softmax_scale;
        }
      } else {
        const size_t slot_row = static_cast<size_t>(split_base + split) * p.h_q + head;
        store_partial_row(p.o_accum + slot_row * kDv + ln.wc * 256 + 2 * ln.tq, st, h, inv[h]);
        if (ln.wc == 0 && ln.tq == 0) p.lse_accum[slot_row] = lse[h];
      }
    }
  }
}

template <KvFormat kFmt, int kDqk>
cudaError_t launch_sparse_attention(const SparseDecodeParams& p, cudaStream_t stream) {
  using S = TileSmem<kDqk>;
  cudaError_t e = cudaFuncSetAttribute(sparse_attention_kernel<kFmt, kDqk>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(S::kBytes));
  if (e != cudaSuccess) return e;
  const int num_tokens = p.batch * p.s_q;
  dim3 grid(p.tile_scheduler_metadata != nullptr ? p.num_sm_parts : num_tokens, p.num_m_blocks);
  sparse_attention_kernel<kFmt, kDqk><<<grid, 256, S::kBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace jfm
