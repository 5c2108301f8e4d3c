"""GPU tests of dense decode run as sparse decode (jax_flashmla/ops/kernels/dense_as_sparse.py):
the dense calls the dense kernel does not read (FP8 caches in the V3.2 and V4 layouts, bf16 at
d_qk 512, page sizes other than 64, attn_sink) on the sparse decode kernel, against the pure-JAX
dense reference on the same GPU. Fresh random inputs; unused cache rows NaN (FP8: quantized from
NaN); block-table entries past each length out of range; lengths 0, negative and past the table's
capacity; a page outside the pool inside a length; causal and non-causal MTP (the latter folded
into heads where s_q * h_q <= 128); poisoned outputs; bitwise repeatability; the DeepSeek size.
Skipped cleanly unless jax sees a Hopper GPU and the extension is built."""
from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_flashmla
from jax_flashmla import kv_cache as kvc
from jax_flashmla.ops.kernels import dense_as_sparse
from cases import D_V, check, paged_table, poison, require_kernels

pytestmark = pytest.mark.gpu
require_kernels()


@pytest.fixture(autouse=True)
def route_on(monkeypatch):
    monkeypatch.setenv(dense_as_sparse.ENABLE, "1")


def _case(seed, *, b, s_q, h_q, d_qk, fp8, page, s_k, sink):
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.normal(s_k, s_k / 2, size=b).round(), 1, 2 * s_k).astype(np.int64)
    lens[0] = 0
    if b > 2:
        lens[1] = min(int(lens[1]), s_q - 1)          # shorter than the causal window
    if b > 3:
        lens[3] = max(page, lens[3] // page * page)   # whole pages: its length is set past them
    table, used = paged_table(rng, lens, page)
    num_blocks, max_blocks = used.shape[0], table.shape[1]
    nblk = -(-lens // page)
    seqlens = lens.astype(np.int32)
    if b > 3:
        seqlens[2] = -5                                  # negative: empty
        seqlens[3] = max_blocks * page + 100             # past the capacity: clamped (tail absent)
    if b > 4 and nblk[4] > 1:
        table[4, 0] = num_blocks + 11                    # a page outside the pool inside L
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = jax.random.normal(kq, (b, s_q, h_q, d_qk), jnp.float32).astype(jnp.bfloat16)
    kv = jax.random.normal(kk, (num_blocks, page, 1, d_qk), jnp.float32)
    kv = jnp.where(jnp.asarray(used)[:, :, None, None], kv, jnp.nan).astype(jnp.bfloat16)
    if fp8:
        kv = kvc.quantize_fp8(kv)
    sinks = None
    if sink:
        sinks = jax.random.normal(jax.random.PRNGKey(seed + 1), (h_q,), jnp.float32)
        sinks = sinks.at[0].set(jnp.inf)
    return q, kv, jnp.asarray(table), jnp.asarray(seqlens), sinks


@functools.lru_cache(maxsize=None)
def _fn(causal, sink, with_meta, implementation):
    def f(q, kv, table, lens, sinks, meta):
        return jax_flashmla.mla_decode(q, kv, table, lens, causal=causal, attn_sink=sinks,
                                       metadata=meta, implementation=implementation)
    return jax.jit(f)


def _run(case, causal, implementation="kernel", with_meta=False):
    q, kv, table, lens, sinks = case
    b, s_q, h_q, _ = q.shape
    poison((b, s_q, h_q, D_V), q.dtype)
    poison((b, h_q, s_q), jnp.float32)
    meta = jax_flashmla.get_mla_metadata(lens, s_q=s_q, h_q=h_q) if with_meta else None
    out, lse = _fn(causal, sinks is not None, with_meta, implementation)(q, kv, table, lens, sinks,
                                                                         meta)
    return np.asarray(out.astype(jnp.float32)), np.asarray(lse)


CASES = [
    # (b, s_q, h_q, d_qk, fp8, page, s_k, causal, sink)
    (6, 1, 16, 576, True, 64, 300, False, False),
    (6, 2, 128, 576, True, 61, 700, True, True),
    (5, 3, 16, 512, True, 256, 900, False, True),      # folded: 48 heads
    (6, 4, 8, 512, True, 2, 150, True, False),
    (8, 1, 1, 576, True, 64, 2100, False, True),
    (6, 2, 100, 512, True, 64, 500, False, False),     # 200 heads: not folded
    (6, 1, 64, 512, False, 64, 1000, False, True),     # bf16 V4 width
    (6, 2, 32, 576, False, 61, 400, True, False),      # bf16, page 61
]


@pytest.mark.parametrize("n,case", list(enumerate(CASES)))
def test_against_reference(n, case):
    b, s_q, h_q, d_qk, fp8, page, s_k, causal, sink = case
    c = _case(500 + n, b=b, s_q=s_q, h_q=h_q, d_qk=d_qk, fp8=fp8, page=page, s_k=s_k, sink=sink)
    ref_out, ref_lse = _run(c, causal, "reference")
    # without metadata, and with a dense schedule: reused where each sparse sequence is one query
    # token (s_q 1, folded MTP), else replaced by the call's own
    for with_meta in (False, True):
        out, lse = _run(c, causal, with_meta=with_meta)
        check(out, lse, ref_out, ref_lse)
        assert np.isposinf(lse[0]).all() and (out[0] == 0).all()


@pytest.mark.parametrize("d_qk", [576, 512])
def test_deepseek_size_bitwise_repeatable(d_qk):
    """b 64, 128 heads, ~4K-token contexts of an FP8 cache, s_q 1, the step's dense schedule
    reused; twice, to the bit."""
    c = _case(42 + d_qk, b=64, s_q=1, h_q=128, d_qk=d_qk, fp8=True, page=64, s_k=4096,
              sink=False)
    a = _run(c, False, with_meta=True)
    again = _run(c, False, with_meta=True)
    np.testing.assert_array_equal(a[0], again[0])
    np.testing.assert_array_equal(a[1], again[1])
    check(*a, *_run(c, False, "reference"))
