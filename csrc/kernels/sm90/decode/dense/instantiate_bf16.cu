// bf16 instantiation of the dense decode kernel (own translation unit: parallel builds).
#include "kernels/sm90/decode/dense/kernel.cuh"

namespace jfm {
cudaError_t launch_dense_decode_bf16(const DenseDecodeParams& p, cudaStream_t stream) {
  return sm90::launch_dense_decode<__nv_bfloat16>(p, stream);
}
}  // namespace jfm
