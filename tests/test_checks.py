"""Checked mode (jax_flashmla/checks.py, docs/CHECKS.md): with checks on, checkify names each
malformed runtime value (op, argument, first offending row, value); with checks off (the default)
the traced program is exactly the one without the hook."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jax_flashmla as jfm
from jax_flashmla import checks as _checks

I32_MAX = 2 ** 31 - 1
BF = jnp.bfloat16


@pytest.fixture(autouse=True)
def _checks_off_around_each_test():
    jfm.enable_checks(False)
    yield
    jfm.enable_checks(False)


def _dense_args(rng, table=((1, 2), (3, 4)), lens=(16, 12), d=32):
    q = jnp.asarray(rng.standard_normal((2, 2, 4, d)), BF)
    cache = jnp.asarray(rng.standard_normal((8, 8, 1, d)), BF)
    return q, cache, jnp.asarray(table, jnp.int32), jnp.asarray(lens, jnp.int32)


def dense(q, c, t, s):
    return jfm.mla_decode(q, c, t, s, head_dim_v=32, causal=True)


def sparse(q, c, i, t, e, ei, et):
    return jfm.mla_decode(q, c, indices=i, topk_length=t, extra_kv_cache=e, extra_indices=ei,
                          extra_topk_length=et, head_dim_v=32)


def prefill(q, kv, i, t):
    return jfm.sparse_mla_prefill(q, kv, i, head_dim_v=32, topk_length=t)


def _error(fn, *args):
    """The checkify error message of jit(fn) (None when every check passes)."""
    with jfm.checks_enabled():
        err, _ = checkify.checkify(jax.jit(fn))(*args)
    return err.get()


def _assert_names(msg, *parts):
    assert msg is not None, "no error reported"
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


# --- Dense decode ---------------------------------------------------------------------------------

def test_dense_clean_inputs_pass(rng):
    # Table entries past a length may be anything; a length of exactly the capacity is fine.
    q, c, t, s = _dense_args(rng, table=((1, 2), (3, -7)), lens=(16, 8))
    assert _error(dense, q, c, t, s) is None
    q, c, t, s = _dense_args(rng, table=((99, I32_MAX), (3, 4)), lens=(0, 9))
    assert _error(dense, q, c, t, s) is None


@pytest.mark.parametrize("bad_page", [99, -7, 8, I32_MAX])
def test_dense_page_out_of_range(rng, bad_page):
    q, c, t, s = _dense_args(rng, table=((1, 2), (3, bad_page)), lens=(16, 12))
    _assert_names(_error(dense, q, c, t, s), "mla_decode: block_table: batch row 1, block 1",
                  "tokens 8..11 of its length 12", f"page id {bad_page}",
                  "outside [0, num_blocks = 8)")


def test_dense_first_offending_row_is_named(rng):
    q, c, t, s = _dense_args(rng, table=((1, 2), (99, -7)), lens=(3, 12))
    _assert_names(_error(dense, q, c, t, s), "batch row 1, block 0", "page id 99")


@pytest.mark.parametrize("length", [17, 200, I32_MAX])
def test_dense_length_beyond_capacity(rng, length):
    q, c, t, s = _dense_args(rng, lens=(5, length))
    _assert_names(_error(dense, q, c, t, s), "mla_decode: cache_seqlens: batch row 1",
                  f"is {length}", "capacity max_blocks * block_size = 2 * 8 = 16",
                  "counts as 16")


def test_dense_negative_length(rng):
    q, c, t, s = _dense_args(rng, lens=(-3, 5))
    _assert_names(_error(dense, q, c, t, s), "mla_decode: cache_seqlens: batch row 0", "is -3",
                  "negative")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_in_q(rng, value):
    q, c, t, s = _dense_args(rng)
    q = q.at[1, 1, 2, 7].set(value)
    _assert_names(_error(dense, q, c, t, s), "mla_decode: q: batch row 1",
                  f"non-finite value {float(value)}", "q[1, 1, 2, 7]")


def test_fp8_dense_cache_is_checked(rng):
    from jax_flashmla import kv_cache as kvc
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 576)), BF)
    cache = kvc.quantize_fp8(jnp.asarray(rng.standard_normal((8, 8, 1, 576)), BF))
    t = jnp.asarray([[1, 2], [3, -7]], jnp.int32)
    fn = lambda q, c, t, s: jfm.mla_decode(q, c, t, s, head_dim_v=512)
    _assert_names(_error(fn, q, cache, t, jnp.asarray([16, 9], jnp.int32)),
                  "block_table: batch row 1, block 1", "page id -7")


# --- Sparse decode --------------------------------------------------------------------------------

def _sparse_args(rng, idx=None, tl=(4, 4), extra_idx=None, etl=(2, 3)):
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 32)), BF)
    cache = jnp.asarray(rng.standard_normal((4, 8, 1, 32)), BF)      # 32 rows
    extra = jnp.asarray(rng.standard_normal((5, 2, 1, 32)), BF)      # 10 rows
    idx = np.array([[[0, 5, -1, 31]], [[1, 2, 3, 4]]], np.int32) if idx is None else idx
    extra_idx = np.array([[[0, 9, 3]], [[1, -1, 2]]], np.int32) if extra_idx is None else extra_idx
    return (q, cache, jnp.asarray(idx), jnp.asarray(tl, jnp.int32), extra, jnp.asarray(extra_idx),
            jnp.asarray(etl, jnp.int32))


def test_sparse_clean_inputs_pass(rng):
    assert _error(sparse, *_sparse_args(rng)) is None
    # Entries past topk_length may hold anything.
    idx = np.array([[[0, 5, 99, -7]], [[1, 2, 3, 4]]], np.int32)
    assert _error(sparse, *_sparse_args(rng, idx=idx, tl=(2, 4))) is None


@pytest.mark.parametrize("bad", [32, 10 ** 6, -7, -2 ** 31])
def test_sparse_index_outside_pool(rng, bad):
    idx = np.array([[[0, 5, -1, 31]], [[1, 2, bad, 4]]], np.int32)
    _assert_names(_error(sparse, *_sparse_args(rng, idx=idx)),
                  "mla_decode: indices: batch row 1, query 0, entry 2", f"is {bad}",
                  "kv_cache's num_blocks * block_size = 32")


@pytest.mark.parametrize("tl,word", [(5, "beyond indices' topk = 4"), (-1, "negative")])
def test_sparse_topk_length(rng, tl, word):
    _assert_names(_error(sparse, *_sparse_args(rng, tl=(4, tl))),
                  "mla_decode: topk_length: batch row 1", f"is {tl}", word)


def test_sparse_extra_pool(rng):
    extra_idx = np.array([[[0, 9, 10]], [[1, -1, 2]]], np.int32)
    _assert_names(_error(sparse, *_sparse_args(rng, extra_idx=extra_idx, etl=(3, 3))),
                  "mla_decode: extra_indices: batch row 0, query 0, entry 2", "is 10",
                  "extra_kv_cache's num_blocks * block_size = 10")
    _assert_names(_error(sparse, *_sparse_args(rng, etl=(I32_MAX, 3))),
                  "mla_decode: extra_topk_length: batch row 0", f"is {I32_MAX}")


# --- Sparse prefill -------------------------------------------------------------------------------

def _prefill_args(rng, idx=None, tl=(3, 3, 3)):
    q = jnp.asarray(rng.standard_normal((3, 4, 32)), BF)
    kv = jnp.asarray(rng.standard_normal((10, 1, 32)), BF)
    idx = np.array([[[0, 1, 9]], [[2, -1, 3]], [[4, 5, 6]]], np.int32) if idx is None else idx
    return q, kv, jnp.asarray(idx), jnp.asarray(tl, jnp.int32)


def test_prefill(rng):
    assert _error(prefill, *_prefill_args(rng)) is None
    idx = np.array([[[0, 1, 9]], [[2, -1, 3]], [[4, 10, 6]]], np.int32)
    _assert_names(_error(prefill, *_prefill_args(rng, idx=idx)),
                  "sparse_mla_prefill: indices: query row 2, kv head 0, entry 1", "is 10",
                  "s_kv = 10")
    assert _error(prefill, *_prefill_args(rng, idx=idx, tl=(3, 3, 1))) is None
    _assert_names(_error(prefill, *_prefill_args(rng, tl=(3, 4, 3))),
                  "sparse_mla_prefill: topk_length: query row 1", "is 4", "topk = 3")
    q, kv, i, t = _prefill_args(rng)
    _assert_names(_error(prefill, q.at[2, 1, 0].set(jnp.nan), kv, i, t),
                  "sparse_mla_prefill: q: query row 2", "nan", "q[2, 1, 0]")


# --- Transformations ------------------------------------------------------------------------------

def test_vmap_inside_and_outside_checkify(rng):
    q, c, t, s = _dense_args(rng)
    stack = lambda x, y: jnp.stack([x, y])
    args = (stack(q, q), stack(c, c), stack(t, t.at[0, 1].set(99)), stack(s, s))
    with jfm.checks_enabled():
        err, _ = checkify.checkify(jax.jit(jax.vmap(dense)))(*args)
        _assert_names(err.get(), "block_table: batch row 0, block 1", "page id 99")
        err, _ = jax.jit(jax.vmap(checkify.checkify(dense)))(*args)
        _assert_names(err.get(), "at mapped index 1", "block_table: batch row 0, block 1")
        err, _ = checkify.checkify(jax.jit(jax.vmap(dense)))(*args[:2], stack(t, t), args[3])
        assert err.get() is None


def test_results_unchanged_with_checks_on(rng):
    q, c, t, s = _dense_args(rng, table=((1, 99), (3, 4)), lens=(200, 12))
    want = jax.jit(dense)(q, c, t, s)
    with jfm.checks_enabled():
        err, got = checkify.checkify(jax.jit(dense))(q, c, t, s)
    assert err.get() is not None
    for x, y in zip(got, want):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_eager_call_raises_at_once(rng):
    q, c, t, s = _dense_args(rng, lens=(5, 99))
    with jfm.checks_enabled():
        with pytest.raises(Exception, match="cache_seqlens: batch row 1 is 99"):
            dense(q, c, t, s)


def test_switch_is_part_of_the_jit_cache_key(rng):
    """A function jitted with checks off is re-traced when they are turned on (and back)."""
    q, c, t, s = _dense_args(rng, lens=(5, 99))
    fn = jax.jit(dense)
    fn(q, c, t, s)                                 # traced with checks off
    jfm.enable_checks(True)
    assert jfm.checks.is_enabled()
    err, _ = checkify.checkify(fn)(q, c, t, s)
    _assert_names(err.get(), "cache_seqlens: batch row 1 is 99")
    jfm.enable_checks(False)
    assert "check" not in str(jax.make_jaxpr(fn)(q, c, t, s))


# --- Off means free -------------------------------------------------------------------------------

def _no_hook(monkeypatch):
    monkeypatch.setattr(_checks, "check_mla_decode", lambda operands: None)
    monkeypatch.setattr(_checks, "check_sparse_mla_prefill", lambda operands: None)


def test_off_by_default_and_the_environment_variable():
    env = {k: v for k, v in os.environ.items() if k != "JAX_FLASHMLA_CHECKS"}
    code = "import jax_flashmla as j; print(j.checks.is_enabled())"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_FLASHMLA_CHECKS="1"),
                       capture_output=True, text=True)
    assert r.stdout.strip() == "True", r.stdout + r.stderr


def test_checks_off_compile_to_the_program_without_the_hook(rng, monkeypatch):
    """With checks off, the jaxpr and the compiled HLO of every mode equal those of the ops with
    the hook removed (what they were before checked mode existed); with checks on they differ."""
    cases = [(dense, _dense_args(rng)), (sparse, _sparse_args(rng)),
             (prefill, _prefill_args(rng))]
    off = [(str(jax.make_jaxpr(f)(*a)), jax.jit(f).lower(*a).compile().as_text())
           for f, a in cases]
    with jfm.checks_enabled():
        on = [str(jax.make_jaxpr(f)(*a)) for f, a in cases]
    with monkeypatch.context() as m:
        _no_hook(m)
        before = [(str(jax.make_jaxpr(f)(*a)), jax.jit(f).lower(*a).compile().as_text())
                  for f, a in cases]
    for (jaxpr_off, hlo_off), (jaxpr_before, hlo_before), jaxpr_on in zip(off, before, on):
        assert jaxpr_off == jaxpr_before
        assert hlo_off == hlo_before
        assert "check" not in jaxpr_off
        assert jaxpr_on != jaxpr_before and "check" in jaxpr_on


# --- shard_map (2 CPU devices, in a fresh interpreter: the device count is fixed at start) --------

SHARD_MAP_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import checkify
    from jax.sharding import PartitionSpec as P, NamedSharding, AxisType
    import jax_flashmla as jfm

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 1, 4, 32)), jnp.bfloat16)
    cache = jnp.asarray(rng.standard_normal((8, 8, 1, 32)), jnp.bfloat16)
    table = jnp.asarray([[1, 2], [3, 4], [5, 6], [7, 0]], jnp.int32)
    lens = jnp.asarray([16, 12, 3, 9], jnp.int32)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
    f = lambda q, c, t, s: jfm.mla_decode(q, c, t, s, head_dim_v=32)
    local = jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P(), P("data"), P("data")),
                          out_specs=(P("data"), P("data")))
    with jfm.checks_enabled():
        for fn in (local, f):         # inside a shard_map; a sharded jit of the op itself
            step = checkify.checkify(jax.jit(fn))
            put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
            args = (put(q, P("data")), put(cache, P()), put(table, P("data")), put(lens, P("data")))
            err, _ = step(*args)
            assert err.get() is None, err.get()
            err, _ = step(args[0], args[1], put(table.at[3, 1].set(-7), P("data")), args[3])
            print("ERR", err.get())
""")


def test_checks_inside_shard_map():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    errs = [line for line in r.stdout.splitlines() if line.startswith("ERR")]
    assert len(errs) == 2, r.stdout
    # In the shard_map, shard 1 holds global rows 2..3: its local row 1 is global row 3.
    assert "at mapped index 1" in errs[0] and "block_table: batch row 1, block 1" in errs[0]
    assert "page id -7" in errs[0]
    assert "block_table: batch row 3, block 1" in errs[1] and "page id -7" in errs[1]
