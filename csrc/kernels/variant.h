// Which generation of the dense and sparse decode kernels this process runs. The default is the
// warp-specialized kernels (kernel_ws.cuh: producer warpgroups gather, math warpgroups compute;
// WsMath::kTransposed16 / 32 where a CTA has at most 16 / 32 query rows, else kRoles, and for FP8
// kRolesWide with cache-hinted row loads). JFM_KERNEL_VARIANT=v1 picks the earlier kernels
// (kernel.cuh: every thread gathers and computes), kept for A/B measurements and as a fallback.
// JFM_KERNEL_VARIANT=pair: the default, plus CTA pairs sharing each tile's dequantization for FP8
// at 65-128 heads (WsMath::kRolesPair): against the default, 1.08x on V4 h128 and 0.95x on V3.2
// h128 when measured (docs/PERFORMANCE.md, 2026-12-01); changed since (8b878ba), not re-measured.
// JFM_KERNEL_VARIANT=overlap: dense decode above 32 query rows per CTA and bf16 sparse attention
// (sparse prefill) above 32 heads with WsMath::kRolesOverlap (the scores warpgroup's next S rides
// with its P V), and FP8 at 65-128 heads with the CTA pairs plus that scores path
// (kRolesPairOverlap); not yet run on a GPU.
// Anything else (or nothing): the default. Read once per process (host code).
#pragma once

#include <cstdlib>
#include <cstring>

namespace jfm {

enum class KernelVariant { kWs, kV1, kPair, kOverlap };

inline KernelVariant kernel_variant() {
  static const KernelVariant v = [] {
    const char* e = std::getenv("JFM_KERNEL_VARIANT");
    if (e != nullptr && std::strcmp(e, "v1") == 0) return KernelVariant::kV1;
    if (e != nullptr && std::strcmp(e, "pair") == 0) return KernelVariant::kPair;
    if (e != nullptr && std::strcmp(e, "overlap") == 0) return KernelVariant::kOverlap;
    return KernelVariant::kWs;
  }();
  return v;
}

inline const char* kernel_variant_name() {
  switch (kernel_variant()) {
    case KernelVariant::kV1: return "v1";
    case KernelVariant::kPair: return "pair";
    case KernelVariant::kOverlap: return "overlap";
    default: return "ws";
  }
}

}  // namespace jfm
