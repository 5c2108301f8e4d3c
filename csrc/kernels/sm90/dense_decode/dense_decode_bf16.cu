// bf16 instantiations of the dense decode kernels (own translation unit: parallel builds).
#include <cstdlib>
#include <cstring>

#include "kernels/sm90/dense_decode/dense_decode_kernel.cuh"
#include "kernels/sm90/dense_decode/dense_decode_v2.cuh"

namespace jfm {
// v2 (wgmma) unless JAX_FLASHMLA_DENSE_KERNEL=v1 selects the mma.sync version (kept for
// comparison and as the fallback design; both pass the same GPU tests).
cudaError_t launch_dense_decode_bf16(const DenseDecodeParams& p, cudaStream_t stream) {
  const char* v = std::getenv("JAX_FLASHMLA_DENSE_KERNEL");
  if (v != nullptr && std::strcmp(v, "v1") == 0) return launch_dense_decode_v1<__nv_bfloat16>(p, stream);
  return launch_dense_decode_v2<__nv_bfloat16>(p, stream);
}
}  // namespace jfm
