"""GPU tests of the dense SM90 decode kernel (csrc/kernels/sm90/decode/dense) against the pure-JAX
reference run on the same GPU in float32 (HIGHEST precision), plus a float64 NumPy oracle on a few
cases. Fresh random inputs per case, unused cache rows and whole unused pages full of NaN,
block-table entries past a sequence's end out of range, outputs' memory poisoned before each run
(tests/gpu/cases.py). Skipped cleanly unless jax sees a Hopper GPU and the extension is built.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_flashmla
from cases import D_V, check, compare_dense as _run_and_compare, dense_case as make_case
from cases import require_kernels, rising_dense_case, run_dense as run_kernel

pytestmark = pytest.mark.gpu
require_kernels()
D_QK = 576


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
        ref_out, ref_lse = jax.jit(lambda *a: jax_flashmla.mla_decode(
            *a, implementation="reference"))(q, kv, table, lens)
        check(np.asarray(out.astype(jnp.float32)), np.asarray(lse),
              np.asarray(ref_out.astype(jnp.float32)), np.asarray(ref_lse), jnp.bfloat16)


@pytest.mark.parametrize("h_q,s_q,causal,dtype", [(16, 1, False, jnp.bfloat16),
                                                   (64, 2, True, jnp.float16),
                                                   (128, 1, False, jnp.bfloat16),
                                                   (128, 2, True, jnp.bfloat16)])
@pytest.mark.parametrize("num_sms", (2, 12))
def test_rising_logits(h_q, s_q, causal, dtype, num_sms):
    """Keys whose logits rise page by page, by small steps and large ones (a lazily kept running
    max must move on the large ones and rescale O). Scheduled for 2 / 12 SMs, so a CTA walks long
    runs of a sequence's 32 pages, whole or split (132 parts would give each one to three)."""
    case = rising_dense_case(71 + h_q, 3, s_q, h_q, 2000, dtype)
    out, lse = run_kernel(case, causal=causal, with_meta=True, num_sms=num_sms)
    ref_out, ref_lse = run_kernel(case, causal, False, "reference")
    check(out, lse, ref_out, ref_lse, dtype)


def test_kernel_is_in_the_compiled_module():
    case = make_case(3, 2, 1, 16, 1, 100, False, jnp.bfloat16)
    hlo = jax.jit(lambda *a: jax_flashmla.mla_decode(*a, implementation="kernel")).lower(
        case["q"], case["kv"], case["table"], case["lens"]).as_text()
    # Without metadata the call schedules itself: the scheduler's custom call, then the kernel's.
    assert "jax_flashmla_mla_metadata" in hlo and "jax_flashmla_dense_decode" in hlo


def test_out_of_range_page_ids_inside_the_length_are_absent():
    """SEMANTICS.md: a page id outside [0, num_blocks) inside the length marks that page's tokens
    absent (out of the softmax, never read); lengths clamp to the table's capacity."""
    case = make_case(31, 4, 2, 16, 1, 300, True, jnp.bfloat16)
    # Finite everywhere: a length made longer than its sequence reaches rows the generator
    # poisoned. Absent pages must still not count (zero logits or another page would show).
    case["kv"] = jnp.where(jnp.isnan(case["kv"]), 0.25, case["kv"]).astype(jnp.bfloat16)
    table = np.array(case["np_table"])
    table[0, 1] = case["kv"].shape[0] + 99     # past the pool
    table[1, 0] = -7                            # negative
    table[2, :] = -1                            # every page of a sequence
    lens = np.array(case["np_lens"])
    lens[3] = table.shape[1] * 64 + 500         # beyond the table's capacity
    lens[1] = -5                                # negative: empty
    bad = dict(case, table=jnp.asarray(table), lens=jnp.asarray(lens))
    for causal in (False, True):
        out, lse = run_kernel(bad, causal, True)
        ref_out, ref_lse = run_kernel(bad, causal, False, "reference")
        check(out, lse, ref_out, ref_lse)
