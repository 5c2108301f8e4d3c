"""The pure-JAX semantics of every op (../shared/SEMANTICS.md): the CPU lowering and the test oracle.

Everything here is plain jax.numpy, float32 math with HIGHEST matmul precision, and never lets a
value from outside a query's attended set reach its result: keys are zeroed *before* the matmuls
(a NaN times a zero probability is still NaN) and gathers only ever use clamped, masked indices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flashmla import kv_cache as _kvc

_HIGHEST = jax.lax.Precision.HIGHEST


def attend(q, k, valid, *, softmax_scale: float, head_dim_v: int):
    """Masked softmax attention, the kernel shared by every op.

    q: [..., g, d] queries; k: [..., n, d] keys, whose first ``head_dim_v`` channels are the values
    (MLA in absorbed form); valid: [..., n] bool, broadcastable against q's / k's leading dims.
    Returns (out [..., g, head_dim_v] f32, max_logit [..., g] f32 (-inf when nothing is valid),
    lse [..., g] f32 natural log (+inf when nothing is valid)); out is 0 where nothing is valid.
    """
    q = q.astype(jnp.float32)
    k = jnp.where(valid[..., None], k.astype(jnp.float32), 0.0)
    logits = jnp.einsum("...gd,...nd->...gn", q, k, precision=_HIGHEST) * softmax_scale
    logits = jnp.where(valid[..., None, :], logits, -jnp.inf)
    max_logit = jnp.max(logits, axis=-1)
    has_any = max_logit > -jnp.inf
    shift = jnp.where(has_any, max_logit, 0.0)
    p = jnp.exp(logits - shift[..., None])  # exactly 0 where masked
    denom = jnp.sum(p, axis=-1)
    lse = jnp.where(has_any, jnp.log(jnp.where(has_any, denom, 1.0)) + shift, jnp.inf)
    out = jnp.einsum("...gn,...nv->...gv", p, k[..., :head_dim_v], precision=_HIGHEST)
    out = out / jnp.where(has_any, denom, 1.0)[..., None]
    return out, max_logit, lse


def apply_attn_sink(out, lse, attn_sink):
    """out * 1 / (1 + exp(sink - lse)); lse unchanged. out: [..., h, v], lse: [..., h], sink [h].

    Queries with nothing attended (lse = +inf) keep out = 0; sink = +inf gives out = 0.
    """
    finite = jnp.isfinite(lse)
    gate = 1.0 / (1.0 + jnp.exp(attn_sink.astype(jnp.float32) - jnp.where(finite, lse, 0.0)))
    return out * jnp.where(finite, gate, 0.0)[..., None]


def dequantize_cache(kv_cache, kv_format: str, dtype):
    """The cache as [num_blocks, block_size, h_kv, d_qk] of ``dtype`` (FP8 caches dequantized)."""
    if kv_format == "fp8":
        return _kvc.dequantize_fp8(kv_cache).astype(dtype)
    return kv_cache


def _valid_sparse(indices, n_rows, topk_length):
    """[b, s_q, k] mask of indices that name a row: >= 0, < n_rows, within topk_length (a
    topk_length below 0 counts as 0, one above topk as topk: the comparison below clamps)."""
    valid = (indices >= 0) & (indices < n_rows)
    if topk_length is not None:
        pos = jnp.arange(indices.shape[-1], dtype=jnp.int32)
        valid &= pos[None, None, :] < topk_length[:, None, None]
    return valid


def _gather_rows(cache, indices, valid):
    """Rows of the flattened cache [rows, h_kv, d] at ``indices`` [b, s_q, k], masked rows zeroed."""
    flat = cache.reshape(-1, *cache.shape[2:])
    rows = jnp.take(flat, jnp.where(valid, indices, 0), axis=0, mode="clip")  # [b, s_q, k, h_kv, d]
    return jnp.where(valid[..., None, None], rows, 0)


def paged_tokens(block_table, cache_seqlens, *, num_blocks: int, block_size: int):
    """Which of a paged cache's token positions a dense call reads: (t [T] positions 0..T-1,
    lengths [b], pages [b, T] page id of each position, present [b, T]), T = max_blocks *
    block_size. Malformed runtime values get SEMANTICS.md's one meaning: a length is clamped to
    [0, T] (the causal window uses the clamped length too), and a page id outside [0, num_blocks)
    inside it makes that page's tokens absent, never read."""
    t = jnp.arange(block_table.shape[1] * block_size, dtype=jnp.int32)
    lengths = jnp.clip(cache_seqlens, 0, t.shape[0])                             # [b]
    pages = jnp.take(block_table, t // block_size, axis=1)                       # [b, T]
    present = (t[None, :] < lengths[:, None]) & (pages >= 0) & (pages < num_blocks)
    return t, lengths, pages, present


def causal_window(t, lengths, s_q: int):
    """[b, s_q, T]: query j of s_q sees positions up to lengths - s_q + j (its own)."""
    last = lengths[:, None] - s_q + jnp.arange(s_q, dtype=jnp.int32)[None, :]    # [b, s_q]
    return t[None, None, :] <= last[..., None]


def mla_decode(q, kv_cache, block_table=None, cache_seqlens=None, *, softmax_scale: float,
               head_dim_v: int, causal: bool = False, kv_format: str = "bf16", indices=None,
               topk_length=None, attn_sink=None, extra_kv_cache=None, extra_indices=None,
               extra_topk_length=None):
    """Paged MLA decode, dense or sparse (SEMANTICS.md). Returns (out [b, s_q, h_q, d_v] q.dtype,
    lse [b, h_q, s_q] f32). Static arguments are already validated by jax_flashmla.ops.decode."""
    b, s_q, h_q, d_qk = q.shape
    cache = dequantize_cache(kv_cache, kv_format, q.dtype)
    h_kv = cache.shape[2]
    group = h_q // h_kv
    qg = q.reshape(b, s_q, h_kv, group, d_qk)

    if indices is None:
        block_size = cache.shape[1]
        t, lengths, pages, present = paged_tokens(block_table, cache_seqlens,
                                                  num_blocks=cache.shape[0], block_size=block_size)
        # Only present tokens' pages are dereferenced; the rest read block 0 and are masked.
        keys = cache[jnp.where(present, pages, 0), t % block_size]                # [b, T, h_kv, d]
        keys = jnp.where(present[..., None, None], keys, 0)
        keys = jnp.moveaxis(keys, 1, 2)[:, None]                                  # [b, 1, h_kv, T, d]
        valid = present[:, None, :]                                               # [b, 1, T]
        if causal:
            valid = valid & causal_window(t, lengths, s_q)                        # [b, s_q, T]
        valid = valid[:, :, None, :]                                              # [b, s_q|1, 1, T]
    else:
        valid = _valid_sparse(indices, cache.shape[0] * cache.shape[1], topk_length)
        keys = _gather_rows(cache, indices, valid)                                # [b, s_q, k, h_kv, d]
        if extra_indices is not None:
            extra = dequantize_cache(extra_kv_cache, kv_format, q.dtype)
            extra_valid = _valid_sparse(extra_indices, extra.shape[0] * extra.shape[1],
                                        extra_topk_length)
            keys = jnp.concatenate([keys, _gather_rows(extra, extra_indices, extra_valid)], axis=2)
            valid = jnp.concatenate([valid, extra_valid], axis=2)
        keys = jnp.moveaxis(keys, 3, 2)                                           # [b, s_q, h_kv, k, d]
        valid = valid[:, :, None, :]                                              # [b, s_q, 1, k]

    out, _, lse = attend(qg, keys, valid, softmax_scale=softmax_scale, head_dim_v=head_dim_v)
    out = out.reshape(b, s_q, h_q, head_dim_v)
    lse = lse.reshape(b, s_q, h_q)
    if attn_sink is not None:
        out = apply_attn_sink(out, lse, attn_sink)
    return out.astype(q.dtype), jnp.swapaxes(lse, 1, 2)


def sparse_mla_prefill(q, kv, indices, *, softmax_scale: float, head_dim_v: int, attn_sink=None,
                       topk_length=None):
    """Sparse MLA prefill (SEMANTICS.md). q [s_q, h_q, d], kv [s_kv, h_kv, d], indices
    [s_q, h_kv, topk]. Returns (out [s_q, h_q, d_v] q.dtype, max_logits [s_q, h_q] f32,
    lse [s_q, h_q] f32)."""
    s_q, h_q, d_qk = q.shape
    s_kv, h_kv, _ = kv.shape
    group = h_q // h_kv
    valid = (indices >= 0) & (indices < s_kv)                                     # [s_q, h_kv, k]
    if topk_length is not None:   # clamps: below 0 counts as 0, above topk as topk
        pos = jnp.arange(indices.shape[-1], dtype=jnp.int32)
        valid &= pos[None, None, :] < topk_length[:, None, None]
    safe = jnp.where(valid, indices, 0)
    heads = jnp.arange(h_kv)[None, :, None]
    keys = kv[safe, heads]                                                        # [s_q, h_kv, k, d]
    qg = q.reshape(s_q, h_kv, group, d_qk)
    out, max_logits, lse = attend(qg, keys, valid, softmax_scale=softmax_scale,
                                  head_dim_v=head_dim_v)
    out = out.reshape(s_q, h_q, head_dim_v)
    max_logits = max_logits.reshape(s_q, h_q)
    lse = lse.reshape(s_q, h_q)
    if attn_sink is not None:
        out = apply_attn_sink(out, lse, attn_sink)
    return out.astype(q.dtype), max_logits, lse
