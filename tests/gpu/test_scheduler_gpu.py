"""GPU test of the split-KV scheduler kernel (csrc/kernels/decode/scheduler.cu): the same integers
as the plain-Python algorithm (tests/oracle.py) and the pure-JAX twin, for dense and sparse
schedules."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_flashmla
import oracle
from cases import require_kernels

pytestmark = pytest.mark.gpu
require_kernels()


@pytest.mark.parametrize("b,parts", [(1, 132), (6, 33), (64, 66), (128, 132), (128, 33), (7, 1),
                                     (5000, 132)])
def test_scheduler_kernel_matches_oracle_and_twin(b, parts):
    rng = np.random.default_rng(b * 1000 + parts)
    lens = rng.integers(-3, 20000, size=b).astype(np.int32)
    lens[::5] = 0
    want_meta, want_ns = oracle.schedule(lens, parts)
    for implementation in ("kernel", "reference"):
        got = jax.jit(lambda l: jax_flashmla.get_mla_metadata(
            l, h_q=16, num_sms=parts, implementation=implementation))(jnp.asarray(lens))
        np.testing.assert_array_equal(np.asarray(got.tile_scheduler_metadata), want_meta)
        np.testing.assert_array_equal(np.asarray(got.num_splits), want_ns)


@pytest.mark.parametrize("b,s_q,topk,extra", [(2, 2, 2048, None), (64, 1, 100, 70), (3, 4, 1, 5)])
def test_sparse_schedule_kernel(b, s_q, topk, extra):
    lens = jnp.zeros((b,), jnp.int32)
    kernel = jax_flashmla.get_mla_metadata(lens, s_q=s_q, h_q=128, topk=topk, extra_topk=extra,
                                           implementation="kernel")
    twin = jax_flashmla.get_mla_metadata(lens, s_q=s_q, h_q=128, topk=topk, extra_topk=extra,
                                         implementation="reference")
    for a, c in zip(kernel, twin):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
