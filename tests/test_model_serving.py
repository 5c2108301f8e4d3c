"""Serving-scale paths of the DeepSeek model, checked on the CPU at small sizes:

- the causal attention that never materializes [b, h, s, s] (blockwise online softmax; cuDNN flash
  attention on a GPU) equals plain masked attention;
- prefill in groups of prompts (a scan over the batch with the pages as carry) equals one prefill;
- the on-device decode loop (``lax.while_loop``) and the asynchronous host loop give the same
  tokens as each other for any stop-check interval, reuse the pages of stopped sequences, and
  report a pool that runs dry mid-decode.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_flashmla.models import deepseek as ds
from jax_flashmla.models.deepseek import layers


# The tiny model of the generation tests (the same fixture).
from test_model_generate import model  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------------
# Causal attention without the s x s scores
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s,block", [(37, 8), (64, 16), (5, 512), (33, 32)])
def test_blockwise_equals_plain(s, block):
    rng = np.random.default_rng(s)
    b, h, d, dv = 2, 3, 24, 16  # d_qk != d_v, as in MLA's MHA form
    q, k = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, s, h, dv)), jnp.float32)
    want = layers.masked_attention(q, k, v, jnp.tril(jnp.ones((s, s), bool))[None], 0.3)
    got = jax.jit(functools.partial(layers.blockwise_causal_attention, scale=0.3, block=block))(q, k, v)
    assert got.shape == (b, s, h, dv)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    # "auto" on a CPU is the blockwise form; "plain" is masked_attention.
    auto = layers.causal_attention(q, k, v, 0.3, block=block)
    np.testing.assert_allclose(np.asarray(auto), np.asarray(got), rtol=1e-6, atol=1e-7)
    plain = layers.causal_attention(q, k, v, 0.3, implementation="plain")
    np.testing.assert_allclose(np.asarray(plain), np.asarray(want), rtol=1e-6, atol=1e-7)


def test_blockwise_bf16_and_bad_implementation():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 40, 2, 16)), jnp.bfloat16) for _ in range(3))
    got = layers.blockwise_causal_attention(q, k, v, 0.25, block=16)
    want = layers.masked_attention(q, k, v, jnp.tril(jnp.ones((40, 40), bool))[None], 0.25)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)
    with pytest.raises(ValueError, match="implementation"):
        layers.causal_attention(q, k, v, 0.25, implementation="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice")
def test_cudnn_refused_on_cpu():
    q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    with pytest.raises(Exception):
        layers.causal_attention(q, q, q, 0.25, implementation="cudnn")


def test_forward_attention_forms_agree(model):
    ids = np.random.default_rng(1).integers(0, 89, (2, 23)).astype(np.int32)
    plain, blockwise = jax.jit(lambda i: (model.forward(i, attention="plain"),
                                          model.forward(i, attention="blockwise")))(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(blockwise), np.asarray(plain), rtol=1e-4, atol=5e-5)


# ---------------------------------------------------------------------------------------------------
# Prefill in groups of prompts
# ---------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 6))
def _prefill(graphdef, state, ids, lens, pages, table, chunk):
    return nnx.merge(graphdef, state).prefill(ids, lens, pages, table, batch_chunk=chunk)


def test_batch_chunked_prefill_equals_whole(model):
    cfg, bs = model.config, 4
    rng = np.random.default_rng(2)
    b, s = 5, 16
    lens = np.array([16, 3, 9, 12, 1], np.int32)
    ids = rng.integers(0, cfg.vocab_size, (b, s)).astype(np.int32)
    alloc = ds.PageAllocator(b * 4, bs, 4)
    for i in range(b):
        alloc.ensure(i, int(lens[i]))
    table = jnp.asarray(alloc.block_table(range(b)))
    graphdef, state = nnx.split(model)
    results = {}
    for chunk in (None, 2, 5):
        pages = ds.init_pages(cfg, alloc.num_blocks, bs, kv_format="float32")
        results[chunk] = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(lens), pages, table, chunk)
    for chunk in (2, 5):
        np.testing.assert_allclose(np.asarray(results[chunk][0]), np.asarray(results[None][0]), rtol=1e-5,
                                   atol=1e-5)
        # Same math on other batch shapes: float32 summation order may differ (CI's CPU put one
        # of 3200 cache entries 1.2e-6 apart); a wrong chunk is off by O(1).
        for a, c in zip(results[chunk][1].kv, results[None][1].kv):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-5)


def test_generate_with_prefill_chunks(model):
    prompts = [[5, 17, 3, 44, 8], [60, 2], [7, 7, 21, 9, 30, 1, 12, 50, 3], [1, 2, 3]]
    whole = ds.Generator(model, block_size=4, kv_format="float32", prefill_chunk_tokens=None)
    chunked = ds.Generator(model, block_size=4, kv_format="float32", prefill_chunk_tokens=16)  # 1 prompt a group
    a = whole.generate(prompts, 5, progress=False)
    c = chunked.generate(prompts, 5, progress=False)
    np.testing.assert_array_equal(a.tokens, c.tokens)


# ---------------------------------------------------------------------------------------------------
# Decode loops
# ---------------------------------------------------------------------------------------------------
PROMPTS = [[5, 17, 3, 44, 8], [60, 2], [7, 7, 21, 9, 30, 1, 12, 50, 3]]


def test_device_and_host_loops_agree(model):
    free_run = ds.generate(model, PROMPTS, 9, block_size=4)
    stop = int(free_run[1, 3])
    ref = ds.generate(model, PROMPTS, 9, block_size=4, stop_tokens=[stop], pad_token_id=-1, return_output=True)
    for loop, every in (("device", 3), ("host", 1), ("host", 4)):
        streamed = []
        out = ds.generate(model, PROMPTS, 9, block_size=4, stop_tokens=[stop], pad_token_id=-1, loop=loop,
                          sync_every=every, return_output=True,
                          on_tokens=lambda t, n: streamed.append((t.shape[1], n.copy())))
        np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=f"{loop} every {every}")
        np.testing.assert_array_equal(out.lengths, ref.lengths)
        assert out.decode_steps == ref.decode_steps == int(ref.lengths.max()) - 1
        assert out.loop == loop
        if loop == "host":
            assert streamed and streamed[0][0] == 1 and (streamed[-1][1] == ref.lengths).all()
    for i, row in enumerate(free_run.tolist()):
        n = row.index(stop) + 1 if stop in row else 9
        assert ref.lengths[i] == n and ref.tokens[i, :n].tolist() == row[:n]


def test_stopped_sequences_give_pages_back(model):
    """A pool too small for every sequence at full length suffices once a stopped sequence's pages
    return to the device free stack; one page fewer runs dry mid-decode and raises."""
    free_run = ds.generate(model, PROMPTS, 12, block_size=4)
    stop = int(free_run[1, 0])  # sequence 1 stops at once
    want = ds.generate(model, PROMPTS, 12, block_size=4, stop_tokens=[stop])
    n_stop = [row.index(stop) + 1 if stop in row else 12 for row in free_run.tolist()]
    assert n_stop[1] == 1

    def held(t):  # pages in use during decode step t (0: prefill); a sequence frees after its last step
        return sum(-(-(len(p) + min(t, n - 1)) // 4) for p, n in zip(PROMPTS, n_stop) if t <= n - 1 or n == 12)

    peak = max(held(t) for t in range(12))
    assert peak < sum(-(-(len(p) + n - 1) // 4) for p, n in zip(PROMPTS, n_stop))
    gen = ds.Generator(model, block_size=4)
    got = gen.generate(PROMPTS, 12, stop_tokens=[stop], num_blocks=peak, progress=False)
    np.testing.assert_array_equal(got.tokens, want)
    with pytest.raises(ds.OutOfPagesError, match="ran out after"):
        gen.generate(PROMPTS, 12, stop_tokens=[stop], num_blocks=peak - 1, progress=False)


def test_generator_bad_options(model):
    with pytest.raises(ValueError, match="loop"):
        ds.Generator(model, loop="gpu")
    with pytest.raises(ValueError, match="sync_every"):
        ds.Generator(model, sync_every=0)
    with pytest.raises(ValueError, match="prefill_attention"):
        ds.Generator(model, prefill_attention="flash")
