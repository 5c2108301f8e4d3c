// Warp-specialized sparse attention kernel (each math split; and with the cache hints and the wide
// producer of JFM_KERNEL_VARIANT=next, the CTA pairs of =pair), kFp8V32 cache with d_qk 576 (own translation unit:
// parallel builds).
#include "kernels/sm90/decode/sparse/kernel_ws.cuh"

namespace jfm {
namespace sm90 {
template cudaError_t launch_sparse_attention_ws<KvFormat::kFp8V32, 576, WsMath::kRoles, false>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_attention_ws<KvFormat::kFp8V32, 576, WsMath::kTransposed16, false>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_attention_ws<KvFormat::kFp8V32, 576, WsMath::kTransposed32, false>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_attention_ws<KvFormat::kFp8V32, 576, WsMath::kTransposed16, true>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_attention_ws<KvFormat::kFp8V32, 576, WsMath::kTransposed32, true>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_attention_ws<KvFormat::kFp8V32, 576, WsMath::kRolesWide, true>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_attention_ws<KvFormat::kFp8V32, 576, WsMath::kRolesPair, true>(const SparseDecodeParams&, cudaStream_t);
}  // namespace sm90
}  // namespace jfm
