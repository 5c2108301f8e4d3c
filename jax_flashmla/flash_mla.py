"""FlashMLA's PyTorch spellings over JAX arrays, so ported code changes imports, not call sites.

    from jax_flashmla.flash_mla import get_mla_metadata, flash_mla_with_kvcache, flash_mla_sparse_fwd
"""
from __future__ import annotations

from jax_flashmla.ops import decode as _decode
from jax_flashmla.ops import metadata as _metadata
from jax_flashmla.ops import prefill as _prefill


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int,
                     num_heads_q: int | None = None, is_fp8_kvcache: bool = False,
                     topk: int | None = None):
    """Returns (tile_scheduler_metadata, num_splits), as FlashMLA does."""
    del is_fp8_kvcache
    h_q = num_heads_q if num_heads_q is not None else num_q_tokens_per_head_k * num_heads_k
    s_q = num_q_tokens_per_head_k * num_heads_k // h_q
    return tuple(_metadata.get_mla_metadata(cache_seqlens, s_q=s_q, h_q=h_q, h_kv=num_heads_k,
                                            topk=topk))


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int,
                           tile_scheduler_metadata=None, num_splits=None,
                           softmax_scale: float | None = None, causal: bool = False,
                           is_fp8_kvcache: bool = False, indices=None, attn_sink=None,
                           extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                           extra_topk_length=None):
    """Returns (out [b, s_q, h_q, head_dim_v], softmax_lse [b, h_q, s_q] float32)."""
    metadata = None
    if tile_scheduler_metadata is not None and num_splits is not None:
        metadata = _metadata.MLAMetadata(tile_scheduler_metadata, num_splits)
    return _decode.mla_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v=head_dim_v,
        softmax_scale=softmax_scale, causal=causal,
        kv_format="fp8" if is_fp8_kvcache else None, indices=indices, topk_length=topk_length,
        attn_sink=attn_sink, extra_kv_cache=extra_k_cache,
        extra_indices=extra_indices_in_kvcache, extra_topk_length=extra_topk_length,
        metadata=metadata)


def flash_mla_sparse_fwd(q, kv, indices, sm_scale: float, d_v: int = 512, attn_sink=None,
                         topk_length=None):
    """Returns (out [s_q, h_q, d_v], max_logits [s_q, h_q], lse [s_q, h_q])."""
    return _prefill.sparse_mla_prefill(q, kv, indices, softmax_scale=sm_scale, head_dim_v=d_v,
                                       attn_sink=attn_sink, topk_length=topk_length)
