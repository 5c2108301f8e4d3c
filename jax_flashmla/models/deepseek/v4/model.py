"""DeepSeek-V4 causal LM (Flax NNX): a plain forward, paged prefill and paged decode on jax_flashmla.

Module tree (= NNX state paths = HF names)::

    DeepseekV4ForCausalLM
      model
        embed_tokens.weight
        layers[i]
          input_layernorm, post_attention_layernorm, attn_hc, ffn_hc
          self_attn: q_a_proj, q_a_norm, q_b_proj, kv_proj, kv_norm, o_a_proj, o_b_proj, sinks,
                     compressor (CSA / HCA layers; CSA's holds the indexer)
          mlp: gate (router or hash router), experts, shared_experts
        norm, hc_head
      lm_head.weight

Paths through it (all pure functions of the parameters):

- ``forward(ids)``: HF's no-cache pass (dense masked attention, any dtype incl. float32).
- ``prefill(ids, lengths, pages, tables)``: the same over right-padded prompts; every layer's
  attention runs as ONE ``jax_flashmla.sparse_mla_prefill`` (window rows + compressed rows as
  indices, ``attn_sink``), and the paged cache (``V4Pages``) is filled.
- ``decode(tokens, pages, tables, seqlens)``: one token per sequence; ``get_mla_metadata`` once per step and kind of layer,
  then per layer ONE sparse ``jax_flashmla.mla_decode``: ``indices`` into the window pool,
  ``extra_indices`` (+ ``extra_topk_length``) into the compressed pool, ``attn_sink``, d_qk 512.

The cache (see ``V4Pages``): per layer a window pool (a ring of ``ring`` tokens per sequence,
token p at ring slot p % ring) and, for CSA / HCA layers, a compressed pool with its own page size
(entry w at logical row w), the CSA indexer's compressed keys, and the compressor's small state:
the raw projections of the last one (HCA) or two (CSA) windows of tokens.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

import jax_flashmla as jfm
from jax_flashmla import kv_cache as kvc

from ..cache import PageAllocator, gather_tokens
from ..layers import Embed, Linear
from .config import CSA, SLIDING, DeepseekV4Config
from .layers import (F32, Attention, HyperConnection, HyperHead, MoE, RMSNorm, hc_merge, rope_cos_sin,
                     select_topk)

KV_FORMATS = ("bf16", "fp8", "float32")
_TILE = 64   # the sparse kernels take top-k in tiles of 64


# --------------------------------------------------------------------------------------------------
# The paged cache
# --------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class V4Pages:
    """Device arrays of the V4 cache, one entry per layer (None where a layer has no such part).

    window[i]: [num_blocks, block_size, 1, 584] uint8 (V4 FP8 layout) or [.., head_dim] bf16/f32.
    compressed[i]: the layer's compressed entries, same format, its own page size.
    index_k[i]: CSA indexer keys [num_cblocks, cblock_size, 1, index_head_dim] (bf16 / f32).
    state[i]: dict of float32 [b, ring_tokens, width] raw compressor projections ("kv", "gate",
      and for CSA "ikv", "igate" of the indexer), token p at row p % ring_tokens.
    """
    window: tuple
    compressed: tuple
    index_k: tuple
    state: tuple

    @property
    def kv_format(self) -> str:
        dt = self.window[0].dtype
        return "fp8" if dt == jnp.uint8 else "float32" if dt == jnp.float32 else "bf16"


@dataclasses.dataclass(frozen=True)
class V4Tables:
    """Block tables: ``window [b, ring // block_size]`` and ``compressed [b, max_entry_blocks]``."""
    window: jax.Array
    compressed: jax.Array
    ring: int


def _pool_shape(num_blocks, block_size, d, kv_format, model_dtype):
    if kv_format == "fp8":
        if d != kvc.V4.d_qk:
            raise ValueError(f"the V4 FP8 cache layout needs head_dim 512 (448 NoPE + 64 RoPE), got {d}")
        return (num_blocks, block_size, 1, kvc.V4.token_bytes), jnp.uint8
    dt = jnp.float32 if kv_format == "float32" else (jnp.float16 if jnp.dtype(model_dtype) == jnp.float16
                                                      else jnp.bfloat16)
    return (num_blocks, block_size, 1, d), dt


def init_cache(config: DeepseekV4Config, batch: int, max_len: int, *, block_size: int = 64,
               compressed_block_size: int = 64, kv_format: str = "bf16", dtype=jnp.bfloat16):
    """Zeroed ``V4Pages`` for ``batch`` sequences of up to ``max_len`` tokens and their ``V4Tables``
    (pages handed out by ``PageAllocator``). The window ring is ``sliding_window`` rounded up to
    whole pages; compressed pools hold ``max_len // rate`` entries of the smallest rate."""
    if kv_format not in KV_FORMATS:
        raise ValueError(f"init_cache: kv_format must be one of {KV_FORMATS}, got {kv_format!r}")
    c = config
    ring = -(-c.sliding_window // block_size) * block_size
    rates = [c.compress_rate(i) for i in range(c.num_hidden_layers) if c.layer_types[i] != SLIDING]
    max_entries = max([max_len // r for r in rates] + [1])
    win_alloc = PageAllocator(batch * ring // block_size, block_size, ring // block_size)
    cblocks = -(-max_entries // compressed_block_size)
    cmp_alloc = PageAllocator(batch * cblocks, compressed_block_size, cblocks)
    for i in range(batch):
        win_alloc.ensure(i, ring)
        cmp_alloc.ensure(i, max_entries)
    tables = V4Tables(window=jnp.asarray(win_alloc.block_table(range(batch))),
                      compressed=jnp.asarray(cmp_alloc.block_table(range(batch))), ring=ring)
    wshape, wdt = _pool_shape(win_alloc.num_blocks, block_size, c.head_dim, kv_format, dtype)
    cshape, cdt = _pool_shape(cmp_alloc.num_blocks, compressed_block_size, c.head_dim, kv_format, dtype)
    idt = jnp.float32 if kv_format == "float32" else jnp.bfloat16
    window, compressed, index_k, state = [], [], [], []
    for i, t in enumerate(c.layer_types):
        window.append(jnp.zeros(wshape, wdt))
        if t == SLIDING:
            compressed.append(None), index_k.append(None), state.append(None)
            continue
        compressed.append(jnp.zeros(cshape, cdt))
        m = c.compress_rate(i)
        if t == CSA:
            index_k.append(jnp.zeros((cmp_alloc.num_blocks, compressed_block_size, 1, c.index_head_dim), idt))
            st = {"kv": jnp.zeros((batch, 2 * m, 2 * c.head_dim), F32),
                  "gate": jnp.zeros((batch, 2 * m, 2 * c.head_dim), F32),
                  "ikv": jnp.zeros((batch, 2 * m, 2 * c.index_head_dim), F32),
                  "igate": jnp.zeros((batch, 2 * m, 2 * c.index_head_dim), F32)}
        else:
            index_k.append(None)
            st = {"kv": jnp.zeros((batch, m, c.head_dim), F32), "gate": jnp.zeros((batch, m, c.head_dim), F32)}
        state.append(st)
    pages = V4Pages(window=tuple(window), compressed=tuple(compressed), index_k=tuple(index_k),
                    state=tuple(state))
    return pages, tables


def _write(pool, table, positions, values):
    """values [b, n, d] at logical rows ``positions [b, n]`` (-1: skip) of a paged pool."""
    if pool.dtype != jnp.uint8:
        values = values.astype(pool.dtype)
    else:
        values = values.astype(jnp.bfloat16)
    return kvc.write_tokens(pool, table, positions, values[:, :, None, :])


def _pad_last(x, multiple, value=-1):
    pad = -x.shape[-1] % multiple
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=value)


def _attn_dtype(pool):
    return jnp.dtype(jnp.bfloat16) if pool.dtype == jnp.uint8 else jnp.dtype(pool.dtype)


def _ring_gather(values, lengths, ring_tokens):
    """Rows of ``values [b, s, w]`` for ring slots r = p % ring_tokens of the last ring_tokens
    positions p < lengths[b] -> [b, ring_tokens, w] (slots of positions < 0 hold row 0)."""
    r = jnp.arange(ring_tokens, dtype=jnp.int32)[None, :]
    start = lengths[:, None] - ring_tokens
    p = start + (r - start) % ring_tokens
    return jnp.take_along_axis(values, jnp.clip(p, 0, values.shape[1] - 1)[..., None], axis=1)


# --------------------------------------------------------------------------------------------------
# Decoder layer and model
# --------------------------------------------------------------------------------------------------
class DecoderLayer(nnx.Module):
    def __init__(self, config: DeepseekV4Config, layer_idx: int, *, dtype, std, rngs):
        self.layer_idx = layer_idx
        self.self_attn = Attention(config, layer_idx, dtype=dtype, std=std, rngs=rngs)
        self.mlp = MoE(config, layer_idx, dtype=dtype, std=std, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_hc = HyperConnection(config, std=std, rngs=rngs)
        self.ffn_hc = HyperConnection(config, std=std, rngs=rngs)

    def _ffn(self, h, ids):
        with jax.named_scope("moe"):
            post, comb, collapsed = self.ffn_hc(h)
            return hc_merge(post, comb, self.mlp(self.post_attention_layernorm(collapsed), ids), h)

    def __call__(self, h, ids, attn_fn):
        with jax.named_scope("attention"):
            post, comb, collapsed = self.attn_hc(h)
            a, extra = attn_fn(self.self_attn, self.input_layernorm(collapsed))
            h = hc_merge(post, comb, a, h)
        return self._ffn(h, ids), extra


class DeepseekV4Model(nnx.Module):
    def __init__(self, config: DeepseekV4Config, *, dtype, std, rngs):
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, std=std, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, i, dtype=dtype, std=std, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hc_head = HyperHead(config, std=std, rngs=rngs)


class DeepseekV4ForCausalLM(nnx.Module):
    """DeepSeek-V4 with an LM head. ``model(input_ids)`` -> logits ``[b, s, vocab]`` float32."""

    def __init__(self, config: DeepseekV4Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None,
                 seed: int = 0, init_std: float = 0.02):
        rngs = rngs if rngs is not None else nnx.Rngs(seed)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.model = DeepseekV4Model(config, dtype=dtype, std=init_std, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype, std=init_std, rngs=rngs)

    # ---- pieces -----------------------------------------------------------------------------------
    def _embed(self, ids):
        ids = jnp.asarray(ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"input_ids: expected an integer array [batch, seq], got "
                             f"{getattr(ids, 'dtype', type(ids))} shape {getattr(ids, 'shape', None)}")
        ids = ids.astype(jnp.int32)
        h = self.model.embed_tokens(ids)
        return ids, jnp.broadcast_to(h[:, :, None, :], (*h.shape[:2], self.config.hc_mult, h.shape[-1]))

    def _logits(self, h):
        h = self.model.norm(self.model.hc_head(h))
        w = (self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight)[...]
        return jnp.einsum("...i,vi->...v", h, w.astype(h.dtype), preferred_element_type=F32)

    def _rope(self, positions):
        return {k: rope_cos_sin(self.config, k, positions) for k in ("main", "compress")}

    # ---- plain forward ----------------------------------------------------------------------------
    def forward(self, input_ids):
        """Logits ``[b, s, vocab]`` float32 of a causal pass from position 0 (HF, no cache)."""
        ids, h = self._embed(input_ids)
        b, s = ids.shape
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        rope = self._rope(pos)
        for i, layer in enumerate(self.model.layers):
            with jax.named_scope(f"layer_{i}"):
                h, _ = layer(h, ids, lambda attn, x: (attn(x, pos, rope), None))
        return self._logits(h)

    def __call__(self, input_ids):
        graphdef, state = nnx.split(self)
        return _jit_forward(graphdef, state, jnp.asarray(input_ids))

    # ---- paged prefill ----------------------------------------------------------------------------
    def prefill(self, input_ids, lengths, pages: V4Pages, tables: V4Tables, *, implementation=None):
        """Right-padded prompts ``input_ids [b, s]`` of ``lengths [b]`` from position 0 -> (logits of
        each prompt's last token [b, vocab] f32, filled pages)."""
        ids, h = self._embed(input_ids)
        b, s = ids.shape
        lengths = jnp.asarray(lengths, jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        rope = self._rope(pos)
        new = {f: list(getattr(pages, f)) for f in ("window", "compressed", "index_k", "state")}
        for i, layer in enumerate(self.model.layers):
            def attn_fn(attn, x, i=i):
                return _prefill_attention(attn, x, pos, lengths, rope, pages, tables, i, implementation)
            with jax.named_scope(f"layer_{i}"):
                h, upd = layer(h, ids, attn_fn)
            for f, v in upd.items():
                new[f][i] = v
        last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None, None], axis=1)[:, 0]
        return self._logits(last[:, None])[:, 0], V4Pages(**{f: tuple(v) for f, v in new.items()})

    # ---- paged decode -----------------------------------------------------------------------------
    def decode(self, tokens, pages: V4Pages, tables: V4Tables, seqlens, active=None, *, metadata=None,
               implementation=None):
        """One step: ``tokens [b, 1]`` go at positions ``seqlens [b]`` (tokens cached so far).
        Returns (logits [b, 1, vocab] f32, new pages). Inactive slots write nothing."""
        ids, h = self._embed(tokens)
        b, s = ids.shape
        if s != 1:
            raise ValueError(f"DeepseekV4ForCausalLM.decode: one token per sequence, got {s}")
        if active is None:
            active = jnp.ones((b,), bool)
        t = jnp.asarray(seqlens, jnp.int32)
        rope = self._rope(t[:, None])
        if metadata is None and pages.kv_format != "float32":
            # One schedule per step for each kind of layer (a schedule is made for the indices'
            # widths: window only, window + compressed entries, window + indexer's top-k), made
            # by the first layer of that kind and reused by the others (_decode_attention).
            metadata = {}
        new = {f: list(getattr(pages, f)) for f in ("window", "compressed", "index_k", "state")}
        for i, layer in enumerate(self.model.layers):
            def attn_fn(attn, x, i=i):
                return _decode_attention(attn, x, t, active, rope, pages, tables, i, metadata, implementation)
            with jax.named_scope(f"layer_{i}"):
                h, upd = layer(h, ids, attn_fn)
            for f, v in upd.items():
                new[f][i] = v
        return self._logits(h), V4Pages(**{f: tuple(v) for f, v in new.items()})


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, input_ids):
    return nnx.merge(graphdef, state).forward(input_ids)


# --------------------------------------------------------------------------------------------------
# Attention over the paged cache
# --------------------------------------------------------------------------------------------------
def _prefill_attention(attn: Attention, x, pos, lengths, rope, pages, tables, i, implementation):
    c = attn.config
    cos_sin = rope[attn.rope_kind]
    q, kv, q_res = attn.project(x, cos_sin)
    b, s, h, d = q.shape
    win_pool = pages.window[i]
    adt = _attn_dtype(win_pool)
    upd = {}
    # Window: the last ``ring`` tokens of each prompt go to ring slot p % ring.
    keep = (pos < lengths[:, None]) & (pos >= lengths[:, None] - tables.ring)
    upd["window"] = _write(win_pool, tables.window, jnp.where(keep, pos % tables.ring, -1), kv)
    # Each query's rows in its sequence's [s window tokens | T compressed entries] block.
    wn = min(c.sliding_window, s)
    wp = pos[..., None] - jnp.arange(wn, dtype=jnp.int32)                     # [b, s, wn]
    idx = jnp.where(wp >= 0, wp, -1)
    keys = kv
    if attn.has_compressor:
        comp = attn.compressor
        ent, ids = comp.select(x, q_res, pos, rope["compress"])
        n_ent = ent.shape[1]
        keys = jnp.concatenate([kv, ent.astype(kv.dtype)], axis=1)
        idx = jnp.concatenate([idx, jnp.where(ids >= 0, ids + s, -1)], axis=-1)
        entry = jnp.arange(n_ent, dtype=jnp.int32)[None, :]
        epos = jnp.where(entry < (lengths // comp.rate)[:, None], entry, -1)
        upd["compressed"] = _write(pages.compressed[i], tables.compressed, epos, ent)
        ckv, cgate = comp.project(x)
        st = dict(pages.state[i])
        rt = st["kv"].shape[1]
        st["kv"], st["gate"] = (_ring_gather(v.astype(F32), lengths, rt) for v in (ckv, cgate))
        if comp.is_csa:
            ix = comp.indexer
            ikv, igate = ix.project(x)
            upd["index_k"] = _write(pages.index_k[i], tables.compressed, epos, ix.entries(x))
            st["ikv"], st["igate"] = (_ring_gather(v.astype(F32), lengths, rt) for v in (ikv, igate))
        upd["state"] = st
    n = keys.shape[1]
    rows = jnp.where(idx >= 0, idx + (jnp.arange(b, dtype=jnp.int32) * n)[:, None, None], -1)
    rows = _pad_last(rows, _TILE).reshape(b * s, 1, -1)
    qf = q.astype(adt).reshape(b * s, h, d)
    kf = keys.astype(adt).reshape(b * n, 1, d)
    sinks = attn.sinks[...].astype(F32)
    with jax.named_scope("sparse_mla_prefill"):
        if adt == jnp.float32:
            o, _, _ = jfm.reference.sparse_mla_prefill(qf, kf, rows, softmax_scale=c.softmax_scale,
                                                       head_dim_v=d, attn_sink=sinks)
        else:
            o, _, _ = jfm.sparse_mla_prefill(qf, kf, rows, softmax_scale=c.softmax_scale, head_dim_v=d,
                                             attn_sink=sinks, implementation=implementation)
    o = o.reshape(b, s, h, d).astype(x.dtype)
    return attn.output(o, cos_sin), upd


def _ring_window(state_kv, state_gate, t, rate, overlap):
    """The current window's (and for overlap the previous window's) raw rows from a ring state."""
    ring = state_kv.shape[1]
    w = t // rate
    j = jnp.arange(rate, dtype=jnp.int32)[None, :]
    cur = (w[:, None] * rate + j) % ring
    take = lambda a, r: jnp.take_along_axis(a, r[..., None], axis=1)   # noqa: E731
    out = (take(state_kv, cur)[:, None], take(state_gate, cur)[:, None])
    if not overlap:
        return out, None
    prev = ((w[:, None] - 1) * rate + j) % ring
    return out, (take(state_kv, prev), take(state_gate, prev), w >= 1)


def _decode_compressor(pooler, x, t, active, st, kname, gname, rate):
    """Append token t's raw projections to the ring; the entry of window t // rate as it stands
    (complete when (t + 1) % rate == 0) -> (entry [b, 1, dim], new state)."""
    kv, gate = pooler.project(x)                                               # [b, 1, width]
    ring = st[kname].shape[1]
    bi = jnp.arange(t.shape[0])
    slot = jnp.where(active, t % ring, ring)                                  # ring: dropped
    st = dict(st)
    st[kname] = st[kname].at[bi, slot].set(kv[:, 0].astype(F32), mode="drop")
    st[gname] = st[gname].at[bi, slot].set(gate[:, 0].astype(F32), mode="drop")
    (ck, cg), prev = _ring_window(st[kname], st[gname], t, rate, pooler.overlap)
    first = (t // rate) * rate
    if prev is None:
        ent = pooler.pool(ck.astype(kv.dtype), cg, first_position=first)
    else:
        ent = pooler.pool(ck.astype(kv.dtype), cg, prev[0], prev[1], prev[2], first_position=first)
    return ent, st


def _decode_attention(attn: Attention, x, t, active, rope, pages, tables, i, metadata, implementation):
    c = attn.config
    cos_sin = rope[attn.rope_kind]
    q, kv, q_res = attn.project(x, cos_sin)
    win_pool = pages.window[i]
    upd = {}
    ring = tables.ring
    win_pool = _write(win_pool, tables.window, jnp.where(active, t % ring, -1)[:, None], kv)
    upd["window"] = win_pool
    wp = t[:, None] - jnp.arange(c.sliding_window, dtype=jnp.int32)[None, :]  # [b, W]
    rows = kvc.token_rows(tables.window, jnp.where(wp >= 0, wp % ring, -1), win_pool.shape[1])
    indices = _pad_last(rows, _TILE)[:, None].astype(jnp.int32)              # [b, 1, W']
    extra = {}
    if attn.has_compressor:
        comp = attn.compressor
        m = comp.rate
        st = pages.state[i]
        ent, st = _decode_compressor(comp, x, t, active, st, "kv", "gate", m)
        closes = active & ((t + 1) % m == 0)
        epos = jnp.where(closes, t // m, -1)[:, None]
        cpool = _write(pages.compressed[i], tables.compressed, epos, ent)
        upd["compressed"] = cpool
        n_valid = (t + 1) // m                                                 # entries visible
        max_entries = tables.compressed.shape[1] * cpool.shape[1]
        if comp.is_csa:
            ix = comp.indexer
            ikey, st = _decode_compressor(ix, x, t, active, st, "ikv", "igate", m)
            ipool = _write(pages.index_k[i], tables.compressed, epos, ikey)
            upd["index_k"] = ipool
            with jax.named_scope("indexer"):
                keys = gather_tokens(ipool, tables.compressed)                  # [b, max_entries, d_i]
                qi, wi = ix.queries(x, q_res, rope["compress"])
                chosen = select_topk(ix.scores(qi, wi, keys), n_valid[:, None], c.index_topk)[:, 0]
            ecount = None
        else:
            e = jnp.arange(max_entries, dtype=jnp.int32)[None, :]
            chosen = jnp.where(e < n_valid[:, None], e, -1)
            ecount = n_valid.astype(jnp.int32)
        erows = kvc.token_rows(tables.compressed, chosen, cpool.shape[1])
        extra = dict(extra_kv_cache=cpool, extra_indices=_pad_last(erows, _TILE)[:, None].astype(jnp.int32),
                     extra_topk_length=ecount)
        upd["state"] = st
    if isinstance(metadata, dict):
        # The HCA layers' compressed lists end at extra_topk_length: their schedule weighs each
        # sequence by the entries it attends (get_mla_metadata), so it is kept apart from the
        # CSA layers' of the same shapes.
        etl = extra.get("extra_topk_length") if extra else None
        key = (indices.shape[-1], extra["extra_indices"].shape[-1] if extra else None, etl is not None)
        if key not in metadata:
            with jax.named_scope("mla_metadata"):
                metadata[key] = jfm.get_mla_metadata(t + 1, s_q=1, h_q=c.num_attention_heads,
                                                     topk=key[0], extra_topk=key[1],
                                                     extra_topk_length=etl)
        metadata = metadata[key]
    adt = _attn_dtype(win_pool)
    sinks = attn.sinks[...].astype(F32)
    with jax.named_scope("mla_decode"):
        if adt == jnp.float32:
            o, _ = jfm.reference.mla_decode(q.astype(adt), win_pool, softmax_scale=c.softmax_scale,
                                            head_dim_v=c.head_dim, indices=indices, attn_sink=sinks, **extra)
        else:
            o, _ = jfm.mla_decode(q.astype(adt), win_pool, softmax_scale=c.softmax_scale, head_dim_v=c.head_dim,
                                  indices=indices, attn_sink=sinks, metadata=metadata,
                                  implementation=implementation, **extra)
    return attn.output(o.astype(x.dtype), cos_sin), upd
