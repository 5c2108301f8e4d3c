"""Split-KV scheduling metadata: computed once per decoding step, reused by every layer.

``get_mla_metadata`` binds the ``jax_flashmla_mla_metadata`` primitive. On a Hopper GPU with the
extension built it runs the scheduler kernel (csrc/kernels/decode/scheduler.cu); elsewhere it runs
``schedule_reference`` below, a pure-JAX twin of the same algorithm that gives the same integers
(the GPU tests check that they agree bit for bit).

The schedule: ``num_parts`` persistent CTAs per (query-row block, KV head) each take a contiguous
run of (sequence, 64-token tile) work. A sequence costs ceil(L / 64) tiles plus
``FIXED_OVERHEAD`` per chunk of it; parts are filled in order with ``payload`` units each, a
sequence that does not fit is cut (a new split) and continues in the next part, and the last part
takes whatever remains. ``payload`` is the smallest ceil(total / num_parts) + i, 0 <= i <=
FIXED_OVERHEAD, that leaves the last part no more than it (+ FIXED_OVERHEAD, upstream FlashMLA's
rule, when none does): never above upstream's, and it spreads equal sequences evenly where
upstream's rule leaves parts idle. Dense decode's sequences are the batch (L = cache_seqlens);
sparse decode's are the b * s_q query tokens, each of the same length (its topk positions, the
first pool padded to whole tiles, then the second pool's).

tile_scheduler_metadata [num_parts, 8] int32, per part: begin_seq, begin_tile, end_seq
(inclusive), end_tile (exclusive, within end_seq), begin_split, 0, 0, 0.
num_splits [num_seqs + 1] int32: exclusive prefix sum of the chunks per sequence (sequence i owns
partial-result slots [num_splits[i], num_splits[i + 1]) of the split-KV workspace).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_flashmla import _ffi
from jax_flashmla.ops import _primitive
from jax_flashmla.ops.kernels import limits, scheduler

DEFAULT_NUM_SMS = 132  # H100 / H200 SXM; only used where no GPU tells us its count


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What a schedule was made for (static): the calls it may serve."""
    mode: str                 # "dense" | "sparse"
    s_q: int
    h_q: int
    h_kv: int
    topk: int | None          # sparse: positions of the first pool / the second pool
    extra_topk: int | None
    num_parts: int


@dataclasses.dataclass(frozen=True)
class MLAMetadata:
    """The split-KV schedule for one decoding step: two int32 arrays and, when made by
    ``get_mla_metadata``, the static description of the calls it serves (``schedule``), which
    ``mla_decode`` checks at trace time. A pytree; unpacks as (tile_scheduler_metadata, num_splits).
    """
    tile_scheduler_metadata: jax.Array   # [num_parts, META_INTS]
    num_splits: jax.Array                # [num_seqs + 1]
    schedule: Schedule | None = None

    def __iter__(self):
        return iter((self.tile_scheduler_metadata, self.num_splits))


jax.tree_util.register_dataclass(MLAMetadata, data_fields=["tile_scheduler_metadata", "num_splits"],
                                 meta_fields=["schedule"])


def num_sm_parts(*, rows_per_kv_head: int, h_kv: int = 1, num_sms: int | None = None) -> int:
    """Persistent CTAs per (row block, KV head): the device's SMs shared by all of them. The one
    place this number is decided."""
    num_sms = num_sms or _ffi.num_sms() or DEFAULT_NUM_SMS
    blocks = -(-rows_per_kv_head // limits.BLOCK_M)
    return max(1, num_sms // (h_kv * blocks))


def dense_schedule(*, s_q: int, h_q: int, h_kv: int, num_sms: int | None = None) -> Schedule:
    parts = num_sm_parts(rows_per_kv_head=s_q * h_q // h_kv, h_kv=h_kv, num_sms=num_sms)
    return Schedule("dense", s_q, h_q, h_kv, None, None, parts)


def sparse_schedule(*, s_q: int, h_q: int, topk: int, extra_topk: int | None,
                    num_sms: int | None = None) -> Schedule:
    parts = num_sm_parts(rows_per_kv_head=h_q, num_sms=num_sms)
    return Schedule("sparse", s_q, h_q, 1, topk, extra_topk, parts)


def sparse_positions(topk: int, extra_topk: int | None) -> int:
    """Positions per query token in the sparse kernel's tile list (csrc params.h, same rule)."""
    tiles0 = -(-topk // limits.TILE_TOKENS)
    return tiles0 * limits.TILE_TOKENS + (extra_topk or 0)


def schedule_lengths(schedule: Schedule, cache_seqlens):
    """The per-sequence lengths the scheduler reads: cache_seqlens (dense), or one fixed length per
    query token (sparse), derived from cache_seqlens so that it varies over the same mesh axes
    inside shard_map."""
    if schedule.mode == "dense":
        return cache_seqlens
    length = sparse_positions(schedule.topk, schedule.extra_topk)
    return jnp.repeat(cache_seqlens * 0 + length, schedule.s_q)


def sparse_live(schedule: Schedule, topk_length=None, extra_topk_length=None):
    """The live tiles of each query token, int32 [b * s_q, 3] = (live0, start1, live1) for the
    scheduler, from topk_length / extra_topk_length [b] (None: every position of that pool): the
    first pool's tiles [0, live0) and the second's [start1, start1 + live1) hold the positions a
    call attends; the sparse kernel skips the others, so a schedule made from this balances the
    work each part really does. None when neither length is given."""
    if topk_length is None and extra_topk_length is None:
        return None
    tile = limits.TILE_TOKENS
    tiles0 = -(-schedule.topk // tile)

    def live_tiles(length, topk):
        length = jnp.clip(jnp.asarray(length, jnp.int32), 0, topk)
        return (length + tile - 1) // tile

    b = (topk_length if topk_length is not None else extra_topk_length).shape[0]
    live0 = (live_tiles(topk_length, schedule.topk) if topk_length is not None
             else jnp.full((b,), tiles0, jnp.int32))
    extra = schedule.extra_topk or 0
    live1 = (live_tiles(extra_topk_length, extra) if extra_topk_length is not None
             else jnp.full((b,), -(-extra // tile), jnp.int32))
    live = jnp.stack([live0, jnp.full((b,), tiles0, jnp.int32), live1], axis=1)
    return jnp.repeat(live, schedule.s_q, axis=0)


def schedule_reference(seqlens, num_parts: int, live=None) -> MLAMetadata:
    """Pure-JAX twin of the scheduler kernel (same integers). live: None, or int32 [b, 3]
    (live0, start1, live1) per sequence: only its live tiles [0, live0) and [start1, start1 +
    live1) cost (sparse decode with topk_length / extra_topk_length; tests/oracle.py)."""
    b = seqlens.shape[0]
    lens = seqlens.astype(jnp.int32)
    tile, overhead = limits.TILE_TOKENS, limits.FIXED_OVERHEAD
    nb = jnp.where(lens > 0, lens // tile + (lens % tile != 0), 0).astype(jnp.int32)  # no overflow
    if live is None:
        live0, start1, live1 = nb, nb, jnp.zeros_like(nb)
    else:
        live0, start1, live1 = (live[:, i].astype(jnp.int32) for i in range(3))

    def live_cost(i, blk):
        return (jnp.maximum(live0[i] - blk, 0)
                + jnp.where(blk <= start1[i], live1[i], jnp.maximum(start1[i] + live1[i] - blk, 0)))

    def live_advance(i, blk, c):
        first = jnp.maximum(live0[i] - blk, 0)
        return jnp.where(c <= first, blk + c, jnp.maximum(blk, start1[i]) + c - first)

    total = jnp.sum(live_cost(jnp.arange(b), 0) + overhead)
    base = (total + num_parts - 1) // num_parts
    big = jnp.int32(2**30 - 1)
    # Derived from lens so that inside shard_map the carries vary over the same mesh axes as the
    # loop bodies' results (check_vma), instead of starting as replicated constants.
    zero = lens[0] * 0

    def fill(payload):
        def part_body(part, carry):
            seq, blk, split, cum, ns, meta, _ = carry
            begin = (seq, blk, split)
            start = jnp.where(part == num_parts - 1, big, payload).astype(jnp.int32)

            def cond(c):
                return (c[0] < b) & ~c[6]

            def body(c):
                seq, blk, split, cum, ns, remain, _ = c
                i = jnp.minimum(seq, b - 1)
                left = live_cost(i, blk)
                fits = remain >= left + overhead
                new_cum = cum + split + 1
                ns = jnp.where(fits, ns.at[seq + 1].set(new_cum), ns)
                take = remain - overhead
                return (jnp.where(fits, seq + 1, seq),
                        jnp.where(fits, 0, jnp.where(take > 0, live_advance(i, blk, take), blk)),
                        jnp.where(fits, 0, jnp.where(take > 0, split + 1, split)),
                        jnp.where(fits, new_cum, cum),
                        ns,
                        jnp.where(fits, remain - left - overhead, remain),
                        ~fits)

            seq, blk, split, cum, ns, remain, _ = jax.lax.while_loop(
                cond, body, (seq, blk, split, cum, ns, start, seq < 0))
            end_seq = jnp.where(blk > 0, seq, seq - 1)
            end_blk = jnp.where(blk > 0, blk, jnp.where(seq > 0, nb[jnp.maximum(seq - 1, 0)], 0))
            row = jnp.array([begin[0], begin[1], end_seq, end_blk, begin[2], 0, 0, 0], jnp.int32)
            meta = meta.at[part].set(row)
            return seq, blk, split, cum, ns, meta, start - remain

        init = (zero, zero, zero, zero, jnp.zeros((b + 1,), jnp.int32) + zero,
                jnp.zeros((num_parts, limits.META_INTS), jnp.int32) + zero, zero)
        *_, ns, meta, last_cost = jax.lax.fori_loop(0, num_parts, part_body, init)
        return meta, ns, last_cost

    # The payload: the first of base + i (i = 0 .. overhead) whose fill leaves the last part no
    # more than it; base + overhead (upstream's rule) when none does. All candidates at once.
    payloads = base + jnp.arange(overhead + 1, dtype=jnp.int32)
    metas, nss, last = jax.vmap(fill)(payloads)
    fits = (last <= payloads) | (jnp.arange(overhead + 1) == overhead)
    pick = jnp.argmax(fits)
    return MLAMetadata(metas[pick], nss[pick])


# ---------------------------------------------------------------------------------------------
# The primitive: CUDA lowering = the scheduler kernel; every other platform = the JAX twin.

@dataclasses.dataclass(frozen=True)
class MetadataConfig:
    num_parts: int
    implementation: str | None
    present: tuple[str, ...] = ("seqlens",)   # + "live" (sparse_live) when bound


def _abstract_eval(seqlens, *live, config: MetadataConfig):
    return (jax.core.ShapedArray((config.num_parts, limits.META_INTS), jnp.int32),
            jax.core.ShapedArray((seqlens.shape[0] + 1,), jnp.int32))


def _reference(seqlens, *live, config: MetadataConfig):
    return tuple(schedule_reference(seqlens, config.num_parts, *live))


def _batching(args, dims, *, config: MetadataConfig):
    return _primitive.map_batching(mla_metadata_p, args, dims, config=config)


mla_metadata_p = _primitive.define_primitive(
    "jax_flashmla_mla_metadata", abstract_eval=_abstract_eval, reference=_reference,
    batching_rule=_batching, kernels=(scheduler,), op_name="get_mla_metadata")


def compute_schedule(schedule: Schedule, cache_seqlens, implementation=None,
                     live=None) -> MLAMetadata:
    """Bind the scheduler for ``schedule`` (also used by the ops when no metadata is passed);
    live: None or sparse_live's table."""
    present = ("seqlens",) if live is None else ("seqlens", "live")
    config = MetadataConfig(num_parts=schedule.num_parts, implementation=implementation,
                            present=present)
    operands = (schedule_lengths(schedule, cache_seqlens),) + (() if live is None else (live,))
    tiles, splits = mla_metadata_p.bind(*operands, config=config)
    return MLAMetadata(tiles, splits, schedule)


def get_mla_metadata(cache_seqlens, *, s_q: int = 1, h_q: int, h_kv: int = 1, causal: bool = False,
                     topk: int | None = None, extra_topk: int | None = None,
                     topk_length=None, extra_topk_length=None,
                     num_sms: int | None = None,
                     implementation: str | None = None) -> MLAMetadata:
    """The split-KV schedule of one decoding step, for every ``mla_decode`` call of that step
    with these shapes (the layers of a model): compute it once, pass it as ``metadata=``.

    Dense decode: ``cache_seqlens`` [b] int32; ``causal`` does not change the schedule (a causal
    window ends at the sequence's end). Sparse decode: pass ``topk`` (indices.shape[-1]) and, with a
    second pool, ``extra_topk`` (extra_indices.shape[-1]); only the batch size of cache_seqlens is
    read then. Sparse decode with ``topk_length`` / ``extra_topk_length`` ([b] int32, the calls'
    own): pass them here too and the schedule weighs each token by the positions it attends, not
    by topk (the kernel skips the rest); any schedule covers every position, so one made from
    other lengths (or none) gives the same result, only less evenly spread.
    ``implementation="reference"`` forces the pure-JAX twin also on a GPU.
    """
    del causal
    _primitive.check_implementation("get_mla_metadata", implementation)
    cache_seqlens = jnp.asarray(cache_seqlens)
    if cache_seqlens.ndim != 1 or cache_seqlens.dtype != jnp.int32 or cache_seqlens.shape[0] < 1:
        _primitive.fail("get_mla_metadata", "cache_seqlens", "int32 [b] with b >= 1",
                        f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    for name, value in (("s_q", s_q), ("h_q", h_q), ("h_kv", h_kv)):
        if not isinstance(value, int) or value < 1:
            _primitive.fail("get_mla_metadata", name, "a positive int", value)
    if h_q % h_kv:
        _primitive.fail("get_mla_metadata", "h_q", f"divisible by h_kv = {h_kv}", h_q)
    if topk is None:
        if extra_topk is not None:
            _primitive.fail("get_mla_metadata", "extra_topk", "None unless topk is given", extra_topk)
        schedule = dense_schedule(s_q=s_q, h_q=h_q, h_kv=h_kv, num_sms=num_sms)
    else:
        for name, value in (("topk", topk), ("extra_topk", extra_topk)):
            if value is not None and (not isinstance(value, int) or value < 1):
                _primitive.fail("get_mla_metadata", name, "a positive int (or None)", value)
        if h_kv != 1:
            _primitive.fail("get_mla_metadata", "h_kv", "1 for sparse decode (topk given)", h_kv)
        schedule = sparse_schedule(s_q=s_q, h_q=h_q, topk=topk, extra_topk=extra_topk,
                                   num_sms=num_sms)
    b = cache_seqlens.shape[0]
    for name, value, pool_topk in (("topk_length", topk_length, topk),
                                   ("extra_topk_length", extra_topk_length, extra_topk)):
        if value is None:
            continue
        if topk is None or pool_topk is None:
            _primitive.fail("get_mla_metadata", name,
                            f"None unless {'topk' if name == 'topk_length' else 'extra_topk'} is "
                            "given (sparse decode)", "an array")
        value = jnp.asarray(value)
        if value.shape != (b,) or value.dtype != jnp.int32:
            _primitive.fail("get_mla_metadata", name, f"int32 [b] = int32 ({b},), as cache_seqlens",
                            f"{value.dtype} {tuple(value.shape)}")
    live = sparse_live(schedule, topk_length, extra_topk_length)  # None without lengths (dense)
    return compute_schedule(schedule, cache_seqlens, implementation, live)
