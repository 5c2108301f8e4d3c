"""DeepSeek-V3 / V3.2 paged decoding on jax_flashmla: the project's main job.

With no arguments: a small random DeepSeek-V3-shaped model with the real attention dims
(kv_lora_rank 512 + RoPE 64, so the Hopper kernels apply), a batch of prompts of different
lengths, prefill, then greedy decoding over a paged bf16 cache. Prints tokens/s and whether
attention ran on jax_flashmla's CUDA kernels or on the pure-JAX reference (and why).

    python examples/deepseek_decode.py                       # random V3 model, bf16 cache
    python examples/deepseek_decode.py --fp8                 # FP8 (656-byte) cache
    python examples/deepseek_decode.py --sparse              # V3.2: indexer + sparse MLA, FP8 cache
    python examples/deepseek_decode.py --checkpoint DIR [--num-layers 4] [--prompt "..."]
    python examples/deepseek_decode.py --profile /tmp/trace  # jax.profiler trace of the decode steps
    python examples/deepseek_decode.py --loop host           # Python-driven steps (streaming-style)
    python examples/deepseek_decode.py --model v4            # DeepSeek-V4 (deepseek_v4_decode.py)

Decoding runs on the device (``--loop device``, default): all steps in one ``lax.while_loop`` with
the paged cache, page allocation and stop checks in its carry. Prefill goes in groups of prompts
(``--prefill-chunk-tokens``) with cuDNN flash attention on a GPU, so big batches of long prompts fit.

The trace opens in TensorBoard (``tensorboard --logdir DIR``, Profile tab) or in Perfetto
(https://ui.perfetto.dev, open ``DIR/plugins/profile/*/*.trace.json.gz``); each layer's attention
is the named scope ``decode/layer_<i>/attention`` and the kernels show up by their custom-call
names (``jax_flashmla_*``). See docs/MODEL.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("v3", "v4"), default="v3",
                   help="v3 (default; --sparse for V3.2) or v4: DeepSeek-V4, sliding window + compressed "
                        "sparse attention over two FP8 pools (examples/deepseek_v4_decode.py)")
    p.add_argument("--checkpoint", metavar="DIR", help="a Hugging Face DeepSeek-V3/V3.2 checkpoint directory")
    p.add_argument("--num-layers", type=int, default=None,
                   help="with --checkpoint: load only the first N decoder layers (a quick look at a big model)")
    p.add_argument("--prompt", action="append", default=None,
                   help="with a checkpoint's tokenizer: a prompt (repeat for several)")
    p.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of the decode steps to DIR")
    p.add_argument("--batch", type=int, default=4, help="sequences in the batch (default 4)")
    p.add_argument("--prompt-len", type=int, default=48, help="longest random prompt (default 48)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default 24)")
    p.add_argument("--fp8", action="store_true", help="FP8 KV cache (the 656-byte V3.2 layout)")
    p.add_argument("--bf16-cache", action="store_true", help="with --sparse: keep a bf16 cache")
    p.add_argument("--sparse", action="store_true", help="random model: DeepSeek-V3.2 (lightning indexer + DSA)")
    p.add_argument("--layers", type=int, default=4, help="random model: decoder layers (default 4)")
    p.add_argument("--hidden", type=int, default=512, help="random model: hidden size (default 512)")
    p.add_argument("--heads", type=int, default=None,
                   help="random model: attention heads (default 16; 64 with --sparse, the sparse kernels' count)")
    p.add_argument("--experts", type=int, default=16, help="random model: routed experts (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=64, help="tokens per cache page (the kernels use 64)")
    p.add_argument("--implementation", choices=("auto", "kernel", "reference"), default="auto",
                   help="attention: auto (kernel where one applies), or force one")
    p.add_argument("--loop", choices=("device", "host"), default="device",
                   help="decode loop: device (default: every step in one lax.while_loop, no host work per "
                        "step) or host (Python dispatches --sync-every steps at a time, asynchronously)")
    p.add_argument("--sync-every", type=int, default=8, help="decode steps between stop checks (default 8)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=16384,
                   help="prefill prompts in groups of about this many tokens (bounds prefill memory; 0: all at once)")
    return p.parse_args(argv)


def random_config(args, ds):
    heads = args.heads or (64 if args.sparse else 16)
    experts = args.experts
    n_group = 4 if experts % 4 == 0 and experts >= 8 else 1
    kw = dict(
        vocab_size=16384, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.hidden // 2, num_hidden_layers=args.layers, num_attention_heads=heads,
        num_key_value_heads=heads, n_shared_experts=1, n_routed_experts=experts, routed_scaling_factor=2.5,
        kv_lora_rank=512, q_lora_rank=384, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        n_group=n_group, topk_group=min(2, n_group), num_experts_per_tok=min(4, experts),
        first_k_dense_replace=1, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=(("beta_fast", 32), ("beta_slow", 1), ("factor", 40.0), ("mscale", 1.0),
                      ("mscale_all_dim", 1.0), ("original_max_position_embeddings", 4096), ("type", "yarn")),
        eos_token_id=None)
    if args.sparse:
        # index_topk below the prompt lengths, so the sparse selection matters even in a short demo.
        kw.update(model_type="deepseek_v32", index_n_heads=16, index_head_dim=128, index_topk=32)
    return ds.DeepseekConfig(**kw)


def make_prompts(args, cfg, tokenizer):
    """The examples' prompts: the given (or stock) texts through the tokenizer, else random ids of
    lengths falling from --prompt-len to about half of it across the batch."""
    import numpy as np

    if tokenizer is not None:
        texts = args.prompt or ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
                                "The three laws of thermodynamics are"][:args.batch]
        prompts = [tokenizer.encode(t).ids for t in texts]
        if cfg.bos_token_id is not None:
            prompts = [p if p[:1] == [cfg.bos_token_id] else [cfg.bos_token_id] + p for p in prompts]
        return prompts
    rng = np.random.default_rng(args.seed)
    lengths = [max(1, args.prompt_len - (i * args.prompt_len) // (2 * max(args.batch, 1)))
               for i in range(args.batch)]
    return [rng.integers(2, cfg.vocab_size, n).tolist() for n in lengths]


def report(out, prompts, tokenizer, loop=None):
    """The lines both examples print: which attention ran, timings, the first tokens of 4 prompts."""
    print(f"attention: {out.attention}" + (f" ({out.attention_detail})" if out.attention_detail else ""))
    if getattr(out, "prefill_custom_calls", ()):
        print(f"prefill attention: kernel ({', '.join(out.prefill_custom_calls)})")
    print(f"compile {out.compile_seconds:.1f}s | prefill {out.prompt_tokens} tokens in {out.prefill_seconds * 1e3:.1f} ms "
          f"({out.prefill_tokens_per_second:.0f} tokens/s) | decode {out.decode_tokens} tokens in "
          f"{out.decode_steps} steps, {out.decode_seconds * 1e3:.1f} ms: {out.tokens_per_second:.1f} tokens/s "
          f"({out.decode_seconds / max(out.decode_steps, 1) * 1e3:.2f} ms/step"
          + (f", {loop} loop)" if loop else ")"))
    for i in range(min(len(prompts), 4)):
        new = out.tokens[i, :out.lengths[i]].tolist()
        shown = repr(tokenizer.decode(new)) if tokenizer is not None else new[:12]
        print(f"  seq {i}: {shown}{' ...' if tokenizer is None and len(new) > 12 else ''}")


def main(argv=None):
    args = parse_args(argv)
    if args.profile and "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
        # Inside a CUDA-graph command buffer the per-op names are lost; keep them for the trace.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

    if args.model == "v4":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import deepseek_v4_decode
        return deepseek_v4_decode.main(args)
    try:
        import jax_flashmla  # noqa: F401
    except ImportError:  # running from a source checkout without installing
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_flashmla.models import deepseek as ds

    implementation = None if args.implementation == "auto" else args.implementation
    kv_format = "fp8" if (args.fp8 or (args.sparse and not args.bf16_cache)) else "bf16"
    tokenizer = None
    t0 = time.perf_counter()
    if args.checkpoint:
        overrides = {"num_hidden_layers": args.num_layers} if args.num_layers else None
        model = ds.load(args.checkpoint, dtype=jnp.bfloat16, config_overrides=overrides)
        tokenizer = ds.load_tokenizer(args.checkpoint)
        what = f"checkpoint {args.checkpoint}"
    else:
        model = ds.DeepseekForCausalLM(random_config(args, ds), dtype=jnp.bfloat16, seed=args.seed, init_std=0.05)
        what = "random model"
    cfg = model.config
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.tree.map(lambda v: v, _params(model))))
    print(f"jax {jax.__version__}, device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{what}: {'DeepSeek-V3.2' if cfg.is_v32 else 'DeepSeek-V3'}-shaped, {cfg.num_hidden_layers} layers, "
          f"hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, kv_lora_rank {cfg.kv_lora_rank} + rope "
          f"{cfg.qk_rope_head_dim}, {cfg.n_routed_experts} experts (top {cfg.num_experts_per_tok}), "
          f"vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params ({time.perf_counter() - t0:.1f}s to build)")

    prompts = make_prompts(args, cfg, tokenizer)
    print(f"batch {len(prompts)}, prompt lengths {[len(p) for p in prompts]}, max_new_tokens {args.max_new_tokens}, "
          f"{kv_format} paged cache (page {args.block_size})"
          + (f", sparse top-{cfg.index_topk}" if cfg.is_v32 else ""))

    gen = ds.Generator(model, block_size=args.block_size, kv_format=kv_format, implementation=implementation,
                       loop=args.loop, sync_every=args.sync_every,
                       prefill_chunk_tokens=args.prefill_chunk_tokens or None)
    out = gen.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, progress=True)
    report(out, prompts, tokenizer, loop=out.loop)

    if args.profile:
        # Same shapes as above, so the compiled steps are reused: the trace holds steady-state work only.
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            again = gen.generate(prompts, args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed, progress=False)
        print(f"profile: {again.decode_steps} decode steps traced to {args.profile} "
              f"(tensorboard --logdir {args.profile}, or open the .trace.json.gz in https://ui.perfetto.dev); "
              f"named scopes decode/layer_<i>/attention"
              + (f", custom calls {', '.join(again.custom_calls)}" if again.custom_calls else ""))
    return out


def _params(model):
    from flax import nnx
    return nnx.state(model, nnx.Param)


if __name__ == "__main__":
    main()
