"""MLA: absorbed-form paged decode (jax_flashmla.mla_decode) equals the plain MHA-form attention.

One attention layer of a random model; the MHA form expands the latent into per-head keys and
values and runs ordinary causal attention over all tokens. The paged path writes the latent rows
into a paged cache (pages shuffled, unused rows poisoned with NaN) and attends in absorbed form,
with sequences advancing unevenly (inactive slots) and a causal multi-token chunk.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flashmla import kv_cache as kvc
from jax_flashmla.models import deepseek as ds
from jax_flashmla.models.deepseek import layers


def tiny_config(**kw):
    base = dict(vocab_size=64, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=4, n_routed_experts=4, n_group=1, topk_group=1,
                num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24,
                qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                rope_scaling=(("factor", 4.0), ("mscale", 1.0), ("mscale_all_dim", 1.0),
                              ("original_max_position_embeddings", 8), ("type", "yarn")))
    base.update(kw)
    return ds.DeepseekConfig(**base)


def poisoned_pages(cfg, num_blocks, block_size, kv_format):
    pages = ds.init_pages(cfg, num_blocks, block_size, kv_format=kv_format)
    fill = (lambda a: jnp.full_like(a, 255)) if kv_format == "fp8" else (lambda a: jnp.full_like(a, jnp.nan))
    return ds.KVPages(kv=tuple(fill(a) for a in pages.kv),
                      index_k=tuple(jnp.full_like(a, jnp.nan) for a in pages.index_k))


def run_paged(mla, cfg, x, kv_format, block_size=4, chunk=3, schedule_seed=0):
    """Feeds x [b, T, hidden] through mla.decode: a causal chunk of `chunk` tokens, then one token per
    step with random inactive slots. Returns {(seq, position): output row}."""
    b, T, _ = x.shape
    rng = np.random.default_rng(schedule_seed)
    max_blocks = -(-T // block_size)
    alloc = ds.PageAllocator(b * max_blocks + 3, block_size, max_blocks)
    alloc.ensure("spare", min(3, max_blocks) * block_size)  # shifts the other sequences' page ids
    for i in range(b):
        alloc.ensure(i, T)
    table = alloc.block_table(range(b))
    perm = rng.permutation(alloc.num_blocks)  # non-contiguous page ids
    table = jnp.asarray(perm[table].astype(np.int32))
    pages = poisoned_pages(cfg, alloc.num_blocks, block_size, kv_format).kv[0]
    idx_pages = poisoned_pages(cfg, alloc.num_blocks, block_size, kv_format).index_k
    idx_pages = idx_pages[0] if idx_pages else None

    @jax.jit
    def step(pages, idx_pages, xs, pos, lens):
        cs = layers.rope_cos_sin(cfg, jnp.maximum(pos, 0))
        out, pages, idx_pages = mla.decode(xs, cs, pos, pages, idx_pages, table, lens,
                                           implementation="reference")
        return out, pages, idx_pages

    outs = {}
    pos = np.broadcast_to(np.arange(chunk, dtype=np.int32), (b, chunk))
    o, pages, idx_pages = step(pages, idx_pages, x[:, :chunk], jnp.asarray(pos), jnp.full((b,), chunk, jnp.int32))
    for i in range(b):
        for j in range(chunk):
            outs[(i, j)] = np.asarray(o[i, j], np.float64)
    lens = np.full((b,), chunk, np.int32)
    while (lens < T).any():
        active = (lens < T) & (rng.random(b) < 0.7)
        if not active.any():
            continue
        p = np.where(active, lens, -1).astype(np.int32)[:, None]
        xs = x[np.arange(b), np.minimum(lens, T - 1)][:, None]
        new_lens = np.where(active, lens + 1, lens).astype(np.int32)
        o, pages, idx_pages = step(pages, idx_pages, xs, jnp.asarray(p), jnp.asarray(new_lens))
        for i in np.flatnonzero(active):
            outs[(i, int(lens[i]))] = np.asarray(o[i, 0], np.float64)
        lens = new_lens
    return outs


def mha_reference(mla, cfg, x, fp8_latent=False, sparse=True):
    """All-token causal MHA-form outputs [b, T, hidden] (float64)."""
    b, T, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
    cs = layers.rope_cos_sin(cfg, pos)
    q_nope, q_pe, c_kv, k_pe, q_resid = mla.project(x, cs)
    if fp8_latent:  # what the FP8 cache holds: the latent quantized and dequantized
        lat = kvc.dequantize_fp8(kvc.quantize_fp8(jnp.concatenate([c_kv, k_pe], -1))).astype(jnp.float32)
        c_kv, k_pe = lat[..., :cfg.kv_lora_rank], lat[..., cfg.kv_lora_rank:]
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (b, T, T))
    if cfg.is_v32 and sparse:
        topk, _ = mla.index_topk_dense(x, q_resid, cs, mask)
        mask = mask & layers.positions_to_mask(topk, T)
    return np.asarray(mla.mha(q_nope, q_pe, c_kv, k_pe, mask), np.float64)


def _compare(outs, ref, rel):
    got = np.stack([outs[k] for k in sorted(outs)])
    want = np.stack([ref[i, j] for i, j in sorted(outs)])
    assert np.isfinite(got).all(), "NaN/inf leaked from unused cache rows"
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < rel, f"relative error {err:.3g} >= {rel}"
    return err


@pytest.mark.parametrize("kv_format,rel", [("float32", 1e-5), ("bf16", 2e-2)])
def test_absorbed_decode_equals_mha(kv_format, rel):
    cfg = tiny_config()
    model = ds.DeepseekForCausalLM(cfg, dtype=jnp.float32, init_std=0.2, seed=1)
    mla = model.model.layers[0].self_attn
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 11, cfg.hidden_size)), jnp.float32)
    outs = run_paged(mla, cfg, x, kv_format)
    assert len(outs) == 3 * 11
    _compare(outs, mha_reference(mla, cfg, x), rel)


def test_absorbed_decode_without_q_lora():
    cfg = tiny_config(q_lora_rank=None, rope_scaling=None)
    model = ds.DeepseekForCausalLM(cfg, dtype=jnp.float32, init_std=0.2, seed=2)
    mla = model.model.layers[0].self_attn
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, cfg.hidden_size)), jnp.float32)
    _compare(run_paged(mla, cfg, x, "float32", block_size=2), mha_reference(mla, cfg, x), 1e-5)


def test_absorbed_decode_fp8_cache_kernel_dims():
    """The FP8 (656-byte) cache with DeepSeek's real attention dims (kv_lora_rank 512, rope 64)."""
    cfg = tiny_config(kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=2, hidden_size=32)
    model = ds.DeepseekForCausalLM(cfg, dtype=jnp.float32, init_std=0.1, seed=3)
    mla = model.model.layers[0].self_attn
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 7, cfg.hidden_size)), jnp.float32)
    outs = run_paged(mla, cfg, x, "fp8", block_size=4)
    _compare(outs, mha_reference(mla, cfg, x, fp8_latent=True), 2e-2)
    # ...and the quantisation is visible: against the unquantised latent the error is larger.
    exact = mha_reference(mla, cfg, x)
    got = np.stack([outs[k] for k in sorted(outs)])
    want = np.stack([exact[i, j] for i, j in sorted(outs)])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) > 1e-3


def test_v32_sparse_decode_equals_dense_masked():
    """V3.2: indexer top-k + sparse mla_decode equals MHA with the indexer's top-k as a dense mask."""
    cfg = tiny_config(index_n_heads=3, index_head_dim=16, index_topk=4, model_type="deepseek_v32")
    model = ds.DeepseekForCausalLM(cfg, dtype=jnp.float32, init_std=0.3, seed=4)
    mla = model.model.layers[0].self_attn
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 10, cfg.hidden_size)), jnp.float32)
    outs = run_paged(mla, cfg, x, "float32", chunk=2)
    ref = mha_reference(mla, cfg, x)
    _compare(outs, ref, 1e-5)
    # The top-k restriction matters (tokens past index_topk differ from full causal attention).
    dense = mha_reference(mla, cfg, x, sparse=False)
    assert np.abs(dense[:, 5:] - ref[:, 5:]).max() > 1e-3


def test_rope_interleaved_matches_complex_pairs():
    """The MLA RoPE rotates channel pairs (2i, 2i+1) as complex numbers (DeepSeek's own code);
    our de-interleaved output layout keeps every q.k product."""
    cfg = tiny_config(rope_scaling=None)
    rng = np.random.default_rng(5)
    d = cfg.qk_rope_head_dim
    q = rng.standard_normal((1, 6, 2, d)).astype(np.float32)
    k = rng.standard_normal((1, 6, 1, d)).astype(np.float32)
    pos = jnp.arange(6, dtype=jnp.int32)[None]
    cos, sin = layers.rope_cos_sin(cfg, pos)
    qr = np.asarray(layers.apply_rope(jnp.asarray(q), cos, sin, interleaved=True), np.float64)
    kr = np.asarray(layers.apply_rope(jnp.asarray(k), cos, sin, interleaved=True), np.float64)
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    rot = np.exp(1j * np.arange(6)[:, None] * inv[None, :])  # [s, d/2]
    qc = (q[..., 0::2] + 1j * q[..., 1::2]) * rot[None, :, None]
    kc = (k[..., 0::2] + 1j * k[..., 1::2]) * rot[None, :, None]
    want = np.einsum("bshd,btd->bhst", qc, np.conj(kc[:, :, 0])).real  # Re(q conj(k)) = q . k
    got = np.einsum("bshd,btd->bhst", qr, kr[:, :, 0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The layout itself: real parts first, then imaginary parts.
    np.testing.assert_allclose(qr[..., : d // 2], qc.real, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qr[..., d // 2:], qc.imag, rtol=1e-5, atol=1e-5)


def test_yarn_softmax_scale():
    cfg = tiny_config(qk_nope_head_dim=128, qk_rope_head_dim=64,
                      rope_scaling=(("factor", 40.0), ("mscale", 1.0), ("mscale_all_dim", 1.0),
                                    ("original_max_position_embeddings", 4096), ("type", "yarn")))
    m = 0.1 * np.log(40.0) + 1.0
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)
    inv, att = layers.rope_parameters(cfg)
    assert att == pytest.approx(1.0)
    base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    # Highest frequencies kept, lowest divided by the factor.
    np.testing.assert_allclose(inv[:5], base[:5], rtol=1e-6)
    np.testing.assert_allclose(inv[-5:], base[-5:] / 40.0, rtol=1e-6)
