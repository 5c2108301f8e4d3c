"""DeepSeek-V3 / V3.2 configuration, read from a Hugging Face ``config.json``.

Field names are the Hugging Face ones (``DeepseekV3Config`` / ``DeepseekV32Config``), so a config.json
maps onto the dataclass one key to one field. The dataclass is frozen and hashable: it is static
information inside ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# Keys of config.json that the model does not need (training knobs, HF bookkeeping). Silently ignored;
# any other unknown key is ignored too but listed in ``DeepseekConfig.ignored_keys``.
_KNOWN_IRRELEVANT = {
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "attention_dropout", "pretraining_tp", "ep_size", "aux_loss_alpha",
    "seq_aux", "num_nextn_predict_layers", "pad_token_id", "model_type", "quantization_config",
    "rope_scaling", "rope_parameters", "rope_theta", "eos_token_id", "head_dim", "qk_head_dim",
    "layer_types", "mlp_layer_types", "num_experts", "_name_or_path", "mlp_bias",
}


@dataclasses.dataclass(frozen=True)
class DeepseekConfig:
    """Architecture of a DeepSeek-V3 (``model_type="deepseek_v3"``) or V3.2 (``"deepseek_v32"``) model."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # unused by MLA; kept so a config.json round-trips
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536  # None: a single q_proj instead of the q low-rank path
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN parameters as a sorted tuple of (key, value) pairs (hashable); None: plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    # DeepSeek-V3.2 sparse attention (the lightning indexer). index_topk None: a V3 model.
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    model_type: str = "deepseek_v3"
    ignored_keys: tuple[str, ...] = ()

    # ---- derived ----------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_v32(self) -> bool:
        """True for DeepSeek-V3.2 (DSA): every layer has a lightning indexer."""
        return self.index_topk is not None

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def kv_cache_dim(self) -> int:
        """Width of one cached token: the latent plus the decoupled RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim ** -0.5, times YaRN's mscale(factor, mscale_all_dim) squared (as HF does)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling_dict
        if rs is not None and _rope_type(rs) == "yarn":
            mscale_all_dim = rs.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_get_mscale(float(rs["factor"]), float(mscale_all_dim))
                scale = scale * m * m
        return scale

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # ---- construction -----------------------------------------------------------------------------
    def __post_init__(self):
        def bad(field, expected, actual):
            raise ValueError(f"DeepseekConfig.{field}: expected {expected}, got {actual!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                bad(name, "a positive int", v)
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "an even number", self.qk_rope_head_dim)
        if self.scoring_func != "sigmoid":
            bad("scoring_func", "'sigmoid' (DeepSeek-V3 routing)", self.scoring_func)
        if self.topk_method not in ("noaux_tc",):
            bad("topk_method", "'noaux_tc' (DeepSeek-V3 routing)", self.topk_method)
        if self.hidden_act != "silu":
            bad("hidden_act", "'silu'", self.hidden_act)
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                bad("n_routed_experts", f"a multiple of n_group={self.n_group}", self.n_routed_experts)
            if not 1 <= self.topk_group <= self.n_group:
                bad("topk_group", f"in [1, n_group={self.n_group}]", self.topk_group)
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                bad("n_routed_experts", "at least 2 experts per group (group score = top-2 sum)",
                    self.n_routed_experts)
            if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
                bad("num_experts_per_tok", f"in [1, topk_group * experts per group = "
                    f"{self.topk_group * per_group}]", self.num_experts_per_tok)
        if self.is_v32:
            if not self.index_n_heads or not self.index_head_dim:
                bad("index_n_heads/index_head_dim", "positive ints for a V3.2 model",
                    (self.index_n_heads, self.index_head_dim))
            if self.index_head_dim < self.qk_rope_head_dim:
                bad("index_head_dim", f">= qk_rope_head_dim={self.qk_rope_head_dim}", self.index_head_dim)
            if self.q_lora_rank is None:
                bad("q_lora_rank", "an int for a V3.2 model (the indexer reads the q latent)", None)
        rs = self.rope_scaling_dict
        if rs is not None:
            rt = _rope_type(rs)
            if rt not in ("yarn", "default"):
                bad("rope_scaling", "YaRN ('type': 'yarn') or none", rs)
            if rt == "yarn" and "factor" not in rs:
                bad("rope_scaling", "a 'factor' for YaRN", rs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeepseekConfig":
        """Builds the config from a Hugging Face config dict (``rope_scaling`` or ``rope_parameters``)."""
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        theta = d.get("rope_theta")
        if isinstance(rope, dict):
            rope = dict(rope)
            theta = rope.pop("rope_theta", theta)
            if _rope_type(rope) == "default":
                rope = None
        else:
            rope = None
        if theta is not None:
            kw["rope_theta"] = float(theta)
        if rope is not None:
            kw["rope_scaling"] = tuple(sorted(
                (k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))
        if isinstance(d.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(d["eos_token_id"])
        elif "eos_token_id" in d:
            kw["eos_token_id"] = d["eos_token_id"]
        if "mlp_layer_types" in d and d["mlp_layer_types"] is not None and "first_k_dense_replace" not in d:
            types = list(d["mlp_layer_types"])
            kw["first_k_dense_replace"] = types.index("sparse") if "sparse" in types else len(types)
        if "num_experts" in d and "n_routed_experts" not in d:
            kw["n_routed_experts"] = d["num_experts"]
        ignored = []
        for k, v in d.items():
            if k in kw or k in ("rope_scaling", "rope_parameters", "rope_theta", "eos_token_id"):
                continue
            if k in fields and k != "ignored_keys":
                kw[k] = v
            elif k not in _KNOWN_IRRELEVANT:
                ignored.append(k)
        if "model_type" in d:
            kw["model_type"] = d["model_type"]
        if kw.get("model_type", "deepseek_v3") not in ("deepseek_v3", "deepseek_v32"):
            raise ValueError(
                f"config.json model_type: expected 'deepseek_v3' or 'deepseek_v32', got {kw['model_type']!r}")
        if kw.get("model_type") == "deepseek_v32" and kw.get("index_topk") is None:
            kw.update(index_topk=2048, index_n_heads=kw.get("index_n_heads") or 64,
                      index_head_dim=kw.get("index_head_dim") or 128)
        if kw.get("index_topk") is not None and "model_type" not in d:
            kw["model_type"] = "deepseek_v32"
        for k in ("rms_norm_eps", "routed_scaling_factor"):
            if k in kw:
                kw[k] = float(kw[k])
        kw["ignored_keys"] = tuple(sorted(ignored))
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "DeepseekConfig":
        """Reads ``config.json`` (a file, or a checkpoint directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"DeepSeek config: no config.json at {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face style config dict (what ``from_dict`` reads back)."""
        d = {}
        for f in dataclasses.fields(self):
            if f.name in ("ignored_keys", "rope_scaling"):
                continue
            v = getattr(self, f.name)
            if f.name.startswith("index_") and v is None:
                continue
            d[f.name] = list(v) if isinstance(v, tuple) else v
        d["rope_scaling"] = self.rope_scaling_dict
        d["architectures"] = ["DeepseekV32ForCausalLM" if self.is_v32 else "DeepseekV3ForCausalLM"]
        return d

    def replace(self, **changes) -> "DeepseekConfig":
        return dataclasses.replace(self, **changes)


def _rope_type(rs: dict[str, Any]) -> str:
    return rs.get("rope_type", rs.get("type", "default"))


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
