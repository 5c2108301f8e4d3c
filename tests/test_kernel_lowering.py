"""The kernels' CUDA lowerings, exercised on a CPU machine: cross-lower each op for platform
'cuda' with the kernels reported available, and check which FFI custom calls the module holds
(the scheduler first when no metadata is passed, absent optional operands as zero-size buffers,
the split-KV workspace sized for the schedule), and that a call no kernel covers falls back to the
reference with the kernels' reasons. Nothing runs: this catches lowering bugs before a GPU does."""
import re

import jax
import jax.numpy as jnp
import pytest

import jax_flashmla
from jax_flashmla.ops import _primitive


def cuda_hlo(f, *args):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def targets(hlo):
    return re.findall(r'custom_call_target="(jax_flashmla_[a-z_]+)"', hlo) + \
        re.findall(r"stablehlo.custom_call @(jax_flashmla_[a-z_]+)", hlo)


def test_dense_decode_lowers_to_scheduler_then_kernel(kernels_on):
    q = jnp.zeros((3, 1, 16, 576), jnp.bfloat16)
    kv = jnp.zeros((5, 64, 1, 576), jnp.bfloat16)
    table, lens = jnp.zeros((3, 2), jnp.int32), jnp.zeros((3,), jnp.int32)
    hlo = cuda_hlo(lambda *a: jax_flashmla.mla_decode(*a, implementation="kernel"), q, kv, table, lens)
    assert targets(hlo) == ["jax_flashmla_mla_metadata", "jax_flashmla_dense_decode"]
    # workspace: (b + 132 parts) slots of s_q * h_q rows, float32
    assert f"tensor<{(3 + 132) * 16 * 512}xf32>" in hlo
    md = jax_flashmla.get_mla_metadata(lens, h_q=16)
    hlo = cuda_hlo(lambda *a: jax_flashmla.mla_decode(*a[:4], metadata=a[4], implementation="kernel"),
                   q, kv, table, lens, md)
    assert targets(hlo) == ["jax_flashmla_dense_decode"]


@pytest.mark.parametrize("d_qk,width", [(576, 656), (512, 584)])
def test_sparse_decode_lowering_with_absent_operands(kernels_on, d_qk, width):
    b, s_q, h_q = 2, 2, 16
    q = jnp.zeros((b, s_q, h_q, d_qk), jnp.bfloat16)
    kv = jnp.zeros((7, 61, 1, width), jnp.uint8)
    idx = jnp.zeros((b, s_q, 100), jnp.int32)
    hlo = cuda_hlo(lambda q, kv, i: jax_flashmla.mla_decode(q, kv, indices=i, implementation="kernel"),
                   q, kv, idx)
    assert targets(hlo) == ["jax_flashmla_mla_metadata", "jax_flashmla_sparse_decode"]
    assert "tensor<0xui8>" in hlo and "tensor<0xf32>" in hlo and "tensor<0xi32>" in hlo
    extra = jnp.zeros((3, 2, 1, width), jnp.uint8)
    md = jax_flashmla.get_mla_metadata(jnp.zeros((b,), jnp.int32), s_q=s_q, h_q=h_q, topk=100,
                                       extra_topk=5)
    hlo = cuda_hlo(lambda q, kv, i, e, ei, s, m: jax_flashmla.mla_decode(
        q, kv, indices=i, extra_kv_cache=e, extra_indices=ei, attn_sink=s, metadata=m,
        implementation="kernel"), q, kv, idx, extra, jnp.zeros((b, s_q, 5), jnp.int32),
        jnp.zeros((h_q,), jnp.float32), md)
    assert targets(hlo) == ["jax_flashmla_sparse_decode"]


def test_weighted_schedule_lowering(kernels_on):
    """topk lengths reach the scheduler as its live table [b * s_q, 3] (get_mla_metadata, and the
    sparse op's own schedule when no metadata is passed); without them the table is absent."""
    b, s_q = 3, 2
    lens = jnp.zeros((b,), jnp.int32)
    tl = jnp.zeros((b,), jnp.int32)
    hlo = cuda_hlo(lambda l, t: tuple(jax_flashmla.get_mla_metadata(
        l, s_q=s_q, h_q=64, topk=128, extra_topk=64, extra_topk_length=t, implementation="kernel")),
        lens, tl)
    assert targets(hlo) == ["jax_flashmla_mla_metadata"] and f"tensor<{b * s_q}x3xi32>" in hlo
    hlo = cuda_hlo(lambda l: tuple(jax_flashmla.get_mla_metadata(
        l, s_q=s_q, h_q=64, topk=128, implementation="kernel")), lens)
    assert f"x3xi32>" not in hlo and "tensor<0xi32>" in hlo
    q = jnp.zeros((b, s_q, 16, 512), jnp.bfloat16)
    kv = jnp.zeros((7, 61, 1, 584), jnp.uint8)
    idx = jnp.zeros((b, s_q, 100), jnp.int32)
    hlo = cuda_hlo(lambda q, kv, i, t: jax_flashmla.mla_decode(q, kv, indices=i, topk_length=t,
                                                               implementation="kernel"), q, kv, idx, tl)
    assert targets(hlo) == ["jax_flashmla_mla_metadata", "jax_flashmla_sparse_decode"]
    assert f"tensor<{b * s_q}x3xi32>" in hlo


def test_sparse_prefill_lowering(kernels_on):
    q = jnp.zeros((9, 16, 512), jnp.bfloat16)
    kv = jnp.zeros((40, 1, 512), jnp.bfloat16)
    idx = jnp.zeros((9, 1, 7), jnp.int32)
    hlo = cuda_hlo(lambda *a: jax_flashmla.sparse_mla_prefill(*a, implementation="kernel"), q, kv, idx)
    assert targets(hlo) == ["jax_flashmla_sparse_prefill"]


def test_uncovered_call_falls_back_with_every_kernels_reason(kernels_on):
    q = jnp.zeros((2, 1, 16, 576), jnp.float16)
    kv = jnp.zeros((5, 64, 2, 576), jnp.float16)
    idx = jnp.zeros((2, 1, 8), jnp.int32)
    f = lambda q, kv, i: jax_flashmla.mla_decode(q, kv, indices=i, implementation="kernel")
    with pytest.raises(ValueError, match=r"dense_decode kernel does not cover.*sparse_decode kernel "
                                         r"does not cover this call: it needs bf16 queries"):
        cuda_hlo(f, q, kv, idx)
    with pytest.warns(_primitive.KernelFallbackWarning):
        hlo = cuda_hlo(lambda q, kv, i: jax_flashmla.mla_decode(q, kv, indices=i), q, kv, idx)
    assert targets(hlo) == []


@pytest.mark.parametrize("d_qk,width", [(576, 656), (512, 584)])
def test_dense_fp8_lowers_to_the_sparse_kernel(kernels_on, monkeypatch, d_qk, width):
    """Dense calls the dense kernel does not read (here FP8 caches, page 61) run as sparse decode
    over every token (ops/kernels/dense_as_sparse.py): non-causal MTP rides as extra heads and
    then reuses a dense schedule passed in (one query token per sparse sequence); causal MTP (one
    sequence per query) schedules its own. Turned off, the reason names the switch."""
    b, s_q, h_q = 3, 2, 16
    q = jnp.zeros((b, s_q, h_q, d_qk), jnp.bfloat16)
    kv = jnp.zeros((5, 61, 1, width), jnp.uint8)
    table, lens = jnp.zeros((b, 4), jnp.int32), jnp.zeros((b,), jnp.int32)
    f = lambda *a: jax_flashmla.mla_decode(*a, implementation="kernel")
    monkeypatch.setenv("JAX_FLASHMLA_DENSE_AS_SPARSE", "0")
    with pytest.raises(ValueError, match="turned off.*JAX_FLASHMLA_DENSE_AS_SPARSE=0"):
        cuda_hlo(f, q, kv, table, lens)
    monkeypatch.delenv("JAX_FLASHMLA_DENSE_AS_SPARSE")
    hlo = cuda_hlo(f, q, kv, table, lens)
    assert targets(hlo) == ["jax_flashmla_mla_metadata", "jax_flashmla_sparse_decode"]
    assert f"tensor<{b}x1x{s_q * h_q}x{d_qk}xbf16>" in hlo and f"tensor<{b}x1x{4 * 61}xi32>" in hlo
    causal = cuda_hlo(lambda *a: jax_flashmla.mla_decode(*a, causal=True, implementation="kernel"),
                      q, kv, table, lens)
    assert f"tensor<{b}x{s_q}x{4 * 61}xi32>" in causal
    md = jax_flashmla.get_mla_metadata(lens, s_q=s_q, h_q=h_q)
    for causal, want in ((False, ["jax_flashmla_sparse_decode"]),
                         (True, ["jax_flashmla_mla_metadata", "jax_flashmla_sparse_decode"])):
        hlo = cuda_hlo(lambda *a: jax_flashmla.mla_decode(*a[:4], metadata=a[4], causal=causal,
                                                          implementation="kernel"),
                       q, kv, table, lens, md)
        assert targets(hlo) == want, causal
    # what the dense kernel covers stays on it
    q16, kv16 = jnp.zeros((b, 1, h_q, 576), jnp.bfloat16), jnp.zeros((5, 64, 1, 576), jnp.bfloat16)
    assert targets(cuda_hlo(f, q16, kv16, table, lens)) == ["jax_flashmla_mla_metadata",
                                                           "jax_flashmla_dense_decode"]
