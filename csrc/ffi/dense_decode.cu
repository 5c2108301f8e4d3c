// XLA FFI handlers of the dense paged MLA decode (bf16/fp16 cache, d_qk 576, d_v 512, page 64).
//
//   jax_flashmla_mla_metadata        cache_seqlens -> tile_scheduler_metadata, num_splits
//   jax_flashmla_dense_decode        q, kv_cache, block_table, cache_seqlens, metadata, num_splits
//                                    -> out, lse, o_accum, lse_accum
//   jax_flashmla_dense_decode_auto   q, kv_cache, block_table, cache_seqlens
//                                    -> out, lse, o_accum, lse_accum, metadata, num_splits
//
// o_accum / lse_accum are the split-KV workspace, sized in Python (jax_flashmla/ops/
// _dense_decode_kernel.py) and returned as extra results that the primitive drops: no allocation
// inside the handler, so the handlers are stateless and safe for command-buffer capture.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "kernels/common/decode_params.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

std::string dims_str(const ffi::AnyBuffer::Dimensions& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error cuda_error(const char* what, cudaError_t e) {
  return ffi::Error::Internal(std::string("jax_flashmla: ") + what + ": " + cudaGetErrorString(e));
}

bool is_i32(const ffi::AnyBuffer& b) { return b.element_type() == ffi::DataType::S32; }

ffi::Error check_metadata(const ffi::AnyBuffer& seqlens, ffi::AnyBuffer meta,
                          ffi::AnyBuffer nsplits, int batch, jfm::MetadataParams* mp) {
  auto md = meta.dimensions();
  auto nd = nsplits.dimensions();
  if (!is_i32(meta) || md.size() != 2 || md[1] != jfm::kMetaInts || md[0] < 1)
    return ffi::Error::InvalidArgument("tile_scheduler_metadata must be int32 [num_sm_parts, 8], got " +
                                       dims_str(md));
  if (!is_i32(nsplits) || nd.size() != 1 || nd[0] != batch + 1)
    return ffi::Error::InvalidArgument("num_splits must be int32 [b + 1], got " + dims_str(nd));
  mp->cache_seqlens = static_cast<const int32_t*>(seqlens.untyped_data());
  mp->tile_scheduler_metadata = static_cast<int32_t*>(meta.untyped_data());
  mp->num_splits = static_cast<int32_t*>(nsplits.untyped_data());
  if (batch > 40000)  // the scheduler keeps one int per sequence in shared memory
    return ffi::Error::InvalidArgument("batch > 40000 not supported by the scheduler kernel");
  mp->batch = batch;
  mp->num_sm_parts = static_cast<int>(md[0]);
  return ffi::Error::Success();
}

// Checks every shape the kernels rely on and fills the params (metadata pointers excluded).
ffi::Error prepare(ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::AnyBuffer bt, ffi::AnyBuffer seqlens,
                   ffi::Result<ffi::AnyBuffer>& out, ffi::Result<ffi::AnyBuffer>& lse,
                   ffi::Result<ffi::AnyBuffer>& o_accum, ffi::Result<ffi::AnyBuffer>& lse_accum,
                   int num_sm_parts, float softmax_scale, int32_t causal,
                   jfm::DenseDecodeParams* p) {
  auto qd = q.dimensions();
  auto kd = kv.dimensions();
  auto bd = bt.dimensions();
  auto sd = seqlens.dimensions();
  const auto dt = q.element_type();
  if (dt != ffi::DataType::BF16 && dt != ffi::DataType::F16)
    return ffi::Error::InvalidArgument("q must be bfloat16 or float16");
  if (kv.element_type() != dt) return ffi::Error::InvalidArgument("kv_cache dtype must equal q's");
  if (qd.size() != 4 || qd[3] != jfm::kDqk)
    return ffi::Error::InvalidArgument("q must be [b, s_q, h_q, 576], got " + dims_str(qd));
  if (kd.size() != 4 || kd[1] != jfm::kPageBlock || kd[3] != jfm::kDqk)
    return ffi::Error::InvalidArgument("kv_cache must be [num_blocks, 64, h_kv, 576], got " +
                                       dims_str(kd));
  const int64_t b = qd[0], s_q = qd[1], h_q = qd[2], h_kv = kd[2];
  if (b < 1 || s_q < 1 || h_q < 1 || h_kv < 1 || h_q % h_kv != 0)
    return ffi::Error::InvalidArgument("need b, s_q, h_q, h_kv >= 1 and h_q % h_kv == 0");
  if (!is_i32(bt) || bd.size() != 2 || bd[0] != b || bd[1] < 1)
    return ffi::Error::InvalidArgument("block_table must be int32 [b, max_blocks], got " + dims_str(bd));
  if (!is_i32(seqlens) || sd.size() != 1 || sd[0] != b)
    return ffi::Error::InvalidArgument("cache_seqlens must be int32 [b], got " + dims_str(sd));
  auto od = out->dimensions();
  if (out->element_type() != dt || od.size() != 4 || od[0] != b || od[1] != s_q || od[2] != h_q ||
      od[3] != jfm::kDv)
    return ffi::Error::InvalidArgument("out must be [b, s_q, h_q, 512] in q's dtype");
  auto ld = lse->dimensions();
  if (lse->element_type() != ffi::DataType::F32 || ld.size() != 3 || ld[0] != b || ld[1] != h_q ||
      ld[2] != s_q)
    return ffi::Error::InvalidArgument("lse must be float32 [b, h_q, s_q]");
  const int64_t slots = b + num_sm_parts;
  if (o_accum->element_type() != ffi::DataType::F32 ||
      o_accum->element_count() != static_cast<size_t>(slots * h_q * s_q * jfm::kDv))
    return ffi::Error::InvalidArgument("o_accum workspace must be float32 with (b + num_sm_parts) * "
                                       "h_q * s_q * 512 elements");
  if (lse_accum->element_type() != ffi::DataType::F32 ||
      lse_accum->element_count() != static_cast<size_t>(slots * h_q * s_q))
    return ffi::Error::InvalidArgument("lse_accum workspace must be float32 with (b + num_sm_parts) * "
                                       "h_q * s_q elements");
  if (b * s_q * h_q >= (int64_t{1} << 31) || kd[0] * 64 * h_kv >= (int64_t{1} << 40))
    return ffi::Error::InvalidArgument("problem too large for 32-bit row indices");
  p->q = q.untyped_data();
  p->kv = kv.untyped_data();
  p->block_table = static_cast<const int32_t*>(bt.untyped_data());
  p->cache_seqlens = static_cast<const int32_t*>(seqlens.untyped_data());
  p->out = out->untyped_data();
  p->lse = static_cast<float*>(lse->untyped_data());
  p->o_accum = static_cast<float*>(o_accum->untyped_data());
  p->lse_accum = static_cast<float*>(lse_accum->untyped_data());
  p->batch = static_cast<int>(b);
  p->s_q = static_cast<int>(s_q);
  p->h_q = static_cast<int>(h_q);
  p->h_kv = static_cast<int>(h_kv);
  p->max_blocks = static_cast<int>(bd[1]);
  p->num_kv_blocks = static_cast<int>(kd[0]);
  p->num_sm_parts = num_sm_parts;
  const int64_t rows = s_q * (h_q / h_kv);
  p->num_m_blocks = static_cast<int>((rows + jfm::kBlockM - 1) / jfm::kBlockM);
  p->softmax_scale = softmax_scale;
  p->causal = causal != 0;
  return ffi::Error::Success();
}

ffi::Error launch(const jfm::DenseDecodeParams& p, ffi::DataType dt, cudaStream_t stream) {
  if (p.num_m_blocks > 65535 || p.h_kv > 65535 || p.s_q * p.h_q > 65535)
    return ffi::Error::InvalidArgument("too many query rows per KV head, KV heads or s_q * h_q "
                                       "(> 65535) for the kernels' grids");
  cudaError_t e = dt == ffi::DataType::BF16 ? jfm::launch_dense_decode_bf16(p, stream)
                                            : jfm::launch_dense_decode_fp16(p, stream);
  if (e != cudaSuccess) return cuda_error("dense decode launch", e);
  return ffi::Error::Success();
}

ffi::Error MetadataImpl(cudaStream_t stream, ffi::AnyBuffer seqlens,
                        ffi::Result<ffi::AnyBuffer> meta, ffi::Result<ffi::AnyBuffer> nsplits) {
  auto sd = seqlens.dimensions();
  if (!is_i32(seqlens) || sd.size() != 1 || sd[0] < 1)
    return ffi::Error::InvalidArgument("cache_seqlens must be int32 [b], b >= 1");
  jfm::MetadataParams mp;
  ffi::Error err = check_metadata(seqlens, *meta, *nsplits, static_cast<int>(sd[0]), &mp);
  if (err.failure()) return err;
  cudaError_t e = jfm::launch_mla_metadata(mp, stream);
  if (e != cudaSuccess) return cuda_error("metadata launch", e);
  return ffi::Error::Success();
}

// Both decode handlers: check, (schedule when the call owns the metadata,) decode, combine.
ffi::Error Decode(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::AnyBuffer bt,
                  ffi::AnyBuffer seqlens, ffi::AnyBuffer meta, ffi::AnyBuffer nsplits,
                  ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                  ffi::Result<ffi::AnyBuffer> o_accum, ffi::Result<ffi::AnyBuffer> lse_accum,
                  float softmax_scale, int32_t causal, bool schedule_here) {
  jfm::MetadataParams mp;
  const int b = q.dimensions().size() == 4 ? static_cast<int>(q.dimensions()[0]) : -1;
  ffi::Error err = check_metadata(seqlens, meta, nsplits, b, &mp);
  if (err.failure()) return err;
  jfm::DenseDecodeParams p;
  err = prepare(q, kv, bt, seqlens, out, lse, o_accum, lse_accum, mp.num_sm_parts, softmax_scale,
                causal, &p);
  if (err.failure()) return err;
  if (schedule_here) {
    cudaError_t e = jfm::launch_mla_metadata(mp, stream);
    if (e != cudaSuccess) return cuda_error("metadata launch", e);
  }
  p.tile_scheduler_metadata = mp.tile_scheduler_metadata;
  p.num_splits = mp.num_splits;
  return launch(p, q.element_type(), stream);
}

ffi::Error DenseDecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                           ffi::AnyBuffer bt, ffi::AnyBuffer seqlens, ffi::AnyBuffer meta,
                           ffi::AnyBuffer nsplits, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> o_accum,
                           ffi::Result<ffi::AnyBuffer> lse_accum, float softmax_scale,
                           int32_t causal) {
  return Decode(stream, q, kv, bt, seqlens, meta, nsplits, out, lse, o_accum, lse_accum,
                softmax_scale, causal, /*schedule_here=*/false);
}

// Metadata not passed in: it is computed into two extra results, then used.
ffi::Error DenseDecodeAutoImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                               ffi::AnyBuffer bt, ffi::AnyBuffer seqlens,
                               ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                               ffi::Result<ffi::AnyBuffer> o_accum,
                               ffi::Result<ffi::AnyBuffer> lse_accum,
                               ffi::Result<ffi::AnyBuffer> meta,
                               ffi::Result<ffi::AnyBuffer> nsplits, float softmax_scale,
                               int32_t causal) {
  return Decode(stream, q, kv, bt, seqlens, *meta, *nsplits, out, lse, o_accum, lse_accum,
                softmax_scale, causal, /*schedule_here=*/true);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmMlaMetadataHandler, MetadataImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmDenseDecodeHandler, DenseDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // kv_cache
                                  .Arg<ffi::AnyBuffer>()  // block_table
                                  .Arg<ffi::AnyBuffer>()  // cache_seqlens
                                  .Arg<ffi::AnyBuffer>()  // tile_scheduler_metadata
                                  .Arg<ffi::AnyBuffer>()  // num_splits
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Ret<ffi::AnyBuffer>()  // o_accum (workspace)
                                  .Ret<ffi::AnyBuffer>()  // lse_accum (workspace)
                                  .Attr<float>("softmax_scale")
                                  .Attr<int32_t>("causal"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmDenseDecodeAutoHandler, DenseDecodeAutoImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // kv_cache
                                  .Arg<ffi::AnyBuffer>()  // block_table
                                  .Arg<ffi::AnyBuffer>()  // cache_seqlens
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Ret<ffi::AnyBuffer>()  // o_accum (workspace)
                                  .Ret<ffi::AnyBuffer>()  // lse_accum (workspace)
                                  .Ret<ffi::AnyBuffer>()  // tile_scheduler_metadata
                                  .Ret<ffi::AnyBuffer>()  // num_splits
                                  .Attr<float>("softmax_scale")
                                  .Attr<int32_t>("causal"),
                              {ffi::Traits::kCmdBufferCompatible});
