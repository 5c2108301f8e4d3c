"""Dense paged MLA decode benchmark: every dense case of ANCHORS.md, against upstream FlashMLA's
numbers (same H100 model) and plain XLA measured here.

Counting (FlashMLA's convention): FLOPs = s_q * h_q * (2*576 + 2*512) * sum(seqlens);
bytes = q + every attended KV token once (576 * 2 B) + out.
Time: the whole op (main + combine kernels; the metadata is computed once outside and passed in),
as back-to-back jitted calls (launch gaps included) divided by their count: median of REPS rounds.
The machine's copy bandwidth and bf16 matmul rate are measured in the same run.

Side by side against upstream FlashMLA on the same machine: benchmarks/side_by_side.py (run by
scripts/device_bench.sh); this script keeps the plain-XLA comparison and the 61-layer loop
(--loop-only) and compares against the H100 numbers below.

The loop also traces 3 steps with jax.profiler and reports the GPU's busy time per step (the union
of its kernels' intervals): step time / GPU busy near 1 means the step is GPU-bound, above it the
host's work per step shows (launches and our handlers: 1.13-1.18x at b 2 on an H100, 1.08-1.09x
at b 16 and 64). --loop-cases BxSK,... runs it at other batches and lengths.

Usage: python benchmarks/bench_decode.py [--quick] [--out results.json] [--loop-only]
       [--h_q 16 128] [--sk 4096] [--no-xla] [--no-loop]   (a subset, e.g. for an A/B of two builds)
       [--loop-cases 64x4096,2x4096] [--layers 61]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

import jax
import jax.numpy as jnp

import jax_flashmla
from sbs_common import covered_us, perfetto_gpu_events  # noqa: E402  (trace helpers the benchmarks share)

PAGE, D_QK, D_V = 64, 576, 512

# Upstream FlashMLA on the same H100 model (ANCHORS.md): (s_q, h_q, causal, s_k) -> (GB/s, TFLOPS)
ANCHOR = {
    (1, 16, False, 4096): (2591, None), (1, 16, False, 8192): (2734, None),
    (1, 16, False, 16384): (2858, None), (1, 16, False, 32768): (2940, None),
    (1, 32, False, 4096): (2604, None), (1, 32, False, 8192): (2726, None),
    (1, 32, False, 16384): (2851, None), (1, 32, False, 32768): (2935, None),
    (1, 64, False, 4096): (2561, 301), (1, 64, False, 8192): (2701, 322),
    (1, 64, False, 16384): (2806, 337), (1, 64, False, 32768): (2905, 350),
    (1, 128, False, 4096): (None, 534), (1, 128, False, 8192): (None, 581),
    (1, 128, False, 16384): (None, 608), (1, 128, False, 32768): (None, 627),
    (2, 128, True, 4096): (None, 684), (2, 128, True, 16384): (None, 745),
    (2, 128, True, 32768): (None, 753),
    ("fixed", 64, 1, 128, 4096): (None, 561),
}


def timeit(fn, *args, n=20, reps=7):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return float(np.median(times)), float(np.min(times)), float(np.max(times))


def machine_limits():
    x = jax.random.normal(jax.random.PRNGKey(0), (1024, 1024, 1024), jnp.float32).astype(jnp.bfloat16)
    copy = jax.jit(lambda x: x + jnp.bfloat16(1))
    t, _, _ = timeit(copy, x, n=10, reps=5)
    copy_gbs = 2 * x.size * 2 / t / 1e9
    del x
    a = jax.random.normal(jax.random.PRNGKey(1), (8192, 8192), jnp.bfloat16)
    bm = jax.random.normal(jax.random.PRNGKey(2), (8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    t, _, _ = timeit(mm, a, bm, n=10, reps=5)
    return copy_gbs, 2 * 8192 ** 3 / t / 1e12


def make_inputs(seed, b, s_q, h_q, s_k, varlen, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    if varlen:
        lens = np.maximum(rng.normal(s_k, s_k / 2, size=b), s_q).astype(np.int32)
    else:
        lens = np.full(b, s_k, np.int32)
    nblk = -(-lens // PAGE)
    max_blocks = int(nblk.max())
    total = int(nblk.sum())
    perm = rng.permutation(total).astype(np.int32)
    table = np.zeros((b, max_blocks), np.int32)
    k = 0
    for i in range(b):
        table[i, :nblk[i]] = perm[k:k + nblk[i]]
        k += nblk[i]
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = jax.random.normal(kq, (b, s_q, h_q, D_QK), dtype)
    kv = jax.random.normal(kk, (total, PAGE, 1, D_QK), dtype)
    return q, kv, jnp.asarray(table), jnp.asarray(lens), lens


def plain_xla(q, kv, table, lens, *, causal):
    """What a JAX user writes today: gather the pages, two einsums, masked softmax (bf16 in,
    f32 accumulation)."""
    b, s_q, h_q, d = q.shape
    max_blocks = table.shape[1]
    keys = kv[table][:, :, :, 0].reshape(b, max_blocks * PAGE, d)          # [b, T, d]
    t = jnp.arange(max_blocks * PAGE)
    logits = jnp.einsum("bshd,btd->bsht", q, keys, preferred_element_type=jnp.float32) * D_QK ** -0.5
    limit = lens[:, None] if not causal else lens[:, None] - s_q + 1 + jnp.arange(s_q)[None]
    mask = t[None, None, None, :] < limit[:, :, None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bsht,btv->bshv", p.astype(q.dtype), keys[..., :D_V],
                      preferred_element_type=jnp.float32).astype(q.dtype)


def counts(b, s_q, h_q, lens):
    tokens = int(lens.sum())
    flops = s_q * h_q * (2 * D_QK + 2 * D_V) * tokens
    nbytes = b * s_q * h_q * (D_QK + D_V) * 2 + tokens * D_QK * 2
    return flops, nbytes


def bench_case(b, s_q, h_q, s_k, causal, varlen, with_xla, seed=0):
    q, kv, table, lens, np_lens = make_inputs(seed, b, s_q, h_q, s_k, varlen)
    meta = jax_flashmla.get_mla_metadata(lens, s_q=s_q, h_q=h_q, h_kv=1)
    op = jax.jit(lambda q, kv, t, l, m: jax_flashmla.mla_decode(
        q, kv, t, l, causal=causal, metadata=m, implementation="kernel"))
    t_med, t_min, t_max = timeit(op, q, kv, table, lens, meta)
    t_auto, _, _ = timeit(jax.jit(lambda q, kv, t, l: jax_flashmla.mla_decode(
        q, kv, t, l, causal=causal, implementation="kernel")), q, kv, table, lens)
    t_xla = None
    if with_xla:
        try:
            t_xla, _, _ = timeit(jax.jit(lambda q, kv, t, l: plain_xla(q, kv, t, l, causal=causal)),
                                 q, kv, table, lens, n=5, reps=3)
        except Exception as e:  # noqa: BLE001 (out of memory on the biggest shapes)
            print(f"  plain XLA failed: {type(e).__name__}")
    flops, nbytes = counts(b, s_q, h_q, np_lens)
    return dict(b=b, s_q=s_q, h_q=h_q, s_k=s_k, causal=causal, varlen=varlen, time_us=t_med * 1e6,
                time_min_us=t_min * 1e6, time_max_us=t_max * 1e6, time_auto_meta_us=t_auto * 1e6,
                tflops=flops / t_med / 1e12, gbs=nbytes / t_med / 1e9,
                xla_time_us=None if t_xla is None else t_xla * 1e6)


def layers_loop(b=64, h_q=128, s_k=4096, layers=61):
    """A DeepSeek-V3 decode step's attention: 61 layers (own caches) sharing one metadata."""
    q, kv, table, lens, np_lens = make_inputs(11, b, 1, h_q, s_k, True)
    kvs = [kv] + [jax.random.normal(jax.random.PRNGKey(100 + i), kv.shape, kv.dtype)
                  for i in range(layers - 1)]
    qs = [jax.random.normal(jax.random.PRNGKey(1000 + i), q.shape, q.dtype) for i in range(layers)]

    @jax.jit
    def step(qs, kvs, table, lens):
        meta = jax_flashmla.get_mla_metadata(lens, h_q=h_q)
        return [jax_flashmla.mla_decode(q, kv, table, lens, metadata=meta, implementation="kernel")[0]
                for q, kv in zip(qs, kvs)]

    t_step, _, _ = timeit(step, qs, kvs, table, lens, n=5, reps=5)
    single = jax.jit(lambda q, kv, t, l, m: jax_flashmla.mla_decode(
        q, kv, t, l, metadata=m, implementation="kernel"))
    meta = jax_flashmla.get_mla_metadata(lens, h_q=h_q)
    t_one, _, _ = timeit(single, qs[0], kvs[0], table, lens, meta)
    # The GPU's busy time per step, from 3 traced steps (dispatched back to back, as timed).
    traced = 3
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            out = None
            for _ in range(traced):
                out = step(qs, kvs, table, lens)
            jax.block_until_ready(out)
        events = perfetto_gpu_events(d)
    busy_us = covered_us(events) / traced if events else float("nan")
    return dict(b=b, h_q=h_q, s_k=s_k, layers=layers, step_us=t_step * 1e6,
                per_layer_us=t_step / layers * 1e6, single_call_us=t_one * 1e6,
                gpu_busy_step_us=busy_us, gpu_kernels_per_step=len(events) / traced,
                step_over_busy=t_step * 1e6 / busy_us if events else None)


def print_loop(loop):
    print(f"{loop['layers']}-layer step (b={loop['b']}, h_q={loop['h_q']}, s_k={loop['s_k']} varlen, "
          f"one metadata): {loop['step_us']:.0f} us = {loop['per_layer_us']:.1f} us/layer; single "
          f"call {loop['single_call_us']:.1f} us; GPU busy {loop['gpu_busy_step_us']:.0f} us per step "
          f"({loop['gpu_kernels_per_step']:.0f} GPU events), step / busy "
          f"{loop['step_over_busy'] if loop['step_over_busy'] is None else round(loop['step_over_busy'], 3)}",
          flush=True)


def loop_cases(spec: str, layers: int):
    """layers_loop for each BxSK of spec (comma separated)."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        b, sk = (int(v) for v in item.lower().split("x"))
        loop = layers_loop(b=b, s_k=sk, layers=layers)
        print_loop(loop)
        out.append(loop)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--h_q", type=int, nargs="+", default=None, help="only these head counts")
    ap.add_argument("--sk", type=int, nargs="+", default=None, help="only these mean lengths")
    ap.add_argument("--no-xla", action="store_true", help="skip the plain-XLA comparison")
    ap.add_argument("--no-loop", action="store_true", help="skip the 61-layer loop")
    ap.add_argument("--loop-only", action="store_true",
                    help="only the 61-layer loop (side_by_side.py covers the cases against upstream)")
    ap.add_argument("--loop-cases", default="64x4096",
                    help="the loop's batch x mean length cases, comma separated (h_q 128)")
    ap.add_argument("--layers", type=int, default=61, help="layers of the loop")
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, {dev.core_count} SMs; jax {jax.__version__}")
    if args.loop_only:
        loop = loop_cases(args.loop_cases, args.layers)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(device=dev.device_kind, layers=loop), f, indent=1)
        return
    copy_gbs, mm_tflops = machine_limits()
    print(f"machine: copy {copy_gbs:.0f} GB/s (read+write), bf16 matmul {mm_tflops:.0f} TFLOP/s")
    sks = (4096, 8192, 16384, 32768) if not args.quick else (4096,)
    cases = [(128, 1, h, sk, False, True) for h in (16, 32, 64, 128) for sk in sks]
    cases += [(128, 2, 128, sk, True, True) for sk in sks if sk != 8192]
    cases += [(64, 1, 128, 4096, False, False)]
    cases = [c for c in cases if (args.h_q is None or c[2] in args.h_q)
             and (args.sk is None or c[3] in args.sk)]
    rows = []
    hdr = (f"{'b':>4} {'s_q':>3} {'h_q':>4} {'causal':>6} {'s_k':>6} {'time us':>9} {'TFLOPS':>7} "
           f"{'GB/s':>6} {'%copy':>6} {'%mm':>5} {'upstream':>9} {'vs up':>6} {'xla us':>9} {'vs xla':>7}")
    print(hdr)
    for (b, s_q, h_q, sk, causal, varlen) in cases:
        r = bench_case(b, s_q, h_q, sk, causal, varlen,
                       with_xla=not args.no_xla and sk <= 8192 and h_q in (16, 128) and varlen)
        key = (s_q, h_q, causal, sk) if varlen else ("fixed", b, s_q, h_q, sk)
        up_gbs, up_tf = ANCHOR.get(key, (None, None))
        if up_tf is not None:
            r["upstream"], r["vs_upstream"] = f"{up_tf} TF", r["tflops"] / up_tf
        elif up_gbs is not None:
            r["upstream"], r["vs_upstream"] = f"{up_gbs} GB/s", r["gbs"] / up_gbs
        else:
            r["upstream"], r["vs_upstream"] = "-", None
        r["vs_xla"] = None if r["xla_time_us"] is None else r["xla_time_us"] / r["time_us"]
        r["pct_copy"] = r["gbs"] / copy_gbs
        r["pct_mm"] = r["tflops"] / mm_tflops
        rows.append(r)
        vs_up = f"{r['vs_upstream']:.2f}" if r["vs_upstream"] else "-"
        xla = f"{r['xla_time_us']:.0f}" if r["xla_time_us"] else "-"
        vs_xla = f"{r['vs_xla']:.1f}x" if r["vs_xla"] else "-"
        print(f"{b:>4} {s_q:>3} {h_q:>4} {str(causal):>6} {sk:>6} {r['time_us']:>9.1f} "
              f"{r['tflops']:>7.1f} {r['gbs']:>6.0f} {r['pct_copy']:>6.2f} {r['pct_mm']:>5.2f} "
              f"{r['upstream']:>9} {vs_up:>6} {xla:>9} {vs_xla:>7}", flush=True)
    loop = None if args.no_loop else loop_cases(args.loop_cases, args.layers)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=dev.device_kind, sms=dev.core_count, copy_gbs=copy_gbs,
                           matmul_tflops=mm_tflops, cases=rows, layers=loop), f, indent=1)


if __name__ == "__main__":
    main()
