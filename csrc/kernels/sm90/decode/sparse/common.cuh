// The gather side of the sparse kernels: which rows a query token attends (TokenRows), and the
// FP8 row loaders that fetch one thread's quarter of a token into registers and dequantize it into
// a swizzled bf16 tile (V3.2 and V4 layouts, SEMANTICS.md). Used by the sparse attention kernels
// (kernel.cuh: every thread gathers; kernel_ws.cuh: a producer warpgroup gathers).
#pragma once

#include <cuda_fp8.h>

#include <climits>
#include <cmath>
#include <type_traits>
#include <utility>

#include "kernels/params.h"
#include "kernels/sm90/decode/tile_attention.cuh"

namespace jfm {
namespace sm90 {

using bf16 = __nv_bfloat16;

// JFM_FP8_DEQUANT: how the FP8 producers turn 8 e4m3 values and their power-of-two scale into 8
// bf16 (fp8_dequant_form below). Why: the tile-phase probe and ncu put V3.2 h_q 128 at the
// producer's dequantization (fill = the whole period; 27% of its samples issue conversions and 22%
// stall on their results, seventh and eighth 2026-12-02 sessions).
//   0: e4m3 pair -> half2 (F2FP unpack) -> two floats (HADD2.F32) -> two FMULs -> bf16 pack: 6
//      instructions per pair, two of them conversions.
//   1: as 0, the floats packed first, then one bf16x2 multiply by the scale (5 per pair).
//   -1 (default): form 1 in the role-split kernels' sole producer, form 0 in the transposed
//      kernels' two producers and in the v1 kernels. H200 (ninth 2026-12-02 session): form 1 V3.2
//      h128 b64 -1.7% and -1.9% (two calls), V3.2 h64 -2.0%, V4 h128 -0.8%, V4 h64 -0.6%, but V3.2
//      h16 (kTransposed16) +2.1% and +2.6%.
// Both are exact for power-of-two scales (SEMANTICS.md's quantization); form 1 rounds a
// non-power-of-two float32 scale to bf16 before the product, as upstream's path does.
// Timing probes (wrong results by design: never a default, and the smoke check rejects them, so
// scripts/device_check.sh's abflags stage times entries named probe* without it):
//   2: the producer cost of an fp16 tile: e4m3 pair -> half2 (F2FP unpack), one half2 multiply
//      by the scale: 2 instructions per pair (the bits stored as if bf16).
//   3: no conversion: the two bytes spread into 16-bit lanes (one byte permute per pair): the
//      floor of the producer's dequantization at this load / store shape.
// (Measured and removed, same session: a form without the conversion unit, each bf16 built from
// the e4m3 bits as value * 2^-120 by shifts, masks and byte permutes, then one bf16x2 multiply by
// scale * 2^120: 3.5 integer instructions per pair, +0.4% to +11% against form 0.)
#ifndef JFM_FP8_DEQUANT
#define JFM_FP8_DEQUANT -1
#endif
constexpr int fp8_dequant_form(bool role_split_producer) {
  return JFM_FP8_DEQUANT >= 0 ? JFM_FP8_DEQUANT : role_split_producer ? 1 : 0;
}

// Two bf16 pairs multiplied lane by lane (round to nearest).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
// Two e4m3 values (low byte first) as two floats (exact).
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu),
                                                    __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}
// Two e4m3 values (low byte first) times a power-of-two scale, as a packed bf16 pair (exact).
__device__ __forceinline__ uint32_t fp8x2_to_bf16x2(uint32_t two, float scale) {
  const float2 f = fp8x2_to_float2(two);
  return pack2<bf16>(f.x * scale, f.y * scale);
}
// Eight e4m3 values (a uint2) -> eight bf16 (a uint4), form 0.
__device__ __forceinline__ uint4 fp8x8_to_bf16x8(uint2 v, float scale) {
  return make_uint4(fp8x2_to_bf16x2(v.x, scale), fp8x2_to_bf16x2(v.x >> 16, scale),
                    fp8x2_to_bf16x2(v.y, scale), fp8x2_to_bf16x2(v.y >> 16, scale));
}
// The same in form 1, the scale given as the bf16x2 pair f.
__device__ __forceinline__ uint4 fp8x8_to_bf16x8_mul(uint2 v, uint32_t f) {
  const uint32_t w[4] = {v.x, v.x >> 16, v.y, v.y >> 16};
  uint32_t r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = fp8x2_to_float2(w[i]);
    r[i] = bf16x2_mul(pack2<bf16>(x.x, x.y), f);
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}
// Runs `loop(conv)`, where conv(v, i) dequantizes the eight e4m3 values v of scale tile i (of the
// kTiles scales sc) in form kDequant (JFM_FP8_DEQUANT).
template <int kDequant, int kTiles, class Loop>
__device__ __forceinline__ void with_fp8_dequant(const float (&sc)[kTiles], Loop loop) {
  static_assert(kDequant >= 0 && kDequant <= 3, "JFM_FP8_DEQUANT: -1, 0 or 1 (2, 3: timing probes)");
  if constexpr (kDequant == 0) {
    loop([&](uint2 v, int i) { return fp8x8_to_bf16x8(v, sc[i]); });
  } else if constexpr (kDequant == 2) {  // probe: the fp16 tile's producer cost
    uint32_t f[kTiles];
#pragma unroll
    for (int i = 0; i < kTiles; ++i) f[i] = pack2<__half>(sc[i], sc[i]);
    loop([&](uint2 v, int i) {
      const uint32_t w[4] = {v.x, v.x >> 16, v.y, v.y >> 16};
      uint32_t r[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w[k] & 0xffffu), __NV_E4M3);
        const __half2 m = __hmul2(*reinterpret_cast<const __half2*>(&h), *reinterpret_cast<const __half2*>(&f[i]));
        r[k] = *reinterpret_cast<const uint32_t*>(&m);
      }
      return make_uint4(r[0], r[1], r[2], r[3]);
    });
  } else if constexpr (kDequant == 3) {  // probe: no conversion
    loop([&](uint2 v, int) {
      return make_uint4(__byte_perm(v.x, 0, 0x4140), __byte_perm(v.x, 0, 0x4342),
                        __byte_perm(v.y, 0, 0x4140), __byte_perm(v.y, 0, 0x4342));
    });
  } else {
    uint32_t f[kTiles];
#pragma unroll
    for (int i = 0; i < kTiles; ++i) f[i] = pack2<bf16>(sc[i], sc[i]);
    loop([&](uint2 v, int i) { return fp8x8_to_bf16x8_mul(v, f[i]); });
  }
}
__device__ __forceinline__ void st_shared_16(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w));
}
__device__ __forceinline__ void st_shared_8(uint32_t addr, uint2 v) {
  asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(addr), "r"(v.x), "r"(v.y));
}
// Read-only loads of a gathered row. kHint: keep the lines in L1 (evict_last) and have L2 fetch
// the 256-byte block around a miss, so the other loads of the same token (a V3.2 token spans
// 656 bytes, read in 11 loads per thread) find its bytes in L2 (the warp-specialized FP8
// producers; v1 reads without hints).
// JFM_FP8_PROBE (timing probes, wrong results by design, as JFM_FP8_DEQUANT 2 / 3: abflags
// entries named probe*): bit 0, the FP8 row loads below return their address's bits (no memory
// access: the producer without its gather); bit 1, store_stage folds a row part's tile stores
// into one (the producer without its shared-memory stores); bit 2, store_token_rows skips the
// final output rows (the epilogue without its 64 KB of global stores per CTA); bit 3, they go to
// shared memory instead (the same conversions and shuffles, no global stores).
#ifndef JFM_FP8_PROBE
#define JFM_FP8_PROBE 0
#endif
// The hint's L1 part (evict_last) measured against its alternatives (H100, 2026-12-07 fourth
// session, 10-call spans, 1M-token pools): `L1::no_allocate` +1.4 to +19% (V3.2 h128 b64 92.1 ->
// 109.9 us, V3.2 h64 +17.5%, V4 h128 b128 s_q 2 200.9 -> 236.9, V4 h64 +2.5%, V4 h16 +1.4%), no L1
// priority flat (+0.0 to +0.4%): the lines L1 keeps are worth their allocation.
#define JFM_FP8_LD_HINTED "ld.global.nc.L1::evict_last.L2::256B"
__device__ __forceinline__ uint4 probe_bits(const uint8_t* p) {
  const uint64_t a = reinterpret_cast<uint64_t>(p);
  return make_uint4(static_cast<uint32_t>(a), static_cast<uint32_t>(a >> 32),
                    static_cast<uint32_t>(a) ^ 0x3c3c3c3cu, static_cast<uint32_t>(a) * 3u);
}
template <bool kHint = false>
__device__ __forceinline__ uint4 ld_nc_16(const uint8_t* p) {
  if constexpr ((JFM_FP8_PROBE & 1) != 0) return probe_bits(p);
  if constexpr (kHint) {
    uint4 v;
    asm volatile(JFM_FP8_LD_HINTED ".v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
  } else {
    return __ldg(reinterpret_cast<const uint4*>(p));
  }
}
template <bool kHint = false>
__device__ __forceinline__ uint2 ld_nc_8(const uint8_t* p) {
  if constexpr ((JFM_FP8_PROBE & 1) != 0) {
    const uint4 b = probe_bits(p);
    return make_uint2(b.x, b.z);
  }
  if constexpr (kHint) {
    uint2 v;
    asm volatile(JFM_FP8_LD_HINTED ".v2.u32 {%0, %1}, [%2];\n"
                 : "=r"(v.x), "=r"(v.y)
                 : "l"(p));
    return v;
  } else {
    return __ldg(reinterpret_cast<const uint2*>(p));
  }
}

// JFM_FP8_ROW_BASE's hinted loads (common.cuh's FP8 stages): `pred ? *(base + kOff) : 0` with
// the predicate and the constant offset inside the PTX instruction ([base+kOff]), so ptxas keeps
// one address per row instead of a 64-bit add per load (with a C++ select around ld_nc_*, it
// re-added the row's base to the pool's address before every predicated load).
template <int kOff>
__device__ __forceinline__ uint2 ld_nc_8_if(const uint8_t* base, bool pred) {
  if constexpr ((JFM_FP8_PROBE & 1) != 0) return pred ? ld_nc_8<true>(base + kOff) : make_uint2(0, 0);
  uint2 v = make_uint2(0u, 0u);
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %2, 0;\n"
      "@p " JFM_FP8_LD_HINTED ".v2.u32 {%0, %1}, [%3+%4];\n}\n"
      : "+r"(v.x), "+r"(v.y)
      : "r"(static_cast<int>(pred)), "l"(base), "n"(kOff));
  return v;
}
template <int kOff>
__device__ __forceinline__ uint4 ld_nc_16_if(const uint8_t* base, bool pred) {
  if constexpr ((JFM_FP8_PROBE & 1) != 0) return pred ? ld_nc_16<true>(base + kOff) : make_uint4(0, 0, 0, 0);
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %4, 0;\n"
      "@p " JFM_FP8_LD_HINTED ".v4.u32 {%0, %1, %2, %3}, [%5+%6];\n}\n"
      : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
      : "r"(static_cast<int>(pred)), "l"(base), "n"(kOff));
  return v;
}
// out[k] = pred ? the kBytes-wide piece at base + kFirst + kStride k : 0, for k < sizeof...(K).
template <int kBytes, int kFirst, int kStride, class T, size_t... K>
__device__ __forceinline__ void ld_pieces_if(T* out, const uint8_t* base, bool pred,
                                             std::index_sequence<K...>) {
  if constexpr (kBytes == 8)
    ((out[K] = ld_nc_8_if<kFirst + kStride * static_cast<int>(K)>(base, pred)), ...);
  else
    ((out[K] = ld_nc_16_if<kFirst + kStride * static_cast<int>(K)>(base, pred)), ...);
}

// `pred ? the 16 bytes at shared address addr + kOff : 0` (JFM_FP8_BULK_STAGE's staged rows).
template <int kOff>
__device__ __forceinline__ uint4 ld_shared_16_if(uint32_t addr, bool pred) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %4, 0;\n"
      "@p ld.shared.v4.u32 {%0, %1, %2, %3}, [%5+%6];\n}\n"
      : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
      : "r"(static_cast<int>(pred)), "r"(addr), "n"(kOff));
  return v;
}

// L2 prefetches (JFM_FP8_L2_PREFETCH, kernel_ws.cuh): prefetch_l2_bulk / prefetch_l2
// (device_utils.cuh) and, here, a row's lines.
// Point prefetches of every 128-byte line that [a, a + kBytes) touches, lane `lane` of 4 taking
// every fourth point (consecutive points are at most 128 bytes apart, the last is a + kBytes - 1).
template <int kBytes>
__device__ __forceinline__ void prefetch_l2_lines(const uint8_t* a, int lane) {
  constexpr int kPoints = (kBytes + 127) / 128 + 1;
#pragma unroll
  for (int i = 0; i < kPoints; ++i)
    if ((i & 3) == lane) prefetch_l2(a + (128 * i < kBytes ? 128 * i : kBytes - 1));
}

// JFM_PERSISTENT_UNSCHEDULED (on by default; 0 restores one CTA per query token): without a
// schedule (prefill; decode always has one) the warp-specialized kernels launch at most one CTA
// per SM and row block (sparse_ws_grid), and CTA x takes query tokens x, x + G, x + 2 G, ... of
// the grid's G (whole tokens: no splits, so no combine). A CTA's setup, its first tile's gather
// latency and the gap between one CTA's exit and the next one's start are then paid once per SM
// rather than once per token, and the producers run into the next token's tiles while the math
// finishes the last. Strided, not in runs: with topk_length (or causal -1 indices) a token's work
// grows along the sequence, and the CTAs working at one time hold neighbouring tokens, whose
// top-k selections tend to overlap (rows found in L2). H200: prefill d512 h64 -1.35%; with work
// growing along the sequence (topk_length 1 + i topk / s_q) -3.3%, d576 h128 -2.3%.
#ifndef JFM_PERSISTENT_UNSCHEDULED
#define JFM_PERSISTENT_UNSCHEDULED 1
#endif

// The part of the work one CTA does: its schedule row (decode: a range of (query token, tile)
// of the split-KV schedule, whose "sequences" are the query tokens) or, without a schedule
// (prefill), all tiles of query tokens blockIdx.x + s * gridDim.x, never split. The loops run
// s from begin_seq to end_seq; token(s) is the query token (the identity with a schedule).
struct CtaWork {
  int begin_seq, begin_tile, end_seq, end_tile, begin_split, ntiles;
  int token0, token_stride;
  bool scheduled;
  __device__ __forceinline__ explicit CtaWork(const SparseDecodeParams& p) {
    ntiles = (sparse_positions(p) + kTileTokens - 1) / kTileTokens;
    scheduled = p.tile_scheduler_metadata != nullptr;
    if (scheduled) {
      const ScheduleRow row(p.tile_scheduler_metadata + blockIdx.x * kMetaInts);
      begin_seq = row.begin_seq;
      begin_tile = row.begin_tile;
      end_seq = row.end_seq;
      end_tile = row.end_tile;
      begin_split = row.begin_split;
      token0 = 0;
      token_stride = 1;
    } else {
      // The T query tokens dealt round-robin over the grid's G <= T CTAs (G = T, sparse_grid's
      // launch: one each). 32-bit: s * G <= T.
      const int tokens = p.batch * p.s_q;
      token0 = blockIdx.x;
      token_stride = gridDim.x;
      begin_seq = 0;
      end_seq = (tokens - 1 - token0) / token_stride;
      begin_tile = 0;
      end_tile = ntiles;
      begin_split = 0;
    }
  }
  __device__ __forceinline__ int token(int s) const { return token0 + s * token_stride; }
  // This CTA's tiles [tile_lo, tile_hi) of its s-th sequence, and the split its chunk of it is.
  __device__ __forceinline__ int tile_lo(int seq) const { return seq == begin_seq ? begin_tile : 0; }
  __device__ __forceinline__ int tile_hi(int seq) const {
    return seq == end_seq ? min(end_tile, ntiles) : ntiles;
  }
  __device__ __forceinline__ int split(int seq) const { return seq == begin_seq ? begin_split : 0; }
};

// Grid of a sparse attention launch: schedule rows (decode) or query tokens (prefill) x row blocks.
inline dim3 sparse_grid(const SparseDecodeParams& p) {
  return dim3(p.tile_scheduler_metadata != nullptr ? p.num_sm_parts : p.batch * p.s_q,
              p.num_m_blocks);
}

// The warp-specialized kernels' grid: sparse_grid, or with JFM_PERSISTENT_UNSCHEDULED and no
// schedule at most one CTA per SM and row block (CtaWork then deals each several tokens).
inline dim3 sparse_ws_grid(const SparseDecodeParams& p) {
  dim3 grid = sparse_grid(p);
#if JFM_PERSISTENT_UNSCHEDULED
  if (p.tile_scheduler_metadata == nullptr) {
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess) {
      const unsigned ctas = static_cast<unsigned>(sms > 0 ? sms : 0) / grid.y;
      if (ctas > 0 && grid.x > ctas) grid.x = ctas;
    } else {
      (void)cudaGetLastError();  // failed query: one CTA per token, and no error left behind
    }
  }
#endif
  return grid;
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
// The width of a stage's cp.async copy (emit's copy callback; 16 or 8 bytes, an immediate in PTX).
template <int kBytes>
using CpBytes = std::integral_constant<int, kBytes>;
// Thread map: token t = 8 * warp + lane % 8, quarter j = lane / 8 (a quarter-warp store phase is
// 8 consecutive tokens with one j: distinct swizzle slots).
struct Fp8Slot {
  int t, j;
  __device__ __forceinline__ Fp8Slot(int tid) : t(((tid >> 5) << 3) | (tid & 7)), j((tid >> 3) & 3) {}
  // StageV32R8's map: token t = 4 * warp + lane / 8 (and t + 16), eighth j = lane % 8.
  struct Row8 {};
  __device__ __forceinline__ Fp8Slot(int tid, Row8)
      : t(((tid >> 5) << 2) | ((tid >> 3) & 3)), j(tid & 7) {}
};

// The RoPE bytes' address of a kRopeAsync StageV4T (inside the pool when the row is invalid); an
// empty base otherwise: the register path's stage carries no such member (one, even unused,
// moved the V4 kernels' SASS).
template <bool kRopeAsync>
struct RopeSrc {
  const uint8_t* rope_src;
};
template <>
struct RopeSrc<false> {};

// JFM_FP8_ROW_BASE (default 1; 0 for the earlier form): the FP8 stages' hinted fetch forms this
// thread's first address once and reaches its other 16- / 8-byte pieces at constant offsets from
// it (ld_nc_*_if). The form of 0 writes each piece's offset as one int (16 * (4 k + j)), which
// ptxas cannot split into a register plus an immediate (the 32-bit sum might wrap), so it keeps one
// offset register per piece and adds it to the row's 64-bit address per load: V3.2 kRolesWide's
// 36 row loads, 4 with an immediate offset (32 with 1); V4 pair producer loop 646 -> 612
// instructions. H200 (2026-12-03, seventh session): V4 h_q 128 pair -2.5 to -2.8%, h_q 64
// kRolesWide -1.9%, V3.2 h_q 128 s_q 2 -0.2%. (Its form 2, an unpredicated copy of the loads
// for warps whose rows are all valid, cost the V4 pair 1-2% over 1 and is gone; V3.2 gained 0.8%
// from it: JFM_V32_ALL_VALID below.)
#ifndef JFM_FP8_ROW_BASE
#define JFM_FP8_ROW_BASE 1
#endif
constexpr bool kFp8RowBase = JFM_FP8_ROW_BASE != 0;
// JFM_V32_ALL_VALID (on): StageV32T's row-base fetch also keeps an unpredicated copy of its loads
// for warps whose rows are all valid (the usual case: invalid rows are list tails and padding).
// As the removed JFM_FP8_ROW_BASE=2 but for V3.2 only (the V4 pair lost 1-2% with it), and only in
// kRolesWide's producer (V3.2 h_q <= 64, and 128 under 4 tiles per part: the stage's kAllValid,
// which the producer sets there; the CTA pairs and kTransposed* take the same fetch but were not
// timed with it). Measured (H200, 2026-12-04 fourth session, 1M-token pool, kernel medians of
// 30 calls, each build in its own process): V3.2 h64 b64 s_q 2 102.97 -> 98.91 us (-3.9%),
// s_q 1 57.54 -> 56.86 (-1.2%), b148 topk 16384 796.9 -> 773.1 (-3.0%). ptxas spills 12 bytes
// in kRolesWide with it (outside the producer loop). In every V3.2 producer (=2, removed; 7030333
// has it) it measured +2.9% (pair, h128 b64 s_q 1), +1.6% (s_q 2), +2.9% (kTransposed16) and
// -1.2% (kTransposed32) on the same pools (2026-12-04 fifth session).
#ifndef JFM_V32_ALL_VALID
#define JFM_V32_ALL_VALID 1
#endif
constexpr bool kV32AllValid = JFM_V32_ALL_VALID != 0;

// V3.2: 656-byte tokens (512 e4m3 in 4 tiles of 128 | 4 float32 scales | 64 bf16 RoPE).
// kRopeAsync (JFM_V32_ROPE_ASYNC, kernel_ws.cuh): the RoPE chunks, already bf16, go to the tile
// by cp.async (emit's copy) instead of through registers; the stage keeps their address.
// kDequant: the dequantization's form (JFM_FP8_DEQUANT).
// kNarrow (JFM_V32_PAIR_NARROW, kernel_ws.cuh): the NoPE bytes read 8 at a time, pieces 4k + j
// (k < 16), so each of emit's stores has the 4 threads of a row writing 4 adjacent bf16 chunks
// (two whole 32-byte sectors under the swizzle). Read 16 at a time, thread j holds bf16 chunks
// 2c and 2c + 1 (c = 4k + j) and one store writes chunks 8k + {0, 2, 4, 6}: half of each of 4
// sectors. The V4 CTA pairs, whose stores also go to the peer by st.async, measured +24% with
// that map (PERFORMANCE.md, 2026-12-03 sixth session, item 2).
// kAllValid (JFM_V32_ALL_VALID): the unpredicated copy of the row-base fetch's loads.
template <bool kRopeAsync = false, int kDequant = fp8_dequant_form(false), bool kNarrow = false,
          bool kAllValid = false>
struct StageV32T {
  static constexpr int kNope = kNarrow ? 16 : 8;
  using NopePiece = std::conditional_t<kNarrow, uint2, uint4>;
  NopePiece nope[kNope];  // 16-byte chunks 4k + j of the NoPE bytes (kNarrow: 8-byte pieces 4k + j)
  uint4 scales;    // the 4 float32 scales
  uint4 rope[2];   // RoPE chunks j and 4 + j (!kRopeAsync)
  // RoPE chunk j's address (kRopeAsync; inside the pool when !valid). A plain member, also in the
  // register path's stage: moving it into RopeSrc changed every V3.2 kernel's SASS (2026-12-02,
  // not yet checked on a GPU), where for V4 the member was new and RopeSrc kept the SASS.
  const uint8_t* rope_src;
  bool valid;

  template <bool kHint = false>
  __device__ __forceinline__ void fetch(const SparsePool& pool, int64_t row) {
    valid = row >= 0;
    const uint8_t* tok = pool.data + (valid ? row : 0) * 656;
    if constexpr (kFp8RowBase && kHint) {  // (JFM_FP8_ROW_BASE) one address, constant offsets
      const uint8_t* mine = tok + 16 * j_;
      const auto load = [&](bool pred) {
        if constexpr (kNarrow) ld_pieces_if<8, 0, 32>(nope, tok + 8 * j_, pred, std::make_index_sequence<16>{});
        else ld_pieces_if<16, 0, 64>(nope, mine, pred, std::make_index_sequence<8>{});
        scales = ld_nc_16_if<512>(tok, pred);
        if constexpr (!kRopeAsync) ld_pieces_if<16, 528, 64>(rope, mine, pred, std::make_index_sequence<2>{});
      };
      // (kAllValid) a copy of the loads without a predicate where every active lane's row is
      // valid: no zeroed registers, no predicate setup.
      if (kAllValid && __all_sync(__activemask(), valid))
        load(true);
      else
        load(valid);
      if constexpr (kRopeAsync) rope_src = mine + 528;
    } else {
      if constexpr (kNarrow) {
#pragma unroll
        for (int k = 0; k < 16; ++k) nope[k] = valid ? ld_nc_8<kHint>(tok + 8 * (4 * k + j_)) : make_uint2(0, 0);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) nope[k] = valid ? ld_nc_16<kHint>(tok + 16 * (4 * k + j_)) : make_uint4(0, 0, 0, 0);
      }
      scales = valid ? ld_nc_16<kHint>(tok + 512) : make_uint4(0, 0, 0, 0);
      if constexpr (kRopeAsync) {
        rope_src = tok + 528 + 16 * j_;
      } else {
#pragma unroll
        for (int k = 0; k < 2; ++k)
          rope[k] = valid ? ld_nc_16<kHint>(tok + 528 + 16 * (4 * k + j_)) : make_uint4(0, 0, 0, 0);
      }
    }
  }
  // (JFM_FP8_BULK_STAGE, kernel_ws.cuh) fetch split in two, as StageV4Staged's: locate takes the
  // row's validity and (kRopeAsync) RoPE address, no loads; load_staged its NoPE bytes, scales and (!kRopeAsync)
  // RoPE chunks from shared memory, where a bulk copy has put the row's first kStagedBytes bytes
  // at `src` (16-byte aligned).
  static constexpr uint32_t kStagedBytes = kRopeAsync ? 528 : 656;
  __device__ __forceinline__ void locate(const SparsePool& pool, int64_t row) {
    static_assert(!kNarrow, "JFM_FP8_BULK_STAGE: the 16-byte stage");
    valid = row >= 0;
    if constexpr (kRopeAsync) rope_src = pool.data + (valid ? row : 0) * 656 + 528 + 16 * j_;
  }
  __device__ __forceinline__ void load_staged(uint32_t src) {
    ld_shared_pieces(src + 16 * j_, std::make_index_sequence<8>{});
    scales = ld_shared_16_if<512>(src, valid);
    if constexpr (!kRopeAsync) {
      rope[0] = ld_shared_16_if<528>(src + 16 * j_, valid);
      rope[1] = ld_shared_16_if<528 + 64>(src + 16 * j_, valid);
    }
  }
  template <size_t... K>
  __device__ __forceinline__ void ld_shared_pieces(uint32_t mine, std::index_sequence<K...>) {
    ((nope[K] = ld_shared_16_if<64 * static_cast<int>(K)>(mine, valid)), ...);
  }
  // Asks L2 for row `row`'s 656 bytes (16-byte aligned, 41 x 16) ahead of its fetch: kForm 1
  // one bulk prefetch (by lane 0 of the row's 4), 2 point prefetches of its lines.
  template <int kForm>
  static __device__ __forceinline__ void prefetch(const SparsePool& pool, int64_t row, int lane) {
    if (row < 0) return;
    const uint8_t* tok = pool.data + row * 656;
    if constexpr (kForm == 1) {
      if (lane == 0) prefetch_l2_bulk(tok, 656);
    } else {
      prefetch_l2_lines<656>(tok, lane);
    }
  }
  // The dequantized row part, for row t of the swizzled [64 x 576] bf16 tile, as 16-byte pieces
  // at their tile offsets: put16(offset, value) (store_stage / store_stage_pair below);
  // kRopeAsync: the RoPE chunks as copy(offset, source, bytes, CpBytes<16>) (0 bytes: zero-filled).
  template <class Put16, class Put8, class Copy>
  __device__ __forceinline__ void emit(int t, Put16 put16, Put8, Copy copy) const {
    using S = TileSmem<576>;
    const float sc[4] = {__uint_as_float(scales.x), __uint_as_float(scales.y),
                         __uint_as_float(scales.z), __uint_as_float(scales.w)};
    with_fp8_dequant<kDequant>(sc, [&](auto conv) {
      if constexpr (kNarrow) {
#pragma unroll
        for (int k = 0; k < 16; ++k)  // bf16 chunk 4k + j: fp8 values [8 c, 8 c + 8), scale tile k / 4
          put16(S::chunk_off(t, 4 * k + j_), conv(nope[k], k >> 2));
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int c = 4 * k + j_;  // NoPE chunk: fp8 values [16 c, 16 c + 16), scale tile k / 2
          put16(S::chunk_off(t, 2 * c), conv(make_uint2(nope[k].x, nope[k].y), k >> 1));
          put16(S::chunk_off(t, 2 * c + 1), conv(make_uint2(nope[k].z, nope[k].w), k >> 1));
        }
      }
    });
    if constexpr (kRopeAsync) {
      emit_rope(t, copy);
    } else {
#pragma unroll
      for (int k = 0; k < 2; ++k) put16(S::chunk_off(t, 64 + 4 * k + j_), rope[k]);
    }
  }
  // kRopeAsync: the RoPE chunks of row t (emit's copies).
  template <class Copy>
  __device__ __forceinline__ void emit_rope(int t, Copy copy) const {
    using S = TileSmem<576>;
#pragma unroll
    for (int k = 0; k < 2; ++k)
      copy(S::chunk_off(t, 64 + 4 * k + j_), rope_src + 64 * k, valid ? 16 : 0, CpBytes<16>{});
  }
  // (JFM_FP8_PRECONVERT, kernel_ws.cuh) The row part's 16 dequantized pieces in emit's order,
  // converted ahead of the tile's empty wait (the raw registers die here); emit_converted then
  // stores them without the RoPE copies (the caller issues those first, emit_rope, so they land
  // while the stores issue). Both run emit itself: the second pass's conversions are unused and
  // compile away.
  // (A register-RoPE stage, JFM_FP8_BULK_STAGE=2: its 2 RoPE chunks too, as they are.)
  struct Converted {
    uint4 v[kRopeAsync ? 16 : 18];
  };
  __device__ __forceinline__ void convert(Converted& c) const {
    int i = 0;
    emit(0, [&](uint32_t, uint4 v) { c.v[i++] = v; }, [](uint32_t, uint2) {}, [](auto...) {});
  }
  template <class Put16>
  __device__ __forceinline__ void emit_converted(int t, const Converted& c, Put16 put16) const {
    int i = 0;
    emit(t, [&](uint32_t off, uint4) { put16(off, c.v[i++]); }, [](uint32_t, uint2) {},
         [](auto...) {});
  }
  // Bytes one thread's row part is (what store_stage_pair sends the peer): a quarter of a bf16 row.
  static constexpr uint32_t kThreadBytes = 576 * 2 / 4;
  int j_;
};
using StageV32 = StageV32T<false>;

// V3.2 with eight lanes per token (JFM_V32_ROW8, measured and off: kernel_ws.cuh; the warp-
// specialized producers without CTA pairs): lanes 8 u .. 8 u + 7 of a warp read 128 contiguous
// bytes of one token per load, where the quarter-token map (Fp8Slot) reads 64 bytes of each of 8
// tokens. 656-byte tokens are only 16-byte aligned, so a 64-byte run touches 2.5 32-byte sectors
// on average (ncu, V3.2 h16: 25.2 of 32 bytes per sector used) and a 128-byte run 4.5. A thread
// holds the eighth j of two tokens, rows t and t + 16 of the tile (Fp8Slot's Row8 map: t = 4 warp +
// lane / 8, j = lane % 8). Its stores stay conflict-free: the 8 lanes of a store phase write 8
// chunks of one row, lanes j >= 4 their odd bf16 chunk first (distinct under the XOR swizzle).
struct StageV32R8 {
  static constexpr int kTokens = 2;
  uint4 nope[2][4];  // token i: chunks 8 k + j of its NoPE bytes (scale tile k)
  uint4 scales[2];   // token i's 4 float32 scales
  uint4 rope[2];     // token i's RoPE chunk j
  bool valid[2];
  int j_;

  template <bool kHint = false>
  __device__ __forceinline__ void fetch(const SparsePool& pool, int64_t row0, int64_t row1) {
    const int64_t rows[2] = {row0, row1};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      valid[i] = rows[i] >= 0;
      const uint8_t* tok = pool.data + (valid[i] ? rows[i] : 0) * 656;
#pragma unroll
      for (int k = 0; k < 4; ++k)
        nope[i][k] = valid[i] ? ld_nc_16<kHint>(tok + 16 * (8 * k + j_)) : make_uint4(0, 0, 0, 0);
      scales[i] = valid[i] ? ld_nc_16<kHint>(tok + 512) : make_uint4(0, 0, 0, 0);
      rope[i] = valid[i] ? ld_nc_16<kHint>(tok + 528 + 16 * j_) : make_uint4(0, 0, 0, 0);
    }
  }
  // Rows t and t + 16 of the swizzled [64 x 576] bf16 tile, as StageV32::emit.
  template <class Put16, class Put8, class Copy>
  __device__ __forceinline__ void emit(int t, Put16 put16, Put8, Copy) const {
    using S = TileSmem<576>;
    const int odd_first = j_ >> 2;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = t + 16 * i;
      const float sc[4] = {__uint_as_float(scales[i].x), __uint_as_float(scales[i].y),
                           __uint_as_float(scales[i].z), __uint_as_float(scales[i].w)};
      with_fp8_dequant<fp8_dequant_form(false)>(sc, [&](auto conv) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int c = 8 * k + j_;  // NoPE chunk: fp8 values [16 c, 16 c + 16), scale tile k
          const uint4 lo = conv(make_uint2(nope[i][k].x, nope[i][k].y), k);
          const uint4 hi = conv(make_uint2(nope[i][k].z, nope[i][k].w), k);
          put16(S::chunk_off(row, 2 * c + odd_first), odd_first ? hi : lo);
          put16(S::chunk_off(row, 2 * c + 1 - odd_first), odd_first ? lo : hi);
        }
      });
      put16(S::chunk_off(row, 64 + j_), rope[i]);
    }
  }
  // The validity bytes of this thread's two rows (one lane per token writes them).
  __device__ __forceinline__ void mark_valid(uint8_t* v, int t) const {
    if (j_ == 0) {
      v[t] = valid[0];
      v[t + 16] = valid[1];
    }
  }
};

// The block of flat row `row` (>= 0) of a V4 pool, divided in 32 bits: rows come from int32
// indices (below 2^31), so the 64-bit division's range test and call are not needed (H200, 2026-12-03
// sixth session: V4 h_q 128 pair -1.1 to -3.6%, h_q 64 kRolesWide -2.3%, h_q 16 +0.5%).
__device__ __forceinline__ int64_t v4_block_of(int64_t row, const SparsePool& pool) {
  return static_cast<uint32_t>(row) / static_cast<uint32_t>(pool.block_size);
}

// V4: per-block layout; token tt of block blk: 448 e4m3 (7 tiles of 64) + 64 bf16 RoPE at
// blk * bs * 584 + 576 tt, 7 e8m0 scales at blk * bs * 584 + 576 bs + 8 tt. Only 8-byte alignment
// is guaranteed (584 * bs need not be a multiple of 16), so the loads are 8 bytes wide.
// kRopeAsync (JFM_V4_ROPE_ASYNC, kernel_ws.cuh): as StageV32T's, the RoPE bytes go to the tile by
// cp.async, 16 bytes at a time where the row is read 16 at a time (wide), else 8. kDequant:
// as StageV32T's. kMayLoad16 false: 8-byte reads only, whatever SparsePool::load16 says, so the
// 16-byte path and its runtime selects (piece(), the addresses) are not compiled in
// (JFM_V4_PAIR_NARROW, kernel_ws.cuh).
template <bool kRopeAsync = false, int kDequant = fp8_dequant_form(false), bool kMayLoad16 = true>
struct StageV4T : RopeSrc<kRopeAsync> {
  uint2 nope[14];  // 8-byte pieces of the NoPE bytes: piece(k) (below)
  uint2 scales;    // 7 e8m0 exponents + pad
  uint2 rope[4];   // 8-byte pieces of the RoPE bytes (4 bf16 each): piece(k) (!kRopeAsync)
  bool valid;
  bool wide;       // this row was read 16 bytes at a time (SparsePool::load16)
  int j_;

  // The 8-byte piece register k holds: pieces 4k + j read 8 bytes at a time (each 8-byte run of
  // the 4 threads of a row contiguous), or, 16 at a time, pieces 8 (k / 2) + 2j + k % 2. Either
  // way the piece's scale tile is k / 2 (NoPE: 8 pieces of 8 values per tile of 64).
  __device__ __forceinline__ int piece(int k) const {
    return wide ? 8 * (k >> 1) + 2 * j_ + (k & 1) : 4 * k + j_;
  }

  template <bool kHint = false>
  __device__ __forceinline__ void fetch(const SparsePool& pool, int64_t row) {
    valid = row >= 0;
    if constexpr (kMayLoad16) wide = pool.load16;
    else wide = false;  // a constant: every `wide ?` below folds
    const int64_t r = valid ? row : 0;
    const int64_t blk = v4_block_of(r, pool), tt = r - blk * pool.block_size;
    const uint8_t* block = pool.data + blk * pool.block_size * 584;
    const uint8_t* rec = block + 576 * tt;
    // (JFM_FP8_ROW_BASE) this thread's first piece's address, the others at constant offsets
    const uint8_t* mine = rec + (wide ? 16 : 8) * j_;
    if (wide) {
      if constexpr (kFp8RowBase && kHint) {
        uint4 v[9];  // NoPE pieces 0-6, RoPE 7-8 (!kRopeAsync), 16 bytes each
        ld_pieces_if<16, 0, 64>(v, mine, valid, std::make_index_sequence<7>{});
        if constexpr (!kRopeAsync) ld_pieces_if<16, 448, 64>(v + 7, mine, valid, std::make_index_sequence<2>{});
#pragma unroll
        for (int k = 0; k < 7; ++k) {
          nope[2 * k] = make_uint2(v[k].x, v[k].y);
          nope[2 * k + 1] = make_uint2(v[k].z, v[k].w);
        }
        if constexpr (!kRopeAsync) {
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            rope[2 * k] = make_uint2(v[7 + k].x, v[7 + k].y);
            rope[2 * k + 1] = make_uint2(v[7 + k].z, v[7 + k].w);
          }
        }
      } else {
#pragma unroll
        for (int k = 0; k < 7; ++k) {
          const uint4 v = valid ? ld_nc_16<kHint>(rec + 16 * (4 * k + j_)) : make_uint4(0, 0, 0, 0);
          nope[2 * k] = make_uint2(v.x, v.y);
          nope[2 * k + 1] = make_uint2(v.z, v.w);
        }
        if constexpr (!kRopeAsync) {
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            const uint4 v = valid ? ld_nc_16<kHint>(rec + 448 + 16 * (4 * k + j_)) : make_uint4(0, 0, 0, 0);
            rope[2 * k] = make_uint2(v.x, v.y);
            rope[2 * k + 1] = make_uint2(v.z, v.w);
          }
        }
      }
    } else {
      if constexpr (kFp8RowBase && kHint) {
        ld_pieces_if<8, 0, 32>(nope, mine, valid, std::make_index_sequence<14>{});
        if constexpr (!kRopeAsync) ld_pieces_if<8, 448, 32>(rope, mine, valid, std::make_index_sequence<4>{});
      } else {
#pragma unroll
        for (int k = 0; k < 14; ++k)
          nope[k] = valid ? ld_nc_8<kHint>(rec + 8 * (4 * k + j_)) : make_uint2(0, 0);
        if constexpr (!kRopeAsync) {
#pragma unroll
          for (int k = 0; k < 4; ++k)
            rope[k] = valid ? ld_nc_8<kHint>(rec + 448 + 8 * (4 * k + j_)) : make_uint2(0, 0);
        }
      }
    }
    if constexpr (kRopeAsync) this->rope_src = rec + 448 + (wide ? 16 : 8) * j_;
    scales = valid ? ld_nc_8<kHint>(block + 576 * static_cast<int64_t>(pool.block_size) + 8 * tt) : make_uint2(0, 0);
  }
  // As StageV32T::emit; put8 for the 8-byte RoPE pieces (kRopeAsync: copies of 16 or 8 bytes).
  template <class Put16, class Put8, class Copy>
  __device__ __forceinline__ void emit(int t, Put16 put16, Put8 put8, Copy copy) const {
    using S = TileSmem<512>;
    // First: the copies' address is dead before the dequantization (32 -> 4 bytes of spill).
    if constexpr (kRopeAsync) emit_rope(t, copy);
    // Form 0 keeps its own loop (scales decoded per piece): through with_fp8_dequant, as V3.2's
    // stage does, it moved the transposed V4 kernels' SASS, which the tests ran as it is.
    if constexpr (kDequant == 0) {
#pragma unroll
      for (int k = 0; k < 14; ++k) {
        const int c = piece(k);              // fp8 values [8 c, +8) = bf16 chunk c
        const int tile_idx = k >> 1;         // (8 c) / 64
        const uint32_t e = ((tile_idx < 4 ? scales.x >> (8 * tile_idx) : scales.y >> (8 * (tile_idx - 4)))) & 0xffu;
        const float s = __uint_as_float(e << 23);  // 2 ** (e - 127)
        put16(S::chunk_off(t, c), fp8x8_to_bf16x8(nope[k], s));
      }
    } else {
      float sc[7];  // 2 ** (e - 127) per tile
#pragma unroll
      for (int i = 0; i < 7; ++i) {
        const uint32_t e = (i < 4 ? scales.x >> (8 * i) : scales.y >> (8 * (i - 4))) & 0xffu;
        sc[i] = __uint_as_float(e << 23);
      }
      with_fp8_dequant<kDequant>(sc, [&](auto conv) {
#pragma unroll
        for (int k = 0; k < 14; ++k) put16(S::chunk_off(t, piece(k)), conv(nope[k], k >> 1));
      });
    }
    if constexpr (!kRopeAsync) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int q = piece(k);              // bf16 RoPE values [448 + 4 q, +4)
        put8(S::chunk_off(t, 56 + (q >> 1)) + (q & 1) * 8, rope[k]);
      }
    }
  }
  // kRopeAsync: the RoPE bytes of row t alone, as StageV32T::emit_rope.
  template <class Copy>
  __device__ __forceinline__ void emit_rope(int t, Copy copy) const {
    using S = TileSmem<512>;
    if (wide) {  // RoPE chunks 4 k + j (8 bf16 each) = pieces piece(2 k), piece(2 k + 1)
#pragma unroll
      for (int k = 0; k < 2; ++k)
        copy(S::chunk_off(t, 56 + 4 * k + j_), this->rope_src + 64 * k, valid ? 16 : 0,
             CpBytes<16>{});
    } else {     // RoPE pieces 4 k + j (4 bf16 each)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int q = 4 * k + j_;
        copy(S::chunk_off(t, 56 + (q >> 1)) + (q & 1) * 8, this->rope_src + 32 * k, valid ? 8 : 0,
             CpBytes<8>{});
      }
    }
  }
  static constexpr uint32_t kThreadBytes = 512 * 2 / 4;  // as StageV32T's
};
using StageV4 = StageV4T<false>;

// `pred ? the 8 bytes at shared address addr + kOff : 0` (StageV4Staged).
template <int kOff>
__device__ __forceinline__ uint2 ld_shared_8_if(uint32_t addr, bool pred) {
  uint2 v = make_uint2(0u, 0u);
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %2, 0;\n"
      "@p ld.shared.v2.u32 {%0, %1}, [%3+%4];\n}\n"
      : "+r"(v.x), "+r"(v.y)
      : "r"(static_cast<int>(pred)), "r"(addr), "n"(kOff));
  return v;
}

// (JFM_FP8_BULK_STAGE_V4, kernel_ws.cuh) A V4 stage (8-byte pieces, the RoPE through registers)
// whose record a bulk copy brings to a shared-memory slot: bulk copies need 16-byte aligned
// addresses and sizes, and a record is 8-byte aligned only, so the copy is the record's 16-byte
// aligned cover, copy_bytes from copy_src (576, or 592 from 8 bytes before it: always inside the
// block, which a 16-byte aligned pool starts, and whose scales follow its last record), and the
// record starts `head` (0 or 8) bytes into the slot. The scales stay a global load (8 bytes at
// the block's end). Own members in a derived type: a new StageV4T member, even unused, moved the
// V4 kernels' SASS (RopeSrc above).
// (A StageV4Staged slot: 576 + the 8 bytes before or after a record that starts 8 mod 16.)
constexpr uint32_t kV4SlotBytes = 592;
template <int kDequant>
struct StageV4Staged : StageV4T<false, kDequant, false> {
  using Base = StageV4T<false, kDequant, false>;
  static constexpr uint32_t kSlotBytes = kV4SlotBytes;
  const uint8_t* copy_src;
  const uint8_t* scale_src;
  uint32_t copy_bytes, head;
  // Where row `row`'s record and scales are (no loads).
  __device__ __forceinline__ void locate(const SparsePool& pool, int64_t row) {
    this->valid = row >= 0;
    this->wide = false;
    const int64_t r = this->valid ? row : 0;
    const int64_t blk = v4_block_of(r, pool), tt = r - blk * pool.block_size;
    const uint8_t* block = pool.data + blk * pool.block_size * 584;
    const uint8_t* rec = block + 576 * tt;
    head = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(rec) & 15u);
    copy_src = rec - head;
    copy_bytes = 576 + 2 * head;
    scale_src = block + 576 * static_cast<int64_t>(pool.block_size) + 8 * tt;
  }
  __device__ __forceinline__ void load_scales() { this->scales = ld_nc_8_if<0>(scale_src, this->valid); }
  // The NoPE and RoPE pieces 4 k + j of the record in the slot at `slot` (StageV4T's narrow map).
  __device__ __forceinline__ void load_staged(uint32_t slot) {
    const uint32_t mine = slot + head + 8 * this->j_;
    load_pieces(mine, this->nope, std::make_index_sequence<14>{}, std::integral_constant<int, 0>{});
    load_pieces(mine, this->rope, std::make_index_sequence<4>{}, std::integral_constant<int, 448>{});
  }
  template <size_t... K, int kFirst>
  __device__ __forceinline__ void load_pieces(uint32_t mine, uint2* out, std::index_sequence<K...>,
                                              std::integral_constant<int, kFirst>) {
    ((out[K] = ld_shared_8_if<kFirst + 32 * static_cast<int>(K)>(mine, this->valid)), ...);
  }
};

// A stage's copy callback: cp.async of `bytes` (0: zero-fill) into the tile at `tile` + off.
struct CpAsyncInto {
  uint32_t tile;
  template <class Width>
  __device__ __forceinline__ void operator()(uint32_t off, const uint8_t* src, int bytes, Width) const {
    if constexpr (Width::value == 16) cp_async_16(tile + off, src, bytes);
    else cp_async_8(tile + off, src, bytes);
  }
};

// A stage's pieces into row t of the bf16 tile at `tile`, its RoPE copies by `copy`.
template <class Stage, class Copy>
__device__ __forceinline__ void store_pieces(const Stage& st, uint32_t tile, int t, Copy copy) {
  st.emit(t, [&](uint32_t off, uint4 v) { st_shared_16(tile + off, v); },
          [&](uint32_t off, uint2 v) { st_shared_8(tile + off, v); }, copy);
}
// Dequantizes a stage (StageV32 / StageV4) into row t of the bf16 tile at `tile` (a
// kRopeAsync stage's RoPE chunks by cp.async: the caller's full barrier counts them).
template <class Stage>
__device__ __forceinline__ void store_stage(const Stage& st, uint32_t tile, int t) {
  if constexpr ((JFM_FP8_PROBE & 2) != 0) {  // probe: one store per row part
    uint4 acc = make_uint4(0, 0, 0, 0);
    st.emit(t,
            [&](uint32_t, uint4 v) {
              acc.x ^= v.x;
              acc.y ^= v.y;
              acc.z ^= v.z;
              acc.w ^= v.w;
            },
            [&](uint32_t, uint2 v) {
              acc.x ^= v.x;
              acc.y ^= v.y;
            },
            CpAsyncInto{tile});
    st_shared_16(tile + static_cast<uint32_t>(t) * 16u, acc);
    return;
  }
  store_pieces(st, tile, t, CpAsyncInto{tile});
}
// (JFM_FP8_PRECONVERT) store_stage split for a kRopeAsync V3.2 stage: its RoPE copies alone
// (store_rope), then its other pieces from the registers converted ahead (store_converted) or
// dequantized now (store_nope).
template <class Stage>
__device__ __forceinline__ void store_rope(const Stage& st, uint32_t tile, int t) {
  st.emit_rope(t, CpAsyncInto{tile});
}
template <class Stage>
__device__ __forceinline__ void store_converted(const Stage& st, const typename Stage::Converted& c,
                                                uint32_t tile, int t) {
  st.emit_converted(t, c, [&](uint32_t off, uint4 v) { st_shared_16(tile + off, v); });
}
template <class Stage>
__device__ __forceinline__ void store_nope(const Stage& st, uint32_t tile, int t) {
  store_pieces(st, tile, t, [](auto...) {});
}
// The same into this CTA's tile and, by st.async counted on the peer's barrier `peer_bar`, the
// peer's copy at `peer_tile` (CTA pairs: ws_pipeline.cuh). The pair's stages store their RoPE
// bytes (no cp.async into the peer), so the copy callback is never called here.
template <class Stage>
__device__ __forceinline__ void store_stage_pair(const Stage& st, uint32_t tile, uint32_t peer_tile,
                                                 uint32_t peer_bar, int t) {
  st.emit(t,
          [&](uint32_t off, uint4 v) {
            st_shared_16(tile + off, v);
            st_async_16(peer_tile + off, v, peer_bar);
          },
          [&](uint32_t off, uint2 v) {
            st_shared_8(tile + off, v);
            st_async_8(peer_tile + off, v, peer_bar);
          },
          CpAsyncInto{tile});
}

template <KvFormat kFmt, int kDequant = fp8_dequant_form(false)>
struct Fp8Stage;
template <int kDequant>
struct Fp8Stage<KvFormat::kFp8V32, kDequant> { using type = StageV32T<false, kDequant>; };
template <int kDequant>
struct Fp8Stage<KvFormat::kFp8V4, kDequant> { using type = StageV4T<false, kDequant>; };

// cp.async of query token seq's 64 heads from head0 (heads past h_q zero-filled) into the
// swizzled Q tile at sq, by threads 0 .. kThreads - 1 (load_tile_rows).
// kRows < 64: heads head0 .. + kRows - 1 only, kStride bytes per column block
// (JFM_FP8_BULK_STAGE*: the transposed kernels).
template <int kDqk, int kThreads = 256, int kRows = kBlockM,
          int kStride = TileSmem<kDqk>::kBlockBytes>
__device__ __forceinline__ void load_q_tile(const SparseDecodeParams& p, int seq, int head0,
                                            uint32_t sq) {
  const bf16* __restrict__ qg = reinterpret_cast<const bf16*>(p.q);
  load_tile_rows<bf16, kDqk, kThreads, kRows, kStride>(sq, threadIdx.x, qg, [&](int r) -> const bf16* {
    const int head = head0 + r;
    return head < p.h_q ? qg + (static_cast<size_t>(seq) * p.h_q + head) * kDqk : nullptr;
  });
}

// An unsplit row's output scale: 1 / l, times the sink factor 1 / (1 + exp(sink - lse)).
__device__ __forceinline__ float final_row_scale(const SparseDecodeParams& p, float inv, float lse,
                                                 int head) {
  if (p.attn_sink != nullptr && isfinite(lse)) return inv / (1.f + expf(p.attn_sink[head] - lse));
  return inv;
}
// An unsplit row's lse and (prefill) max_logits, written by one thread of the row.
__device__ __forceinline__ void store_final_row_stats(const SparseDecodeParams& p, const RowMap& map,
                                                      float lse, float m, int seq, int head) {
  p.lse[map.lse_index(seq, 0, head)] = lse;
  if (p.max_logits != nullptr)
    p.max_logits[static_cast<size_t>(seq) * p.h_q + head] =
        m == -INFINITY ? -INFINITY : m * p.softmax_scale;
}

// Stores this thread's rows of the 64 heads from head0 (rows past h_q skipped) after a token's
// last tile, given per row 1 / l, the lse and the largest attended logit m (q . k, unscaled):
// the output (times the sink factor) + lse (+ max_logits, prefill) when the token is not split,
// else the partial row of split slot `slot` for the combine. Warpgroup wc holds
// O[:, 256 wc .. +256].
// kWide: store_out_row's 16-byte stores (JFM_WIDE_OUT_STORES).
template <bool kWide = false>
__device__ __forceinline__ void store_token_rows(const SparseDecodeParams& p, const RowState& st,
                                                 const float (&inv)[2], const float (&lse)[2],
                                                 const float (&m)[2], int seq, int head0, int slot,
                                                 int nsplit, const Lane& ln) {
  const RowMap map{1, p.s_q, p.h_q, p.h_q};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int head = head0 + ln.row(h);
    if (head >= p.h_q) continue;
    if (nsplit == 1) {
      const float scale = final_row_scale(p, inv[h], lse[h], head);
      if constexpr ((JFM_FP8_PROBE & 4) == 0)
        store_out_row<bf16, kWide, (JFM_FP8_PROBE & 8) != 0>(
            reinterpret_cast<bf16*>(p.out) + map.out_row(seq, 0, head) * kDv + ln.wc * 256 + 2 * ln.tq,
            st, h, scale);
      if (ln.wc == 0 && ln.tq == 0) store_final_row_stats(p, map, lse[h], m[h], seq, head);
    } else {
      const size_t slot_row = static_cast<size_t>(slot) * p.h_q + head;
      store_partial_row(p.o_accum + slot_row * kDv + ln.wc * 256 + 2 * ln.tq, st, h, inv[h]);
      if (ln.wc == 0 && ln.tq == 0) p.lse_accum[slot_row] = lse[h];
    }
  }
}

// store_token_rows for a token that is not split, with the output staged in shared memory
// (stage_out_rows into this warpgroup's 64 x 256 region `dst`) for a TMA store instead of
// stored by each thread: the lse (+ max_logits) as there. Padded rows (heads past h_q) are
// staged too (stmatrix takes the whole warp) and never stored (the tensor map ends at h_q).
// kStats false: a warpgroup known at compile time not to be wc 0 (which alone writes the lse),
// without that branch; kFreshLane: stage_out_rows'.
template <bool kStats = true, bool kFreshLane = false>
__device__ __forceinline__ void stage_token_rows(const SparseDecodeParams& p, const RowState& st,
                                                 const float (&inv)[2], const float (&lse)[2],
                                                 const float (&m)[2], int seq, int head0,
                                                 uint32_t dst, const Lane& ln) {
  const RowMap map{1, p.s_q, p.h_q, p.h_q};
  float scale[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int head = head0 + ln.row(h);
    scale[h] = inv[h];
    if (head >= p.h_q) continue;
    scale[h] = final_row_scale(p, inv[h], lse[h], head);
    if (kStats && ln.wc == 0 && ln.tq == 0) store_final_row_stats(p, map, lse[h], m[h], seq, head);
  }
  stage_out_rows<bf16, kFreshLane>(dst, st, scale, ln);
}

// After a token's last tile (kernel.cuh: each warpgroup summed half of every row).
template <typename Sync>
__device__ __forceinline__ void finish_token(const SparseDecodeParams& p, RowState& st, float* red,
                                             int seq, int head0, int slot, int nsplit,
                                             const Lane& ln) {
  float inv[2], lse[2];
  tile_finish<Sync>(st, red, p.softmax_scale, nsplit == 1 ? INFINITY : -INFINITY, inv, lse, ln);
  store_token_rows(p, st, inv, lse, st.m, seq, head0, slot, nsplit, ln);
}

}  // namespace sm90
}  // namespace jfm
