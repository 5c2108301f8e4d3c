// XLA FFI handler of the split-KV scheduler:
//   jax_flashmla_mla_metadata   seqlens [num_seqs], live [num_seqs, 3] or [0] (absent)
//                               -> tile_scheduler_metadata, num_splits
// live weights the schedule by the tiles that cost work (ScheduleParams).
// Dense decode passes cache_seqlens; sparse decode one fixed length per query token (built in
// Python). The decode handlers take the result as operands: when a call passes no metadata, its
// lowering emits this custom call first.
#include "ffi/ffi_utils.h"
#include "kernels/params.h"

namespace jfm {
namespace {

ffi::Error MetadataImpl(cudaStream_t stream, ffi::AnyBuffer seqlens, ffi::AnyBuffer live,
                        ffi::Result<ffi::AnyBuffer> meta, ffi::Result<ffi::AnyBuffer> nsplits) {
  auto sd = seqlens.dimensions();
  if (!is_i32(seqlens) || sd.size() != 1 || sd[0] < 1)
    return invalid("seqlens must be int32 [num_seqs], num_seqs >= 1, got " + dims_str(sd));
  if (sd[0] > kMaxSchedulerBatch)
    return invalid("the scheduler takes at most " + std::to_string(kMaxSchedulerBatch) +
                   " sequences, got " + std::to_string(sd[0]));
  const int num_seqs = static_cast<int>(sd[0]);
  const bool has_live = live.element_count() > 0;  // zero-size: absent (every tile is live)
  if (has_live) {
    auto ld = live.dimensions();
    if (!is_i32(live) || ld.size() != 2 || ld[0] != num_seqs || ld[1] != 3)
      return invalid("live must be int32 [num_seqs, 3] with num_seqs = " +
                     std::to_string(num_seqs) + ", got " + dims_str(ld));
  }
  ffi::Error err = check_schedule(*meta, *nsplits, num_seqs, kMetaInts);
  if (err.failure()) return err;
  ScheduleParams p;
  p.seqlens = static_cast<const int32_t*>(seqlens.untyped_data());
  p.live = has_live ? static_cast<const int32_t*>(live.untyped_data()) : nullptr;
  p.num_seqs = num_seqs;
  p.num_sm_parts = static_cast<int>(meta->dimensions()[0]);
  p.tile_scheduler_metadata = static_cast<int32_t*>(meta->untyped_data());
  p.num_splits = static_cast<int32_t*>(nsplits->untyped_data());
  cudaError_t e = launch_schedule(p, stream);
  if (e != cudaSuccess) return cuda_error("scheduler launch", e);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jfm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JfmMlaMetadataHandler, jfm::MetadataImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()   // seqlens
                                  .Arg<xla::ffi::AnyBuffer>()   // live [num_seqs, 3] or [0]
                                  .Ret<xla::ffi::AnyBuffer>()   // tile_scheduler_metadata
                                  .Ret<xla::ffi::AnyBuffer>(),  // num_splits
                              JFM_FFI_TRAITS);
