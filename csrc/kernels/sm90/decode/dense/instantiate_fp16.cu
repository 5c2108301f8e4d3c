// fp16 instantiation of the dense decode kernel (own translation unit: parallel builds).
#include "kernels/sm90/decode/dense/kernel.cuh"

namespace jfm {
namespace sm90 {
template cudaError_t launch_dense_decode<__half>(const DenseDecodeParams&, cudaStream_t);
}  // namespace sm90
}  // namespace jfm
