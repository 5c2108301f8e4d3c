"""The DeepSeek model against an independent NumPy (float64) port of the Hugging Face semantics.

The test writes a Hugging Face-format checkpoint itself (random tensors under the HF names, with
safetensors' own writer), loads it with ``jax_flashmla.models.deepseek.load`` and compares the
logits of ``model(input_ids)`` with a direct NumPy computation that follows HF's
``modeling_deepseek_v3`` / ``modeling_deepseek_v32`` formulation (RoPE de-interleaved by view +
transpose then ``rotate_half``, per-token per-expert MoE loop, YaRN from its formula), so names,
layouts and conventions are all checked.
"""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jax_flashmla.models import deepseek as ds

YARN = {"type": "yarn", "factor": 8.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 16}


def tiny_hf_config(**kw):
    cfg = dict(model_type="deepseek_v3", vocab_size=97, hidden_size=48, intermediate_size=80,
               moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
               n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=32,
               q_lora_rank=40, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=4,
               topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, norm_topk_prob=True,
               hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
               rope_scaling=YARN, attention_bias=False, tie_word_embeddings=False, bos_token_id=0,
               eos_token_id=1, scoring_func="sigmoid", topk_method="noaux_tc")
    cfg.update(kw)
    return cfg


def random_hf_tensors(cfg, rng, std=0.15):
    """Random tensors under the HF names of a DeepSeek-V3/V3.2 checkpoint (float32)."""
    H, h = cfg["hidden_size"], cfg["num_attention_heads"]
    dn, dr, dv, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    t = {}

    def w(name, *shape, s=std):
        t[name] = (s * rng.standard_normal(shape)).astype(np.float32)

    def norm(name, n):
        t[name] = (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w("model.embed_tokens.weight", cfg["vocab_size"], H, s=1.0)
    w("lm_head.weight", cfg["vocab_size"], H)
    norm("model.norm.weight", H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        norm(p + "input_layernorm.weight", H)
        norm(p + "post_attention_layernorm.weight", H)
        a = p + "self_attn."
        if cfg["q_lora_rank"] is None:
            w(a + "q_proj.weight", h * (dn + dr), H)
        else:
            w(a + "q_a_proj.weight", cfg["q_lora_rank"], H)
            norm(a + "q_a_layernorm.weight", cfg["q_lora_rank"])
            w(a + "q_b_proj.weight", h * (dn + dr), cfg["q_lora_rank"])
        w(a + "kv_a_proj_with_mqa.weight", r + dr, H)
        norm(a + "kv_a_layernorm.weight", r)
        w(a + "kv_b_proj.weight", h * (dn + dv), r)
        w(a + "o_proj.weight", H, h * dv)
        if cfg.get("index_topk"):
            d = cfg["index_head_dim"]
            w(a + "indexer.wq_b.weight", cfg["index_n_heads"] * d, cfg["q_lora_rank"])
            w(a + "indexer.wk.weight", d, H)
            norm(a + "indexer.k_norm.weight", d)
            w(a + "indexer.k_norm.bias", d, s=0.1)
            w(a + "indexer.weights_proj.weight", cfg["index_n_heads"], H)
        m = p + "mlp."
        if i < cfg["first_k_dense_replace"]:
            w(m + "gate_proj.weight", cfg["intermediate_size"], H)
            w(m + "up_proj.weight", cfg["intermediate_size"], H)
            w(m + "down_proj.weight", H, cfg["intermediate_size"])
        else:
            E, I = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
            w(m + "gate.weight", E, H, s=0.3)
            w(m + "gate.e_score_correction_bias", E, s=0.05)
            for j in range(E):
                w(m + f"experts.{j}.gate_proj.weight", I, H)
                w(m + f"experts.{j}.up_proj.weight", I, H)
                w(m + f"experts.{j}.down_proj.weight", H, I)
            Is = I * cfg["n_shared_experts"]
            w(m + "shared_experts.gate_proj.weight", Is, H)
            w(m + "shared_experts.up_proj.weight", Is, H)
            w(m + "shared_experts.down_proj.weight", H, Is)
    return t


# ---------------------------------------------------------------------------------------------
# NumPy float64 port of the HF semantics
# ---------------------------------------------------------------------------------------------
def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def _rotate_half(x):
    d = x.shape[-1] // 2
    return np.concatenate([-x[..., d:], x[..., :d]], -1)


def _yarn(cfg):
    dim, base = cfg["qk_rope_head_dim"], cfg["rope_theta"]
    inv = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    rs = cfg["rope_scaling"]
    if rs is None:
        return inv, 1.0, 1.0

    def mscale(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    f, orig = rs["factor"], rs["original_max_position_embeddings"]

    def corr(nrot):
        return dim * math.log(orig / (nrot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(rs["beta_fast"])), 0), min(math.ceil(corr(rs["beta_slow"])), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0, 1)
    keep = 1 - ramp
    inv = inv / f * (1 - keep) + inv * keep
    att = mscale(f, rs["mscale"]) / mscale(f, rs["mscale_all_dim"])
    return inv, att, mscale(f, rs["mscale_all_dim"]) ** 2


def _cos_sin(cfg, s):
    inv, att, _ = _yarn(cfg)
    freqs = np.arange(s)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], -1)
    return np.cos(emb) * att, np.sin(emb) * att


def _rope_interleaved(x, cos, sin):
    # HF apply_rotary_pos_emb_interleave: view(d/2, 2).transpose -> rotate_half.
    shp = x.shape
    x = x.reshape(*shp[:-1], shp[-1] // 2, 2).swapaxes(-1, -2).reshape(shp)
    return x * cos + _rotate_half(x) * sin


def _rope_half(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def _route(cfg, x, wg, bias):
    E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    ng, tg = cfg["n_group"], cfg["topk_group"]
    scores = 1 / (1 + np.exp(-(x @ wg.T)))
    choice = scores + bias
    out_idx, out_w = [], []
    for t in range(x.shape[0]):
        groups = choice[t].reshape(ng, E // ng)
        gscore = np.sort(groups, -1)[:, -2:].sum(-1)
        keep_groups = np.argsort(-gscore, kind="stable")[:tg]
        # HF's DeepseekV3TopkRouter fills dropped groups with 0.0; HF's V3.2 (and DeepSeek) with -inf.
        allowed = np.full(E, -np.inf if cfg.get("model_type") == "deepseek_v32" else 0.0)
        for g in keep_groups:
            allowed[g * (E // ng):(g + 1) * (E // ng)] = choice[t, g * (E // ng):(g + 1) * (E // ng)]
        idx = np.argsort(-allowed, kind="stable")[:k]
        wts = scores[t, idx]
        if cfg["norm_topk_prob"]:
            wts = wts / (wts.sum() + 1e-20)
        out_idx.append(idx)
        out_w.append(wts * cfg["routed_scaling_factor"])
    return np.array(out_idx), np.array(out_w)


def _mlp(x, g, u, d):
    a = x @ g.T
    return ((a / (1 + np.exp(-a))) * (x @ u.T)) @ d.T


def hf_reference_logits(cfg, t, ids):
    t = {k: v.astype(np.float64) for k, v in t.items()}
    eps = cfg["rms_norm_eps"]
    b, s = ids.shape
    H, h = cfg["hidden_size"], cfg["num_attention_heads"]
    dn, dr, dv, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    cos, sin = _cos_sin(cfg, s)
    scale = (dn + dr) ** -0.5 * _yarn(cfg)[2]
    causal = np.tril(np.ones((s, s), bool))
    x = t["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        hs = _rms(x, t[p + "input_layernorm.weight"], eps)
        if cfg["q_lora_rank"] is None:
            q = hs @ t[a + "q_proj.weight"].T
        else:
            q_resid = _rms(hs @ t[a + "q_a_proj.weight"].T, t[a + "q_a_layernorm.weight"], eps)
            q = q_resid @ t[a + "q_b_proj.weight"].T
        q = q.reshape(b, s, h, dn + dr).transpose(0, 2, 1, 3)  # [b, h, s, d]
        q_pass, q_rot = q[..., :dn], q[..., dn:]
        ckv = hs @ t[a + "kv_a_proj_with_mqa.weight"].T
        k_pass, k_rot = ckv[..., :r], ckv[..., r:]
        kv = (_rms(k_pass, t[a + "kv_a_layernorm.weight"], eps) @ t[a + "kv_b_proj.weight"].T)
        kv = kv.reshape(b, s, h, dn + dv).transpose(0, 2, 1, 3)
        k_pass, v = kv[..., :dn], kv[..., dn:]
        q_rot = _rope_interleaved(q_rot, cos, sin)
        k_rot = _rope_interleaved(k_rot[:, None], cos, sin)
        qs = np.concatenate([q_pass, q_rot], -1)
        ks = np.concatenate([k_pass, np.broadcast_to(k_rot, k_pass.shape[:-1] + (dr,))], -1)
        logits = qs @ ks.swapaxes(-1, -2) * scale  # [b, h, s, t]
        mask = np.broadcast_to(causal, (b, s, s)).copy()
        if cfg.get("index_topk"):
            d, nh = cfg["index_head_dim"], cfg["index_n_heads"]
            iq = (q_resid @ t[a + "indexer.wq_b.weight"].T).reshape(b, s, nh, d)
            iq = np.concatenate([_rope_half(iq[..., :dr], cos[:, None], sin[:, None]), iq[..., dr:]], -1)
            ik = hs @ t[a + "indexer.wk.weight"].T
            mu, var = ik.mean(-1, keepdims=True), ik.var(-1, keepdims=True)
            ik = (ik - mu) / np.sqrt(var + 1e-6) * t[a + "indexer.k_norm.weight"] + t[a + "indexer.k_norm.bias"]
            ik = np.concatenate([_rope_half(ik[..., :dr], cos, sin), ik[..., dr:]], -1)
            wts = (hs @ t[a + "indexer.weights_proj.weight"].T) * nh ** -0.5 * d ** -0.5
            sc = np.einsum("bsh,bsht->bst", wts, np.maximum(np.einsum("bshd,btd->bsht", iq, ik), 0))
            sc = np.where(causal, sc, -np.inf)
            k = min(cfg["index_topk"], s)
            sel = np.zeros_like(mask)
            for bi in range(b):
                for si in range(s):
                    top = np.argsort(-sc[bi, si], kind="stable")[:k]
                    sel[bi, si, top] = True
            mask &= sel
        logits = np.where(mask[:, None], logits, -np.inf)
        pr = np.exp(logits - logits.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = (pr @ v).transpose(0, 2, 1, 3).reshape(b, s, h * dv)
        x = x + o @ t[a + "o_proj.weight"].T
        m = p + "mlp."
        hs = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        if i < cfg["first_k_dense_replace"]:
            x = x + _mlp(hs, t[m + "gate_proj.weight"], t[m + "up_proj.weight"], t[m + "down_proj.weight"])
        else:
            flat = hs.reshape(-1, H)
            idx, wts = _route(cfg, flat, t[m + "gate.weight"], t[m + "gate.e_score_correction_bias"])
            routed = np.zeros_like(flat)
            for tok in range(flat.shape[0]):
                for e, wt in zip(idx[tok], wts[tok]):
                    e_ = f"{m}experts.{e}."
                    routed[tok] += wt * _mlp(flat[tok], t[e_ + "gate_proj.weight"], t[e_ + "up_proj.weight"],
                                             t[e_ + "down_proj.weight"])
            shared = _mlp(hs, t[m + "shared_experts.gate_proj.weight"], t[m + "shared_experts.up_proj.weight"],
                          t[m + "shared_experts.down_proj.weight"])
            x = x + routed.reshape(x.shape) + shared
    x = _rms(x, t["model.norm.weight"], eps)
    return x @ t["lm_head.weight"].T


def write_checkpoint(path, cfg, tensors):
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("variant", ["v3", "v3_no_q_lora", "v32"])
def test_logits_match_hf_numpy(tmp_path, variant):
    rng = np.random.default_rng(["v3", "v3_no_q_lora", "v32"].index(variant))
    if variant == "v3":
        cfg = tiny_hf_config()
    elif variant == "v3_no_q_lora":
        cfg = tiny_hf_config(q_lora_rank=None, rope_scaling=None, n_group=1, topk_group=1)
    else:
        cfg = tiny_hf_config(model_type="deepseek_v32", index_n_heads=3, index_head_dim=16, index_topk=5,
                             num_hidden_layers=2)
    tensors = random_hf_tensors(cfg, rng)
    write_checkpoint(tmp_path, cfg, tensors)
    model = ds.load(tmp_path, dtype=jnp.float32, progress=False)
    assert model.config.is_v32 == (variant == "v32")
    ids = rng.integers(0, cfg["vocab_size"], (2, 11))
    got = np.asarray(model(ids), np.float64)
    want = hf_reference_logits(cfg, tensors, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-4, f"{variant}: max relative error {err:.3g}"
    # The sparse model really is sparse: with index_topk 5 < 11 tokens the top-k mask matters.
    if variant == "v32":
        dense_cfg = dict(cfg, index_topk=64)
        dense = hf_reference_logits(dense_cfg, tensors, ids)
        assert np.abs(dense[:, 5:] - want[:, 5:]).max() > 1e-2 * np.abs(want).max()


def test_bf16_checkpoint_bf16_model(tmp_path):
    """A bf16 checkpoint into a bf16 model: the same logits within bf16 precision."""
    import ml_dtypes
    rng = np.random.default_rng(7)
    cfg = tiny_hf_config(num_hidden_layers=2)
    tensors = random_hf_tensors(cfg, rng)
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    write_checkpoint(tmp_path, cfg, bf)
    model = ds.load(tmp_path, progress=False)  # default dtype bf16
    assert model.model.embed_tokens.weight[...].dtype == jnp.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias[...].dtype == jnp.float32
    ids = rng.integers(0, cfg["vocab_size"], (2, 9))
    got = np.asarray(model(ids), np.float64)
    want = hf_reference_logits(cfg, {k: v.astype(np.float32) for k, v in bf.items()}, ids)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 3e-2, err
