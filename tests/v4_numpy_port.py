"""An independent float64 NumPy port of transformers' DeepseekV4ForCausalLM forward (no cache).

Written from the HF modeling code, step by step, over a dict of HF-named weights; it shares no
code with jax_flashmla.models.deepseek.v4, so the model's parity test against it checks the math
twice. Attention is the HF eager path: a sliding window of ``sliding_window`` tokens (k in
(q - W, q]) plus the compressor's entries, a per-head sink logit in the softmax denominator.
"""
from __future__ import annotations

import math

import numpy as np


def _rms(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _silu(x):
    return x * _sigmoid(x)


class V4NumpyPort:
    def __init__(self, cfg: dict, weights: dict):
        """cfg: the config.json dict; weights: HF name -> array."""
        self.c = cfg
        self.w = {k: np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
                  for k, v in weights.items()}
        c = cfg
        self.hd = c["head_dim"]
        self.rd = int(round(c["head_dim"] * c["partial_rotary_factor"]))
        rates = c["compress_rates"]
        self.rate = {"compressed_sparse_attention": rates["compressed_sparse_attention"],
                     "heavily_compressed_attention": rates["heavily_compressed_attention"]}
        self.eps = c["rms_norm_eps"]

    # ---- RoPE -------------------------------------------------------------------------------
    def _inv_freq(self, kind):
        c, dim = self.c, self.rd
        base = c["rope_theta"] if kind == "main" else c["compress_rope_theta"]
        freqs = base ** (np.arange(0, dim, 2) / dim)
        rp = c.get("rope_parameters") or {}
        if kind == "main" or rp.get("rope_type", "default") != "yarn":
            return 1.0 / freqs
        factor, orig = rp["factor"], rp["original_max_position_embeddings"]
        fast, slow = rp.get("beta_fast", 32), rp.get("beta_slow", 1)
        cd = lambda r: dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
        lo, hi = max(math.floor(cd(fast)), 0), min(math.ceil(cd(slow)), dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2) - lo) / (hi - lo), 0, 1)
        return (1 / (factor * freqs)) * ramp + (1 / freqs) * (1 - ramp)

    def _rope(self, x, pos, kind, inverse=False):
        """x [..., n, d] with positions pos [n]: rotate the last rd channels in (2i, 2i+1) pairs."""
        ang = pos[:, None] * self._inv_freq(kind)[None, :]
        cos, sin = np.cos(ang), np.sin(ang) * (-1 if inverse else 1)
        y = x.copy()
        a, b = x[..., -self.rd::2], x[..., -self.rd + 1::2]
        y[..., -self.rd::2] = a * cos - b * sin
        y[..., -self.rd + 1::2] = b * cos + a * sin
        return y

    # ---- pieces -----------------------------------------------------------------------------
    def _lin(self, x, name):
        return x @ self.w[name].T

    def _norm(self, x, name):
        return self.w[name] * _rms(x, self.eps)

    def _compress(self, x, pre, rate, dim, overlap):
        """Entries [T, dim] of all complete windows of x [s, hidden] (HF no-cache compressor)."""
        kv, gate = self._lin(x, pre + "kv_proj.weight"), self._lin(x, pre + "gate_proj.weight")
        n = x.shape[0] // rate
        out = np.zeros((n, dim))
        bias = self.w[pre + "position_bias"]
        for wi in range(n):
            sl = slice(wi * rate, (wi + 1) * rate)
            k, g = kv[sl], gate[sl] + bias
            if overlap:
                cur_k, cur_g = k[:, dim:], g[:, dim:]
                if wi > 0:
                    pk = kv[(wi - 1) * rate:wi * rate, :dim]
                    pg = gate[(wi - 1) * rate:wi * rate, :dim] + bias[:, :dim]
                else:
                    pk, pg = np.zeros((rate, dim)), np.full((rate, dim), -np.inf)
                k, g = np.concatenate([pk, cur_k]), np.concatenate([pg, cur_g])
            out[wi] = np.sum(k * _softmax(g, 0), axis=0)
        out = self._norm(out, pre + "kv_norm.weight")
        return self._rope(out, np.arange(n) * rate, "compress")

    def _attention(self, x, ln, q_res_cache):
        c = self.c
        p = f"model.layers.{ln}.self_attn."
        kind_t = c["layer_types"][ln]
        kind = "main" if kind_t == "sliding_attention" else "compress"
        s, h = x.shape[0], c["num_attention_heads"]
        pos = np.arange(s, dtype=np.float64)
        qr = self._norm(self._lin(x, p + "q_a_proj.weight"), p + "q_a_norm.weight")
        q = self._lin(qr, p + "q_b_proj.weight").reshape(s, h, self.hd).transpose(1, 0, 2)
        q = self._rope(_rms(q, self.eps), pos, kind)
        kv = self._rope(self._norm(self._lin(x, p + "kv_proj.weight"), p + "kv_norm.weight"), pos, kind)
        keys = kv
        i, j = np.arange(s)[:, None], np.arange(s)[None, :]
        allowed = (j <= i) & (j > i - c["sliding_window"])
        if kind_t != "sliding_attention":
            m = self.rate[kind_t]
            csa = kind_t == "compressed_sparse_attention"
            ent = self._compress(x, p + "compressor.", m, self.hd, csa)
            t = ent.shape[0]
            visible = np.arange(t)[None, :] < ((np.arange(s) + 1) // m)[:, None]        # [s, T]
            if csa and t:
                ip = p + "compressor.indexer."
                dI, nI = c["index_head_dim"], c["index_n_heads"]
                ik = self._compress(x, ip, m, dI, True)
                iq = self._lin(qr, ip + "q_b_proj.weight").reshape(s, nI, dI).transpose(1, 0, 2)
                iq = self._rope(iq, pos, "compress")                                     # [nI, s, dI]
                sc = np.maximum(np.einsum("hsd,td->hst", iq, ik), 0) * dI ** -0.5
                wts = self._lin(x, ip + "scorer.weights_proj.weight") * nI ** -0.5       # [s, nI]
                score = np.einsum("hst,sh->st", sc, wts)
                chosen = np.zeros((s, t), bool)
                k = min(c["index_topk"], t)
                for qi in range(s):
                    sq = np.where(visible[qi], score[qi], -np.inf)
                    top = np.argsort(-sq, kind="stable")[:k]
                    chosen[qi, top[np.isfinite(sq[top])]] = True
                visible = chosen
            keys = np.concatenate([kv, ent])
            allowed = np.concatenate([allowed, visible], axis=1)
        logits = np.einsum("hsd,nd->hsn", q, keys) * self.hd ** -0.5
        logits = np.where(allowed[None], logits, -np.inf)
        sink = self.w[p + "sinks"][:, None, None]
        mx = np.maximum(logits.max(-1, keepdims=True), sink)
        e = np.exp(logits - mx)
        probs = e / (e.sum(-1, keepdims=True) + np.exp(sink - mx))
        o = np.einsum("hsn,nd->hsd", probs, keys)
        o = self._rope(o, pos, kind, inverse=True).transpose(1, 0, 2)                  # [s, h, d]
        g = c["o_groups"]
        wa = self.w[p + "o_a_proj.weight"]
        wa = wa.reshape(g, wa.shape[0] // g, wa.shape[1])
        og = np.einsum("sgi,gri->sgr", o.reshape(s, g, -1), wa).reshape(s, -1)
        return self._lin(og, p + "o_b_proj.weight")

    def _hc(self, hs, pre):
        """hs [s, n, D] -> (post [s, n], comb [s, n, n], collapsed [s, D])."""
        n = self.c["hc_mult"]
        flat = _rms(hs.reshape(hs.shape[0], -1), self.eps)
        mix = flat @ self.w[pre + "fn"].T
        base, scale = self.w[pre + "base"], self.w[pre + "scale"]
        pre_w = _sigmoid(mix[:, :n] * scale[0] + base[:n]) + self.c["hc_eps"]
        post = 2 * _sigmoid(mix[:, n:2 * n] * scale[1] + base[n:2 * n])
        comb = _softmax(mix[:, 2 * n:].reshape(-1, n, n) * scale[2] + base[2 * n:].reshape(n, n), -1)
        comb = comb + self.c["hc_eps"]
        eps = self.c["hc_eps"]
        comb = comb / (comb.sum(-2, keepdims=True) + eps)
        for _ in range(self.c["hc_sinkhorn_iters"] - 1):
            comb = comb / (comb.sum(-1, keepdims=True) + eps)
            comb = comb / (comb.sum(-2, keepdims=True) + eps)
        return post, comb, np.einsum("sn,snd->sd", pre_w, hs)

    def _moe(self, x, ids, ln):
        c = self.c
        p = f"model.layers.{ln}.mlp."
        lim = c["swiglu_limit"]
        logits = self._lin(x, p + "gate.weight")
        fn = c["scoring_func"]
        scores = (np.sqrt(np.logaddexp(0, logits)) if fn == "sqrtsoftplus" else
                  _softmax(logits, -1) if fn == "softmax" else _sigmoid(logits))
        k = c["num_experts_per_tok"]
        if c["mlp_layer_types"][ln] == "hash_moe":
            idx = self.w[p + "gate.tid2eid"][ids].astype(np.int64)
        else:
            idx = np.argsort(-(scores + self.w[p + "gate.e_score_correction_bias"]), axis=-1, kind="stable")[:, :k]
        wts = np.take_along_axis(scores, idx, 1)
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20) * c["routed_scaling_factor"]
        gu, dn = self.w[p + "experts.gate_up_proj"], self.w[p + "experts.down_proj"]
        inter = gu.shape[1] // 2
        out = np.zeros_like(x)
        for ti in range(x.shape[0]):
            for kk in range(k):
                e = idx[ti, kk]
                a = gu[e] @ x[ti]
                hmid = _silu(np.minimum(a[:inter], lim)) * np.clip(a[inter:], -lim, lim)
                out[ti] += wts[ti, kk] * (dn[e] @ hmid)
        sp = p + "shared_experts."
        sh = (_silu(np.minimum(self._lin(x, sp + "gate_proj.weight"), lim))
              * np.clip(self._lin(x, sp + "up_proj.weight"), -lim, lim))
        return out + self._lin(sh, sp + "down_proj.weight")

    def logits(self, ids):
        """ids [s] -> logits [s, vocab] (float64)."""
        ids = np.asarray(ids)
        c = self.c
        x = self.w["model.embed_tokens.weight"][ids]
        hs = np.repeat(x[:, None, :], c["hc_mult"], axis=1)
        for ln in range(c["num_hidden_layers"]):
            lp = f"model.layers.{ln}."
            post, comb, col = self._hc(hs, lp + "attn_hc.")
            a = self._attention(self._norm(col, lp + "input_layernorm.weight"), ln, None)
            hs = post[..., None] * a[:, None, :] + np.einsum("sjk,sjd->skd", comb, hs)
            post, comb, col = self._hc(hs, lp + "ffn_hc.")
            f = self._moe(self._norm(col, lp + "post_attention_layernorm.weight"), ids, ln)
            hs = post[..., None] * f[:, None, :] + np.einsum("sjk,sjd->skd", comb, hs)
        flat = _rms(hs.reshape(hs.shape[0], -1), self.eps)
        mix = flat @ self.w["model.hc_head.hc_fn"].T
        pre = _sigmoid(mix * self.w["model.hc_head.hc_scale"] + self.w["model.hc_head.hc_base"]) + c["hc_eps"]
        h = self._norm(np.einsum("sn,snd->sd", pre, hs), "model.norm.weight")
        head = self.w["model.embed_tokens.weight"] if c.get("tie_word_embeddings") else self.w["lm_head.weight"]
        return h @ head.T
