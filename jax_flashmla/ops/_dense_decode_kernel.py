"""The dense decode kernel's Python side: which calls it covers, and its XLA FFI lowering.

The lead's ``mla_decode`` primitive (ops/decode.py) calls ``unsupported_reason`` and ``lower`` from
its CUDA lowering. One FFI call runs the whole op: (the scheduler, when no metadata is passed,)
the split-KV main kernel and the combine kernel (csrc/ffi/dense_decode.cu).

The split-KV workspace (partial outputs and their lse, float32, one slot per (sequence, chunk):
at most b + num_sm_parts slots) is declared here as two extra results of the custom call, which
this lowering drops: XLA allocates it like any buffer, nothing is allocated inside the handler,
and the handler stays safe for command-buffer (CUDA graph) capture.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashmla.ops import metadata as _meta

D_QK = 576
D_V = 512
PAGE_BLOCK = _meta.PAGE_BLOCK   # the kernel's KV tile is one page (kPageBlock)
_TARGET = "jax_flashmla_dense_decode"
_TARGET_AUTO = "jax_flashmla_dense_decode_auto"
_UNSUPPORTED_OPERANDS = ("indices", "topk_length", "attn_sink", "extra_kv_cache", "extra_indices",
                         "extra_topk_length")


def unsupported_reason(config, avals_in) -> str | None:
    """None when the dense SM90 kernel covers this call, else a short reason."""
    if config.mode != "dense":
        return "sparse mode not implemented in the kernel"
    if config.kv_format != "bf16":
        return "FP8 KV cache not implemented in the dense kernel"
    for name in _UNSUPPORTED_OPERANDS:
        if name in config.present:
            return f"{name} not supported by the dense kernel"
    avals = dict(zip(config.present, avals_in))
    q, kv = avals["q"], avals["kv_cache"]
    if q.dtype not in (jnp.bfloat16, jnp.float16) or kv.dtype != q.dtype:
        return f"dtype {q.dtype} / cache {kv.dtype} (kernel needs bf16 or fp16, both the same)"
    if q.shape[-1] != D_QK:
        return f"d_qk {q.shape[-1]} (kernel needs {D_QK})"
    if config.head_dim_v != D_V:
        return f"head_dim_v {config.head_dim_v} (kernel needs {D_V})"
    if kv.shape[1] != PAGE_BLOCK:
        return f"page block {kv.shape[1]} (kernel needs {PAGE_BLOCK})"
    b, s_q, h_q, _ = q.shape
    if s_q * h_q > 65535:
        return f"s_q * h_q = {s_q * h_q} (the kernels' grids take at most 65535)"
    if b > 40000:
        return f"batch {b} (the scheduler kernel takes at most 40000)"
    if "tile_scheduler_metadata" in avals:
        tiles = avals["tile_scheduler_metadata"]
        if tiles.shape[1] != _meta.TILE_METADATA_WIDTH:
            return f"metadata width {tiles.shape[1]} (kernel needs {_meta.TILE_METADATA_WIDTH})"
    return None


def workspace_avals(b: int, s_q: int, h_q: int, num_parts: int):
    """The two split-KV workspace buffers (o_accum, lse_accum), flat float32."""
    slots = b + num_parts
    return (jax.core.ShapedArray((slots * h_q * s_q * D_V,), jnp.float32),
            jax.core.ShapedArray((slots * h_q * s_q,), jnp.float32))


def lower(ctx, *operands, config):
    avals = dict(zip(config.present, ctx.avals_in))
    ops = dict(zip(config.present, operands))
    b, s_q, h_q, _ = avals["q"].shape
    h_kv = avals["kv_cache"].shape[2]
    attrs = dict(softmax_scale=np.float32(config.softmax_scale), causal=np.int32(config.causal))
    args = [ops["q"], ops["kv_cache"], ops["block_table"], ops["cache_seqlens"]]
    if "tile_scheduler_metadata" in ops:
        parts = avals["tile_scheduler_metadata"].shape[0]
        extra = workspace_avals(b, s_q, h_q, parts)
        rule = jax.ffi.ffi_lowering(_TARGET)
        args += [ops["tile_scheduler_metadata"], ops["num_splits"]]
    else:
        parts = _meta.num_sm_parts(s_q=s_q, h_q=h_q, h_kv=h_kv)
        extra = workspace_avals(b, s_q, h_q, parts) + (
            jax.core.ShapedArray((parts, _meta.TILE_METADATA_WIDTH), jnp.int32),
            jax.core.ShapedArray((b + 1,), jnp.int32))
        rule = jax.ffi.ffi_lowering(_TARGET_AUTO)
    sub = ctx.replace(avals_out=[*ctx.avals_out, *extra])
    results = rule(sub, *args, **attrs)
    return results[:2]
