"""Run under compute-sanitizer (scripts/device_check.sh, stage memcheck): a representative subset of
dense-decode calls (zero-length sequences, causal, h_kv > 1, h_q not a multiple of 64, split and
unsplit sequences, out-of-range table tails, NaN rows), each checked against the float64 NumPy
oracle (no XLA reference: its compilation under the sanitizer is slow).
Use XLA_PYTHON_CLIENT_ALLOCATOR=platform so every buffer is its own allocation (an access past a
buffer is then outside any allocation, which memcheck reports)."""
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import oracle  # noqa: E402
import test_dense_decode_gpu as t  # noqa: E402

CASES = [  # (b, s_q, h_q, h_kv, s_k, varlen, causal, dtype, with_meta, zero_frac)
    (6, 1, 128, 1, 700, True, False, jnp.bfloat16, True, 0.3),
    (2, 4, 63, 3, 140, True, True, jnp.float16, False, 0.0),
    (3, 2, 16, 1, 20, False, True, jnp.bfloat16, True, 0.0),
    (16, 1, 64, 2, 300, True, False, jnp.bfloat16, False, 0.2),
    (4, 2, 128, 8, 90, True, True, jnp.float16, True, 0.0),
]
for n, (b, s_q, h_q, h_kv, s_k, varlen, causal, dtype, meta, zf) in enumerate(CASES):
    case = t.make_case(900 + n, b, s_q, h_q, h_kv, s_k, varlen, dtype, zf)
    out, lse = t.run_kernel(case, causal, meta)
    ref_out, ref_lse = oracle.dense_decode(
        np.asarray(case["q"].astype(jnp.float32)), np.asarray(case["kv"].astype(jnp.float32)),
        case["np_table"], case["np_lens"], scale=t.D_QK ** -0.5, d_v=t.D_V, causal=causal)
    t.check(out, lse, ref_out, ref_lse, dtype)
    print(f"case {n} ok", flush=True)
print("memcheck cases done")
