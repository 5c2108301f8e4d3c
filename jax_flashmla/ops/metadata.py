"""Split-KV scheduling metadata: computed once per decoding step, reused by every layer.

FIRST VERSION (placeholder): the arrays have the kernel's shapes but hold zeros; the dense-decode
kernel work replaces this with the real scheduler (a CUDA kernel, with a pure-JAX twin on CPU).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_flashmla import _ffi

TILE_METADATA_WIDTH = 8
BLOCK_M = 64           # query rows (s_q * h_q / h_kv) per tile
DEFAULT_NUM_SMS = 132  # H100 SXM; only used where no GPU tells us its count


class MLAMetadata(NamedTuple):
    """The split-KV schedule for one decoding step (a pytree of two int32 arrays)."""
    tile_scheduler_metadata: jax.Array   # [num_sm_parts, TILE_METADATA_WIDTH]
    num_splits: jax.Array                # [b + 1]


def num_sm_parts(*, s_q: int, h_q: int, h_kv: int, num_sms: int | None = None) -> int:
    num_sms = num_sms or _ffi.num_sms() or DEFAULT_NUM_SMS
    rows = s_q * h_q // h_kv
    tiles_per_kv_head = -(-rows // BLOCK_M)
    return max(1, num_sms // (h_kv * tiles_per_kv_head))


def get_mla_metadata(cache_seqlens, *, s_q: int = 1, h_q: int, h_kv: int = 1, causal: bool = False,
                     topk: int | None = None, num_sms: int | None = None) -> MLAMetadata:
    """The split-KV schedule for ``cache_seqlens`` [b] int32 (placeholder: see module doc)."""
    del causal, topk
    b = cache_seqlens.shape[0]
    parts = num_sm_parts(s_q=s_q, h_q=h_q, h_kv=h_kv, num_sms=num_sms)
    return MLAMetadata(jnp.zeros((parts, TILE_METADATA_WIDTH), jnp.int32),
                       jnp.zeros((b + 1,), jnp.int32))
