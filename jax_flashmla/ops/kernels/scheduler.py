"""The split-KV scheduler kernel (csrc/kernels/decode/scheduler.cu, handler csrc/ffi/metadata.cu):
lengths [num_seqs] (and optionally the live tiles [num_seqs, 3]) -> tile_scheduler_metadata
[num_parts, META_INTS], num_splits [num_seqs + 1]."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flashmla.ops.kernels import _ffi_call, limits

NAME = "scheduler"
TARGET = "jax_flashmla_mla_metadata"


def unsupported_reason(config, avals_in) -> str | None:
    num_seqs = avals_in[0].shape[0]
    if num_seqs > limits.MAX_SCHEDULER_BATCH:
        return (f"{num_seqs} sequences to schedule (the scheduler kernel takes at most "
                f"{limits.MAX_SCHEDULER_BATCH})")
    return None


def call(seqlens, num_parts: int, live=None):
    """The scheduler as a JAX function (also used by the decode kernels when no metadata is
    passed). live: None or int32 [num_seqs, 3] (ops/metadata.py, sparse_live)."""
    out = (jax.ShapeDtypeStruct((num_parts, limits.META_INTS), jnp.int32),
           jax.ShapeDtypeStruct((seqlens.shape[0] + 1,), jnp.int32))
    return jax.ffi.ffi_call(TARGET, out)(seqlens, _ffi_call.absent() if live is None else live)


lower = _ffi_call.lowering(lambda config, seqlens, live=None: call(seqlens, config.num_parts, live))
