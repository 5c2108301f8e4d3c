"""One decode case, run a few times, for Nsight Compute (scripts/device_check.sh, stage ncu):
  ncu --kernel-name regex:dense_decode_kernel --launch-skip 2 --launch-count 1 ... \\
      python3 benchmarks/profile_decode.py --h_q 128 --s_k 4096
  ncu --kernel-name regex:sparse_attention_kernel ... \\
      python3 benchmarks/profile_decode.py --sparse v32 --h_q 128 --topk 2048 --b 64 --s_q 2
--sparse v32 | v4 | bf16: FP8 V3.2 (d_qk 576), FP8 V4 (d_qk 512) or bf16 pool, random rows. The
pool has max(--s_k, 2 topk) rows: at the default 4096 it sits in the 50 MB L2 (2.7 MB for V3.2),
unlike a serving pool or the side by side's (benchmarks/sbs_cases.py: DRAM-sized); pass
--s_k 1048576 to time a change the way users run it (docs/PERFORMANCE.md, 2026-12-04 third and
fourth sessions: the no-output-store probe gained 4.5-6% on V3.2 at s_q 2 on the default pool and
nothing on a 1M-row one; on V4 it gained 4.7-9% on the 1M-row pool as well).
--prefill 576 | 512: sparse prefill instead, --s_q query tokens (each a "call" of --timeline is
one prefill of all of them) over --s_k kv rows, --topk random indices each; with --ramp, query i
counts only its first 1 + i * topk // s_q of them (topk_length: work growing along the sequence,
as a causal prefix gives, to test how the prefill grid balances unequal tokens).
--timeline K: instead, K calls in one jit (each on its own copy of q) under jax.profiler, then
every GPU event of the last run in order (start, duration, gap since the previous one): where a
small step's time goes between the kernels and the launches (bench_model.gpu_busy's trace).
--async_runs N (with --timeline): also N runs dispatched back to back with one wait at the end,
as a benchmark loop or a serving loop issues them: wall time per run against the GPU's busy time,
and the GPU's idle gaps between runs (the per-run cost that one jitted unit of K calls spreads
over its K calls; docs/PERFORMANCE.md, seventh session). Try it also with
XLA_FLAGS=--xla_gpu_enable_command_buffer= (no command buffers: plain launches).
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402

import jax_flashmla  # noqa: E402
from jax_flashmla import kv_cache as kvc  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--b", type=int, default=128)
ap.add_argument("--s_q", type=int, default=1)
ap.add_argument("--h_q", type=int, default=128)
ap.add_argument("--s_k", type=int, default=4096)
ap.add_argument("--causal", action="store_true")
ap.add_argument("--sparse", choices=("v32", "v4", "bf16"), default=None)
ap.add_argument("--prefill", type=int, choices=(576, 512), default=None)
ap.add_argument("--topk", type=int, default=2048)
ap.add_argument("--page", type=int, default=64)
ap.add_argument("--extra_topk", type=int, default=0,
                help="sparse: a second pool (V4's compressed entries beside the window) of this "
                     "many positions per query token, random rows, same format")
ap.add_argument("--extra_page", type=int, default=64, help="the second pool's page size")
ap.add_argument("--extra_s_k", type=int, default=0,
                help="the second pool's rows (default: max(--s_k, 2 * --extra_topk))")
ap.add_argument("--sink", action="store_true",
                help="prefill: a random attn_sink per head, as the side-by-side prefill cases have")
ap.add_argument("--progression", action="store_true",
                help="prefill: each query's indices distinct, a random start and stride coprime to "
                     "--s_k (the side by side's draw, sbs_cases.unique_positions) instead of "
                     "uniform draws with repeats")
ap.add_argument("--value_scale", type=float, default=1.0,
                help="prefill: q and kv drawn N(0, 1) times this (the side by side's: 0.1)")
ap.add_argument("--ramp", action="store_true",
                help="prefill: topk_length 1 + i * topk // s_q for query i (work growing along s_q)")
ap.add_argument("--timeline", type=int, default=0)
ap.add_argument("--traced_runs", type=int, default=5, help="with --timeline: runs traced")
ap.add_argument("--trace_dir", default="/tmp/jfm_timeline")
ap.add_argument("--async_runs", type=int, default=0)
ap.add_argument("--fixed", action="store_true",
                help="dense: every sequence --s_k long (default: random lengths around --s_k)")
ap.add_argument("--implementation", default="kernel", help="kernel | reference (e.g. on a CPU)")
ap.add_argument("--num_sms", type=int, default=None,
                help="get_mla_metadata's num_sms (fewer schedule parts): e.g. 64 at V4 h_q 64 b 64 "
                     "gives one query token per part, a schedule that splits nothing")
ap.add_argument("--variant", default=None,
                help="JFM_KERNEL_VARIANT for this process (e.g. pair), so one TIMELINE_CASES entry "
                     "can time a kernel variant")
args = ap.parse_args()
if args.variant is not None:  # read by the extension at its first kernel call, after this
    os.environ["JFM_KERNEL_VARIANT"] = args.variant

if args.prefill is not None:
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    q = (jax.random.normal(keys[0], (args.s_q, args.h_q, args.prefill)) * args.value_scale
         ).astype(jnp.bfloat16)
    kv = (jax.random.normal(keys[1], (args.s_k, 1, args.prefill)) * args.value_scale
          ).astype(jnp.bfloat16)
    if args.progression:
        from sbs_cases import unique_positions
        idx = unique_positions(np.random.default_rng(0), np.full(args.s_q, args.s_k), args.topk)
    else:
        idx = np.random.default_rng(0).integers(0, args.s_k, (args.s_q, args.topk))
    idx = jnp.asarray(idx[:, None, :], jnp.int32)
    lengths = None
    if args.ramp:
        lengths = jnp.asarray(1 + np.arange(args.s_q) * args.topk // args.s_q, jnp.int32)
    sink = (jnp.asarray(np.random.default_rng(1).standard_normal(args.h_q), jnp.float32)
            if args.sink else None)
    op = jax.jit(lambda q, kv, i, l, s: jax_flashmla.sparse_mla_prefill(
        q, kv, i, topk_length=l, attn_sink=s, implementation=args.implementation))
    call = lambda: op(q, kv, idx, lengths, sink)  # noqa: E731
    rest = (kv, idx, lengths, sink)
elif args.sparse is None:
    q, kv, table, lens, _ = bd.make_inputs(0, args.b, args.s_q, args.h_q, args.s_k, not args.fixed)
    meta = jax_flashmla.get_mla_metadata(lens, s_q=args.s_q, h_q=args.h_q, num_sms=args.num_sms)
    op = jax.jit(lambda q, kv, t, l, m: jax_flashmla.mla_decode(
        q, kv, t, l, causal=args.causal, metadata=m, implementation=args.implementation))
    call = lambda: op(q, kv, table, lens, meta)  # noqa: E731
    rest = (kv, table, lens, meta)
else:
    d_qk = 512 if args.sparse == "v4" else 576
    rng = np.random.default_rng(0)

    def make_pool(key, rows, page, topk):
        """A random pool (FP8 unless bf16) of at least `rows` rows and [b, s_q, topk] indices
        into it."""
        blocks = -(-rows // page)
        pool = jax.random.normal(jax.random.PRNGKey(key), (blocks, page, 1, d_qk), jnp.bfloat16)
        if args.sparse != "bf16":
            pool = kvc.quantize_fp8(pool)
        idx = rng.integers(0, blocks * page, (args.b, args.s_q, topk))
        return pool, jnp.asarray(idx, jnp.int32)

    pool, idx = make_pool(1, max(args.s_k, 2 * args.topk), args.page, args.topk)
    extra = ()  # (extra_kv_cache, extra_indices) with --extra_topk
    if args.extra_topk:
        extra = make_pool(4, args.extra_s_k or max(args.s_k, 2 * args.extra_topk), args.extra_page,
                          args.extra_topk)
    q = jax.random.normal(jax.random.PRNGKey(2), (args.b, args.s_q, args.h_q, d_qk), jnp.bfloat16)
    meta = jax_flashmla.get_mla_metadata(jnp.zeros((args.b,), jnp.int32), s_q=args.s_q,
                                         h_q=args.h_q, topk=args.topk,
                                         extra_topk=args.extra_topk or None, num_sms=args.num_sms)
    op = jax.jit(lambda q, kv, i, m, extra_kv=None, extra_i=None: jax_flashmla.mla_decode(
        q, kv, indices=i, metadata=m, extra_kv_cache=extra_kv, extra_indices=extra_i,
        implementation=args.implementation))
    call = lambda: op(q, pool, idx, meta, *extra)  # noqa: E731
    rest = (pool, idx, meta) + tuple(extra)


def timeline(k):
    """Every GPU event of one run of K calls in one jit, in order."""
    from sbs_common import perfetto_gpu_events
    qs = tuple(jnp.array(q, copy=True) for _ in range(k))
    many = jax.jit(lambda qs, *r: [op(qi, *r) for qi in qs])
    for _ in range(5):
        jax.block_until_ready(many(qs, *rest))
    with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
        for _ in range(args.traced_runs):
            jax.block_until_ready(many(qs, *rest))
    kern = perfetto_gpu_events(args.trace_dir)
    if not kern:
        print("no GPU stream events in the trace (no GPU?)")
    else:
        print_run(kern, k)
    if args.async_runs:
        async_runs(many, qs, k, args.async_runs)


def print_run(kern, k):
    """The last traced run's events, each kernel's mean / median, the host's launch calls."""
    from sbs_common import equal_runs, host_launch_counts, span_us
    # The last of the traced runs (split by event count: sbs_common.equal_runs).
    nr = args.traced_runs
    runs = equal_runs(kern, nr)
    whole = runs is not None
    run = runs[-1] if whole else kern
    t0, prev_end, per = run[0][0], run[0][0], {}
    print(f"{len(run)} GPU events in " + (f"the last of {nr} traced runs" if whole else
                                          f"all {nr} traced runs (their events do not split in {nr})")
          + f" ({k} calls per run); span {span_us(run):.1f} us")
    if whole:  # every run's span: an A/B of a change between calls (e.g. a launch) reads these
        spans = [span_us(r) for r in runs]
        print(f"spans of the {nr} runs: {' / '.join(f'{x:.1f}' for x in spans)} us, median "
              f"{np.median(spans):.1f} ({np.median(spans) / k:.2f} per call)")
    for ts, dur, name in run:
        print(f"  {ts - t0:9.2f} +{dur:7.2f} us (gap {ts - prev_end:6.2f})  {name[:110]}")
        prev_end = ts + dur
    for _, dur, name in kern:  # every traced run: the mean and median duration per kernel
        per.setdefault(name[:110], []).append(dur)
    for name, durs in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {len(durs):4d} x {sum(durs) / len(durs):7.2f} us (median {np.median(durs):7.2f})  {name}")
    # One kernel launch per kernel, or graph launches: whether XLA put the calls into a command
    # buffer (the gaps above are then the graph's, not the host's).
    launches = host_launch_counts(args.trace_dir)
    print("host launch calls per run: " + (", ".join(f"{n} {c / nr:g}" for n, c in sorted(launches.items()))
                                          or "none found in the trace"))


def async_runs(many, qs, k, n):
    """N runs of the K-call unit dispatched back to back, one wait: wall vs GPU busy per run."""
    import time
    from sbs_common import covered_us, host_event_totals, perfetto_gpu_events, span_us
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready([many(qs, *rest) for _ in range(n)])
        walls.append((time.perf_counter() - t0) / n * 1e6)
    trace_dir = args.trace_dir + "_async"
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        jax.block_until_ready([many(qs, *rest) for _ in range(n)])
    kern = perfetto_gpu_events(trace_dir)
    if not kern:
        print("async runs: no GPU stream events in the trace")
        return
    busy = covered_us(kern)  # not the sum: a PDL combine's duration overlaps the attention kernel's
    span = span_us(kern)
    gaps = sorted(kern[i + 1][0] - kern[i][0] - kern[i][1] for i in range(len(kern) - 1))
    idle = [g for g in gaps if g > 1.0]
    print(f"{n} runs back to back (one wait): wall {np.median(walls):.1f} us per run "
          f"({np.median(walls) / k:.2f} per call; rounds {', '.join(f'{w:.1f}' for w in walls)}); "
          f"traced: GPU busy {busy / n:.1f} us per run, span {span / n:.1f} per run, "
          f"{len(kern)} events; idle gaps over 1 us: {len(idle)}"
          + (f", median {np.median(idle):.1f} us, max {idle[-1]:.1f}, total {sum(idle) / n:.1f} per run"
             if idle else ""))
    # Where the host spends each run (nested events count in each of their parents too).
    for name, us, count in host_event_totals(trace_dir, n):
        print(f"  host {us:9.1f} us per run in {count:5.1f} x {name}")


if args.timeline:
    timeline(args.timeline)
else:
    for _ in range(4):
        jax.block_until_ready(call())
print("profiled case done")
