"""DeepSeek-V4 architecture, read from a Hugging Face ``config.json`` (``model_type="deepseek_v4"``).

Follows ``transformers``' ``DeepseekV4Config`` (5.23), including the legacy keys older checkpoints
ship (``compress_ratios`` per layer, ``compress_rate_csa`` / ``compress_rate_hca``,
``num_hash_layers``, ``qk_rope_head_dim``). Frozen and hashable, so it can be a static argument.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}


@dataclasses.dataclass(frozen=True)
class DeepseekV4Config:
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    # The compress branch's RoPE scaling (HF ``rope_parameters["compress"]`` minus theta), as
    # sorted (key, value) pairs; () = default RoPE.
    compress_rope_scaling: tuple = ()
    layer_types: tuple = ()
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    mlp_layer_types: tuple = ()
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: Any = 1
    model_type: str = "deepseek_v4"

    def __post_init__(self):
        n = self.num_hidden_layers
        if not self.layer_types:
            inter = [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
            object.__setattr__(self, "layer_types", tuple([HCA] * min(n, 2) + inter))
        if not self.mlp_layer_types:
            object.__setattr__(self, "mlp_layer_types", tuple(["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)))
        object.__setattr__(self, "layer_types", tuple(self.layer_types)[:n])
        object.__setattr__(self, "mlp_layer_types", tuple(self.mlp_layer_types)[:n])
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name, types, allowed in (("layer_types", self.layer_types, LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, ("hash_moe", "moe"))):
            if len(types) != n or any(t not in allowed for t in types):
                raise ValueError(f"DeepseekV4Config.{name}: expected {n} entries from {allowed}, got {types}")
        if self.num_attention_heads * self.head_dim % self.o_groups:
            raise ValueError("DeepseekV4Config: num_attention_heads * head_dim must divide into o_groups")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > min(self.head_dim, self.index_head_dim):
            raise ValueError(f"DeepseekV4Config: qk_rope_head_dim {self.qk_rope_head_dim} must be even and at "
                             f"most head_dim and index_head_dim")
        if self.scoring_func not in ("sqrtsoftplus", "softmax", "sigmoid"):
            raise ValueError(f"DeepseekV4Config.scoring_func: unknown {self.scoring_func!r}")

    # ---- derived ---------------------------------------------------------------------------------
    def compress_rate(self, layer_idx: int) -> int:
        """Tokens per compressed entry of a layer (0 for a sliding-window layer)."""
        t = self.layer_types[layer_idx]
        return {SLIDING: 0, CSA: self.compress_rate_csa, HCA: self.compress_rate_hca}[t]

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (tuple, list)) else (int(e),)

    @property
    def has_compressed(self) -> bool:
        return any(t != SLIDING for t in self.layer_types)

    def rope_inv_freq(self, kind: str) -> np.ndarray:
        """inv_freq [qk_rope_head_dim // 2] float32 of the "main" or "compress" RoPE, as HF computes it
        (YaRN on the compress branch when configured; its attention factor is 1 for V4)."""
        dim = self.qk_rope_head_dim
        base = float(self.rope_theta if kind == "main" else self.compress_rope_theta)
        pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        rs = dict(self.compress_rope_scaling) if kind == "compress" else {}
        if rs.get("rope_type", rs.get("type", "default")) != "yarn":
            return (1.0 / pos_freqs).astype(np.float32)
        factor = float(rs["factor"])
        orig = float(rs["original_max_position_embeddings"])
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def corr(rot):
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extra = 1.0 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
        return inv.astype(np.float32)

    def rope_attention_factor(self, kind: str) -> float:
        rs = dict(self.compress_rope_scaling) if kind == "compress" else {}
        if rs.get("rope_type", rs.get("type", "default")) != "yarn":
            return 1.0
        af = rs.get("attention_factor", 1.0)
        return 1.0 if af is None else float(af)

    # ---- (de)serialisation ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeepseekV4Config":
        d = dict(d)
        if d.get("model_type", "deepseek_v4") != "deepseek_v4":
            raise ValueError(f"config.json model_type: expected 'deepseek_v4', got {d.get('model_type')!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields and (v is not None or k.endswith("_token_id"))}
        n = int(d.get("num_hidden_layers", cls.num_hidden_layers))
        rates = d.get("compress_rates") or {}
        kw["compress_rate_csa"] = int(d.get("compress_rate_csa") or rates.get(CSA, 4))
        kw["compress_rate_hca"] = int(d.get("compress_rate_hca") or rates.get(HCA, 128))
        if d.get("layer_types"):
            kw["layer_types"] = tuple(d["layer_types"])
        elif d.get("compress_ratios"):
            kw["layer_types"] = tuple(_RATIO_TO_TYPE[int(r)] for r in d["compress_ratios"][:n])
        if d.get("mlp_layer_types"):
            kw["mlp_layer_types"] = tuple(d["mlp_layer_types"])
        elif d.get("num_hash_layers") is not None:
            h = int(d["num_hash_layers"])
            kw["mlp_layer_types"] = tuple(["hash_moe"] * min(n, h) + ["moe"] * max(0, n - h))
        head_dim = int(d.get("head_dim", cls.head_dim))
        if d.get("partial_rotary_factor") is not None:
            kw["qk_rope_head_dim"] = int(head_dim * float(d["partial_rotary_factor"]))
        elif d.get("qk_rope_head_dim") is not None:
            kw["qk_rope_head_dim"] = int(d["qk_rope_head_dim"])
        rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if isinstance(rp.get("compress"), dict):
            comp = dict(rp["compress"])
            if isinstance(rp.get("main"), dict) and rp["main"].get("rope_theta") is not None:
                kw["rope_theta"] = float(rp["main"]["rope_theta"])
        else:
            comp = {k: v for k, v in rp.items() if k != "main"}
        if comp.get("rope_theta") is not None:
            kw["compress_rope_theta"] = float(comp["rope_theta"])
        comp = {k: v for k, v in comp.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if comp.get("rope_type", comp.get("type", "default")) == "yarn":
            comp.setdefault("attention_factor", 1.0)
        kw["compress_rope_scaling"] = tuple(sorted(comp.items()))
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "DeepseekV4Config":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that ``transformers.DeepseekV4Config`` reads to the same model."""
        d = dataclasses.asdict(self)
        for k in ("compress_rate_csa", "compress_rate_hca", "compress_rope_scaling", "qk_rope_head_dim",
                  "compress_rope_theta"):
            d.pop(k)
        d["layer_types"] = list(self.layer_types)
        d["mlp_layer_types"] = list(self.mlp_layer_types)
        d["compress_rates"] = {CSA: self.compress_rate_csa, HCA: self.compress_rate_hca}
        d["partial_rotary_factor"] = self.qk_rope_head_dim / self.head_dim
        d["compress_rope_theta"] = self.compress_rope_theta
        comp = dict(self.compress_rope_scaling)
        if comp:
            d["rope_parameters"] = comp
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        return d

    def replace(self, **changes) -> "DeepseekV4Config":
        return dataclasses.replace(self, **changes)
