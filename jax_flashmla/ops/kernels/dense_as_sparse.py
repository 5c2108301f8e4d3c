"""Dense decode calls the dense kernel does not cover, run on the sparse decode kernel.

The dense kernel reads bf16/fp16 caches of d_qk 576 in 64-token pages. A dense call with h_kv 1
and bf16 queries outside that (an FP8 cache in either layout, d_qk 512, another page size, an
attn_sink) is sparse decode over every token of each sequence: its indices are the flat cache rows
of tokens 0 .. L-1 (L = cache_seqlens clamped to the table's capacity, as SEMANTICS.md says),
-1 for pages outside the pool and, causal, for tokens after each query's window; topk_length = L,
so the kernel and its schedule skip the tiles past the length. Without causal masking (or with
s_q 1) the s_q queries of a sequence share one index list, and where s_q * h_q <= 128 they ride as
extra heads of one query token, so each token is read once, as in the dense kernel.

Where each sequence is one query token of the sparse call (s_q 1, or folded), a dense schedule
(``get_mla_metadata(cache_seqlens, s_q=, h_q=)``, made once per step) is the sparse kernel's: its
tiles are the same 64 positions, weighed alike (ceil(L / 64) live tiles), over as many parts (the
same rows per KV head); a part's end tile for a finished sequence is its own tile count, not the
list's, and past it every tile is dead anyway. Otherwise (causal MTP: b * s_q sequences) the call
computes its own (one scheduler launch).

On by default (tests/gpu/test_dense_as_sparse_gpu.py and the sanitizers passed on the H200);
``JAX_FLASHMLA_DENSE_AS_SPARSE=0`` turns it off (such calls then run the reference), for A/B runs.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jax_flashmla import reference
from jax_flashmla.ops.kernels import _ffi_call, sparse_decode

NAME = "dense_as_sparse"
ENABLE = "JAX_FLASHMLA_DENSE_AS_SPARSE"
MAX_FOLDED_HEADS = 128   # the sparse kernels take 1-128 heads per query token


def enabled() -> bool:
    return os.environ.get(ENABLE, "").strip().lower() not in ("0", "false", "no", "off")


def turned_off_reason() -> str:
    """Why the route is not taken when ``enabled()`` is False (the op's fallback warning and the
    model's backend prediction say the same)."""
    return f"it is turned off ({ENABLE}={os.environ.get(ENABLE)})"


def sparse_indices(block_table, cache_seqlens, *, num_blocks: int, block_size: int, s_q: int,
                   causal: bool):
    """The dense call as sparse decode: (indices [b, s_q or 1, C] int32, topk_length [b] int32),
    C = max_blocks * block_size. One index row per query when causal masking differs between the
    queries (causal, s_q > 1), else one shared row."""
    t, lengths, pages, present = reference.paged_tokens(
        block_table, cache_seqlens, num_blocks=num_blocks, block_size=block_size)
    rows = jnp.where(present, pages * block_size + t % block_size, -1)[:, None, :]  # [b, 1, C]
    if causal and s_q > 1:
        rows = jnp.where(reference.causal_window(t, lengths, s_q), rows, -1)      # [b, s_q, C]
    return rows, lengths


def _fold(config, q_shape) -> bool:
    """Whether the s_q queries ride as heads of one query token: they share one index list (no
    causal masking between them) and fit the kernels' 128 heads."""
    _, s_q, h_q, _ = q_shape
    return s_q > 1 and not config.causal and s_q * h_q <= MAX_FOLDED_HEADS


def _sparse_view(config, avals):
    """The sparse call's config, its operand shapes (what sparse_decode covers / runs) and
    whether the queries fold into heads."""
    q, kv, table = avals["q"], avals["kv_cache"], avals["block_table"]
    b, s_q, h_q, d_qk = q.shape
    fold = _fold(config, q.shape)
    q_s = (b, 1, s_q * h_q, d_qk) if fold else (b, s_q, h_q, d_qk)
    idx = (b, q_s[1], table.shape[1] * kv.shape[1])
    reuse = q_s[1] == 1 and "tile_scheduler_metadata" in avals
    present = ("q", "kv_cache", "indices", "topk_length") + (
        ("attn_sink",) if "attn_sink" in avals else ()) + (
        ("tile_scheduler_metadata", "num_splits") if reuse else ())
    shapes = {"q": jax.core.ShapedArray(q_s, q.dtype), "kv_cache": kv,
              "indices": jax.core.ShapedArray(idx, jnp.int32),
              "topk_length": jax.core.ShapedArray((b,), jnp.int32)}
    if "attn_sink" in avals:
        shapes["attn_sink"] = jax.core.ShapedArray((q_s[2],), jnp.float32)
    if reuse:
        shapes.update(tile_scheduler_metadata=avals["tile_scheduler_metadata"],
                      num_splits=avals["num_splits"])
    sparse = config.replace(mode="sparse", causal=False, present=present)
    return sparse, [shapes[n] for n in present], fold


def unsupported_reason(config, avals_in) -> str | None:
    if config.mode != "dense":
        return "it serves dense calls only (this call is sparse)"
    avals = dict(zip(config.present, avals_in))
    q, kv = avals["q"], avals["kv_cache"]
    if q.dtype != jnp.bfloat16:
        return f"it needs bf16 queries (got {q.dtype})"
    if kv.shape[2] != 1:
        return f"it needs h_kv 1 (got {kv.shape[2]})"
    if kv.shape[0] * kv.shape[1] >= 2**31:
        return f"its flat rows are int32 (the pool has {kv.shape[0] * kv.shape[1]} tokens)"
    if avals["block_table"].shape[1] * kv.shape[1] >= 2**31:
        return "its index list (max_blocks * block_size) must be below 2**31"
    sparse, sparse_avals, _ = _sparse_view(config, avals)
    reason = sparse_decode.unsupported_reason(sparse, sparse_avals)
    if reason is not None:
        return f"as sparse decode, {reason}"
    if not enabled():
        return turned_off_reason()
    return None


def _impl(config, *arrays):
    ops = dict(zip(config.present, arrays))
    q, kv = ops["q"], ops["kv_cache"]
    b, s_q, h_q, d_qk = q.shape
    avals = {n: jax.core.ShapedArray(x.shape, x.dtype) for n, x in ops.items()}
    sparse, _, fold = _sparse_view(config, avals)
    indices, lengths = sparse_indices(ops["block_table"], ops["cache_seqlens"],
                                      num_blocks=kv.shape[0], block_size=kv.shape[1], s_q=s_q,
                                      causal=config.causal)
    s_q_s = 1 if fold else s_q
    named = {"q": q.reshape(b, 1, s_q * h_q, d_qk) if fold else q, "kv_cache": kv,
             "indices": jnp.broadcast_to(indices, (b, s_q_s, indices.shape[-1])),
             "topk_length": lengths}
    if "attn_sink" in ops:   # folded heads are (query, head): query j's heads reuse the sinks
        named["attn_sink"] = jnp.tile(ops["attn_sink"], s_q) if fold else ops["attn_sink"]
    for name in ("tile_scheduler_metadata", "num_splits"):
        if name in ops:
            named[name] = ops[name]
    out, lse = sparse_decode._impl(sparse, *(named[n] for n in sparse.present))
    if fold:   # [b, 1, s_q * h_q, v] -> [b, s_q, h_q, v]; lse [b, s_q * h_q, 1] -> [b, h_q, s_q]
        out = out.reshape(b, s_q, h_q, out.shape[-1])
        lse = jnp.swapaxes(lse.reshape(b, s_q, h_q), 1, 2)
    return out, lse


lower = _ffi_call.lowering(_impl)
