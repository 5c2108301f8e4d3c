"""The sharding rules on 2 GPUs with the kernels (docs/SHARDING.md): a sharded jit of mla_decode
equals the one-GPU kernel and the float32 reference, comes out with the expected shardings, runs
our FFI kernel on every shard and moves neither q nor the cache between GPUs.

Skipped cleanly unless jax sees >= 2 Hopper GPUs and the CUDA extension is built. Also a timing
script: ``python tests/gpu/test_sharding_gpu.py --time`` prints the per-step time of a batch split
over 2 GPUs against one GPU holding half the batch (scripts/device_sharding.sh runs both).
"""
from __future__ import annotations

import argparse
import re
import time

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flashmla

pytestmark = pytest.mark.gpu

PAGE, D_QK, D_V = 64, 576, 512
_COLLECTIVE = re.compile(
    r"\s(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)(-start)?\(")


def gpus_ready() -> tuple[bool, str]:
    try:
        devices = jax.devices()
    except RuntimeError as e:  # pragma: no cover
        return False, str(e)
    gpus = [d for d in devices if d.platform == "gpu"]
    if len(gpus) < 2:
        return False, f"jax sees {len(gpus)} GPU(s)"
    ok, why = jax_flashmla.kernels_available(gpus[0])
    return ok, why


def paged_case(seed, *, b, shards, s_q, h_q, s_k, dtype=jnp.bfloat16):
    """A pool of ``shards`` local pools (sequence i in pool i // (b / shards)), its local and
    global block tables (entries past a sequence's end out of range), lengths; q and the pool
    drawn on the default device. Rows no sequence owns are NaN."""
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.normal(s_k, s_k / 2, size=b).round(), 1, 2 * s_k).astype(np.int32)
    lens[1] = 0
    max_blocks = -(-int(lens.max()) // PAGE) + 1
    per = b // shards
    local_nb = per * max_blocks
    table = np.empty((b, max_blocks), np.int32)
    valid = np.zeros((shards * local_nb, PAGE), bool)
    for s in range(shards):
        perm = rng.permutation(local_nb)
        for j in range(per):
            i = s * per + j
            table[i] = perm[j * max_blocks:(j + 1) * max_blocks]
            n = -(-int(lens[i]) // PAGE)
            rows = s * local_nb + table[i, :n]
            valid[rows] = True
            if n:
                valid[rows[-1], lens[i] - (n - 1) * PAGE:] = False
            table[i, n:] = rng.choice([-1, local_nb, 2 ** 31 - 1], size=max_blocks - n)
    shard_of = np.repeat(np.arange(shards), per)[:, None]
    glob = np.where((table >= 0) & (table < local_nb), table + shard_of * local_nb, -1)
    kq, kk = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(kq, (b, s_q, h_q, D_QK), jnp.float32).astype(dtype)
    kv = jax.random.normal(kk, (shards * local_nb, PAGE, 1, D_QK), dtype)
    kv = jnp.where(jnp.asarray(valid)[:, :, None, None], kv, jnp.nan).astype(dtype)
    return dict(q=q, kv=kv, local=table, glob=glob.astype(np.int32), lens=lens,
                local_blocks=local_nb)


def decode_fn(causal, implementation):
    return lambda q, kv, table, lens: jax_flashmla.mla_decode(
        q, kv, table, lens, causal=causal, implementation=implementation)


def collectives(compiled):
    return [line.strip()[:160] for line in compiled.as_text().splitlines()
            if _COLLECTIVE.search(line)]


def check_close(got, want, what):
    out, lse = (np.asarray(x, np.float32) for x in got)
    ref_out, ref_lse = (np.asarray(x, np.float32) for x in want)
    assert not np.isnan(out).any() and not np.isnan(lse).any(), f"{what}: NaN"
    inf = np.isinf(ref_lse)
    np.testing.assert_array_equal(lse[inf], ref_lse[inf], err_msg=f"{what}: lse infinities")
    np.testing.assert_allclose(lse[~inf], ref_lse[~inf], rtol=2e-5, atol=2e-5,
                               err_msg=f"{what}: lse")
    err = np.linalg.norm(out - ref_out) / max(np.linalg.norm(ref_out), 1e-30)
    assert err <= 1e-2, f"{what}: out relative L2 error {err:.3g}"


@pytest.fixture(scope="module")
def mesh_axes():
    ok, why = gpus_ready()
    if not ok:
        pytest.skip(f"sharding GPU tests need 2 Hopper GPUs with the built kernels: {why}")
    return jax.devices()[:2]


@pytest.mark.parametrize("axis,pool_local,s_q,causal,with_meta", [
    ("data", False, 1, False, True),     # batch split, replicated pool, caller's schedule dropped
    ("data", True, 2, True, False),      # batch split, local pools (shard-local block ids)
    ("model", False, 1, False, True),    # heads split (h_kv = 1: the pool replicated)
])
def test_dense_decode_two_gpus(mesh_axes, axis, pool_local, s_q, causal, with_meta):
    mesh = Mesh(np.array(mesh_axes), (axis,))
    b, h_q = 16, 128
    case = paged_case(7, b=b, shards=2 if pool_local else 1, s_q=s_q, h_q=h_q, s_k=700)
    table = case["local"] if pool_local else case["glob"]
    one_gpu = jax.jit(decode_fn(causal, "kernel"))(case["q"], case["kv"], case["glob"],
                                                   case["lens"])
    reference = jax.jit(decode_fn(causal, "reference"))(case["q"], case["kv"], case["glob"],
                                                        case["lens"])

    q_spec = P("data") if axis == "data" else P(None, None, "model")
    specs = [q_spec, P("data") if pool_local else P(), P(axis) if axis == "data" else P(),
             P(axis) if axis == "data" else P()]
    args = [case["q"], case["kv"], table, case["lens"]]
    if with_meta:
        meta = jax_flashmla.get_mla_metadata(jnp.asarray(case["lens"]), s_q=s_q, h_q=h_q, h_kv=1)
        f = lambda q, kv, t, l, m0, m1: jax_flashmla.mla_decode(  # noqa: E731
            q, kv, t, l, causal=causal, metadata=jax_flashmla.MLAMetadata(m0, m1),
            implementation="kernel")
        args += list(meta)
        specs += [P(), P()]
    else:
        f = decode_fn(causal, "kernel")
    jitted = jax.jit(f, in_shardings=tuple(NamedSharding(mesh, s) for s in specs))
    compiled = jitted.lower(*args).compile()
    got = compiled(*args)

    check_close(got, one_gpu, "sharded vs one GPU")
    check_close(got, reference, "sharded vs reference")
    want_out = P("data", None, None, None) if axis == "data" else P(None, None, "model", None)
    assert got[0].sharding.is_equivalent_to(NamedSharding(mesh, want_out), 4), got[0].sharding
    hlo = compiled.as_text()
    assert collectives(compiled) == [], collectives(compiled)
    # Each shard runs our kernel, scheduling itself (the caller's schedule describes the whole
    # batch / all heads, so a split call never reads it): the per-shard scheduler's custom call
    # sits beside the kernel's, and the caller's schedule feeds nothing.
    assert re.search(r'custom_call_target="jax_flashmla_dense_decode"', hlo)
    assert len(re.findall(r'custom_call_target="jax_flashmla_mla_metadata"', hlo)) >= 1


def test_sparse_prefill_reference_two_gpus(mesh_axes):
    """Partitioning on the GPU backend of an op without a kernel yet (the reference per shard)."""
    mesh = Mesh(np.array(mesh_axes), ("model",))
    rng = np.random.default_rng(3)
    s_q, h_q, s_kv, k = 64, 32, 300, 64
    q = jnp.asarray(rng.standard_normal((s_q, h_q, D_QK)), jnp.bfloat16)
    kv = jnp.asarray(rng.standard_normal((s_kv, 1, D_QK)), jnp.bfloat16)
    idx = jnp.asarray(rng.integers(-1, s_kv, size=(s_q, 1, k)), jnp.int32)
    f = lambda q, kv, idx: jax_flashmla.sparse_mla_prefill(  # noqa: E731
        q, kv, idx, implementation="reference")
    want = jax.jit(f)(q, kv, idx)
    sh = tuple(NamedSharding(mesh, s) for s in (P(None, "model"), P(), P()))
    compiled = jax.jit(f, in_shardings=sh).lower(q, kv, idx).compile()
    got = compiled(q, kv, idx)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=1e-2, atol=1e-2)
    assert collectives(compiled) == []


# ---------------------------------------------------------------------------------------------
# Timing: python tests/gpu/test_sharding_gpu.py --time

def _time(fn, args, iters):
    jax.block_until_ready(fn(*args))
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best.append((time.perf_counter() - t0) / iters)
    return min(best)


def timing(b: int, h_q: int, s_k: int, iters: int):
    ok, why = gpus_ready()
    if not ok:
        raise SystemExit(f"timing needs 2 Hopper GPUs with the kernels: {why}")
    d0, d1 = jax.devices()[:2]
    half = b // 2
    f = decode_fn(False, "kernel")
    print(f"jax {jax.__version__}; {d0.device_kind} x2; dense decode bf16, s_q 1, h_q {h_q}, "
          f"varlen s_k ~ N({s_k}, {s_k // 2}), page {PAGE}; best of 3 x {iters} calls")
    print("| layout | batch per GPU | heads per GPU | time per step (us) | vs one GPU, same work |")
    print("|---|---|---|---|---|")

    # Data parallel: batch b over 2 GPUs, local pools; against one GPU holding the first half
    # (the same sequences and pages as GPU 0 holds).
    case = paged_case(11, b=b, shards=2, s_q=1, h_q=h_q, s_k=s_k)
    nb = case["local_blocks"]
    one = [case["q"][:half], case["kv"][:nb], case["local"][:half], case["lens"][:half]]
    t_one = _time(jax.jit(f), [jax.device_put(x, d0) for x in one], iters)
    mesh = Mesh(np.array([d0, d1]), ("data",))
    specs = (P("data"), P("data"), P("data"), P("data"))
    args = [jax.device_put(x, NamedSharding(mesh, s))
            for x, s in zip((case["q"], case["kv"], case["local"], case["lens"]), specs)]
    t_dp = _time(jax.jit(f), args, iters)
    print(f"| one GPU | {half} | {h_q} | {t_one * 1e6:.1f} | 1.00 |")
    print(f"| 2 GPUs, batch split (local pools) | {half} | {h_q} | {t_dp * 1e6:.1f} | "
          f"{t_dp / t_one:.2f} |")

    # Head parallel: all b sequences on each GPU, half the heads; against one GPU, b and h/2.
    case = paged_case(12, b=b, shards=1, s_q=1, h_q=h_q, s_k=s_k)
    one = [case["q"][:, :, :h_q // 2], case["kv"], case["glob"], case["lens"]]
    t_one_h = _time(jax.jit(f), [jax.device_put(x, d0) for x in one], iters)
    mesh = Mesh(np.array([d0, d1]), ("model",))
    specs = (P(None, None, "model"), P(), P(), P())
    args = [jax.device_put(x, NamedSharding(mesh, s))
            for x, s in zip((case["q"], case["kv"], case["glob"], case["lens"]), specs)]
    t_tp = _time(jax.jit(f), args, iters)
    print(f"| one GPU | {b} | {h_q // 2} | {t_one_h * 1e6:.1f} | 1.00 |")
    print(f"| 2 GPUs, heads split (pool replicated) | {b} | {h_q // 2} | {t_tp * 1e6:.1f} | "
          f"{t_tp / t_one_h:.2f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    if a.time:
        timing(a.batch, a.heads, a.seqlen, a.iters)
