"""DeepSeek-V3 / V3.2 in Flax NNX on jax_flashmla: paged MLA decode, HF checkpoints, generation.

Public entry points::

    from jax_flashmla.models import deepseek
    model = deepseek.load("path/to/checkpoint", dtype=jnp.bfloat16)   # HF config.json + safetensors
    logits = model(input_ids)                                         # [b, s] -> [b, s, vocab] float32
    new_tokens = deepseek.generate(model, input_ids, max_new_tokens=32, temperature=0.0)

A random model of any shape: ``deepseek.DeepseekForCausalLM(deepseek.DeepseekConfig(...), seed=0)``.

DeepSeek-V4 (``model_type: deepseek_v4``) lives in ``deepseek.v4``; ``load`` and ``generate`` here
dispatch to it by the checkpoint's config / the model's class.
"""
from .cache import KVPages, OutOfPagesError, PageAllocator, init_pages
from .checkpoint import CheckpointError, load as _load_v3, load_tokenizer, save
from .config import DeepseekConfig
from .generate import GenerationOutput, Generator, generate as _generate_v3
from .model import DeepseekForCausalLM, attention_backend

from . import v4  # noqa: E402  (uses the modules above)


def _model_type(checkpoint_dir) -> str | None:
    import json
    import os
    path = os.path.join(os.fspath(checkpoint_dir), "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("model_type")


def load(checkpoint_dir, dtype=None, **kwargs):
    """``checkpoint.load`` (V3 / V3.2) or ``v4.load`` (config.json ``model_type: deepseek_v4``)."""
    import jax.numpy as jnp
    dtype = jnp.bfloat16 if dtype is None else dtype
    if _model_type(checkpoint_dir) == "deepseek_v4":
        return v4.load(checkpoint_dir, dtype=dtype, **kwargs)
    return _load_v3(checkpoint_dir, dtype=dtype, **kwargs)


def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, **kwargs):
    """``generate.generate`` for V3 / V3.2, ``v4.generate`` for a ``v4.DeepseekV4ForCausalLM``."""
    if isinstance(model, v4.DeepseekV4ForCausalLM):
        return v4.generate(model, input_ids, max_new_tokens, temperature, **kwargs)
    return _generate_v3(model, input_ids, max_new_tokens, temperature, **kwargs)


load.__doc__ = (load.__doc__ or "") + "\n\n" + (_load_v3.__doc__ or "")
generate.__doc__ = (generate.__doc__ or "") + "\n\n" + (_generate_v3.__doc__ or "")

__all__ = [
    "DeepseekConfig", "DeepseekForCausalLM", "load", "load_tokenizer", "save", "CheckpointError",
    "generate", "Generator", "GenerationOutput", "PageAllocator", "KVPages", "init_pages",
    "OutOfPagesError", "attention_backend", "v4",
]
