// Helpers every FFI handler file shares: error values, shape strings, optional operands.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

// The XLA FFI traits of every handler. JFM_FFI_CMD_BUFFER (off; =1 for A/B): the handlers declare
// themselves command-buffer compatible (kCmdBufferCompatible), so XLA captures our calls into the
// unit's CUDA graph. It is off because that capture costs the host more than it saves: XLA then
// updates the graph's nodes for our calls at every execution (tracing the handler again under
// stream capture when buffer addresses change), before the graph launches, so the host's work
// adds to the GPU's instead of overlapping it. Without the trait XLA launches the graph segments
// around each call and runs the handler on the stream, ahead of the GPU. H100, the 61-layer
// attention step (benchmarks/bench_decode.py --loop-only, h_q 128, s_k 4096; step / GPU busy):
// b 2 2135 -> 1774 us (1.39 -> 1.13), b 16 3692 -> 3569 (1.11 -> 1.07), b 64 9615 -> 9568 (1.07
// -> 1.06), measured as `--xla_gpu_enable_command_buffer=-CUSTOM_CALL` (PERFORMANCE.md, third
// 2026-12-06 session).
#ifndef JFM_FFI_CMD_BUFFER
#define JFM_FFI_CMD_BUFFER 0
#endif
#if JFM_FFI_CMD_BUFFER
#define JFM_FFI_TRAITS {xla::ffi::Traits::kCmdBufferCompatible}
#else
#define JFM_FFI_TRAITS {}
#endif

namespace jfm {
namespace ffi = xla::ffi;

inline std::string dims_str(const ffi::AnyBuffer::Dimensions& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

inline ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("jax_flashmla: " + what);
}

inline ffi::Error cuda_error(const char* what, cudaError_t e) {
  return ffi::Error::Internal(std::string("jax_flashmla: ") + what + ": " + cudaGetErrorString(e));
}

inline bool is_i32(const ffi::AnyBuffer& b) { return b.element_type() == ffi::DataType::S32; }

// Optional operands travel as zero-size buffers when absent (one FFI target per op family, not
// one per set of operands present); absent -> nullptr.
template <typename T>
inline const T* optional_ptr(const ffi::AnyBuffer& b) {
  return b.element_count() == 0 ? nullptr : static_cast<const T*>(b.untyped_data());
}

// The split-KV schedule operands: int32 [num_sm_parts, kMetaInts] and [num_seqs + 1].
inline ffi::Error check_schedule(const ffi::AnyBuffer& meta, const ffi::AnyBuffer& nsplits,
                                 int num_seqs, int meta_ints) {
  auto md = meta.dimensions();
  auto nd = nsplits.dimensions();
  if (!is_i32(meta) || md.size() != 2 || md[1] != meta_ints || md[0] < 1)
    return invalid("tile_scheduler_metadata must be int32 [num_sm_parts, " +
                   std::to_string(meta_ints) + "], got " + dims_str(md));
  if (!is_i32(nsplits) || nd.size() != 1 || nd[0] != num_seqs + 1)
    return invalid("num_splits must be int32 [" + std::to_string(num_seqs + 1) + "], got " +
                   dims_str(nd));
  return ffi::Error::Success();
}

// The split-KV workspace results: float32 with exactly `slots * rows * d_v` / `slots * rows`.
inline ffi::Error check_workspace(const ffi::AnyBuffer& o_accum, const ffi::AnyBuffer& lse_accum,
                                  int64_t slots, int64_t rows, int64_t d_v) {
  if (o_accum.element_type() != ffi::DataType::F32 ||
      o_accum.element_count() != static_cast<size_t>(slots * rows * d_v) ||
      lse_accum.element_type() != ffi::DataType::F32 ||
      lse_accum.element_count() != static_cast<size_t>(slots * rows))
    return invalid("split-KV workspace must be float32 (o_accum " +
                   std::to_string(slots * rows * d_v) + ", lse_accum " +
                   std::to_string(slots * rows) + " elements)");
  return ffi::Error::Success();
}

}  // namespace jfm
