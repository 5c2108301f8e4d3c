"""The dense paged decode kernel (csrc/kernels/sm90/decode/dense/, handler csrc/ffi/dense_decode.cu):
bf16/fp16 cache, d_qk 576, d_v 512, page 64, any h_kv, s_q, causal. One FFI call runs the main
kernel and the combine; without metadata the scheduler's custom call runs first."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla.ops import metadata as _meta
from jax_flashmla.ops.kernels import _ffi_call, limits, scheduler

NAME = "dense_decode"
TARGET = "jax_flashmla_dense_decode"
_SPARSE_ONLY = ("indices", "topk_length", "attn_sink", "extra_kv_cache", "extra_indices",
                "extra_topk_length")


def unsupported_reason(config, avals_in) -> str | None:
    if config.mode != "dense":
        return "it is dense-only (this call is sparse)"
    if config.kv_format != "bf16":
        return "it reads bf16/fp16 caches only (this cache is FP8)"
    for name in _SPARSE_ONLY:
        if name in config.present:
            return f"it takes no {name}"
    avals = dict(zip(config.present, avals_in))
    q, kv = avals["q"], avals["kv_cache"]
    if q.dtype not in (jnp.bfloat16, jnp.float16) or kv.dtype != q.dtype:
        return f"it needs q and cache both bf16 or both fp16 (got {q.dtype} / {kv.dtype})"
    if q.shape[-1] != limits.DENSE_D_QK:
        return f"it needs d_qk {limits.DENSE_D_QK} (got {q.shape[-1]})"
    if config.head_dim_v != limits.D_V:
        return f"it needs head_dim_v {limits.D_V} (got {config.head_dim_v})"
    if kv.shape[1] != limits.PAGE_BLOCK:
        return f"it needs page size {limits.PAGE_BLOCK} (got {kv.shape[1]})"
    b, s_q, h_q, _ = q.shape
    if s_q * h_q > limits.MAX_GRID_Y:
        return f"s_q * h_q = {s_q * h_q} is above its grid limit {limits.MAX_GRID_Y}"
    if "tile_scheduler_metadata" in avals:
        if avals["tile_scheduler_metadata"].shape[1] != limits.META_INTS:
            return f"metadata width must be {limits.META_INTS}"
    elif b > limits.MAX_SCHEDULER_BATCH:
        return f"batch {b} is above the scheduler's limit {limits.MAX_SCHEDULER_BATCH}"
    return None


def _impl(config, *arrays):
    ops = dict(zip(config.present, arrays))
    q, kv = ops["q"], ops["kv_cache"]
    b, s_q, h_q, _ = q.shape
    if "tile_scheduler_metadata" in ops:
        tiles, splits = ops["tile_scheduler_metadata"], ops["num_splits"]
    else:
        schedule = _meta.dense_schedule(s_q=s_q, h_q=h_q, h_kv=kv.shape[2])
        tiles, splits = scheduler.call(ops["cache_seqlens"], schedule.num_parts)
    out_types = (jax.ShapeDtypeStruct((b, s_q, h_q, limits.D_V), q.dtype),
                 jax.ShapeDtypeStruct((b, h_q, s_q), jnp.float32),
                 *_ffi_call.workspace(b + tiles.shape[0], s_q * h_q))
    out, lse, _, _ = jax.ffi.ffi_call(TARGET, out_types)(
        q, kv, ops["block_table"], ops["cache_seqlens"], tiles, splits,
        softmax_scale=np.float32(config.softmax_scale), causal=np.int32(config.causal))
    return out, lse


lower = _ffi_call.lowering(_impl)
