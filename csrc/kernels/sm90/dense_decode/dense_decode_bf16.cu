// bf16 instantiation of the dense decode kernel (own translation unit: parallel builds).
#include "kernels/sm90/dense_decode/dense_decode_v2.cuh"

namespace jfm {
cudaError_t launch_dense_decode_bf16(const DenseDecodeParams& p, cudaStream_t stream) {
  return launch_dense_decode_v2<__nv_bfloat16>(p, stream);
}
}  // namespace jfm
