// Picks the sparse attention instantiation for a cache format and d_qk, and the kernel variant:
// kernel.cuh (every thread gathers and computes) or, with JFM_SPARSE_KERNEL=ws in the
// environment, kernel_ws.cuh (a producer warpgroup gathers). The variant switch exists while
// kernel_ws is measured against kernel.cuh on the device; it is read once per process.
#include <cstdlib>
#include <cstring>

#include "kernels/params.h"

namespace jfm {
namespace sm90 {
template <KvFormat kFmt, int kDqk>
cudaError_t launch_sparse_attention(const SparseDecodeParams& p, cudaStream_t stream);
template <KvFormat kFmt, int kDqk>
cudaError_t launch_sparse_attention_ws(const SparseDecodeParams& p, cudaStream_t stream);
}  // namespace sm90

namespace {
bool use_warp_specialized() {
  static const bool ws = [] {
    const char* v = std::getenv("JFM_SPARSE_KERNEL");
    return v != nullptr && std::strcmp(v, "ws") == 0;
  }();
  return ws;
}

template <KvFormat kFmt, int kDqk>
cudaError_t launch(const SparseDecodeParams& p, cudaStream_t stream) {
  return use_warp_specialized() ? sm90::launch_sparse_attention_ws<kFmt, kDqk>(p, stream)
                                : sm90::launch_sparse_attention<kFmt, kDqk>(p, stream);
}
}  // namespace

const char* sparse_kernel_variant() { return use_warp_specialized() ? "ws" : "default"; }

cudaError_t launch_sparse_decode(const SparseDecodeParams& p, KvFormat format, int d_qk,
                                 cudaStream_t stream) {
  switch (format) {
    case KvFormat::kBf16:
      if (d_qk == 576) return launch<KvFormat::kBf16, 576>(p, stream);
      if (d_qk == 512) return launch<KvFormat::kBf16, 512>(p, stream);
      break;
    case KvFormat::kFp8V32:
      if (d_qk == 576) return launch<KvFormat::kFp8V32, 576>(p, stream);
      break;
    case KvFormat::kFp8V4:
      if (d_qk == 512) return launch<KvFormat::kFp8V4, 512>(p, stream);
      break;
  }
  return cudaErrorInvalidValue;
}
}  // namespace jfm
