// The dense decode launchers of params.h: the element type's instantiation of the kernel
// generation this process runs (kernels/variant.h): kernel_ws.cuh with the transposed math for at
// most 32 query rows per CTA and the role split above, or (v1) kernel.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/params.h"
#include "kernels/tensor_map.h"
#include "kernels/variant.h"

namespace jfm {
namespace sm90 {
template <typename T>
cudaError_t launch_dense_decode(const DenseDecodeParams& p, cudaStream_t stream);
template <typename T, WsMath kMath>
cudaError_t launch_dense_decode_ws(const DenseDecodeParams& p, cudaStream_t stream);
}  // namespace sm90

namespace {
// JFM_DENSE_TMA: p.kv_map over the cache [num_kv_blocks * 64 rows, h_kv, 576] of 2-byte elements
// (box: 64 columns x 1 head x 64 rows, 128-byte swizzle, the tile's column-block layout). Left
// unencoded (kv_map_ok false: the cp.async copies) if the encoder refuses it.
void encode_kv_map(DenseDecodeParams& p) {
  p.kv_map_ok = false;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr || p.num_kv_blocks <= 0) return;
  const cuuint64_t dims[3] = {kDenseDqk, static_cast<cuuint64_t>(p.h_kv),
                              static_cast<cuuint64_t>(p.num_kv_blocks) * kPageBlock};
  const cuuint64_t strides[2] = {kDenseDqk * 2, static_cast<cuuint64_t>(p.h_kv) * kDenseDqk * 2};
  const cuuint32_t box[3] = {64, 1, kPageBlock}, unit[3] = {1, 1, 1};
  p.kv_map_ok = encode(&p.kv_map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 3, const_cast<void*>(p.kv), dims,
                       strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                       CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T>
cudaError_t launch(const DenseDecodeParams& params, cudaStream_t stream) {
  const KernelVariant v = kernel_variant();
  if (v == KernelVariant::kV1) return sm90::launch_dense_decode<T>(params, stream);
  DenseDecodeParams p = params;
  if constexpr (kDenseTma) encode_kv_map(p);
  else p.kv_map_ok = false;
  const int rows = p.s_q * (p.h_q / p.h_kv);  // query rows per KV head (a CTA takes 64 of them)
  if (rows <= 16) return sm90::launch_dense_decode_ws<T, WsMath::kTransposed16>(p, stream);
  if (rows <= 32) return sm90::launch_dense_decode_ws<T, WsMath::kTransposed32>(p, stream);
  if constexpr (kDensePair) {
    const cudaError_t e = sm90::launch_dense_decode_ws<T, WsMath::kRolesPair>(p, stream);
    if (e != cudaErrorNotSupported) return e;  // else no pair here: unpaired
  }
  return sm90::launch_dense_decode_ws<T, WsMath::kRoles>(p, stream);
}
}  // namespace

cudaError_t launch_dense_decode_bf16(const DenseDecodeParams& p, cudaStream_t stream) {
  return launch<__nv_bfloat16>(p, stream);
}
cudaError_t launch_dense_decode_fp16(const DenseDecodeParams& p, cudaStream_t stream) {
  return launch<__half>(p, stream);
}
}  // namespace jfm
