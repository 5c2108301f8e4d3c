"""Paged KV cache for the DeepSeek model: a host-side page allocator and the jit-able page arrays.

Two halves, so that jitted code never sees Python bookkeeping:

- ``PageAllocator`` (host, plain Python/NumPy): owns the free list; gives each sequence the pages
  it needs as it grows and takes them back when it ends; renders the ``block_table`` rows of a
  batch. Sequences of different lengths share one pool.
- ``KVPages`` (device, a pytree): per layer the MLA cache ``[num_blocks, block_size, 1, 576]``
  (``kv_lora_rank + qk_rope_head_dim`` channels: latent ``c_kv`` then the RoPE key) in bf16, or the
  656-byte FP8 layout (uint8) of jax_flashmla; for V3.2 also the indexer's key cache
  ``[num_blocks, block_size, 1, index_head_dim]``. New tokens are written inside jit with
  ``jax_flashmla.kv_cache.write_tokens``, which quantises to FP8 by itself when the cache is uint8.

Token t of sequence i lives in page ``block_table[i, t // block_size]``, row ``t % block_size``
(jax_flashmla's convention, SEMANTICS.md).
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from .config import DeepseekConfig

FP8_TOKEN_BYTES = 656  # V3.2 FP8 layout: 512 fp8 + 4 float32 scales + 64 bf16 RoPE values
KV_FORMATS = ("bf16", "fp8", "float32")


class OutOfPagesError(RuntimeError):
    """The page pool cannot hold the requested tokens."""


class PageAllocator:
    """Host-side page allocator: a free list and one page list per sequence."""

    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_seq: int):
        for name, v in (("num_blocks", num_blocks), ("block_size", block_size),
                        ("max_blocks_per_seq", max_blocks_per_seq)):
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"PageAllocator: {name} must be a positive int, got {v!r}")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.max_blocks_per_seq = int(max_blocks_per_seq)
        # Pop from the end: low page ids are handed out first (easier to read in a debugger).
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._pages: dict[Hashable, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages(self, seq_id: Hashable) -> list[int]:
        return list(self._pages.get(seq_id, ()))

    def capacity(self, seq_id: Hashable) -> int:
        return len(self._pages.get(seq_id, ())) * self.block_size

    def ensure(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Gives ``seq_id`` enough pages for ``num_tokens`` tokens. Returns True if pages were added."""
        need = -(-int(num_tokens) // self.block_size)
        if need > self.max_blocks_per_seq:
            raise OutOfPagesError(
                f"sequence {seq_id!r}: {num_tokens} tokens need {need} pages of {self.block_size}, more than "
                f"max_blocks_per_seq={self.max_blocks_per_seq}")
        pages = self._pages.setdefault(seq_id, [])
        missing = need - len(pages)
        if missing <= 0:
            return False
        if missing > len(self._free):
            raise OutOfPagesError(
                f"sequence {seq_id!r}: needs {missing} more pages, only {len(self._free)} of {self.num_blocks} free")
        pages.extend(self._free.pop() for _ in range(missing))
        return True

    def free(self, seq_id: Hashable) -> None:
        """Returns all pages of ``seq_id`` to the pool (a no-op for an unknown sequence)."""
        self._free.extend(reversed(self._pages.pop(seq_id, [])))

    def block_table(self, seq_ids: Iterable[Hashable | None]) -> np.ndarray:
        """``[len(seq_ids), max_blocks_per_seq] int32``; None (an empty slot) gives a row of page 0.

        Entries past a sequence's pages are 0: in range, and never read for tokens that exist.
        """
        seq_ids = list(seq_ids)
        table = np.zeros((len(seq_ids), self.max_blocks_per_seq), np.int32)
        for i, sid in enumerate(seq_ids):
            if sid is not None:
                pages = self._pages.get(sid, [])
                table[i, :len(pages)] = pages
        return table


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVPages:
    """The device arrays of the paged cache (one entry per decoder layer)."""

    kv: tuple[jax.Array, ...]
    index_k: tuple[jax.Array, ...]  # V3.2 indexer keys; () for V3

    @property
    def num_blocks(self) -> int:
        return self.kv[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.kv[0].shape[1]

    @property
    def kv_format(self) -> str:
        dt = self.kv[0].dtype
        return "fp8" if dt == jnp.uint8 else "float32" if dt == jnp.float32 else "bf16"


def cache_dtype(model_dtype) -> jnp.dtype:
    """Attention runs in bf16 (fp16 for an fp16 model): the dtypes the kernels take."""
    return jnp.dtype(jnp.float16) if jnp.dtype(model_dtype) == jnp.float16 else jnp.dtype(jnp.bfloat16)


def init_pages(config: DeepseekConfig, num_blocks: int, block_size: int = 64, *, kv_format: str = "bf16",
               dtype=jnp.bfloat16) -> KVPages:
    """Zeroed page arrays for every layer.

    kv_format: "bf16" (bf16, or fp16 for an fp16 ``dtype``), "fp8" (656-byte tokens; index keys bf16)
    or "float32" (runs attention on ``jax_flashmla.reference`` in float32: a CPU checking aid).
    """
    if kv_format not in KV_FORMATS:
        raise ValueError(f"init_pages: kv_format must be one of {KV_FORMATS}, got {kv_format!r}")
    d = config.kv_cache_dim
    if kv_format == "fp8":
        if (config.kv_lora_rank, config.qk_rope_head_dim) != (512, 64):
            raise ValueError(
                "init_pages: the FP8 cache layout is defined for kv_lora_rank 512 + qk_rope_head_dim 64, got "
                f"{config.kv_lora_rank} + {config.qk_rope_head_dim}")
        shape, cdt = (num_blocks, block_size, 1, FP8_TOKEN_BYTES), jnp.uint8
    else:
        shape, cdt = (num_blocks, block_size, 1, d), _plain_dtype(kv_format, dtype)
    kv = tuple(jnp.zeros(shape, cdt) for _ in range(config.num_hidden_layers))
    index_k = ()
    if config.is_v32:
        index_k = tuple(jnp.zeros((num_blocks, block_size, 1, config.index_head_dim),
                                  _plain_dtype("bf16" if kv_format == "fp8" else kv_format, dtype))
                        for _ in range(config.num_hidden_layers))
    return KVPages(kv=kv, index_k=index_k)


def _plain_dtype(kv_format: str, dtype):
    return jnp.dtype(jnp.float32) if kv_format == "float32" else cache_dtype(dtype)


def gather_tokens(pages: jax.Array, block_table: jax.Array) -> jax.Array:
    """All token rows a block table can address: ``[num_blocks, bs, 1, d]`` -> ``[b, max_blocks * bs, d]``.

    Rows past a sequence's length hold anything; callers mask them by position. Table entries are
    clipped into range first, since entries past a sequence's pages may be out of range.
    """
    nb, bs = pages.shape[:2]
    rows = jnp.take(pages, jnp.clip(block_table, 0, nb - 1), axis=0)  # [b, mb, bs, 1, d]
    return rows.reshape(block_table.shape[0], block_table.shape[1] * bs, pages.shape[-1])
