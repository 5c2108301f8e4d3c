// Split-KV combine: merges the partial (out, lse) of a sequence's chunks into the final result.
// Sequences with a single chunk were written directly by the main kernel and are skipped here.
// One CTA of 128 threads per (sequence, query row); the partials are merged in a fixed order,
// so the result is bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/common/decode_params.h"

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
__global__ void __launch_bounds__(128) dense_combine_kernel(const DenseDecodeParams p) {
  const int seq = blockIdx.x;
  const int row = blockIdx.y;  // kv_head * rows_per_kv + (s * heads_per_kv + h_local)
  const int base = p.num_splits[seq];
  const int nsplit = p.num_splits[seq + 1] - base;
  if (nsplit <= 1) return;
  const int rows = p.s_q * p.h_q;
  const int hpk = p.h_q / p.h_kv;
  const int rows_per_kv = p.s_q * hpk;
  const int hk = row / rows_per_kv, grow = row % rows_per_kv;
  const int s = grow / hpk, head = hk * hpk + grow % hpk;

  float mx = -INFINITY;
  for (int k = 0; k < nsplit; ++k)
    mx = fmaxf(mx, p.lse_accum[static_cast<size_t>(base + k) * rows + row]);
  T* out = reinterpret_cast<T*>(p.out) +
           ((static_cast<size_t>(seq) * p.s_q + s) * p.h_q + head) * kDv + threadIdx.x * 4;
  if (mx == -INFINITY) {
    store4<T>(out, make_float4(0.f, 0.f, 0.f, 0.f));
    if (threadIdx.x == 0) p.lse[(static_cast<size_t>(seq) * p.h_q + head) * p.s_q + s] = INFINITY;
    return;
  }
  float sum = 0.f;
  for (int k = 0; k < nsplit; ++k)
    sum += expf(p.lse_accum[static_cast<size_t>(base + k) * rows + row] - mx);
  const float inv = 1.f / sum;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int k = 0; k < nsplit; ++k) {
    const size_t slot_row = static_cast<size_t>(base + k) * rows + row;
    const float w = expf(p.lse_accum[slot_row] - mx) * inv;
    const float4 v = *reinterpret_cast<const float4*>(p.o_accum + slot_row * kDv + threadIdx.x * 4);
    acc.x += w * v.x;
    acc.y += w * v.y;
    acc.z += w * v.z;
    acc.w += w * v.w;
  }
  store4<T>(out, acc);
  if (threadIdx.x == 0)
    p.lse[(static_cast<size_t>(seq) * p.h_q + head) * p.s_q + s] = logf(sum) + mx;
}

}  // namespace

template <typename T>
cudaError_t launch_dense_combine(const DenseDecodeParams& p, cudaStream_t stream) {
  dim3 grid(p.batch, p.s_q * p.h_q);
  dense_combine_kernel<T><<<grid, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_dense_combine<__nv_bfloat16>(const DenseDecodeParams&, cudaStream_t);
template cudaError_t launch_dense_combine<__half>(const DenseDecodeParams&, cudaStream_t);

}  // namespace jfm
