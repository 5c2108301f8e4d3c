"""GPU tests of the sparse prefill kernel (the sparse attention kernel without a schedule) against
the pure-JAX reference on the same GPU: d_qk 576 and 512; h_q 1..128; topk 1..2048; s_q 1..4096;
invalid and duplicate indices, all-invalid rows, topk_length including 0, sinks including +inf,
NaN-poisoned kv rows that no counted index names; out, max_logits and lse; vmap folded into one
launch. Skipped cleanly unless jax sees a Hopper GPU and the extension is built."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_flashmla
from cases import check, require_kernels, rising_prefill_case, run_sparse_prefill, sparse_prefill_case

pytestmark = pytest.mark.gpu
require_kernels()

SWEEP = []
for n, (h_q, topk) in enumerate(itertools.product((1, 16, 32, 64, 128), (1, 64, 100, 512, 2048))):
    s_q = (1, 7, 130, 1000)[n % 4] if topk < 2048 else (1, 64)[n % 2]
    SWEEP.append((n, s_q, h_q, (576, 512)[n % 2], topk, n % 2 == 0, (None, "random", "inf")[n % 3]))


@pytest.mark.parametrize("n,s_q,h_q,d_qk,topk,lengths,sink", SWEEP)
def test_sweep(n, s_q, h_q, d_qk, topk, lengths, sink):
    q, kv, idx, kw = sparse_prefill_case(4000 + n, s_q=s_q, h_q=h_q, d_qk=d_qk, topk=topk,
                                         with_lengths=lengths, sink=sink)
    out, ml, lse = run_sparse_prefill(q, kv, idx, kw)
    r_out, r_ml, r_lse = run_sparse_prefill(q, kv, idx, kw, "reference")
    check(out, lse, r_out, r_lse, max_logits=ml, ref_max_logits=r_ml)


def test_long_prompt():
    q, kv, idx, kw = sparse_prefill_case(11, s_q=4096, h_q=64, d_qk=512, topk=512, s_kv=8192,
                                         sink="random")
    out, ml, lse = run_sparse_prefill(q, kv, idx, kw)
    r_out, r_ml, r_lse = run_sparse_prefill(q, kv, idx, kw, "reference")
    check(out, lse, r_out, r_lse, max_logits=ml, ref_max_logits=r_ml)


@pytest.mark.parametrize("h_q,d_qk", [(48, 512), (72, 576)])
def test_partly_padded_row_block(h_q, d_qk):
    """Head counts that leave a 64-row block partly padded, in the role split (33-128 heads): its
    output leaves by TMA boxes of 64 heads (JFM_SPARSE_TMA_OUT), which must write the heads that
    exist and nothing of the next token's rows."""
    q, kv, idx, kw = sparse_prefill_case(70 + h_q, s_q=37, h_q=h_q, d_qk=d_qk, topk=192,
                                         with_lengths=True, sink="random")
    out, ml, lse = run_sparse_prefill(q, kv, idx, kw)
    r_out, r_ml, r_lse = run_sparse_prefill(q, kv, idx, kw, "reference")
    check(out, lse, r_out, r_lse, max_logits=ml, ref_max_logits=r_ml)


@pytest.mark.parametrize("h_q,d_qk,topk", [(16, 576, 640), (32, 512, 640), (64, 512, 640),
                                            (128, 576, 640), (100, 576, 130)])
def test_rising_logits(h_q, d_qk, topk):
    """Logits that rise tile by tile, by small steps and large ones: a running max kept lazily
    (the 16-row kernels' default, the role split's JFM_WS_ROWS_LAZY_MAX) must move on the large
    ones and rescale O, and max_logits must be the true maximum."""
    q, kv, idx, kw = rising_prefill_case(31 + h_q, s_q=3, h_q=h_q, d_qk=d_qk, topk=topk)
    out, ml, lse = run_sparse_prefill(q, kv, idx, kw)
    r_out, r_ml, r_lse = run_sparse_prefill(q, kv, idx, kw, "reference")
    check(out, lse, r_out, r_lse, max_logits=ml, ref_max_logits=r_ml)


def test_vmap_is_one_launch():
    qs, kvs, idxs = [], [], []
    for i in range(3):
        q, kv, idx, _ = sparse_prefill_case(50 + i, s_q=33, h_q=16, d_qk=576, topk=100)
        qs.append(q), kvs.append(kv), idxs.append(idx)
    q, kv, idx = jnp.stack(qs), jnp.stack(kvs), jnp.stack(idxs)
    f = jax.jit(jax.vmap(lambda q, kv, i: jax_flashmla.sparse_mla_prefill(
        q, kv, i, implementation="kernel")))
    hlo = f.lower(q, kv, idx).as_text()
    assert hlo.count("jax_flashmla_sparse_prefill") == 1
    out, ml, lse = f(q, kv, idx)
    for i in range(3):
        r = jax.jit(lambda q, kv, i: jax_flashmla.sparse_mla_prefill(
            q, kv, i, implementation="reference"))(qs[i], kvs[i], idxs[i])
        check(np.asarray(out[i].astype(jnp.float32)), np.asarray(lse[i]),
              np.asarray(r[0].astype(jnp.float32)), np.asarray(r[2]),
              max_logits=np.asarray(ml[i]), ref_max_logits=np.asarray(r[1]))


def test_kv_over_2gib_64bit_addressing():
    """A kv buffer over 2^31 bytes (1.9M tokens of 1152 bytes): rows past 2^31 / 1152 are read
    with 64-bit offsets. Every row no index names is NaN, so a wrapped offset shows up as NaN."""
    rng = np.random.default_rng(17)
    s_kv, d_qk, n_live = 1_900_000, 576, 128
    live = jnp.asarray(rng.standard_normal((2 * n_live, 1, d_qk)), jnp.bfloat16)
    kv = (jnp.full((s_kv, 1, d_qk), jnp.nan, jnp.bfloat16)
          .at[:n_live].set(live[:n_live]).at[s_kv - n_live:].set(live[n_live:]))
    live_rows = np.concatenate([np.arange(n_live), np.arange(s_kv - n_live, s_kv)])
    idx = rng.choice(live_rows, size=(5, 1, 200)).astype(np.int64)
    idx[:, :, ::9] = rng.choice(np.array([-1, s_kv, s_kv + 4, 2 ** 31 - 1]), size=idx[:, :, ::9].shape)
    idx = jnp.asarray(idx, jnp.int32)
    q = jnp.asarray(rng.standard_normal((5, 32, d_qk)), jnp.bfloat16)
    out, ml, lse = run_sparse_prefill(q, kv, idx, {})
    r_out, r_ml, r_lse = run_sparse_prefill(q, kv, idx, {}, "reference")
    check(out, lse, r_out, r_lse, max_logits=ml, ref_max_logits=r_ml)
