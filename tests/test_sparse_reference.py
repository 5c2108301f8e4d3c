"""Sparse decode (one or two pools, FP8 caches) and sparse prefill on the reference path against
the float64 NumPy oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import kv_cache as kvc
import oracle
from conftest import assert_close


def _pool(rng, nb, bs, d, fp8):
    """(cache as passed to the op, its dequantized float64 view for the oracle). Row 0 of every
    block's tail is NaN: it must never be read through an invalid index."""
    x = rng.standard_normal((nb, bs, 1, d)).astype(oracle.BF16)
    x[:, -1] = np.nan
    if not fp8:
        return x, x.astype(np.float64)
    packed = kvc.quantize_fp8(jnp.asarray(x))
    return packed, np.asarray(kvc.dequantize_fp8(packed), np.float64)


def _indices(rng, b, s_q, k, rows, bs):
    """Random valid rows (never a block's NaN tail) mixed with -1 and out-of-range entries."""
    idx = rng.integers(0, rows, size=(b, s_q, k)).astype(np.int32)
    idx = np.where(idx % bs == bs - 1, idx - 1, idx)
    idx[rng.random(idx.shape) < 0.2] = -1
    idx[rng.random(idx.shape) < 0.05] = rows + 5
    idx[0, 0, :] = -1                      # one query with nothing valid
    return idx


@pytest.mark.parametrize("d,fp8", [(576, True), (512, True), (576, False), (64, False)])
@pytest.mark.parametrize("with_lengths,with_sink", [(False, False), (True, True)])
def test_sparse_one_pool(rng, d, fp8, with_lengths, with_sink):
    b, s_q, h_q, k, nb, bs = 3, 2, 8, 24, 5, 16
    cache, cache64 = _pool(rng, nb, bs, d, fp8)
    idx = _indices(rng, b, s_q, k, nb * bs, bs)
    q = rng.standard_normal((b, s_q, h_q, d)).astype(oracle.BF16)
    topk_length = rng.integers(0, k + 1, size=b).astype(np.int32) if with_lengths else None
    sink = rng.standard_normal(h_q).astype(np.float32) if with_sink else None
    d_v = 512 if d >= 512 else 48
    out, lse = jax.jit(lambda *a: jfm.mla_decode(a[0], a[1], indices=a[2], topk_length=a[3],
                                                 attn_sink=a[4], head_dim_v=d_v))(
        q, cache, idx, topk_length, sink)
    ref_out, ref_lse = oracle.sparse_decode(q, [(cache64, idx, topk_length)], scale=d ** -0.5,
                                            d_v=d_v, attn_sink=sink)
    assert_close(out, ref_out, what="out")
    assert_close(lse, ref_lse, rel=1e-5, what="lse")
    assert np.isposinf(np.asarray(lse)[0, :, 0]).all() and (np.asarray(out)[0, 0] == 0).all()


@pytest.mark.parametrize("fp8", [True, False])
def test_sparse_two_pools_one_softmax(rng, fp8):
    """DeepSeek-V4: a sliding-window pool (page 32) and a compressed pool (page 4)."""
    b, s_q, h_q, d = 2, 2, 4, 512
    main, main64 = _pool(rng, 4, 32, d, fp8)
    extra, extra64 = _pool(rng, 9, 4, d, fp8)
    idx = _indices(rng, b, s_q, 16, 4 * 32, 32)
    extra_idx = _indices(rng, b, s_q, 12, 9 * 4, 4)
    extra_len = np.array([5, 12], np.int32)
    sink = rng.standard_normal(h_q).astype(np.float32)
    q = rng.standard_normal((b, s_q, h_q, d)).astype(oracle.BF16)
    out, lse = jfm.mla_decode(q, main, indices=idx, extra_kv_cache=extra, extra_indices=extra_idx,
                              extra_topk_length=extra_len, attn_sink=sink, head_dim_v=512)
    ref_out, ref_lse = oracle.sparse_decode(q, [(main64, idx, None), (extra64, extra_idx, extra_len)],
                                            scale=d ** -0.5, d_v=512, attn_sink=sink)
    assert_close(out, ref_out, what="out")
    assert_close(lse, ref_lse, rel=1e-5, what="lse")


def test_sink_infinite_zeroes_output(rng):
    cache, _ = _pool(rng, 2, 8, 32, False)
    q = rng.standard_normal((1, 1, 2, 32)).astype(oracle.BF16)
    idx = np.array([[[0, 1, 2]]], np.int32)
    sink = np.array([np.inf, -np.inf], np.float32)
    out, lse = jfm.mla_decode(q, cache, indices=idx, attn_sink=sink, head_dim_v=32)
    out = np.asarray(out, np.float64)
    assert (out[0, 0, 0] == 0).all() and np.isfinite(lse).all()
    plain, _ = jfm.mla_decode(q, cache, indices=idx, head_dim_v=32)
    np.testing.assert_array_equal(out[0, 0, 1], np.asarray(plain, np.float64)[0, 0, 1])


def test_fp8_dense_decode_matches_dequantized(rng):
    """A dense decode over an FP8 cache equals the bf16 decode over its dequantized copy."""
    seqlens = np.array([70, 0, 3], np.int32)
    cache, table = oracle.random_paged_cache(rng, b=3, seqlens=seqlens, block_size=64, h_kv=1,
                                             d=576)
    packed = kvc.quantize_fp8(jnp.asarray(cache))
    q = rng.standard_normal((3, 1, 16, 576)).astype(oracle.BF16)
    out, lse = jfm.mla_decode(q, packed, table, seqlens, head_dim_v=512)
    ref_out, ref_lse = oracle.dense_decode(q, np.asarray(kvc.dequantize_fp8(packed), np.float64),
                                           table, seqlens, scale=576 ** -0.5, d_v=512)
    assert_close(out, ref_out, what="out")
    assert_close(lse, ref_lse, rel=1e-5, what="lse")


@pytest.mark.parametrize("h_q,d,with_extras", [(16, 576, True), (8, 512, False), (5, 32, True)])
def test_sparse_prefill(rng, h_q, d, with_extras):
    s_q, s_kv, k = 6, 40, 20
    q = rng.standard_normal((s_q, h_q, d)).astype(oracle.BF16)
    kv = rng.standard_normal((s_kv, 1, d)).astype(oracle.BF16)
    idx = rng.integers(-3, s_kv + 3, size=(s_q, 1, k)).astype(np.int32)
    idx[2] = -1                                          # one query with nothing valid
    sink = rng.standard_normal(h_q).astype(np.float32) if with_extras else None
    lengths = rng.integers(0, k + 1, size=s_q).astype(np.int32) if with_extras else None
    d_v = min(512, d)
    scale = 0.7 * d ** -0.5
    out, mx, lse = jax.jit(lambda q, kv, i, s, t: jfm.sparse_mla_prefill(
        q, kv, i, softmax_scale=scale, head_dim_v=d_v, attn_sink=s, topk_length=t))(
        q, kv, idx, sink, lengths)
    r_out, r_mx, r_lse = oracle.sparse_prefill(q, kv, idx, scale=scale, d_v=d_v, attn_sink=sink,
                                               topk_length=lengths)
    assert_close(out, r_out, what="out")
    assert_close(mx, r_mx, rel=1e-5, what="max_logits")
    assert_close(lse, r_lse, rel=1e-5, what="lse")
    assert np.isneginf(np.asarray(mx)[2]).all() and np.isposinf(np.asarray(lse)[2]).all()


def test_flash_mla_spellings(rng):
    """The FlashMLA-compatible names compute the same as the native API."""
    from jax_flashmla.flash_mla import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata
    seqlens = np.array([30, 64], np.int32)
    cache, table = oracle.random_paged_cache(rng, b=2, seqlens=seqlens, block_size=64, h_kv=1,
                                             d=576)
    q = rng.standard_normal((2, 2, 8, 576)).astype(oracle.BF16)
    tiles, splits = get_mla_metadata(jnp.asarray(seqlens), 2 * 8, 1, num_heads_q=8)
    out, lse = flash_mla_with_kvcache(q, cache, table, seqlens, 512, tiles, splits, causal=True)
    out2, lse2 = jfm.mla_decode(q, cache, table, seqlens, head_dim_v=512, causal=True)
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse2))
    # the current FlashMLA spelling: an empty placeholder, the schedule made inside (also under jit)
    sched, none = get_mla_metadata()
    assert none is None
    out3, lse3 = jax.jit(lambda s, *a: flash_mla_with_kvcache(*a, 512, s, None, causal=True))(
        sched, q, cache, table, seqlens)
    np.testing.assert_array_equal(np.asarray(lse3), np.asarray(lse2))
    with pytest.raises(ValueError, match="num_splits: expected None"):
        flash_mla_with_kvcache(q, cache, table, seqlens, 512, sched, splits)
    with pytest.raises(ValueError, match="got only one"):
        flash_mla_with_kvcache(q, cache, table, seqlens, 512, tiles)
    with pytest.raises(TypeError, match="num_q_tokens_per_head_k and num_heads_k are required"):
        get_mla_metadata(jnp.asarray(seqlens))
    kv = rng.standard_normal((10, 1, 576)).astype(oracle.BF16)
    idx = rng.integers(0, 10, size=(3, 1, 4)).astype(np.int32)
    qp = rng.standard_normal((3, 8, 576)).astype(oracle.BF16)
    a = flash_mla_sparse_fwd(qp, kv, idx, 0.1)
    b = jfm.sparse_mla_prefill(qp, kv, idx, softmax_scale=0.1)
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(b[2]))


@pytest.mark.parametrize("d_qk", [576, 512])
def test_fp8_cache_as_float8_view(rng, d_qk):
    """FlashMLA passes its FP8 caches as float8_e4m3fn views of the bytes: the ops (and the
    FlashMLA spelling with is_fp8_kvcache) read such a view as the same bytes, in both pools,
    sparse and dense; a float8 cache of the wrong width is refused naming the layout."""
    from jax_flashmla.flash_mla import flash_mla_with_kvcache
    as_f8 = lambda c: jax.lax.bitcast_convert_type(c, jnp.float8_e4m3fn)  # noqa: E731
    cache = kvc.quantize_fp8(jnp.asarray(rng.standard_normal((3, 64, 1, d_qk)), jnp.bfloat16))
    extra = kvc.quantize_fp8(jnp.asarray(rng.standard_normal((2, 5, 1, d_qk)), jnp.bfloat16))
    q = jnp.asarray(rng.standard_normal((2, 2, 16, d_qk)), jnp.bfloat16)
    idx = jnp.asarray(rng.integers(-1, 3 * 64, size=(2, 2, 40)), jnp.int32)
    xidx = jnp.asarray(rng.integers(-1, 10, size=(2, 2, 7)), jnp.int32)
    want = jfm.mla_decode(q, cache, indices=idx, extra_kv_cache=extra, extra_indices=xidx)
    got = jfm.mla_decode(q, as_f8(cache), indices=idx, extra_kv_cache=as_f8(extra),
                         extra_indices=xidx)
    got2 = jax.jit(lambda *a: flash_mla_with_kvcache(*a[:2], None, None, 512, is_fp8_kvcache=True,
                                                     indices=a[2]))(q, as_f8(cache), idx)
    want2 = jfm.mla_decode(q, cache, indices=idx)
    for g, w in zip((*got, *got2), (*want, *want2)):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    table = jnp.asarray(rng.permutation(3).reshape(1, 3), jnp.int32)
    lens = jnp.asarray([150], jnp.int32)
    dense = jfm.mla_decode(q[:1], as_f8(cache), table, lens)
    np.testing.assert_array_equal(np.asarray(dense[1]),
                                  np.asarray(jfm.mla_decode(q[:1], cache, table, lens)[1]))
    with pytest.raises(ValueError, match=r"kv_cache: expected last axis \d+ bytes"):
        jfm.mla_decode(q, as_f8(cache)[..., :-8], indices=idx)
