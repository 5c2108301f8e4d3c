// Which generation of the dense and sparse decode kernels this process runs. The default is the
// warp-specialized kernels (kernel_ws.cuh: producer warpgroups gather, math warpgroups compute;
// WsMath::kTransposed16 / 32 where a CTA has at most 16 / 32 query rows, else kRoles).
// JFM_KERNEL_VARIANT=v1 picks the earlier kernels (kernel.cuh: every thread gathers and
// computes), kept for A/B measurements and as a fallback while the warp-specialized kernels are
// new; anything else (or nothing) the default. Read once per process (host code).
#pragma once

#include <cstdlib>
#include <cstring>

namespace jfm {

enum class KernelVariant { kWs, kV1 };

inline KernelVariant kernel_variant() {
  static const KernelVariant v = [] {
    const char* e = std::getenv("JFM_KERNEL_VARIANT");
    return e != nullptr && std::strcmp(e, "v1") == 0 ? KernelVariant::kV1 : KernelVariant::kWs;
  }();
  return v;
}

inline const char* kernel_variant_name() { return kernel_variant() == KernelVariant::kV1 ? "v1" : "ws"; }

}  // namespace jfm
