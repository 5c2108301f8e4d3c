"""Dense decode run as sparse decode (jax_flashmla/ops/kernels/dense_as_sparse.py), on a CPU.

The route's own work is pure JAX: the index lists built from block_table / cache_seqlens, the
queries folded into heads, the results unfolded. Here the sparse kernel it calls is replaced by the
sparse reference, so the whole route runs and is checked against the float64 dense oracle: FP8
caches in both layouts, bf16 caches, page sizes the dense kernel does not read, causal and
non-causal MTP, sinks, malformed lengths and page ids, NaN-poisoned rows. tests/gpu/
test_dense_as_sparse_gpu.py runs the same route on the kernel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flashmla import kv_cache as kvc
from jax_flashmla import reference as ref
from jax_flashmla.ops import decode
from jax_flashmla.ops.kernels import dense_as_sparse, sparse_decode
import oracle
from conftest import assert_close


def _sparse_reference(calls):
    """A stand-in for the sparse kernel's lowering: the sparse reference, recording each call's
    config and shapes."""
    def impl(config, *arrays):
        args = dict(zip(config.present, arrays))
        calls.append((config, {n: x.shape for n, x in args.items()}))
        return ref.mla_decode(**args, softmax_scale=config.softmax_scale,
                              head_dim_v=config.head_dim_v, kv_format=config.kv_format)
    return impl


def _case(rng, *, lens, bs, d, fp8, s_q, h_q, sink):
    """(q, cache as passed, its float64 view, block_table, sinks); unused rows NaN."""
    cache, table = oracle.random_paged_cache(rng, b=len(lens), seqlens=lens, block_size=bs,
                                             h_kv=1, d=d)
    q = rng.standard_normal((len(lens), s_q, h_q, d)).astype(oracle.BF16)
    sinks = None
    if sink:
        sinks = rng.standard_normal(h_q).astype(np.float32)
        sinks[0] = np.inf
    if fp8:
        packed = kvc.quantize_fp8(jnp.asarray(cache))
        return q, packed, np.asarray(kvc.dequantize_fp8(packed), np.float64), table, sinks
    return q, cache, cache.astype(np.float64), table, sinks


CASES = [
    # (d, fp8, page, s_q, h_q, causal, sink): V3.2 / V4 FP8 layouts, bf16 at d 512 and pages
    # the dense kernel does not read; s_q 1, causal MTP (one index list per query), non-causal
    # MTP folded into heads (s_q * h_q <= 128) and not (above)
    (576, True, 64, 1, 16, False, False),
    (576, True, 61, 2, 8, True, True),
    (512, True, 64, 3, 16, False, True),
    (512, True, 3, 4, 8, True, False),
    (512, False, 64, 1, 32, False, True),
    (576, False, 16, 2, 128, False, False),
    (576, True, 2, 2, 4, False, False),
]


@pytest.mark.parametrize("d,fp8,bs,s_q,h_q,causal,sink", CASES)
def test_route_matches_dense_oracle(rng, monkeypatch, d, fp8, bs, s_q, h_q, causal, sink):
    calls = []
    monkeypatch.setattr(sparse_decode, "_impl", _sparse_reference(calls))
    # lengths: empty, shorter than s_q, odd, whole pages, negative, and past the table's capacity
    # (clamped; its pages past the 3 filled ones are out of range: absent), in a block table whose
    # entries past each length are out of range
    filled = [0, 1, 2 * bs + 5, 3 * bs, 0, 97]
    q, cache, cache64, table, sinks = _case(rng, lens=filled, bs=bs, d=d, fp8=fp8, s_q=s_q,
                                            h_q=h_q, sink=sink)
    table[2, 0] = cache.shape[0] + 3                           # a page outside the pool, inside L
    lens = np.asarray(filled, np.int32)
    lens[3] = table.shape[1] * bs + 1000
    lens[4] = -4
    present = ("q", "kv_cache", "block_table", "cache_seqlens") + (("attn_sink",) if sink else ())
    config = decode.DecodeConfig(mode="dense", head_dim_v=512, softmax_scale=d ** -0.5,
                                 causal=causal, kv_format="fp8" if fp8 else "bf16",
                                 implementation=None, present=present)
    args = (q, cache, table, lens) + ((sinks,) if sink else ())
    out, lse = jax.jit(lambda *a: dense_as_sparse._impl(config, *a))(*args)

    # the length clamp in the oracle equals the route's: lengths past the capacity read the
    # whole table (whose entries past the filled pages are out of range: absent)
    ref_out, ref_lse = oracle.dense_decode(q, cache64, table, lens, scale=d ** -0.5, d_v=512,
                                           causal=causal, attn_sink=sinks)
    assert_close(out, ref_out, what="out")
    assert_close(lse, ref_lse, rel=1e-5, what="lse")
    assert np.isposinf(np.asarray(lse)[0]).all() and (np.asarray(out)[0] == 0).all()

    (sparse_config, shapes), = calls
    fold = s_q > 1 and not causal and s_q * h_q <= 128
    assert sparse_config.mode == "sparse" and not sparse_config.causal
    assert shapes["q"] == ((len(lens), 1, s_q * h_q, d) if fold else q.shape)
    assert shapes["indices"] == (len(lens), 1 if fold else s_q, table.shape[1] * bs)
    if sink:
        assert shapes["attn_sink"] == ((s_q * h_q,) if fold else (h_q,))


def test_indices_name_rows_of_the_window_only():
    """The index lists themselves: rows of tokens < L in present pages, -1 elsewhere; causal gives
    query j the window t <= L - s_q + j."""
    table = jnp.asarray([[2, 0, 9], [1, -1, 5]], jnp.int32)      # pool of 3 blocks of 4 tokens
    lens = jnp.asarray([10, 7], jnp.int32)
    idx, length = dense_as_sparse.sparse_indices(table, lens, num_blocks=3, block_size=4, s_q=2,
                                                 causal=True)
    assert idx.shape == (2, 2, 12) and length.tolist() == [10, 7]
    row0 = [8, 9, 10, 11, 0, 1, 2, 3, -1, -1, -1, -1]         # page 9 is outside the pool
    assert idx[0, 1].tolist() == row0
    assert idx[0, 0].tolist() == row0[:9] + [-1] * 3            # window t <= 10 - 2 + 0 = 8
    assert idx[1, 1].tolist() == [4, 5, 6, 7] + [-1] * 8        # page -1 absent, t 7+ past L
    shared, _ = dense_as_sparse.sparse_indices(table, lens, num_blocks=3, block_size=4, s_q=2,
                                               causal=False)
    assert shared.shape == (2, 1, 12) and shared[0, 0].tolist() == row0


def test_model_backend_prediction_follows_the_switch(monkeypatch):
    """The DeepSeek-V3 model with an FP8 cache decodes densely: on the kernel only through this
    route, so attention_backend predicts the reference (and says why) where it is turned off."""
    import jax_flashmla as jfm
    from jax_flashmla.models import deepseek as ds
    monkeypatch.setattr(jfm, "kernels_available", lambda device=None: (True, ""))
    v3 = ds.DeepseekConfig(vocab_size=64, hidden_size=64, kv_lora_rank=512, qk_rope_head_dim=64)
    v32 = ds.DeepseekConfig(vocab_size=64, hidden_size=64, kv_lora_rank=512, qk_rope_head_dim=64,
                            index_topk=16, index_n_heads=2, index_head_dim=128)
    monkeypatch.setenv(dense_as_sparse.ENABLE, "0")
    backend, why = ds.attention_backend(v3, "fp8")
    assert backend == "reference" and dense_as_sparse.ENABLE in why
    assert ds.attention_backend(v3, "bf16") == ("kernel", "")
    assert ds.attention_backend(v32, "fp8") == ("kernel", "")
    monkeypatch.delenv(dense_as_sparse.ENABLE, raising=False)
    assert ds.attention_backend(v3, "fp8") == ("kernel", "")
