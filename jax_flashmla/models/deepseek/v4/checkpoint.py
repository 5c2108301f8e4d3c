"""DeepSeek-V4 checkpoints in the transformers layout: config.json + safetensors (sharded or not).

Every NNX path of ``DeepseekV4ForCausalLM`` is the HF tensor name. The routed experts are read
either fused as HF keeps them (``mlp.experts.gate_up_proj [E, 2 * inter, hidden]``,
``mlp.experts.down_proj [E, hidden, inter]``) or per expert
(``mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight``). FP8 block-quantized weights
(``float8_e4m3fn`` + ``weight_scale_inv`` per 128x128 block, per expert for fused 3-D tensors) are
dequantized at load, as for V3 (scales float32 or UE8M0, named ``weight_scale_inv`` or ``scale``).
The reading itself is V3's (``CheckpointReader``).

DeepSeek's original tensor names (``layers.0.attn.wq_a.weight``, ``embed.weight``, ``hc_head_fn``,
``layers.3.ffn.experts.7.w1.weight``, ...) are translated as transformers' conversion mapping for
deepseek_v4 does (``original_to_hf_name``), so both spellings load.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ..checkpoint import (FP8_BLOCK, CheckpointError, CheckpointReader, _path_name, _progress,
                          dequantize_block_fp8, quantize_block_fp8, read_config_json,
                          report_unused, write_safetensors)
from .config import DeepseekV4Config
from .model import DeepseekV4ForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))

# transformers' conversion_mapping["deepseek_v4"] renames, in its order (then "model." in front).
_RENAMES = [(re.compile(a), b) for a, b in (
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight", "embed_tokens.weight"), (r"^head\.weight", "lm_head.weight"),
    (r"^hc_head_fn", "hc_head.hc_fn"), (r"^hc_head_base", "hc_head.hc_base"), (r"^hc_head_scale", "hc_head.hc_scale"),
    (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_fn", ".attn_hc.fn"), (r"\.hc_attn_base", ".attn_hc.base"), (r"\.hc_attn_scale", ".attn_hc.scale"),
    (r"\.hc_ffn_fn", ".ffn_hc.fn"), (r"\.hc_ffn_base", ".ffn_hc.base"), (r"\.hc_ffn_scale", ".ffn_hc.scale"),
    (r"\.attn_sink", ".sinks"), (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."),
    (r"\.ape", ".position_bias"), (r"\.wq_a\.", ".q_a_proj."), (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."), (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."), (r"\.q_norm\.", ".q_a_norm."), (r"\.gate\.bias", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."), (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
    (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."), (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
    (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."))]


def original_to_hf_name(name: str) -> str:
    """A DeepSeek-V4 tensor name in DeepSeek's own spelling -> the transformers name (HF names,
    which start with ``model.`` or ``lm_head.``, come back unchanged)."""
    if name.startswith(("model.", "lm_head.", "mtp.")):
        return name
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name if name.startswith("lm_head.") else "model." + name


def _fp32_path(name: str) -> bool:
    """Parameters HF keeps in float32 (_keep_in_fp32_modules_strict)."""
    keys = ("attn_hc.", "ffn_hc.", "hc_head.", ".sinks", "position_bias", "e_score_correction_bias", "q_a_norm.",
            "kv_norm.", "input_layernorm.", "post_attention_layernorm.", "model.norm.")
    return any(k in name for k in keys)


class _Reader:
    def __init__(self, reader: CheckpointReader, block: int):
        self.r, self.block, self.used = reader, block, set()
        # HF name -> the checkpoint's name (the same, or DeepSeek's original spelling).
        self.names = {}
        for n in reader.names():
            if n.endswith(".scale") and not n.startswith(("model.", "lm_head.")):
                n_hf = original_to_hf_name(n[:-len(".scale")] + ".weight") + "_scale_inv"
            else:
                n_hf = original_to_hf_name(n)
            self.names[n_hf] = n

    def __contains__(self, name):
        return name in self.names

    def raw(self, name):
        if name not in self.names:
            raise CheckpointError(f"checkpoint {self.r.dir}: missing tensor {name!r}")
        self.used.add(self.names[name])
        w = self.r.get(self.names[name])
        if w.dtype in _FP8:
            sname = name + "_scale_inv"
            if sname not in self.names:
                raise CheckpointError(f"checkpoint {self.r.dir}: tensor {name!r} is FP8 but its scales "
                                      f"({sname!r}) are missing")
            self.used.add(self.names[sname])
            s = self.r.get(self.names[sname])
            if w.ndim == 3:
                w = np.stack([dequantize_block_fp8(w[j], s[j], self.block) for j in range(w.shape[0])])
            else:
                w = dequantize_block_fp8(w, s, self.block)
        return w

    def tensor(self, name, shape, dtype):
        w = self.raw(name)
        if tuple(w.shape) != tuple(shape):
            raise CheckpointError(f"checkpoint {self.r.dir}: tensor {name!r} has shape {tuple(w.shape)}, the "
                                  f"config expects {tuple(shape)}")
        return np.asarray(w, dtype)

    def experts(self, layer, kind, shape, dtype):
        base = f"model.layers.{layer}.mlp.experts"
        if f"{base}.{kind}" in self:
            return self.tensor(f"{base}.{kind}", shape, dtype)
        out = np.empty(shape, dtype)
        for j in range(shape[0]):
            if kind == "down_proj":
                out[j] = self.tensor(f"{base}.{j}.down_proj.weight", shape[1:], dtype)
            else:
                inter = shape[1] // 2
                out[j, :inter] = self.tensor(f"{base}.{j}.gate_proj.weight", (inter, shape[2]), dtype)
                out[j, inter:] = self.tensor(f"{base}.{j}.up_proj.weight", (inter, shape[2]), dtype)
        return out


def load(checkpoint_dir, dtype=jnp.bfloat16, *, progress: bool = True, strict: bool = True,
         config_overrides=None) -> DeepseekV4ForCausalLM:
    """A transformers-format DeepSeek-V4 checkpoint directory -> ``DeepseekV4ForCausalLM``.

    dtype: the parameters' dtype (norms, mixers, sinks, biases stay float32 as in HF). strict:
    unused tensors are an error (else a warning); tensors of layers >= num_hidden_layers and the
    MTP module (``mtp.*``) are skipped, as HF does."""
    checkpoint_dir, raw = read_config_json(checkpoint_dir)
    config = DeepseekV4Config.from_dict(raw)
    if config_overrides:
        config = config.replace(**config_overrides)
    qc = raw.get("quantization_config") or {}
    reader = _Reader(CheckpointReader(checkpoint_dir), int((qc.get("weight_block_size") or [FP8_BLOCK])[0]))
    abstract = nnx.eval_shape(lambda: DeepseekV4ForCausalLM(config, dtype=dtype))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    bar = _progress(len(flat), progress, f"loading {os.path.basename(os.path.normpath(checkpoint_dir))}")
    for path, var in flat:
        name = _path_name(path)
        value = var.get_value()
        shape = value.shape
        if jnp.issubdtype(value.dtype, jnp.integer):
            w = np.asarray(reader.raw(name)).astype(value.dtype)
            if w.shape != shape:
                raise CheckpointError(f"checkpoint {checkpoint_dir}: {name!r} has shape {w.shape}, expected {shape}")
        else:
            pdt = np.dtype(np.float32) if _fp32_path(name) else np.dtype(value.dtype)
            m = _FUSED.match(name)
            w = reader.experts(int(m.group(1)), m.group(2), shape, pdt) if m else reader.tensor(name, shape, pdt)
        var.set_value(jnp.asarray(w))
        bar.update(1)
    bar.close()
    unused = []
    for name in reader.r.names():
        if name in reader.used or name.startswith("mtp.") or name.endswith("rotary_emb.inv_freq"):
            continue
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= config.num_hidden_layers:
            continue
        unused.append(name)
    report_unused(checkpoint_dir, unused, strict)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def hf_tensors(model: DeepseekV4ForCausalLM) -> dict[str, np.ndarray]:
    """Every parameter and buffer under its HF name, as NumPy (tid2eid as int64, HF's dtype)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = _path_name(path)
        v = np.asarray(jax.device_get(var.get_value()))
        out[name] = v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else v
    return out


def save(model: DeepseekV4ForCausalLM, checkpoint_dir, *, fp8: bool = False, max_shard_bytes: int | None = None):
    """config.json + safetensors in the transformers layout. fp8: 2-D projection weights and the
    fused experts as float8_e4m3fn with 128x128-block ``weight_scale_inv``."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    os.makedirs(checkpoint_dir, exist_ok=True)
    tensors = hf_tensors(model)
    cfg = model.config.to_dict()
    if fp8:
        for name in list(tensors):
            t = tensors[name]
            if name.endswith("proj.weight") and t.ndim == 2 and "weights_proj" not in name:
                tensors[name], tensors[name + "_scale_inv"] = quantize_block_fp8(t)
            elif _FUSED.match(name):
                parts = [quantize_block_fp8(t[j]) for j in range(t.shape[0])]
                tensors[name] = np.stack([p[0] for p in parts])
                tensors[name + "_scale_inv"] = np.stack([p[1] for p in parts])
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    with open(os.path.join(checkpoint_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    write_safetensors(tensors, checkpoint_dir, max_shard_bytes)
