"""FlashMLA's PyTorch spellings over JAX arrays, so ported code changes imports, not call sites.

    from jax_flashmla.flash_mla import get_mla_metadata, flash_mla_with_kvcache, flash_mla_sparse_fwd

Both of FlashMLA's metadata spellings work:
  * the current one: ``sched_meta, _ = get_mla_metadata()`` (no arguments), then
    ``flash_mla_with_kvcache(..., sched_meta, None, ...)``. Upstream fills ``sched_meta`` in place
    on the first call and reuses it; JAX arrays are values, so here it stays an empty placeholder
    and each call makes its own schedule (one small scheduler launch per call; for one schedule
    per decoding step shared by the layers, use ``jax_flashmla.get_mla_metadata``);
  * the earlier one: ``tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens,
    num_q_tokens_per_head_k, num_heads_k, ...)``, both passed to every call.
"""
from __future__ import annotations

import dataclasses

import jax

from jax_flashmla.ops import decode as _decode
from jax_flashmla.ops import metadata as _metadata
from jax_flashmla.ops import prefill as _prefill


@dataclasses.dataclass(frozen=True)
class FlashMLASchedMeta:
    """The current FlashMLA's scheduling placeholder (``get_mla_metadata()``): holds nothing; a
    call given it computes its schedule itself. A pytree without leaves, so it passes through
    ``jax.jit`` as an argument."""


jax.tree_util.register_dataclass(FlashMLASchedMeta, data_fields=[], meta_fields=[])


def get_mla_metadata(cache_seqlens=None, num_q_tokens_per_head_k: int | None = None,
                     num_heads_k: int | None = None, num_heads_q: int | None = None,
                     is_fp8_kvcache: bool = False, topk: int | None = None):
    """No arguments: (FlashMLASchedMeta(), None), as the current FlashMLA. With ``cache_seqlens``:
    (tile_scheduler_metadata, num_splits), as the earlier one."""
    del is_fp8_kvcache
    if cache_seqlens is None:
        return FlashMLASchedMeta(), None
    if num_q_tokens_per_head_k is None or num_heads_k is None:
        raise TypeError("get_mla_metadata: with cache_seqlens, num_q_tokens_per_head_k and "
                        "num_heads_k are required (FlashMLA's earlier spelling); call it without "
                        "arguments for the current one")
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
    """Returns (out [b, s_q, h_q, head_dim_v], softmax_lse [b, h_q, s_q] float32).
    An FP8 ``k_cache`` may be uint8 or, as FlashMLA passes it, a float8_e4m3fn view of the bytes.
    tile_scheduler_metadata: a FlashMLASchedMeta (num_splits None), the earlier spelling's array
    (with its num_splits), an ``MLAMetadata``, or None."""
    metadata = None
    if isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        if num_splits is not None:
            raise ValueError("flash_mla_with_kvcache: num_splits: expected None with a "
                             "FlashMLASchedMeta, got an array")
    elif isinstance(tile_scheduler_metadata, _metadata.MLAMetadata):
        metadata = tile_scheduler_metadata
    elif tile_scheduler_metadata is not None and num_splits is not None:
        metadata = _metadata.MLAMetadata(tile_scheduler_metadata, num_splits)
    elif tile_scheduler_metadata is not None or num_splits is not None:
        raise ValueError("flash_mla_with_kvcache: tile_scheduler_metadata / num_splits: expected "
                         "both arrays (or a FlashMLASchedMeta and None), got only one")
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
