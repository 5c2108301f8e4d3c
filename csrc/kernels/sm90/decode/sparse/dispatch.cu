// Picks the sparse attention instantiation for a cache format and d_qk.
#include "kernels/params.h"

namespace jfm {
namespace sm90 {
template <KvFormat kFmt, int kDqk>
cudaError_t launch_sparse_attention(const SparseDecodeParams& p, cudaStream_t stream);
}  // namespace sm90

cudaError_t launch_sparse_decode(const SparseDecodeParams& p, KvFormat format, int d_qk,
                                 cudaStream_t stream) {
  using sm90::launch_sparse_attention;
  switch (format) {
    case KvFormat::kBf16:
      if (d_qk == 576) return launch_sparse_attention<KvFormat::kBf16, 576>(p, stream);
      if (d_qk == 512) return launch_sparse_attention<KvFormat::kBf16, 512>(p, stream);
      break;
    case KvFormat::kFp8V32:
      if (d_qk == 576) return launch_sparse_attention<KvFormat::kFp8V32, 576>(p, stream);
      break;
    case KvFormat::kFp8V4:
      if (d_qk == 512) return launch_sparse_attention<KvFormat::kFp8V4, 512>(p, stream);
      break;
  }
  return cudaErrorInvalidValue;
}
}  // namespace jfm
