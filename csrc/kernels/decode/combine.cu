// Split-KV combine (any arch): merges the partial (out, lse) of a sequence's chunks into the final
// result, then applies the attention sink (out *= 1 / (1 + exp(sink[h] - lse)); lse unchanged).
// Sequences with a single chunk were finished by the main kernel and are skipped here.
// One CTA of 128 threads per (sequence, row); partials merge in a fixed order, so the result is
// bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/params.h"

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

template <typename T>
__global__ void __launch_bounds__(128) combine_kernel(const CombineParams p) {
  static_assert(kDv == 128 * 4, "one float4 per thread");
  const int seq = blockIdx.x;
  const int row = blockIdx.y;
  const int base = p.num_splits[seq];
  const int nsplit = p.num_splits[seq + 1] - base;
  if (nsplit <= 1) return;
  const RowMap map{p.tokens_per_seq, p.s_q, p.h_q, p.h_q / p.h_kv};
  const int rows = map.rows_per_seq();
  const int rows_per_kv = p.tokens_per_seq * map.hpk;
  const int hk = row / rows_per_kv, grow = row % rows_per_kv;
  const int s_local = grow / map.hpk, head = hk * map.hpk + grow % map.hpk;

  float mx = -INFINITY;
  for (int k = 0; k < nsplit; ++k)
    mx = fmaxf(mx, p.lse_accum[static_cast<size_t>(base + k) * rows + row]);
  T* out = reinterpret_cast<T*>(p.out) + map.out_row(seq, s_local, head) * kDv + threadIdx.x * 4;
  float* lse_out = p.lse + map.lse_index(seq, s_local, head);
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

}  // namespace

template <typename T>
cudaError_t launch_combine(const CombineParams& p, cudaStream_t stream) {
  dim3 grid(p.num_seqs, p.tokens_per_seq * p.h_q);
  combine_kernel<T><<<grid, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_combine<__nv_bfloat16>(const CombineParams&, cudaStream_t);
template cudaError_t launch_combine<__half>(const CombineParams&, cudaStream_t);

}  // namespace jfm
