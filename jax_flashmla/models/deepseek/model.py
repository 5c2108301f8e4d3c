"""The DeepSeek-V3 / V3.2 causal language model (Flax NNX), with plain, prefill and paged-decode paths.

Module tree (and so the NNX state paths) mirrors Hugging Face ``DeepseekV3ForCausalLM``::

    DeepseekForCausalLM
      model: DeepseekModel
        embed_tokens            Embed   weight [vocab, hidden]
        layers[i]: DecoderLayer
          input_layernorm       RMSNorm
          self_attn             MLA (+ indexer on V3.2)
          post_attention_layernorm
          mlp                   MLP (i < first_k_dense_replace) or MoE (gate, experts, shared_experts)
        norm                    RMSNorm
      lm_head                   Linear  weight [vocab, hidden]

Three ways through it, all pure functions of the parameters (jit them, e.g. with ``nnx.jit`` or
``nnx.split`` + ``jax.jit`` as ``generate.py`` does):

- ``forward(input_ids)``: a plain causal pass over ``[batch, seq]`` (MHA form), logits for every
  token. ``model(input_ids)`` runs it jitted.
- ``prefill(...)``: the same pass over right-padded prompts that also writes every layer's latent
  cache rows into the paged cache (V3.2: sparse prefill through ``jax_flashmla.sparse_mla_prefill``).
- ``decode(...)``: new tokens of every sequence attend the paged cache in absorbed form through
  ``jax_flashmla.mla_decode``; the split-KV schedule (``get_mla_metadata``) is computed once per
  step and shared by all layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import jax_flashmla as jfm
from jax_flashmla.ops.kernels import dense_as_sparse

from .cache import KVPages
from .config import DeepseekConfig
from .layers import MLA, MLP, Embed, Linear, MoE, RMSNorm, rope_cos_sin, sparse_decode_topk


class DecoderLayer(nnx.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int, *, dtype, std, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.self_attn = MLA(config, dtype=dtype, std=std, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config, dtype=dtype, std=std, rngs=rngs)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, dtype=dtype, std=std, rngs=rngs)
        self.is_moe = config.is_moe_layer(layer_idx)

    def _ffn(self, h):
        with jax.named_scope("moe" if self.is_moe else "mlp"):
            return h + self.mlp(self.post_attention_layernorm(h))

    def __call__(self, h, cos_sin, mask, attention="auto"):
        with jax.named_scope("attention"):
            h = h + self.self_attn(self.input_layernorm(h), cos_sin, mask, attention=attention)
        return self._ffn(h)

    def prefill(self, h, cos_sin, mask, write_pos, kv, idx, block_table, implementation, attention="auto"):
        with jax.named_scope("attention"):
            a, kv, idx = self.self_attn.prefill(self.input_layernorm(h), cos_sin, mask, write_pos, kv, idx,
                                                block_table, implementation=implementation, attention=attention)
        return self._ffn(h + a), kv, idx

    def decode(self, h, cos_sin, positions, kv, idx, block_table, seqlens, metadata, implementation):
        with jax.named_scope("attention"):
            a, kv, idx = self.self_attn.decode(self.input_layernorm(h), cos_sin, positions, kv, idx,
                                               block_table, seqlens, metadata=metadata,
                                               implementation=implementation)
        return self._ffn(h + a), kv, idx


class DeepseekModel(nnx.Module):
    def __init__(self, config: DeepseekConfig, *, dtype, std, rngs: nnx.Rngs):
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, std=std, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, i, dtype=dtype, std=std, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)


class DeepseekForCausalLM(nnx.Module):
    """DeepSeek-V3 / V3.2 with an LM head. ``model(input_ids)`` -> logits ``[b, s, vocab]`` float32."""

    def __init__(self, config: DeepseekConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None,
                 seed: int = 0, init_std: float = 0.02):
        """Randomly initialised (normal(0, init_std) matrices, unit norms); ``checkpoint.load`` fills
        real weights."""
        rngs = rngs if rngs is not None else nnx.Rngs(seed)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.model = DeepseekModel(config, dtype=dtype, std=init_std, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype, std=init_std, rngs=rngs)

    # ---- pieces ---------------------------------------------------------------------------------
    def _logits(self, h):
        h = self.model.norm(h)
        w = (self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight)[...]
        return jnp.einsum("...i,vi->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    def _embed(self, input_ids):
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"input_ids: expected an integer array [batch, seq], got "
                             f"{getattr(ids, 'dtype', type(ids))} shape {getattr(ids, 'shape', None)}")
        return self.model.embed_tokens(ids.astype(jnp.int32))

    # ---- plain causal forward (the prefill path without a cache) --------------------------------
    def forward(self, input_ids: jax.Array, *, attention: str = "auto") -> jax.Array:
        """Logits ``[b, s, vocab]`` (float32) of a causal pass over ``input_ids [b, s]`` from position 0.

        attention: how a V3 model's causal MHA-form attention runs (``layers.causal_attention``:
        "auto" = cuDNN flash attention on a GPU, else blockwise; "plain" materializes the scores)."""
        h = self._embed(input_ids)
        b, s = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        cos_sin = rope_cos_sin(self.config, positions)
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (b, s, s)) if self.config.is_v32 else None
        for i, layer in enumerate(self.model.layers):
            with jax.named_scope(f"layer_{i}"):
                h = layer(h, cos_sin, mask, attention)
        return self._logits(h)

    def __call__(self, input_ids) -> jax.Array:
        graphdef, state = nnx.split(self)
        return _jit_forward(graphdef, state, jnp.asarray(input_ids))

    # ---- paged prefill / decode -----------------------------------------------------------------
    def prefill(self, input_ids: jax.Array, lengths: jax.Array, pages: KVPages, block_table: jax.Array, *,
                implementation: str | None = None, attention: str = "auto",
                batch_chunk: int | None = None) -> tuple[jax.Array, KVPages]:
        """Runs right-padded prompts ``input_ids [b, s]`` of ``lengths [b]`` from position 0 and
        stores their tokens in ``pages`` (pages for ``lengths`` tokens must be in ``block_table``).

        batch_chunk: prefill this many prompts at a time (a ``lax.scan`` over groups of the batch
        with the pages as carry), so activation memory is that of ``batch_chunk * s`` tokens
        whatever b is; None: the whole batch at once. A length 0 marks a filler row (nothing written).
        attention: the V3 MHA-form attention (see ``forward``); V3.2 runs sparse prefill.
        Returns (logits of each prompt's last token ``[b, vocab]`` float32, the new pages).
        """
        b, s = input_ids.shape
        if batch_chunk is None or batch_chunk >= b:
            return self._prefill(input_ids, lengths, pages, block_table, implementation, attention)
        cb = int(batch_chunk)
        n = -(-b // cb)
        pad = n * cb - b  # filler rows: length 0, so no position is written

        def split(x):
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
            return x.reshape((n, cb) + x.shape[1:])

        def one_chunk(pages, xs):
            ids, lens, table = xs
            logits, pages = self._prefill(ids, lens, pages, table, implementation, attention)
            return pages, logits

        pages, logits = jax.lax.scan(one_chunk, pages, (split(input_ids), split(lengths), split(block_table)))
        return logits.reshape((n * cb,) + logits.shape[2:])[:b], pages

    def _prefill(self, input_ids, lengths, pages, block_table, implementation, attention):
        h = self._embed(input_ids)
        b, s = input_ids.shape
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        write_pos = jnp.where(pos < lengths[:, None], pos, -1)
        cos_sin = rope_cos_sin(self.config, pos)
        # Padding sits after each prompt, so causality alone keeps it out of real tokens. V3 needs
        # no mask array (causal attention); V3.2's indexer takes the dense one.
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (b, s, s)) if self.config.is_v32 else None
        kv, idx = list(pages.kv), list(pages.index_k) or [None] * len(pages.kv)
        for i, layer in enumerate(self.model.layers):
            with jax.named_scope(f"layer_{i}"):
                h, kv[i], idx[i] = layer.prefill(h, cos_sin, mask, write_pos, kv[i], idx[i], block_table,
                                                 implementation, attention)
        last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
        new_pages = KVPages(kv=tuple(kv), index_k=tuple(idx) if pages.index_k else ())
        return self._logits(last), new_pages

    def decode(self, tokens: jax.Array, pages: KVPages, block_table: jax.Array, seqlens: jax.Array,
               active: jax.Array | None = None, *, metadata=None,
               implementation: str | None = None) -> tuple[jax.Array, KVPages]:
        """One decoding step: ``tokens [b, s]`` (s >= 1; s > 1 for speculative / MTP chunks) are
        appended after ``seqlens [b]`` cached tokens and attend the cache causally.

        active [b] bool (default all): inactive slots write nothing and their logits are garbage.
        metadata: ``jax_flashmla.get_mla_metadata`` for the new lengths; None computes it here, once
        for all layers. Returns (logits ``[b, s, vocab]`` float32, the new pages).
        """
        c = self.config
        h = self._embed(tokens)
        b, s = tokens.shape
        if active is None:
            active = jnp.ones((b,), bool)
        pos = seqlens[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
        write_pos = jnp.where(active[:, None], pos, -1)
        new_lens = jnp.where(active, seqlens + s, seqlens).astype(jnp.int32)
        cos_sin = rope_cos_sin(c, pos)
        if metadata is None:
            with jax.named_scope("mla_metadata"):
                topk = (sparse_decode_topk(c, block_table.shape[1] * pages.kv[0].shape[1])
                        if c.is_v32 else None)
                # V3.2: a sequence attends min(its length, topk) positions (the layers' topk_length),
                # and the schedule is spread by that.
                metadata = jfm.get_mla_metadata(new_lens, s_q=s, h_q=c.num_attention_heads, h_kv=1,
                                                causal=s > 1 and not c.is_v32, topk=topk,
                                                topk_length=None if topk is None
                                                else jnp.minimum(new_lens, topk))
        kv, idx = list(pages.kv), list(pages.index_k) or [None] * len(pages.kv)
        for i, layer in enumerate(self.model.layers):
            with jax.named_scope(f"layer_{i}"):
                h, kv[i], idx[i] = layer.decode(h, cos_sin, write_pos, kv[i], idx[i], block_table, new_lens,
                                                metadata, implementation)
        new_pages = KVPages(kv=tuple(kv), index_k=tuple(idx) if pages.index_k else ())
        return self._logits(h), new_pages


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, input_ids):
    return nnx.merge(graphdef, state).forward(input_ids)


def attention_backend(config: DeepseekConfig, kv_format: str = "bf16") -> tuple[str, str]:
    """("kernel", "") when jax_flashmla's CUDA kernels can take this model's attention, else
    ("reference", why). A prediction; ``generate`` reports what the compiled step really contains."""
    ok, why = jfm.kernels_available()
    if not ok:
        return "reference", why
    if (config.kv_lora_rank, config.qk_rope_head_dim) != (512, 64):
        return "reference", (f"the kernels need kv_lora_rank 512 + qk_rope_head_dim 64, this model has "
                             f"{config.kv_lora_rank} + {config.qk_rope_head_dim}")
    if kv_format == "fp8" and not config.is_v32 and not dense_as_sparse.enabled():
        return "reference", ("dense decode over an FP8 cache runs on the sparse kernel, and "
                             + dense_as_sparse.turned_off_reason())
    return "kernel", ""
