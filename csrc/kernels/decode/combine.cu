// Split-KV combine (any arch): merges the partial (out, lse) of a sequence's chunks into the final
// result, then applies the attention sink (out *= 1 / (1 + exp(sink[h] - lse)); lse unchanged).
// Sequences with a single chunk were finished by the main kernel and are skipped here.
// One CTA of 128 threads per (sequence, row); partials merge in a fixed order, so the result is
// bitwise reproducible.
// Two kernels with the same arithmetic in the same order (bitwise-equal results): combine_kernel
// (the default) walks the splits three times in serial loops; combine_wide_kernel
// (JFM_KERNEL_VARIANT=combine2, not yet measured) reads every split's lse at once (one per lane of
// warp 0), shares the weights through shared memory and keeps 8 partial rows' loads in flight per
// thread: the loop's load latency, not the bytes, bounded the small steps (profiler, b 2: 4.4 us
// for 2.6 MB of partials).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/params.h"
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
  __device__ __forceinline__ explicit CombineRow(const CombineParams& p)
      : map{p.tokens_per_seq, p.s_q, p.h_q, p.h_q / p.h_kv}, seq(blockIdx.x), row(blockIdx.y) {
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
__global__ void __launch_bounds__(128) combine_kernel(const CombineParams p) {
  static_assert(kDv == 128 * 4, "one float4 per thread");
  const CombineRow c(p);
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

constexpr int kWideChunk = 128;  // splits whose weights share memory holds at once
constexpr int kWideLoads = 8;    // partial rows in flight per thread

template <typename T>
__global__ void __launch_bounds__(128, 1) combine_wide_kernel(const CombineParams p) {
  static_assert(kDv == 128 * 4, "one float4 per thread");
  __shared__ float weight[kWideChunk];
  __shared__ float row_lse;
  const CombineRow c(p);
  if (c.nsplit <= 1) return;
  const int base = c.base, nsplit = c.nsplit, rows = c.rows, row = c.row, head = c.head;
  const float* lse_of = p.lse_accum + static_cast<size_t>(base) * rows + row;  // split k: [k * rows]
  const int lane = threadIdx.x & 31;
  const bool stats = threadIdx.x < 32;  // warp 0 computes the weights

  // Warp 0: the max and the sum over the splits, in the default kernel's order (serial sum in k),
  // the lanes reading the lse values 32 at a time.
  float mx = -INFINITY, sum = 0.f, scale = 0.f;
  if (stats) {
    for (int k = lane; k < nsplit; k += 32) mx = fmaxf(mx, lse_of[static_cast<size_t>(k) * rows]);
#pragma unroll
    for (int x = 16; x > 0; x >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
    if (mx != -INFINITY) {
      for (int k0 = 0; k0 < nsplit; k0 += 32) {
        const float e = k0 + lane < nsplit ? expf(lse_of[static_cast<size_t>(k0 + lane) * rows] - mx) : 0.f;
        const int n = min(32, nsplit - k0);
        for (int j = 0; j < n; ++j) sum += __shfl_sync(0xffffffffu, e, j);
      }
      const float lse = logf(sum) + mx;
      scale = 1.f / sum;
      if (p.attn_sink != nullptr) scale /= 1.f + expf(p.attn_sink[head] - lse);
      if (lane == 0) row_lse = lse;
    } else if (lane == 0) {
      row_lse = INFINITY;  // nothing attended in any chunk
    }
  }
  T* out = reinterpret_cast<T*>(p.out) + c.map.out_row(c.seq, c.s_local, head) * kDv + threadIdx.x * 4;
  float* lse_out = p.lse + c.map.lse_index(c.seq, c.s_local, head);
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  const float* o_of = p.o_accum + (static_cast<size_t>(base) * rows + row) * kDv + threadIdx.x * 4;
  const size_t split_stride = static_cast<size_t>(rows) * kDv;  // one split's partial rows
  for (int c0 = 0; c0 < nsplit; c0 += kWideChunk) {
    const int n = min(kWideChunk, nsplit - c0);
    if (stats && mx != -INFINITY) {
      for (int k = lane; k < n; k += 32)
        weight[k] = expf(lse_of[static_cast<size_t>(c0 + k) * rows] - mx) * scale;
    }
    __syncthreads();
    if (row_lse == INFINITY) {  // nothing attended in any chunk (uniform: every thread returns)
      store4<T>(out, make_float4(0.f, 0.f, 0.f, 0.f));
      if (threadIdx.x == 0) *lse_out = INFINITY;
      return;
    }
    int k = 0;
    for (; k + kWideLoads <= n; k += kWideLoads) {
      const float* src = o_of + static_cast<size_t>(c0 + k) * split_stride;
      float4 v[kWideLoads];
#pragma unroll
      for (int j = 0; j < kWideLoads; ++j)
        v[j] = __ldcs(reinterpret_cast<const float4*>(src + j * split_stride));
#pragma unroll
      for (int j = 0; j < kWideLoads; ++j) {
        const float w = weight[k + j];
        acc.x += w * v[j].x;
        acc.y += w * v[j].y;
        acc.z += w * v[j].z;
        acc.w += w * v[j].w;
      }
    }
    for (; k < n; ++k) {
      const float4 v = __ldcs(reinterpret_cast<const float4*>(o_of + static_cast<size_t>(c0 + k) * split_stride));
      const float w = weight[k];
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
    __syncthreads();  // the weights of this chunk are read before the next overwrites them
  }
  store4<T>(out, acc);
  if (threadIdx.x == 0) *lse_out = row_lse;
}

}  // namespace

template <typename T>
cudaError_t launch_combine(const CombineParams& p, cudaStream_t stream) {
  dim3 grid(p.num_seqs, p.tokens_per_seq * p.h_q);
  if (kernel_variant() == KernelVariant::kCombine2) combine_wide_kernel<T><<<grid, 128, 0, stream>>>(p);
  else combine_kernel<T><<<grid, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_combine<__nv_bfloat16>(const CombineParams&, cudaStream_t);
template cudaError_t launch_combine<__half>(const CombineParams&, cudaStream_t);

}  // namespace jfm
