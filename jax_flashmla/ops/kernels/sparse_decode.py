"""The sparse decode kernel (csrc/kernels/sm90/decode/sparse/, handler csrc/ffi/sparse_attention.cu):
DeepSeek Sparse Attention over one or two pools of bf16 or FP8 (V3.2 / V4 layout) caches, any h_q,
s_q, topk and page size, topk_length, attn_sink. Split-KV over the positions with the shared
scheduler and combine; without metadata the scheduler's custom call runs first."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla.ops import metadata as _meta
from jax_flashmla.ops.kernels import _ffi_call, limits, scheduler

NAME = "sparse_decode"
TARGET = "jax_flashmla_sparse_decode"


def unsupported_reason(config, avals_in) -> str | None:
    if config.mode != "sparse":
        return "it is sparse-only (this call is dense)"
    avals = dict(zip(config.present, avals_in))
    q, kv = avals["q"], avals["kv_cache"]
    b, s_q, h_q, d_qk = q.shape
    if q.dtype != jnp.bfloat16:
        return f"it needs bf16 queries (got {q.dtype})"
    if d_qk not in (576, 512):
        return f"it needs d_qk 576 or 512 (got {d_qk})"
    if config.kv_format == "bf16" and kv.dtype != jnp.bfloat16:
        return f"it reads bf16 or FP8 caches (got {kv.dtype})"
    if kv.shape[2] != 1:
        return f"it needs h_kv 1 (got {kv.shape[2]})"
    if config.head_dim_v != limits.D_V:
        return f"it needs head_dim_v {limits.D_V} (got {config.head_dim_v})"
    if b * s_q > limits.MAX_SCHEDULER_BATCH:
        return f"b * s_q = {b * s_q} is above the scheduler's limit {limits.MAX_SCHEDULER_BATCH}"
    if "tile_scheduler_metadata" in avals:
        if avals["tile_scheduler_metadata"].shape[1] != limits.META_INTS:
            return f"metadata width must be {limits.META_INTS}"
    return None


def _impl(config, *arrays):
    ops = dict(zip(config.present, arrays))
    q = ops["q"]
    b, s_q, h_q, _ = q.shape
    if "tile_scheduler_metadata" in ops:
        tiles, splits = ops["tile_scheduler_metadata"], ops["num_splits"]
    else:
        extra = ops["extra_indices"].shape[-1] if "extra_indices" in ops else None
        schedule = _meta.sparse_schedule(s_q=s_q, h_q=h_q, topk=ops["indices"].shape[-1],
                                         extra_topk=extra)
        lens = _meta.schedule_lengths(schedule, jnp.zeros((b,), jnp.int32))
        live = _meta.sparse_live(schedule, ops.get("topk_length"), ops.get("extra_topk_length"))
        tiles, splits = scheduler.call(lens, schedule.num_parts, live)
    get = lambda name, dtype=jnp.int32: ops[name] if name in ops else _ffi_call.absent(dtype)
    out_types = (jax.ShapeDtypeStruct((b, s_q, h_q, limits.D_V), q.dtype),
                 jax.ShapeDtypeStruct((b, h_q, s_q), jnp.float32),
                 *_ffi_call.workspace(b * s_q + tiles.shape[0], h_q))
    out, lse, _, _ = jax.ffi.ffi_call(TARGET, out_types)(
        q, ops["kv_cache"], ops["indices"], get("topk_length"),
        get("extra_kv_cache", ops["kv_cache"].dtype), get("extra_indices"),
        get("extra_topk_length"), get("attn_sink", jnp.float32), tiles, splits,
        softmax_scale=np.float32(config.softmax_scale))
    return out, lse


lower = _ffi_call.lowering(_impl)
