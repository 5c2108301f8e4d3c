"""DeepSeek-V4 building blocks in Flax NNX, following ``transformers``' ``modeling_deepseek_v4`` (5.23).

Every parameter's NNX path is its Hugging Face name (``model.layers.3.self_attn.compressor.indexer
.q_b_proj.weight``, ``model.layers.0.mlp.experts.gate_up_proj`` [E, 2 * inter, hidden], ...), so a
transformers-format checkpoint loads name for name. Norm weights, the hyper-connection mixers,
attention sinks, position biases and the router's correction bias are kept in float32 (HF's
``_keep_in_fp32_modules_strict``).

Pieces:
- ``apply_rope``: V4's partial, *interleaved* RoPE on the trailing ``qk_rope_head_dim`` channels
  (pairs (2i, 2i+1), layout kept); with ``-sin`` it undoes the rotation (the attention output's).
- ``Pooler``: the gated compressor. Each window of ``rate`` tokens becomes one entry, a per-channel
  softmax(gate + position_bias)-weighted sum of the tokens' projections, RMS-normed and roped at
  the window's first position. With ``overlap`` (CSA and its indexer) the projections are twice as
  wide: entry w pools window w's second half (Cb) together with window w-1's first half (Ca).
- ``Attention``: shared-KV MQA (one 512-wide head that is key and value), sliding window of
  ``sliding_window`` tokens plus the compressed entries (all causal ones for HCA, the indexer's
  top-k for CSA), per-head attention sink, grouped low-rank output projection.
- ``HyperConnection`` / ``HyperHead``: the hc_mult residual streams, Sinkhorn-normalised mixing.
- ``MoE``: sqrtsoftplus (or softmax / sigmoid) router or hash router, clipped-SwiGLU experts plus one
  shared expert.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..layers import Linear, _normal, linear
from .config import CSA, HCA, SLIDING, DeepseekV4Config

F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


class Buffer(nnx.Variable):
    """A non-trainable checkpoint tensor (the hash router's ``tid2eid``)."""


def rms(x, eps):
    xf = x.astype(F32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """HF DeepseekV4RMSNorm: float32 weight times the float32-normalised input, cast back once."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), F32))
        self.eps = eps

    def __call__(self, x):
        return (self.weight[...].astype(F32) * rms(x, self.eps)).astype(x.dtype)


def unweighted_rms(x, eps):
    """HF DeepseekV4UnweightedRMSNorm: ``x * rsqrt(mean(x^2) + eps)`` (the factor cast to x's dtype)."""
    xf = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps).astype(x.dtype)


def rope_cos_sin(config: DeepseekV4Config, kind: str, positions):
    """cos, sin ``[*positions.shape, qk_rope_head_dim // 2]`` float32 of the "main" or "compress" RoPE."""
    inv = jnp.asarray(config.rope_inv_freq(kind))
    ang = positions.astype(F32)[..., None] * inv
    f = config.rope_attention_factor(kind)
    return jnp.cos(ang) * f, jnp.sin(ang) * f


def apply_rope(x, cos, sin):
    """Rotates the trailing ``2 * cos.shape[-1]`` channels of ``x [b, s, (h,) d]`` in interleaved
    pairs; cos/sin ``[b, s, d_r / 2]`` (broadcast over a head axis when x has one)."""
    rd = 2 * cos.shape[-1]
    if x.ndim == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    r = x[..., -rd:].astype(F32)
    e, o = r[..., 0::2], r[..., 1::2]
    rot = jnp.stack([e * cos - o * sin, o * cos + e * sin], axis=-1).reshape(r.shape)
    return jnp.concatenate([x[..., :-rd], rot.astype(x.dtype)], axis=-1)


def _param(rngs, shape, std, dtype):
    return nnx.Param(_normal(rngs, shape, std, dtype))


# --------------------------------------------------------------------------------------------------
# Compressors and the lightning indexer
# --------------------------------------------------------------------------------------------------
class Pooler(nnx.Module):
    """The gated window compressor shared by HCA, CSA and the CSA indexer (HF names: kv_proj,
    gate_proj, position_bias, kv_norm)."""

    def __init__(self, config: DeepseekV4Config, dim: int, rate: int, overlap: bool, *, dtype, std, rngs):
        width = 2 * dim if overlap else dim
        self.kv_proj = Linear(config.hidden_size, width, dtype=dtype, std=std, rngs=rngs)
        self.gate_proj = Linear(config.hidden_size, width, dtype=dtype, std=std, rngs=rngs)
        self.position_bias = _param(rngs, (rate, width), std, F32)
        self.kv_norm = RMSNorm(dim, config.rms_norm_eps)
        self.dim, self.rate, self.overlap = dim, rate, overlap
        self.config = config

    def project(self, x):
        """Raw per-token projections (kv, gate) ``[b, s, width]``: what the decode state keeps."""
        return self.kv_proj(x), self.gate_proj(x)

    def pool(self, kv, gate, prev_kv=None, prev_gate=None, prev_valid=None, first_position=None):
        """Windows ``kv / gate [b, n, rate, width]`` -> roped entries ``[b, n, dim]``.

        Overlap: window 0's Ca half comes from ``prev_kv / prev_gate [b, rate, width]`` where
        ``prev_valid [b]`` (else it has softmax weight 0). Entry i is roped at position
        ``first_position [b] + i * rate`` (default 0)."""
        b, n, r, _ = kv.shape
        d = self.dim
        g = gate.astype(F32) + self.position_bias[...].astype(F32)
        if self.overlap:
            if prev_kv is None:
                first_kv = jnp.zeros((b, 1, r, d), kv.dtype)
                first_g = jnp.full((b, 1, r, d), -jnp.inf, F32)
            else:
                first_kv = prev_kv[:, None, :, :d].astype(kv.dtype)
                pg = prev_gate[:, None, :, :d].astype(F32) + self.position_bias[...][:, :d].astype(F32)
                first_g = jnp.where(prev_valid[:, None, None, None], pg, -jnp.inf)
            ca_kv = jnp.concatenate([first_kv, kv[:, :-1, :, :d]], axis=1)
            ca_g = jnp.concatenate([first_g, g[:, :-1, :, :d]], axis=1)
            kv = jnp.concatenate([ca_kv, kv[..., d:]], axis=2)
            g = jnp.concatenate([ca_g, g[..., d:]], axis=2)
        w = jax.nn.softmax(g, axis=2).astype(kv.dtype)
        pooled = self.kv_norm(jnp.sum(kv * w, axis=2))
        pos = jnp.arange(n, dtype=jnp.int32)[None, :] * self.rate
        if first_position is not None:
            pos = pos + first_position[:, None]
        pos = jnp.broadcast_to(pos, (b, n))
        return apply_rope(pooled, *rope_cos_sin(self.config, "compress", pos))

    def entries(self, x):
        """All complete windows of ``x [b, s, hidden]`` from position 0 -> ``[b, s // rate, dim]``."""
        kv, gate = self.project(x)
        return self.pool_prefix(kv, gate)

    def pool_prefix(self, kv, gate):
        b, s, width = kv.shape
        n = s // self.rate
        if n == 0:
            return jnp.zeros((b, 0, self.dim), kv.dtype)
        kv = kv[:, :n * self.rate].reshape(b, n, self.rate, width)
        gate = gate[:, :n * self.rate].reshape(b, n, self.rate, width)
        return self.pool(kv, gate)


class IndexerScorer(nnx.Module):
    def __init__(self, config: DeepseekV4Config, *, dtype, std, rngs):
        self.weights_proj = Linear(config.hidden_size, config.index_n_heads, dtype=dtype, std=std, rngs=rngs)


class Indexer(Pooler):
    """Lightning indexer (HF DeepseekV4Indexer): its own overlapping compressor at index_head_dim,
    queries from the q low-rank residual, score = sum_h w_h relu(q_h . k) / sqrt(index_head_dim)."""

    def __init__(self, config: DeepseekV4Config, *, dtype, std, rngs):
        super().__init__(config, config.index_head_dim, config.compress_rate_csa, True, dtype=dtype, std=std,
                         rngs=rngs)
        self.q_b_proj = Linear(config.q_lora_rank, config.index_n_heads * config.index_head_dim, dtype=dtype,
                               std=std, rngs=rngs)
        self.scorer = IndexerScorer(config, dtype=dtype, std=std, rngs=rngs)

    def queries(self, x, q_res, cos_sin):
        """(q [b, s, n_heads, d] roped with the compress RoPE, head weights [b, s, n_heads] f32)."""
        c = self.config
        b, s, _ = q_res.shape
        q = apply_rope(self.q_b_proj(q_res).reshape(b, s, c.index_n_heads, c.index_head_dim), *cos_sin)
        w = self.scorer.weights_proj(x).astype(F32) * c.index_n_heads ** -0.5
        return q, w

    def scores(self, q, w, keys):
        """q [b,s,h,d], w [b,s,h], keys [b,T,d] -> [b,s,T] float32."""
        qk = jnp.einsum("bshd,btd->bsht", q.astype(F32), keys.astype(F32), precision=_HIGHEST)
        return jnp.einsum("bsht,bsh->bst", jax.nn.relu(qk) * self.config.index_head_dim ** -0.5, w,
                          precision=_HIGHEST)


def select_topk(scores, n_valid, k):
    """Top-``k`` entry ids per query among entries ``< n_valid [b, s]``; -1 where fewer are valid."""
    t = scores.shape[-1]
    k = min(k, t)
    valid = jnp.arange(t, dtype=jnp.int32) < n_valid[..., None]
    vals, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
    return jnp.where(vals > -jnp.inf, idx, -1).astype(jnp.int32)


class Compressor(Pooler):
    """HF DeepseekV4HCACompressor (``overlap=False``) or DeepseekV4CSACompressor (with ``indexer``)."""

    def __init__(self, config: DeepseekV4Config, layer_type: str, *, dtype, std, rngs):
        csa = layer_type == CSA
        rate = config.compress_rate_csa if csa else config.compress_rate_hca
        super().__init__(config, config.head_dim, rate, csa, dtype=dtype, std=std, rngs=rngs)
        self.is_csa = csa
        if csa:
            self.indexer = Indexer(config, dtype=dtype, std=std, rngs=rngs)

    def select(self, x, q_res, positions, cos_sin_c):
        """Over a whole prompt from position 0: (entries [b, T, head_dim], entry ids [b, s, k] each
        query attends, -1 = none). Query t sees entries w < (t + 1) // rate; CSA keeps the indexer's
        top index_topk of those."""
        ent = self.entries(x)
        t = ent.shape[1]
        n_valid = (positions + 1) // self.rate
        if not self.is_csa or t == 0:
            ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (*positions.shape, t))
            return ent, jnp.where(ids < n_valid[..., None], ids, -1)
        ix = self.indexer
        keys = ix.entries(x)
        q, w = ix.queries(x, q_res, cos_sin_c)
        return ent, select_topk(ix.scores(q, w, keys), n_valid, self.config.index_topk)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
class GroupedLinear(nnx.Module):
    """HF DeepseekV4GroupedLinear (``o_a_proj``): weight [groups * rank, in_per_group], group g maps
    its slice of the heads through rows [g * rank, (g + 1) * rank)."""

    def __init__(self, in_per_group: int, out_features: int, groups: int, *, dtype, std, rngs):
        self.weight = _param(rngs, (out_features, in_per_group), std, dtype)
        self.groups = groups

    def __call__(self, x):
        """x [..., groups, in_per_group] -> [..., groups, rank]."""
        w = self.weight[...].astype(x.dtype)
        w = w.reshape(self.groups, -1, w.shape[-1])
        y = jnp.einsum("...gi,gri->...gr", x, w, preferred_element_type=F32)
        return y.astype(x.dtype)


def attend_with_sink(q, keys, mask, sinks, scale):
    """Dense attention with a per-head sink logit in the softmax denominator (HF eager path).
    q [b,s,h,d], keys [b,n,d] (also the values), mask [b,s,n] bool -> [b,s,h,d] in q's dtype."""
    logits = jnp.einsum("bshd,bnd->bhsn", q.astype(F32), keys.astype(F32), precision=_HIGHEST) * scale
    logits = jnp.where(mask[:, None], logits, -jnp.inf)
    sink = sinks.astype(F32)[None, :, None]
    m = jnp.maximum(jnp.max(logits, axis=-1), sink)
    p = jnp.exp(logits - m[..., None])
    denom = jnp.sum(p, axis=-1) + jnp.exp(sink - m)
    out = jnp.einsum("bhsn,bnd->bshd", p / denom[..., None], keys.astype(F32), precision=_HIGHEST)
    return out.astype(q.dtype)


def window_mask(q_pos, k_pos, window: int):
    """Key k is in query q's sliding window: q - window < k <= q."""
    d = q_pos[..., :, None] - k_pos[..., None, :]
    return (d >= 0) & (d < window)


class Attention(nnx.Module):
    def __init__(self, config: DeepseekV4Config, layer_idx: int, *, dtype, std, rngs):
        c = config
        self.config = c
        self.layer_type = c.layer_types[layer_idx]
        self.rope_kind = "main" if self.layer_type == SLIDING else "compress"
        h, d = c.num_attention_heads, c.head_dim
        self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, dtype=dtype, std=std, rngs=rngs)
        self.q_a_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.q_b_proj = Linear(c.q_lora_rank, h * d, dtype=dtype, std=std, rngs=rngs)
        self.kv_proj = Linear(c.hidden_size, d, dtype=dtype, std=std, rngs=rngs)
        self.kv_norm = RMSNorm(d, c.rms_norm_eps)
        self.o_a_proj = GroupedLinear(h * d // c.o_groups, c.o_groups * c.o_lora_rank, c.o_groups, dtype=dtype,
                                      std=std, rngs=rngs)
        self.o_b_proj = Linear(c.o_groups * c.o_lora_rank, c.hidden_size, dtype=dtype, std=std, rngs=rngs)
        self.sinks = _param(rngs, (h,), 0.5, F32)
        if self.layer_type != SLIDING:
            self.compressor = Compressor(c, self.layer_type, dtype=dtype, std=std, rngs=rngs)

    @property
    def has_compressor(self) -> bool:
        return self.layer_type != SLIDING

    def project(self, x, cos_sin):
        """x [b,s,hidden] -> (q [b,s,h,d] roped, kv [b,s,d] roped, q low-rank residual)."""
        c = self.config
        b, s, _ = x.shape
        q_res = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(q_res).reshape(b, s, c.num_attention_heads, c.head_dim)
        q = apply_rope(unweighted_rms(q, c.rms_norm_eps), *cos_sin)
        kv = apply_rope(self.kv_norm(self.kv_proj(x)), *cos_sin)
        return q, kv, q_res

    def output(self, o, cos_sin):
        """Attention output [b,s,h,d]: un-rope its trailing channels (-sin), grouped projection."""
        c = self.config
        cos, sin = cos_sin
        o = apply_rope(o, cos, -sin)
        b, s = o.shape[:2]
        grouped = self.o_a_proj(o.reshape(b, s, c.o_groups, -1)).reshape(b, s, -1)
        return self.o_b_proj(grouped)

    def __call__(self, x, positions, rope):
        """Plain forward over a whole prompt from position 0 (HF no-cache semantics)."""
        cos_sin = rope[self.rope_kind]
        q, kv, q_res = self.project(x, cos_sin)
        keys, mask = kv, window_mask(positions, positions, self.config.sliding_window)
        if self.has_compressor:
            ent, ids = self.compressor.select(x, q_res, positions, rope["compress"])
            if ent.shape[1]:
                hit = jnp.any((ids[..., None] == jnp.arange(ent.shape[1])) & (ids[..., None] >= 0), axis=-2)
                keys = jnp.concatenate([kv, ent.astype(kv.dtype)], axis=1)
                mask = jnp.concatenate([mask, hit], axis=-1)
        o = attend_with_sink(q, keys, mask, self.sinks[...], self.config.softmax_scale)
        return self.output(o, cos_sin)


# --------------------------------------------------------------------------------------------------
# Hyper-connections
# --------------------------------------------------------------------------------------------------
class HyperConnection(nnx.Module):
    """HF DeepseekV4HyperConnection: (post [b,s,n], comb [b,s,n,n], collapsed [b,s,hidden])."""

    def __init__(self, config: DeepseekV4Config, *, std, rngs):
        n = config.hc_mult
        self.fn = _param(rngs, ((2 + n) * n, n * config.hidden_size), std, F32)
        self.base = _param(rngs, ((2 + n) * n,), std, F32)
        self.scale = nnx.Param(jnp.ones((3,), F32))
        self.config = config

    def __call__(self, h):
        c = self.config
        n = c.hc_mult
        b, s = h.shape[:2]
        flat = unweighted_rms(h.reshape(b, s, -1).astype(F32), c.rms_norm_eps)
        mix = jnp.einsum("bsi,oi->bso", flat, self.fn[...].astype(F32), precision=_HIGHEST)
        base, scale = self.base[...].astype(F32), self.scale[...].astype(F32)
        pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + c.hc_eps
        post = 2 * jax.nn.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb = mix[..., 2 * n:].reshape(b, s, n, n) * scale[2] + base[2 * n:].reshape(n, n)
        comb = jax.nn.softmax(comb, axis=-1) + c.hc_eps
        comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + c.hc_eps)
        for _ in range(c.hc_sinkhorn_iters - 1):
            comb = comb / (jnp.sum(comb, axis=-1, keepdims=True) + c.hc_eps)
            comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + c.hc_eps)
        collapsed = jnp.sum(pre[..., None] * h.astype(F32), axis=2).astype(h.dtype)
        return post, comb, collapsed


def hc_merge(post, comb, block_out, h):
    """new stream k = post_k * block_out + sum_j comb[j, k] * stream j."""
    dt = h.dtype
    mixed = jnp.einsum("bsjk,bsjd->bskd", comb.astype(dt), h, preferred_element_type=F32)
    return (post.astype(dt)[..., None] * block_out[..., None, :] + mixed.astype(dt)).astype(dt)


class HyperHead(nnx.Module):
    def __init__(self, config: DeepseekV4Config, *, std, rngs):
        n = config.hc_mult
        self.hc_fn = _param(rngs, (n, n * config.hidden_size), std, F32)
        self.hc_base = _param(rngs, (n,), std, F32)
        self.hc_scale = nnx.Param(jnp.ones((1,), F32))
        self.config = config

    def __call__(self, h):
        c = self.config
        b, s = h.shape[:2]
        flat = unweighted_rms(h.reshape(b, s, -1).astype(F32), c.rms_norm_eps)
        mix = jnp.einsum("bsi,oi->bso", flat, self.hc_fn[...].astype(F32), precision=_HIGHEST)
        pre = jax.nn.sigmoid(mix * self.hc_scale[...].astype(F32) + self.hc_base[...].astype(F32)) + c.hc_eps
        return jnp.sum(pre[..., None] * h.astype(F32), axis=2).astype(h.dtype)


# --------------------------------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------------------------------
def _clipped_swiglu(gate, up, limit):
    return jax.nn.silu(jnp.minimum(gate, limit)) * jnp.clip(up, -limit, limit)


class SharedMLP(nnx.Module):
    def __init__(self, config: DeepseekV4Config, *, dtype, std, rngs):
        h, i = config.hidden_size, config.moe_intermediate_size
        self.gate_proj = Linear(h, i, dtype=dtype, std=std, rngs=rngs)
        self.up_proj = Linear(h, i, dtype=dtype, std=std, rngs=rngs)
        self.down_proj = Linear(i, h, dtype=dtype, std=std, rngs=rngs)
        self.limit = config.swiglu_limit

    def __call__(self, x):
        return self.down_proj(_clipped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class Router(nnx.Module):
    """HF DeepseekV4TopKRouter (``hash=False``) or DeepseekV4HashRouter (``tid2eid`` picks)."""

    def __init__(self, config: DeepseekV4Config, hashed: bool, *, dtype, std, rngs):
        self.weight = _param(rngs, (config.n_routed_experts, config.hidden_size), std, dtype)
        self.hashed = hashed
        self.config = config
        if hashed:
            # A random table so a random model routes somewhere interesting; checkpoints set it.
            # Distinct experts per token (as a real table has), drawn without jax.random's per-shape
            # compiles; checkpoints overwrite it.
            key = rngs.params()
            if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
                key = jax.random.key_data(key)
            seed = 0 if isinstance(key, jax.core.Tracer) else np.asarray(key).ravel().tolist()
            rng = np.random.default_rng(seed)
            tid = np.argsort(rng.random((config.vocab_size, config.n_routed_experts)), axis=1)
            self.tid2eid = Buffer(jnp.asarray(tid[:, :config.num_experts_per_tok], jnp.int32))
        else:
            self.e_score_correction_bias = nnx.Param(jnp.zeros((config.n_routed_experts,), F32))

    def __call__(self, x, ids):
        """x [T, hidden], ids [T] -> (expert ids [T, k], weights [T, k] f32)."""
        c = self.config
        logits = linear(x.astype(F32), self.weight[...].astype(F32))
        if c.scoring_func == "sqrtsoftplus":
            scores = jnp.sqrt(jax.nn.softplus(logits))
        elif c.scoring_func == "softmax":
            scores = jax.nn.softmax(logits, axis=-1)
        else:
            scores = jax.nn.sigmoid(logits)
        if self.hashed:
            idx = jnp.take(self.tid2eid[...], ids, axis=0).astype(jnp.int32)
        else:
            _, idx = jax.lax.top_k(scores + self.e_score_correction_bias[...].astype(F32), c.num_experts_per_tok)
        w = jnp.take_along_axis(scores, idx, axis=1)
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
        return idx.astype(jnp.int32), w * c.routed_scaling_factor


class Experts(nnx.Module):
    """HF layout: ``gate_up_proj [E, 2 * inter, hidden]`` (gate rows first), ``down_proj [E, hidden, inter]``."""

    def __init__(self, config: DeepseekV4Config, *, dtype, std, rngs):
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = _param(rngs, (e, 2 * i, h), std, dtype)
        self.down_proj = _param(rngs, (e, h, i), std, dtype)
        self.num_experts, self.inter, self.limit = e, i, config.swiglu_limit

    def __call__(self, x, expert_idx, weights):
        t, k = expert_idx.shape
        flat = expert_idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token = order // k
        sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        xs = jnp.take(x, token, axis=0)
        dt = x.dtype

        def gmm(lhs, w):   # w [E, out, in]
            return jax.lax.ragged_dot(lhs, jnp.swapaxes(w.astype(dt), 1, 2), sizes,
                                      preferred_element_type=F32).astype(dt)

        gu = gmm(xs, self.gate_up_proj[...])
        hmid = _clipped_swiglu(gu[:, :self.inter], gu[:, self.inter:], self.limit)
        y = gmm(hmid, self.down_proj[...]).astype(F32) * jnp.take(weights.reshape(-1), order)[:, None]
        return jnp.zeros((t, x.shape[-1]), F32).at[token].add(y).astype(dt)


class MoE(nnx.Module):
    def __init__(self, config: DeepseekV4Config, layer_idx: int, *, dtype, std, rngs):
        self.gate = Router(config, config.mlp_layer_types[layer_idx] == "hash_moe", dtype=dtype, std=std, rngs=rngs)
        self.experts = Experts(config, dtype=dtype, std=std, rngs=rngs)
        self.shared_experts = SharedMLP(config, dtype=dtype, std=std, rngs=rngs)

    def __call__(self, x, ids):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        with jax.named_scope("router"):
            idx, w = self.gate(flat, ids.reshape(-1))
        with jax.named_scope("experts"):
            routed = self.experts(flat, idx, w).reshape(shape)
        with jax.named_scope("shared_experts"):
            return routed + self.shared_experts(x)


__all__ = ["Attention", "HyperConnection", "HyperHead", "MoE", "RMSNorm", "Pooler", "Compressor", "Indexer",
           "apply_rope", "rope_cos_sin", "attend_with_sink", "window_mask", "select_topk", "hc_merge", "HCA",
           "CSA", "SLIDING"]
