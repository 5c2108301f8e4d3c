// Which kernel variant this process runs, for the kernels that have more than one while the
// variants are measured against each other on the device: JFM_KERNEL_VARIANT=ws, ws_roles or ws_t
// in the environment picks the warp-specialized dense and sparse decode kernels (kernel_ws.cuh,
// with WsMath::kColumns / kRoles; ws_t: kTransposed16 / 32 where a CTA has at most 16 / 32 query
// rows, else kRoles); anything else (or nothing) the default kernels. Read once per process
// (host code).
#pragma once

#include <cstdlib>
#include <cstring>

namespace jfm {

enum class KernelVariant { kDefault, kWsColumns, kWsRoles, kWsTransposed };

inline KernelVariant kernel_variant() {
  static const KernelVariant v = [] {
    const char* e = std::getenv("JFM_KERNEL_VARIANT");
    if (e != nullptr && std::strcmp(e, "ws") == 0) return KernelVariant::kWsColumns;
    if (e != nullptr && std::strcmp(e, "ws_roles") == 0) return KernelVariant::kWsRoles;
    if (e != nullptr && std::strcmp(e, "ws_t") == 0) return KernelVariant::kWsTransposed;
    return KernelVariant::kDefault;
  }();
  return v;
}

inline const char* kernel_variant_name() {
  switch (kernel_variant()) {
    case KernelVariant::kWsColumns: return "ws";
    case KernelVariant::kWsRoles: return "ws_roles";
    case KernelVariant::kWsTransposed: return "ws_t";
    default: return "default";
  }
}

}  // namespace jfm
