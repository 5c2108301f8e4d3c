"""Split-KV scheduling metadata: computed once per decoding step, reused by every layer.

``get_mla_metadata`` binds the ``jax_flashmla_mla_metadata`` primitive. On a Hopper GPU with the
extension built it runs the scheduler kernel (csrc/kernels/common/mla_metadata.cu); elsewhere it
runs ``schedule_reference`` below, a pure-JAX twin of the same algorithm that gives the same
integers (the GPU tests check that they agree bit for bit).

The schedule: ``num_sm_parts`` persistent CTAs per (query-row block, KV head) each take a
contiguous run of (sequence, 64-token tile) work. A sequence costs ceil(L / 64) tiles plus
``FIXED_OVERHEAD`` per chunk of it; parts are filled in order with ``payload`` units each, a
sequence that does not fit is cut (a new split) and continues in the next part, and the last part
takes whatever remains.

tile_scheduler_metadata [num_sm_parts, 8] int32, per part: begin_seq, begin_block, end_seq
(inclusive), end_block (exclusive, within end_seq), begin_split, 0, 0, 0.
num_splits [b + 1] int32: exclusive prefix sum of the chunks per sequence (sequence i owns
partial-result slots [num_splits[i], num_splits[i + 1]) of the split-KV workspace).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_flashmla import _ffi

TILE_METADATA_WIDTH = 8
BLOCK_M = 64           # query rows (s_q * h_q / h_kv) per tile
PAGE_BLOCK = 64        # tokens per KV tile
FIXED_OVERHEAD = 5     # scheduler cost of one (sequence, chunk), in tiles (as in the kernel)
DEFAULT_NUM_SMS = 132  # H100 SXM; only used where no GPU tells us its count
_TARGET = "jax_flashmla_mla_metadata"


class MLAMetadata(NamedTuple):
    """The split-KV schedule for one decoding step (a pytree of two int32 arrays)."""
    tile_scheduler_metadata: jax.Array   # [num_sm_parts, TILE_METADATA_WIDTH]
    num_splits: jax.Array                # [b + 1]


def num_sm_parts(*, s_q: int, h_q: int, h_kv: int, num_sms: int | None = None) -> int:
    """Persistent CTAs per (row block, KV head): the device's SMs shared by all of them. The one
    place this number is decided (the kernel lowering uses it when no metadata is passed)."""
    num_sms = num_sms or _ffi.num_sms() or DEFAULT_NUM_SMS
    rows = s_q * h_q // h_kv
    tiles_per_kv_head = -(-rows // BLOCK_M)
    return max(1, num_sms // (h_kv * tiles_per_kv_head))


def schedule_reference(cache_seqlens, num_parts: int) -> MLAMetadata:
    """Pure-JAX twin of the scheduler kernel (same integers)."""
    b = cache_seqlens.shape[0]
    lens = cache_seqlens.astype(jnp.int32)
    nb = jnp.where(lens > 0, (lens + PAGE_BLOCK - 1) // PAGE_BLOCK, 0).astype(jnp.int32)
    total = jnp.sum(nb + FIXED_OVERHEAD)
    payload = (total + num_parts - 1) // num_parts + FIXED_OVERHEAD
    big = jnp.int32(2**30 - 1)

    def part_body(part, carry):
        seq, blk, split, cum, ns, meta = carry
        begin = (seq, blk, split)
        remain = jnp.where(part == num_parts - 1, big, payload).astype(jnp.int32)

        def cond(c):
            return (c[0] < b) & ~c[6]

        def body(c):
            seq, blk, split, cum, ns, remain, _ = c
            left = nb[jnp.minimum(seq, b - 1)] - blk
            fits = remain >= left + FIXED_OVERHEAD
            new_cum = cum + split + 1
            ns = jnp.where(fits, ns.at[seq + 1].set(new_cum), ns)
            take = remain - FIXED_OVERHEAD
            return (jnp.where(fits, seq + 1, seq),
                    jnp.where(fits, 0, jnp.where(take > 0, blk + take, blk)),
                    jnp.where(fits, 0, jnp.where(take > 0, split + 1, split)),
                    jnp.where(fits, new_cum, cum),
                    ns,
                    jnp.where(fits, remain - left - FIXED_OVERHEAD, remain),
                    ~fits)

        seq, blk, split, cum, ns, _, _ = jax.lax.while_loop(
            cond, body, (seq, blk, split, cum, ns, remain, seq < 0))
        end_seq = jnp.where(blk > 0, seq, seq - 1)
        end_blk = jnp.where(blk > 0, blk, jnp.where(seq > 0, nb[jnp.maximum(seq - 1, 0)], 0))
        row = jnp.array([begin[0], begin[1], end_seq, end_blk, begin[2], 0, 0, 0], jnp.int32)
        meta = meta.at[part].set(row)
        return seq, blk, split, cum, ns, meta

    # Derived from lens so that inside shard_map the carries vary over the same mesh axes as the
    # loop bodies' results (check_vma), instead of starting as replicated constants.
    zero = lens[0] * 0
    init = (zero, zero, zero, zero, jnp.zeros((b + 1,), jnp.int32) + zero,
            jnp.zeros((num_parts, TILE_METADATA_WIDTH), jnp.int32) + zero)
    *_, ns, meta = jax.lax.fori_loop(0, num_parts, part_body, init)
    return MLAMetadata(meta, ns)


# ---------------------------------------------------------------------------------------------
# The primitive: CUDA lowering = the scheduler kernel; every other platform = the JAX twin.

mla_metadata_p = Primitive("jax_flashmla_mla_metadata")
mla_metadata_p.multiple_results = True
mla_metadata_p.def_impl(functools.partial(jax._src.dispatch.apply_primitive, mla_metadata_p))


@mla_metadata_p.def_abstract_eval
def _abstract_eval(seqlens, *, num_parts: int, implementation):
    b = seqlens.shape[0]
    return (jax.core.ShapedArray((num_parts, TILE_METADATA_WIDTH), jnp.int32),
            jax.core.ShapedArray((b + 1,), jnp.int32))


def _reference(seqlens, *, num_parts: int, implementation):
    return tuple(schedule_reference(seqlens, num_parts))


_reference_lowering = mlir.lower_fun(_reference, multiple_results=True)


def _cuda_lowering(ctx, seqlens, *, num_parts: int, implementation):
    if implementation != "reference" and _ffi.kernels_available()[0]:
        return jax.ffi.ffi_lowering(_TARGET)(ctx, seqlens)
    return _reference_lowering(ctx, seqlens, num_parts=num_parts, implementation=implementation)


mlir.register_lowering(mla_metadata_p, _reference_lowering)
mlir.register_lowering(mla_metadata_p, _cuda_lowering, platform="cuda")


def _batching(args, dims, *, num_parts, implementation):
    (x,), (d,) = args, dims
    x = jnp.moveaxis(x, d, 0)
    outs = jax.lax.map(lambda s: tuple(mla_metadata_p.bind(s, num_parts=num_parts,
                                                           implementation=implementation)), x)
    return list(outs), [0, 0]


batching.primitive_batchers[mla_metadata_p] = _batching


def get_mla_metadata(cache_seqlens, *, s_q: int = 1, h_q: int, h_kv: int = 1, causal: bool = False,
                     topk: int | None = None, num_sms: int | None = None,
                     implementation: str | None = None) -> MLAMetadata:
    """The split-KV schedule for ``cache_seqlens`` [b] int32, for calls with these head counts.

    ``causal`` does not change the dense schedule (a causal window ends at the sequence's end).
    ``topk`` is accepted for the sparse decode API; the dense schedule does not use it.
    ``implementation="reference"`` forces the pure-JAX twin also on a GPU.
    """
    del causal, topk
    cache_seqlens = jnp.asarray(cache_seqlens)
    if cache_seqlens.ndim != 1 or cache_seqlens.dtype != jnp.int32 or cache_seqlens.shape[0] < 1:
        raise ValueError(f"get_mla_metadata: cache_seqlens: expected int32 [b] with b >= 1, got "
                         f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if h_q % h_kv:
        raise ValueError(f"get_mla_metadata: h_q = {h_q} must be divisible by h_kv = {h_kv}")
    parts = num_sm_parts(s_q=s_q, h_q=h_q, h_kv=h_kv, num_sms=num_sms)
    tiles, splits = mla_metadata_p.bind(cache_seqlens, num_parts=int(parts),
                                        implementation=implementation)
    return MLAMetadata(tiles, splits)


def numpy_schedule(cache_seqlens, num_parts: int):
    """Plain-Python copy of the algorithm (for tests and readers)."""
    lens = np.asarray(cache_seqlens, np.int64)
    b = lens.shape[0]
    nb = np.where(lens > 0, (lens + PAGE_BLOCK - 1) // PAGE_BLOCK, 0)
    total = int(np.sum(nb + FIXED_OVERHEAD))
    payload = -(-total // num_parts) + FIXED_OVERHEAD
    meta = np.zeros((num_parts, TILE_METADATA_WIDTH), np.int32)
    ns = np.zeros((b + 1,), np.int32)
    seq = blk = split = cum = 0
    for part in range(num_parts):
        begin = (seq, blk, split)
        remain = 2**30 - 1 if part == num_parts - 1 else payload
        while seq < b:
            left = nb[seq] - blk
            if remain >= left + FIXED_OVERHEAD:
                cum += split + 1
                ns[seq + 1] = cum
                remain -= left + FIXED_OVERHEAD
                seq, blk, split = seq + 1, 0, 0
            else:
                if remain - FIXED_OVERHEAD > 0:
                    blk += remain - FIXED_OVERHEAD
                    split += 1
                break
        end_seq = seq if blk > 0 else seq - 1
        end_blk = blk if blk > 0 else (nb[seq - 1] if seq > 0 else 0)
        meta[part] = [begin[0], begin[1], end_seq, end_blk, begin[2], 0, 0, 0]
    return meta, ns
