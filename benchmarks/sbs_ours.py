"""Side-by-side worker: OUR ops (JAX), one process for a list of cases (see side_by_side.py).

For each case from --start on: load the inputs the driver wrote, expand the palettes on the device,
compute the split-KV metadata once outside the timed region (dense), jit the op with
implementation=None (kernels where they cover the call, else the reference), record which path the
lowering took (custom-call targets named jax_flashmla_*), time N back-to-back calls per round
(median of rounds), save out / lse of one call, append one JSON line per case to
<work>/results_<label>.jsonl (a "start" line first, so the driver can tell which case hung).

--implementation reference --label flashmla is the CPU smoke test's stand-in for upstream.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--label", default="ours")
    ap.add_argument("--implementation", default=None, choices=[None, "kernel", "reference"])
    ap.add_argument("--cpu", action="store_true", help="JAX on CPU (smoke test)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=30.0,
                    help="a case whose first (compiling) call takes longer is not timed further; "
                         "otherwise rounds / calls shrink to fit this budget")
    ap.add_argument("--ref-budget", type=float, default=4.0,
                    help="seconds of timing for a case that runs on the pure-JAX reference "
                         "(calls / rounds shrink to fit; kernel paths get the full protocol)")
    ap.add_argument("--xla", action="store_true",
                    help="also time plain XLA (gather + einsums) on small dense cases")
    ap.add_argument("--in-one-call", type=int, default=0, metavar="K",
                    help="cases on our kernels: also time K calls issued as one unit (one "
                         "jit of K calls on K copies of q): the GPU time per call without a host "
                         "dispatch per call (side_by_side.py --in-one-call)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead of timing: N back-to-back calls of each case (one dispatch each, "
                         "as the timed rounds issue them) under jax.profiler; print each case's "
                         "kernel time per call, the GPU's idle gap between calls and the span per "
                         "call: whether a back-to-back time above the kernel's is GPU idle time")
    ap.add_argument("--limits", action="store_true",
                    help="only measure copy bandwidth / bf16 matmul rate with JAX (fallback when "
                         "torch is not there) and write <work>/limits.json")
    return ap.parse_args()


ARGS = parse()
if ARGS.cpu:
    os.environ["JAX_PLATFORMS"] = "cpu"

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_flashmla as jfm  # noqa: E402
from sbs_common import (CALLS, QUICK_CALLS, QUICK_ROUNDS, ROUNDS, append_jsonl, case_dir,  # noqa: E402
                        gpu_time_record, k_units, load_meta, perfetto_gpu_events, saved_rows,
                        time_in_one_unit, time_rounds)

_TARGET_RE = re.compile(r'(?:custom_call\s*@|call_target_name\s*=\s*")(jax_flashmla_\w+)')


def _load(folder, name, bf16=False):
    path = os.path.join(folder, name + ".npy")
    if not os.path.exists(path):
        return None
    a = np.load(path)
    if bf16:
        a = a.view(ml_dtypes.bfloat16)
    return jnp.asarray(a)


@jax.jit
def _expand(palette, idx):
    return jnp.take(palette, idx % palette.shape[0], axis=0)


def expand(palette, n):
    """Row / block k of the result = palette[k % P], built on the device."""
    return _expand(palette, jnp.arange(n, dtype=jnp.int32))


def build(case, folder, meta, impl):
    """(jitted fn, args, output names)."""
    kind = case["kind"]
    if kind == "dense":
        s_q, h_q, causal = case["s_q"], case["h_q"], case["causal"]
        q = _load(folder, "q", bf16=True)
        pool = expand(_load(folder, "pool_palette", bf16=True), meta["num_blocks"])
        table, lens = _load(folder, "block_table"), _load(folder, "lens")
        md = jax.jit(lambda l: jfm.get_mla_metadata(l, s_q=s_q, h_q=h_q, h_kv=1, causal=causal))(lens)
        fn = jax.jit(lambda q, kv, t, l, m: jfm.mla_decode(q, kv, t, l, causal=causal, metadata=m,
                                                           implementation=impl))
        return fn, (q, pool, table, lens, md), ("out", "lse")
    if kind == "sparse_decode":
        q = _load(folder, "q", bf16=True)
        pool = expand(_load(folder, "pool_palette"), meta["num_blocks"])
        extra = None
        if case["extra"]:
            extra = expand(_load(folder, "extra_pool_palette"), meta["extra_num_blocks"])
        indices, extra_indices = _load(folder, "indices"), _load(folder, "extra_indices")
        b, s_q, h_q = q.shape[:3]
        # The schedule is made once outside the timed calls, as upstream's timed calls reuse one
        # (upstream's, too, is weighted by the calls' topk lengths).
        etl = _load(folder, "extra_topk_length")
        md = jax.jit(lambda l, etl: jfm.get_mla_metadata(
            l, s_q=s_q, h_q=h_q, topk=indices.shape[-1],
            extra_topk=None if extra_indices is None else extra_indices.shape[-1],
            extra_topk_length=etl))(jnp.zeros((b,), jnp.int32), etl)
        args = (q, pool, indices, _load(folder, "attn_sink"), extra, extra_indices,
                _load(folder, "extra_topk_length"), md)
        fn = jax.jit(lambda q, kv, i, s, ekv, ei, etl, m: jfm.mla_decode(
            q, kv, indices=i, attn_sink=s, extra_kv_cache=ekv, extra_indices=ei,
            extra_topk_length=etl, metadata=m, implementation=impl))
        return fn, args, ("out", "lse")
    if kind == "sparse_prefill":
        q = expand(_load(folder, "q_palette", bf16=True), case["s_q"])
        kv = expand(_load(folder, "kv_palette", bf16=True), case["s_kv"])
        args = (q, kv, _load(folder, "indices"), _load(folder, "attn_sink"))
        fn = jax.jit(lambda q, kv, i, s: jfm.sparse_mla_prefill(q, kv, i, attn_sink=s,
                                                                implementation=impl))
        return fn, args, ("out", "max_logits", "lse")
    raise ValueError(kind)


def save_outputs(outdir, names, outs):
    os.makedirs(outdir, exist_ok=True)
    for name, x in zip(names, outs):
        x = np.asarray(x[:saved_rows(x.shape)] if name == "out" else x)
        if x.dtype == ml_dtypes.bfloat16:
            x = x.view(np.int16)   # bf16 bits; the driver views them back
        np.save(os.path.join(outdir, name + ".npy"), x)


def plain_xla_time(case, args, calls, rounds):
    from bench_decode import plain_xla
    q, kv, table, lens = args[:4]
    f = jax.jit(lambda q, kv, t, l: plain_xla(q, kv, t, l, causal=case["causal"]))
    jax.block_until_ready(f(q, kv, table, lens))
    return time_rounds(lambda: f(q, kv, table, lens), jax.block_until_ready, calls=calls,
                       rounds=rounds)["time_s"]


def time_in_one_call(fn, args, k, calls, rounds, units=3):
    """Seconds per call of ``fn`` when K calls run as one jitted unit, each on its own copy of q
    (args[0]; distinct operands, so XLA keeps all K): a dispatch per K calls, as a model's step
    that runs every layer in one jit pays it. Then `units` such units under jax.profiler: the GPU
    busy time per call from the device events (g_time_s; sbs_common.gpu_time_record)."""
    import tempfile
    qs = tuple(jnp.array(args[0], copy=True) for _ in range(k))
    many = jax.jit(lambda qs, *rest: [fn(qi, *rest) for qi in qs])
    jax.block_until_ready(many(qs, *args[1:]))
    rec = time_in_one_unit(lambda: many(qs, *args[1:]), jax.block_until_ready, k,
                           calls=k_units(calls), rounds=rounds, budget_s=ARGS.max_seconds)
    try:
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in range(units):
                    jax.block_until_ready(many(qs, *args[1:]))
            rec.update(gpu_time_record(perfetto_gpu_events(d), units * k))
    except Exception as e:  # noqa: BLE001 (the profiler unavailable)
        rec["g_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return rec


def run_case(case, work, impl, calls, rounds):
    folder = case_dir(work, case)
    meta = load_meta(folder)
    rec = dict(name=case["name"], event="done", label=ARGS.label)
    if ARGS.label != "ours" and case.get("upstream_heads") is None:
        # Standing in for upstream (smoke test): honour what upstream cannot run.
        rec.update(status="n/a", note=f"upstream has no kernel for h_q {case['h_q']}")
        return rec
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn, args, names = build(case, folder, meta, impl)
        text = fn.lower(*args).as_text()
        t0 = time.perf_counter()
        outs = jax.block_until_ready(fn(*args))
        rec["first_call_s"] = time.perf_counter() - t0
    targets = sorted(set(_TARGET_RE.findall(text)) - {"jax_flashmla_mla_metadata"})
    rec["targets"] = targets
    rec["path"] = "kernel" if targets else "reference"
    fallback = [str(w.message) for w in caught if "reference" in str(w.message)]
    if fallback:
        rec["fallback"] = fallback[0][:300]
    save_outputs(os.path.join(work, "outputs", ARGS.label, os.path.basename(folder)), names, outs)
    del outs
    if rec["first_call_s"] > ARGS.max_seconds:
        rec["status"] = "slow"
        rec["note"] = (f"first call {rec['first_call_s']:.1f} s > --max-seconds {ARGS.max_seconds}:"
                       " not timed")
    else:
        budget = ARGS.max_seconds if rec["path"] == "kernel" else min(ARGS.max_seconds,
                                                                      ARGS.ref_budget)
        rec.update(time_rounds(lambda: fn(*args), jax.block_until_ready, calls=calls, rounds=rounds,
                               budget_s=budget))
        rec["status"] = "ok"
        if ARGS.in_one_call > 1 and (rec["path"] == "kernel" or ARGS.cpu):  # (CPU: the smoke test's)
            try:
                rec.update(time_in_one_call(fn, args, ARGS.in_one_call, calls, rounds))
            except Exception as e:  # noqa: BLE001 (out of memory for K copies)
                rec["k_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if (ARGS.xla and case["kind"] == "dense" and case["s_k"] <= 8192 and case["b"] == 128
                and case["h_q"] in (16, 128) and case["s_q"] <= 2 and not case["zero_frac"]):
            try:
                rec["xla_time_s"] = plain_xla_time(case, args, max(5, calls // 4), 3)
            except Exception as e:  # noqa: BLE001 (out of memory on big shapes)
                rec["xla_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return rec


def profile_case(case, work, n):
    """N back-to-back calls under jax.profiler (--profile): kernel time, idle gaps, span per call."""
    import tempfile
    folder = case_dir(work, case)
    fn, args, _ = build(case, folder, load_meta(folder), ARGS.implementation)
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready([fn(*args) for _ in range(n)])
        ev = perfetto_gpu_events(d)
    if not ev:
        print(f"[{ARGS.label}] {case['name']}: no GPU events in the trace")
        return
    busy = {}
    for _, dur, name in ev:
        busy.setdefault(name[:90], []).append(dur)
    gaps = [ev[i + 1][0] - ev[i][0] - ev[i][1] for i in range(len(ev) - 1)]
    span = ev[-1][0] + ev[-1][1] - ev[0][0]
    print(f"[{ARGS.label}] {case['name']}: {n} calls back to back, {len(ev)} GPU events, span "
          f"{span / n:.1f} us per call; gaps between events: median {np.median(gaps):.1f} us, "
          f"max {max(gaps):.1f}, sum {sum(g for g in gaps if g > 0) / n:.1f} per call", flush=True)
    for name, durs in sorted(busy.items(), key=lambda kv: -sum(kv[1])):
        print(f"    {len(durs):4d} x median {np.median(durs):8.1f} us  {name}", flush=True)


def limits(work):
    """JAX-side machine limits (only when torch is not there: ANCHORS.md warns that a jitted
    x + 1 under-reads the copy rate)."""
    on_cpu = jax.devices()[0].platform == "cpu"
    n = (1 << 22) if on_cpu else (1 << 30)
    x = jnp.ones((n,), jnp.bfloat16)
    add = jax.jit(lambda x: x + jnp.bfloat16(1))
    jax.block_until_ready(add(x))
    t = time_rounds(lambda: add(x), jax.block_until_ready, calls=5, rounds=3)["time_s"]
    copy_gbs = 2 * n * 2 / t / 1e9
    del x
    m = 1024 if on_cpu else 8192
    a = jnp.ones((m, m), jnp.bfloat16)
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    jax.block_until_ready(mm(a))
    t = time_rounds(lambda: mm(a), jax.block_until_ready, calls=5, rounds=3)["time_s"]
    res = dict(copy_gbs=copy_gbs, matmul_tflops=2 * m ** 3 / t / 1e12, source="jax",
               device=jax.devices()[0].device_kind)
    with open(os.path.join(work, "limits.json"), "w") as f:
        json.dump(res, f)
    print(f"[{ARGS.label}] limits (JAX x+1 / dot): copy {copy_gbs:.0f} GB/s, "
          f"matmul {res['matmul_tflops']:.1f} TFLOP/s", flush=True)


def main():
    work = ARGS.work
    if ARGS.limits:
        limits(work)
        return
    with open(os.path.join(work, "cases.json")) as f:
        cases = json.load(f)
    dev = jax.devices()[0]
    ok, why = jfm.kernels_available()
    print(f"[{ARGS.label}] jax {jax.__version__} on {dev.device_kind}; kernels_available={ok}"
          + ("" if ok else f" ({why})"), flush=True)
    if ARGS.profile:
        for case in cases[ARGS.start:]:
            profile_case(case, work, ARGS.profile)
        return
    calls, rounds = (QUICK_CALLS, QUICK_ROUNDS) if ARGS.quick else (CALLS, ROUNDS)
    results = os.path.join(work, f"results_{ARGS.label}.jsonl")
    for case in cases[ARGS.start:]:
        append_jsonl(results, dict(name=case["name"], event="start", t=time.time()))
        try:
            rec = run_case(case, work, ARGS.implementation, calls, rounds)
        except Exception as e:  # noqa: BLE001 (one case's failure must not stop the rest)
            rec = dict(name=case["name"], event="done", label=ARGS.label, status="error",
                       error=f"{type(e).__name__}: {str(e)[:500]}")
            traceback.print_exc(limit=4)
        append_jsonl(results, rec)
        t = rec.get("time_s")
        print(f"[{ARGS.label}] {case['name']}: {rec['status']}"
              + (f" {t * 1e6:.1f} us" if t else "") + f" path={rec.get('path', '-')}"
              + (f" first call {rec['first_call_s']:.1f} s" if "first_call_s" in rec else ""),
              flush=True)
        gc.collect()
        jax.clear_caches()


if __name__ == "__main__":
    main()
