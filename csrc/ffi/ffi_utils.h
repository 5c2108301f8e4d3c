// Helpers every FFI handler file shares: error values, shape strings, optional operands.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

// The XLA FFI traits of every handler. JFM_FFI_CMD_BUFFER (on; =0 for A/B): the handlers declare
// themselves command-buffer compatible (kCmdBufferCompatible), so XLA captures our calls into the
// unit's CUDA graph with its own kernels. It was off for one session (a single run had a 61-layer
// b 2 step at 2135 us captured against 1774 with the calls left out of the graphs, via
// `--xla_gpu_enable_command_buffer=-CUSTOM_CALL`); the builds' own A/B, three alternating runs per
// side on one warm H100, did not reproduce that: b 2 1746 / 1763 / 1812 us captured against 1860 /
// 1824 / 1814 uncaptured, b 16 3537-3569 against 3571-3603, b 64 equal (PERFORMANCE.md, fourth
// 2026-12-06 session). Captured stays the default.
#ifndef JFM_FFI_CMD_BUFFER
#define JFM_FFI_CMD_BUFFER 1
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
