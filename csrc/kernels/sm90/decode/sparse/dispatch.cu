// Picks the sparse attention instantiation for a cache format and d_qk, and the kernel
// generation (kernels/variant.h): kernel_ws.cuh (producer warpgroups gather) with the transposed
// math for at most 32 heads and the role split above (FP8: with the wide producer; CTA pairs
// under JFM_KERNEL_VARIANT=pair), or (v1) kernel.cuh (every thread gathers and computes).
#include "kernels/params.h"
#include "kernels/variant.h"

namespace jfm {
namespace sm90 {
template <KvFormat kFmt, int kDqk>
cudaError_t launch_sparse_attention(const SparseDecodeParams& p, cudaStream_t stream);
template <KvFormat kFmt, int kDqk, WsMath kMath>
cudaError_t launch_sparse_attention_ws(const SparseDecodeParams& p, cudaStream_t stream);
}  // namespace sm90

namespace {
template <KvFormat kFmt, int kDqk>
cudaError_t launch(const SparseDecodeParams& p, cudaStream_t stream) {
  using sm90::launch_sparse_attention_ws;
  const KernelVariant v = kernel_variant();
  if (v == KernelVariant::kV1) return sm90::launch_sparse_attention<kFmt, kDqk>(p, stream);
  // A CTA's query rows: the heads, at most 64.
  if (p.h_q <= 16) return launch_sparse_attention_ws<kFmt, kDqk, WsMath::kTransposed16>(p, stream);
  if (p.h_q <= 32) return launch_sparse_attention_ws<kFmt, kDqk, WsMath::kTransposed32>(p, stream);
  if constexpr (kFmt == KvFormat::kBf16) {
    if (v == KernelVariant::kOverlap) return launch_sparse_attention_ws<kFmt, kDqk, WsMath::kRolesOverlap>(p, stream);
    return launch_sparse_attention_ws<kFmt, kDqk, WsMath::kRoles>(p, stream);
  } else {
    // 65-128 heads: a CTA pair (overlap: with the overlapped scores path).
    if ((v == KernelVariant::kPair || v == KernelVariant::kOverlap) && p.num_m_blocks == 2) {
      const cudaError_t e =
          v == KernelVariant::kPair
              ? launch_sparse_attention_ws<kFmt, kDqk, WsMath::kRolesPair>(p, stream)
              : launch_sparse_attention_ws<kFmt, kDqk, WsMath::kRolesPairOverlap>(p, stream);
      if (e != cudaErrorNotSupported) return e;  // else no pair fits on the device: unpaired
    }
    // The FP8 producer does the most work per tile (gather + dequantization): registers to it.
    return launch_sparse_attention_ws<kFmt, kDqk, WsMath::kRolesWide>(p, stream);
  }
}
}  // namespace

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
