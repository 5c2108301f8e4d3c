"""Hugging Face-format DeepSeek checkpoints: config.json + safetensors (one file or sharded).

Tensor names are the HF ones (``model.layers.{i}.self_attn.kv_b_proj.weight``, ...). Every model
parameter's NNX path *is* its HF name, except the routed experts, which the model keeps stacked:
``model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`` (``[out, in]`` each) become
``experts.gate_proj / up_proj [E, hidden, inter]`` and ``experts.down_proj [E, inter, hidden]``.
(The fused layout newer ``transformers`` versions use in memory, ``experts.gate_up_proj
[E, 2*inter, hidden]`` / ``experts.down_proj [E, hidden, inter]``, is read too.)

FP8 block-quantized weights (DeepSeek's released checkpoints): a ``float8_e4m3fn`` ``weight`` with
a float32 ``weight_scale_inv [ceil(out/128), ceil(in/128)]``; the real weight is
``fp8 * weight_scale_inv`` per 128x128 block. They are dequantized at load to ``dtype``.

Tensors of layers >= num_hidden_layers (the multi-token-prediction layer of the released
checkpoints) are skipped, as HF does; so a ``num_hidden_layers`` override loads the first layers
of a big checkpoint.

The safetensors files are read by a small memory-mapped reader (``SafetensorsFile``): the format is
an 8-byte header length, a JSON header and raw little-endian bytes, and reading it directly gives
every dtype the checkpoints use (bf16, float8_e4m3fn) without a deep-learning framework.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from .config import DeepseekConfig
from .model import DeepseekForCausalLM


class CheckpointError(ValueError):
    """A checkpoint does not match the model its config.json describes."""


_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_DTYPES["F8_E8M0"] = np.dtype(ml_dtypes.float8_e8m0fnu)   # UE8M0 block scales (DeepSeek-V4)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
FP8_BLOCK = 128


# --------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------
class SafetensorsFile:
    """Memory-mapped read access to one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._header = header
        self._data_start = 8 + n
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) > 8 + n else None

    def keys(self) -> list[str]:
        return list(self._header)

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        h = self._header[name]
        return tuple(h["shape"]), h["dtype"]

    def get(self, name: str) -> np.ndarray:
        h = self._header[name]
        if h["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {h['dtype']}, which this loader "
                                  f"does not read (known: {sorted(_DTYPES)})")
        dt = _DTYPES[h["dtype"]]
        begin, end = h["data_offsets"]
        shape = tuple(h["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {end - begin} bytes for shape {shape} "
                                  f"{h['dtype']}")
        if end == begin:
            return np.zeros(shape, dt)
        buf = self._mm[self._data_start + begin:self._data_start + end]
        return buf.view(dt).reshape(shape)


class CheckpointReader:
    """All tensors of a checkpoint directory, by name, across its safetensors shards."""

    def __init__(self, checkpoint_dir: str):
        self.dir = checkpoint_dir
        index_path = os.path.join(checkpoint_dir, "model.safetensors.index.json")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: no 'weight_map' object")
            for name, fname in weight_map.items():
                if not os.path.exists(os.path.join(checkpoint_dir, fname)):
                    raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {fname}, which is missing "
                                          f"from {checkpoint_dir}")
                self._where[name] = fname
        else:
            shards = sorted(f for f in os.listdir(checkpoint_dir) if f.endswith(".safetensors"))
            if not shards:
                raise CheckpointError(f"{checkpoint_dir}: no *.safetensors files (and no "
                                      "model.safetensors.index.json)")
            for fname in shards:
                for name in self._open(fname).keys():
                    self._where[name] = fname

    def _open(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(os.path.join(self.dir, fname))
        return self._files[fname]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> str:
        return self._where[name]

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"checkpoint {self.dir}: missing tensor {name!r}")
        f = self._open(self._where[name])
        if name not in f.keys():
            raise CheckpointError(f"{f.path}: the index maps {name!r} to this file, but the file lacks it")
        return f.get(name)


def dequantize_block_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """``weight [out, in]`` float8_e4m3fn times its per-block ``scale_inv [ceil(out/b), ceil(in/b)]``."""
    out_f, in_f = weight.shape
    want = (-(-out_f // block), -(-in_f // block))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"FP8 weight of shape {weight.shape}: weight_scale_inv should be {want} "
                              f"(blocks of {block}), got {tuple(scale_inv.shape)}")
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=0), block, axis=1)[:out_f, :in_f]
    return weight.astype(np.float32) * s


def quantize_block_fp8(weight: np.ndarray, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The inverse used for writing checkpoints: (float8_e4m3fn weight, float32 scale_inv per block)."""
    w = np.asarray(weight, np.float32)
    out_f, in_f = w.shape
    ob, ib = -(-out_f // block), -(-in_f // block)
    padded = np.zeros((ob * block, ib * block), np.float32)
    padded[:out_f, :in_f] = w
    amax = np.abs(padded.reshape(ob, block, ib, block)).max(axis=(1, 3))
    scale_inv = np.maximum(amax / 448.0, 1e-12).astype(np.float32)
    s = np.repeat(np.repeat(scale_inv, block, axis=0), block, axis=1)[:out_f, :in_f]
    return (w / s).astype(ml_dtypes.float8_e4m3fn), scale_inv


# --------------------------------------------------------------------------------------------------
# name mapping
# --------------------------------------------------------------------------------------------------
_EXPERT_PATH = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _fp32_param(name: str) -> bool:
    return name.endswith("e_score_correction_bias")


class _Loader:
    def __init__(self, reader: CheckpointReader, config: DeepseekConfig, block: int):
        self.r = reader
        self.config = config
        self.block = block
        self.used: set[str] = set()

    def tensor(self, name: str, shape: tuple[int, ...] | None = None, dtype=np.float32) -> np.ndarray:
        """A checkpoint tensor in ``dtype`` (FP8 ones dequantized first), shape-checked."""
        if name not in self.r:
            hint = ""
            if ".q_a_proj." in name and name.replace("q_a_proj", "q_proj") in self.r:
                hint = " (the checkpoint has q_proj: its config should say q_lora_rank null)"
            elif ".q_proj." in name and name.replace("q_proj", "q_a_proj") in self.r:
                hint = " (the checkpoint has q_a_proj: its config should set q_lora_rank)"
            raise CheckpointError(f"checkpoint {self.r.dir}: missing tensor {name!r}{hint}")
        w = self.r.get(name)
        self.used.add(name)
        if w.dtype in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
            sname = name + "_scale_inv"
            if sname not in self.r:
                raise CheckpointError(f"checkpoint {self.r.dir}: tensor {name!r} is FP8 but {sname!r} is missing")
            self.used.add(sname)
            w = dequantize_block_fp8(w, self.r.get(sname), self.block)
        if shape is not None and tuple(w.shape) != tuple(shape):
            raise CheckpointError(
                f"checkpoint {self.r.dir}: tensor {name!r} (in {self.r.file_of(name)}) has shape "
                f"{tuple(w.shape)}, the config expects {tuple(shape)}")
        return np.asarray(w, dtype)

    def experts(self, layer: int, kind: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """Stacked expert weights [E, in, out] from per-expert [out, in] tensors (or the fused layout).

        Filled expert by expert in the target dtype: a float32 stack of DeepSeek-V3's 256 experts
        would take 15 GB of host memory per matrix."""
        e = shape[0]
        base = f"model.layers.{layer}.mlp.experts"
        if f"{base}.0.{kind}.weight" in self.r or f"{base}.gate_up_proj" not in self.r:
            stack = np.empty(shape, dtype)
            for j in range(e):
                stack[j] = self.tensor(f"{base}.{j}.{kind}.weight", (shape[2], shape[1]), dtype).T
            return stack
        inter = self.config.moe_intermediate_size
        hidden = self.config.hidden_size
        if kind == "down_proj":
            return self.tensor(f"{base}.down_proj", (e, hidden, inter), dtype).transpose(0, 2, 1)
        fused = self.tensor(f"{base}.gate_up_proj", (e, 2 * inter, hidden), dtype)
        part = fused[:, :inter] if kind == "gate_proj" else fused[:, inter:]
        return part.transpose(0, 2, 1)


def load(checkpoint_dir: str | os.PathLike, dtype=jnp.bfloat16, *, progress: bool = True, strict: bool = True,
         config_overrides: dict[str, Any] | None = None) -> DeepseekForCausalLM:
    """Loads a Hugging Face DeepSeek-V3 / V3.2 checkpoint directory into a ``DeepseekForCausalLM``.

    dtype: parameter dtype (FP8 weights are dequantized to it; the router's correction bias stays
    float32). strict: unused checkpoint tensors are an error (else a warning); tensors of layers
    past ``num_hidden_layers`` are always skipped. config_overrides: fields replaced in the config
    before building (e.g. ``{"num_hidden_layers": 2}`` for a quick look at a huge checkpoint).
    """
    checkpoint_dir, raw = read_config_json(checkpoint_dir)
    config = DeepseekConfig.from_dict(raw)
    if config_overrides:
        config = config.replace(**config_overrides)
    qc = raw.get("quantization_config") or {}
    block = int((qc.get("weight_block_size") or [FP8_BLOCK])[0])
    reader = CheckpointReader(checkpoint_dir)
    loader = _Loader(reader, config, block)

    abstract = nnx.eval_shape(lambda: DeepseekForCausalLM(config, dtype=dtype))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    bar = _progress(len(flat), progress, f"loading {os.path.basename(os.path.normpath(checkpoint_dir))}")
    for path, var in flat:
        name = _path_name(path)
        shape = var.get_value().shape
        pdt = np.dtype(np.float32) if _fp32_param(name) else np.dtype(var.get_value().dtype)
        m = _EXPERT_PATH.match(name)
        if m:
            w = loader.experts(int(m.group(1)), m.group(2), shape, pdt)
        else:
            w = loader.tensor(name, shape, pdt)
        var.set_value(jnp.asarray(w))
        bar.update(1)
    bar.close()

    unused = []
    for name in reader.names():
        if name in loader.used:
            continue
        m = _LAYER_NAME.match(name)
        if (m and int(m.group(1)) >= config.num_hidden_layers) or name.endswith("rotary_emb.inv_freq"):
            continue
        unused.append(name)
    report_unused(checkpoint_dir, unused, strict)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_tokenizer(checkpoint_dir: str | os.PathLike):
    """The checkpoint's ``tokenizers.Tokenizer`` from tokenizer.json, or None when it has none."""
    path = os.path.join(os.fspath(checkpoint_dir), "tokenizer.json")
    if not os.path.exists(path):
        return None
    import tokenizers  # optional dependency, only needed here
    return tokenizers.Tokenizer.from_file(path)


# --------------------------------------------------------------------------------------------------
# writing (tests, and for saving a converted / random model)
# --------------------------------------------------------------------------------------------------
def hf_tensors(model: DeepseekForCausalLM) -> dict[str, np.ndarray]:
    """The model's parameters under their Hugging Face names and layouts (experts split per expert)."""
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = _path_name(path)
        value = np.asarray(jax.device_get(var.get_value()))
        m = _EXPERT_PATH.match(name)
        if m:
            for j in range(value.shape[0]):
                out[f"model.layers.{m.group(1)}.mlp.experts.{j}.{m.group(2)}.weight"] = np.ascontiguousarray(
                    value[j].T)
        else:
            out[name] = value
    return out


def save(model: DeepseekForCausalLM, checkpoint_dir: str | os.PathLike, *, fp8: bool = False,
         max_shard_bytes: int | None = None) -> None:
    """Writes config.json and safetensors in the Hugging Face layout.

    fp8: store every 2-D projection weight (not embeddings, norms, router or LM head) as
    float8_e4m3fn with a 128x128-block ``weight_scale_inv``, as DeepSeek's checkpoints do.
    max_shard_bytes: split into shards with a ``model.safetensors.index.json``.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    os.makedirs(checkpoint_dir, exist_ok=True)
    tensors = hf_tensors(model)
    cfg = model.config.to_dict()
    if fp8:
        for name in list(tensors):
            if _quantizable(name, tensors[name]):
                tensors[name], tensors[name + "_scale_inv"] = quantize_block_fp8(tensors[name])
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    with open(os.path.join(checkpoint_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(tensors, checkpoint_dir, max_shard_bytes)


def _quantizable(name: str, t: np.ndarray) -> bool:
    skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "e_score_correction_bias", "weights_proj")
    return t.ndim == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def _require(d: str, fname: str) -> str:
    p = os.path.join(d, fname)
    if not os.path.exists(p):
        raise CheckpointError(f"checkpoint {d}: no {fname}")
    return p


def _progress(total: int, enabled: bool, desc: str, unit: str = "tensor"):
    """A tqdm progress bar (a no-op one when disabled); tqdm comes with the models extra."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


def write_safetensors(tensors: dict, checkpoint_dir: str, max_shard_bytes: int | None = None) -> None:
    """``tensors`` as Hugging Face safetensors in ``checkpoint_dir``: one ``model.safetensors``, or
    shards of at most ``max_shard_bytes`` with ``model.safetensors.index.json`` (V3 and V4 alike)."""
    from safetensors.numpy import save_file

    if max_shard_bytes is None:
        save_file(tensors, os.path.join(checkpoint_dir, "model.safetensors"))
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(checkpoint_dir, fname))
        weight_map.update({n: fname for n in shard})
    with open(os.path.join(checkpoint_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                   "weight_map": weight_map}, f, indent=2)


def read_config_json(checkpoint_dir) -> tuple[str, dict]:
    """(the directory as a str, its config.json as a dict), with clear errors (V3 and V4 alike)."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"checkpoint_dir {checkpoint_dir!r} is not a directory")
    with open(_require(checkpoint_dir, "config.json")) as f:
        return checkpoint_dir, json.load(f)


def report_unused(checkpoint_dir: str, unused: list, strict: bool) -> None:
    """Checkpoint tensors the model did not take: an error with ``strict``, else a warning."""
    if not unused:
        return
    msg = (f"checkpoint {checkpoint_dir}: {len(unused)} tensors are not used by the model its config "
           f"describes, e.g. {sorted(unused)[:8]}")
    if strict:
        raise CheckpointError(msg + " (pass strict=False to ignore them)")
    warnings.warn(msg)
