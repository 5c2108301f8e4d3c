// Picks the sparse attention instantiation for a cache format and d_qk, and the kernel variant:
// kernel.cuh (every thread gathers and computes) or, chosen by JFM_SPARSE_KERNEL in the
// environment, kernel_ws.cuh (a producer warpgroup gathers) with the column-split math ("ws") or
// the role-split math ("ws_roles"). The switch exists while kernel_ws is measured against
// kernel.cuh on the device; it is read once per process.
#include <cstdlib>
#include <cstring>

#include "kernels/params.h"

namespace jfm {
namespace sm90 {
template <KvFormat kFmt, int kDqk>
cudaError_t launch_sparse_attention(const SparseDecodeParams& p, cudaStream_t stream);
template <KvFormat kFmt, int kDqk, WsMath kMath>
cudaError_t launch_sparse_attention_ws(const SparseDecodeParams& p, cudaStream_t stream);
}  // namespace sm90

namespace {
enum class Variant { kDefault, kWsColumns, kWsRoles };

Variant variant() {
  static const Variant v = [] {
    const char* e = std::getenv("JFM_SPARSE_KERNEL");
    if (e != nullptr && std::strcmp(e, "ws") == 0) return Variant::kWsColumns;
    if (e != nullptr && std::strcmp(e, "ws_roles") == 0) return Variant::kWsRoles;
    return Variant::kDefault;
  }();
  return v;
}

template <KvFormat kFmt, int kDqk>
cudaError_t launch(const SparseDecodeParams& p, cudaStream_t stream) {
  switch (variant()) {
    case Variant::kWsColumns:
      return sm90::launch_sparse_attention_ws<kFmt, kDqk, WsMath::kColumns>(p, stream);
    case Variant::kWsRoles:
      return sm90::launch_sparse_attention_ws<kFmt, kDqk, WsMath::kRoles>(p, stream);
    default:
      return sm90::launch_sparse_attention<kFmt, kDqk>(p, stream);
  }
}
}  // namespace

const char* sparse_kernel_variant() {
  switch (variant()) {
    case Variant::kWsColumns: return "ws";
    case Variant::kWsRoles: return "ws_roles";
    default: return "default";
  }
}

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
