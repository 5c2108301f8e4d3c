"""Malformed runtime values get one defined meaning (SEMANTICS.md, "Paged KV cache"; docs/CHECKS.md),
checked on the reference against the float64 NumPy oracle:

- dense decode (bf16 and both FP8 caches): a length clamps to [0, max_blocks * block_size] (the
  causal window uses the clamped length); a page id outside [0, num_blocks) inside the length makes
  that page's tokens absent (out of the softmax, never read);
- sparse decode (one or two pools) and sparse prefill: an index outside the pool is skipped; a
  topk_length clamps to [0, topk].

Every pool has NaN in the blocks (rows) no valid entry names, first and last among them: a path
that reads an out-of-range id through a clamped index (the old dense reference did) shows NaN.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import kv_cache as kvc
import oracle
from conftest import assert_close

I32_MAX, I32_MIN = 2 ** 31 - 1, -2 ** 31
BS, NB, MAX_BLOCKS = 8, 8, 2            # a table of 2 pages of 8 tokens: capacity 16
FORMATS = {"bf16": (64, 48, 2), "fp8_v32": (576, 512, 1), "fp8_v4": (512, 512, 1)}  # d, d_v, h_kv


def _pool(rng, nb, bs, h_kv, d, fmt, nan_blocks):
    """(the cache as passed to the op, its float64 view for the oracle); ``nan_blocks`` hold NaN
    (for FP8 caches: all-0xFF bytes, NaN values and NaN scales)."""
    x = rng.standard_normal((nb, bs, h_kv, d)).astype(oracle.BF16)
    if fmt == "bf16":
        x[nan_blocks] = np.nan
        return x, x.astype(np.float64)
    packed = np.array(kvc.quantize_fp8(jnp.asarray(x)))
    packed[nan_blocks] = 0xFF
    return packed, np.asarray(kvc.dequantize_fp8(jnp.asarray(packed)), np.float64)


DENSE_KINDS = {
    # name: (block_table [2, 2], cache_seqlens [2]); valid pages are 1..6, blocks 0 and 7 are NaN.
    "clean": ([[2, 3], [4, 5]], [16, 11]),
    "page_99_of_8": ([[2, 99], [99, 5]], [16, 11]),
    "page_minus_7": ([[-7, 3], [4, -7]], [16, 11]),
    "page_num_blocks": ([[2, NB], [NB, 5]], [12, 9]),
    "page_int32_extremes": ([[2, I32_MAX], [I32_MIN, 5]], [16, 16]),
    "every_page_bad": ([[99, -7], [4, 5]], [16, 3]),        # row 0 has no token at all
    "length_beyond_capacity": ([[2, 3], [4, 5]], [200, I32_MAX]),
    "length_negative": ([[2, 3], [4, 5]], [-5, I32_MIN]),
    "mixed": ([[2, 99], [-7, 5]], [200, -1]),
}


def _dense(rng, fmt, kind, s_q=2):
    d, d_v, h_kv = FORMATS[fmt]
    cache, cache64 = _pool(rng, NB, BS, h_kv, d, fmt, [0, NB - 1])
    table = np.asarray(DENSE_KINDS[kind][0], np.int32)
    lens = np.asarray(DENSE_KINDS[kind][1], np.int32)
    q = rng.standard_normal((2, s_q, 4, d)).astype(oracle.BF16)
    return q, cache, cache64, table, lens, d, d_v


@pytest.mark.parametrize("kind", list(DENSE_KINDS))
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("causal", [False, True])
def test_dense_malformed_matches_oracle(rng, fmt, kind, causal):
    q, cache, cache64, table, lens, d, d_v = _dense(rng, fmt, kind)
    out, lse = jax.jit(lambda *a: jfm.mla_decode(*a, head_dim_v=d_v, causal=causal,
                                                 implementation="reference"))(q, cache, table, lens)
    ref_out, ref_lse = oracle.dense_decode(q, cache64, table, lens, scale=d ** -0.5, d_v=d_v,
                                           causal=causal)
    assert_close(out, ref_out, what="out")
    assert_close(lse, ref_lse, rel=1e-5, what="lse")


def _decode(q, cache, table, lens, **kw):
    out, lse = jfm.mla_decode(q, cache, table, lens, implementation="reference", **kw)
    return np.asarray(out, np.float32), np.asarray(lse)


@pytest.mark.parametrize("causal", [False, True])
def test_lengths_clamp_exactly(rng, causal):
    """A length beyond the capacity is the capacity, a negative one is 0: bit for bit."""
    q, cache, _, table, _, _, d_v = _dense(rng, "bf16", "clean")
    for bad, clamped in (([200, I32_MAX], [16, 16]), ([-5, I32_MIN], [0, 0]), ([17, -1], [16, 0])):
        got = _decode(q, cache, table, np.asarray(bad, np.int32), head_dim_v=d_v, causal=causal)
        want = _decode(q, cache, table, np.asarray(clamped, np.int32), head_dim_v=d_v,
                       causal=causal)
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)
    out, lse = _decode(q, cache, table, np.asarray([-5, I32_MIN], np.int32), head_dim_v=d_v)
    assert (out == 0).all() and np.isposinf(lse).all()


def test_bad_page_drops_its_tokens(rng):
    """A page id out of range inside the length drops exactly that page's tokens: the result is the
    softmax over the other pages' tokens (here: the sequence whose bad page is its second one
    equals the same sequence cut to its first page), and never NaN though every page such an id
    could be clamped onto holds NaN."""
    q, cache, _, _, _, _, d_v = _dense(rng, "bf16", "clean", s_q=1)
    lens = np.asarray([16, 16], np.int32)
    for bad in (99, -7, NB, I32_MAX, I32_MIN):
        got = _decode(q, cache, np.asarray([[2, bad], [bad, 5]], np.int32), lens, head_dim_v=d_v)
        assert np.isfinite(got[0]).all() and np.isfinite(got[1]).all()
        first = _decode(q, cache, np.asarray([[2, 3], [5, 5]], np.int32),
                        np.asarray([8, 8], np.int32), head_dim_v=d_v)
        # Row 0's bad page is its second: tokens 0..7 of page 2 remain, as in row 0 of `first`.
        # Row 1's bad page is its first: tokens 8..15 remain, page 5's rows 0..7, the same keys as
        # row 1 of `first` (at other positions, so summed in another order: not bit for bit).
        for x, y in zip(got, first):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# --- Sparse decode --------------------------------------------------------------------------------

SPARSE_KINDS = {
    # name: (how to spoil the indices, topk_length or None)
    "clean": (None, None),
    "index_beyond_pool": ("beyond", None),
    "index_negative": ("negative", None),
    "topk_length_beyond": (None, [24 + 3, I32_MAX]),
    "topk_length_negative": (None, [-3, I32_MIN]),
    "everything": ("both", [I32_MAX, -1]),
}


def _sparse_indices(rng, b, s_q, k, nb, bs, how):
    """Valid rows avoid the NaN blocks 0 and nb - 1; -1 sprinkled in; then spoiled."""
    idx = rng.integers(bs, (nb - 1) * bs, size=(b, s_q, k)).astype(np.int32)
    idx[rng.random(idx.shape) < 0.15] = -1
    rows = nb * bs
    beyond = np.array([rows, rows + 5, 10 ** 6, I32_MAX], np.int32)
    negative = np.array([-2, -7, -rows, I32_MIN], np.int32)
    spoil = rng.random(idx.shape) < 0.3
    if how == "beyond":
        idx[spoil] = rng.choice(beyond, size=int(spoil.sum()))
    elif how == "negative":
        idx[spoil] = rng.choice(negative, size=int(spoil.sum()))
    elif how == "both":
        idx[spoil] = rng.choice(np.concatenate([beyond, negative]), size=int(spoil.sum()))
    return idx


@pytest.mark.parametrize("kind", list(SPARSE_KINDS))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_sparse_decode_malformed_matches_oracle(rng, fmt, kind):
    d, d_v, h_kv = FORMATS[fmt]
    how, tl = SPARSE_KINDS[kind]
    b, s_q, k, nb, bs = 2, 2, 24, 6, 16
    cache, cache64 = _pool(rng, nb, bs, h_kv, d, fmt, [0, nb - 1])
    idx = _sparse_indices(rng, b, s_q, k, nb, bs, how)
    topk_length = None if tl is None else np.asarray(tl, np.int32)
    q = rng.standard_normal((b, s_q, 4, d)).astype(oracle.BF16)
    out, lse = jax.jit(lambda q, c, i, t: jfm.mla_decode(
        q, c, indices=i, topk_length=t, head_dim_v=d_v, implementation="reference"))(
        q, cache, idx, topk_length)
    ref_out, ref_lse = oracle.sparse_decode(q, [(cache64, idx, topk_length)], scale=d ** -0.5,
                                            d_v=d_v)
    assert_close(out, ref_out, what="out")
    assert_close(lse, ref_lse, rel=1e-5, what="lse")
    if kind == "topk_length_negative":
        assert np.isposinf(np.asarray(lse)).all() and (np.asarray(out, np.float32) == 0).all()


@pytest.mark.parametrize("fmt", ["bf16", "fp8_v4"])
def test_sparse_two_pools_malformed(rng, fmt):
    d, d_v, h_kv = FORMATS[fmt] if fmt != "bf16" else (512, 512, 1)
    b, s_q = 2, 2
    main, main64 = _pool(rng, 4, 32, h_kv, d, fmt, [0, 3])
    extra, extra64 = _pool(rng, 9, 4, h_kv, d, fmt, [0, 8])
    idx = _sparse_indices(rng, b, s_q, 16, 4, 32, "both")
    extra_idx = _sparse_indices(rng, b, s_q, 12, 9, 4, "both")
    extra_len = np.asarray([I32_MAX, -4], np.int32)
    topk_len = np.asarray([-1, 99], np.int32)
    q = rng.standard_normal((b, s_q, 4, d)).astype(oracle.BF16)
    out, lse = jfm.mla_decode(q, main, indices=idx, topk_length=topk_len, extra_kv_cache=extra,
                              extra_indices=extra_idx, extra_topk_length=extra_len,
                              head_dim_v=d_v, implementation="reference")
    ref_out, ref_lse = oracle.sparse_decode(
        q, [(main64, idx, topk_len), (extra64, extra_idx, extra_len)], scale=d ** -0.5, d_v=d_v)
    assert_close(out, ref_out, what="out")
    assert_close(lse, ref_lse, rel=1e-5, what="lse")


# --- Sparse prefill -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SPARSE_KINDS))
@pytest.mark.parametrize("d", [576, 64])
def test_sparse_prefill_malformed_matches_oracle(rng, kind, d):
    how, tl = SPARSE_KINDS[kind]
    s_q, s_kv, k, h_q = 5, 40, 24, 8
    d_v = min(d, 512)
    kv = rng.standard_normal((s_kv, 1, d)).astype(oracle.BF16)
    kv[[0, s_kv - 1]] = np.nan                              # never named by a valid index
    idx = rng.integers(1, s_kv - 1, size=(s_q, 1, k)).astype(np.int32)
    idx[rng.random(idx.shape) < 0.15] = -1
    spoil = rng.random(idx.shape) < 0.3
    bad = {"beyond": [s_kv, s_kv + 1, 10 ** 6, I32_MAX], "negative": [-2, -7, -s_kv, I32_MIN],
           "both": [s_kv, I32_MAX, -s_kv, I32_MIN], None: None}[how]
    if bad is not None:
        idx[spoil] = rng.choice(np.asarray(bad, np.int32), size=int(spoil.sum()))
    topk_length = None
    if tl is not None:
        topk_length = rng.integers(0, k + 1, size=s_q).astype(np.int32)
        topk_length[:2] = tl
    q = rng.standard_normal((s_q, h_q, d)).astype(oracle.BF16)
    out, mx, lse = jax.jit(lambda q, kv, i, t: jfm.sparse_mla_prefill(
        q, kv, i, head_dim_v=d_v, topk_length=t, implementation="reference"))(
        q, kv, idx, topk_length)
    r_out, r_mx, r_lse = oracle.sparse_prefill(q, kv, idx, scale=d ** -0.5, d_v=d_v,
                                               topk_length=topk_length)
    assert_close(out, r_out, what="out")
    assert_close(mx, r_mx, rel=1e-5, what="max_logits")
    assert_close(lse, r_lse, rel=1e-5, what="lse")


# --- Under vmap -----------------------------------------------------------------------------------

def test_vmap_dense_with_bad_pages_equals_per_member(rng):
    q, cache, _, table, lens, _, d_v = _dense(rng, "bf16", "page_minus_7")
    cache = np.nan_to_num(cache.astype(np.float32)).astype(oracle.BF16)   # so a leak shows as a value
    qs, caches = np.stack([q, q]), np.stack([cache, cache[::-1]])
    tables, lenss = np.stack([table, table]), np.stack([lens, lens])
    fn = lambda q, c, t, s: jfm.mla_decode(q, c, t, s, head_dim_v=d_v, implementation="reference")
    got = jax.vmap(fn)(qs, caches, tables, lenss)
    for v in range(2):
        want = fn(qs[v], caches[v], tables[v], lenss[v])
        np.testing.assert_array_equal(np.asarray(got[1][v]), np.asarray(want[1]))
