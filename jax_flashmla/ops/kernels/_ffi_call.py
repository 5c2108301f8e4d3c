"""What the kernel modules' lowerings share: an FFI call expressed in JAX (lowered with
``mlir.lower_fun``, so one lowering may emit several custom calls: the scheduler, then the kernel),
empty stand-ins for absent optional operands, and the split-KV workspace shapes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.interpreters import mlir

from jax_flashmla.ops.kernels import limits


def lowering(impl):
    """A kernel module's ``lower(ctx, *operands, config)`` from ``impl(config, *arrays)``, a JAX
    function that calls ``jax.ffi.ffi_call``."""

    def lower(ctx, *operands, config):
        return mlir.lower_fun(lambda *xs: impl(config, *xs), multiple_results=True)(ctx, *operands)

    return lower


def absent(dtype=jnp.int32):
    """A zero-size operand: the handlers read it as 'not given' (one FFI target per op family)."""
    return jnp.zeros((0,), dtype)


def workspace(slots: int, rows: int):
    """The split-KV workspace results (o_accum, lse_accum), flat float32: declared as extra
    results of the custom call and dropped, so XLA allocates them and the handler allocates
    nothing (stateless, safe for command-buffer capture)."""
    return (jax.ShapeDtypeStruct((slots * rows * limits.D_V,), jnp.float32),
            jax.ShapeDtypeStruct((slots * rows,), jnp.float32))
