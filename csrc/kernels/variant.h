// Which generation of the dense and sparse decode kernels this process runs. The default is the
// warp-specialized kernels (kernel_ws.cuh: producer warpgroups gather, math warpgroups compute;
// WsMath::kTransposed16 / 32 where a CTA has at most 16 / 32 query rows, else kRoles, and for FP8
// kRolesWide with cache-hinted row loads). JFM_KERNEL_VARIANT=v1 picks the earlier kernels
// (kernel.cuh: every thread gathers and computes), kept for A/B measurements and as a fallback.
// The default runs FP8 V4 attention at 65-128 heads as CTA pairs sharing each tile's
// dequantization (WsMath::kRolesPair) where the step has enough tiles (sparse/dispatch.cu,
// pair_pays); JFM_KERNEL_VARIANT=pair takes the pairs for every FP8 call at 65-128 heads (V3.2
// and small batches too), for measurement. JFM_KERNEL_VARIANT=combine1: the default kernels with
// the split-KV combine before the warp-per-row one (decode/combine.cu; bitwise-equal results), for
// measurement. JFM_KERNEL_VARIANT=combine_rows / combine_quarters: the default kernels with one of
// the two warp combines for every split step, instead of the step-size rule of launch_combine
// (quarters where sequences average many splits), for measurement and the bitwise test.
// JFM_KERNEL_VARIANT=v4load16: the default kernels, every FP8 V4
// producer (not only the unpaired wide one) reading 16-byte pieces where the pool's records are
// 16-byte aligned (SparsePool::load16), for measurement; JFM_KERNEL_VARIANT=v4load8: none of them
// (the default before 2026-12-01's sixth session), for the A/B of the upstream peak case (V4 h64
// topk 16384 measured 0.90x the fourth session's kernel with the 16-byte loads on).
// JFM_KERNEL_VARIANT=direct_out: the default kernels, the bf16 role split's output stored by each
// thread instead of staged and stored by TMA (JFM_SPARSE_TMA_OUT), for measurement.
// Anything else (or nothing): the default. Read once per process (host code).
#pragma once

#include <cstdlib>
#include <cstring>

namespace jfm {

enum class KernelVariant {
  kWs, kV1, kPair, kCombine1, kCombineRows, kCombineQuarters, kV4Load16, kV4Load8, kDirectOut
};

inline KernelVariant kernel_variant() {
  static const KernelVariant v = [] {
    const char* e = std::getenv("JFM_KERNEL_VARIANT");
    if (e != nullptr && std::strcmp(e, "v1") == 0) return KernelVariant::kV1;
    if (e != nullptr && std::strcmp(e, "pair") == 0) return KernelVariant::kPair;
    if (e != nullptr && std::strcmp(e, "combine1") == 0) return KernelVariant::kCombine1;
    if (e != nullptr && std::strcmp(e, "combine_rows") == 0) return KernelVariant::kCombineRows;
    if (e != nullptr && std::strcmp(e, "combine_quarters") == 0) return KernelVariant::kCombineQuarters;
    if (e != nullptr && std::strcmp(e, "v4load16") == 0) return KernelVariant::kV4Load16;
    if (e != nullptr && std::strcmp(e, "v4load8") == 0) return KernelVariant::kV4Load8;
    if (e != nullptr && std::strcmp(e, "direct_out") == 0) return KernelVariant::kDirectOut;
    return KernelVariant::kWs;
  }();
  return v;
}

inline const char* kernel_variant_name() {
  switch (kernel_variant()) {
    case KernelVariant::kV1: return "v1";
    case KernelVariant::kPair: return "pair";
    case KernelVariant::kCombine1: return "combine1";
    case KernelVariant::kCombineRows: return "combine_rows";
    case KernelVariant::kCombineQuarters: return "combine_quarters";
    case KernelVariant::kV4Load16: return "v4load16";
    case KernelVariant::kV4Load8: return "v4load8";
    case KernelVariant::kDirectOut: return "direct_out";
    default: return "ws";
  }
}

}  // namespace jfm
