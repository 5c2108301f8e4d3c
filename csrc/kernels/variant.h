// Which generation of the dense and sparse decode kernels this process runs. The default is the
// warp-specialized kernels (kernel_ws.cuh: producer warpgroups gather, math warpgroups compute;
// WsMath::kTransposed16 / 32 where a CTA has at most 16 / 32 query rows, else kRoles).
// JFM_KERNEL_VARIANT=v1 picks the earlier kernels (kernel.cuh: every thread gathers and
// computes), kept for A/B measurements and as a fallback while the warp-specialized kernels are
// new. JFM_KERNEL_VARIANT=next: the candidate being measured, not yet run on a GPU (FP8 sparse
// kernels: cache-hinted row loads, and kRolesWide's 144-register producer above 32 heads; the
// other kernels as the default). JFM_KERNEL_VARIANT=pair: next, plus CTA pairs sharing each
// tile's dequantization for FP8 at 65-128 heads (WsMath::kRolesPair), also not yet run.
// JFM_KERNEL_VARIANT=pingpong: dense decode above 32 query rows per CTA with WsMath::kPingPong
// (the math warpgroups own alternate tiles), not yet run; everything else as the default.
// Anything else (or nothing): the default. Read once per process (host code).
#pragma once

#include <cstdlib>
#include <cstring>

namespace jfm {

enum class KernelVariant { kWs, kV1, kNext, kPair, kPingPong };

inline KernelVariant kernel_variant() {
  static const KernelVariant v = [] {
    const char* e = std::getenv("JFM_KERNEL_VARIANT");
    if (e != nullptr && std::strcmp(e, "v1") == 0) return KernelVariant::kV1;
    if (e != nullptr && std::strcmp(e, "next") == 0) return KernelVariant::kNext;
    if (e != nullptr && std::strcmp(e, "pair") == 0) return KernelVariant::kPair;
    if (e != nullptr && std::strcmp(e, "pingpong") == 0) return KernelVariant::kPingPong;
    return KernelVariant::kWs;
  }();
  return v;
}

inline const char* kernel_variant_name() {
  switch (kernel_variant()) {
    case KernelVariant::kV1: return "v1";
    case KernelVariant::kNext: return "next";
    case KernelVariant::kPair: return "pair";
    case KernelVariant::kPingPong: return "pingpong";
    default: return "ws";
  }
}

}  // namespace jfm
