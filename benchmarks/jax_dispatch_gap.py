"""How much of a back-to-back jitted call's time is JAX's per-execution cost rather than GPU work.

The dense side by side shows ours 10-15 us per call slower back to back than per call with 10 calls
in one jit (e.g. H200 h16 s_k 4K: 170.0 against 158.6 us), while FlashMLA's torch calls show no
such gap. This times plain XLA work with no custom call (a jitted bf16 `x + 1` sized to take ~30,
~120 and ~300 us of copy time, with 1 or with 5 arguments and 2 outputs, the shape of our decode
call) both ways, with the same time_rounds as the side by side: if these show the same gap, it is
the runtime's per-execution cost and the in-one-jit column is the kernel's measure.

    python benchmarks/jax_dispatch_gap.py [--calls 20 --rounds 15 --k 10] [--ours]

--ours adds our dense decode (bench_decode.make_inputs' paged cache, the schedule made once outside
the timed calls, as the side by side does) timed the same two ways: b 128, h_q 16, s_k 4096, and a
small call (b 2, h_q 128, s_k 2048; ~10 us of GPU work), where the sparse side by side's b 2 rows
lose 20-40% per call in one jit against 0-12% in GPU time. "unit issue" is the host's time per
call to hand a K-call unit over: near "in one jit", the host (JAX's execution of the unit, our FFI
handler per custom call) and not the GPU sets the in-one-jit time.
--both-cmdbuf runs everything twice, each in its own process: as is, and with XLA's command
buffers off (XLA_FLAGS=--xla_gpu_enable_command_buffer=, plain launches). --xla-variants adds runs
under other XLA flags, e.g. the command buffers' update mode (jaxlib 0.11.2: ALWAYS_UPDATE, the
default, SKIP_TEMP, SKIP_PROFILED): XLA updates a command buffer's commands when their buffers'
addresses change between executions, which for an FFI custom call can mean tracing its handler
again under stream capture (a cache, --xla_cmd_buffer_trace_cache_size, keeps recent traces;
openxla/xla#40173 describes the update-free modes of later XLA).
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sbs_common import (covered_us, equal_runs, host_launch_counts,  # noqa: E402
                        perfetto_gpu_events, span_us, time_rounds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--k", type=int, default=10, help="calls per jit in the one-unit timing")
    ap.add_argument("--mib", default="4,64,256,640",
                    help="bytes read per call (MiB), comma-separated")
    ap.add_argument("--ours", action="store_true", help="also time our dense decode both ways")
    ap.add_argument("--both-cmdbuf", action="store_true",
                    help="run as is and with XLA's command buffers off, each in its own process")
    ap.add_argument("--xla-variants", default="",
                    help="';'-separated 'name=XLA flags' entries, each run in its own process "
                         "after the default's (and --both-cmdbuf's); an XLA without the flag says "
                         "so and exits; e.g. 'skiptemp=--xla_gpu_command_buffer_update_mode="
                         "SKIP_TEMP', a value of jaxlib 0.11.2")
    args = ap.parse_args()
    if args.both_cmdbuf or args.xla_variants:
        import subprocess
        rc = 0
        for title, flags, argv in variant_runs(sys.argv[1:], args.both_cmdbuf, args.xla_variants,
                                               os.environ.get("XLA_FLAGS", "")):
            print(f"== {title}", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), *argv]
            rc |= subprocess.run(cmd, env={**os.environ, "XLA_FLAGS": flags}).returncode
        sys.exit(rc)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    print(f"{'case':34s} {'plain us':>9s} {'in one jit':>11s} {'gap us':>7s} {'issue us':>9s} "
          f"{'unit issue':>10s} {'GPU busy':>9s} {'GPU span':>9s}  host launches per unit")
    one = jax.jit(lambda x: x + jnp.bfloat16(1))
    five = jax.jit(lambda x, a, b, c, d: (x + jnp.bfloat16(1), a * 2 + b[:1] + c[:1] + d[:1]))
    if args.ours:
        report(*ours_case(args.k), args)
        report(*ours_case(args.k, b=2, h_q=128, s_k=2048), args)
    for mib in (int(m) for m in args.mib.split(",")):
        n = mib * 2**20 // 2
        x = jnp.ones((n,), jnp.bfloat16)
        small = [jnp.ones((4096,), jnp.float32) + i for i in range(4)]
        xs = [x + jnp.bfloat16(i) for i in range(args.k)]  # K copies: no reuse between calls
        unit_one = jax.jit(lambda xs: [xi + jnp.bfloat16(1) for xi in xs])
        unit_five = jax.jit(lambda xs, a, b, c, d: [
            (xi + jnp.bfloat16(1), a * 2 + b[:1] + c[:1] + d[:1]) for xi in xs])
        for name, plain, unit in (
                (f"x + 1, {mib} MiB, 1 arg", lambda: one(x), lambda: unit_one(xs)),
                (f"x + 1, {mib} MiB, 5 args 2 outs", lambda: five(x, *small),
                 lambda: unit_five(xs, *small))):
            report(name, plain, unit, args)


def variant_runs(argv, both_cmdbuf, xla_variants, base_flags):
    """(title, XLA_FLAGS, child argv) per process to run: always as is first (a variant's numbers
    mean something only beside the default's from the same machine), then with command buffers
    off (both_cmdbuf), then each 'name=flags' entry of xla_variants (';'-separated), each on top
    of base_flags; the child's argv is this one's without the two variant options."""
    child, drop = [], False
    for a in argv:
        if drop:
            drop = False
        elif a in ("--both-cmdbuf", "--xla-variants"):
            drop = a == "--xla-variants"   # its value is the next argument
        elif not a.startswith("--xla-variants="):
            child.append(a)
    runs = [("command buffers as XLA's default", base_flags)]
    if both_cmdbuf:
        runs.append(("command buffers off", f"{base_flags} --xla_gpu_enable_command_buffer="))
    for entry in filter(None, xla_variants.split(";")):
        name, _, flags = entry.partition("=")
        runs.append((f"{name}: {flags}", f"{base_flags} {flags}"))
    return [(title, flags.strip(), child) for title, flags in runs]


def report(name, plain, unit, args):
    jax.block_until_ready(plain())
    jax.block_until_ready(unit())
    p = time_rounds(plain, jax.block_until_ready, calls=args.calls, rounds=args.rounds)
    u = time_rounds(unit, jax.block_until_ready, calls=max(1, args.calls // args.k),
                    rounds=args.rounds)
    per = u["time_s"] / args.k
    print(f"{name:34s} {p['time_s'] * 1e6:9.1f} {per * 1e6:11.1f} "
          f"{(p['time_s'] - per) * 1e6:7.1f} {p['issue_s'] * 1e6:9.1f} "
          f"{u['issue_s'] / args.k * 1e6:10.1f} {unit_profile(unit, args.k)}")


def unit_profile(unit, k, units=3):
    """Three units under jax.profiler: the GPU's busy time per call (time covered by a kernel),
    its span per call (first kernel's start to last one's end, per unit: busy + the GPU's idle
    gaps inside a unit), and the host's CUDA launch calls per unit (one cuGraphLaunch: the unit
    ran as a command buffer)."""
    import tempfile
    try:
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in range(units):
                    jax.block_until_ready(unit())
            events = perfetto_gpu_events(d)
            launches = host_launch_counts(d)
    except Exception as e:  # noqa: BLE001 (the profiler unavailable)
        return f"(profile: {type(e).__name__})"
    if not events:
        return "(no GPU events)"
    runs = equal_runs(events, units)
    span = ("        -" if runs is None else  # (the events do not split into equal units)
            f"{min(span_us(r) for r in runs) / k:9.1f}")
    counts = " ".join(f"{n} {c / units:g}" for n, c in sorted(launches.items()))
    return f"{covered_us(events) / (units * k):9.1f} {span}  {counts}"


def ours_case(k, b=128, h_q=16, s_k=4096):
    import bench_decode as bd  # (imports jax_flashmla)
    import jax_flashmla as jfm
    q, kv, table, lens, _ = bd.make_inputs(0, b, 1, h_q, s_k, varlen=False)
    keys = jax.random.split(jax.random.key(1), k - 1)
    qs = [q] + [jax.random.normal(kk, q.shape, q.dtype) for kk in keys]  # K queries, one cache
    md = jax.jit(lambda l: jfm.get_mla_metadata(l, s_q=1, h_q=h_q, h_kv=1))(lens)
    one = jax.jit(lambda q, kv, t, l, m: jfm.mla_decode(q, kv, t, l, metadata=m))
    unit = jax.jit(lambda qs, kv, t, l, m: [jfm.mla_decode(q, kv, t, l, metadata=m) for q in qs])
    return (f"ours dense b{b} h{h_q} s_k {s_k}", lambda: one(qs[0], kv, table, lens, md),
            lambda: unit(qs, kv, table, lens, md))


if __name__ == "__main__":
    main()
