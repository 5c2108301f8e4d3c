"""Prefill-then-decode logits equal a full forward pass over the same tokens.

Right-padded prompts of different lengths are prefilled into a paged cache (unused rows poisoned
with NaN), then the following tokens are decoded, one per step and as a causal two-token chunk;
every logit row is compared with ``model(all_tokens)`` at the same position.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_flashmla.models import deepseek as ds


def tiny_config(**kw):
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=72, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32,
                q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                rope_scaling=(("factor", 4.0), ("mscale", 1.0), ("mscale_all_dim", 1.0),
                              ("original_max_position_embeddings", 8), ("type", "yarn")))
    base.update(kw)
    return ds.DeepseekConfig(**base)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, ids, lens, pages, table):
    return nnx.merge(graphdef, state).prefill(ids, lens, pages, table, implementation="reference")


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, toks, pages, table, seqlens):
    return nnx.merge(graphdef, state).decode(toks, pages, table, seqlens, implementation="reference")


def check_prefill_then_decode(cfg, dtype, kv_format, rel, seed=0, block_size=4):
    model = ds.DeepseekForCausalLM(cfg, dtype=dtype, init_std=0.2, seed=seed)
    rng = np.random.default_rng(seed)
    b, T = 3, 17
    ids = rng.integers(0, cfg.vocab_size, (b, T)).astype(np.int32)
    full = np.asarray(model(ids), np.float64)
    lens = np.array([9, 5, 12], np.int32)
    s_pad = 16
    prompt = np.zeros((b, s_pad), np.int32)
    for i in range(b):
        prompt[i, :lens[i]] = ids[i, :lens[i]]
        prompt[i, lens[i]:] = rng.integers(0, cfg.vocab_size, s_pad - lens[i])  # padding is ignored

    max_blocks = -(-T // block_size)
    alloc = ds.PageAllocator(b * max_blocks + 2, block_size, max_blocks)
    alloc.ensure("other", 2 * block_size)
    for i in range(b):
        alloc.ensure(i, T)
    table = jnp.asarray(alloc.block_table(range(b)))
    pages = ds.init_pages(cfg, alloc.num_blocks, block_size, kv_format=kv_format, dtype=dtype)
    poison = (lambda a: jnp.full_like(a, 255)) if kv_format == "fp8" else (lambda a: jnp.full_like(a, jnp.nan))
    pages = ds.KVPages(kv=tuple(map(poison, pages.kv)),
                       index_k=tuple(jnp.full_like(a, jnp.nan) for a in pages.index_k))
    graphdef, state = nnx.split(model)

    got, want = [], []
    last, pages = _prefill(graphdef, state, jnp.asarray(prompt), jnp.asarray(lens), pages, table)
    got.append(np.asarray(last))
    want.append(full[np.arange(b), lens - 1])
    seq = lens.copy()
    for _ in range(2):  # single-token steps
        logits, pages = _decode(graphdef, state, jnp.asarray(ids[np.arange(b), seq][:, None]), pages, table,
                                jnp.asarray(seq))
        got.append(np.asarray(logits[:, 0]))
        want.append(full[np.arange(b), seq])
        seq = seq + 1
    chunk = np.stack([ids[np.arange(b), seq], ids[np.arange(b), seq + 1]], axis=1)  # causal 2-token chunk
    logits, pages = _decode(graphdef, state, jnp.asarray(chunk), pages, table, jnp.asarray(seq))
    got += [np.asarray(logits[:, 0]), np.asarray(logits[:, 1])]
    want += [full[np.arange(b), seq], full[np.arange(b), seq + 1]]
    got, want = np.stack(got).astype(np.float64), np.stack(want)
    assert np.isfinite(got).all(), "NaN/inf leaked from unused cache rows"
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < rel, f"relative error {err:.3g} >= {rel}"
    return got, want


def test_v3_float32_exact():
    check_prefill_then_decode(tiny_config(), jnp.float32, "float32", 1e-5)


def test_v3_bf16_model_bf16_cache():
    check_prefill_then_decode(tiny_config(), jnp.bfloat16, "bf16", 3e-2, seed=1)


def test_v32_float32_exact():
    cfg = tiny_config(index_n_heads=2, index_head_dim=16, index_topk=6, model_type="deepseek_v32")
    check_prefill_then_decode(cfg, jnp.float32, "float32", 1e-5, seed=2)


def test_v32_bf16_sparse_prefill_and_decode():
    """bf16 runs the public ops: sparse_mla_prefill in prefill, sparse mla_decode in decode."""
    cfg = tiny_config(index_n_heads=2, index_head_dim=16, index_topk=6, model_type="deepseek_v32")
    check_prefill_then_decode(cfg, jnp.float32, "bf16", 3e-2, seed=3)


def test_v32_fp8_cache_kernel_dims():
    """The FP8 cache (kv_lora_rank 512 + rope 64, the kernels' layout) through a whole V3.2 model."""
    cfg = tiny_config(kv_lora_rank=512, qk_rope_head_dim=64, hidden_size=32, num_attention_heads=2,
                      num_hidden_layers=1, index_n_heads=2, index_head_dim=64, index_topk=8,
                      model_type="deepseek_v32")
    check_prefill_then_decode(cfg, jnp.float32, "fp8", 5e-2, seed=4)


def test_forward_rejects_bad_input():
    model = ds.DeepseekForCausalLM(tiny_config(num_hidden_layers=1), dtype=jnp.float32)
    with pytest.raises(ValueError, match="input_ids"):
        model(np.zeros((4,), np.int32))
    with pytest.raises(ValueError, match="input_ids"):
        model(np.zeros((2, 3), np.float32))
