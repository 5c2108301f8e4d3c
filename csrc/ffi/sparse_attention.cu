// XLA FFI handlers of the sparse attention family (one kernel template, csrc/kernels/sm90/decode/
// sparse/kernel.cuh):
//   jax_flashmla_sparse_decode   q, kv_cache, indices, topk_length, extra_kv_cache, extra_indices,
//                                extra_topk_length, attn_sink, tile_scheduler_metadata, num_splits
//                                -> out, lse, o_accum, lse_accum           (main kernel -> combine)
//   jax_flashmla_sparse_prefill  q, kv, indices, attn_sink, topk_length -> out, max_logits, lse
// Absent optional operands arrive as zero-size buffers. Caches: bf16 [.., d_qk], or FP8 uint8 in
// the V3.2 (656 bytes, d_qk 576) or V4 (584 bytes, d_qk 512) layout.
#include <cuda_bf16.h>

#include "ffi/ffi_utils.h"
#include "kernels/params.h"
#include "kernels/variant.h"

namespace jfm {
namespace {

// The format of a pool [num_blocks, block_size, 1, width] read with queries of width d_qk.
ffi::Error pool_format(const ffi::AnyBuffer& kv, int64_t d_qk, const char* name, KvFormat* fmt) {
  auto kd = kv.dimensions();
  if (kd.size() != 4 || kd[2] != 1 || kd[0] < 1 || kd[1] < 1)
    return invalid(std::string(name) + " must be [num_blocks, block_size, 1, width], got " +
                   dims_str(kd));
  if (kv.element_type() == ffi::DataType::BF16 && kd[3] == d_qk) {
    *fmt = KvFormat::kBf16;
  } else if (kv.element_type() == ffi::DataType::U8 && d_qk == 576 && kd[3] == 656) {
    *fmt = KvFormat::kFp8V32;
  } else if (kv.element_type() == ffi::DataType::U8 && d_qk == 512 && kd[3] == 584) {
    *fmt = KvFormat::kFp8V4;
  } else {
    return invalid(std::string(name) + ": expected bfloat16 [.., " + std::to_string(d_qk) +
                   "] or a uint8 FP8 cache (656 bytes for d_qk 576, 584 for d_qk 512), got " +
                   dims_str(kd));
  }
  return ffi::Error::Success();
}

// Fills `pool` from a cache, its indices [tokens, topk] and optional topk_length [b].
ffi::Error make_pool(const ffi::AnyBuffer& kv, const ffi::AnyBuffer& idx,
                     const ffi::AnyBuffer& topk_length, int64_t tokens, int64_t b,
                     const char* name, SparsePool* pool) {
  auto kd = kv.dimensions();
  auto id = idx.dimensions();
  if (!is_i32(idx) || id.size() < 2 || id[id.size() - 1] < 1)
    return invalid(std::string(name) + " indices must be int32 [.., topk >= 1], got " + dims_str(id));
  int64_t n = 1;
  for (size_t i = 0; i + 1 < id.size(); ++i) n *= id[i];
  if (n != tokens) return invalid(std::string(name) + " indices: one list per query token");
  if (topk_length.element_count() != 0 &&
      (!is_i32(topk_length) || topk_length.element_count() != static_cast<size_t>(b)))
    return invalid(std::string(name) + " topk_length must be int32 [" + std::to_string(b) + "]");
  pool->data = static_cast<const uint8_t*>(kv.untyped_data());
  pool->num_rows = kd[0] * kd[1];
  pool->block_size = static_cast<int>(kd[1]);
  pool->indices = static_cast<const int32_t*>(idx.untyped_data());
  pool->topk_length = optional_ptr<int32_t>(topk_length);
  pool->topk = static_cast<int>(id[id.size() - 1]);
  pool->load16 = kd[1] % 2 == 0 && reinterpret_cast<uintptr_t>(pool->data) % 16 == 0;
  return ffi::Error::Success();
}

ffi::Error check_sink(const ffi::AnyBuffer& sink, int64_t h_q) {
  if (sink.element_count() != 0 &&
      (sink.element_type() != ffi::DataType::F32 || sink.element_count() != static_cast<size_t>(h_q)))
    return invalid("attn_sink must be float32 [h_q]");
  return ffi::Error::Success();
}

ffi::Error SparseDecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv0,
                            ffi::AnyBuffer idx0, ffi::AnyBuffer tl0, ffi::AnyBuffer kv1,
                            ffi::AnyBuffer idx1, ffi::AnyBuffer tl1, ffi::AnyBuffer sink,
                            ffi::AnyBuffer meta, ffi::AnyBuffer nsplits,
                            ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                            ffi::Result<ffi::AnyBuffer> o_accum,
                            ffi::Result<ffi::AnyBuffer> lse_accum, float softmax_scale) {
  auto qd = q.dimensions();
  if (q.element_type() != ffi::DataType::BF16 || qd.size() != 4 || (qd[3] != 576 && qd[3] != 512))
    return invalid("q must be bfloat16 [b, s_q, h_q, 576 | 512], got " + dims_str(qd));
  const int64_t b = qd[0], s_q = qd[1], h_q = qd[2], d_qk = qd[3];
  const int64_t tokens = b * s_q;
  if (b < 1 || s_q < 1 || h_q < 1) return invalid("empty q");
  SparseDecodeParams p{};
  KvFormat fmt, fmt1;
  ffi::Error err = pool_format(kv0, d_qk, "kv_cache", &fmt);
  if (err.failure()) return err;
  err = make_pool(kv0, idx0, tl0, tokens, b, "kv_cache", &p.pool[0]);
  if (err.failure()) return err;
  p.num_pools = 1;
  if (kv1.element_count() != 0) {
    err = pool_format(kv1, d_qk, "extra_kv_cache", &fmt1);
    if (err.failure()) return err;
    if (fmt1 != fmt) return invalid("extra_kv_cache must have kv_cache's format");
    err = make_pool(kv1, idx1, tl1, tokens, b, "extra_kv_cache", &p.pool[1]);
    if (err.failure()) return err;
    p.num_pools = 2;
  }
  err = check_sink(sink, h_q);
  if (err.failure()) return err;
  if (tokens > kMaxSchedulerBatch) return invalid("b * s_q above the scheduler's limit");
  err = check_schedule(meta, nsplits, static_cast<int>(tokens), kMetaInts);
  if (err.failure()) return err;
  const int num_sm_parts = static_cast<int>(meta.dimensions()[0]);
  auto od = out->dimensions();
  if (out->element_type() != ffi::DataType::BF16 || od.size() != 4 || od[0] != b || od[1] != s_q ||
      od[2] != h_q || od[3] != kDv)
    return invalid("out must be bfloat16 [b, s_q, h_q, 512]");
  auto ld = lse->dimensions();
  if (lse->element_type() != ffi::DataType::F32 || ld.size() != 3 || ld[0] != b || ld[1] != h_q ||
      ld[2] != s_q)
    return invalid("lse must be float32 [b, h_q, s_q]");
  err = check_workspace(*o_accum, *lse_accum, tokens + num_sm_parts, h_q, kDv);
  if (err.failure()) return err;
  if (h_q > kMaxGridY) return invalid("h_q above the combine grid's limit");

  p.q = q.untyped_data();
  p.attn_sink = optional_ptr<float>(sink);
  p.tile_scheduler_metadata = static_cast<const int32_t*>(meta.untyped_data());
  p.num_splits = static_cast<const int32_t*>(nsplits.untyped_data());
  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  p.max_logits = nullptr;
  p.o_accum = static_cast<float*>(o_accum->untyped_data());
  p.lse_accum = static_cast<float*>(lse_accum->untyped_data());
  p.batch = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.num_sm_parts = num_sm_parts;
  p.num_m_blocks = static_cast<int>((h_q + kBlockM - 1) / kBlockM);
  p.softmax_scale = softmax_scale;

  cudaError_t e = launch_sparse_decode(p, fmt, static_cast<int>(d_qk), stream);
  if (e != cudaSuccess) return cuda_error("sparse decode launch", e);
  CombineParams c{p.o_accum, p.lse_accum, p.num_splits, p.attn_sink, p.out, p.lse,
                  static_cast<int>(tokens), 1, p.s_q, p.h_q, 1, p.num_sm_parts};
  e = launch_combine<__nv_bfloat16>(c, stream);
  if (e != cudaSuccess) return cuda_error("combine launch", e);
  return ffi::Error::Success();
}

ffi::Error SparsePrefillImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                             ffi::AnyBuffer idx, ffi::AnyBuffer sink, ffi::AnyBuffer topk_length,
                             ffi::Result<ffi::AnyBuffer> out,
                             ffi::Result<ffi::AnyBuffer> max_logits,
                             ffi::Result<ffi::AnyBuffer> lse, float softmax_scale) {
  auto qd = q.dimensions();
  auto kd = kv.dimensions();
  if (q.element_type() != ffi::DataType::BF16 || qd.size() != 3 || (qd[2] != 576 && qd[2] != 512))
    return invalid("q must be bfloat16 [s_q, h_q, 576 | 512], got " + dims_str(qd));
  const int64_t s_q = qd[0], h_q = qd[1], d_qk = qd[2];
  if (kv.element_type() != ffi::DataType::BF16 || kd.size() != 3 || kd[1] != 1 || kd[2] != d_qk ||
      kd[0] < 1)
    return invalid("kv must be bfloat16 [s_kv, 1, d_qk], got " + dims_str(kd));
  if (s_q < 1 || h_q < 1) return invalid("empty q");
  SparseDecodeParams p{};
  p.pool[0].data = static_cast<const uint8_t*>(kv.untyped_data());
  p.pool[0].num_rows = kd[0];
  p.pool[0].block_size = 1;
  auto id = idx.dimensions();
  if (!is_i32(idx) || id.size() != 3 || id[0] != s_q || id[1] != 1 || id[2] < 1)
    return invalid("indices must be int32 [s_q, 1, topk], got " + dims_str(id));
  if (topk_length.element_count() != 0 &&
      (!is_i32(topk_length) || topk_length.element_count() != static_cast<size_t>(s_q)))
    return invalid("topk_length must be int32 [s_q]");
  ffi::Error err = check_sink(sink, h_q);
  if (err.failure()) return err;
  p.pool[0].indices = static_cast<const int32_t*>(idx.untyped_data());
  p.pool[0].topk_length = optional_ptr<int32_t>(topk_length);
  p.pool[0].topk = static_cast<int>(id[2]);
  p.num_pools = 1;
  auto od = out->dimensions();
  if (out->element_type() != ffi::DataType::BF16 || od.size() != 3 || od[0] != s_q ||
      od[1] != h_q || od[2] != kDv)
    return invalid("out must be bfloat16 [s_q, h_q, 512]");
  if (max_logits->element_type() != ffi::DataType::F32 ||
      max_logits->element_count() != static_cast<size_t>(s_q * h_q) ||
      lse->element_type() != ffi::DataType::F32 ||
      lse->element_count() != static_cast<size_t>(s_q * h_q))
    return invalid("max_logits and lse must be float32 [s_q, h_q]");
  const int64_t m_blocks = (h_q + kBlockM - 1) / kBlockM;
  if (m_blocks > kMaxGridY || s_q >= (int64_t{1} << 31)) return invalid("too many heads or tokens");
  p.q = q.untyped_data();
  p.attn_sink = optional_ptr<float>(sink);
  p.out = out->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  p.max_logits = static_cast<float*>(max_logits->untyped_data());
  p.batch = static_cast<int>(s_q);  // each query token is its own "sequence"
  p.s_q = 1;
  p.h_q = static_cast<int>(h_q);
  p.num_sm_parts = 0;
  p.num_m_blocks = static_cast<int>(m_blocks);
  p.softmax_scale = softmax_scale;
  cudaError_t e = launch_sparse_decode(p, KvFormat::kBf16, static_cast<int>(d_qk), stream);
  if (e != cudaSuccess) return cuda_error("sparse prefill launch", e);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jfm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmSparseDecodeHandler, jfm::SparseDecodeImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q
                                  .Arg<xla::ffi::AnyBuffer>()  // kv_cache
                                  .Arg<xla::ffi::AnyBuffer>()  // indices
                                  .Arg<xla::ffi::AnyBuffer>()  // topk_length (or empty)
                                  .Arg<xla::ffi::AnyBuffer>()  // extra_kv_cache (or empty)
                                  .Arg<xla::ffi::AnyBuffer>()  // extra_indices (or empty)
                                  .Arg<xla::ffi::AnyBuffer>()  // extra_topk_length (or empty)
                                  .Arg<xla::ffi::AnyBuffer>()  // attn_sink (or empty)
                                  .Arg<xla::ffi::AnyBuffer>()  // tile_scheduler_metadata
                                  .Arg<xla::ffi::AnyBuffer>()  // num_splits
                                  .Ret<xla::ffi::AnyBuffer>()  // out
                                  .Ret<xla::ffi::AnyBuffer>()  // lse
                                  .Ret<xla::ffi::AnyBuffer>()  // o_accum (workspace)
                                  .Ret<xla::ffi::AnyBuffer>()  // lse_accum (workspace)
                                  .Attr<float>("softmax_scale"),
                              JFM_FFI_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmSparsePrefillHandler, jfm::SparsePrefillImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q
                                  .Arg<xla::ffi::AnyBuffer>()  // kv
                                  .Arg<xla::ffi::AnyBuffer>()  // indices
                                  .Arg<xla::ffi::AnyBuffer>()  // attn_sink (or empty)
                                  .Arg<xla::ffi::AnyBuffer>()  // topk_length (or empty)
                                  .Ret<xla::ffi::AnyBuffer>()  // out
                                  .Ret<xla::ffi::AnyBuffer>()  // max_logits
                                  .Ret<xla::ffi::AnyBuffer>()  // lse
                                  .Attr<float>("softmax_scale"),
                              JFM_FFI_TRAITS);
