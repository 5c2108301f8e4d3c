"""``sparse_mla_prefill``: token-level sparse MLA prefill (DeepSeek Sparse Attention) as a primitive."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_flashmla import checks as _checks
from jax_flashmla import reference as _ref
from jax_flashmla.ops import _primitive, _sharding
from jax_flashmla.ops.kernels import sparse_prefill

OPERANDS = ("q", "kv", "indices", "attn_sink", "topk_length")


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    head_dim_v: int
    softmax_scale: float
    implementation: str | None
    present: tuple[str, ...]


def _fail(arg: str, expected: str, got) -> None:
    _primitive.fail("sparse_mla_prefill", arg, expected, got)


def sparse_mla_prefill(q, kv, indices, *, softmax_scale: float | None = None,
                       head_dim_v: int = 512, attn_sink=None, topk_length=None,
                       implementation: str | None = None):
    """Sparse MLA prefill (../shared/SEMANTICS.md): each query attends the kv rows its indices name.

    Args:
      q: [s_q, h_q, d_qk] bfloat16 (d_qk 576 or 512 for the kernels; any on the reference).
      kv: [s_kv, h_kv, d_qk] of q's dtype (h_kv = 1 for DeepSeek).
      indices: [s_q, h_kv, topk] int32; an index < 0 or >= s_kv is invalid.
      softmax_scale: default d_qk ** -0.5. head_dim_v: V is the first head_dim_v channels of kv.
      attn_sink: [h_q] float32; out *= 1 / (1 + exp(attn_sink - lse)), lse unchanged.
      topk_length: [s_q] int32, only the first topk_length[i] indices of query i count.
    Returns:
      out [s_q, h_q, head_dim_v] q.dtype, max_logits [s_q, h_q] f32 (-inf when nothing is valid),
      lse [s_q, h_q] f32 (natural log, +inf when nothing is valid; then out = 0).
    """
    _primitive.check_implementation("sparse_mla_prefill", implementation)
    if q.ndim != 3:
        _fail("q", "rank 3 [s_q, h_q, d_qk]", f"shape {tuple(q.shape)}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        _fail("q", "dtype bfloat16 or float16", q.dtype)
    s_q, h_q, d_qk = q.shape
    if kv.ndim != 3 or kv.shape[2] != d_qk:
        _fail("kv", f"shape [s_kv, h_kv, d_qk={d_qk}]", tuple(kv.shape))
    if kv.dtype != q.dtype:
        _fail("kv", f"dtype {q.dtype} (q's dtype)", kv.dtype)
    s_kv, h_kv, _ = kv.shape
    if s_kv < 1 or h_kv < 1 or h_q % h_kv:
        _fail("kv", f"s_kv >= 1 and h_kv >= 1 dividing h_q = {h_q}", tuple(kv.shape))
    if indices.ndim != 3 or indices.shape[:2] != (s_q, h_kv):
        _fail("indices", f"shape [s_q={s_q}, h_kv={h_kv}, topk]", tuple(indices.shape))
    if indices.dtype != jnp.int32:
        _fail("indices", "dtype int32", indices.dtype)
    head_dim_v = _primitive.check_head_dim_v("sparse_mla_prefill", head_dim_v, d_qk)
    softmax_scale = _primitive.resolve_softmax_scale("sparse_mla_prefill", softmax_scale, d_qk)
    operands = {"q": q, "kv": kv, "indices": indices}
    if attn_sink is not None:
        if attn_sink.dtype != jnp.float32 or tuple(attn_sink.shape) != (h_q,):
            _fail("attn_sink", f"float32 [h_q={h_q}]", f"{attn_sink.dtype} {tuple(attn_sink.shape)}")
        operands["attn_sink"] = attn_sink
    if topk_length is not None:
        if topk_length.dtype != jnp.int32 or tuple(topk_length.shape) != (s_q,):
            _fail("topk_length", f"int32 [s_q={s_q}]",
                  f"{topk_length.dtype} {tuple(topk_length.shape)}")
        operands["topk_length"] = topk_length
    present = tuple(n for n in OPERANDS if n in operands)
    config = PrefillConfig(head_dim_v=head_dim_v, softmax_scale=softmax_scale,
                           implementation=implementation, present=present)
    _checks.check_sparse_mla_prefill(operands)   # checked mode (checks.py); nothing when off
    out, max_logits, lse = _primitive.bind(sparse_mla_prefill_p, *(operands[n] for n in present),
                                           config=config)
    return out, max_logits, lse


def _abstract_eval(*avals, config: PrefillConfig):
    s_q, h_q, _ = avals[0].shape
    return (jax.core.ShapedArray((s_q, h_q, config.head_dim_v), avals[0].dtype),
            jax.core.ShapedArray((s_q, h_q), jnp.float32),
            jax.core.ShapedArray((s_q, h_q), jnp.float32))


def _reference(*operands, config: PrefillConfig):
    return _ref.sparse_mla_prefill(**dict(zip(config.present, operands)),
                                   softmax_scale=config.softmax_scale,
                                   head_dim_v=config.head_dim_v)


def _batching_rule(args, dims, *, config: PrefillConfig):
    """Fold the vmapped axis into the query axis; a vmapped kv becomes one stacked kv with the
    indices shifted to match."""
    named = dict(zip(config.present, args))
    named_dims = dict(zip(config.present, dims))
    if named_dims.get("attn_sink", _primitive.NOT_MAPPED) is not _primitive.NOT_MAPPED:
        return _primitive.map_batching(sparse_mla_prefill_p, args, dims, config=config)
    size = _primitive.mapped_size(args, dims)
    folded = {n: _primitive.fold_batch(named[n], named_dims[n], size)
              for n in ("q", "indices", "topk_length") if n in named}
    kv = named["kv"]
    if named_dims["kv"] is not _primitive.NOT_MAPPED:
        s_kv = [n for axis, n in enumerate(kv.shape) if axis != named_dims["kv"]][0]
        kv = _primitive.fold_batch(kv, named_dims["kv"], size)
        member = jnp.repeat(jnp.arange(size, dtype=jnp.int32), folded["q"].shape[0] // size)
        folded["indices"] = _primitive.offset_rows(folded["indices"], s_kv, member * s_kv)
    folded["kv"] = kv
    if "attn_sink" in named:
        folded["attn_sink"] = named["attn_sink"]
    outs = _primitive.bind(sparse_mla_prefill_p, *(folded[n] for n in config.present), config=config)
    return [_primitive.unfold_batch(o, size) for o in outs], [0, 0, 0]


sparse_mla_prefill_p = _primitive.define_primitive(
    "jax_flashmla_sparse_mla_prefill", abstract_eval=_abstract_eval, reference=_reference,
    batching_rule=_batching_rule, kernels=(sparse_prefill,), op_name="sparse_mla_prefill",
    sharding=_sharding.SPARSE_PREFILL)
