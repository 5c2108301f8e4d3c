"""Sharded MLA decode across processes (hosts): jax.distributed, one global mesh, sharded jit.

Start one copy per host (or per GPU), each with the same coordinator and process count:

    python examples/multihost_decode.py --coordinator HOST0:12345 --num-processes 2 --process-id 0
    python examples/multihost_decode.py --coordinator HOST0:12345 --num-processes 2 --process-id 1

(or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; under SLURM or Open MPI,
jax's cluster detection finds all three). One process without a coordinator runs without
jax.distributed.

The mesh is ("data", "model") over every process's devices, process by process. Layouts:

  data             batch, block tables, lengths and the page pool split over all devices
                   ("data"); each device's share of the pool is a local pool and its block
                   table holds local block ids, so each process holds (and allocates pages in)
                   only its own pools.
  data-replicated  batch, tables and lengths split as in data, the pool replicated: every
                   process holds the whole pool; block ids are global.
  heads            query heads split over all devices ("model"); every process holds the whole
                   pool, batch, block tables (global block ids) and lengths, only its heads of q.
  hybrid           data over processes, heads over each process's own devices: each process
                   holds one local pool and its sequences; its devices split the heads.

Each process makes only its own share of q, pool, table and lengths (numpy, seeded per pool
group, so no process generates another's pages) and assembles the global arrays with
``jax.make_array_from_process_local_data``. The step (the split-KV schedule from
``get_mla_metadata`` and ``mla_decode``, as a DeepSeek layer calls them) runs under one jit over
the whole mesh. Each process then checks the shards it holds against the same step run on one of
its own devices over the whole inputs (regenerated from the seed, block ids made global), checks
that the compiled step moves neither q nor the cache nor out between devices (it has no
collective at all on CPU), and prints the per-step times. Exit status 0 = passed.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flashmla as jfm

LAYOUTS = ("data", "data-replicated", "heads", "hybrid")
PAGE, D_QK, D_V = 64, 576, 512
_COLLECTIVE = re.compile(
    r"\s(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)(-start)?\(")


def parse_args(argv=None):
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coordinator", default=env("JAX_COORDINATOR_ADDRESS"),
                    help="host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
    ap.add_argument("--num-processes", type=int, default=_int(env("JAX_NUM_PROCESSES")),
                    help="(env JAX_NUM_PROCESSES)")
    ap.add_argument("--process-id", type=int, default=_int(env("JAX_PROCESS_ID")),
                    help="(env JAX_PROCESS_ID)")
    ap.add_argument("--local-device-ids", default=None,
                    help="comma-separated GPU ids this process uses (default: all it sees)")
    ap.add_argument("--layout", action="append", choices=LAYOUTS,
                    help="repeatable; default: all four")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256, help="mean cache length")
    ap.add_argument("--s-q", type=int, default=1, help="query tokens per sequence (causal)")
    ap.add_argument("--iters", type=int, default=10, help="timed steps")
    ap.add_argument("--implementation", default="auto", choices=("auto", "kernel", "reference"),
                    help="auto: the CUDA kernel where it runs, else the pure-JAX reference")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def _int(s):
    return None if s in (None, "") else int(s)


def start_distributed(args):
    """jax.distributed.initialize with what the flags / environment give (jax detects SLURM and
    Open MPI itself); a single process without a coordinator skips it."""
    if args.num_processes in (None, 1) and args.coordinator is None:
        if not os.environ.get("SLURM_JOB_ID") and not os.environ.get("OMPI_COMM_WORLD_SIZE"):
            return
    # A computation over the CPU devices of several processes needs jax's CPU collectives, even
    # one without any collective (None: "Multiprocess computations aren't implemented on the CPU
    # backend"). gloo is jax 0.10's default; set it anyway. GPU devices ignore it.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:   # a jax without the option
        pass
    ids = None
    if args.local_device_ids:
        ids = [int(i) for i in args.local_device_ids.split(",")]
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id,
                               local_device_ids=ids, initialization_timeout=120)


# ---------------------------------------------------------------------------------------------
# Inputs: G pool groups (one per data shard), each generated from its own seed, so a process
# makes only the groups it holds.

class Inputs:
    """The decode inputs of one run, made group by group (group g: sequences g*per .. (g+1)*per-1,
    their pages in local pool g, their block tables with local ids)."""

    def __init__(self, seed, *, batch, groups, heads, s_q, seqlen):
        self.seed, self.b, self.groups, self.h, self.s_q = seed, batch, groups, heads, s_q
        self.per = batch // groups
        self.max_blocks = -(-(2 * seqlen) // PAGE)
        self.local_blocks = self.per * self.max_blocks + 1   # one page nobody owns
        self.seqlen = seqlen
        self._cache = {}

    def shapes(self):
        return dict(q=(self.b, self.s_q, self.h, D_QK),
                    pool=(self.groups * self.local_blocks, PAGE, 1, D_QK),
                    table=(self.b, self.max_blocks), lens=(self.b,))

    def group(self, g):
        if g in self._cache:
            return self._cache[g]
        rng = np.random.default_rng([self.seed, g])
        lens = np.clip(rng.normal(self.seqlen, self.seqlen / 2, self.per).round(),
                       self.s_q, self.max_blocks * PAGE).astype(np.int32)
        perm = rng.permutation(self.local_blocks)
        table = perm[:self.per * self.max_blocks].reshape(self.per, self.max_blocks)
        pool = rng.standard_normal((self.local_blocks, PAGE, 1, D_QK), np.float32)
        owned = np.zeros(self.local_blocks, bool)
        for i, n in enumerate(-(-lens // PAGE)):
            owned[table[i, :n]] = True
            table[i, n:] = -1                      # past the end: never read
        pool[~owned] = np.nan                      # pages no sequence owns: reading one shows
        q = rng.standard_normal((self.per, self.s_q, self.h, D_QK), np.float32)
        self._cache[g] = dict(q=q, pool=pool, table=table.astype(np.int32), lens=lens)
        return self._cache[g]

    def share(self, name, index):
        """Block ``index`` (a tuple of slices) of global array ``name``, made from the groups
        its rows touch only. Block ids stay group-local."""
        rows = self.local_blocks if name == "pool" else self.per
        start = index[0].start or 0
        stop = index[0].stop if index[0].stop is not None else self.groups * rows
        g0, g1 = start // rows, -(-stop // rows)
        part = np.concatenate([self.group(g)[name] for g in range(g0, g1)])
        return part[(slice(start - g0 * rows, stop - g0 * rows), *index[1:])]

    def whole(self, global_ids):
        """The global arrays (every group); with ``global_ids`` block ids made global
        (group g's id i -> g * local_blocks + i), as one device holding every pool sees them."""
        full = {k: self.share(k, (slice(None),)) for k in ("q", "pool", "table", "lens")}
        if global_ids:
            shift = (np.arange(self.b) // self.per * self.local_blocks)[:, None]
            full["table"] = np.where(full["table"] >= 0, full["table"] + shift, -1).astype(np.int32)
        return full


def process_box(sharding, shape):
    """The bounding box (one slice per axis) of this process's shards of a global array."""
    idx = list(sharding.addressable_devices_indices_map(shape).values())
    box = []
    for axis, n in enumerate(shape):
        lo = min(i[axis].indices(n)[0] for i in idx)
        hi = max(i[axis].indices(n)[1] for i in idx)
        box.append(slice(lo, hi))
    return tuple(box)


# ---------------------------------------------------------------------------------------------

def layout_specs(layout):
    if layout == "data":       # pool rows with the batch: local pools, local block ids
        return dict(q=P("data"), pool=P("data"), table=P("data"), lens=P("data"))
    if layout == "data-replicated":   # pool replicated: global block ids
        return dict(q=P("data"), pool=P(), table=P("data"), lens=P("data"))
    if layout == "heads":      # pool replicated: global block ids
        return dict(q=P(None, None, "model"), pool=P(), table=P(), lens=P())
    return dict(q=P("data", None, "model"), pool=P("data"), table=P("data"), lens=P("data"))


def make_mesh(layout):
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    n, n_proc = len(devices), jax.process_count()
    shape = {"data": (n, 1), "data-replicated": (n, 1), "heads": (1, n),
             "hybrid": (n_proc, n // n_proc)}[layout]
    return Mesh(np.array(devices).reshape(shape), ("data", "model"))


def decode_step(h_q, s_q, implementation):
    def step(q, pool, table, lens):
        # The schedule for the step (a model computes it once and passes it to every layer). A
        # call whose batch or heads are split schedules each shard itself and ignores it
        # (docs/SHARDING.md), so under this sharded jit XLA drops it.
        meta = jfm.get_mla_metadata(lens, s_q=s_q, h_q=h_q, h_kv=1)
        return jfm.mla_decode(q, pool, table, lens, head_dim_v=D_V, causal=s_q > 1,
                              metadata=meta, implementation=implementation)
    return step


def time_steps(fn, args, iters):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def mismatch(what, got, want):
    """None if ``got`` matches ``want``, else what differs. out (bf16): relative L2 error <= 1e-2;
    lse (float32): within 2e-5, infinities (nothing to attend) equal; NaN never matches."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if np.isnan(got).any():
        return f"{what}: NaN in the result"
    if what.startswith("lse"):
        inf = np.isinf(want)
        if not np.array_equal(got[inf], want[inf]) or np.isinf(got[~inf]).any():
            return f"{what}: infinities differ"
        if not np.allclose(got[~inf], want[~inf], rtol=2e-5, atol=2e-5):
            return f"{what}: max abs diff {np.abs(got[~inf] - want[~inf]).max():.3g}"
        return None
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    return f"{what}: relative L2 error {err:.3g}" if err > 1e-2 else None


def run_layout(layout, args, implementation, say):
    """One layout: build, run, check, time. Returns a list of failures (empty: passed)."""
    mesh = make_mesh(layout)
    specs = layout_specs(layout)
    if args.batch % mesh.shape["data"] or args.heads % mesh.shape["model"]:
        raise SystemExit(f"layout {layout}: mesh {dict(mesh.shape)} needs the batch "
                         f"({args.batch}) divisible by 'data' and the heads ({args.heads}) by "
                         "'model'")
    # One pool group per shard of a row-sharded pool (local block ids), one for a replicated one.
    groups = mesh.shape["data"] if specs["pool"] == P("data") else 1
    inputs = Inputs(args.seed, batch=args.batch, groups=groups, heads=args.heads,
                    s_q=args.s_q, seqlen=args.seqlen)
    shapes = inputs.shapes()
    names = ("q", "pool", "table", "lens")
    shardings = {k: NamedSharding(mesh, specs[k]) for k in names}
    dtypes = dict(q=jnp.bfloat16, pool=jnp.bfloat16, table=np.int32, lens=np.int32)

    # This process's share only: the groups its devices hold (data / hybrid), or everything but
    # the other processes' heads of q (heads).
    local = {}
    for k in names:
        box = process_box(shardings[k], shapes[k])
        local[k] = jax.make_array_from_process_local_data(
            shardings[k], inputs.share(k, box).astype(dtypes[k]), shapes[k])

    step = jax.jit(decode_step(args.heads, args.s_q, implementation),
                   in_shardings=tuple(shardings[k] for k in names))
    compiled = step.lower(*(local[k] for k in names)).compile()
    out, lse = compiled(*(local[k] for k in names))
    failures = []
    hlo = compiled.as_text()
    colls = [line.strip()[:160] for line in hlo.splitlines() if _COLLECTIVE.search(line)]
    # q and the pool (last axis 576) and out (512) must never move; anything else (say, the
    # lengths gathered for a schedule) would be cheap, but we expect nothing at all on CPU.
    heavy = [c for c in colls if re.search(rf"[\[,]({D_QK}|{D_V})\]", c)]
    if heavy:
        failures.append(f"collectives moving q, the cache or out: {heavy}")
    if implementation == "kernel" and "jax_flashmla_dense_decode" not in hlo:
        failures.append("the compiled step does not call the CUDA kernel")

    # The single-process run: the whole inputs (every group, global block ids) on one of this
    # process's devices, the same step unsharded.
    dev = jax.local_devices()[0]
    whole = inputs.whole(global_ids=True)
    one = [jax.device_put(whole[k].astype(dtypes[k]), dev) for k in names]
    one_step = jax.jit(decode_step(args.heads, args.s_q, implementation))
    want = one_step(*one)
    want = [np.asarray(w, np.float32) for w in want]
    wrong = []
    for name, got, w in (("out", out, want[0]), ("lse", lse, want[1])):
        for shard in got.addressable_shards:
            where = ", ".join(f"{i.start or 0}:{n if i.stop is None else i.stop}"
                              for i, n in zip(shard.index, w.shape))
            bad = mismatch(f"{name}[{where}] on {shard.device}", shard.data, w[shard.index])
            if bad:
                wrong.append(bad)
    failures += wrong
    t_sharded = time_steps(compiled, [local[k] for k in names], args.iters)
    t_one = time_steps(one_step, one, args.iters)
    moved = "none" if not colls else f"{len(colls)} ({len(heavy)} on q, the cache or out)"
    say(f"layout {layout:15s} mesh {dict(mesh.shape)} over {jax.process_count()} processes: "
        f"out {out.sharding.spec}, {len(out.addressable_shards)} local shards "
        f"{'match' if not wrong else 'DO NOT match'} the single-process run; "
        f"collectives: {moved}; per step {t_sharded * 1e3:.3f} ms sharded, "
        f"{t_one * 1e3:.3f} ms on one device (whole batch, all heads)")
    return failures


def main(argv=None):
    args = parse_args(argv)
    start_distributed(args)   # before anything asks jax for its devices
    pid, n_proc = jax.process_index(), jax.process_count()

    def say(msg):
        print(f"[process {pid}/{n_proc}] {msg}", flush=True)

    ok, why = jfm.kernels_available(jax.local_devices()[0])
    implementation = args.implementation
    if implementation == "auto":
        implementation = "kernel" if ok else "reference"
    say(f"jax {jax.__version__}; {jax.local_device_count()} local / {jax.device_count()} global "
        f"{jax.devices()[0].platform} devices; attention: "
        f"{'CUDA kernel' if implementation == 'kernel' else 'pure-JAX reference'}")
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jfm.KernelFallbackWarning)
        for layout in args.layout or LAYOUTS:
            failures += [f"{layout}: {f}" for f in run_layout(layout, args, implementation, say)]
    for f in failures:
        say(f"FAILED {f}")
    say("passed" if not failures else f"FAILED ({len(failures)} problems)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
