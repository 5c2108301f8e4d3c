"""GPU tests of jax.export (jax_flashmla/exporting.py): a step exported on the GPU holds the
kernels' custom calls; deserialized in a fresh process (only the artifact: the step is never
traced there) it runs on the kernels and gives the jitted step's results bitwise (the kernels are
deterministic). Skipped cleanly unless jax sees a Hopper GPU and the extension is built."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import kv_cache as kvc
from cases import require_kernels

pytestmark = pytest.mark.gpu
require_kernels()
pytest.importorskip("flatbuffers")

# Inputs travel as float32 / integers with their dtype names (npz has no bfloat16).
LOADER = """
import sys, numpy as np, jax.numpy as jnp, jax_flashmla as jfm
data = np.load(sys.argv[2])
dtypes = str(data["dtypes"]).split(",")
args = [jnp.asarray(data[f"a{i}"], dtypes[i]) for i in range(len(dtypes))]
with open(sys.argv[1], "rb") as f:
    out = jfm.deserialize(f.read()).call(*args)
np.savez(sys.argv[3], *[np.asarray(o, np.float32) for o in out])
"""


def sparse_step(q, cache, idx, lens, sink):
    md = jfm.get_mla_metadata(lens, s_q=q.shape[1], h_q=q.shape[2], topk=idx.shape[-1],
                              topk_length=lens)
    return jfm.mla_decode(q, cache, indices=idx, topk_length=lens, attn_sink=sink, metadata=md)


def dense_step(q, kv, table, lens):
    return jfm.mla_decode(q, kv, table, lens, causal=True)


def sparse_args(rng):
    b, s_q, h, k = 8, 2, 64, 300
    q = rng.standard_normal((b, s_q, h, 576)).astype(np.float32)
    cache = kvc.quantize_fp8(jnp.asarray(rng.standard_normal((40, 64, 1, 576)), jnp.bfloat16))
    idx = rng.integers(-1, 40 * 64 + 5, size=(b, s_q, k)).astype(np.int32)
    lens = rng.integers(0, k + 1, size=b).astype(np.int32)
    sink = rng.standard_normal(h).astype(np.float32)
    return [jnp.asarray(q, jnp.bfloat16), cache, jnp.asarray(idx), jnp.asarray(lens),
            jnp.asarray(sink)]


def dense_args(rng):
    b, h = 6, 128
    q = rng.standard_normal((b, 2, h, 576)).astype(np.float32)
    kv = rng.standard_normal((30, 64, 1, 576)).astype(np.float32)
    table = rng.permutation(30)[:b * 5].reshape(b, 5).astype(np.int32)
    lens = rng.integers(0, 5 * 64 + 1, size=b).astype(np.int32)
    return [jnp.asarray(q, jnp.bfloat16), jnp.asarray(kv, jnp.bfloat16), jnp.asarray(table),
            jnp.asarray(lens)]


@pytest.mark.parametrize("step,make_args,targets", [
    (sparse_step, sparse_args, {"jax_flashmla_mla_metadata", "jax_flashmla_sparse_decode"}),
    (dense_step, dense_args, {"jax_flashmla_mla_metadata", "jax_flashmla_dense_decode"}),
], ids=["sparse_fp8", "dense_causal"])
def test_exported_kernels_run_in_a_fresh_process(tmp_path, rng, step, make_args, targets):
    args = make_args(rng)
    want = [np.asarray(o, np.float32) for o in jax.jit(step)(*args)]
    exported = jfm.export(jax.jit(step), platforms=("cuda",))(*args)
    assert set(re.findall(r"custom_call @(\w+)", exported.mlir_module())) == targets
    blob, inputs, result = tmp_path / "step.jax", tmp_path / "in.npz", tmp_path / "out.npz"
    blob.write_bytes(exported.serialize())
    np.savez(inputs, dtypes=",".join(str(a.dtype) for a in args),
             **{f"a{i}": np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a)
                for i, a in enumerate(args)})
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    r = subprocess.run([sys.executable, "-c", LOADER, str(blob), str(inputs), str(result)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    got = np.load(result)
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got[f"arr_{i}"], w)
    assert np.isfinite(want[0]).all()
