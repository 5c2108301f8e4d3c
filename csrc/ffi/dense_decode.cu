// XLA FFI handler of dense paged MLA decode (bf16/fp16 cache, d_qk 576, d_v 512, page 64):
//   jax_flashmla_dense_decode   q, kv_cache, block_table, cache_seqlens, tile_scheduler_metadata,
//                               num_splits -> out, lse, o_accum, lse_accum
// It checks every shape the kernels rely on, then runs main kernel -> combine. o_accum /
// lse_accum are the split-KV workspace, sized in Python (jax_flashmla/ops/kernels/dense_decode.py)
// and returned as extra results the primitive drops: nothing is allocated here, so the handler is
// stateless and safe for command-buffer capture (which is on: ffi_utils.h, JFM_FFI_TRAITS).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ffi/ffi_utils.h"
#include "kernels/params.h"

namespace jfm {
namespace {

ffi::Error DenseDecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                           ffi::AnyBuffer bt, ffi::AnyBuffer seqlens, ffi::AnyBuffer meta,
                           ffi::AnyBuffer nsplits, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> o_accum,
                           ffi::Result<ffi::AnyBuffer> lse_accum, float softmax_scale,
                           int32_t causal) {
  auto qd = q.dimensions();
  auto kd = kv.dimensions();
  auto bd = bt.dimensions();
  auto sd = seqlens.dimensions();
  const auto dt = q.element_type();
  if (dt != ffi::DataType::BF16 && dt != ffi::DataType::F16)
    return invalid("q must be bfloat16 or float16");
  if (kv.element_type() != dt) return invalid("kv_cache dtype must equal q's");
  if (qd.size() != 4 || qd[3] != kDenseDqk)
    return invalid("q must be [b, s_q, h_q, 576], got " + dims_str(qd));
  if (kd.size() != 4 || kd[1] != kPageBlock || kd[3] != kDenseDqk)
    return invalid("kv_cache must be [num_blocks, 64, h_kv, 576], got " + dims_str(kd));
  const int64_t b = qd[0], s_q = qd[1], h_q = qd[2], h_kv = kd[2];
  if (b < 1 || s_q < 1 || h_q < 1 || h_kv < 1 || h_q % h_kv != 0)
    return invalid("need b, s_q, h_q, h_kv >= 1 and h_q % h_kv == 0");
  if (!is_i32(bt) || bd.size() != 2 || bd[0] != b || bd[1] < 1)
    return invalid("block_table must be int32 [b, max_blocks], got " + dims_str(bd));
  if (!is_i32(seqlens) || sd.size() != 1 || sd[0] != b)
    return invalid("cache_seqlens must be int32 [b], got " + dims_str(sd));
  ffi::Error err = check_schedule(meta, nsplits, static_cast<int>(b), kMetaInts);
  if (err.failure()) return err;
  const int num_sm_parts = static_cast<int>(meta.dimensions()[0]);
  auto od = out->dimensions();
  if (out->element_type() != dt || od.size() != 4 || od[0] != b || od[1] != s_q || od[2] != h_q ||
      od[3] != kDv)
    return invalid("out must be [b, s_q, h_q, 512] in q's dtype");
  auto ld = lse->dimensions();
  if (lse->element_type() != ffi::DataType::F32 || ld.size() != 3 || ld[0] != b || ld[1] != h_q ||
      ld[2] != s_q)
    return invalid("lse must be float32 [b, h_q, s_q]");
  err = check_workspace(*o_accum, *lse_accum, b + num_sm_parts, h_q * s_q, kDv);
  if (err.failure()) return err;
  const int64_t rows = s_q * (h_q / h_kv);
  const int64_t m_blocks = (rows + kBlockM - 1) / kBlockM;
  if (m_blocks > kMaxGridY || h_kv > kMaxGridY || s_q * h_q > kMaxGridY)
    return invalid("too many query rows per KV head, KV heads or s_q * h_q (> 65535) for the "
                   "kernels' grids");
  if (b * s_q * h_q >= (int64_t{1} << 31)) return invalid("problem too large for 32-bit rows");

  DenseDecodeParams p;
  p.q = q.untyped_data();
  p.kv = kv.untyped_data();
  p.block_table = static_cast<const int32_t*>(bt.untyped_data());
  p.cache_seqlens = static_cast<const int32_t*>(seqlens.untyped_data());
  p.tile_scheduler_metadata = static_cast<const int32_t*>(meta.untyped_data());
  p.num_splits = static_cast<const int32_t*>(nsplits.untyped_data());
  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  p.o_accum = static_cast<float*>(o_accum->untyped_data());
  p.lse_accum = static_cast<float*>(lse_accum->untyped_data());
  p.batch = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.h_kv = static_cast<int>(h_kv);
  p.max_blocks = static_cast<int>(bd[1]);
  p.num_kv_blocks = static_cast<int>(kd[0]);
  p.num_sm_parts = num_sm_parts;
  p.num_m_blocks = static_cast<int>(m_blocks);
  p.softmax_scale = softmax_scale;
  p.causal = causal != 0;

  CombineParams c{p.o_accum, p.lse_accum, p.num_splits, nullptr, p.out, p.lse,
                  p.batch, p.s_q, p.s_q, p.h_q, p.h_kv, p.num_sm_parts};
  const bool is_bf16 = dt == ffi::DataType::BF16;
  cudaError_t e = is_bf16 ? launch_dense_decode_bf16(p, stream) : launch_dense_decode_fp16(p, stream);
  if (e != cudaSuccess) return cuda_error("dense decode launch", e);
  e = is_bf16 ? launch_combine<__nv_bfloat16>(c, stream) : launch_combine<__half>(c, stream);
  if (e != cudaSuccess) return cuda_error("combine launch", e);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jfm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmDenseDecodeHandler, jfm::DenseDecodeImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q
                                  .Arg<xla::ffi::AnyBuffer>()  // kv_cache
                                  .Arg<xla::ffi::AnyBuffer>()  // block_table
                                  .Arg<xla::ffi::AnyBuffer>()  // cache_seqlens
                                  .Arg<xla::ffi::AnyBuffer>()  // tile_scheduler_metadata
                                  .Arg<xla::ffi::AnyBuffer>()  // num_splits
                                  .Ret<xla::ffi::AnyBuffer>()  // out
                                  .Ret<xla::ffi::AnyBuffer>()  // lse
                                  .Ret<xla::ffi::AnyBuffer>()  // o_accum (workspace)
                                  .Ret<xla::ffi::AnyBuffer>()  // lse_accum (workspace)
                                  .Attr<float>("softmax_scale")
                                  .Attr<int32_t>("causal"),
                              JFM_FFI_TRAITS);
