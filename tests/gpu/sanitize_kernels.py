"""Run under compute-sanitizer (scripts/device_check.sh, stages memcheck / racecheck /
synccheck), and without it as the first smoke test of a kernel variant (stage smoke): a
representative subset of every kernel's calls (dense decode: zero-length sequences, causal,
h_kv > 1, odd h_q, split and unsplit, out-of-range table entries and page ids, NaN rows; sparse
decode: both FP8 layouts and bf16, two pools, odd page sizes, invalid indices; sparse prefill),
each checked against the reference. Use XLA_PYTHON_CLIENT_ALLOCATOR=platform so every buffer is
its own allocation (an access past a buffer is then outside any allocation, which memcheck
reports).

`--write-refs DIR` (a run without the sanitizer) also saves every reference result in DIR; with
JFM_SANITIZE_REFS=DIR a later run reads them instead of computing them, so a run under the
sanitizer compiles only the kernels' small XLA modules (compiles under compute-sanitizer are what
stalled; scripts/device_check.sh does both)."""
import os
import sys

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import cases  # noqa: E402
import numpy as np  # noqa: E402

WRITE_REFS = sys.argv[sys.argv.index("--write-refs") + 1] if "--write-refs" in sys.argv else None
READ_REFS = os.environ.get("JFM_SANITIZE_REFS") if WRITE_REFS is None else None
if WRITE_REFS:
    os.makedirs(WRITE_REFS, exist_ok=True)


def reference(name, compute):
    """The reference result `name`: computed (and saved with --write-refs) or read back."""
    if READ_REFS:
        with np.load(os.path.join(READ_REFS, name + ".npz")) as f:
            return tuple(f[f"arr_{i}"] for i in range(len(f.files)))
    result = tuple(np.asarray(x) for x in compute())
    if WRITE_REFS:
        np.savez(os.path.join(WRITE_REFS, name + ".npz"), *result)
    return result


DENSE = [  # (b, s_q, h_q, h_kv, s_k, varlen, causal, dtype, with_meta, zero_frac)
    (6, 1, 128, 1, 700, True, False, jnp.bfloat16, True, 0.3),
    (2, 4, 63, 3, 140, True, True, jnp.float16, False, 0.0),
    (3, 2, 16, 1, 20, False, True, jnp.bfloat16, True, 0.0),
    (16, 1, 64, 2, 300, True, False, jnp.bfloat16, False, 0.2),
    (5, 1, 8, 1, 500, True, False, jnp.bfloat16, True, 0.2),   # 8 rows (transposed math, N 16)
]
for n, (b, s_q, h_q, h_kv, s_k, varlen, causal, dtype, meta, zf) in enumerate(DENSE):
    case = cases.dense_case(900 + n, b, s_q, h_q, h_kv, s_k, varlen, dtype, zf)
    got = cases.run_dense(case, causal, meta)
    ref = reference(f"dense{n}", lambda: cases.run_dense(case, causal, False, "reference"))
    cases.check(*got, *ref, dtype)
    print(f"dense case {n} ok", flush=True)

# Malformed runtime values (SEMANTICS.md): page ids outside the pool inside the length, a length
# beyond the table's capacity and a negative one; they must be absent / clamped, never read.
bad = cases.dense_case(970, 4, 2, 16, 1, 300, True, jnp.bfloat16)
bad["kv"] = jnp.where(jnp.isnan(bad["kv"]), 0.25, bad["kv"]).astype(jnp.bfloat16)
table, lens = np.array(bad["np_table"]), np.array(bad["np_lens"])
table[0, 1], table[1, 0], table[2, :] = bad["kv"].shape[0] + 99, -7, -1
lens[3], lens[1] = table.shape[1] * 64 + 500, -5
bad.update(table=jnp.asarray(table), lens=jnp.asarray(lens))
for causal in (False, True):
    got = cases.run_dense(bad, causal, True)
    cases.check(*got, *reference(f"malformed_{causal}",
                                 lambda: cases.run_dense(bad, causal, False, "reference")))
print("dense malformed case ok", flush=True)

SPARSE = [  # keyword arguments of cases.sparse_decode_case
    dict(b=3, s_q=2, h_q=128, d_qk=576, fmt="fp8", topk=300, page=61, with_lengths=True, sink="inf"),
    dict(b=2, s_q=1, h_q=16, d_qk=512, fmt="fp8", topk=100, page=3, extra_topk=70, extra_page=2,
         with_lengths=True, sink="random"),
    dict(b=4, s_q=3, h_q=100, d_qk=576, fmt="bf16", topk=64, page=256),
    dict(b=3, s_q=2, h_q=32, d_qk=576, fmt="fp8", topk=200, page=64, with_lengths=True),
    # V3.2 at <= 16 heads: the 16-row kernel with the V3.2 producer (JFM_V32_ROW8 changes it).
    dict(b=2, s_q=2, h_q=12, d_qk=576, fmt="fp8", topk=150, page=61, with_lengths=True,
         sink="random"),
    # 65-128 heads on FP8: two row blocks, with and without a schedule. V4's 312 tiles make the
    # default run CTA pairs (sparse/dispatch.cu: at least 4 per schedule part); JFM_KERNEL_VARIANT=pair
    # runs V3.2's as pairs too.
    dict(b=12, s_q=2, h_q=96, d_qk=512, fmt="fp8", topk=130, page=64, extra_topk=600, extra_page=5),
    dict(b=3, s_q=1, h_q=80, d_qk=576, fmt="fp8", topk=190, page=2, with_lengths=True),
    # V4 at 33-64 heads: the unpaired FP8 role split (kRolesWide) on the V4 layout, which stages
    # unsplit tokens' rows for TMA stores (JFM_FP8_TMA_OUT=1, the default; under =0 its scores
    # warpgroup stores them 16 bytes at a time): without metadata (odd index), then with a schedule
    # that splits some tokens and not others (even index: on 132 SMs, 111 of the 148 tokens; at
    # b 40 it had split none).
    dict(b=5, s_q=2, h_q=64, d_qk=512, fmt="fp8", topk=200, page=64, extra_topk=130,
         extra_page=61, with_lengths=True, sink="random"),
    dict(b=74, s_q=2, h_q=48, d_qk=512, fmt="fp8", topk=300, page=64, extra_topk=100,
         extra_page=2, sink="inf"),
    # V3.2 at 33-64 heads: its kRolesWide, whose rows are stored per thread by default and staged
    # for TMA (lean form, SparseWsTask::stage_rows) under JFM_FP8_TMA_OUT=2: without metadata,
    # then with a schedule that splits 99 of the 148 tokens (132 SMs).
    dict(b=5, s_q=2, h_q=64, d_qk=576, fmt="fp8", topk=200, page=64, with_lengths=True,
         sink="random"),
    dict(b=74, s_q=2, h_q=40, d_qk=576, fmt="fp8", topk=300, page=61, sink="inf"),
]
for n, kw in enumerate(SPARSE):
    q, kv, args = cases.sparse_decode_case(950 + n, **kw)
    got = cases.run_sparse_decode(q, kv, args, with_meta=n % 2 == 0)
    ref = reference(f"sparse{n}", lambda: cases.run_sparse_decode(
        q, kv, args, implementation="reference", with_meta=False))
    cases.check(*got, *ref)
    print(f"sparse decode case {n} ok", flush=True)

# Dense calls the dense kernel does not read, on the sparse kernel (ops/kernels/dense_as_sparse.py,
# switched on here): index lists of whole tables (topk = capacity, -1 tails), the step's dense
# schedule reused (s_q 1) or the call's own (causal MTP), malformed lengths and page ids.
os.environ["JAX_FLASHMLA_DENSE_AS_SPARSE"] = "1"
for n, (kw, causal, meta) in enumerate([
        (dict(b=6, s_q=1, h_q=128, d_qk=576, fp8=True, page=61, s_k=300, sink=True), False, True),
        (dict(b=5, s_q=2, h_q=16, d_qk=512, fp8=True, page=64, s_k=200, sink=False), True, True),
        (dict(b=5, s_q=3, h_q=16, d_qk=576, fp8=False, page=2, s_k=90, sink=False), False, False)]):
    case = cases.dense_route_case(940 + n, **kw)
    got = cases.run_dense_route(case, causal, with_meta=meta)
    cases.check(*got, *reference(f"dense_route{n}",
                                 lambda: cases.run_dense_route(case, causal, "reference")))
    print(f"dense-as-sparse case {n} ok", flush=True)

for n, kw in enumerate([dict(s_q=70, h_q=128, d_qk=576, topk=200, with_lengths=True, sink="inf"),
                        dict(s_q=5, h_q=24, d_qk=512, topk=64),
                        dict(s_q=9, h_q=64, d_qk=512, topk=130, with_lengths=True)]):
    q, kv, idx, extra = cases.sparse_prefill_case(980 + n, **kw)
    out, ml, lse = cases.run_sparse_prefill(q, kv, idx, extra)
    r = reference(f"prefill{n}", lambda: cases.run_sparse_prefill(q, kv, idx, extra, "reference"))
    cases.check(out, lse, r[0], r[2], max_logits=ml, ref_max_logits=r[1])
    print(f"sparse prefill case {n} ok", flush=True)
print("sanitizer cases done")
