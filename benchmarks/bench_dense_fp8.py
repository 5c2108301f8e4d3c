"""Dense decode over an FP8 cache (DeepSeek-V3 with the 656-byte V3.2 layout, or V4's 584-byte
per-block layout), run as sparse decode over every token (jax_flashmla/ops/kernels/
dense_as_sparse.py), against what the same user has without it: the pure-JAX reference on the FP8
cache (plain XLA: dequantize, gather, two einsums), and the dense bf16 kernel on the same values
in a bf16 cache (V3 layout only: the dense kernel reads d_qk 576) at 1.76x the bytes.

Upstream FlashMLA has no dense FP8 decode, so there is no side-by-side column here. Time: jitted
calls back to back, median of rounds (bench_decode.timeit); the step's dense schedule is made
once and passed, as a model does (the route schedules its own, one launch per call, for causal
MTP only). Bytes: every attended token once (656 / 584 B), q and out.

Usage: python benchmarks/bench_dense_fp8.py [--quick] [--out F]
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

import jax_flashmla
from jax_flashmla import kv_cache as kvc
from jax_flashmla.ops.kernels import dense_as_sparse
from bench_decode import make_inputs, timeit

D_V = 512


def case(b, s_q, h_q, s_k, causal, d_qk, with_xla, seed=0):
    q, kv16, table, lens, np_lens = make_inputs(seed, b, s_q, h_q, s_k, True)
    q = q[..., :d_qk]
    kv16 = kv16[..., :d_qk]
    fp8 = kvc.quantize_fp8(kv16)
    meta = jax_flashmla.get_mla_metadata(lens, s_q=s_q, h_q=h_q)   # once per step in a model
    route = jax.jit(lambda q, kv, t, l: jax_flashmla.mla_decode(q, kv, t, l, causal=causal,
                                                                metadata=meta,
                                                                implementation="kernel"))
    ref = jax.jit(lambda q, kv, t, l: jax_flashmla.mla_decode(q, kv, t, l, causal=causal,
                                                              implementation="reference"))
    out, lse = route(q, fp8, table, lens)
    r_out, r_lse = ref(q, fp8, table, lens)
    err = float(jnp.linalg.norm((out - r_out).astype(jnp.float32))
                / jnp.linalg.norm(r_out.astype(jnp.float32)))
    t_route, t_min, t_max = timeit(route, q, fp8, table, lens)
    row = dict(b=b, s_q=s_q, h_q=h_q, s_k=s_k, causal=causal, d_qk=d_qk,
               route_us=t_route * 1e6, route_min_us=t_min * 1e6, route_max_us=t_max * 1e6,
               rel_l2_vs_reference=err)
    tokens = int(np_lens.sum())
    row["fp8_gbs"] = (tokens * fp8.shape[-1] + q.size * 2 + b * s_q * h_q * D_V * 2) / t_route / 1e9
    row["tflops"] = s_q * h_q * (2 * d_qk + 2 * D_V) * tokens / t_route / 1e12
    if d_qk == 576:   # the same values in a bf16 cache, on the dense kernel (with its metadata)
        bf16 = kvc.dequantize_fp8(fp8).astype(jnp.bfloat16)
        dense = jax.jit(lambda q, kv, t, l, m: jax_flashmla.mla_decode(
            q, kv, t, l, causal=causal, metadata=m, implementation="kernel"))
        row["dense_bf16_us"] = timeit(dense, q, bf16, table, lens, meta)[0] * 1e6
        del bf16
    if with_xla:
        try:
            row["reference_us"] = timeit(ref, q, fp8, table, lens, n=3, reps=3)[0] * 1e6
        except Exception as e:  # noqa: BLE001 (out of memory on the biggest shapes)
            print(f"  reference failed: {type(e).__name__}")
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-xla", action="store_true")
    args = ap.parse_args()
    if not dense_as_sparse.enabled():
        raise SystemExit(f"{dense_as_sparse.ENABLE} turns the route off; unset it")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    shapes = [(64, 1, h, s, False) for h in (16, 32, 64, 128) for s in (4096, 8192)]
    shapes += [(64, 2, 128, 4096, True), (64, 2, 32, 4096, False), (2, 1, 128, 65536, False)]
    if args.quick:
        shapes = [shapes[0], shapes[6], shapes[8]]
    rows = []
    for d_qk in (576, 512):
        for b, s_q, h_q, s_k, causal in shapes:
            r = case(b, s_q, h_q, s_k, causal, d_qk, not args.no_xla)
            rows.append(r)
            extra = "".join(f" {k} {r[k]:8.1f}" for k in ("dense_bf16_us", "reference_us") if k in r)
            print(f"d{d_qk} b{b} s_q{s_q} h{h_q} s_k{s_k}{' causal' if causal else ''}: route "
                  f"{r['route_us']:8.1f} us ({r['fp8_gbs']:6.0f} GB/s, {r['tflops']:5.1f} TFLOPS, "
                  f"err {r['rel_l2_vs_reference']:.1e}){extra}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, rows=rows,
                           env={dense_as_sparse.ENABLE: os.environ.get(dense_as_sparse.ENABLE)}),
                      f, indent=1)


if __name__ == "__main__":
    main()
