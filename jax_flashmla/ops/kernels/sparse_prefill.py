"""The sparse prefill kernel: the sparse attention kernel (csrc/kernels/sm90/decode/sparse/) run
with one CTA per query token and row block and no split (handler csrc/ffi/sparse_attention.cu,
target jax_flashmla_sparse_prefill). bf16 q / kv, d_qk 576 or 512, d_v 512, h_kv 1, any h_q and
topk; returns out, max_logits, lse."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla.ops.kernels import _ffi_call, limits

NAME = "sparse_prefill"
TARGET = "jax_flashmla_sparse_prefill"


def unsupported_reason(config, avals_in) -> str | None:
    avals = dict(zip(config.present, avals_in))
    q, kv = avals["q"], avals["kv"]
    s_q, h_q, d_qk = q.shape
    if q.dtype != jnp.bfloat16:
        return f"it needs bf16 q and kv (got {q.dtype})"
    if d_qk not in (576, 512):
        return f"it needs d_qk 576 or 512 (got {d_qk})"
    if kv.shape[1] != 1:
        return f"it needs h_kv 1 (got {kv.shape[1]})"
    if config.head_dim_v != limits.D_V:
        return f"it needs head_dim_v {limits.D_V} (got {config.head_dim_v})"
    if -(-h_q // limits.BLOCK_M) > limits.MAX_GRID_Y:
        return f"h_q {h_q} is above its grid limit"
    return None


def _impl(config, *arrays):
    ops = dict(zip(config.present, arrays))
    q = ops["q"]
    s_q, h_q, _ = q.shape
    get = lambda name, dtype: ops[name] if name in ops else _ffi_call.absent(dtype)
    out_types = (jax.ShapeDtypeStruct((s_q, h_q, limits.D_V), q.dtype),
                 jax.ShapeDtypeStruct((s_q, h_q), jnp.float32),
                 jax.ShapeDtypeStruct((s_q, h_q), jnp.float32))
    return tuple(jax.ffi.ffi_call(TARGET, out_types)(
        q, ops["kv"], ops["indices"], get("attn_sink", jnp.float32), get("topk_length", jnp.int32),
        softmax_scale=np.float32(config.softmax_scale)))


lower = _ffi_call.lowering(_impl)
