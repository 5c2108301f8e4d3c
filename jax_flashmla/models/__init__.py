"""Models built on jax_flashmla's attention ops (``jax_flashmla.models.deepseek``)."""
