"""Generation for DeepSeek-V4: one jitted paged prefill, then one jitted decode step per token.

Reuses the V3 generator's sampling and ``GenerationOutput``; the cache is ``init_cache``'s (window
ring + compressed pools, the format chosen by ``kv_format``).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..generate import GenerationOutput, _flashmla_calls, _prompts, sample
from .model import DeepseekV4ForCausalLM, V4Tables, init_cache


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("ring", "implementation", "greedy"),
                   donate_argnames=("pages",))
def _prefill(graphdef, treedef, params, pages, ids, lengths, wtab, ctab, key, temperature, top_p, *, ring,
             implementation, greedy):
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    with jax.named_scope("prefill"):
        logits, pages = model.prefill(ids, lengths, pages, V4Tables(wtab, ctab, ring),
                                      implementation=implementation)
    return sample(logits, key, temperature, top_p, greedy=greedy), pages


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("ring", "implementation", "greedy"),
                   donate_argnames=("pages",))
def _decode(graphdef, treedef, params, pages, tokens, wtab, ctab, seqlens, active, key, temperature, top_p, *,
            ring, implementation, greedy):
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    with jax.named_scope("decode"):
        logits, pages = model.decode(tokens[:, None], pages, V4Tables(wtab, ctab, ring), seqlens, active,
                                     implementation=implementation)
    return sample(logits[:, -1], key, temperature, top_p, greedy=greedy), pages


def generate(model: DeepseekV4ForCausalLM, input_ids, max_new_tokens: int, temperature: float = 0.0, *,
             top_p: float = 1.0, seed: int = 0, stop_tokens=None, prompt_lengths=None, pad_token_id=None,
             kv_format: str = "bf16", block_size: int = 64, compressed_block_size: int = 64,
             implementation: str | None = None, progress: bool = False, return_output: bool = False,
             compiler_options: dict | None = None):
    """New tokens ``[b, max_new_tokens]`` int32 after each prompt (greedy at temperature 0), or the
    ``GenerationOutput`` with timings and the attention backend seen in the compiled decode step.
    compiler_options: XLA options for both compiles (the tests turn XLA:CPU's optimisations off)."""
    del progress
    prompts, lens = _prompts(input_ids, prompt_lengths)
    b, s = len(prompts), int(lens.max())
    ids = np.zeros((b, s), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    c = model.config
    stops = set(c.stop_token_ids if stop_tokens is None else stop_tokens)
    pad = pad_token_id if pad_token_id is not None else (min(stops) if stops else 0)
    pages, tables = init_cache(c, b, s + max_new_tokens, block_size=block_size,
                               compressed_block_size=compressed_block_size, kv_format=kv_format, dtype=model.dtype)
    graphdef, state = nnx.split(model)
    params, treedef = jax.tree.flatten(state)
    greedy = temperature <= 0
    key = jax.random.key(seed)
    temp, tp = jnp.float32(temperature), jnp.float32(top_p)
    kw = dict(ring=tables.ring, implementation=implementation, greedy=greedy)
    lens_d = jnp.asarray(lens)

    t0 = time.perf_counter()
    pre = _prefill.lower(graphdef, treedef, params, pages, jnp.asarray(ids), lens_d, tables.window,
                         tables.compressed, key, temp, tp, **kw).compile(compiler_options)
    seq = jnp.asarray(lens)
    active = jnp.ones((b,), bool)
    dec = _decode.lower(graphdef, treedef, params, pages, jnp.zeros((b,), jnp.int32), tables.window,
                        tables.compressed, seq, active, key, temp, tp, **kw).compile(compiler_options)
    calls = _flashmla_calls(dec.as_text())
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    key, sub = jax.random.split(key)
    tok, pages = pre(params, pages, jnp.asarray(ids), lens_d, tables.window, tables.compressed, sub, temp, tp)
    tok.block_until_ready()
    prefill_s = time.perf_counter() - t0

    out = np.full((b, max_new_tokens), pad, np.int32)
    done = np.zeros((b,), bool)
    n_new = np.zeros((b,), np.int32)
    steps = 0
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        host = np.asarray(tok)
        live = ~done
        out[live, step] = host[live]
        n_new[live] += 1
        done |= np.isin(host, list(stops)) & live if stops else done
        if step == max_new_tokens - 1 or done.all():
            break
        key, sub = jax.random.split(key)
        tok, pages = dec(params, pages, tok, tables.window, tables.compressed, seq, jnp.asarray(~done), sub, temp,
                         tp)
        seq = seq + 1
        steps += 1
    decode_s = time.perf_counter() - t0
    backend = "kernel" if calls else "reference"
    result = GenerationOutput(tokens=out, lengths=n_new, prompt_tokens=int(lens.sum()), prefill_seconds=prefill_s,
                              decode_seconds=decode_s, decode_steps=steps, compile_seconds=compile_s,
                              attention=backend, attention_detail=", ".join(calls) or "no jax_flashmla kernel "
                              "in the compiled decode step", custom_calls=calls)
    return result if return_output else out
