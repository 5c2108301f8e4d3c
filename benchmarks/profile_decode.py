"""One dense-decode case, run a few times, for Nsight Compute (scripts/device_check.sh, stage ncu):
  ncu --kernel-name regex:dense_decode --launch-skip 2 --launch-count 1 ... \
      python3 benchmarks/profile_decode.py --h_q 128 --s_k 4096
"""
import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402

import jax_flashmla  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--b", type=int, default=128)
ap.add_argument("--s_q", type=int, default=1)
ap.add_argument("--h_q", type=int, default=128)
ap.add_argument("--s_k", type=int, default=4096)
ap.add_argument("--causal", action="store_true")
args = ap.parse_args()
q, kv, table, lens, _ = bd.make_inputs(0, args.b, args.s_q, args.h_q, args.s_k, True)
meta = jax_flashmla.get_mla_metadata(lens, s_q=args.s_q, h_q=args.h_q)
op = jax.jit(lambda q, kv, t, l, m: jax_flashmla.mla_decode(
    q, kv, t, l, causal=args.causal, metadata=m, implementation="kernel"))
for _ in range(4):
    jax.block_until_ready(op(q, kv, table, lens, meta))
print("profiled case done")
