// Every XLA FFI target this extension exports: X(target_name, HandlerSymbol).
// module.cc turns each into a pybind11 capsule; jax_flashmla/_ffi.py registers them all with
// jax.ffi.register_ffi_target(target_name, capsule, platform="CUDA").
// Add one line per handler defined (XLA_FFI_DEFINE_HANDLER_SYMBOL) in a csrc/ffi/*.cu file.
#pragma once

#define JFM_FFI_TARGETS(X)                                       \
  X(jax_flashmla_mla_metadata, JfmMlaMetadataHandler)            \
  X(jax_flashmla_dense_decode, JfmDenseDecodeHandler)            \
  X(jax_flashmla_dense_decode_auto, JfmDenseDecodeAutoHandler)
