"""mla_decode on the reference path against the float64 NumPy oracle (tests/oracle.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
import oracle
from conftest import assert_close


def _seqlens(rng, b, s_k, varlen):
    if not varlen:
        return np.full(b, s_k, np.int32)
    lens = rng.integers(0, 2 * s_k, size=b).astype(np.int32)
    lens[rng.integers(0, b)] = 0          # always one empty sequence
    return lens


def _run_dense(rng, *, b, s_q, h_q, h_kv, d, d_v, block_size, s_k, causal, varlen,
               dtype=jnp.bfloat16, sink=False):
    seqlens = _seqlens(rng, b, s_k, varlen)
    npdt = oracle.BF16 if dtype == jnp.bfloat16 else np.float16
    cache, table = oracle.random_paged_cache(rng, b=b, seqlens=seqlens, block_size=block_size,
                                             h_kv=h_kv, d=d, dtype=npdt)
    q = rng.standard_normal((b, s_q, h_q, d)).astype(npdt)
    attn_sink = rng.standard_normal(h_q).astype(np.float32) if sink else None
    scale = d ** -0.5
    fn = jax.jit(lambda q, c, t, s, k: jfm.mla_decode(q, c, t, s, head_dim_v=d_v, causal=causal,
                                                      attn_sink=k, implementation="reference"))
    out, lse = fn(q, cache, table, seqlens, attn_sink)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    ref_out, ref_lse = oracle.dense_decode(q, cache, table, seqlens, scale=scale, d_v=d_v,
                                           causal=causal, attn_sink=attn_sink)
    assert_close(out, ref_out, rel=1e-2, what="out")
    assert_close(lse, ref_lse, rel=1e-5, what="lse")
    return out, lse, seqlens


@pytest.mark.parametrize("h_q,h_kv", [(1, 1), (3, 1), (16, 1), (128, 1), (16, 2), (4, 2)])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True), (4, True), (4, False)])
def test_dense_heads_and_queries(rng, h_q, h_kv, s_q, causal):
    _run_dense(rng, b=3, s_q=s_q, h_q=h_q, h_kv=h_kv, d=40, d_v=32, block_size=16, s_k=37,
               causal=causal, varlen=True)


@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_dense_block_sizes(rng, block_size):
    _run_dense(rng, b=4, s_q=2, h_q=8, h_kv=1, d=24, d_v=16, block_size=block_size, s_k=70,
               causal=True, varlen=True)


@pytest.mark.parametrize("d,d_v", [(576, 512), (512, 512)])
def test_dense_deepseek_dims(rng, d, d_v):
    _run_dense(rng, b=2, s_q=2, h_q=16, h_kv=1, d=d, d_v=d_v, block_size=64, s_k=100, causal=True,
               varlen=True)


def test_dense_fp16(rng):
    _run_dense(rng, b=3, s_q=1, h_q=8, h_kv=2, d=48, d_v=32, block_size=16, s_k=50, causal=False,
               varlen=True, dtype=jnp.float16)


def test_dense_sink(rng):
    _run_dense(rng, b=3, s_q=2, h_q=4, h_kv=1, d=32, d_v=32, block_size=8, s_k=20, causal=True,
               varlen=True, sink=True)


def test_empty_queries_give_zero_and_inf(rng):
    """L = 0, and a causal window that is empty (s_q > L), give out = 0 and lse = +inf."""
    seqlens = np.array([0, 2, 9], np.int32)
    cache, table = oracle.random_paged_cache(rng, b=3, seqlens=seqlens, block_size=4, h_kv=1, d=16)
    q = rng.standard_normal((3, 4, 2, 16)).astype(oracle.BF16)
    out, lse = jfm.mla_decode(q, cache, table, seqlens, head_dim_v=16, causal=True)
    out, lse = np.asarray(out, np.float64), np.asarray(lse)
    assert (out[0] == 0).all() and np.isposinf(lse[0]).all()
    # Sequence 1 has 2 tokens and 4 queries: queries 0 and 1 see nothing, 2 and 3 see 1 and 2.
    assert (out[1, :2] == 0).all() and np.isposinf(lse[1, :, :2]).all()
    assert np.isfinite(lse[1, :, 2:]).all() and np.isfinite(lse[2]).all()


def test_nan_rows_and_bad_table_tails_never_leak(rng):
    """Every unused row is NaN and every table entry past a length is out of range; the result is
    finite and equals the result with a clean cache."""
    seqlens = np.array([5, 64, 65, 1], np.int32)
    cache, table = oracle.random_paged_cache(rng, b=4, seqlens=seqlens, block_size=64, h_kv=1,
                                             d=32)
    assert np.isnan(cache.astype(np.float32)).any()
    q = rng.standard_normal((4, 1, 4, 32)).astype(oracle.BF16)
    out, lse = jfm.mla_decode(q, cache, table, seqlens, head_dim_v=32)
    assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(lse).all()
    clean = np.nan_to_num(cache.astype(np.float32)).astype(oracle.BF16)
    out2, lse2 = jfm.mla_decode(q, clean, np.where(table < 0, 0, np.minimum(table, len(cache) - 1)),
                                seqlens, head_dim_v=32)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(out2, np.float32))


def test_default_softmax_scale_is_d_qk(rng):
    seqlens = np.array([10], np.int32)
    cache, table = oracle.random_paged_cache(rng, b=1, seqlens=seqlens, block_size=16, h_kv=1,
                                             d=64)
    q = rng.standard_normal((1, 1, 2, 64)).astype(oracle.BF16)
    a = jfm.mla_decode(q, cache, table, seqlens, head_dim_v=48)
    b = jfm.mla_decode(q, cache, table, seqlens, head_dim_v=48, softmax_scale=64 ** -0.5)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    c = jfm.mla_decode(q, cache, table, seqlens, head_dim_v=48, softmax_scale=0.5)
    assert not np.allclose(np.asarray(a[1]), np.asarray(c[1]))
