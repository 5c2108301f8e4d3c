"""DeepSeek-V3 / V3.2 building blocks in Flax NNX: norms, RoPE (YaRN), MLA, the V3.2 indexer, MLP, MoE.

Parameter names and layouts follow the Hugging Face ``transformers`` DeepSeek-V3 / V3.2 models: a
``Linear`` keeps ``weight`` as ``[out_features, in_features]``, so the NNX state path of every
parameter is its HF checkpoint name (``model.layers.3.self_attn.kv_b_proj.weight``). The one
exception is the routed experts, stored stacked for grouped matmuls (see ``Experts``).

Attention has two forms (DeepSeek-V2 paper, section 2.1):
- MHA form (prefill / plain forward): the latent ``c_kv`` is expanded by ``kv_b_proj`` into per-head
  keys and values; ordinary causal attention over ``qk_head_dim`` channels.
- Absorbed form (decode): ``q_nope`` is multiplied into the latent space by W_UK (the key half of
  ``kv_b_proj``), the query attends the cached ``[c_kv, k_rope]`` rows as one shared KV head
  (``jax_flashmla.mla_decode``), and the latent output goes through W_UV (the value half).
Both compute the same function; the tests check it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_flashmla as jfm
from jax_flashmla import kv_cache as kvc

from .cache import gather_tokens
from .config import DeepseekConfig, yarn_get_mscale, _rope_type


# --------------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------------
def _normal(rngs: nnx.Rngs, shape, std, dtype):
    """normal(0, std) initial values, reproducible from ``rngs``."""
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):  # abstract construction (nnx.eval_shape): shapes only
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    # Concrete values come from NumPy seeded by the key: eager jax.random would compile one kernel
    # per distinct shape, seconds of start-up for a model with dozens of shapes.
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    rng = np.random.default_rng(np.asarray(key).ravel().tolist())
    return jnp.asarray((rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(dtype))


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ weight.T (+ bias)`` with float32 accumulation, result in ``x.dtype``."""
    y = jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class Linear(nnx.Module):
    """``y = x W^T (+ b)``, ``weight`` stored ``[out_features, in_features]`` as in PyTorch / HF."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, dtype=jnp.bfloat16,
                 std: float = 0.02, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (out_features, in_features), std, dtype))
        if bias:
            self.bias = nnx.Param(jnp.zeros((out_features,), dtype))
        self.has_bias = bias

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(x, self.weight[...], self.bias[...] if self.has_bias else None)


class Embed(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.bfloat16, std=0.02, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (num_embeddings, features), std, dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """HF DeepseekV3RMSNorm: normalise in float32, cast back, then scale by ``weight``."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.bfloat16):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, computed in float32 (the V3.2 indexer's ``k_norm``)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# RoPE with YaRN
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def rope_parameters(config: DeepseekConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [qk_rope_head_dim // 2] float32, attention_factor) as HF computes them.

    YaRN (HF ``_compute_yarn_parameters``): frequencies below the correction range are interpolated
    by ``factor``, those above kept, a linear ramp in between; cos/sin are multiplied by
    ``attention_factor`` = mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for the
    released DeepSeek configs, whose mscale enters through the softmax scale instead).
    """
    dim = config.qk_rope_head_dim
    base = float(config.rope_theta)
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponents).astype(np.float32)
    rs = config.rope_scaling_dict
    if rs is None or _rope_type(rs) == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor = float(rs["factor"])
    orig = rs.get("original_max_position_embeddings", 4096)
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate by factor
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(config: DeepseekConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[*positions.shape, qk_rope_head_dim // 2]`` float32 (one angle per rotated pair)."""
    inv_freq, attention_factor = rope_parameters(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool) -> jax.Array:
    """Rotates ``x [b, s, heads, d]`` with ``cos/sin [b, s, d/2]``.

    interleaved=True (the MLA RoPE of the DeepSeek checkpoints): channels (2i, 2i+1) form pair i. The
    result comes out de-interleaved ([rotated evens, rotated odds]) exactly like HF's
    ``apply_rotary_pos_emb_interleave``; q and k get the same permutation, so q.k is unchanged.
    interleaved=False (the V3.2 indexer): channels (i, i + d/2) form pair i (``rotate_half``).
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(dtype)


# --------------------------------------------------------------------------------------------------
# Attention helpers (pure functions, shared by the model and the tests)
# --------------------------------------------------------------------------------------------------
def masked_attention(q, k, v, mask, scale):
    """Plain softmax attention. q [b,s,h,d], k [b,t,h,d], v [b,t,h,dv], mask [b,s,t] or [b,1,s,t] bool.

    float32 logits and softmax; rows with nothing to attend give 0. (Operands are upcast rather than
    using preferred_element_type: XLA:CPU has no batched bf16 x bf16 -> f32 dot.)
    """
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bshd,bthd->bhst", q, k) * scale
    if mask.ndim == 3:
        mask = mask[:, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bhst,bthv->bshv", p, v.astype(jnp.float32)).astype(v.dtype)


# Causal attention without the [b, h, s, s] scores: the MHA-form prefill of a V3 model. On a GPU
# cuDNN's flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``); elsewhere, and
# whenever cuDNN refuses the shapes or dtype at trace time, a blockwise online-softmax form.
CAUSAL_ATTENTION_IMPLS = ("auto", "cudnn", "blockwise", "plain")
_CUDNN_REFUSALS: list[str] = []  # why cuDNN was not used (trace time), newest last; for reports


def causal_attention(q, k, v, scale, *, implementation: str = "auto", block: int = 512):
    """Causal softmax attention of ``q [b,s,h,d]`` over ``k [b,s,h,d]``, ``v [b,s,h,dv]`` (query i
    sees keys 0..i) -> ``[b, s, h, dv]`` in ``v.dtype``. Memory grows with s, not s**2 (except "plain").

    implementation: "auto" (cuDNN flash attention when the default backend is a GPU and it takes the
    case, else "blockwise"), "cudnn" (raise if refused), "blockwise", or "plain" (masked_attention).
    """
    if implementation not in CAUSAL_ATTENTION_IMPLS:
        raise ValueError(f"causal_attention: implementation must be one of {CAUSAL_ATTENTION_IMPLS}, got "
                         f"{implementation!r}")
    if implementation == "plain":
        s = q.shape[1]
        return masked_attention(q, k, v, jnp.tril(jnp.ones((s, s), bool))[None], scale)
    if implementation == "cudnn" or (implementation == "auto" and jax.default_backend() == "gpu"):
        try:
            return cudnn_causal_attention(q, k, v, scale)
        except Exception as e:  # cuDNN's checks run at trace time and raise on what it cannot take
            if implementation == "cudnn":
                raise
            _CUDNN_REFUSALS.append(f"{type(e).__name__}: {e}")
    return blockwise_causal_attention(q, k, v, scale, block=block)


def cudnn_causal_attention(q, k, v, scale):
    """cuDNN flash attention. ``jax.nn.dot_product_attention`` wants one head dim for k and v, so a
    narrower v (MLA: d_qk 192, d_v 128) is zero-padded to d_qk and the output sliced back."""
    dv = v.shape[-1]
    dt = v.dtype if v.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    if dv < q.shape[-1]:
        v = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - dv)])
    out = jax.nn.dot_product_attention(q, k, v, scale=float(scale), is_causal=True, implementation="cudnn")
    return out[..., :dv]


def blockwise_causal_attention(q, k, v, scale, *, block: int = 512):
    """Flash-attention-style causal attention in plain JAX: queries in blocks (``lax.map``), each
    running an online softmax over the key blocks at or before it (a ``fori_loop`` with a dynamic
    bound, so the masked upper triangle is skipped). Peak extra memory ~ b * h * block**2 float32.
    float32 arithmetic, like ``masked_attention``."""
    b, s, h, d = q.shape
    dv = v.shape[-1]
    blk = min(block, -(-s // 8) * 8)
    n = -(-s // blk)
    pad = n * blk - s  # padded keys sit after every real query: the causal mask hides them

    def blocks(x):
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad), (0, 0), (0, 0)])
        return x.reshape(b, n, blk, h, x.shape[-1]).transpose(1, 0, 3, 2, 4)  # [n, b, h, blk, d]

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    offs = jnp.arange(blk, dtype=jnp.int32)

    def one_query_block(i):
        qi = qb[i] * scale
        qpos = i * blk + offs

        def step(j, carry):
            m, l, acc = carry
            logits = jnp.einsum("bhqd,bhkd->bhqk", qi, kb[j])
            logits = jnp.where((j * blk + offs)[None, :] <= qpos[:, None], logits, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))  # finite: key 0 of block 0 is always seen
            p = jnp.exp(logits - m_new[..., None])
            corr = jnp.exp(m - m_new)
            return (m_new, l * corr + jnp.sum(p, axis=-1),
                    acc * corr[..., None] + jnp.einsum("bhqk,bhkv->bhqv", p, vb[j]))

        init = (jnp.full((b, h, blk), -jnp.inf, jnp.float32), jnp.zeros((b, h, blk), jnp.float32),
                jnp.zeros((b, h, blk, dv), jnp.float32))
        _, l, acc = jax.lax.fori_loop(0, i + 1, step, init)
        return acc / l[..., None]

    out = jax.lax.map(one_query_block, jnp.arange(n, dtype=jnp.int32))  # [n, b, h, blk, dv]
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, n * blk, h, dv)
    return out[:, :s].astype(v.dtype)


def topk_positions(scores: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """Top-``k`` token positions per query from ``scores [b, s, t]``; -1 where fewer than k are valid."""
    k = min(k, scores.shape[-1])
    scores = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    vals, idx = jax.lax.top_k(scores, k)
    return jnp.where(vals > -jnp.inf, idx, -1).astype(jnp.int32)


def sparse_decode_topk(config, capacity: int) -> int:
    """The index count a V3.2 decode step passes to the sparse ``mla_decode``: the indexer's top-k
    over ``capacity`` cached tokens, padded to whole 64-position tiles (what its schedule must be
    made for: ``get_mla_metadata(..., topk=this)``)."""
    return -(-min(config.index_topk, capacity) // 64) * 64


def positions_to_mask(idx: jax.Array, t: int) -> jax.Array:
    """Top-k positions ``[b, s, k]`` (-1 = none) -> boolean mask ``[b, s, t]``."""
    hit = idx[..., None] == jnp.arange(t, dtype=idx.dtype)
    return jnp.any(hit & (idx[..., None] >= 0), axis=-2)


# --------------------------------------------------------------------------------------------------
# DeepSeek-V3.2 lightning indexer
# --------------------------------------------------------------------------------------------------
class Indexer(nnx.Module):
    """Scores every earlier token for each query; the top ``index_topk`` feed sparse MLA.

    score[b, s, t] = sum_h w[b, s, h] * relu(q[b, s, h] . k[b, t]) with
    w = weights_proj(x) * index_n_heads**-0.5 * index_head_dim**-0.5. The indexer's RoPE covers its
    first ``qk_rope_head_dim`` channels, not interleaved. The official kernel also applies a
    Hadamard rotation and FP8 quantisation to q and k: the rotation is orthogonal (dot products
    unchanged) and FP8 is a precision choice, so here (as in HF) both are left out.
    """

    def __init__(self, config: DeepseekConfig, *, dtype, std, rngs: nnx.Rngs):
        self.config = config
        h, d = config.index_n_heads, config.index_head_dim
        self.wq_b = Linear(config.q_lora_rank, h * d, dtype=dtype, std=std, rngs=rngs)
        self.wk = Linear(config.hidden_size, d, dtype=dtype, std=std, rngs=rngs)
        self.k_norm = LayerNorm(d, eps=1e-6, dtype=dtype)
        self.weights_proj = Linear(config.hidden_size, h, dtype=dtype, std=std, rngs=rngs)

    def keys(self, x: jax.Array, cos_sin) -> jax.Array:
        """Index keys ``[b, s, index_head_dim]`` of the new tokens (what the index cache stores)."""
        dr = self.config.qk_rope_head_dim
        k = self.k_norm(self.wk(x))[:, :, None, :]
        k_pe = apply_rope(k[..., :dr], *cos_sin, interleaved=False)
        return jnp.concatenate([k_pe, k[..., dr:]], axis=-1)[:, :, 0, :]

    def queries(self, x: jax.Array, q_resid: jax.Array, cos_sin) -> tuple[jax.Array, jax.Array]:
        """(q [b, s, index_n_heads, index_head_dim], head weights [b, s, index_n_heads] float32)."""
        cfg = self.config
        b, s, _ = q_resid.shape
        q = self.wq_b(q_resid).reshape(b, s, cfg.index_n_heads, cfg.index_head_dim)
        dr = cfg.qk_rope_head_dim
        q = jnp.concatenate([apply_rope(q[..., :dr], *cos_sin, interleaved=False), q[..., dr:]], axis=-1)
        w = linear(x.astype(jnp.float32), self.weights_proj.weight[...].astype(jnp.float32))
        w = w * (cfg.index_n_heads ** -0.5) * (cfg.index_head_dim ** -0.5)
        return q, w

    @staticmethod
    def scores(q: jax.Array, w: jax.Array, k: jax.Array) -> jax.Array:
        """q [b,s,h,d], w [b,s,h], keys [b,t,d] -> float32 scores [b,s,t]."""
        qk = jnp.einsum("bshd,btd->bsht", q.astype(jnp.float32), k.astype(jnp.float32))
        return jnp.einsum("bsht,bsh->bst", jax.nn.relu(qk), w)


# --------------------------------------------------------------------------------------------------
# Multi-head latent attention
# --------------------------------------------------------------------------------------------------
class MLA(nnx.Module):
    """DeepSeek MLA: q low-rank path (or q_proj), kv_a_proj_with_mqa -> latent + decoupled RoPE key."""

    def __init__(self, config: DeepseekConfig, *, dtype, std, rngs: nnx.Rngs):
        self.config = config
        c = config
        h = c.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, h * c.qk_head_dim, dtype=dtype, std=std, rngs=rngs)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias, dtype=dtype, std=std,
                                   rngs=rngs)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, dtype=dtype)
            self.q_b_proj = Linear(c.q_lora_rank, h * c.qk_head_dim, dtype=dtype, std=std, rngs=rngs)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim,
                                         bias=c.attention_bias, dtype=dtype, std=std, rngs=rngs)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, dtype=dtype)
        self.kv_b_proj = Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), dtype=dtype, std=std,
                                rngs=rngs)
        self.o_proj = Linear(h * c.v_head_dim, c.hidden_size, bias=c.attention_bias, dtype=dtype, std=std,
                             rngs=rngs)
        if c.is_v32:
            self.indexer = Indexer(c, dtype=dtype, std=std, rngs=rngs)

    # -- projections ------------------------------------------------------------------------------
    def project(self, x: jax.Array, cos_sin):
        """x [b, s, hidden] -> q_nope [b,s,h,dn], q_pe [b,s,h,dr] (roped), c_kv [b,s,r] (normed),
        k_pe [b,s,dr] (roped), q_resid [b,s,q_lora_rank] (None without the q low-rank path)."""
        c = self.config
        b, s, _ = x.shape
        if c.q_lora_rank is None:
            q_resid = None
            q = self.q_proj(x)
        else:
            q_resid = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_resid)
        q = q.reshape(b, s, c.num_attention_heads, c.qk_head_dim)
        q_nope, q_pe = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
        q_pe = apply_rope(q_pe, *cos_sin, interleaved=c.rope_interleave)
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv[..., :c.kv_lora_rank])
        k_pe = apply_rope(kv[..., None, c.kv_lora_rank:], *cos_sin, interleaved=c.rope_interleave)[:, :, 0]
        return q_nope, q_pe, c_kv, k_pe, q_resid

    def w_uk_uv(self):
        """kv_b_proj split per head: W_UK [h, dn, r] (keys), W_UV [h, dv, r] (values)."""
        c = self.config
        w = self.kv_b_proj.weight[...].reshape(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim,
                                               c.kv_lora_rank)
        return w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]

    def absorb_query(self, q_nope, q_pe):
        """[q_nope W_UK, q_pe]: the query in the cache's [latent, rope] space, [b, s, h, r + dr]."""
        w_uk, _ = self.w_uk_uv()
        # In the model dtype: the attention ops take q in bf16 anyway, and XLA:CPU has no batched
        # bf16 x bf16 -> f32 dot (GPUs accumulate in f32 regardless).
        q_lat = jnp.einsum("bshd,hdr->bshr", q_nope, w_uk.astype(q_nope.dtype))
        return jnp.concatenate([q_lat, q_pe.astype(q_lat.dtype)], axis=-1)

    def output_from_latent(self, o_lat):
        """Attention output in the latent space [b, s, h, r] -> hidden [b, s, hidden] (W_UV, o_proj)."""
        _, w_uv = self.w_uk_uv()
        dtype = self.o_proj.weight.dtype
        o = jnp.einsum("bshr,hvr->bshv", o_lat.astype(dtype), w_uv.astype(dtype))
        b, s = o.shape[:2]
        return self.o_proj(o.reshape(b, s, -1))

    # -- MHA form ---------------------------------------------------------------------------------
    def mha(self, q_nope, q_pe, c_kv, k_pe, mask, *, attention: str = "auto"):
        """Expanded (MHA) attention of the queries over the keys built from (c_kv, k_pe).

        mask [b,s,t] bool (dense, materializes the scores), or None: causal over the same tokens,
        through ``causal_attention(..., implementation=attention)`` (no [b, h, s, s] scores)."""
        c = self.config
        b, t, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).reshape(b, t, c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None, :].astype(k_nope.dtype),
                                                      k_nope.shape[:-1] + (c.qk_rope_head_dim,))], axis=-1)
        q = jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1)
        if mask is None:
            o = causal_attention(q, k, v, c.softmax_scale, implementation=attention)
        else:
            o = masked_attention(q, k, v, mask, c.softmax_scale)
        return self.o_proj(o.reshape(b, o.shape[1], -1))

    def index_topk_dense(self, x, q_resid, cos_sin, causal_mask):
        """V3.2 prefill: top-k positions [b, s, k] (-1 = none) of each query among the same tokens."""
        k_idx = self.indexer.keys(x, cos_sin)
        q_idx, w_idx = self.indexer.queries(x, q_resid, cos_sin)
        scores = Indexer.scores(q_idx, w_idx, k_idx)
        return topk_positions(scores, causal_mask, self.config.index_topk), k_idx

    def __call__(self, x: jax.Array, cos_sin, mask: jax.Array | None, *, attention: str = "auto") -> jax.Array:
        """Plain causal forward (no cache) in MHA form; ``mask [b, s, s]`` is the causal mask, or None
        (V3 only: causal without materializing the scores, see ``causal_attention``).

        V3.2: the indexer's top-k further restricts each query, as the dense masked equivalent of
        sparse attention (HF / official reference semantics)."""
        q_nope, q_pe, c_kv, k_pe, q_resid = self.project(x, cos_sin)
        if self.config.is_v32:
            if mask is None:
                s = x.shape[1]
                mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (x.shape[0], s, s))
            with jax.named_scope("indexer"):
                topk, _ = self.index_topk_dense(x, q_resid, cos_sin, mask)
            mask = mask & positions_to_mask(topk, x.shape[1])
        return self.mha(q_nope, q_pe, c_kv, k_pe, mask, attention=attention)

    # -- paged cache: prefill and decode ----------------------------------------------------------
    def _write(self, pages, block_table, positions, values):
        """Writes values [b, s, d] at positions [b, s] (-1: skip) into pages [nb, bs, 1, d(or fp8)]."""
        if pages.dtype != jnp.uint8:
            values = values.astype(pages.dtype)
        return kvc.write_tokens(pages, block_table, positions, values[:, :, None, :])

    def prefill(self, x, cos_sin, mask, write_pos, kv_pages, index_pages, block_table, *,
                implementation=None, attention: str = "auto"):
        """Prefill a fresh batch: attention over the prompt itself, and its tokens written to the cache.

        mask [b, s, s] causal, or None (built here where needed); write_pos [b, s] the positions to
        store (-1 for padding). V3: MHA form, causal through ``causal_attention(implementation=attention)``
        when mask is None. V3.2: the indexer picks each query's top-k tokens, and the absorbed queries
        attend them with ``jax_flashmla.sparse_mla_prefill`` (the batch folded into one token axis).
        Returns (out [b, s, hidden], kv_pages, index_pages).
        """
        c = self.config
        q_nope, q_pe, c_kv, k_pe, q_resid = self.project(x, cos_sin)
        latent = jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)  # [b, s, r + dr]
        kv_pages = self._write(kv_pages, block_table, write_pos, latent)
        if not c.is_v32:
            return self.mha(q_nope, q_pe, c_kv, k_pe, mask, attention=attention), kv_pages, index_pages
        if mask is None:
            s = x.shape[1]
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (x.shape[0], s, s))
        with jax.named_scope("indexer"):
            topk, k_idx = self.index_topk_dense(x, q_resid, cos_sin, mask)
            index_pages = self._write(index_pages, block_table, write_pos, k_idx)
        b, s, h = q_nope.shape[0], q_nope.shape[1], c.num_attention_heads
        adt = _attention_dtype(kv_pages)
        q = self.absorb_query(q_nope, q_pe).astype(adt).reshape(b * s, h, c.kv_cache_dim)
        kv = latent.astype(adt).reshape(b * s, 1, c.kv_cache_dim)
        # Sequence i's tokens are rows [i * s, (i + 1) * s) of the folded kv.
        rows = jnp.where(topk >= 0, topk + (jnp.arange(b, dtype=jnp.int32) * s)[:, None, None], -1)
        rows = _pad_last(rows, 64, -1).reshape(b * s, 1, -1)
        # top_k puts the valid positions first: the kernel skips the all-(-1) tiles after them
        # (early prompt tokens have fewer than index_topk earlier tokens). Same result.
        valid = _valid_count(topk).reshape(b * s)
        if adt == jnp.float32:
            o_lat, _, _ = jfm.reference.sparse_mla_prefill(q, kv, rows, softmax_scale=c.softmax_scale,
                                                           head_dim_v=c.kv_lora_rank, topk_length=valid)
        else:
            o_lat, _, _ = jfm.sparse_mla_prefill(q, kv, rows, softmax_scale=c.softmax_scale,
                                                 head_dim_v=c.kv_lora_rank, topk_length=valid,
                                                 implementation=implementation)
        return self.output_from_latent(o_lat.reshape(b, s, h, c.kv_lora_rank)), kv_pages, index_pages

    def decode(self, x, cos_sin, positions, kv_pages, index_pages, block_table, seqlens, *, metadata=None,
               implementation=None):
        """Absorbed-form decode of ``s`` new tokens per sequence over the paged latent cache.

        positions [b, s]: where the new tokens go (-1: an inactive slot, nothing written);
        seqlens [b]: token counts *including* the new tokens. With s > 1 the new tokens attend
        causally (query j sees tokens t <= seqlen - s + j).
        Returns (out [b, s, hidden], kv_pages, index_pages).
        """
        c = self.config
        q_nope, q_pe, c_kv, k_pe, q_resid = self.project(x, cos_sin)
        latent = jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)
        kv_pages = self._write(kv_pages, block_table, positions, latent)
        q = self.absorb_query(q_nope, q_pe).astype(_attention_dtype(kv_pages))
        b, s = x.shape[:2]
        if not c.is_v32:
            o_lat = _mla_decode(q, kv_pages, block_table, seqlens, head_dim_v=c.kv_lora_rank,
                                softmax_scale=c.softmax_scale, causal=s > 1, metadata=metadata,
                                implementation=implementation)
            return self.output_from_latent(o_lat), kv_pages, index_pages
        with jax.named_scope("indexer"):
            index_pages = self._write(index_pages, block_table, positions, self.indexer.keys(x, cos_sin))
            keys = gather_tokens(index_pages, block_table)  # [b, T, index_head_dim]
            q_idx, w_idx = self.indexer.queries(x, q_resid, cos_sin)
            scores = Indexer.scores(q_idx, w_idx, keys)
            t = jnp.arange(keys.shape[1], dtype=jnp.int32)
            last = seqlens[:, None] - s + jnp.arange(s, dtype=jnp.int32)[None, :]  # own position
            topk = topk_positions(scores, t[None, None, :] <= last[:, :, None], c.index_topk)
            rows = kvc.token_rows(block_table, _pad_last(topk, 64, -1).reshape(b, -1),
                                  kv_pages.shape[1]).reshape(b, s, -1).astype(jnp.int32)
        # As in prefill: the tiles past every query's valid positions (a cache with room for more
        # tokens than it holds) are skipped, not computed on -1 rows.
        valid = jnp.max(_valid_count(topk), axis=1)
        o_lat = _mla_decode(q, kv_pages, block_table, seqlens, head_dim_v=c.kv_lora_rank,
                            softmax_scale=c.softmax_scale, indices=rows, topk_length=valid,
                            metadata=metadata, implementation=implementation)
        return self.output_from_latent(o_lat), kv_pages, index_pages


def _attention_dtype(kv_pages):
    """q's dtype for the attention ops: the cache's, or bf16 with an FP8 (uint8) cache."""
    return jnp.dtype(jnp.bfloat16) if kv_pages.dtype == jnp.uint8 else jnp.dtype(kv_pages.dtype)


def _mla_decode(q, kv_pages, block_table, seqlens, *, head_dim_v, softmax_scale, causal=False, indices=None,
                topk_length=None, metadata=None, implementation=None):
    """``jax_flashmla.mla_decode``; a float32 cache (a CPU checking aid: the ops take bf16/fp16) goes
    straight to ``jax_flashmla.reference``, the same semantics in float32."""
    if kv_pages.dtype == jnp.float32:
        out, _ = jfm.reference.mla_decode(q, kv_pages, block_table, seqlens, softmax_scale=softmax_scale,
                                          head_dim_v=head_dim_v, causal=causal, indices=indices,
                                          topk_length=topk_length)
        return out
    out, _ = jfm.mla_decode(q, kv_pages, block_table, seqlens, head_dim_v=head_dim_v,
                            softmax_scale=softmax_scale, causal=causal, indices=indices,
                            topk_length=topk_length, metadata=metadata, implementation=implementation)
    return out


def _valid_count(topk: jax.Array) -> jax.Array:
    """Positions that are not -1 in top-k lists ``[..., k]`` (topk_positions: all before the -1s),
    as the ops' topk_length (int32)."""
    return jnp.sum(topk >= 0, axis=-1, dtype=jnp.int32)


def _pad_last(x: jax.Array, multiple: int, value) -> jax.Array:
    """Pads the last axis up to a multiple (the sparse kernels take top-k in tiles of 64)."""
    pad = -x.shape[-1] % multiple
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=value)


# --------------------------------------------------------------------------------------------------
# Feed-forward: dense MLP and mixture of experts
# --------------------------------------------------------------------------------------------------
class MLP(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, *, dtype, std, rngs: nnx.Rngs):
        self.gate_proj = Linear(hidden, intermediate, dtype=dtype, std=std, rngs=rngs)
        self.up_proj = Linear(hidden, intermediate, dtype=dtype, std=std, rngs=rngs)
        self.down_proj = Linear(intermediate, hidden, dtype=dtype, std=std, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def route(logits: jax.Array, correction_bias: jax.Array, *, n_group: int, topk_group: int, top_k: int,
          norm_topk_prob: bool, routed_scaling_factor: float,
          dropped_group_score: float = -math.inf) -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V3 "noaux_tc" routing. logits [T, E] float32 -> (expert ids [T, k], weights [T, k] f32).

    Scores are sigmoid(logits). Selection uses scores + correction bias: groups ranked by the sum of
    their two best biased scores, the best ``topk_group`` groups kept, then the top ``top_k`` experts
    among those. The weights are the *unbiased* scores of the chosen experts, normalised to sum 1
    (norm_topk_prob) and multiplied by routed_scaling_factor.

    ``dropped_group_score`` is what the experts of dropped groups score in that last top-k: -inf in
    DeepSeek's own inference code and HF's V3.2, 0.0 in HF's ``DeepseekV3TopkRouter``. The two pick
    differently only when fewer than ``top_k`` experts of the kept groups have a positive biased
    score (then 0.0 lets dropped-group experts in).
    """
    t, e = logits.shape
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    biased = scores + correction_bias.astype(jnp.float32)[None, :]
    if n_group > 1:
        grouped = biased.reshape(t, n_group, e // n_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, n_group]
        _, keep = jax.lax.top_k(group_scores, topk_group)
        group_mask = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], keep].set(True)
        biased = jnp.where(jnp.repeat(group_mask, e // n_group, axis=1), biased,
                           jnp.float32(dropped_group_score))
    _, idx = jax.lax.top_k(biased, top_k)
    weights = jnp.take_along_axis(scores, idx, axis=1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return idx.astype(jnp.int32), weights * routed_scaling_factor


class Router(nnx.Module):
    """HF ``mlp.gate``: ``weight [n_routed_experts, hidden]`` and ``e_score_correction_bias``."""

    def __init__(self, config: DeepseekConfig, *, dtype, std, rngs: nnx.Rngs):
        self.config = config
        self.weight = nnx.Param(_normal(rngs, (config.n_routed_experts, config.hidden_size), std, dtype))
        self.e_score_correction_bias = nnx.Param(jnp.zeros((config.n_routed_experts,), jnp.float32))

    def __call__(self, x: jax.Array):
        c = self.config
        logits = linear(x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        # As the HF model of the same model_type does (see ``route``).
        return route(logits, self.e_score_correction_bias[...], n_group=c.n_group, topk_group=c.topk_group,
                     top_k=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob,
                     routed_scaling_factor=c.routed_scaling_factor,
                     dropped_group_score=-math.inf if c.is_v32 else 0.0)


class Experts(nnx.Module):
    """The routed experts, stacked for grouped matmuls (``jax.lax.ragged_dot``).

    ``gate_proj``/``up_proj`` are ``[E, hidden, moe_intermediate]`` and ``down_proj``
    ``[E, moe_intermediate, hidden]``: HF's per-expert ``mlp.experts.{j}.{name}.weight`` matrices,
    transposed to ``[in, out]`` and stacked (the checkpoint loader does this).
    """

    def __init__(self, config: DeepseekConfig, *, dtype, std, rngs: nnx.Rngs):
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nnx.Param(_normal(rngs, (e, h, i), std, dtype))
        self.up_proj = nnx.Param(_normal(rngs, (e, h, i), std, dtype))
        self.down_proj = nnx.Param(_normal(rngs, (e, i, h), std, dtype))
        self.num_experts = e

    def __call__(self, x: jax.Array, expert_idx: jax.Array, weights: jax.Array) -> jax.Array:
        """x [T, hidden], expert_idx / weights [T, k] -> sum_k weights * expert(x) [T, hidden]."""
        t, k = expert_idx.shape
        flat = expert_idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # token-expert pairs grouped by expert
        token = order // k
        group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        xs = jnp.take(x, token, axis=0)
        dtype = x.dtype

        def gmm(lhs, w):
            return jax.lax.ragged_dot(lhs, w[...].astype(dtype), group_sizes,
                                      preferred_element_type=jnp.float32).astype(dtype)

        hmid = jax.nn.silu(gmm(xs, self.gate_proj)) * gmm(xs, self.up_proj)
        y = gmm(hmid, self.down_proj).astype(jnp.float32) * jnp.take(weights.reshape(-1), order)[:, None]
        return jnp.zeros((t, x.shape[-1]), jnp.float32).at[token].add(y).astype(dtype)


class MoE(nnx.Module):
    """Routed experts (top-k of n_routed_experts) plus always-on shared experts."""

    def __init__(self, config: DeepseekConfig, *, dtype, std, rngs: nnx.Rngs):
        self.gate = Router(config, dtype=dtype, std=std, rngs=rngs)
        self.experts = Experts(config, dtype=dtype, std=std, rngs=rngs)
        self.has_shared = bool(config.n_shared_experts)
        if self.has_shared:
            self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                      dtype=dtype, std=std, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        with jax.named_scope("router"):
            idx, w = self.gate(flat)
        with jax.named_scope("experts"):
            routed = self.experts(flat, idx, w).reshape(shape)
        if not self.has_shared:
            return routed
        with jax.named_scope("shared_experts"):
            return routed + self.shared_experts(x)
