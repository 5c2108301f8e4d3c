"""GPU tests of dense decode run as sparse decode (jax_flashmla/ops/kernels/dense_as_sparse.py):
the dense calls the dense kernel does not read (FP8 caches in the V3.2 and V4 layouts, bf16 at
d_qk 512, page sizes other than 64, attn_sink) on the sparse decode kernel, against the pure-JAX
dense reference on the same GPU. Fresh random inputs; unused cache rows NaN (FP8: quantized from
NaN); block-table entries past each length out of range; lengths 0, negative and past the table's
capacity; a page outside the pool inside a length; causal and non-causal MTP (the latter folded
into heads where s_q * h_q <= 128); poisoned outputs; bitwise repeatability; the DeepSeek size.
Skipped cleanly unless jax sees a Hopper GPU and the extension is built."""
from __future__ import annotations

import numpy as np
import pytest

from jax_flashmla.ops.kernels import dense_as_sparse
from cases import check, dense_route_case as _case, require_kernels, run_dense_route as _run

pytestmark = pytest.mark.gpu
require_kernels()


@pytest.fixture(autouse=True)
def route_on(monkeypatch):
    monkeypatch.setenv(dense_as_sparse.ENABLE, "1")


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
