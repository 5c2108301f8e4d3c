// Picks the sparse attention instantiation for a cache format and d_qk, and the kernel
// generation (kernels/variant.h): kernel_ws.cuh (producer warpgroups gather) with the math of
// sparse_ws_math (the transposed math for at most 32 heads, the role split above; FP8: with the
// wide producer, or CTA pairs where pair_pays), or (v1) kernel.cuh (every thread gathers and
// computes).
#include "kernels/params.h"
#include "kernels/tensor_map.h"
#include "kernels/variant.h"

namespace jfm {
namespace sm90 {
template <KvFormat kFmt, int kDqk>
cudaError_t launch_sparse_attention(const SparseDecodeParams& p, cudaStream_t stream);
template <KvFormat kFmt, int kDqk, WsMath kMath>
cudaError_t launch_sparse_attention_ws(const SparseDecodeParams& p, cudaStream_t stream);
}  // namespace sm90

namespace {
// Whether FP8 attention at 65-128 heads (two row blocks) runs as CTA pairs sharing each tile's
// dequantization (WsMath::kRolesPair) rather than unpaired (kRolesWide). Measured on the H200
// (docs/PERFORMANCE.md, 2026-12-01, upstream's cases): V4 1.11-1.17x from b 64 on. V3.2 measured
// 0.96-1.00x then, with producers reading 16 bytes at a time (half-sector st.async to the peer);
// with 8-byte reads (JFM_V32_PAIR_NARROW, kernel_ws.cuh) its pair runs 5-8% under kRolesWide
// (PERFORMANCE.md, 2026-12-04), so both formats pair. At b 2 (under one 64-token tile per
// schedule part) the pair measured 0.59x on one case and 1.40x on another, where identical
// kernels differed by 1.5x: too noisy to call, so steps with fewer than 4 tiles per part stay on
// the unpaired kernel, which has the longer test record. JFM_KERNEL_VARIANT=pair takes the pair
// wherever one fits. JFM_V32_PAIR=0 keeps V3.2 unpaired (the earlier default, for A/B); =2 pairs
// V3.2 wherever one fits (as JFM_KERNEL_VARIANT=pair for V3.2 alone).
#ifndef JFM_V32_PAIR
#define JFM_V32_PAIR 1
#endif
bool pair_pays(const SparseDecodeParams& p, KvFormat format) {
  if (p.num_m_blocks != 2) return false;
  if (kernel_variant() == KernelVariant::kPair) return true;
  if (JFM_V32_PAIR == 2 && format == KvFormat::kFp8V32) return true;
  const bool pairs = format == KvFormat::kFp8V4 || (JFM_V32_PAIR != 0 && format == KvFormat::kFp8V32);
  if (!pairs || p.num_sm_parts <= 0) return false;
  const int64_t tiles = static_cast<int64_t>(p.batch) * p.s_q *  // the step's tiles
                        ((sparse_positions(p) + kTileTokens - 1) / kTileTokens);
  return tiles >= 4 * static_cast<int64_t>(p.num_sm_parts);
}

// The V4 producers' 16-byte loads (SparsePool::load16, where the records allow them): kept for the
// unpaired wide producer only. Measured on the H200 (docs/PERFORMANCE.md, 2026-12-01, upstream's V4
// cases with extra_topk_length): 1.01-1.08x at 64 heads (kRolesWide), 0.81-0.89x in the CTA pairs
// at 128 (and unmeasured in the transposed kernels). JFM_KERNEL_VARIANT=v4load16 keeps them in every
// kernel, v4load8 in none, for measurement.
SparseDecodeParams with_load16_for(const SparseDecodeParams& p, WsMath math) {
  SparseDecodeParams q = p;
  const KernelVariant v = kernel_variant();
  if (v == KernelVariant::kV4Load8 || (v != KernelVariant::kV4Load16 && math != WsMath::kRolesWide))
    for (SparsePool& pool : q.pool) pool.load16 = false;
  return q;
}

// (JFM_SPARSE_TMA_OUT) p.out_map over the output [tokens, h_q, 512] bf16 (box: 64 columns x 64
// heads x 1 token, 128-byte swizzle: one column block of a staged O half). Left unencoded
// (out_map_ok false: per-thread stores) under JFM_KERNEL_VARIANT=direct_out or if the encoder
// refuses it.
void encode_out_map(SparseDecodeParams& p) {
  p.out_map_ok = false;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr || kernel_variant() == KernelVariant::kDirectOut || p.out == nullptr) return;
  const cuuint64_t dims[3] = {kDv, static_cast<cuuint64_t>(p.h_q),
                              static_cast<cuuint64_t>(p.batch) * p.s_q};
  const cuuint64_t strides[2] = {kDv * 2, static_cast<cuuint64_t>(p.h_q) * kDv * 2};
  const cuuint32_t box[3] = {64, kBlockM, 1}, unit[3] = {1, 1, 1};
  p.out_map_ok = encode(&p.out_map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, p.out, dims, strides, box,
                        unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                        CU_TENSOR_MAP_L2_PROMOTION_NONE,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <KvFormat kFmt, int kDqk>
cudaError_t launch(const SparseDecodeParams& p_in, cudaStream_t stream) {
  using sm90::launch_sparse_attention_ws;
  // Every kernel but the unpaired wide one (below) reads V4 rows 8 bytes at a time.
  SparseDecodeParams p = with_load16_for(p_in, WsMath::kRoles);
  if (kernel_variant() == KernelVariant::kV1) return sm90::launch_sparse_attention<kFmt, kDqk>(p, stream);
  const WsMath math = sparse_ws_math(p, kFmt);
  if (math == WsMath::kTransposed16)
    return launch_sparse_attention_ws<kFmt, kDqk, WsMath::kTransposed16>(p, stream);
  if (math == WsMath::kTransposed32)
    return launch_sparse_attention_ws<kFmt, kDqk, WsMath::kTransposed32>(p, stream);
  if constexpr (kFmt == KvFormat::kBf16) {
    if (JFM_SPARSE_TMA_OUT != 0) encode_out_map(p);
    return launch_sparse_attention_ws<kFmt, kDqk, WsMath::kRoles>(p, stream);
  } else {
    if (math == WsMath::kRolesPair) {
      const cudaError_t e = launch_sparse_attention_ws<kFmt, kDqk, WsMath::kRolesPair>(p, stream);
      if (e != cudaErrorNotSupported) return e;  // else not every pair fits at once: unpaired
    }
    // The FP8 producer does the most work per tile (gather + dequantization): registers to it.
    SparseDecodeParams pw = with_load16_for(p_in, WsMath::kRolesWide);
    if constexpr (fp8_tma_out(kFmt)) encode_out_map(pw);  // (its staged output; params.h)
    return launch_sparse_attention_ws<kFmt, kDqk, WsMath::kRolesWide>(pw, stream);
  }
}
}  // namespace

// A CTA's query rows are the heads (at most 64): the transposed math up to 32, else the role
// split (FP8: the wide producer, or CTA pairs where pair_pays).
WsMath sparse_ws_math(const SparseDecodeParams& p, KvFormat format) {
  if (p.h_q <= 16) return WsMath::kTransposed16;
  if (p.h_q <= 32) return WsMath::kTransposed32;
  if (format == KvFormat::kBf16) return WsMath::kRoles;
  return pair_pays(p, format) ? WsMath::kRolesPair : WsMath::kRolesWide;
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
