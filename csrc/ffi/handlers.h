// Every XLA FFI target this extension exports: X(target_name, HandlerSymbol).
// module.cc turns each into a pybind11 capsule; jax_flashmla/_ffi.py registers them all with
// jax.ffi.register_ffi_target(target_name, capsule, platform="CUDA").
// One handler file per kernel family in csrc/ffi/; add a line here for each handler it defines.
#pragma once

#define JFM_FFI_TARGETS(X)                                     \
  X(jax_flashmla_mla_metadata, JfmMlaMetadataHandler)          \
  X(jax_flashmla_dense_decode, JfmDenseDecodeHandler)          \
  X(jax_flashmla_sparse_decode, JfmSparseDecodeHandler)        \
  X(jax_flashmla_sparse_prefill, JfmSparsePrefillHandler)
