"""Malformed runtime values on the GPU (issue #16; SEMANTICS.md, "Paged KV cache"): every path gives
them the reference's meaning. Lengths clamp to [0, max_blocks * block_size] (the causal window uses
the clamped length); a page id outside [0, num_blocks) inside the length makes its tokens absent
(out of the softmax, never read); a sparse index outside the pool is skipped; a topk_length clamps
to [0, topk].

The dense kernel runs with implementation="kernel" against implementation="reference" on the same
GPU. The sparse ops run with implementation=None (their kernels land later: until then both sides
are the reference, after that the kernel), and must equal the reference whichever path runs. Every
pool holds NaN in every block (row) no valid entry names, first and last block among them, so a
path that reads a clamped-onto page shows NaN.

Skipped cleanly unless jax sees a Hopper GPU and the CUDA extension is built.

Under compute-sanitizer, run it as a script (each dense case once, checked against the float64
NumPy oracle, no XLA reference):
    XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck \
        python tests/gpu/test_malformed_gpu.py
"""
from __future__ import annotations

import functools
import os
import sys
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_flashmla

pytestmark = pytest.mark.gpu

_ok, _why = (False, "jax has no GPU")
try:
    if jax.devices()[0].platform == "gpu":
        _ok, _why = jax_flashmla.kernels_available()
except RuntimeError as e:  # pragma: no cover
    _why = str(e)
if not _ok:
    if __name__ == "__main__":
        sys.exit(f"needs a Hopper GPU with the built kernels: {_why}")
    pytest.skip(f"malformed-input GPU tests need a Hopper GPU with the built kernels: {_why}",
                allow_module_level=True)

PAGE = 64
D_QK, D_V = 576, 512
I32_MAX, I32_MIN = 2 ** 31 - 1, -2 ** 31


# --- Dense decode: kernel vs reference ------------------------------------------------------------

def _pool(rng, num_blocks, h_kv, dtype, owned_blocks):
    """[num_blocks, PAGE, h_kv, D_QK] random values in owned blocks, NaN everywhere else."""
    kv = rng.standard_normal((num_blocks, PAGE, h_kv, D_QK)).astype(np.float32)
    unowned = np.setdiff1d(np.arange(num_blocks), owned_blocks)
    kv[unowned] = np.nan
    return jnp.asarray(kv).astype(dtype)


# name: (block_table rows, lengths); num_blocks = 10, blocks 0 and 9 unowned (NaN); capacity of a
# table of 3 pages = 192 tokens.
NB = 10
DENSE = {
    "page_99": ([[1, 99, 2], [99, 3, 4]], [150, 130]),
    "page_minus_7": ([[-7, 5, 6], [7, -7, 8]], [192, 100]),
    "page_num_blocks": ([[1, NB, 2], [3, 4, NB]], [129, 190]),
    "page_int32_extremes": ([[I32_MAX, 5, I32_MIN], [I32_MIN, 3, I32_MAX]], [192, 129]),
    "every_page_bad": ([[99, -7, NB], [1, 2, 3]], [192, 70]),   # row 0 attends nothing
    "bad_page_in_last_partial": ([[1, 2, -7], [3, 4, 99]], [150, 129]),
    "length_beyond_capacity": ([[1, 2, 3], [4, 5, 6]], [200, 193]),
    "length_int32_max": ([[1, 2, 3], [4, 5, 6]], [I32_MAX, 64]),
    "length_negative": ([[1, 2, 3], [4, 5, 6]], [-5, 64]),
    "length_int32_min": ([[1, 2, 3], [4, 5, 6]], [I32_MIN, -1]),
    "mixed": ([[1, 99, 2], [-7, 5, 6]], [I32_MAX, I32_MIN]),
}


def dense_case(name, *, s_q, h_q, h_kv, dtype, seed=0):
    rng = np.random.default_rng(seed)
    table = np.asarray(DENSE[name][0], np.int32)
    lens = np.asarray(DENSE[name][1], np.int32)
    b = table.shape[0]
    q = jnp.asarray(rng.standard_normal((b, s_q, h_q, D_QK)).astype(np.float32)).astype(dtype)
    kv = _pool(rng, NB, h_kv, dtype, owned_blocks=np.arange(1, NB - 1))
    return dict(q=q, kv=kv, table=jnp.asarray(table), lens=jnp.asarray(lens), np_table=table,
                np_lens=lens)


def random_dense_case(seed, *, b, s_q, h_q, h_kv, dtype, max_blocks=40):
    """A larger batch: random lengths (some beyond the capacity, some negative, some extreme),
    random page ids, about 10% of them out of range inside the lengths."""
    rng = np.random.default_rng(seed)
    cap = max_blocks * PAGE
    lens = rng.integers(0, cap + 1, size=b).astype(np.int64)
    kinds = rng.random(b)
    lens[kinds < 0.1] = rng.integers(cap + 1, 4 * cap, size=int((kinds < 0.1).sum()))
    lens[(kinds >= 0.1) & (kinds < 0.15)] = -3
    lens[0], lens[-1] = I32_MAX, I32_MIN
    lens = lens.astype(np.int32)
    num_blocks = b * max_blocks // 2 + 2
    table = rng.integers(1, num_blocks - 1, size=(b, max_blocks)).astype(np.int32)
    bad = rng.random(table.shape) < 0.1
    table[bad] = rng.choice(np.asarray([-7, -1, num_blocks, 99999, I32_MAX, I32_MIN], np.int32),
                            size=int(bad.sum()))
    q = jnp.asarray(rng.standard_normal((b, s_q, h_q, D_QK)).astype(np.float32)).astype(dtype)
    kv = _pool(rng, num_blocks, h_kv, dtype, owned_blocks=np.arange(1, num_blocks - 1))
    return dict(q=q, kv=kv, table=jnp.asarray(table), lens=jnp.asarray(lens), np_table=table,
                np_lens=lens)


@functools.lru_cache(maxsize=None)
def _decode_fn(causal, implementation, with_meta):
    def f(q, kv, table, lens):
        meta = None
        if with_meta:
            meta = jax_flashmla.get_mla_metadata(lens, s_q=q.shape[1], h_q=q.shape[2],
                                                 h_kv=kv.shape[2])
        return jax_flashmla.mla_decode(q, kv, table, lens, causal=causal, metadata=meta,
                                       implementation=implementation)
    return jax.jit(f)


def _host(out, lse):
    return np.asarray(out.astype(jnp.float32)), np.asarray(lse)


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    """Kernel result == reference result up to the kernel's rounding; infinities (empty queries)
    exactly, out exactly 0 there, no NaN anywhere."""
    assert not np.isnan(out).any(), "NaN in out"
    assert not np.isnan(lse).any(), "NaN in lse"
    inf = np.isinf(ref_lse)
    np.testing.assert_array_equal(lse[inf], ref_lse[inf], err_msg="lse infinities differ")
    np.testing.assert_allclose(lse[~inf], ref_lse[~inf], rtol=2e-5, atol=2e-5, err_msg="lse")
    empty = np.swapaxes(inf, -1, -2) if lse.ndim == 3 else inf
    assert (out[empty] == 0).all(), "out not 0 where nothing is attended"
    rel = np.linalg.norm(out - ref_out) / max(np.linalg.norm(ref_out), 1e-30)
    bound = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    assert rel <= bound, f"out relative L2 error {rel:.3g} > {bound}"


def _compare_dense(case, causal, with_meta, dtype):
    args = (case["q"], case["kv"], case["table"], case["lens"])
    out, lse = _host(*_decode_fn(causal, "kernel", with_meta)(*args))
    ref_out, ref_lse = _host(*_decode_fn(causal, "reference", False)(*args))
    assert_matches(out, lse, ref_out, ref_lse, dtype)
    return out, lse


@pytest.mark.parametrize("name", list(DENSE))
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True)])
@pytest.mark.parametrize("with_meta", [True, False])
def test_dense_kernel_equals_reference(name, s_q, causal, with_meta):
    dtype = jnp.bfloat16 if (len(name) + s_q) % 2 else jnp.float16
    h_q, h_kv = (16, 1) if with_meta else (64, 2)
    case = dense_case(name, s_q=s_q, h_q=h_q, h_kv=h_kv, dtype=dtype, seed=len(name))
    _compare_dense(case, causal, with_meta, dtype)


@pytest.mark.parametrize("seed,b,s_q,h_q,causal", [(1, 64, 1, 128, False), (2, 33, 2, 16, True),
                                                    (3, 128, 1, 16, False)])
def test_dense_kernel_equals_reference_random(seed, b, s_q, h_q, causal):
    case = random_dense_case(seed, b=b, s_q=s_q, h_q=h_q, h_kv=1, dtype=jnp.bfloat16)
    _compare_dense(case, causal, True, jnp.bfloat16)


def test_dense_kernel_empty_rows():
    """A negative length, and a row whose every page is out of range: out 0, lse +inf."""
    for name, row in (("length_negative", 0), ("every_page_bad", 0), ("length_int32_min", 1)):
        case = dense_case(name, s_q=1, h_q=16, h_kv=1, dtype=jnp.bfloat16)
        out, lse = _compare_dense(case, False, True, jnp.bfloat16)
        assert (out[row] == 0).all() and np.isposinf(lse[row]).all()


def test_dense_kernel_against_float64_oracle():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import oracle
    for n, name in enumerate(("page_99", "page_int32_extremes", "length_beyond_capacity", "mixed")):
        causal = bool(n % 2)
        case = dense_case(name, s_q=2, h_q=16, h_kv=1, dtype=jnp.bfloat16, seed=n)
        out, lse = _host(*_decode_fn(causal, "kernel", True)(
            case["q"], case["kv"], case["table"], case["lens"]))
        ref_out, ref_lse = oracle.dense_decode(
            np.asarray(case["q"].astype(jnp.float32)), np.asarray(case["kv"].astype(jnp.float32)),
            case["np_table"], case["np_lens"], scale=D_QK ** -0.5, d_v=D_V, causal=causal)
        assert_matches(out, lse, ref_out, ref_lse, jnp.bfloat16)


def test_checked_mode_with_the_kernel():
    """checkify names the malformed values of a call that runs the kernel, and leaves its result
    unchanged."""
    from jax.experimental import checkify
    case = dense_case("page_99", s_q=1, h_q=16, h_kv=1, dtype=jnp.bfloat16)
    args = (case["q"], case["kv"], case["table"], case["lens"])
    want = _host(*_decode_fn(False, "kernel", True)(*args))
    fn = lambda *a: jax_flashmla.mla_decode(*a, implementation="kernel")
    with jax_flashmla.checks_enabled():
        err, got = checkify.checkify(jax.jit(fn))(*args)
    msg = err.get()
    assert msg is not None and "block_table: batch row 0, block 1" in msg and "page id 99" in msg
    for x, y in zip(_host(*got), want):
        np.testing.assert_array_equal(x, y)


# --- Sparse decode and prefill: implementation=None vs the reference -------------------------------

def _both(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jax_flashmla.KernelFallbackWarning)
        auto = jax.jit(functools.partial(fn, implementation=None))(*args)
    ref = jax.jit(functools.partial(fn, implementation="reference"))(*args)
    return ([np.asarray(x.astype(jnp.float32)) for x in auto],
            [np.asarray(x.astype(jnp.float32)) for x in ref])


def _sparse_indices(rng, shape, rows, lo, hi):
    """Valid rows from [lo, hi) (owned), -1 sprinkled in, 30% malformed (beyond / negative)."""
    idx = rng.integers(lo, hi, size=shape).astype(np.int32)
    idx[rng.random(shape) < 0.1] = -1
    bad = rng.random(shape) < 0.3
    idx[bad] = rng.choice(np.asarray([rows, rows + 1, 10 ** 7, I32_MAX, -2, -7, -rows, I32_MIN],
                                     np.int32), size=int(bad.sum()))
    return jnp.asarray(idx)


def _fp8_pool(rng, num_blocks, page, d_qk, nan_blocks):
    from jax_flashmla import kv_cache as kvc
    x = jnp.asarray(rng.standard_normal((num_blocks, page, 1, d_qk)).astype(np.float32))
    packed = np.array(kvc.quantize_fp8(x.astype(jnp.bfloat16)))
    packed[nan_blocks] = 0xFF                              # NaN values and NaN scales
    return jnp.asarray(packed)


@pytest.mark.parametrize("h_q,topk", [(64, 128), (128, 2048)])
@pytest.mark.parametrize("lengths", ["none", "malformed"])
def test_sparse_decode_v32_malformed(h_q, topk, lengths):
    rng = np.random.default_rng(h_q + topk)
    b, s_q, nb = 3, 2, 40
    cache = _fp8_pool(rng, nb, PAGE, D_QK, [0, nb - 1])
    idx = _sparse_indices(rng, (b, s_q, topk), nb * PAGE, PAGE, (nb - 1) * PAGE)
    tl = None if lengths == "none" else jnp.asarray([topk + 5, -3, I32_MAX], jnp.int32)
    q = jnp.asarray(rng.standard_normal((b, s_q, h_q, D_QK)).astype(np.float32)).astype(jnp.bfloat16)
    fn = lambda q, c, i, t, implementation: jax_flashmla.mla_decode(
        q, c, indices=i, topk_length=t, head_dim_v=D_V, implementation=implementation)
    (out, lse), (ref_out, ref_lse) = _both(fn, q, cache, idx, tl)
    assert_matches(out, lse, ref_out, ref_lse, jnp.bfloat16)


def test_sparse_decode_v4_two_pools_malformed():
    rng = np.random.default_rng(4)
    b, s_q, h_q, d = 2, 1, 64, 512
    main = _fp8_pool(rng, 6, PAGE, d, [0, 5])
    extra = _fp8_pool(rng, 10, PAGE, d, [0, 9])
    idx = _sparse_indices(rng, (b, s_q, 128), 6 * PAGE, PAGE, 5 * PAGE)
    extra_idx = _sparse_indices(rng, (b, s_q, 64), 10 * PAGE, PAGE, 9 * PAGE)
    q = jnp.asarray(rng.standard_normal((b, s_q, h_q, d)).astype(np.float32)).astype(jnp.bfloat16)
    sink = jnp.asarray(rng.standard_normal(h_q).astype(np.float32))
    fn = lambda q, c, i, t, e, ei, et, s, implementation: jax_flashmla.mla_decode(
        q, c, indices=i, topk_length=t, extra_kv_cache=e, extra_indices=ei, extra_topk_length=et,
        attn_sink=s, head_dim_v=512, implementation=implementation)
    (out, lse), (ref_out, ref_lse) = _both(
        fn, q, main, idx, jnp.asarray([-1, 1000], jnp.int32), extra, extra_idx,
        jnp.asarray([I32_MAX, I32_MIN], jnp.int32), sink)
    assert_matches(out, lse, ref_out, ref_lse, jnp.bfloat16)


@pytest.mark.parametrize("d_qk,h_q,topk", [(576, 64, 512), (576, 128, 2048), (512, 64, 512)])
def test_sparse_prefill_malformed(d_qk, h_q, topk):
    rng = np.random.default_rng(d_qk + h_q + topk)
    s_q, s_kv = 64, 4096
    kv = rng.standard_normal((s_kv, 1, d_qk)).astype(np.float32)
    kv[[0, s_kv - 1]] = np.nan
    kv = jnp.asarray(kv).astype(jnp.bfloat16)
    idx = _sparse_indices(rng, (s_q, 1, topk), s_kv, 1, s_kv - 1)
    tl = rng.integers(0, topk + 1, size=s_q).astype(np.int32)
    tl[:4] = [topk + 1, I32_MAX, -1, I32_MIN]
    q = jnp.asarray(rng.standard_normal((s_q, h_q, d_qk)).astype(np.float32)).astype(jnp.bfloat16)
    fn = lambda q, kv, i, t, implementation: jax_flashmla.sparse_mla_prefill(
        q, kv, i, topk_length=t, head_dim_v=512, implementation=implementation)
    (out, mx, lse), (ref_out, ref_mx, ref_lse) = _both(fn, q, kv, idx, jnp.asarray(tl))
    assert_matches(out, lse, ref_out, ref_lse, jnp.bfloat16)
    inf = np.isinf(ref_mx)
    np.testing.assert_array_equal(mx[inf], ref_mx[inf])
    np.testing.assert_allclose(mx[~inf], ref_mx[~inf], rtol=2e-5, atol=2e-5, err_msg="max_logits")
    assert np.isposinf(lse[2:4]).all() and (out[2:4] == 0).all()   # topk_length -1 and INT32_MIN


if __name__ == "__main__":
    # compute-sanitizer entry: every dense case once on the kernel, against the float64 oracle.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import oracle
    for n, name in enumerate(DENSE):
        for s_q, causal, with_meta in ((1, False, True), (2, True, False)):
            case = dense_case(name, s_q=s_q, h_q=16, h_kv=1, dtype=jnp.bfloat16, seed=n)
            out, lse = _host(*_decode_fn(causal, "kernel", with_meta)(
                case["q"], case["kv"], case["table"], case["lens"]))
            ref_out, ref_lse = oracle.dense_decode(
                np.asarray(case["q"].astype(jnp.float32)),
                np.asarray(case["kv"].astype(jnp.float32)), case["np_table"], case["np_lens"],
                scale=D_QK ** -0.5, d_v=D_V, causal=causal)
            assert_matches(out, lse, ref_out, ref_lse, jnp.bfloat16)
            print(f"{name} s_q={s_q} ok", flush=True)
    print("malformed memcheck cases done")
