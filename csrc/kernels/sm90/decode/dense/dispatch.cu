// The dense decode launchers of params.h: the element type's instantiation of the kernel
// generation this process runs (kernels/variant.h): kernel_ws.cuh with the transposed math for at
// most 32 query rows per CTA and the role split above, or (v1) kernel.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/params.h"
#include "kernels/variant.h"

namespace jfm {
namespace sm90 {
template <typename T>
cudaError_t launch_dense_decode(const DenseDecodeParams& p, cudaStream_t stream);
template <typename T, WsMath kMath>
cudaError_t launch_dense_decode_ws(const DenseDecodeParams& p, cudaStream_t stream);
}  // namespace sm90

namespace {
template <typename T>
cudaError_t launch(const DenseDecodeParams& p, cudaStream_t stream) {
  const KernelVariant v = kernel_variant();
  if (v == KernelVariant::kV1) return sm90::launch_dense_decode<T>(p, stream);
  const int rows = p.s_q * (p.h_q / p.h_kv);  // a CTA's query rows, at most 64
  if (rows <= 16) return sm90::launch_dense_decode_ws<T, WsMath::kTransposed16>(p, stream);
  if (rows <= 32) return sm90::launch_dense_decode_ws<T, WsMath::kTransposed32>(p, stream);
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
