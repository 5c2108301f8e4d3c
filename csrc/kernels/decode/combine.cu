// Split-KV combine (any arch): merges the partial (out, lse) of a sequence's chunks into the final
// result, then applies the attention sink (out *= 1 / (1 + exp(sink[h] - lse)); lse unchanged).
// Sequences with a single chunk were finished by the main kernel and are skipped here.
// Partials merge in a fixed order, so the result is bitwise reproducible.
// Three kernels with the same arithmetic in the same order (bitwise-equal results). The default
// picks one per step (launch_combine): combine_quarter_kernel, a warp per quarter row with eight
// splits in flight, where sequences average 16 splits or more (small batches, long contexts),
// else combine_warp_kernel, one warp per row, 8 rows per CTA, with every split's lse read at once
// and two splits' partial rows in flight (JFM_KERNEL_VARIANT=combine_quarters / combine_rows force
// either); combine_cta_kernel (JFM_KERNEL_VARIANT=combine1, the one before,
// kept for A/B) is one CTA of 128 threads per (sequence, row) walking the splits in serial loops.
// The profiler (2026-12-01, H200) put combine_cta_kernel at 3x upstream's combine on V4 b 256 h 128
// (42 vs 13 us): a grid of b x h_q CTAs, most of which return at once, and serial load chains; the
// warp kernel over the same grid measured 20 us, and its grid is now at most num_sm_parts wide
// (combine_warp_kernel's comment).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/launch.h"
#include "kernels/params.h"
#include "kernels/pdl.cuh"
#include "kernels/variant.h"

namespace jfm {
namespace {

template <typename T>
__device__ __forceinline__ void store4(T* dst, float4 v);
template <>
__device__ __forceinline__ void store4<__nv_bfloat16>(__nv_bfloat16* dst, float4 v) {
  __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
  uint2 u = make_uint2(*reinterpret_cast<uint32_t*>(&a), *reinterpret_cast<uint32_t*>(&b));
  *reinterpret_cast<uint2*>(dst) = u;
}
template <>
__device__ __forceinline__ void store4<__half>(__half* dst, float4 v) {
  __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
  uint2 u = make_uint2(*reinterpret_cast<uint32_t*>(&a), *reinterpret_cast<uint32_t*>(&b));
  *reinterpret_cast<uint2*>(dst) = u;
}

// The CTA's (sequence, row): its partial-result slots [base, base + nsplit), the sequence's rows
// in the workspace, and the query token / head the row is.
struct CombineRow {
  RowMap map;
  int seq, row, base, nsplit, rows, s_local, head;
  __device__ __forceinline__ CombineRow(const CombineParams& p, int seq_, int row_)
      : map{p.tokens_per_seq, p.s_q, p.h_q, p.h_q / p.h_kv}, seq(seq_), row(row_) {
    base = p.num_splits[seq];
    nsplit = p.num_splits[seq + 1] - base;
    rows = map.rows_per_seq();
    const int rows_per_kv = p.tokens_per_seq * map.hpk;
    const int hk = row / rows_per_kv, grow = row % rows_per_kv;
    s_local = grow / map.hpk;
    head = hk * map.hpk + grow % map.hpk;
  }
};

template <typename T>
__global__ void __launch_bounds__(128) combine_cta_kernel(const CombineParams p) {
  static_assert(kDv == 128 * 4, "one float4 per thread");
  const CombineRow c(p, blockIdx.x, blockIdx.y);
  if (c.nsplit <= 1) return;
  const int base = c.base, nsplit = c.nsplit, rows = c.rows, row = c.row, head = c.head;

  float mx = -INFINITY;
  for (int k = 0; k < nsplit; ++k)
    mx = fmaxf(mx, p.lse_accum[static_cast<size_t>(base + k) * rows + row]);
  T* out = reinterpret_cast<T*>(p.out) + c.map.out_row(c.seq, c.s_local, head) * kDv + threadIdx.x * 4;
  float* lse_out = p.lse + c.map.lse_index(c.seq, c.s_local, head);
  if (mx == -INFINITY) {  // nothing attended in any chunk
    store4<T>(out, make_float4(0.f, 0.f, 0.f, 0.f));
    if (threadIdx.x == 0) *lse_out = INFINITY;
    return;
  }
  float sum = 0.f;
  for (int k = 0; k < nsplit; ++k)
    sum += expf(p.lse_accum[static_cast<size_t>(base + k) * rows + row] - mx);
  const float lse = logf(sum) + mx;
  float scale = 1.f / sum;
  if (p.attn_sink != nullptr) scale /= 1.f + expf(p.attn_sink[head] - lse);
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int k = 0; k < nsplit; ++k) {
    const size_t slot_row = static_cast<size_t>(base + k) * rows + row;
    const float w = expf(p.lse_accum[slot_row] - mx) * scale;
    const float4 v = *reinterpret_cast<const float4*>(p.o_accum + slot_row * kDv + threadIdx.x * 4);
    acc.x += w * v.x;
    acc.y += w * v.y;
    acc.z += w * v.z;
    acc.w += w * v.w;
  }
  store4<T>(out, acc);
  if (threadIdx.x == 0) *lse_out = lse;
}

constexpr int kWarpRows = 8;  // rows per CTA of combine_warp_kernel, one warp each

// JFM_COMBINE_EARLY (on; =0 for A/B): the warp combine issues its first two
// splits' partial rows (every split row has at least two) together with the lse loads, instead of
// after the lse max and sum, and the slot-walk grid finds its sequence before pdl_wait instead of
// after it (num_splits is the scheduler's, complete before the attention kernel started). Why:
// after the attention grid ends, each combine CTA ran a chain of ~5 dependent global round trips
// (num_splits search, lse, partial rows) at ~2.7 CTAs per SM slot; dense b128 h128 4K's combine
// tail measured ~16 us against upstream's 12.6 (2026-12-02). The FMAs keep their order, so the
// result stays bitwise equal to combine_cta_kernel's. Measured (H200, 2026-12-02 fifth session,
// profiler span of 10 calls): dense h128 b128 4K 2879 -> 2858 us (-0.7%; the combine 28.3 ->
// 26.8 us), V4 h128 b128 643.7 -> 635.8 (-1.2%), V4 h64 b64 unchanged.
#ifndef JFM_COMBINE_EARLY
#define JFM_COMBINE_EARLY 1
#endif
constexpr bool kCombineEarly = JFM_COMBINE_EARLY != 0;

// The sequence owning extra slot x (warp-collective). A sequence of k chunks owns k - 1 extra
// slots, in sequence order: f(s) = num_splits[s] - s is nondecreasing, f(0) = 0, and sequence s
// owns [f(s), f(s + 1)). A 32-way search keeps f(lo) <= x < f(hi): 2 rounds of loads for 1024
// sequences, 3 for 32K. Any num_splits ends the loop (the range shrinks every round) inside
// [0, num_seqs).
__device__ __forceinline__ int seq_of_extra_slot(const int32_t* num_splits, int num_seqs, int x,
                                                 int lane) {
  int lo = 0, hi = num_seqs;
  while (hi - lo > 1) {
    const int step = (hi - lo + 31) / 32;
    const int probe = lo + lane * step;
    const bool at_or_below = probe < hi && __ldg(num_splits + probe) - probe <= x;
    const unsigned below = __ballot_sync(0xffffffffu, at_or_below);  // lanes 0..last (lane 0: lo)
    if (below != 0u) lo += (31 - __clz(below)) * step;  // (0 only for a num_splits not ours)
    hi = min(lo + step, hi);
  }
  return lo;
}

// The lse lines of both warp merges (combine_row_warp, combine_row_quarter): one arithmetic in
// one order, so their weights are bitwise equal. The max of the row's nsplit split lse, every
// lane holding it (lane l reads splits l, l + 32, ...).
template <class LseAt>
__device__ __forceinline__ float row_lse_max(int nsplit, int lane, LseAt lse_at) {
  float mx = -INFINITY;
  for (int k = lane; k < nsplit; k += 32) mx = fmaxf(mx, lse_at(k));
#pragma unroll
  for (int x = 16; x > 0; x >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
  return mx;
}
// The row's lse and the scale of its weights (the sink applied), from chunk_e(k0): lane l's
// expf(lse_(k0 + l) - mx) (0 past nsplit); the sum runs serially in k through shuffles.
struct RowWeights {
  float lse, scale;
};
template <class ChunkE>
__device__ __forceinline__ RowWeights row_weights(const CombineParams& p, const CombineRow& c,
                                                  int nsplit, float mx, ChunkE chunk_e) {
  float sum = 0.f;
  for (int k0 = 0; k0 < nsplit; k0 += 32) {
    const float e = chunk_e(k0);
    const int n = min(32, nsplit - k0);
    for (int j = 0; j < n; ++j) sum += __shfl_sync(0xffffffffu, e, j);
  }
  const float lse = logf(sum) + mx;
  float scale = 1.f / sum;
  if (p.attn_sink != nullptr) scale /= 1.f + expf(p.attn_sink[c.head] - lse);
  return {lse, scale};
}

// One warp merges row `row` of split sequence `seq`: a lane holds 16 of the row's 512 values
// (float4 columns lane, +32, +64, +96, so each warp load covers 512 contiguous bytes). The lanes
// read 32 splits' lse at once; the max, sum and weights are combine_cta_kernel's arithmetic in its
// order (the sum serial in k through shuffles; weight k = expf(lse_k - max) * scale), and the FMAs
// run in k order, two splits' 8 loads issued before them.
template <typename T>
__device__ __forceinline__ void combine_row_warp(const CombineParams& p, const CombineRow& c, int lane) {
  const int nsplit = c.nsplit, rows = c.rows;
  const float* lse_of = p.lse_accum + static_cast<size_t>(c.base) * rows + c.row;  // split k: [k * rows]
  const auto lse_at = [&](int k) { return lse_of[static_cast<size_t>(k) * rows]; };
  // This lane's columns of split k's partial row.
  const auto o_at = [&](int k) {
    return p.o_accum + ((static_cast<size_t>(c.base) + k) * rows + c.row) * kDv + lane * 4;
  };
  float4 v01[2][4];  // kCombineEarly: splits 0 and 1, loaded before the lse math
  if constexpr (kCombineEarly) {
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int q = 0; q < 4; ++q) v01[s][q] = __ldcs(reinterpret_cast<const float4*>(o_at(s) + 128 * q));
  }

  const float mx = row_lse_max(nsplit, lane, lse_at);
  T* out = reinterpret_cast<T*>(p.out) + c.map.out_row(c.seq, c.s_local, c.head) * kDv + lane * 4;
  float* lse_out = p.lse + c.map.lse_index(c.seq, c.s_local, c.head);
  if (mx == -INFINITY) {  // nothing attended in any chunk
#pragma unroll
    for (int j = 0; j < 4; ++j) store4<T>(out + 128 * j, make_float4(0.f, 0.f, 0.f, 0.f));
    if (lane == 0) *lse_out = INFINITY;
    return;
  }
  // e_k = expf(lse_k - mx), lane k % 32 holding it for the 32 splits of the chunk at hand.
  const auto chunk_e = [&](int k0) { return k0 + lane < nsplit ? expf(lse_at(k0 + lane) - mx) : 0.f; };
  const auto [lse, scale] = row_weights(p, c, nsplit, mx, chunk_e);

  const float* o_of = o_at(0);
  const size_t split_stride = static_cast<size_t>(rows) * kDv;  // one split's partial rows
  float4 acc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
  const auto fma4 = [](float4& a, float w, const float4& v) {
    a.x += w * v.x;
    a.y += w * v.y;
    a.z += w * v.z;
    a.w += w * v.w;
  };
  for (int k0 = 0; k0 < nsplit; k0 += 32) {
    const float e = chunk_e(k0);
    const int n = min(32, nsplit - k0);
    int j = 0;
    if (kCombineEarly && k0 == 0) {  // (nsplit >= 2: the caller merges split rows only)
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const float w = __shfl_sync(0xffffffffu, e, s) * scale;
#pragma unroll
        for (int q = 0; q < 4; ++q) fma4(acc[q], w, v01[s][q]);
      }
      j = 2;
    }
    for (; j + 2 <= n; j += 2) {
      const float* src = o_of + static_cast<size_t>(k0 + j) * split_stride;
      float4 v[2][4];
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int q = 0; q < 4; ++q)
          v[s][q] = __ldcs(reinterpret_cast<const float4*>(src + s * split_stride + 128 * q));
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const float w = __shfl_sync(0xffffffffu, e, j + s) * scale;
#pragma unroll
        for (int q = 0; q < 4; ++q) fma4(acc[q], w, v[s][q]);
      }
    }
    if (j < n) {
      const float* src = o_of + static_cast<size_t>(k0 + j) * split_stride;
      float4 v[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = __ldcs(reinterpret_cast<const float4*>(src + 128 * q));
      const float w = __shfl_sync(0xffffffffu, e, j) * scale;
#pragma unroll
      for (int q = 0; q < 4; ++q) fma4(acc[q], w, v[q]);
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) store4<T>(out + 128 * j, acc[j]);
  if (lane == 0) *lse_out = lse;
}

// combine_quarter_kernel: one warp per (row, quarter of its 512 columns), eight splits' partial
// rows in flight per warp, instead of one warp per row with two in flight. Why: with few split
// sequences the merge is a chain of dependent round trips, not bandwidth: dense b1 h128 s_k 128K
// (64 splits per row, 128 rows, 16 CTAs) ended ~22 us after the attention kernel with the row
// warps (~12 with the quarters), 32 rounds of two splits each; quarters give 4x the warps and 8
// splits per round. Each quarter warp repeats the row's lse max and sum (same arithmetic, so the
// same weights) and sums its columns in k order, so the result stays bitwise equal to
// combine_row_warp's. Measured (H200, tenth 2026-12-02 session, profiler span of 10 calls, quarters
// against row warps; splits per sequence in brackets): dense h128 b1 s_k 128K [64] 90.3 -> 79.1 us
// per call (-12%), h64 b2 32K [64] 52.9 -> 42.2 (-20%), FP8 V3.2 h128 b2 [32] 24.1 -> 18.7 (-22%),
// dense h128 b4 32K [16] 75.7 -> 73.4 (-3%), but b8 16K [8] 74.3 -> 75.5 (+1.6%) and b128 4K [~1]
// 268.8 -> 304.7 (+13%: 4x the CTAs searching the slots and 4x the lse work, with nothing to put in
// flight). So combine_kind takes it where sequences average kQuarterMinSplits splits or more.
constexpr int kQuarterMinSplits = 16;

// One warp merges columns [128 quarter, +128) of row `row`: a lane holds float4 column
// 128 quarter + 4 lane. Weights and their order as combine_row_warp's (the same lse helpers).
template <typename T>
__device__ __forceinline__ void combine_row_quarter(const CombineParams& p, const CombineRow& c,
                                                    int lane, int quarter) {
  constexpr int kQuarterDepth = 8;  // splits in flight per warp
  const int nsplit = c.nsplit, rows = c.rows;
  const float* lse_of = p.lse_accum + static_cast<size_t>(c.base) * rows + c.row;
  const auto lse_at = [&](int k) { return lse_of[static_cast<size_t>(k) * rows]; };
  const size_t split_stride = static_cast<size_t>(rows) * kDv;
  const float* o_of = p.o_accum + (static_cast<size_t>(c.base) * rows + c.row) * kDv + 128 * quarter + 4 * lane;

  const float mx = row_lse_max(nsplit, lane, lse_at);
  T* out = reinterpret_cast<T*>(p.out) + c.map.out_row(c.seq, c.s_local, c.head) * kDv + 128 * quarter + 4 * lane;
  float* lse_out = p.lse + c.map.lse_index(c.seq, c.s_local, c.head);
  if (mx == -INFINITY) {  // nothing attended in any chunk
    store4<T>(out, make_float4(0.f, 0.f, 0.f, 0.f));
    if (lane == 0 && quarter == 0) *lse_out = INFINITY;
    return;
  }
  const auto chunk_e = [&](int k0) { return k0 + lane < nsplit ? expf(lse_at(k0 + lane) - mx) : 0.f; };
  const auto [lse, scale] = row_weights(p, c, nsplit, mx, chunk_e);

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int k0 = 0; k0 < nsplit; k0 += 32) {
    const float e = chunk_e(k0);
    const int n = min(32, nsplit - k0);
    for (int j = 0; j < n; j += kQuarterDepth) {  // (n, j: warp-uniform)
      float4 v[kQuarterDepth];
#pragma unroll
      for (int s = 0; s < kQuarterDepth; ++s)
        if (j + s < n) v[s] = __ldcs(reinterpret_cast<const float4*>(o_of + static_cast<size_t>(k0 + j + s) * split_stride));
#pragma unroll
      for (int s = 0; s < kQuarterDepth; ++s) {
        if (j + s < n) {
          const float w = __shfl_sync(0xffffffffu, e, j + s) * scale;
          acc.x += w * v[s].x;
          acc.y += w * v[s].y;
          acc.z += w * v[s].z;
          acc.w += w * v[s].w;
        }
      }
    }
  }
  store4<T>(out, acc);
  if (lane == 0 && quarter == 0) *lse_out = lse;
}

// Grid (min(num_seqs, num_sm_parts), rows / 8). With more sequences than parts the CTAs stride
// over the step's extra slots (at most ~one each), and the CTA of a split sequence's first extra
// slot merges 8 of its rows, one per warp; otherwise CTA x merges sequence x (striding there made
// b 2 walk ~65 slots with a search each: 5 -> 9 us, H200). Only split
// sequences cost a CTA: a grid of one CTA per (sequence, row block), nearly all returning at once
// on big steps, cost more than the merging (V4 b 256 h 128, profiler: 20 us for ~24 MB).
// (256, 2): with (256) alone ptxas capped the merge at 80 registers and spilled.
template <typename T>
__global__ void __launch_bounds__(32 * kWarpRows, 2) combine_warp_kernel(const CombineParams p) {
  if constexpr (kPdlMain) pdl_launch_dependents();  // (pdl.cuh) the next attention kernel's CTAs
  static_assert(kDv == 32 * 16, "16 values per lane");
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.y * kWarpRows + (threadIdx.x >> 5);
  const int32_t* ns = p.num_splits;
  if (gridDim.x == static_cast<unsigned>(p.num_seqs)) {  // a CTA per sequence: no search (small steps)
    const int seq = blockIdx.x;
    if (ns[seq + 1] - ns[seq] < 2) return;  // unsplit: the attention kernel wrote it
    pdl_wait();  // (pdl.cuh) the attention kernel's partials
    const CombineRow c(p, seq, row);
    if (row < c.rows) combine_row_warp<T>(p, c, lane);
    return;
  }
  const int extra = ns[p.num_seqs] - p.num_seqs;
  if (!kCombineEarly) pdl_wait();
  bool waited = !kCombineEarly;
  for (int x = blockIdx.x; x < extra; x += gridDim.x) {  // (uniform per CTA)
    const int seq = seq_of_extra_slot(ns, p.num_seqs, x, lane);
    if (ns[seq] - seq != x) continue;  // a later extra slot of a sequence: its first one's CTA merges it
    const CombineRow c(p, seq, row);
    if (!waited) {  // kCombineEarly: the search and the row's slots found, now the partials
      pdl_wait();
      waited = true;
    }
    if (row < c.rows) combine_row_warp<T>(p, c, lane);
  }
}

// combine_warp_kernel's grid and walk with two rows per CTA, each row's four quarters on four warps
// (combine_row_quarter). Grid (as combine_warp_kernel's x, rows / 2).
template <typename T>
__global__ void __launch_bounds__(32 * kWarpRows, 2) combine_quarter_kernel(const CombineParams p) {
  if constexpr (kPdlMain) pdl_launch_dependents();  // (pdl.cuh) the next attention kernel's CTAs
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row = blockIdx.y * (kWarpRows / 4) + (warp >> 2), quarter = warp & 3;
  const int32_t* ns = p.num_splits;
  if (gridDim.x == static_cast<unsigned>(p.num_seqs)) {
    const int seq = blockIdx.x;
    if (ns[seq + 1] - ns[seq] < 2) return;
    pdl_wait();
    const CombineRow c(p, seq, row);
    if (row < c.rows) combine_row_quarter<T>(p, c, lane, quarter);
    return;
  }
  const int extra = ns[p.num_seqs] - p.num_seqs;
  bool waited = false;
  for (int x = blockIdx.x; x < extra; x += gridDim.x) {
    const int seq = seq_of_extra_slot(ns, p.num_seqs, x, lane);
    if (ns[seq] - seq != x) continue;
    const CombineRow c(p, seq, row);
    if (!waited) {
      pdl_wait();
      waited = true;
    }
    if (row < c.rows) combine_row_quarter<T>(p, c, lane, quarter);
  }
}

}  // namespace

// A warp combine, launched as the attention kernel's programmatic dependent where kPdl (pdl.cuh).
static cudaError_t launch_warp_combine(void (*kernel)(CombineParams), dim3 grid,
                                       const CombineParams& p, cudaStream_t stream) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = kPdl ? 1 : 0;
  const cudaLaunchConfig_t cfg = launch_config(grid, 32 * kWarpRows, 0, stream, attr, 1);
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

CombineKind combine_kind(const CombineParams& p) {
  const KernelVariant v = kernel_variant();
  if (v == KernelVariant::kCombine1) return CombineKind::kCta;
  if (v == KernelVariant::kCombineQuarters) return CombineKind::kQuarters;
  if (v == KernelVariant::kCombineRows) return CombineKind::kRows;
  // About num_sm_parts + num_seqs chunks in all (each part cuts at most one sequence), so
  // num_sm_parts / num_seqs estimates the splits per sequence.
  const bool many = p.num_sm_parts >= static_cast<int64_t>(kQuarterMinSplits) * p.num_seqs;
  return many ? CombineKind::kQuarters : CombineKind::kRows;
}

template <typename T>
cudaError_t launch_combine(const CombineParams& p, cudaStream_t stream) {
  const CombineKind kind = combine_kind(p);
  if (kind == CombineKind::kCta) {
    const dim3 grid(p.num_seqs, p.tokens_per_seq * p.h_q);
    combine_cta_kernel<T><<<grid, 128, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const int ctas = p.num_sm_parts > 0 && p.num_sm_parts < p.num_seqs ? p.num_sm_parts : p.num_seqs;
  const int rows = p.tokens_per_seq * p.h_q;
  if (kind == CombineKind::kQuarters) {
    constexpr int kRowsPerCta = kWarpRows / 4;
    return launch_warp_combine(combine_quarter_kernel<T>,
                               dim3(ctas, (rows + kRowsPerCta - 1) / kRowsPerCta), p, stream);
  }
  return launch_warp_combine(combine_warp_kernel<T>, dim3(ctas, (rows + kWarpRows - 1) / kWarpRows),
                             p, stream);
}

template cudaError_t launch_combine<__nv_bfloat16>(const CombineParams&, cudaStream_t);
template cudaError_t launch_combine<__half>(const CombineParams&, cudaStream_t);

}  // namespace jfm
