"""Checkpoint loading: safetensors files the test writes itself (FP8 weights with block scales,
sharded with an index, the fused expert layout), clear errors, save/load round trip, tokenizer."""
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jax_flashmla.models import deepseek as ds
from jax_flashmla.models.deepseek.checkpoint import CheckpointError
from test_model_hf import random_hf_tensors, tiny_hf_config, write_checkpoint


def model_tensor(model, name):
    """A parameter of the loaded model by HF name, as HF lays it out (experts un-stacked)."""
    parts = name.split(".")
    if ".mlp.experts." in name and parts[-1] == "weight":
        layer, j, kind = int(parts[2]), int(parts[5]), parts[6]
        stacked = getattr(model.model.layers[layer].mlp.experts, kind)[...]
        return np.asarray(stacked[j], np.float32).T
    obj = model
    for p in parts:
        obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    return np.asarray(obj[...], np.float32)


def fp8_quantize(w, block):
    """The test's own block quantizer: per (block x block) tile, scale_inv = amax / 448."""
    out_f, in_f = w.shape
    sb = np.zeros((-(-out_f // block), -(-in_f // block)), np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(sb.shape[0]):
        for j in range(sb.shape[1]):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            sb[i, j] = max(np.abs(tile).max() / 448.0, 1e-12)
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / sb[i, j]).astype(ml_dtypes.float8_e4m3fn)
    deq = np.zeros(w.shape, np.float32)
    for i in range(sb.shape[0]):
        for j in range(sb.shape[1]):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            deq[sl] = q[sl].astype(np.float32) * sb[i, j]
    return q, sb, deq


def test_fp8_block_quantized_sharded_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    block = 16  # small blocks so every matrix spans several, with ragged edges
    cfg = tiny_hf_config(num_hidden_layers=2,
                         quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]})
    tensors = random_hf_tensors(cfg, rng)
    stored, expected = {}, {}
    for name, w in tensors.items():
        if w.ndim == 2 and ("proj" in name) and "gate.weight" not in name:
            q, s, deq = fp8_quantize(w, block)
            stored[name], stored[name + "_scale_inv"], expected[name] = q, s, deq
        else:
            stored[name] = w.astype(ml_dtypes.bfloat16)
            expected[name] = stored[name].astype(np.float32)
    # The multi-token-prediction layer of the released checkpoints (layer index = num_hidden_layers).
    stored["model.layers.2.eh_proj.weight"] = rng.standard_normal((4, 4)).astype(np.float32)
    names = sorted(stored)
    shards = [names[: len(names) // 3], names[len(names) // 3: 2 * len(names) // 3], names[2 * len(names) // 3:]]
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-00003.safetensors"
        save_file({n: stored[n] for n in shard}, str(tmp_path / fname))
        weight_map.update({n: fname for n in shard})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    model = ds.load(tmp_path, dtype=jnp.float32, progress=False)
    n_fp8 = 0
    for name, want in expected.items():
        np.testing.assert_allclose(model_tensor(model, name), want, rtol=1e-6, atol=1e-7, err_msg=name)
        n_fp8 += name + "_scale_inv" in stored
    assert n_fp8 > 20
    # Dequantization really happened (FP8 values differ from the original float32 weights).
    w = "model.layers.1.self_attn.kv_b_proj.weight"
    assert not np.allclose(model_tensor(model, w), tensors[w], atol=1e-6)


def test_fused_expert_layout(tmp_path):
    """experts.gate_up_proj [E, 2I, H] / experts.down_proj [E, H, I] (newer transformers in-memory layout)."""
    rng = np.random.default_rng(1)
    cfg = tiny_hf_config(num_hidden_layers=2)
    tensors = random_hf_tensors(cfg, rng)
    E, base = cfg["n_routed_experts"], "model.layers.1.mlp.experts"
    g = np.stack([tensors.pop(f"{base}.{j}.gate_proj.weight") for j in range(E)])
    u = np.stack([tensors.pop(f"{base}.{j}.up_proj.weight") for j in range(E)])
    d = np.stack([tensors.pop(f"{base}.{j}.down_proj.weight") for j in range(E)])
    tensors[f"{base}.gate_up_proj"] = np.concatenate([g, u], axis=1)
    tensors[f"{base}.down_proj"] = d
    write_checkpoint(tmp_path, cfg, tensors)
    model = ds.load(tmp_path, dtype=jnp.float32, progress=False)
    ex = model.model.layers[1].mlp.experts
    np.testing.assert_array_equal(np.asarray(ex.gate_proj[...]), g.transpose(0, 2, 1))
    np.testing.assert_array_equal(np.asarray(ex.up_proj[...]), u.transpose(0, 2, 1))
    np.testing.assert_array_equal(np.asarray(ex.down_proj[...]), d.transpose(0, 2, 1))


def test_clear_errors(tmp_path):
    rng = np.random.default_rng(2)
    cfg = tiny_hf_config(num_hidden_layers=2)
    tensors = random_hf_tensors(cfg, rng)

    missing = dict(tensors)
    del missing["model.layers.1.self_attn.kv_b_proj.weight"]
    write_checkpoint(tmp_path, cfg, missing)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.kv_b_proj\.weight'"):
        ds.load(tmp_path, progress=False)

    bad = dict(tensors)
    bad["model.layers.0.self_attn.o_proj.weight"] = np.zeros((5, 7), np.float32)
    write_checkpoint(tmp_path, cfg, bad)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight'.*shape \(5, 7\).*expects \(48, 48\)"):
        ds.load(tmp_path, progress=False)

    extra = dict(tensors, **{"model.layers.0.self_attn.mystery.weight": np.ones((2, 2), np.float32)})
    write_checkpoint(tmp_path, cfg, extra)
    with pytest.raises(CheckpointError, match="not used.*mystery"):
        ds.load(tmp_path, progress=False)
    with pytest.warns(UserWarning, match="mystery"):
        ds.load(tmp_path, progress=False, strict=False)

    no_q_lora = dict(cfg, q_lora_rank=None)
    write_checkpoint(tmp_path, no_q_lora, tensors)
    with pytest.raises(CheckpointError, match="q_a_proj"):
        ds.load(tmp_path, progress=False)

    fp8 = dict(tensors)
    fp8["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].astype(
        ml_dtypes.float8_e4m3fn)
    write_checkpoint(tmp_path, cfg, fp8)
    with pytest.raises(CheckpointError, match="up_proj.weight_scale_inv"):
        ds.load(tmp_path, progress=False)

    with pytest.raises(CheckpointError, match="not a directory"):
        ds.load(tmp_path / "nope", progress=False)


def test_save_load_round_trip(tmp_path):
    cfg = ds.DeepseekConfig.from_dict(tiny_hf_config(num_hidden_layers=2, model_type="deepseek_v32",
                                                     index_n_heads=2, index_head_dim=16, index_topk=4))
    model = ds.DeepseekForCausalLM(cfg, dtype=jnp.float32, init_std=0.2, seed=3)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 7))
    want = np.asarray(model(ids))
    ds.save(model, tmp_path / "plain", max_shard_bytes=40_000)
    assert (tmp_path / "plain" / "model.safetensors.index.json").exists()
    loaded = ds.load(tmp_path / "plain", dtype=jnp.float32, progress=False)
    assert loaded.config == cfg
    a, b = nnx.state(model, nnx.Param), nnx.state(loaded, nnx.Param)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()), err_msg=str(pa))
    # The parameters are bitwise equal (above); the logits only to float32 rounding, since GPU
    # matmuls need not be bitwise reproducible across two compilations.
    np.testing.assert_allclose(np.asarray(loaded(ids)), want, rtol=1e-5, atol=1e-6)

    ds.save(model, tmp_path / "fp8", fp8=True)
    with open(tmp_path / "fp8" / "config.json") as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
    q = ds.load(tmp_path / "fp8", dtype=jnp.float32, progress=False)
    n_quantized = 0
    for (path, va), (_, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(nnx.state(q, nnx.Param))):
        x, y = np.asarray(va.get_value()), np.asarray(vb.get_value())
        if np.array_equal(x, y):
            continue
        err = np.linalg.norm(x - y) / np.linalg.norm(x)
        n_quantized += 1
        assert err < 0.05, (path, err)  # e4m3: 3 mantissa bits
    assert n_quantized >= 10


def test_config_from_hf_variants():
    old = tiny_hf_config()
    new = dict(old)
    rope = dict(new.pop("rope_scaling"), rope_theta=new.pop("rope_theta"))
    rope["rope_type"] = rope.pop("type")
    new["rope_parameters"] = rope
    a, b = ds.DeepseekConfig.from_dict(old), ds.DeepseekConfig.from_dict(new)
    assert a.softmax_scale == pytest.approx(b.softmax_scale)
    assert a.rope_theta == b.rope_theta and a.rope_scaling_dict["factor"] == b.rope_scaling_dict["factor"]
    v32 = ds.DeepseekConfig.from_dict(dict(old, model_type="deepseek_v32"))
    assert v32.is_v32 and v32.index_topk == 2048 and v32.index_n_heads == 64
    with pytest.raises(ValueError, match="scoring_func"):
        ds.DeepseekConfig.from_dict(dict(old, scoring_func="softmax"))
    with pytest.raises(ValueError, match="model_type"):
        ds.DeepseekConfig.from_dict(dict(old, model_type="llama"))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ds.DeepseekConfig.from_dict(dict(old, num_experts_per_tok=7, n_group=4, topk_group=1))


def test_tokenizer_from_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<bos>": 0, "<eos>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = ds.load_tokenizer(tmp_path)
    assert loaded.encode("hello world there").ids == [2, 3, 4]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ds.load_tokenizer(empty) is None
