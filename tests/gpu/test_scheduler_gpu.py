"""GPU test of the split-KV scheduler kernel (csrc/kernels/decode/scheduler.cu): the same integers
as the plain-Python algorithm (tests/oracle.py) and the pure-JAX twin, for dense and sparse
schedules."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_flashmla
import oracle
from cases import require_kernels, split_heavy_outputs

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


@pytest.mark.parametrize("b,s_q,topk,extra", [(2, 2, 2048, 1024), (64, 2, 128, 1024), (300, 1, 100, None),
                                            (7, 4, 1, 5)])
def test_sparse_schedule_kernel_weighted(b, s_q, topk, extra):
    """The scheduler kernel's schedule weighted by topk lengths (its live table) equals the twin's
    and the oracle's."""
    rng = np.random.default_rng(b + topk)
    lengths = dict(topk_length=jnp.asarray(rng.integers(-2, topk + 3, b), jnp.int32))
    if extra is not None:
        lengths["extra_topk_length"] = jnp.asarray(rng.integers(0, extra + 1, b), jnp.int32)
    lens = jnp.zeros((b,), jnp.int32)
    got = [jax_flashmla.get_mla_metadata(lens, s_q=s_q, h_q=128, topk=topk, extra_topk=extra,
                                         implementation=impl, **lengths)
           for impl in ("kernel", "reference")]
    for a, c in zip(*got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    from jax_flashmla.ops import metadata as M
    sched = got[1].schedule
    live = np.asarray(M.sparse_live(sched, lengths["topk_length"], lengths.get("extra_topk_length")))
    seqlens = np.full(b * s_q, M.sparse_positions(topk, extra), np.int32)
    want_meta, want_ns = oracle.schedule(seqlens, sched.num_parts, live=live)
    np.testing.assert_array_equal(np.asarray(got[0].tile_scheduler_metadata), want_meta)
    np.testing.assert_array_equal(np.asarray(got[0].num_splits), want_ns)


@pytest.mark.parametrize("other", ["combine1", "combine_rows", "combine_quarters"])
def test_combine_kernels_agree_bitwise(tmp_path, other):
    """The split-KV combine kernels (csrc/kernels/decode/combine.cu: the default's choice, and
    each one forced by JFM_KERNEL_VARIANT: combine1 the CTA per row, combine_rows the warp per
    row, combine_quarters the warp per quarter row) do the same arithmetic in the same order: a
    step whose sequences split into many chunks gives the same bytes in a process on each (dense
    bf16 / fp16 with empty sequences, FP8 sparse with sinks, +inf sinks and topk_length 0)."""
    here = os.path.dirname(os.path.abspath(__file__))
    mine = os.environ.get("JFM_KERNEL_VARIANT") or "ws"
    if other == mine:
        other = "ws"
    # Those steps do split: the combine runs (else this would compare nothing).
    meta = jax_flashmla.get_mla_metadata(jnp.zeros((2,), jnp.int32), s_q=2, h_q=64, topk=2048)
    assert np.diff(np.asarray(meta.num_splits)).max() > 8
    # The child allocates on demand: this process holds XLA's preallocated share of the GPU.
    env = dict(os.environ, JFM_KERNEL_VARIANT=other, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    path = str(tmp_path / "other.npz")
    code = ("import sys, numpy as np; from cases import split_heavy_outputs; "
            "np.savez(sys.argv[1], *split_heavy_outputs())")
    subprocess.run([sys.executable, "-c", code, path], env=env, check=True, cwd=str(tmp_path))
    theirs = np.load(path)
    ours = split_heavy_outputs()
    assert len(theirs.files) == len(ours)
    for i, x in enumerate(ours):
        y = theirs[f"arr_{i}"]
        assert np.isfinite(x).any(), i  # not all poison: the kernels wrote the outputs
        np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32), err_msg=f"output {i}")
