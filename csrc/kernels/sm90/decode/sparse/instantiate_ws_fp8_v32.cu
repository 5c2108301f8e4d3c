// Warp-specialized sparse attention kernel, kFp8V32 cache with d_qk 576: the math splits FP8
// uses (kRolesPair: see sparse/dispatch.cu) (own translation unit: parallel builds).
#include "kernels/sm90/decode/sparse/kernel_ws.cuh"

namespace jfm {
namespace sm90 {
template cudaError_t launch_sparse_attention_ws<KvFormat::kFp8V32, 576, WsMath::kTransposed16>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_attention_ws<KvFormat::kFp8V32, 576, WsMath::kTransposed32>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_attention_ws<KvFormat::kFp8V32, 576, WsMath::kRolesWide>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_attention_ws<KvFormat::kFp8V32, 576, WsMath::kRolesPair>(const SparseDecodeParams&, cudaStream_t);
}  // namespace sm90
}  // namespace jfm
