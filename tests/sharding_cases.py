"""Every op under a sharded jax.jit on 8 CPU devices: sharded results equal unsharded ones, outputs
come out with the expected shardings, and the compiled HLO moves neither q nor a KV cache between
devices (docs/SHARDING.md). Run through tests/test_sharding.py, which sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 in a fresh interpreter.

Page pools are either replicated (block ids / rows global) or sharded on their rows over the
batch's mesh axis, each shard's block table / indices naming rows of its own local pool; the
unsharded run that a local-pool run must equal uses the same pool with ids shifted by
shard * local_blocks (and ids invalid locally made -1).
"""
from __future__ import annotations

import contextlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flashmla as jfm
from jax_flashmla import kv_cache as kvc
from jax_flashmla.ops.decode import DecodeConfig, mla_decode_p
from conftest import assert_close

if jax.device_count() < 8:
    raise RuntimeError("tests/sharding_cases.py needs XLA_FLAGS="
                       "--xla_force_host_platform_device_count=8: run it through "
                       "tests/test_sharding.py")

MESHES = {"8": ((8,), ("data",)), "2x4": ((2, 4), ("data", "model")),
          "4x2": ((4, 2), ("data", "model"))}
BF16 = jnp.bfloat16
PRINT_HLO = False
_COLLECTIVE = re.compile(
    r"\s(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)(-start)?\(")


def make_mesh(name) -> Mesh:
    shape, axes = MESHES[name]
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), axes)


def spec(mesh, *entries) -> P:
    """A PartitionSpec keeping only the axes this mesh has (a (8,) 'data' mesh drops 'model')."""
    return P(*(e if e in mesh.axis_names else None for e in entries))


def collectives(compiled) -> list[str]:
    if PRINT_HLO:
        print("\n".join(line.strip()[:160] for line in compiled.as_text().splitlines()
                        if _COLLECTIVE.search(line)))
    return [line.strip()[:200] for line in compiled.as_text().splitlines()
            if _COLLECTIVE.search(line)]


def run_sharded(fn, mesh, args, specs):
    """(results of jit(fn) with these input shardings, compiled executable)."""
    shardings = tuple(None if s is None else NamedSharding(mesh, s) for s in specs)
    jitted = jax.jit(fn, in_shardings=shardings)
    compiled = jitted.lower(*args).compile()
    return compiled(*args), compiled


def assert_sharding(x, mesh, expected: P):
    want = NamedSharding(mesh, expected)
    assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)


# ---------------------------------------------------------------------------------------------
# Random inputs.

def paged(rng, *, b, shards, max_blocks, bs, h_kv, d, fp8, extra_blocks=2):
    """A page pool made of ``shards`` local pools, sequence i living in local pool
    i // (b / shards). Returns (pool, local block table, global block table, seqlens); unused
    blocks and rows past a sequence's end are NaN, table entries past the end garbage."""
    per = b // shards
    local_nb = per * max_blocks + extra_blocks
    seqlens = rng.integers(1, max_blocks * bs + 1, size=b).astype(np.int32)
    seqlens[1] = 0
    x = rng.standard_normal((shards * local_nb, bs, h_kv, d)).astype(np.float32)
    table = np.empty((b, max_blocks), np.int32)
    owned = np.zeros(shards * local_nb, bool)
    for s in range(shards):
        perm = rng.permutation(local_nb)
        for j in range(per):
            i = s * per + j
            table[i] = perm[j * max_blocks:(j + 1) * max_blocks]
            n = -(-int(seqlens[i]) // bs)
            owned[s * local_nb + table[i, :n]] = True
            if n:
                x[s * local_nb + table[i, n - 1], seqlens[i] - (n - 1) * bs:] = np.nan
            table[i, n:] = rng.choice([-7, 10 ** 6, local_nb], size=max_blocks - n)
    x[~owned] = np.nan
    shard_of = np.repeat(np.arange(shards), per)
    global_table = np.where((table >= 0) & (table < local_nb),
                            table + (shard_of * local_nb)[:, None], -1).astype(np.int32)
    pool = kvc.quantize_fp8(jnp.asarray(x, BF16)) if fp8 else jnp.asarray(x, BF16)
    return pool, table, global_table, seqlens


def sparse_rows(rng, *, b, s_q, k, shards, local_rows):
    """Local flat rows (with -1 and out-of-range entries) and their global twins."""
    idx = rng.integers(0, local_rows, size=(b, s_q, k)).astype(np.int32)
    idx[rng.random(idx.shape) < 0.2] = -1
    idx[rng.random(idx.shape) < 0.05] = local_rows + 3
    idx[0, 0] = -1
    shard_of = np.repeat(np.arange(shards), b // shards)[:, None, None]
    glob = np.where((idx >= 0) & (idx < local_rows), idx + shard_of * local_rows, -1)
    return idx, glob.astype(np.int32)


def random_pool(rng, nb, bs, d, fp8):
    x = rng.standard_normal((nb, bs, 1, d)).astype(np.float32)
    return kvc.quantize_fp8(jnp.asarray(x, BF16)) if fp8 else jnp.asarray(x, BF16)


def q_of(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), BF16)


def check_equal(got, want):
    assert_close(got[0], want[0], rel=1e-2, what="out")
    for g, w in zip(got[1:], want[1:]):
        assert_close(g, w, rel=1e-5, what="lse / max_logits")


# ---------------------------------------------------------------------------------------------
# Supported shardings: no collective at all, expected output shardings.

@pytest.mark.parametrize("mesh_name", MESHES)
def test_dense_replicated_pool_causal_with_metadata(rng, mesh_name):
    mesh = make_mesh(mesh_name)
    b, s_q, h_q = 8, 2, 16
    pool, _, table, lens = paged(rng, b=b, shards=1, max_blocks=5, bs=16, h_kv=1, d=576,
                                 fp8=False)
    q = q_of(rng, b, s_q, h_q, 576)
    meta = jfm.get_mla_metadata(jnp.asarray(lens), s_q=s_q, h_q=h_q, h_kv=1, causal=True)

    def f(q, pool, table, lens, tiles, splits):
        return jfm.mla_decode(q, pool, table, lens, causal=True,
                              metadata=jfm.MLAMetadata(tiles, splits))

    args = (q, pool, table, lens, *meta)
    want = jax.jit(f)(*args)
    got, compiled = run_sharded(f, mesh, args, (spec(mesh, "data", None, "model"), P(),
                                                spec(mesh, "data"), spec(mesh, "data"), P(), P()))
    check_equal(got, want)
    assert_sharding(got[0], mesh, spec(mesh, "data", None, "model", None))
    assert_sharding(got[1], mesh, spec(mesh, "data", "model", None))
    assert collectives(compiled) == []


@pytest.mark.parametrize("mesh_name", MESHES)
def test_dense_fp8_local_pools_with_sink(rng, mesh_name):
    """The pool sharded on 'data' with the batch: block ids are shard-local."""
    mesh = make_mesh(mesh_name)
    shards = mesh.shape["data"]
    b, s_q, h_q = 8, 1, 16
    pool, local, glob, lens = paged(rng, b=b, shards=shards, max_blocks=4, bs=16, h_kv=1,
                                    d=576, fp8=True)
    q = q_of(rng, b, s_q, h_q, 576)
    sink = jnp.asarray(rng.standard_normal(h_q), jnp.float32)

    def f(q, pool, table, lens, sink):
        return jfm.mla_decode(q, pool, table, lens, attn_sink=sink)

    want = jax.jit(f)(q, pool, glob, lens, sink)
    got, compiled = run_sharded(f, mesh, (q, pool, local, lens, sink),
                                (spec(mesh, "data", None, "model"), P("data"), P("data"),
                                 P("data"), spec(mesh, "model")))
    check_equal(got, want)
    assert_sharding(got[0], mesh, spec(mesh, "data", None, "model", None))
    assert_sharding(got[1], mesh, spec(mesh, "data", "model", None))
    assert collectives(compiled) == []
    # The convention is load-bearing: read as global ids the same call gives other numbers.
    if mesh_name == "2x4":
        as_global = jax.jit(f)(q, pool, local, lens, sink)
        assert not np.allclose(np.asarray(as_global[1]), np.asarray(want[1]), equal_nan=True)


@pytest.mark.parametrize("mesh_name", MESHES)
def test_sparse_two_pools_v4_fp8(rng, mesh_name):
    """DeepSeek-V4 sparse decode: a local (batch-sharded) window pool and a replicated second
    pool, topk lengths, attention sink sharded with the heads."""
    mesh = make_mesh(mesh_name)
    shards = mesh.shape["data"]
    b, s_q, h_q, d, k, xk = 8, 2, 16, 512, 20, 12
    main = random_pool(rng, shards * 3, 16, d, fp8=True)
    extra = random_pool(rng, 7, 4, d, fp8=True)
    local_idx, glob_idx = sparse_rows(rng, b=b, s_q=s_q, k=k, shards=shards, local_rows=48)
    xidx, _ = sparse_rows(rng, b=b, s_q=s_q, k=xk, shards=1, local_rows=28)
    tl = rng.integers(0, k + 1, size=b).astype(np.int32)
    xtl = rng.integers(0, xk + 1, size=b).astype(np.int32)
    q = q_of(rng, b, s_q, h_q, d)
    sink = jnp.asarray(rng.standard_normal(h_q), jnp.float32)

    def f(q, main, idx, tl, sink, extra, xidx, xtl):
        return jfm.mla_decode(q, main, indices=idx, topk_length=tl, attn_sink=sink,
                              extra_kv_cache=extra, extra_indices=xidx, extra_topk_length=xtl)

    want = jax.jit(f)(q, main, glob_idx, tl, sink, extra, xidx, xtl)
    got, compiled = run_sharded(
        f, mesh, (q, main, local_idx, tl, sink, extra, xidx, xtl),
        (spec(mesh, "data", None, "model"), P("data"), P("data"), P("data"), spec(mesh, "model"),
         P(), P("data"), P("data")))
    check_equal(got, want)
    assert_sharding(got[0], mesh, spec(mesh, "data", None, "model", None))
    assert_sharding(got[1], mesh, spec(mesh, "data", "model", None))
    assert collectives(compiled) == []


@pytest.mark.parametrize("mesh_name", MESHES)
def test_sparse_prefill_tokens_and_heads(rng, mesh_name):
    mesh = make_mesh(mesh_name)
    s_q, h_q, d, s_kv, k = 32, 16, 576, 150, 24
    q = q_of(rng, s_q, h_q, d)
    kv = jnp.asarray(rng.standard_normal((s_kv, 1, d)), BF16)
    idx = rng.integers(-2, s_kv + 3, size=(s_q, 1, k)).astype(np.int32)
    tl = rng.integers(0, k + 1, size=s_q).astype(np.int32)
    sink = jnp.asarray(rng.standard_normal(h_q), jnp.float32)

    def f(q, kv, idx, sink, tl):
        return jfm.sparse_mla_prefill(q, kv, idx, attn_sink=sink, topk_length=tl)

    args = (q, kv, idx, sink, tl)
    want = jax.jit(f)(*args)
    got, compiled = run_sharded(f, mesh, args, (spec(mesh, "data", "model"), P(), P("data"),
                                                spec(mesh, "model"), P("data")))
    check_equal(got, want)
    for x, ndim_spec in zip(got, (spec(mesh, "data", "model", None), spec(mesh, "data", "model"),
                                  spec(mesh, "data", "model"))):
        assert_sharding(x, mesh, ndim_spec)
    assert collectives(compiled) == []


def test_dense_kv_heads_shard_with_query_heads(rng):
    """h_kv = 2 on a model axis of 2: each device holds one KV head and its 8 query heads."""
    mesh = make_mesh("4x2")
    b, s_q, h_q = 8, 2, 16
    pool, _, table, lens = paged(rng, b=b, shards=1, max_blocks=3, bs=16, h_kv=2, d=576,
                                 fp8=False)
    q = q_of(rng, b, s_q, h_q, 576)
    f = lambda q, pool, table, lens: jfm.mla_decode(q, pool, table, lens)  # noqa: E731
    want = jax.jit(f)(q, pool, table, lens)
    got, compiled = run_sharded(f, mesh, (q, pool, table, lens),
                                (P("data", None, "model"), P(None, None, "model"), P("data"),
                                 P("data")))
    check_equal(got, want)
    assert_sharding(got[0], mesh, P("data", None, "model", None))
    assert collectives(compiled) == []


def test_vmap_under_sharding(rng):
    """vmap folds into the batch, then the batch-sharded partition applies."""
    mesh = make_mesh("2x4")
    v, b, s_q, h_q = 2, 4, 1, 16
    pool, _, table, lens = paged(rng, b=v * b, shards=1, max_blocks=3, bs=16, h_kv=1, d=576,
                                 fp8=False)
    q = q_of(rng, v, b, s_q, h_q, 576)
    table, lens = table.reshape(v, b, -1), lens.reshape(v, b)
    f = jax.vmap(lambda q, pool, table, lens: jfm.mla_decode(q, pool, table, lens),
                 in_axes=(0, None, 0, 0))
    want = jax.jit(f)(q, pool, table, lens)
    got, compiled = run_sharded(f, mesh, (q, pool, table, lens),
                                (P("data", None, None, "model"), P(), P("data"), P("data")))
    check_equal(got, want)
    assert_sharding(got[0], mesh, P("data", None, None, "model", None))
    assert collectives(compiled) == []


def test_gspmd_callbacks(rng):
    """The same partitioning with jax's GSPMD propagation (infer_sharding_from_operands)."""
    if not hasattr(jax.config, "jax_use_shardy_partitioner"):
        pytest.skip("this jax has no GSPMD propagation left (jax_use_shardy_partitioner gone)")
    mesh = make_mesh("2x4")
    b, s_q, h_q = 8, 2, 16
    pool, local, glob, lens = paged(rng, b=b, shards=2, max_blocks=3, bs=16, h_kv=1, d=576,
                                    fp8=False)
    q = q_of(rng, b, s_q, h_q, 576)
    f = lambda q, pool, table, lens: jfm.mla_decode(q, pool, table, lens)  # noqa: E731
    want = jax.jit(f)(q, pool, glob, lens)
    before = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        got, compiled = run_sharded(f, mesh, (q, pool, local, lens),
                                    (P("data", None, "model"), P("data"), P("data"), P("data")))
    finally:
        jax.config.update("jax_use_shardy_partitioner", before)
    check_equal(got, want)
    assert_sharding(got[0], mesh, P("data", None, "model", None))
    assert collectives(compiled) == []


def test_metadata_computed_inside_the_step(rng):
    """The model's path: get_mla_metadata inside the jitted step on batch-sharded lengths. The
    schedule is dropped by the split calls; nothing moves q or the cache."""
    mesh = make_mesh("2x4")
    b, s_q, h_q = 8, 1, 16
    pool, local, glob, lens = paged(rng, b=b, shards=2, max_blocks=3, bs=16, h_kv=1, d=576,
                                    fp8=False)
    q = q_of(rng, b, s_q, h_q, 576)

    def f(q, pool, table, lens):
        meta = jfm.get_mla_metadata(lens, s_q=s_q, h_q=h_q, h_kv=1)
        return jfm.mla_decode(q, pool, table, lens, metadata=meta)

    want = jax.jit(f)(q, pool, glob, lens)
    got, compiled = run_sharded(f, mesh, (q, pool, local, lens),
                                (P("data", None, "model"), P("data"), P("data"), P("data")))
    check_equal(got, want)
    # (Gathering the lengths to schedule would be fine; rows of q or of the cache (last axis
    # 576) would not, in whatever dtype XLA moves them.)
    moved = [c for c in collectives(compiled) if re.search(r"[\[,]576\]", c)]
    assert moved == [], moved


def test_split_calls_drop_the_schedule():
    """A batch- or head-split shard's call binds no metadata; an unsplit one keeps it."""
    mesh = make_mesh("2x4")
    b, s_q, h_q = 8, 1, 16
    present = ("q", "kv_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata",
               "num_splits")
    config = DecodeConfig(mode="dense", head_dim_v=512, softmax_scale=0.1, causal=False,
                          kv_format="bf16", implementation=None, present=present)
    shapes = [((b, s_q, h_q, 576), BF16), ((20, 16, 1, 576), BF16), ((b, 3), jnp.int32),
              ((b,), jnp.int32), ((7, 8), jnp.int32), ((b + 1,), jnp.int32)]
    results = [((b, s_q, h_q, 512), BF16), ((b, h_q, s_q), jnp.float32)]
    cp = mla_decode_p.partitioned

    def shard_call(q_spec):
        specs = [q_spec, P(), P(), P(), P(), P()]
        args = [jax.ShapeDtypeStruct(s, t, sharding=NamedSharding(mesh, sp))
                for (s, t), sp in zip(shapes, specs)]
        outs = [jax.ShapeDtypeStruct(s, t, sharding=NamedSharding(mesh, P())) for s, t in results]
        _, body, _, arg_shardings = cp.partition(config, mesh, args, outs)
        local = [jax.ShapeDtypeStruct(sh.shard_shape(s), t)
                 for (s, t), sh in zip(shapes, arg_shardings)]
        jaxpr = jax.make_jaxpr(body)(*local)
        (eqn,) = [e for e in jaxpr.eqns if e.primitive is mla_decode_p.inner]
        return eqn.params["config"].present

    assert shard_call(P()) == present
    for q_spec in (P("data"), P(None, None, "model")):
        assert shard_call(q_spec) == present[:4]


# ---------------------------------------------------------------------------------------------
# Shardings the kernels cannot use: turned into ones they can, visibly.

def test_reshard_sharded_head_dim_gathers_q(rng):
    mesh = make_mesh("2x4")
    b, s_q, h_q = 8, 1, 16
    pool, _, table, lens = paged(rng, b=b, shards=1, max_blocks=3, bs=16, h_kv=1, d=576,
                                 fp8=False)
    q = q_of(rng, b, s_q, h_q, 576)
    f = lambda q, pool, table, lens: jfm.mla_decode(q, pool, table, lens)  # noqa: E731
    want = jax.jit(f)(q, pool, table, lens)
    got, compiled = run_sharded(f, mesh, (q, pool, table, lens),
                                (P("data", None, None, "model"), P(), P("data"), P("data")))
    check_equal(got, want)
    assert_sharding(got[0], mesh, P("data", None, None, None))
    gathers = [c for c in collectives(compiled) if "all-gather" in c or "all-to-all" in c]
    assert gathers and all("576]" in c for c in gathers), collectives(compiled)


def test_reshard_kv_heads_that_cannot_follow(rng):
    """h_kv = 2 over a model axis of 4: the heads are gathered (replicated), batch stays split."""
    mesh = make_mesh("2x4")
    b, s_q, h_q = 8, 1, 16
    pool, _, table, lens = paged(rng, b=b, shards=1, max_blocks=3, bs=16, h_kv=2, d=576,
                                 fp8=False)
    q = q_of(rng, b, s_q, h_q, 576)
    f = lambda q, pool, table, lens: jfm.mla_decode(q, pool, table, lens)  # noqa: E731
    want = jax.jit(f)(q, pool, table, lens)
    got, compiled = run_sharded(f, mesh, (q, pool, table, lens),
                                (P("data", None, "model"), P(), P("data"), P("data")))
    check_equal(got, want)
    # The call ran on whole heads; Shardy's propagated result sharding (heads on 'model') is
    # then sliced out of it locally.
    gathers = [c for c in collectives(compiled) if "all-gather" in c]
    assert gathers and all("576]" in c for c in gathers), collectives(compiled)


def test_reshard_prefill_kv_rows_are_gathered(rng):
    mesh = make_mesh("2x4")
    s_q, h_q, d, s_kv, k = 16, 8, 576, 64, 8
    q = q_of(rng, s_q, h_q, d)
    kv = jnp.asarray(rng.standard_normal((s_kv, 1, d)), BF16)
    idx = rng.integers(-1, s_kv, size=(s_q, 1, k)).astype(np.int32)
    f = lambda q, kv, idx: jfm.sparse_mla_prefill(q, kv, idx)  # noqa: E731
    want = jax.jit(f)(q, kv, idx)
    got, compiled = run_sharded(f, mesh, (q, kv, idx), (P(None, "model"), P("data"), P()))
    check_equal(got, want)
    assert_sharding(got[0], mesh, P(None, "model", None))
    gathers = [c for c in collectives(compiled) if "all-gather" in c]
    assert gathers and all(f"[{s_kv},1,{d}]" in c for c in gathers), collectives(compiled)


def test_pools_on_different_axes_are_refused(rng):
    mesh = make_mesh("2x4")
    b, s_q, h_q, d = 8, 1, 8, 512
    main = random_pool(rng, 8, 16, d, fp8=False)
    extra = random_pool(rng, 8, 4, d, fp8=False)
    idx = jnp.zeros((b, s_q, 4), jnp.int32)
    q = q_of(rng, b, s_q, h_q, d)
    f = lambda q, main, idx, extra: jfm.mla_decode(  # noqa: E731
        q, main, indices=idx, extra_kv_cache=extra, extra_indices=idx)
    with pytest.raises(Exception, match="page pools are sharded on different mesh axes"):
        run_sharded(f, mesh, (q, main, idx, extra), (P("data"), P("data"), P("data"), P("model")))


# ---------------------------------------------------------------------------------------------
# Meshes with Explicit axis types.

def _explicit_mesh():
    return jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def test_explicit_mesh_shard_map_recipe(rng):
    """docs/SHARDING.md's recipe for Explicit meshes: call the op inside jax.shard_map, where it
    sees its local blocks (local pools included) and runs on one device's worth."""
    mesh = _explicit_mesh()
    b, s_q, h_q = 8, 2, 16
    pool, local, glob, lens = paged(rng, b=b, shards=2, max_blocks=3, bs=16, h_kv=1, d=576,
                                    fp8=False)
    q = q_of(rng, b, s_q, h_q, 576)
    f = lambda q, pool, table, lens: jfm.mla_decode(q, pool, table, lens)  # noqa: E731
    want = jax.jit(f)(q, pool, glob, lens)
    in_specs = (P("data", None, "model"), P("data"), P("data"), P("data"))
    step = jax.shard_map(f, mesh=mesh, in_specs=in_specs,
                         out_specs=(P("data", None, "model"), P("data", "model")))
    args = [jax.device_put(a, NamedSharding(mesh, s))
            for a, s in zip((q, pool, local, lens), in_specs)]
    with jax.set_mesh(mesh):
        compiled = jax.jit(step).lower(*args).compile()
        got = compiled(*args)
    check_equal(got, want)
    assert_sharding(got[0], mesh, P("data", None, "model", None))
    assert collectives(compiled) == []


def test_explicit_mesh_direct_call(rng):
    """Called straight on an Explicit mesh, the result's type carries the partitioner's
    sharding (jax issue 34811 concerns custom_partitioning there: docs/SHARDING.md)."""
    mesh = _explicit_mesh()
    b, s_q, h_q = 8, 1, 16
    pool, _, table, lens = paged(rng, b=b, shards=1, max_blocks=3, bs=16, h_kv=1, d=576,
                                 fp8=False)
    q = q_of(rng, b, s_q, h_q, 576)
    f = lambda q, pool, table, lens: jfm.mla_decode(q, pool, table, lens)  # noqa: E731
    want = jax.jit(f)(q, pool, table, lens)
    specs = (P("data", None, "model"), P(), P("data"), P("data"))
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((q, pool, table, lens), specs)]
    with jax.set_mesh(mesh):
        typed = jax.eval_shape(f, *args)
        compiled = jax.jit(f).lower(*args).compile()
        got = compiled(*args)
    assert typed[0].sharding.spec == P("data", None, "model", None)
    check_equal(got, want)
    assert got[0].sharding.spec == P("data", None, "model", None)
    assert collectives(compiled) == []
    # Without a context mesh (the mesh comes from the arguments' types), and under vmap.
    check_equal(jax.jit(f)(*args), want)
    batched = jax.jit(jax.vmap(f, in_axes=(0, None, None, None)))
    got2 = batched(jnp.stack([args[0], args[0] * 2]), *args[1:])
    check_equal((got2[0][1], got2[1][1]), jax.jit(f)(q * 2, pool, table, lens))


def test_example_sharded_attention_layer(monkeypatch, capsys):
    """examples/sharded_attention.py: a DeepSeek-style layer on a (2, 4) mesh equals the same
    layer on one device, and its only collective is W_O's all-reduce over 'model'."""
    import os
    import runpy
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "sharded_attention.py")
    monkeypatch.setattr("sys.argv", [path, "--heads", "8", "--seqlen", "120"])
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert "collectives in the compiled step: ['all-reduce']" in out, out
    assert "pools equal: True" in out, out


@pytest.mark.parametrize("h_kv", [2, 8])
def test_cache_computed_in_the_step_with_kv_heads(rng, h_kv):
    """A cache produced inside the jitted step (its sharding left to propagation) with h_kv > 1
    and the heads on 'model' (4): with h_kv 8 the KV heads follow the query heads (no collective);
    with h_kv 2 they cannot, and the call runs on whole heads. Either way Shardy must not hand the
    partitioner a sub-axis sharding of the KV heads (jax cannot read those back)."""
    mesh = make_mesh("2x4")
    b, s_q, h_q = 8, 1, 16
    pool, _, table, lens = paged(rng, b=b, shards=1, max_blocks=3, bs=16, h_kv=h_kv, d=576,
                                 fp8=False)
    q = q_of(rng, b, s_q, h_q, 576)
    f = lambda q, pool, table, lens: jfm.mla_decode(q, pool * 2, table, lens)  # noqa: E731
    want = jax.jit(f)(q, pool, table, lens)
    got, compiled = run_sharded(f, mesh, (q, pool, table, lens),
                                (P("data", None, "model"), None, P("data"), P("data")))
    check_equal(got, want)
    if h_kv == 8:
        assert collectives(compiled) == []


def test_unnameable_sharding_is_gathered_not_fatal(rng):
    """q = (x @ W).reshape(..., 2 heads, d) with W's columns on a 4-device axis: Shardy splits
    'model' into sub-axes across heads and d, which jax cannot name with mesh axes. The call
    reads such an operand as replicated (gathers it) instead of failing to compile."""
    mesh = make_mesh("2x4")
    b, h_q = 8, 2
    pool, _, table, lens = paged(rng, b=b, shards=1, max_blocks=3, bs=16, h_kv=1, d=576,
                                 fp8=False)
    # Small integers (w scaled by 1/8) keep every product and partial sum exact in bf16, so the
    # sharded matmul's other summation order gives the very same q and the results can match
    # to 1e-5 (random normals put q one bf16 ulp apart and the lse 1.6e-5 apart).
    x = jnp.asarray(rng.integers(-1, 2, (b, 64)), BF16)
    w = jnp.asarray(rng.integers(-1, 2, (64, h_q * 576)) / 8, BF16)

    def f(x, w, pool, table, lens):
        q = (x @ w).reshape(b, 1, h_q, 576)
        return jfm.mla_decode(q, pool, table, lens)

    want = jax.jit(f)(x, w, pool, table, lens)
    got, _ = run_sharded(f, mesh, (x, w, pool, table, lens),
                         (P("data"), P(None, "model"), P(), P("data"), P("data")))
    check_equal(got, want)


def test_shard_map_over_data_only(rng):
    """Inside a shard_map manual over 'data' only (local pools by construction), with the heads
    sharded on the automatic 'model' axis: custom_partitioning sees shardings of one manual
    group there, so the call runs replicated over 'model' (q gathered) -- correct, documented,
    and never the process abort that naming them with the whole mesh caused."""
    mesh = make_mesh("2x4")
    b, s_q, h_q = 8, 1, 16
    pool, local, glob, lens = paged(rng, b=b, shards=2, max_blocks=3, bs=16, h_kv=1, d=576,
                                    fp8=False)
    q = q_of(rng, b, s_q, h_q, 576)
    want = jax.jit(lambda *a: jfm.mla_decode(*a))(q, pool, glob, lens)

    def local_step(q, pool, table, lens):
        q = jax.lax.with_sharding_constraint(q, P(None, None, "model"))
        return jfm.mla_decode(q, pool, table, lens)

    step = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(P("data"),) * 4,
                                 out_specs=(P("data"), P("data")), axis_names={"data"}))
    for legacy_mesh_context in (True, False):   # only the legacy `with mesh:` names the mesh
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with mesh if legacy_mesh_context else contextlib.nullcontext():
                compiled = step.lower(q, pool, local, lens).compile()
        got = compiled(q, pool, local, lens)
        check_equal(got, want)
        gathers = [c for c in collectives(compiled) if "all-gather" in c]
        assert all("576]" in c for c in gathers), gathers


# ---------------------------------------------------------------------------------------------
# jax.export of sharded steps (jax_flashmla/exporting.py; single-device forms: tests/test_export.py).

def test_export_shard_map_step_round_trip(rng):
    """A batch- and head-sharded step written with shard_map (local pools) exports for 8
    devices, serializes, and its deserialized artifact gives the unsharded results."""
    pytest.importorskip("flatbuffers")
    mesh = make_mesh("2x4")
    b, s_q, h_q = 8, 1, 16
    pool, local, glob, lens = paged(rng, b=b, shards=2, max_blocks=3, bs=16, h_kv=1, d=576,
                                    fp8=True)
    q = q_of(rng, b, s_q, h_q, 576)
    want = jax.jit(lambda *a: jfm.mla_decode(*a))(q, pool, glob, lens)
    specs = (P("data", None, "model"), P("data"), P("data"), P("data"))
    step = jax.jit(jax.shard_map(lambda *a: jfm.mla_decode(*a), mesh=mesh, in_specs=specs,
                                 out_specs=(P("data", None, "model"), P("data", "model"))))
    args = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip((q, pool, local, lens), specs)]
    exported = jfm.export(step)(*args)
    assert exported.nr_devices == 8
    got = jfm.deserialize(exported.serialize()).call(*args)
    check_equal(got, want)


def test_export_sharded_jit_names_shard_map(rng):
    """Under a sharded jit the ops partition through custom_partitioning, whose Python
    callbacks jax cannot serialize: jfm.export says so and points to shard_map."""
    mesh = make_mesh("8")
    b, h_q = 8, 16
    pool, _, table, lens = paged(rng, b=b, shards=1, max_blocks=2, bs=16, h_kv=1, d=576,
                                 fp8=False)
    q = q_of(rng, b, 1, h_q, 576)
    step = jax.jit(lambda *a: jfm.mla_decode(*a),
                   in_shardings=tuple(NamedSharding(mesh, s)
                                      for s in (P("data"), P(), P("data"), P("data"))))
    with pytest.raises(ValueError, match="inside jax.shard_map"):
        jfm.export(step)(q, pool, table, lens)


def test_export_explicit_mesh_direct_call(rng):
    """On an Explicit mesh the op partitions at trace time (shard_map, no callbacks), so the
    direct call exports as it is and its artifact keeps the output sharding."""
    pytest.importorskip("flatbuffers")
    mesh = _explicit_mesh()
    pool, _, table, lens = paged(rng, b=8, shards=1, max_blocks=3, bs=16, h_kv=1, d=576,
                                 fp8=False)
    q = q_of(rng, 8, 1, 16, 576)
    f = lambda q, pool, table, lens: jfm.mla_decode(q, pool, table, lens)  # noqa: E731
    want = jax.jit(f)(q, pool, table, lens)
    specs = (P("data", None, "model"), P(), P("data"), P("data"))
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((q, pool, table, lens), specs)]
    with jax.set_mesh(mesh):
        exported = jfm.export(jax.jit(f))(*args)
        got = jfm.deserialize(exported.serialize()).call(*args)
    assert exported.nr_devices == 8
    check_equal(got, want)
    assert got[0].sharding.spec == P("data", None, "model", None)
