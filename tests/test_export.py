"""jax.export of functions that call the ops (jax_flashmla/exporting.py): exported, serialized,
deserialized and run on CPU, the artifact gives the jitted function's results; a CUDA lowering with
the kernels (cross-lowered here, as tests/test_kernel_lowering.py does) serializes only with the
ops' safety checks disabled, and every FFI target the C++ side defines is among them. The sharded
forms are in tests/sharding_cases.py (8 CPU devices)."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import _ffi, exporting
from jax_flashmla import kv_cache as kvc

pytest.importorskip("flatbuffers")  # jax's serialization needs it (the [test] extra installs it)

HERE = os.path.dirname(os.path.abspath(__file__))


def dense_args(rng):
    b, h = 4, 16
    q = jnp.asarray(rng.standard_normal((b, 2, h, 576)), jnp.bfloat16)
    kv = rng.standard_normal((9, 64, 1, 576)).astype(np.float32)
    kv[8] = np.nan                                    # no table entry names page 8
    table = rng.permutation(8).reshape(b, 2).astype(np.int32)
    lens = np.array([5, 100, 0, 128], np.int32)
    return q, jnp.asarray(kv, jnp.bfloat16), jnp.asarray(table), jnp.asarray(lens)


def sparse_args(rng):
    b, s_q, h, k = 3, 2, 16, 40
    q = jnp.asarray(rng.standard_normal((b, s_q, h, 576)), jnp.bfloat16)
    cache = kvc.quantize_fp8(jnp.asarray(rng.standard_normal((5, 61, 1, 576)), jnp.bfloat16))
    idx = rng.integers(-1, 5 * 61 + 2, size=(b, s_q, k)).astype(np.int32)
    lens = np.array([k, 7, 0], np.int32)
    sink = rng.standard_normal(h).astype(np.float32)
    return q, cache, jnp.asarray(idx), jnp.asarray(lens), jnp.asarray(sink)


def dense_step(q, kv, table, lens):
    md = jfm.get_mla_metadata(lens, s_q=q.shape[1], h_q=q.shape[2])
    return jfm.mla_decode(q, kv, table, lens, causal=True, metadata=md)


def sparse_step(q, cache, idx, lens, sink):
    return jfm.mla_decode(q, cache, indices=idx, topk_length=lens, attn_sink=sink)


def prefill_step(q, kv, idx):
    return jfm.sparse_mla_prefill(q, kv, idx)


def prefill_args(rng):
    q = jnp.asarray(rng.standard_normal((6, 16, 512)), jnp.bfloat16)
    kv = jnp.asarray(rng.standard_normal((50, 1, 512)), jnp.bfloat16)
    idx = jnp.asarray(rng.integers(-3, 53, size=(6, 1, 24)).astype(np.int32))
    return q, kv, idx


def assert_same(got, want):
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def custom_call_targets(exported) -> set[str]:
    return set(re.findall(r"custom_call @(\w+)", exported.mlir_module()))


@pytest.mark.parametrize("step,make_args", [(dense_step, dense_args), (sparse_step, sparse_args),
                                            (prefill_step, prefill_args)],
                         ids=["dense", "sparse_fp8", "prefill"])
def test_cpu_export_round_trip(rng, step, make_args):
    args = make_args(rng)
    want = jax.jit(step)(*args)
    blob = jfm.export(jax.jit(step), platforms=("cpu",))(*args).serialize()
    got = jfm.deserialize(blob).call(*args)
    assert_same(got, want)
    assert np.isfinite(np.asarray(got[0], np.float32)).all()   # the poisoned rows stayed out


def test_cuda_kernels_need_the_safety_checks(kernels_on, rng):
    args = dense_args(rng)
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
        jax.export.export(jax.jit(dense_step), platforms=("cuda",))(*args)
    exported = jfm.export(jax.jit(dense_step), platforms=("cuda",))(*args)
    assert custom_call_targets(exported) == {"jax_flashmla_mla_metadata", "jax_flashmla_dense_decode"}


def test_multi_platform_artifact_runs_its_cpu_lowering(kernels_on, rng):
    """One artifact for ("cuda", "cpu") holds the kernels' custom calls and the reference; on a
    CPU it runs the latter and gives the jitted reference's results."""
    args = sparse_args(rng)
    want = jax.jit(sparse_step)(*args)
    exported = jfm.export(jax.jit(sparse_step), platforms=("cuda", "cpu"))(*args)
    assert exported.platforms == ("cuda", "cpu")
    assert custom_call_targets(exported) == {"jax_flashmla_mla_metadata",
                                             "jax_flashmla_sparse_decode"}
    assert_same(jfm.deserialize(exported.serialize()).call(*args), want)


def test_prefill_cuda_lowering_serializes(kernels_on, rng):
    args = prefill_args(rng)
    exported = jfm.export(jax.jit(prefill_step), platforms=("cuda",))(*args)
    assert custom_call_targets(exported) == {"jax_flashmla_sparse_prefill"}
    jfm.deserialize(exported.serialize())   # no compile: nothing can run it here


def test_safety_checks_cover_every_target_the_extension_defines():
    """csrc/ffi/handlers.h lists the extension's targets; the built extension (where there is
    one) reports the same; exporting.FFI_TARGETS must name each of them."""
    with open(os.path.join(HERE, "..", "csrc", "ffi", "handlers.h")) as f:
        in_cpp = set(re.findall(r"X\((jax_flashmla_\w+),", f.read()))
    assert len(in_cpp) >= 4 and in_cpp == set(exporting.FFI_TARGETS)
    module = _ffi.extension()
    if module is not None:
        assert set(module.ffi_targets()) == in_cpp
    checks = jfm.export_safety_checks()
    assert len(checks) == len(in_cpp)
    assert all(isinstance(c, jax.export.DisabledSafetyCheck) for c in checks)


def test_other_not_implemented_errors_pass_through(monkeypatch, rng):
    def boom(*a, **k):
        def inner(*args, **kw):
            raise NotImplementedError("something else")
        return inner

    monkeypatch.setattr(exporting.jax_export, "export", boom)
    with pytest.raises(NotImplementedError, match="something else"):
        jfm.export(jax.jit(dense_step))(*dense_args(rng))


def test_deserialize_on_a_gpu_without_the_extension_says_why(kernels_on, monkeypatch, rng):
    """An artifact holding the kernels, loaded on a GPU backend where the extension is missing:
    refused at deserialize with the extension's reason, not at XLA's compile."""
    blob = jfm.export(jax.jit(dense_step), platforms=("cuda", "cpu"))(*dense_args(rng)).serialize()
    monkeypatch.setattr(_ffi, "_load", lambda: (None, "the CUDA extension is not built (test)"))
    jfm.deserialize(blob)                                     # a CPU backend runs the CPU part
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(RuntimeError, match=r"calls the CUDA kernels \(jax_flashmla_mla_metadata, "
                                           r"jax_flashmla_dense_decode\) but the CUDA extension "
                                           r"is not built \(test\)"):
        jfm.deserialize(blob)
    cpu_only = jfm.export(jax.jit(dense_step), platforms=("cpu",))(*dense_args(rng)).serialize()
    jfm.deserialize(cpu_only)                                 # nothing of ours in it: fine
