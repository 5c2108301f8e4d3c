"""jax_flashmla: FlashMLA-class multi-head latent attention for JAX.

Public API (exact math in SEMANTICS.md of the project):
  mla_decode, get_mla_metadata, MLAMetadata, sparse_mla_prefill  -- the ops
  kv_cache                                                       -- paged-cache helpers (FP8 too)
  reference                                                      -- the pure-JAX semantics
  flash_mla                                                      -- FlashMLA's PyTorch spellings
  kernels_available()                                            -- can the CUDA kernels run here?
  enable_checks, checks_enabled, checks                          -- opt-in checked mode (checkify)
  export, deserialize, export_safety_checks                      -- jax.export with the ops' FFI calls
"""
from jax_flashmla import checks, kv_cache, reference
from jax_flashmla.checks import checks_enabled, enable_checks
from jax_flashmla._ffi import kernels_available
from jax_flashmla.ops._primitive import KernelFallbackWarning
from jax_flashmla.ops.decode import mla_decode
from jax_flashmla.ops.metadata import MLAMetadata, get_mla_metadata
from jax_flashmla.ops.prefill import sparse_mla_prefill
from jax_flashmla import flash_mla  # noqa: E402  (uses the ops above)
from jax_flashmla.exporting import deserialize, export, export_safety_checks  # noqa: E402

__version__ = "0.1.0"

__all__ = ["mla_decode", "get_mla_metadata", "MLAMetadata", "sparse_mla_prefill", "kv_cache",
           "reference", "flash_mla", "kernels_available", "KernelFallbackWarning", "checks",
           "enable_checks", "checks_enabled", "export", "deserialize", "export_safety_checks"]
