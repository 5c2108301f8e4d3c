"""GPU tests of calls that read what the kernel just before them wrote: in one jit, each call's q
(and the dense cache, or the sparse indices) comes from an XLA kernel that runs right before it and
reads the previous call's output, the way one layer feeds the next in a model. Each call's output
is then checked against the reference on the inputs the jit actually gave it. A kernel that read
its inputs before the previous kernel's writes were complete (the programmatic dependent launch of
the attention kernels, JFM_PDL_MAIN in csrc/kernels/pdl.cuh, waits for them) would read stale or
half-written q, cache or indices here. Skipped cleanly unless jax sees a Hopper GPU and the
extension is built."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_flashmla
from cases import check, dense_case, require_kernels, run_dense, run_sparse_decode
from cases import run_sparse_prefill, sparse_decode_case, sparse_prefill_case

pytestmark = pytest.mark.gpu
require_kernels()
LAYERS = 4


def next_q(q, out):
    """The next call's q from this one's output (an XLA fusion between the two calls)."""
    d_qk = q.shape[-1]
    grown = jnp.concatenate([out, out[..., :d_qk - out.shape[-1]]], axis=-1).astype(jnp.float32)
    return (0.5 * q.astype(jnp.float32) + 2.0 * grown).astype(q.dtype)


@pytest.mark.parametrize("h_q,s_q,causal,with_meta", [(128, 1, False, True), (128, 2, True, False),
                                                      (16, 1, False, True), (64, 4, True, True)])
def test_dense_chain(h_q, s_q, causal, with_meta):
    """Each call's q from the previous output and its cache rewritten (every element, one XLA
    kernel) right before it; the schedule computed in the same jit, or inside the call."""
    case = dense_case(4100 + h_q + s_q, 8, s_q, h_q, 1, 3000, True, jnp.bfloat16)
    lens, table = case["lens"], case["table"]

    @jax.jit
    def chain(q, kv):
        meta = jax_flashmla.get_mla_metadata(lens, s_q=s_q, h_q=h_q) if with_meta else None
        ins, outs = [], []
        for layer in range(LAYERS):
            if layer:
                q = next_q(q, outs[-1][0])
                kv = (kv.astype(jnp.float32) * -0.75).astype(kv.dtype)  # NaN rows stay NaN
            ins.append((q, kv))
            outs.append(jax_flashmla.mla_decode(q, kv, table, lens, causal=causal, metadata=meta,
                                                implementation="kernel"))
        return ins, outs

    ins, outs = chain(case["q"], case["kv"])
    for (q, kv), (out, lse) in zip(ins, outs):
        ref_out, ref_lse = run_dense(dict(case, q=q, kv=kv), causal, False, "reference")
        check(np.asarray(out.astype(jnp.float32)), np.asarray(lse), ref_out, ref_lse)


# b 64 at V4 h128: 384 tiles, enough per schedule part for the CTA pair (sparse/dispatch.cu), the
# kernel whose producer reads the first indices before its shared-memory setup; at b 4 the two row
# blocks run unpaired.
@pytest.mark.parametrize("b,h_q,d_qk,s_q,two_pools", [(4, 128, 576, 2, False), (4, 128, 512, 1, True),
                                                      (64, 128, 512, 1, True), (4, 64, 512, 2, True),
                                                      (4, 16, 576, 1, False)])
def test_sparse_decode_chain(b, h_q, d_qk, s_q, two_pools):
    """FP8 sparse decode (two row blocks at 128 heads, paired or not; one at 64; the transposed
    kernel at 16): each call's q from the previous output and its indices made by an XLA kernel
    right before it (a different third of each list dropped to -1 per layer, as a fresh top-k
    would change the list)."""
    q, kv, args = sparse_decode_case(
        4200 + b + h_q + d_qk, b=b, s_q=s_q, h_q=h_q, d_qk=d_qk, fmt="fp8", topk=256, page=64,
        extra_topk=128 if two_pools else None, extra_page=32 if two_pools else None)
    names = sorted(k for k, v in args.items() if v is not None)

    def drop(idx, layer):
        pos = jnp.arange(idx.shape[-1], dtype=jnp.int32)
        return jnp.where((pos + layer) % 3 == 0, -1, idx)

    @jax.jit
    def chain(q, kv, *vals):
        kw = dict(zip(names, vals))
        meta = jax_flashmla.get_mla_metadata(
            jnp.zeros((q.shape[0],), jnp.int32), s_q=s_q, h_q=h_q, topk=kw["indices"].shape[-1],
            extra_topk=kw["extra_indices"].shape[-1] if "extra_indices" in kw else None)
        ins, outs = [], []
        for layer in range(LAYERS):
            step = dict(kw, indices=drop(kw["indices"], layer))
            if layer:
                q = next_q(q, outs[-1][0])
            ins.append((q, step["indices"]))
            outs.append(jax_flashmla.mla_decode(q, kv, metadata=meta, implementation="kernel",
                                                **step))
        return ins, outs

    ins, outs = chain(q, kv, *(args[n] for n in names))
    for (qi, idx), (out, lse) in zip(ins, outs):
        ref_out, ref_lse = run_sparse_decode(qi, kv, dict(args, indices=idx),
                                             implementation="reference", with_meta=False)
        check(np.asarray(out.astype(jnp.float32)), np.asarray(lse), ref_out, ref_lse)


@pytest.mark.parametrize("h_q,d_qk", [(128, 576), (64, 512), (16, 512)])
def test_sparse_prefill_chain(h_q, d_qk):
    """Sparse prefill with each call's q from the previous output."""
    q, kv, idx, kw = sparse_prefill_case(4300 + h_q + d_qk, s_q=96, h_q=h_q, d_qk=d_qk, topk=200)
    names = sorted(k for k, v in kw.items() if v is not None)

    @jax.jit
    def chain(q, kv, idx, *vals):
        extra = dict(zip(names, vals))
        ins, outs = [], []
        for layer in range(LAYERS):
            if layer:
                q = next_q(q, outs[-1][0])
            ins.append(q)
            outs.append(jax_flashmla.sparse_mla_prefill(q, kv, idx, implementation="kernel",
                                                        **extra))
        return ins, outs

    ins, outs = chain(q, kv, idx, *(kw[n] for n in names))
    for qi, (out, ml, lse) in zip(ins, outs):
        ref_out, ref_ml, ref_lse = run_sparse_prefill(qi, kv, idx, kw, implementation="reference")
        check(np.asarray(out.astype(jnp.float32)), np.asarray(lse), ref_out, ref_lse,
              max_logits=np.asarray(ml), ref_max_logits=ref_ml)
