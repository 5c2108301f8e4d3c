"""DeepSeek-V4 (jax_flashmla.models.deepseek.v4): parity with an independent NumPy port of
transformers' DeepseekV4 (and with transformers itself where it is importable), prefill + paged
decode on the ops against the forward, the FP8 window/compressed pools, checkpoints, generate.

One tiny model serves every test (three layer types, hash + routed MoE, hc_mult 2, compress rates
4 and 16, a window of 6 tokens, head_dim 512 so the V4 FP8 layout applies). XLA:CPU compiles with
its backend optimisations off: the programs are tiny and compiling dominates the test time.

index_n_heads is 16 so that an indexer score is almost never exactly 0 (every head's ReLU
clipped): among exactly equal scores torch.topk and lax.top_k may keep different entries (with 4
heads, HF's greedy tokens and ours parted at such a tie), a choice neither model defines.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_flashmla import kv_cache as kvc
from jax_flashmla.models import deepseek
from jax_flashmla.models.deepseek import v4
from jax_flashmla.models.deepseek.v4.config import CSA, HCA, SLIDING
from v4_numpy_port import V4NumpyPort

FAST = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
        if jax.default_backend() == "cpu" else None)
CFG = v4.DeepseekV4Config(
    vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
    head_dim=512, qk_rope_head_dim=64, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4,
    layer_types=(CSA, SLIDING, HCA), mlp_layer_types=("hash_moe", "moe", "moe"), compress_rate_csa=4,
    compress_rate_hca=16, hc_mult=2, hc_sinkhorn_iters=6, sliding_window=6, o_groups=2, o_lora_rank=8,
    index_n_heads=16, index_head_dim=64, index_topk=3, eos_token_id=None,
    compress_rope_scaling=(("attention_factor", 1.0), ("beta_fast", 32), ("beta_slow", 1), ("factor", 4.0),
                           ("original_max_position_embeddings", 16), ("rope_type", "yarn")))
SEQ = 36           # positions 0..35: compressor boundaries at 4k and 16k, the window (6) shorter
LENS = (15, 17)    # prompts around the 16-token HCA window, decode then crosses 16, 20, ..., 32


@functools.lru_cache(maxsize=None)
def _model():
    return v4.DeepseekV4ForCausalLM(CFG, dtype=jnp.float32, seed=3, init_std=0.2)


@functools.lru_cache(maxsize=None)
def _ids():
    return np.random.default_rng(7).integers(0, CFG.vocab_size, (2, SEQ)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state).forward(ids)


@functools.partial(jax.jit, static_argnums=(0, 5), compiler_options=FAST)
def _prefill(graphdef, state, ids, lens, pages, ring, wt, ct):
    return nnx.merge(graphdef, state).prefill(ids, lens, pages, v4.V4Tables(wt, ct, ring))


@functools.partial(jax.jit, static_argnums=(0, 5), compiler_options=FAST)
def _decode(graphdef, state, tok, seq, pages, ring, wt, ct):
    return nnx.merge(graphdef, state).decode(tok, pages, v4.V4Tables(wt, ct, ring), seq)


def forward(model, ids):
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(ids)))


@functools.lru_cache(maxsize=None)
def _reference_logits():
    return forward(_model(), _ids())


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------
def test_forward_matches_numpy_port():
    port = V4NumpyPort(CFG.to_dict(), v4.hf_tensors(_model()))
    ours = _reference_logits()
    for b in range(2):
        ref = port.logits(_ids()[b])
        # Every position is a prompt length: all window / compressor boundaries up to 36 tokens.
        per_pos = [rel(ours[b, t], ref[t]) for t in range(SEQ)]
        assert max(per_pos) < 1e-3, per_pos
        np.testing.assert_array_equal(ours[b].argmax(-1), ref.argmax(-1))


def test_forward_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.skip("this transformers has no DeepseekV4")
    v4.save(_model(), tmp_path)
    hf_cfg = transformers.DeepseekV4Config.from_pretrained(tmp_path)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, config=hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(_ids().astype(np.int64))).logits.numpy()
        prompt = torch.from_numpy(_ids()[:1, :LENS[1]].astype(np.int64))
        gen = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0, LENS[1]:].numpy()
    ours = _reference_logits()
    assert rel(ours, ref) < 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    mine = deepseek.generate(_model(), _ids()[:1, :LENS[1]], 12, kv_format="float32", block_size=4,
                             compressed_block_size=2, compiler_options=FAST)
    np.testing.assert_array_equal(mine[0], gen)


def _prefill_decode(kv_format, steps=SEQ - max(LENS)):
    """Prefill prompts of LENS, then teacher-forced decode to position SEQ - 1 of the longer one;
    logits of every step (and prefill's last token) next to the forward's."""
    model, ids = _model(), _ids()
    graphdef, state = nnx.split(model)
    pages, tables = v4.init_cache(CFG, 2, SEQ, block_size=4, compressed_block_size=2, kv_format=kv_format,
                                  dtype=jnp.float32)
    lens = np.asarray(LENS, np.int32)
    s = max(LENS)
    prompt = np.where(np.arange(s)[None] < lens[:, None], ids[:, :s], 0)
    logits, pages = _prefill(graphdef, state, jnp.asarray(prompt), jnp.asarray(lens), pages, tables.ring,
                             tables.window, tables.compressed)
    got, want = [np.asarray(logits)], [_reference_logits()[[0, 1], lens - 1]]
    for k in range(steps):
        seq = lens + k
        tok = ids[[0, 1], seq][:, None]
        logits, pages = _decode(graphdef, state, jnp.asarray(tok), jnp.asarray(seq), pages, tables.ring,
                                tables.window, tables.compressed)
        got.append(np.asarray(logits)[:, 0])
        want.append(_reference_logits()[[0, 1], seq])
    return np.stack(got), np.stack(want), pages


def test_prefill_then_paged_decode_equals_forward():
    got, want, _ = _prefill_decode("float32")
    errs = [rel(g, w) for g, w in zip(got, want)]
    assert max(errs) < 1e-4, errs


def test_fp8_pools_decode_within_quantization_error():
    got, want, pages = _prefill_decode("fp8")
    assert pages.window[0].dtype == jnp.uint8 and pages.window[0].shape[-1] == kvc.V4.token_bytes
    assert pages.compressed[0].shape[-1] == kvc.V4.token_bytes and pages.compressed[1] is None
    # FP8 keeps 3 mantissa bits of each NoPE channel (a few % per key); this random tiny model
    # amplifies that, and an indexer pick can flip. Prefill attends the unquantized prompt.
    errs = [rel(g, w) for g, w in zip(got, want)]
    assert errs[0] < 1e-2 and np.median(errs) < 0.1 and max(errs) < 0.5, errs
    # Round trip: right after prefill, layer 0's pools (nothing upstream of them differs between
    # the runs) dequantize to what the float32 run wrote: RoPE channels exactly to bf16 (how the
    # layout stores them), NoPE channels to FP8 e4m3 precision under per-64 power-of-two scales.
    _, _, p8 = _prefill_decode("fp8", steps=0)
    _, _, p32 = _prefill_decode("float32", steps=0)
    for name in ("window", "compressed"):
        deq = np.asarray(kvc.dequantize_fp8(getattr(p8, name)[0]), np.float32)[:, :, 0]
        ref = np.asarray(getattr(p32, name)[0], np.float32)[:, :, 0]
        written = np.abs(ref).sum(-1) > 0
        assert written.sum() >= 4, name
        rope_bf16 = np.asarray(jnp.asarray(ref[written][:, 448:]).astype(jnp.bfloat16), np.float32)
        np.testing.assert_array_equal(deq[written][:, 448:], rope_bf16)
        nope, ref_nope = deq[written][:, :448].reshape(-1, 7, 64), ref[written][:, :448].reshape(-1, 7, 64)
        tile_max = np.abs(ref_nope).max(-1, keepdims=True)
        bound = np.maximum(np.abs(ref_nope) * 2.0 ** -4, tile_max * 2.0 ** -9) * 1.01 + 1e-6
        assert (np.abs(nope - ref_nope) <= bound).all(), name


def test_checkpoint_roundtrip_and_load_dispatch(tmp_path):
    model = _model()
    v4.save(model, tmp_path / "plain", max_shard_bytes=200_000)
    loaded = deepseek.load(tmp_path / "plain", dtype=jnp.float32, progress=False)
    assert isinstance(loaded, v4.DeepseekV4ForCausalLM) and loaded.config == CFG
    np.testing.assert_allclose(forward(loaded, _ids()), _reference_logits(), rtol=0, atol=1e-5)
    v4.save(model, tmp_path / "fp8", fp8=True)
    q = deepseek.load(tmp_path / "fp8", dtype=jnp.float32, progress=False)
    w = v4.hf_tensors(model)["model.layers.0.mlp.experts.gate_up_proj"]
    wq = v4.hf_tensors(q)["model.layers.0.mlp.experts.gate_up_proj"]
    assert 0 < rel(wq, w) < 0.05     # FP8 block-scaled at save, dequantized at load


def _deepseek_name(hf: str) -> str:
    """The HF name back in DeepSeek's own spelling (what the original release's files use)."""
    n = hf[len("model."):] if hf.startswith("model.") else hf
    for a, b in (("embed_tokens.weight", "embed.weight"), ("lm_head.weight", "head.weight"),
                 ("hc_head.hc_", "hc_head_"), (".self_attn.", ".attn."), (".mlp.", ".ffn."),
                 (".input_layernorm.", ".attn_norm."), (".post_attention_layernorm.", ".ffn_norm."),
                 (".attn_hc.", ".hc_attn_"), (".ffn_hc.", ".hc_ffn_"), (".sinks", ".attn_sink"),
                 (".compressor.indexer.scorer.weights_proj.", ".indexer.weights_proj."),
                 (".compressor.indexer.q_b_proj.", ".indexer.wq_b."),
                 (".compressor.indexer.", ".indexer.compressor."), ("compressor.kv_norm.", "compressor.norm."),
                 (".position_bias", ".ape"), (".q_a_proj.", ".wq_a."), (".q_b_proj.", ".wq_b."),
                 ("shared_experts.gate_proj.", "shared_experts.w1."), ("shared_experts.up_proj.", "shared_experts.w3."),
                 ("shared_experts.down_proj.", "shared_experts.w2."), (".kv_proj.", ".wkv."),
                 (".gate_proj.", ".wgate."), (".o_a_proj.", ".wo_a."), (".o_b_proj.", ".wo_b."),
                 (".q_a_norm.", ".q_norm."), (".gate.e_score_correction_bias", ".gate.bias")):
        n = n.replace(a, b)
    return n


def test_checkpoint_in_deepseek_naming(tmp_path):
    """DeepSeek's own tensor names (per-expert w1/w2/w3, FP8 with ``.scale``) load as transformers
    renames them."""
    from safetensors.numpy import save_file

    from jax_flashmla.models.deepseek.checkpoint import quantize_block_fp8
    out = {}
    for name, t in v4.hf_tensors(_model()).items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            base = _deepseek_name(name.rsplit(".", 1)[0])
            inter = CFG.moe_intermediate_size
            for j in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    out[f"{base}.{j}.w1.weight"], out[f"{base}.{j}.w3.weight"] = t[j, :inter], t[j, inter:]
                else:
                    out[f"{base}.{j}.w2.weight"] = t[j]
            continue
        n = _deepseek_name(name)
        if n.endswith(".wq_a.weight") or n.endswith(".wo_b.weight"):
            out[n], out[n[:-len(".weight")] + ".scale"] = quantize_block_fp8(t)
        else:
            out[n] = t
    assert "layers.0.attn.indexer.compressor.wkv.weight" in out and "hc_head_fn" in out
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(tmp_path / "model.safetensors"))
    import json
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_dict()))
    loaded = v4.hf_tensors(deepseek.load(tmp_path, dtype=jnp.float32, progress=False))
    want = v4.hf_tensors(_model())
    assert loaded.keys() == want.keys()
    for name, w in want.items():
        if name.endswith(".q_a_proj.weight") or name.endswith(".o_b_proj.weight"):
            assert 0 < rel(loaded[name], w) < 0.05, name
        else:
            np.testing.assert_array_equal(loaded[name], w, err_msg=name)


def test_generate_greedy_follows_forward_argmax():
    model = _model()
    prompt = _ids()[:, :LENS[1]]
    new = deepseek.generate(model, prompt, 10, kv_format="float32", block_size=4, compressed_block_size=2,
                            prompt_lengths=np.asarray(LENS), compiler_options=FAST)
    pad = np.zeros((2, SEQ), np.int32)
    for b, n in enumerate(LENS):
        pad[b, :n + len(new[b])] = np.concatenate([prompt[b, :n], new[b]])
    argmax = forward(model, pad).argmax(-1)
    for b, n in enumerate(LENS):
        np.testing.assert_array_equal(new[b], argmax[b, n - 1:n - 1 + len(new[b])])
