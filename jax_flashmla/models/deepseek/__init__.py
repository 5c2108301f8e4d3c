"""DeepSeek-V3 / V3.2 in Flax NNX on jax_flashmla: paged MLA decode, HF checkpoints, generation.

Public entry points::

    from jax_flashmla.models import deepseek
    model = deepseek.load("path/to/checkpoint", dtype=jnp.bfloat16)   # HF config.json + safetensors
    logits = model(input_ids)                                         # [b, s] -> [b, s, vocab] float32
    new_tokens = deepseek.generate(model, input_ids, max_new_tokens=32, temperature=0.0)

A random model of any shape: ``deepseek.DeepseekForCausalLM(deepseek.DeepseekConfig(...), seed=0)``.
"""
from .cache import KVPages, OutOfPagesError, PageAllocator, init_pages
from .checkpoint import CheckpointError, load, load_tokenizer, save
from .config import DeepseekConfig
from .generate import GenerationOutput, Generator, generate
from .model import DeepseekForCausalLM, attention_backend

__all__ = [
    "DeepseekConfig", "DeepseekForCausalLM", "load", "load_tokenizer", "save", "CheckpointError",
    "generate", "Generator", "GenerationOutput", "PageAllocator", "KVPages", "init_pages",
    "OutOfPagesError", "attention_backend",
]
