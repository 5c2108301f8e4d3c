// Warp-specialized sparse attention kernel (each math split), kBf16 cache with d_qk 512 (own
// translation unit: parallel builds).
#include "kernels/sm90/decode/sparse/kernel_ws.cuh"

namespace jfm {
namespace sm90 {
template cudaError_t launch_sparse_attention_ws<KvFormat::kBf16, 512, WsMath::kRoles>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_attention_ws<KvFormat::kBf16, 512, WsMath::kTransposed16>(const SparseDecodeParams&, cudaStream_t);
template cudaError_t launch_sparse_attention_ws<KvFormat::kBf16, 512, WsMath::kTransposed32>(const SparseDecodeParams&, cudaStream_t);
}  // namespace sm90
}  // namespace jfm
