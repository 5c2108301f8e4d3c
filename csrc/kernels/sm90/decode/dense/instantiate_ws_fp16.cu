// fp16 instantiations of the warp-specialized dense decode kernel, each math split (own
// translation unit: parallel builds).
#include "kernels/sm90/decode/dense/kernel_ws.cuh"

namespace jfm {
namespace sm90 {
template cudaError_t launch_dense_decode_ws<__half, WsMath::kRoles>(const DenseDecodeParams&, cudaStream_t);
template cudaError_t launch_dense_decode_ws<__half, WsMath::kTransposed16>(const DenseDecodeParams&, cudaStream_t);
template cudaError_t launch_dense_decode_ws<__half, WsMath::kTransposed32>(const DenseDecodeParams&, cudaStream_t);
#if JFM_DENSE_PAIR && JFM_DENSE_TMA  // (params.h: kDensePair)
template cudaError_t launch_dense_decode_ws<__half, WsMath::kRolesPair>(const DenseDecodeParams&, cudaStream_t);
#endif
}  // namespace sm90
}  // namespace jfm
