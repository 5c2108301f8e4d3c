"""The Python side of each CUDA kernel, one module per kernel: which calls it covers
(``unsupported_reason(config, avals_in)``: None, or a short reason) and how a call lowers to its XLA
FFI targets (``lower(ctx, *operands, config)``). A primitive takes an ordered tuple of these
(``ops/_primitive.define_primitive(kernels=...)``) and runs the first that covers the call.

``limits`` restates the kernels' shared constants (csrc/kernels/params.h is the truth; the
extension exports its values and ``jax_flashmla._ffi`` refuses to use a build that disagrees).
docs/LAYOUT.md says which files a new kernel touches.
"""
