"""DeepSeek-V4 paged decoding on jax_flashmla (``deepseek_decode.py --model v4`` runs this).

With no checkpoint: a small random DeepSeek-V4-shaped model with the real attention dims (head_dim
512 = 448 NoPE + 64 RoPE, one shared KV head, attention sink), all three layer types (sliding
window, compressed sparse attention with the lightning indexer, heavily compressed attention),
hyper-connections and hash + routed MoE. A batch of prompts is prefilled (one ``sparse_mla_prefill``
per layer) and decoded greedily: per layer and step ONE sparse ``mla_decode`` over the window pool
(``indices``) and the compressed pool (``extra_indices``), both in the V4 FP8 layout
(uint8 [blocks, page, 1, 584]) unless ``--bf16-cache``.

    python examples/deepseek_decode.py --model v4                   # random V4 model, FP8 pools
    python examples/deepseek_decode.py --model v4 --checkpoint DIR  # a transformers-format checkpoint
    python examples/deepseek_decode.py --model v4 --profile /tmp/trace

In the trace each layer's decode attention is ``decode/layer_<i>/attention/mla_decode`` (the CSA
indexer ``.../attention/indexer``, the MoE ``decode/layer_<i>/moe``); prefill is
``prefill/layer_<i>/attention/sparse_mla_prefill``; kernels appear as ``jax_flashmla_*`` calls.
"""
from __future__ import annotations

import os
import sys
import time


def random_config(args, v4):
    layers = args.layers
    pattern = [v4.SLIDING, v4.CSA, v4.HCA]
    return v4.DeepseekV4Config(
        vocab_size=16384, hidden_size=args.hidden, moe_intermediate_size=max(args.hidden // 2, 16),
        num_hidden_layers=layers, num_attention_heads=args.heads or 64, head_dim=512, qk_rope_head_dim=64,
        q_lora_rank=384, num_experts_per_tok=min(4, args.experts), n_routed_experts=args.experts,
        layer_types=tuple(pattern[i % 3] for i in range(layers)),
        mlp_layer_types=tuple("hash_moe" if i == 0 else "moe" for i in range(layers)),
        # Small rates and window so a short demo crosses window and compressor boundaries.
        compress_rate_csa=4, compress_rate_hca=16, sliding_window=32, hc_mult=4, o_groups=8, o_lora_rank=256,
        index_n_heads=16, index_head_dim=128, index_topk=8, eos_token_id=None,
        compress_rope_scaling=(("attention_factor", 1.0), ("beta_fast", 32), ("beta_slow", 1), ("factor", 16.0),
                               ("original_max_position_embeddings", 65536), ("rope_type", "yarn")))


def main(args):
    try:
        import jax_flashmla  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jax_flashmla.models import deepseek as ds
    from jax_flashmla.models.deepseek import v4

    implementation = None if args.implementation == "auto" else args.implementation
    kv_format = "bf16" if args.bf16_cache else "fp8"
    tokenizer = None
    t0 = time.perf_counter()
    if args.checkpoint:
        overrides = {"num_hidden_layers": args.num_layers} if args.num_layers else None
        model = ds.load(args.checkpoint, dtype=jnp.bfloat16, config_overrides=overrides)
        if not isinstance(model, v4.DeepseekV4ForCausalLM):
            raise SystemExit(f"--model v4: {args.checkpoint} is not a DeepSeek-V4 checkpoint")
        tokenizer = ds.load_tokenizer(args.checkpoint)
        what = f"checkpoint {args.checkpoint}"
    else:
        model = v4.DeepseekV4ForCausalLM(random_config(args, v4), dtype=jnp.bfloat16, seed=args.seed, init_std=0.05)
        what = "random model"
    cfg = model.config
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    types = {t: cfg.layer_types.count(t) for t in (v4.SLIDING, v4.CSA, v4.HCA)}
    print(f"jax {jax.__version__}, device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{what}: DeepSeek-V4-shaped, {cfg.num_hidden_layers} layers ({types[v4.SLIDING]} sliding, {types[v4.CSA]} "
          f"CSA rate {cfg.compress_rate_csa} top-{cfg.index_topk}, {types[v4.HCA]} HCA rate {cfg.compress_rate_hca}), "
          f"window {cfg.sliding_window}, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads x {cfg.head_dim}, "
          f"hc_mult {cfg.hc_mult}, {cfg.n_routed_experts} experts (top {cfg.num_experts_per_tok}), "
          f"{n_params / 1e6:.1f}M params ({time.perf_counter() - t0:.1f}s to build)")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from deepseek_decode import make_prompts, report   # what both examples share
    prompts = make_prompts(args, cfg, tokenizer)
    print(f"batch {len(prompts)}, prompt lengths {[len(p) for p in prompts]}, max_new_tokens {args.max_new_tokens}, "
          f"{kv_format} window + compressed pools (page {args.block_size})")

    # XLA:CPU spends far longer optimising this many small ops than running them: on CPU (the
    # reference path, a functional check) compile without backend optimisations.
    fast = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
            if jax.default_backend() == "cpu" else None)

    def run():
        return ds.generate(model, prompts, args.max_new_tokens, args.temperature, top_p=args.top_p, seed=args.seed,
                           kv_format=kv_format, block_size=args.block_size, compressed_block_size=args.block_size,
                           implementation=implementation, return_output=True, compiler_options=fast)

    out = run()
    report(out, prompts, tokenizer)
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            again = run()
        print(f"profile: {again.decode_steps} decode steps traced to {args.profile}; named scopes "
              f"decode/layer_<i>/attention/mla_decode, decode/layer_<i>/attention/indexer, decode/layer_<i>/moe, "
              f"prefill/layer_<i>/attention/sparse_mla_prefill"
              + (f", custom calls {', '.join(again.custom_calls)}" if again.custom_calls else ""))
    return out
