"""GPU tests of the sparse decode kernel (csrc/kernels/sm90/decode/sparse) against the pure-JAX
reference on the same GPU: FP8 V3.2 (d_qk 576) and V4 (d_qk 512) layouts and bf16 caches; one or
two pools; h_q 1..128; s_q 1..4; topk 1..2048; page sizes 2..256; runs of -1, out-of-range and
duplicate indices, all-invalid lists, topk_length 0 and beyond topk, sinks including +inf;
NaN-poisoned rows that only invalid or excluded positions name; poisoned outputs; bitwise
repeatability. Skipped cleanly unless jax sees a Hopper GPU and the extension is built."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_flashmla
from cases import check, require_kernels, rising_sparse_decode_case, run_sparse_decode
from cases import sparse_decode_case

pytestmark = pytest.mark.gpu
require_kernels()

HQ = (1, 8, 16, 32, 64, 100, 128)
TOPK = (1, 64, 100, 512, 2048)
PAGES = (2, 61, 64, 256)
LAYOUTS = (("fp8", 576), ("fp8", 512), ("bf16", 576), ("bf16", 512))
SWEEP = []
for n, (h_q, topk) in enumerate(itertools.product(HQ, TOPK)):
    fmt, d_qk = LAYOUTS[n % 4]
    s_q = 1 + n % 4
    b = (1, 3, 8)[n % 3] if topk < 2048 else 2
    page = PAGES[(n // 2) % 4]
    two = n % 3 == 1
    SWEEP.append((n, b, s_q, h_q, d_qk, fmt, topk, page,
                  (topk // 2 + 1) if two else None, PAGES[(n + 1) % 4] if two else None,
                  n % 2 == 0, (None, "random", "inf")[n % 3]))


@pytest.mark.parametrize("n,b,s_q,h_q,d_qk,fmt,topk,page,extra_topk,extra_page,lengths,sink", SWEEP)
def test_sweep(n, b, s_q, h_q, d_qk, fmt, topk, page, extra_topk, extra_page, lengths, sink):
    q, kv, args = sparse_decode_case(3000 + n, b=b, s_q=s_q, h_q=h_q, d_qk=d_qk, fmt=fmt,
                                     topk=topk, page=page, extra_topk=extra_topk,
                                     extra_page=extra_page, with_lengths=lengths, sink=sink)
    out, lse = run_sparse_decode(q, kv, args, with_meta=n % 2 == 1)
    ref_out, ref_lse = run_sparse_decode(q, kv, args, implementation="reference", with_meta=False)
    check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("fmt,d_qk,h_q", [("fp8", 576, 128), ("fp8", 512, 64), ("fp8", 512, 128)])
def test_deepseek_shapes_and_bitwise_repeatable(fmt, d_qk, h_q):
    """V3.2: h_q 128, topk 2048, s_q 2; V4: window page 256 + compressed pool page 64, at 64 heads
    and at 128 (where the step's 320 tiles make the default run CTA pairs: sparse/dispatch.cu)."""
    extra = dict(extra_topk=512, extra_page=64) if d_qk == 512 else {}
    q, kv, args = sparse_decode_case(77, b=16, s_q=2, h_q=h_q, d_qk=d_qk,
                                     fmt=fmt, topk=2048 if d_qk == 576 else 128,
                                     page=64 if d_qk == 576 else 256, with_lengths=True,
                                     sink="random" if d_qk == 512 else None, **extra)
    # The op's own schedule (no metadata) weighs the parts by the call's lengths; metadata made
    # from the same lengths is the same schedule, so the results must agree to the bit.
    lengths = {k: args[k] for k in ("topk_length", "extra_topk_length") if args.get(k) is not None}
    a = run_sparse_decode(q, kv, args, meta_lengths=lengths)
    b = run_sparse_decode(q, kv, args, with_meta=False)
    c = run_sparse_decode(q, kv, args, meta_lengths=lengths)
    for x, y in ((a, b), (a, c)):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[1], y[1])
    ref = run_sparse_decode(q, kv, args, implementation="reference", with_meta=False)
    check(*a, *ref)


# Shapes the default runs as CTA pairs (V4 FP8 at 65-128 heads with at least 4 tiles per schedule
# part: sparse/dispatch.cu), with the sweep's hazards: odd head counts, s_q up to 4, pages 2 / 61 /
# 256, topk 1, topk_length (0 and beyond topk), +inf sinks, one pool and two.
PAIR_DEFAULT = [
    (0, 24, 1, 128, 190, 61, 700, 2, True, "inf"),
    (1, 16, 4, 100, 64, 2, 257, 64, False, "random"),
    (2, 40, 2, 72, 300, 64, None, None, True, None),
    (3, 8, 3, 128, 1, 256, 1500, 61, True, "inf"),
]


@pytest.mark.parametrize("n,b,s_q,h_q,topk,page,extra_topk,extra_page,lengths,sink", PAIR_DEFAULT)
def test_v4_pairs_by_default(n, b, s_q, h_q, topk, page, extra_topk, extra_page, lengths, sink):
    from jax_flashmla import _ffi
    from jax_flashmla.ops import metadata as M
    ext = _ffi.extension()
    if ext.kernel_variant() == "ws":  # (other variants pick their own kernels)
        choice = ext.sparse_kernel_choice("fp8_v4", b, s_q, h_q, topk, extra_topk or 0,
                                          M.num_sm_parts(rows_per_kv_head=h_q))
        assert choice == "pair", choice
    q, kv, args = sparse_decode_case(5000 + n, b=b, s_q=s_q, h_q=h_q, d_qk=512, fmt="fp8",
                                     topk=topk, page=page, extra_topk=extra_topk,
                                     extra_page=extra_page, with_lengths=lengths, sink=sink)
    out, lse = run_sparse_decode(q, kv, args, with_meta=n % 2 == 0)
    ref_out, ref_lse = run_sparse_decode(q, kv, args, implementation="reference", with_meta=False)
    check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("fmt,d_qk,h_q,b,s_q", [("fp8", 512, 128, 16, 2), ("fp8", 576, 64, 9, 1),
                                                 ("bf16", 576, 16, 5, 3)])
def test_schedule_weighted_by_lengths(fmt, d_qk, h_q, b, s_q):
    """A schedule weighted by topk_length / extra_topk_length (get_mla_metadata) matches the
    reference, whether made from the call's own lengths or from others (any schedule covers every
    position; the lengths only spread the work)."""
    q, kv, args = sparse_decode_case(77 + h_q, b=b, s_q=s_q, h_q=h_q, d_qk=d_qk, fmt=fmt, topk=512,
                                     page=64, extra_topk=1024, extra_page=2, with_lengths=True,
                                     sink="random")
    ref_out, ref_lse = run_sparse_decode(q, kv, args, implementation="reference", with_meta=False)
    own = dict(topk_length=args["topk_length"], extra_topk_length=args["extra_topk_length"])
    rng = np.random.default_rng(5)
    other = dict(topk_length=jnp.asarray(rng.integers(0, 513, b), jnp.int32),
                 extra_topk_length=jnp.asarray(rng.integers(0, 1025, b), jnp.int32))
    for lengths in (own, other, dict(extra_topk_length=own["extra_topk_length"])):
        out, lse = run_sparse_decode(q, kv, args, meta_lengths=lengths)
        check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("d_qk,h_q,s_q", [(576, 16, 2), (512, 16, 1), (576, 128, 2), (512, 64, 1)])
@pytest.mark.parametrize("num_sms", (4, 8))
def test_rising_logits(d_qk, h_q, s_q, num_sms):
    """FP8 rows whose logits rise tile by tile, by small steps and large ones (a lazily kept
    running max must move on the large ones and rescale O). Scheduled for 4 / 8 SMs: every CTA
    then walks 10 / 5 tiles of a token (132 parts would give each one tile, nothing to move)."""
    q, kv, args = rising_sparse_decode_case(61 + h_q, b=2, s_q=s_q, h_q=h_q, d_qk=d_qk, topk=640)
    out, lse = run_sparse_decode(q, kv, args, num_sms=num_sms)
    r_out, r_lse = run_sparse_decode(q, kv, args, implementation="reference")
    check(out, lse, r_out, r_lse)


def test_kernel_is_in_the_compiled_module():
    q, kv, args = sparse_decode_case(5, b=2, s_q=1, h_q=16, d_qk=576, fmt="fp8", topk=64, page=64)
    hlo = jax.jit(lambda q, kv, i: jax_flashmla.mla_decode(q, kv, indices=i,
                                                           implementation="kernel")).lower(
        q, kv, args["indices"]).as_text()
    assert "jax_flashmla_sparse_decode" in hlo and "jax_flashmla_mla_metadata" in hlo


def test_the_requested_kernel_variant_runs():
    """JFM_KERNEL_VARIANT=v1 / pair / combine1 / combine_rows / combine_quarters / v4load16 / v4load8 /
    direct_out (scripts/device_check.sh, stage gpu-alt)
    must reach the extension: otherwise that stage would test the default kernels again."""
    require_kernels()
    from jax_flashmla import _ffi
    asked = os.environ.get("JFM_KERNEL_VARIANT")
    want = asked if asked in ("v1", "pair", "combine1", "combine_rows", "combine_quarters",
                              "v4load16", "v4load8", "direct_out") else "ws"
    assert _ffi.extension().kernel_variant() == want


def test_large_pool_64bit_addressing():
    """A V3.2 pool over 2^31 bytes (3.3M tokens of 656 bytes): rows past 2^31 / 656 are read with
    64-bit offsets."""
    rng = np.random.default_rng(9)
    rows = 3_300_000
    d_qk = 576
    small = jnp.asarray(rng.standard_normal((64, 1, 1, d_qk)), jnp.bfloat16)
    from jax_flashmla import kv_cache as kvc
    packed = kvc.quantize_fp8(small).reshape(64, 656)
    pool = jnp.zeros((rows, 656), jnp.uint8).at[rows - 64:].set(packed).reshape(rows // 50, 50, 1, 656)
    idx = jnp.asarray(rng.integers(rows - 64, rows, size=(2, 1, 96)), jnp.int32)
    q = jnp.asarray(rng.standard_normal((2, 1, 32, d_qk)), jnp.bfloat16)
    args = dict(indices=idx)
    out, lse = run_sparse_decode(q, pool, args)
    ref_out, ref_lse = run_sparse_decode(q, pool, args, implementation="reference", with_meta=False)
    check(out, lse, ref_out, ref_lse)
