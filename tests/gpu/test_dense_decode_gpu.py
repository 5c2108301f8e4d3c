"""GPU tests of the dense SM90 decode kernel (csrc/kernels/sm90/dense_decode) against the pure-JAX
reference run on the same GPU in float32 (HIGHEST precision), plus a float64 NumPy oracle on a few
cases. Fresh random inputs per case, unused cache rows and whole unused pages full of NaN,
block-table entries past a sequence's end out of range, outputs' memory poisoned before each run.

Skipped cleanly unless jax sees a Hopper GPU and the CUDA extension is built.
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_flashmla
from jax_flashmla.ops import metadata as M

pytestmark = pytest.mark.gpu

_ok, _why = (False, "jax has no GPU")
try:
    if jax.devices()[0].platform == "gpu":
        _ok, _why = jax_flashmla.kernels_available()
except RuntimeError as e:  # pragma: no cover
    _why = str(e)
if not _ok:
    pytest.skip(f"dense decode GPU tests need a Hopper GPU with the built kernels: {_why}",
                allow_module_level=True)

PAGE = 64
D_QK, D_V = 576, 512


def _lengths(rng, b, s_k, varlen, zero_frac=0.0):
    if varlen:
        lens = rng.normal(s_k, s_k / 2, size=b).round().astype(np.int64)
        lens = np.clip(lens, 1, 2 * s_k)
    else:
        lens = np.full(b, s_k, np.int64)
    if zero_frac:
        lens[rng.random(b) < zero_frac] = 0
        lens[0] = 0
    return lens.astype(np.int32)


def make_case(seed, b, s_q, h_q, h_kv, s_k, varlen, dtype, zero_frac=0.0):
    """Random inputs on the device; NaN in every cache row no sequence owns; table tails out of
    range (a mix of large, negative and just-past-the-end ids)."""
    rng = np.random.default_rng(seed)
    lens = _lengths(rng, b, s_k, varlen, zero_frac)
    nblk = -(-lens.astype(np.int64) // PAGE)
    max_blocks = int(nblk.max()) + 2
    total = int(nblk.sum())
    num_blocks = total + 3
    perm = rng.permutation(num_blocks)
    table = rng.choice(np.array([num_blocks, num_blocks + 7, 2**31 - 1, -1, -2**31], np.int64),
                       size=(b, max_blocks)).astype(np.int32)
    valid_rows = np.zeros((num_blocks, PAGE), bool)
    k = 0
    for i in range(b):
        for j in range(nblk[i]):
            blk = perm[k]
            k += 1
            table[i, j] = blk
            n = min(PAGE, lens[i] - j * PAGE)
            valid_rows[blk, :n] = True
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = jax.random.normal(kq, (b, s_q, h_q, D_QK), jnp.float32).astype(dtype)
    kv = jax.random.normal(kk, (num_blocks, PAGE, h_kv, D_QK), jnp.float32).astype(dtype)
    kv = jnp.where(jnp.asarray(valid_rows)[:, :, None, None], kv, jnp.nan).astype(dtype)
    return dict(q=q, kv=kv, table=jnp.asarray(table), lens=jnp.asarray(lens), np_lens=lens,
                np_table=table)


@functools.lru_cache(maxsize=None)
def _kernel_fn(causal, with_meta):
    if with_meta:
        def f(q, kv, table, lens, meta):
            return jax_flashmla.mla_decode(q, kv, table, lens, causal=causal, metadata=meta,
                                           implementation="kernel")
    else:
        def f(q, kv, table, lens):
            return jax_flashmla.mla_decode(q, kv, table, lens, causal=causal,
                                           implementation="kernel")
    return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _reference_fn(causal):
    return jax.jit(lambda q, kv, table, lens: jax_flashmla.mla_decode(
        q, kv, table, lens, causal=causal, implementation="reference"))


def _poison(shape, dtype):
    """Fill fresh device memory with NaN and free it, so the next allocation of this size most
    likely lands on NaN (XLA's allocator reuses freed blocks): unwritten outputs then show."""
    x = jnp.full(shape, jnp.nan, dtype)
    x.block_until_ready()
    del x


def run_kernel(case, causal, with_meta):
    b, s_q, h_q, _ = case["q"].shape
    h_kv = case["kv"].shape[2]
    _poison((b, s_q, h_q, D_V), case["q"].dtype)
    _poison((b, h_q, s_q), jnp.float32)
    if with_meta:
        meta = jax_flashmla.get_mla_metadata(case["lens"], s_q=s_q, h_q=h_q, h_kv=h_kv)
        out, lse = _kernel_fn(causal, True)(case["q"], case["kv"], case["table"], case["lens"], meta)
    else:
        out, lse = _kernel_fn(causal, False)(case["q"], case["kv"], case["table"], case["lens"])
    return np.asarray(out.astype(jnp.float32)), np.asarray(lse)


def check(out, lse, ref_out, ref_lse, dtype):
    assert not np.isnan(out).any(), "NaN in out"
    assert not np.isnan(lse).any(), "NaN in lse"
    inf = np.isinf(ref_lse)
    np.testing.assert_array_equal(lse[inf], ref_lse[inf], err_msg="lse infinities differ")
    assert np.isfinite(lse[~inf]).all(), "lse infinite where the reference is finite"
    np.testing.assert_allclose(lse[~inf], ref_lse[~inf], rtol=2e-5, atol=2e-5, err_msg="lse")
    # Rows with nothing to attend are exactly 0.
    empty = np.swapaxes(inf, 1, 2)  # [b, s_q, h_q]
    assert (out[empty] == 0).all(), "out not 0 where nothing is attended"
    rel_l2 = np.linalg.norm(out - ref_out) / max(np.linalg.norm(ref_out), 1e-30)
    bound = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    assert rel_l2 <= bound, f"out relative L2 error {rel_l2:.3g} > {bound}"
    # Elementwise: bf16 output rounding (2^-8 relative) plus the bf16 P rounding inside.
    tol = (2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -10)
    np.testing.assert_allclose(out, ref_out, rtol=4 * tol, atol=4 * tol * float(np.abs(ref_out).max()))
    return rel_l2


def _run_and_compare(seed, b, s_q, h_q, h_kv, s_k, varlen, causal, dtype, with_meta,
                     zero_frac=0.0):
    case = make_case(seed, b, s_q, h_q, h_kv, s_k, varlen, dtype, zero_frac)
    out, lse = run_kernel(case, causal, with_meta)
    ref_out, ref_lse = _reference_fn(causal)(case["q"], case["kv"], case["table"], case["lens"])
    ref_out = np.asarray(ref_out.astype(jnp.float32))
    ref_lse = np.asarray(ref_lse)
    check(out, lse, ref_out, ref_lse, dtype)
    return case, out, lse


# --- The sweep: every (h_q, h_kv) pair x s_q x causal; b, s_k, varlen, dtype and whether the
# metadata is passed rotate through their values so each appears with many of the others. --------
H_PAIRS = [(h_q, h_kv) for h_q in (1, 3, 9, 63, 64, 126, 128) for h_kv in (1, 2, 3, 8)
           if h_q % h_kv == 0]
BS = (1, 2, 6, 64)
SKS = (20, 140, 4096)
SWEEP = []
for n, ((h_q, h_kv), s_q, causal) in enumerate(itertools.product(H_PAIRS, (1, 2, 4), (False, True))):
    b = BS[n % 4]
    s_k = SKS[(n // 4) % 3]
    if b * s_k * h_kv > 64 * 4096 * 2:   # keep one case's cache under ~0.6 GB
        s_k = 140
    SWEEP.append((n, b, s_q, h_q, h_kv, s_k, bool(n % 2), causal,
                  "bf16" if (n // 2) % 2 == 0 else "fp16", n % 3 != 0))


@pytest.mark.parametrize("n,b,s_q,h_q,h_kv,s_k,varlen,causal,dtype,with_meta", SWEEP)
def test_sweep(n, b, s_q, h_q, h_kv, s_k, varlen, causal, dtype, with_meta):
    _run_and_compare(1000 + n, b, s_q, h_q, h_kv, s_k, varlen, causal,
                     jnp.bfloat16 if dtype == "bf16" else jnp.float16, with_meta)


# --- A full cross of b x s_k x varlen at the DeepSeek shape (h_q 128 / 16, h_kv 1). ---------------
@pytest.mark.parametrize("b", BS)
@pytest.mark.parametrize("s_k", SKS)
def test_batch_lengths(b, s_k):
    h_q, varlen = (128, True) if (b + s_k) % 2 else (16, False)
    _run_and_compare(7 + b * 13 + s_k + h_q, b, 1, h_q, 1, s_k, varlen, False, jnp.bfloat16, True)


@pytest.mark.parametrize("dtype", ("bf16", "fp16"))
@pytest.mark.parametrize("s_q,causal", ((1, False), (2, True)))
def test_large_batch_with_empty_sequences(dtype, s_q, causal):
    case, out, lse = _run_and_compare(
        99 + s_q, 128, s_q, 128, 1, 4096, True, causal,
        jnp.bfloat16 if dtype == "bf16" else jnp.float16, True, zero_frac=0.1)
    empty = case["np_lens"] == 0
    assert empty.any()
    assert (out[empty] == 0).all() and np.isposinf(lse[empty]).all()


def test_against_float64_oracle():
    import oracle
    for seed, (b, s_q, h_q, h_kv, s_k, causal) in enumerate(
            [(2, 1, 16, 1, 300, False), (3, 2, 6, 2, 140, True), (1, 4, 128, 1, 200, True)]):
        case = make_case(500 + seed, b, s_q, h_q, h_kv, s_k, True, jnp.bfloat16)
        out, lse = run_kernel(case, causal, True)
        kv = np.asarray(case["kv"].astype(jnp.float32))
        ref_out, ref_lse = oracle.dense_decode(
            np.asarray(case["q"].astype(jnp.float32)), kv, case["np_table"], case["np_lens"],
            scale=D_QK ** -0.5, d_v=D_V, causal=causal)
        check(out, lse, ref_out, ref_lse, jnp.bfloat16)


def test_bitwise_deterministic():
    for s_q, causal, h_q in ((1, False, 128), (2, True, 64), (1, False, 16)):
        case = make_case(4242 + s_q, 64, s_q, h_q, 1, 4096, True, jnp.bfloat16)
        a = run_kernel(case, causal, True)
        b = run_kernel(case, causal, False)
        c = run_kernel(case, causal, True)
        for x, y in ((a, b), (a, c)):
            np.testing.assert_array_equal(x[0], y[0])
            np.testing.assert_array_equal(x[1], y[1])


@pytest.mark.parametrize("b,parts", [(1, 132), (6, 33), (64, 66), (128, 132), (128, 33), (7, 1)])
def test_scheduler_kernel_matches_jax_twin(b, parts):
    rng = np.random.default_rng(b * 1000 + parts)
    lens = rng.integers(0, 20000, size=b).astype(np.int32)
    lens[::5] = 0
    want_meta, want_ns = M.numpy_schedule(lens, parts)
    num_sms = parts  # h_q 16, s_q 1, h_kv 1 -> one row block -> parts = num_sms
    got = jax.jit(lambda l: jax_flashmla.get_mla_metadata(l, h_q=16, num_sms=num_sms))(
        jnp.asarray(lens))
    twin = jax.jit(lambda l: jax_flashmla.get_mla_metadata(
        l, h_q=16, num_sms=num_sms, implementation="reference"))(jnp.asarray(lens))
    np.testing.assert_array_equal(np.asarray(got.tile_scheduler_metadata), want_meta)
    np.testing.assert_array_equal(np.asarray(got.num_splits), want_ns)
    np.testing.assert_array_equal(np.asarray(twin.tile_scheduler_metadata), want_meta)
    np.testing.assert_array_equal(np.asarray(twin.num_splits), want_ns)


def test_metadata_is_reused_across_layers_in_one_jit():
    """One schedule, several layers (different q / caches) in one jitted function."""
    b, h_q = 16, 128
    cases = [make_case(77 + i, b, 1, h_q, 1, 1000, True, jnp.bfloat16) for i in range(3)]
    lens, table = cases[0]["lens"], cases[0]["table"]

    @jax.jit
    def step(qs, kvs, table, lens):
        meta = jax_flashmla.get_mla_metadata(lens, h_q=h_q)
        return [jax_flashmla.mla_decode(q, kv, table, lens, metadata=meta, implementation="kernel")
                for q, kv in zip(qs, kvs)]

    # Same lengths and table for every layer, different q / kv contents.
    kvs = [cases[0]["kv"]] + [jax.random.normal(jax.random.PRNGKey(i), cases[0]["kv"].shape,
                                                jnp.float32).astype(jnp.bfloat16) for i in (1, 2)]
    kvs = [jnp.where(jnp.isnan(cases[0]["kv"]), jnp.nan, kv).astype(jnp.bfloat16) for kv in kvs]
    qs = [c["q"] for c in cases]
    outs = step(qs, kvs, table, lens)
    for q, kv, (out, lse) in zip(qs, kvs, outs):
        ref_out, ref_lse = _reference_fn(False)(q, kv, table, lens)
        check(np.asarray(out.astype(jnp.float32)), np.asarray(lse),
              np.asarray(ref_out.astype(jnp.float32)), np.asarray(ref_lse), jnp.bfloat16)


def test_kernel_is_in_the_compiled_module():
    case = make_case(3, 2, 1, 16, 1, 100, False, jnp.bfloat16)
    hlo = _kernel_fn(False, False).lower(case["q"], case["kv"], case["table"],
                                         case["lens"]).as_text()
    assert "jax_flashmla_dense_decode_auto" in hlo
