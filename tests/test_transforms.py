"""jit and vmap: a vmapped call equals the per-member calls, whichever operands are mapped."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
import oracle


def _dense_inputs(rng, v, b=2, s_q=2, h_q=4, d=32, bs=8):
    members = []
    for _ in range(v):
        seqlens = rng.integers(0, 30, size=b).astype(np.int32)
        cache, table = oracle.random_paged_cache(rng, b=b, seqlens=seqlens, block_size=bs, h_kv=1,
                                                 d=d, num_extra_blocks=int(rng.integers(1, 4)))
        members.append((rng.standard_normal((b, s_q, h_q, d)).astype(oracle.BF16), cache, table,
                        seqlens))
    # Pools and tables of equal shape across members (pad with NaN blocks / bad entries).
    nb = max(m[1].shape[0] for m in members)
    mb = max(m[2].shape[1] for m in members)
    out = []
    for q, cache, table, seqlens in members:
        cache = np.concatenate([cache, np.full((nb - len(cache),) + cache.shape[1:], np.nan,
                                               cache.dtype)])
        table = np.concatenate([table, np.full((b, mb - table.shape[1]), -1, np.int32)], axis=1)
        out.append((q, cache, table, seqlens))
    return [np.stack(x) for x in zip(*out)]


def _each(fn, *stacked):
    results = [fn(*(x[i] for x in stacked)) for i in range(stacked[0].shape[0])]
    return [np.stack([np.asarray(r[k], np.float32) for r in results]) for k in range(len(results[0]))]


def _assert_same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x, np.float32), y, rtol=1e-6, atol=1e-6)


def test_vmap_dense_with_per_member_caches(rng):
    q, cache, table, seqlens = _dense_inputs(rng, 3)
    fn = lambda q, c, t, s: jfm.mla_decode(q, c, t, s, head_dim_v=32, causal=True)
    _assert_same(jax.jit(jax.vmap(fn))(q, cache, table, seqlens), _each(fn, q, cache, table, seqlens))


def test_vmap_dense_shared_cache_and_other_axis(rng):
    q, cache, table, seqlens = _dense_inputs(rng, 3)
    fn = lambda q, t, s: jfm.mla_decode(q, cache[0], t, s, head_dim_v=32)
    q_t = np.moveaxis(q, 0, 2)                       # map over axis 2
    got = jax.vmap(fn, in_axes=(2, None, 0))(q_t, table[0], seqlens)
    want = _each(lambda q, s: fn(q, table[0], s), q, seqlens)
    _assert_same(got, want)


def test_nested_vmap(rng):
    q, cache, table, seqlens = _dense_inputs(rng, 2)
    fn = lambda q, c, t, s: jfm.mla_decode(q, c, t, s, head_dim_v=16)
    q2 = np.stack([q, q[::-1]])
    got = jax.vmap(jax.vmap(fn, in_axes=(0, 0, 0, 0)), in_axes=(0, None, None, None))(
        q2, cache, table, seqlens)
    for i in range(2):
        _assert_same([g[i] for g in got], _each(fn, q2[i], cache, table, seqlens))


def test_vmap_sparse_two_pools_and_batched_sink(rng):
    v, b, s_q, h, d = 2, 2, 1, 4, 64
    main = rng.standard_normal((v, 3, 8, 1, d)).astype(oracle.BF16)
    extra = rng.standard_normal((v, 5, 4, 1, d)).astype(oracle.BF16)
    idx = rng.integers(-1, 24, size=(v, b, s_q, 6)).astype(np.int32)
    extra_idx = rng.integers(-1, 20, size=(v, b, s_q, 5)).astype(np.int32)
    lens = rng.integers(0, 6, size=(v, b)).astype(np.int32)
    q = rng.standard_normal((v, b, s_q, h, d)).astype(oracle.BF16)
    sink = rng.standard_normal((v, h)).astype(np.float32)
    fn = lambda q, m, i, l, e, ei, k: jfm.mla_decode(q, m, indices=i, topk_length=l,
                                                     extra_kv_cache=e, extra_indices=ei,
                                                     attn_sink=k, head_dim_v=48)
    args = (q, main, idx, lens, extra, extra_idx)
    # Shared sink: folded into the batch. Per-member sink: the lax.map fallback.
    _assert_same(jax.vmap(fn, in_axes=(0,) * 6 + (None,))(*args, sink[0]),
                 _each(lambda *a: fn(*a, sink[0]), *args))
    _assert_same(jax.vmap(fn)(*args, sink), _each(fn, *args, sink))


def test_vmap_prefill_with_batched_kv(rng):
    v, s_q, h, d, s_kv = 3, 5, 4, 32, 11
    q = rng.standard_normal((v, s_q, h, d)).astype(oracle.BF16)
    kv = rng.standard_normal((v, s_kv, 1, d)).astype(oracle.BF16)
    idx = rng.integers(-2, s_kv + 2, size=(v, s_q, 1, 7)).astype(np.int32)
    fn = lambda q, kv, i: jfm.sparse_mla_prefill(q, kv, i, head_dim_v=16)
    _assert_same(jax.jit(jax.vmap(fn))(q, kv, idx), _each(fn, q, kv, idx))
    _assert_same(jax.vmap(fn, in_axes=(0, None, 0))(q, kv[0], idx),
                 _each(lambda q, i: fn(q, kv[0], i), q, idx))


def test_metadata_is_reusable_under_jit(rng):
    q, cache, table, seqlens = [x[0] for x in _dense_inputs(rng, 1)]
    md = jfm.get_mla_metadata(jnp.asarray(seqlens), s_q=2, h_q=4)

    @jax.jit
    def two_layers(q, cache, table, seqlens, md):
        a = jfm.mla_decode(q, cache, table, seqlens, head_dim_v=32, metadata=md)
        b = jfm.mla_decode(q, cache, table, seqlens, head_dim_v=32, metadata=md)
        return a, b

    (a, la), (b, lb) = two_layers(q, cache, table, seqlens, md)
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    ref = jfm.mla_decode(q, cache, table, seqlens, head_dim_v=32)
    np.testing.assert_array_equal(np.asarray(la), np.asarray(ref[1]))
