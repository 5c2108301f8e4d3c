"""DeepSeek-V4 in Flax NNX on jax_flashmla (sliding window + compressed sparse attention over two
paged FP8 pools). Reached through ``jax_flashmla.models.deepseek.load`` / ``generate`` when the
config says ``model_type: deepseek_v4``; see model.py for the paths through the model."""
from .checkpoint import hf_tensors, load, save
from .config import CSA, HCA, SLIDING, DeepseekV4Config
from .generate import generate
from .model import DeepseekV4ForCausalLM, V4Pages, V4Tables, init_cache

__all__ = ["DeepseekV4Config", "DeepseekV4ForCausalLM", "V4Pages", "V4Tables", "init_cache", "load", "save",
           "hf_tensors", "generate", "SLIDING", "CSA", "HCA"]
