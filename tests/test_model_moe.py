"""MoE: DeepSeek-V3 routing against a direct NumPy computation; grouped matmuls against a loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flashmla.models import deepseek as ds
from jax_flashmla.models.deepseek import layers


def numpy_route(logits, bias, n_group, topk_group, top_k, norm, scale, dropped=-np.inf):
    """Token by token, in float64, straight from the description of noaux_tc routing; experts of
    dropped groups score ``dropped`` in the final top-k."""
    t, e = logits.shape
    per = e // n_group
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    idx_out, w_out = [], []
    for i in range(t):
        biased = scores[i] + bias
        group_score = [np.sort(biased[g * per:(g + 1) * per])[-2:].sum() for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        final = np.full(e, dropped)
        for g in groups:
            final[g * per:(g + 1) * per] = biased[g * per:(g + 1) * per]
        chosen = sorted(range(e), key=lambda j: (-final[j], j))[:top_k]
        w = scores[i, chosen]
        if norm:
            w = w / w.sum()
        idx_out.append(chosen)
        w_out.append(w * scale)
    return np.array(idx_out), np.array(w_out)


@pytest.mark.parametrize("n_group,topk_group,top_k,norm", [(4, 2, 3, True), (1, 1, 4, True), (8, 3, 2, False)])
def test_routing_matches_numpy(n_group, topk_group, top_k, norm):
    rng = np.random.default_rng(n_group * 10 + top_k)
    t, e = 37, 16
    logits = rng.standard_normal((t, e)).astype(np.float32) * 2
    bias = rng.standard_normal(e).astype(np.float32) * 0.5  # big enough to change the choice
    idx, w = layers.route(jnp.asarray(logits), jnp.asarray(bias), n_group=n_group, topk_group=topk_group,
                          top_k=top_k, norm_topk_prob=norm, routed_scaling_factor=2.5)
    want_idx, want_w = numpy_route(logits, bias.astype(np.float64), n_group, topk_group, top_k, norm, 2.5)
    got_idx = np.asarray(idx)
    # Same experts with the same weights (order within a token's top-k is irrelevant to the output).
    for i in range(t):
        order_g, order_w = np.argsort(got_idx[i]), np.argsort(want_idx[i])
        np.testing.assert_array_equal(got_idx[i][order_g], want_idx[i][order_w])
        np.testing.assert_allclose(np.asarray(w)[i][order_g], want_w[i][order_w], rtol=1e-5)
    # The bias changes choices but not weights: without it some tokens pick other experts.
    idx0, _ = layers.route(jnp.asarray(logits), jnp.zeros(e), n_group=n_group, topk_group=topk_group,
                           top_k=top_k, norm_topk_prob=norm, routed_scaling_factor=2.5)
    assert (np.sort(np.asarray(idx0), 1) != np.sort(got_idx, 1)).any()


def test_routing_negative_biased_scores_and_the_dropped_group_score():
    """When every biased score is negative the fill of dropped groups decides: with -inf (DeepSeek,
    HF V3.2) experts stay in the kept groups; with 0.0 (HF's DeepseekV3TopkRouter) dropped-group
    experts win over the kept groups' negative scores. The model picks by model_type."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((20, 8)).astype(np.float32)
    bias = np.full(8, -2.0, np.float32)
    kw = dict(n_group=4, topk_group=2, top_k=4, norm_topk_prob=True, routed_scaling_factor=1.0)
    idx, _ = layers.route(jnp.asarray(logits), jnp.asarray(bias), **kw)
    groups = np.asarray(idx) // 2
    assert all(len(set(g)) <= 2 for g in groups)
    want, _ = numpy_route(logits, bias.astype(np.float64), 4, 2, 4, True, 1.0)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), 1), np.sort(want, 1))

    idx0, _ = layers.route(jnp.asarray(logits), jnp.asarray(bias), dropped_group_score=0.0, **kw)
    want0, _ = numpy_route(logits, bias.astype(np.float64), 4, 2, 4, True, 1.0, dropped=0.0)
    np.testing.assert_array_equal(np.sort(np.asarray(idx0), 1), np.sort(want0, 1))
    # The kept groups hold 4 experts (all of them chosen with -inf), all negative: with 0.0 the 4
    # experts of the dropped groups win instead.
    assert all(not set(a) & set(b) for a, b in zip(np.asarray(idx0), np.asarray(idx)))


def test_moe_layer_matches_expert_loop():
    cfg = ds.DeepseekConfig(vocab_size=32, hidden_size=24, intermediate_size=32, moe_intermediate_size=12,
                            num_hidden_layers=2, num_attention_heads=2, n_shared_experts=2, n_routed_experts=6,
                            n_group=3, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
                            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
                            v_head_dim=8, routed_scaling_factor=1.7)
    model = ds.DeepseekForCausalLM(cfg, dtype=jnp.float32, init_std=0.3, seed=5)
    moe = model.model.layers[1].mlp
    assert isinstance(moe, layers.MoE) and isinstance(model.model.layers[0].mlp, layers.MLP)
    rng = np.random.default_rng(5)
    moe.gate.e_score_correction_bias[...] = jnp.asarray(rng.standard_normal(6) * 0.1, jnp.float32)
    x = rng.standard_normal((2, 9, 24)).astype(np.float32)
    got = np.asarray(jax.jit(lambda x: moe(x))(jnp.asarray(x)), np.float64)

    p = {k: np.asarray(v, np.float64) for k, v in [
        ("router", moe.gate.weight[...]), ("bias", moe.gate.e_score_correction_bias[...]),
        ("g", moe.experts.gate_proj[...]), ("u", moe.experts.up_proj[...]), ("d", moe.experts.down_proj[...]),
        ("sg", moe.shared_experts.gate_proj.weight[...]), ("su", moe.shared_experts.up_proj.weight[...]),
        ("sd", moe.shared_experts.down_proj.weight[...])]}
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    flat = x.reshape(-1, 24).astype(np.float64)
    idx, w = numpy_route(flat @ p["router"].T, p["bias"], 3, 2, 3, True, 1.7)
    want = np.zeros_like(flat)
    for t in range(flat.shape[0]):
        for e, wt in zip(idx[t], w[t]):
            want[t] += wt * (silu(flat[t] @ p["g"][e]) * (flat[t] @ p["u"][e])) @ p["d"][e]
    want += (silu(flat @ p["sg"].T) * (flat @ p["su"].T)) @ p["sd"].T
    np.testing.assert_allclose(got.reshape(-1, 24), want, rtol=1e-4, atol=1e-5)
