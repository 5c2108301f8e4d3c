"""``mla_decode``: paged MLA decode (dense, FP8 cache, sparse, two pools) as one JAX primitive.

The public function checks every static property once (clear errors naming the argument, the
expected and the actual value), resolves defaults into a frozen ``DecodeConfig`` and binds the
primitive with only the operands present; the primitive's rules live below it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_flashmla import checks as _checks
from jax_flashmla import kv_cache as _kvc
from jax_flashmla import reference as _ref
from jax_flashmla.ops import _primitive, _sharding
from jax_flashmla.ops import metadata as _meta
from jax_flashmla.ops.kernels import dense_as_sparse, dense_decode, sparse_decode
from jax_flashmla.ops.metadata import MLAMetadata

# Operand order of the primitive; a call binds the subset it has, in this order.
OPERANDS = ("q", "kv_cache", "block_table", "cache_seqlens", "indices", "topk_length", "attn_sink",
            "extra_kv_cache", "extra_indices", "extra_topk_length", "tile_scheduler_metadata",
            "num_splits")
_BATCH_MAJOR = ("q", "block_table", "cache_seqlens", "indices", "topk_length", "extra_indices",
                "extra_topk_length")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    mode: str                   # "dense" | "sparse"
    head_dim_v: int
    softmax_scale: float
    causal: bool
    kv_format: str              # "bf16" (a 16-bit cache of q's dtype: bf16 or fp16) | "fp8" (uint8)
    implementation: str | None  # None (automatic) | "kernel" | "reference"
    present: tuple[str, ...]    # operand names bound, in OPERANDS order

    def replace(self, **changes) -> "DecodeConfig":
        return dataclasses.replace(self, **changes)


def _fail(arg: str, expected: str, got) -> None:
    _primitive.fail("mla_decode", arg, expected, got)


def _shape_of(x):
    return tuple(x.shape)


def _check_int32(name, x, shape):
    if x.dtype != jnp.int32:
        _fail(name, "dtype int32", x.dtype)
    if _shape_of(x) != shape:
        _fail(name, f"shape {shape}", _shape_of(x))


def _check_pool(name, cache, q, kv_format, d_qk):
    """Returns h_kv. A pool is [num_blocks, block_size, h_kv, d_qk] of q's dtype, or an FP8 uint8
    pool [num_blocks, block_size, 1, 656 or 584]."""
    if cache.ndim != 4:
        _fail(name, "rank 4 [num_blocks, block_size, h_kv, d_qk]", f"shape {_shape_of(cache)}")
    if kv_format == "fp8":
        if cache.dtype != jnp.uint8:
            _fail(name, "dtype uint8 (or a float8_e4m3fn view of the bytes) for kv_format='fp8'",
                  cache.dtype)
        layout = _kvc.fp8_layout(d_qk=d_qk) if d_qk in (576, 512) else None
        if layout is None:
            _fail("q", "d_qk 576 (V3.2 layout) or 512 (V4 layout) with an FP8 cache", d_qk)
        if cache.shape[3] != layout.token_bytes:
            _fail(name, f"last axis {layout.token_bytes} bytes ({layout.name} FP8 layout for "
                  f"d_qk {d_qk})", cache.shape[3])
        if cache.shape[2] != 1:
            _fail(name, "h_kv = 1 for an FP8 cache", cache.shape[2])
        if q.dtype != jnp.bfloat16:
            _fail("q", "dtype bfloat16 with an FP8 cache", q.dtype)
    else:
        if cache.dtype != q.dtype:
            _fail(name, f"dtype {q.dtype} (q's dtype; or uint8 / float8_e4m3fn FP8 bytes)",
                  cache.dtype)
        if cache.shape[3] != d_qk:
            _fail(name, f"last axis d_qk = {d_qk} (q's last axis)", cache.shape[3])
    if cache.shape[0] < 1 or cache.shape[1] < 1:
        _fail(name, "at least one block of at least one token", f"shape {_shape_of(cache)}")
    return cache.shape[2]


def _check_metadata(metadata, mode, *, b, s_q, h_q, h_kv, topk, extra_topk):
    """A schedule made for other shapes (or the other mode) is caught here, at trace time."""
    if not isinstance(metadata, MLAMetadata):
        _fail("metadata", "an MLAMetadata from get_mla_metadata (or None)", type(metadata))
    tiles, splits = metadata
    if tiles.dtype != jnp.int32 or tiles.ndim != 2:
        _fail("metadata.tile_scheduler_metadata", "int32 [num_sm_parts, width]",
              f"{tiles.dtype} {_shape_of(tiles)}")
    seqs = b if mode == "dense" else b * s_q
    _check_int32("metadata.num_splits", splits, (seqs + 1,))
    made = metadata.schedule
    if made is None:   # hand-built (e.g. FlashMLA's spelling): only the shapes can be checked
        return
    want = (_meta.dense_schedule(s_q=s_q, h_q=h_q, h_kv=h_kv) if mode == "dense" else
            _meta.sparse_schedule(s_q=s_q, h_q=h_q, topk=topk, extra_topk=extra_topk))
    fields = ("mode", "s_q", "h_q", "h_kv", "topk", "extra_topk")
    diff = {f: getattr(made, f) for f in fields if getattr(made, f) != getattr(want, f)}
    if diff:
        call = {f: getattr(want, f) for f in diff}
        hint = ("get_mla_metadata(cache_seqlens, s_q=..., h_q=..., topk=indices.shape[-1], "
                "extra_topk=extra_indices.shape[-1])" if mode == "sparse" else
                "get_mla_metadata(cache_seqlens, s_q=..., h_q=..., h_kv=...)")
        _fail("metadata", f"a schedule made for this call ({call}); make it with {hint}",
              f"one made for {diff}")


def mla_decode(q, kv_cache, block_table=None, cache_seqlens=None, *, head_dim_v: int = 512,
               softmax_scale: float | None = None, causal: bool = False,
               kv_format: str | None = None, indices=None, topk_length=None, attn_sink=None,
               extra_kv_cache=None, extra_indices=None, extra_topk_length=None,
               metadata: MLAMetadata | None = None, implementation: str | None = None):
    """Paged multi-head latent attention decode (../shared/SEMANTICS.md).

    Args:
      q: [b, s_q, h_q, d_qk] bfloat16 or float16 queries (d_qk 576 for DeepSeek-V3, 512 for V4).
      kv_cache: [num_blocks, block_size, h_kv, d_qk] of q's dtype, or uint8
        [num_blocks, block_size, 1, 656 (d_qk 576) | 584 (d_qk 512)] FP8 (see kv_cache.py; a
        float8_e4m3fn view of those bytes, as FlashMLA passes them, is read as the same bytes).
      block_table: [b, max_blocks] int32 page ids (dense mode; entries past a sequence's length may
        hold anything and are never read).
      cache_seqlens: [b] int32 token counts (dense mode).
      head_dim_v: value width (V is the first head_dim_v channels of the cached vector).
      softmax_scale: default d_qk ** -0.5.
      causal: with s_q > 1, query j attends tokens t <= L - s_q + j (dense only).
      kv_format: "bf16" (cache of q's dtype) or "fp8" (uint8 / float8_e4m3fn bytes); None infers
        it.
      indices: [b, s_q, topk] int32 flat cache rows (block * block_size + offset), -1 = none;
        switches to sparse decode (block_table / cache_seqlens are then ignored).
      topk_length: [b] int32, only the first topk_length[i] indices count (sparse).
      attn_sink: [h_q] float32; out *= 1 / (1 + exp(attn_sink - lse)), lse unchanged.
      extra_kv_cache, extra_indices [b, s_q, extra_topk], extra_topk_length [b]: a second pool
        attended under the same softmax (sparse).
      metadata: from ``get_mla_metadata`` (computed once per step, shared by all layers); None
        computes it inside the call.
      implementation: None (kernel where one covers the call, else the reference with one
        warning), "kernel" (raise if none does) or "reference".

    Returns:
      out [b, s_q, h_q, head_dim_v] of q's dtype, lse [b, h_q, s_q] float32 (natural log, +inf for
      a query with nothing to attend, whose out is 0).
    """
    _primitive.check_implementation("mla_decode", implementation)
    if not hasattr(q, "shape") or q.ndim != 4:
        _fail("q", "rank 4 [b, s_q, h_q, d_qk]", f"shape {getattr(q, 'shape', type(q))}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        _fail("q", "dtype bfloat16 or float16", q.dtype)
    b, s_q, h_q, d_qk = q.shape
    if min(b, s_q, h_q, d_qk) < 1:
        _fail("q", "non-empty axes", f"shape {_shape_of(q)}")
    kv_cache, extra_kv_cache = _kvc.as_fp8_bytes(kv_cache), _kvc.as_fp8_bytes(extra_kv_cache)
    if kv_format is None:
        kv_format = "fp8" if kv_cache.dtype == jnp.uint8 else "bf16"
    if kv_format not in ("bf16", "fp8"):
        _fail("kv_format", "'bf16' or 'fp8'", repr(kv_format))
    h_kv = _check_pool("kv_cache", kv_cache, q, kv_format, d_qk)
    if h_q % h_kv:
        _fail("q", f"h_q divisible by the cache's h_kv = {h_kv}", h_q)
    head_dim_v = _primitive.check_head_dim_v("mla_decode", head_dim_v, d_qk)
    softmax_scale = _primitive.resolve_softmax_scale("mla_decode", softmax_scale, d_qk)

    operands = {"q": q, "kv_cache": kv_cache}
    if indices is None:
        mode = "dense"
        for name, value in (("topk_length", topk_length), ("extra_kv_cache", extra_kv_cache),
                            ("extra_indices", extra_indices),
                            ("extra_topk_length", extra_topk_length)):
            if value is not None:
                _fail(name, "None unless indices is given (sparse decode)", "an array")
        if block_table is None or cache_seqlens is None:
            _fail("block_table / cache_seqlens", "arrays for dense decode (or pass indices)",
                  "None")
        if block_table.ndim != 2 or block_table.shape[0] != b:
            _fail("block_table", f"shape [b={b}, max_blocks]", _shape_of(block_table))
        _check_int32("block_table", block_table, _shape_of(block_table))
        _check_int32("cache_seqlens", cache_seqlens, (b,))
        operands.update(block_table=block_table, cache_seqlens=cache_seqlens)
    else:
        mode = "sparse"
        if causal:
            _fail("causal", "False with indices (sparse decode has no causal mask)", causal)
        if indices.ndim != 3 or indices.shape[:2] != (b, s_q):
            _fail("indices", f"shape [b={b}, s_q={s_q}, topk]", _shape_of(indices))
        _check_int32("indices", indices, _shape_of(indices))
        operands["indices"] = indices
        if topk_length is not None:
            _check_int32("topk_length", topk_length, (b,))
            operands["topk_length"] = topk_length
    if attn_sink is not None:
        if attn_sink.dtype != jnp.float32 or _shape_of(attn_sink) != (h_q,):
            _fail("attn_sink", f"float32 [h_q={h_q}]", f"{attn_sink.dtype} {_shape_of(attn_sink)}")
        operands["attn_sink"] = attn_sink
    if (extra_kv_cache is None) != (extra_indices is None):
        _fail("extra_kv_cache / extra_indices", "both or neither", "only one")
    if extra_kv_cache is not None:
        extra_h_kv = _check_pool("extra_kv_cache", extra_kv_cache, q, kv_format, d_qk)
        if extra_h_kv != h_kv:
            _fail("extra_kv_cache", f"h_kv = {h_kv} (as kv_cache)", extra_h_kv)
        if extra_indices.ndim != 3 or extra_indices.shape[:2] != (b, s_q):
            _fail("extra_indices", f"shape [b={b}, s_q={s_q}, extra_topk]",
                  _shape_of(extra_indices))
        _check_int32("extra_indices", extra_indices, _shape_of(extra_indices))
        operands.update(extra_kv_cache=extra_kv_cache, extra_indices=extra_indices)
        if extra_topk_length is not None:
            _check_int32("extra_topk_length", extra_topk_length, (b,))
            operands["extra_topk_length"] = extra_topk_length
    elif extra_topk_length is not None:
        _fail("extra_topk_length", "None without extra_kv_cache", "an array")
    if metadata is not None:
        _check_metadata(metadata, mode, b=b, s_q=s_q, h_q=h_q, h_kv=h_kv,
                        topk=indices.shape[-1] if indices is not None else None,
                        extra_topk=extra_indices.shape[-1] if extra_indices is not None else None)
        operands.update(tile_scheduler_metadata=metadata.tile_scheduler_metadata,
                        num_splits=metadata.num_splits)

    present = tuple(name for name in OPERANDS if name in operands)
    config = DecodeConfig(mode=mode, head_dim_v=head_dim_v, softmax_scale=softmax_scale,
                          causal=bool(causal), kv_format=kv_format,
                          implementation=implementation, present=present)
    _checks.check_mla_decode(operands)   # checked mode (jax_flashmla/checks.py); nothing when off
    out, lse = _primitive.bind(mla_decode_p, *(operands[name] for name in present), config=config)
    return out, lse


# ---------------------------------------------------------------------------------------------
# The primitive's rules.

def _abstract_eval(*avals, config: DecodeConfig):
    q = avals[0]
    b, s_q, h_q, _ = q.shape
    return (jax.core.ShapedArray((b, s_q, h_q, config.head_dim_v), q.dtype),
            jax.core.ShapedArray((b, h_q, s_q), jnp.float32))


def _reference(*operands, config: DecodeConfig):
    args = dict(zip(config.present, operands))
    args.pop("tile_scheduler_metadata", None)   # the reference needs no schedule
    args.pop("num_splits", None)
    return _ref.mla_decode(**args, softmax_scale=config.softmax_scale,
                           head_dim_v=config.head_dim_v, causal=config.causal,
                           kv_format=config.kv_format)


def _batching_rule(args, dims, *, config: DecodeConfig):
    """Fold the vmapped axis into the op's batch axis: batch-major operands are merged into b,
    per-sequence pools are stacked into one pool with block ids / rows shifted to match."""
    named = dict(zip(config.present, args))
    named_dims = dict(zip(config.present, dims))
    if named_dims.get("attn_sink", _primitive.NOT_MAPPED) is not _primitive.NOT_MAPPED:
        return _primitive.map_batching(mla_decode_p, args, dims, config=config)
    size = _primitive.mapped_size(args, dims)
    folded = {}
    for name in ("kv_cache", "extra_kv_cache"):
        if name in named:
            folded[name] = (named[name] if named_dims[name] is _primitive.NOT_MAPPED
                            else _primitive.fold_batch(named[name], named_dims[name], size))
    for name in _BATCH_MAJOR:
        if name in named:
            folded[name] = _primitive.fold_batch(named[name], named_dims[name], size)
    if "attn_sink" in named:
        folded["attn_sink"] = named["attn_sink"]
    # Stacked pools: member v's blocks start at v * num_blocks.
    for pool, refs in (("kv_cache", ("block_table", "indices")), ("extra_kv_cache", ("extra_indices",))):
        if pool not in named or named_dims[pool] is _primitive.NOT_MAPPED:
            continue
        unmapped_shape = list(named[pool].shape)
        del unmapped_shape[named_dims[pool]]
        num_blocks, block_size = unmapped_shape[:2]
        member = jnp.repeat(jnp.arange(size, dtype=jnp.int32), folded["q"].shape[0] // size)
        for ref in refs:
            if ref not in folded:
                continue
            if ref == "block_table":   # out-of-range ids stay out of range (absent pages)
                ids = folded[ref]
                folded[ref] = jnp.where((ids >= 0) & (ids < num_blocks),
                                        ids + (member * num_blocks)[:, None], -1)
            else:
                folded[ref] = _primitive.offset_rows(folded[ref], num_blocks * block_size,
                                                     member * num_blocks * block_size)
    # A schedule computed for the unbatched call does not describe the folded batch.
    present = tuple(n for n in config.present if n not in ("tile_scheduler_metadata", "num_splits"))
    out, lse = _primitive.bind(mla_decode_p, *(folded[n] for n in present),
                                config=config.replace(present=present))
    return [_primitive.unfold_batch(out, size), _primitive.unfold_batch(lse, size)], [0, 0]


mla_decode_p = _primitive.define_primitive(
    "jax_flashmla_mla_decode", abstract_eval=_abstract_eval, reference=_reference,
    batching_rule=_batching_rule, kernels=(dense_decode, dense_as_sparse, sparse_decode),
    op_name="mla_decode",
    sharding=_sharding.DECODE)
