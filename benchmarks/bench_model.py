"""Model-level benchmark of the Flax DeepSeek-V3 model at full attention width (issue #17).

Random DeepSeek-V3-shaped weights (hidden 7168, 128 heads, kv_lora_rank 512 + rope 64, q_lora_rank
384, 8 routed experts top-4 + 1 shared; 2 layers by default: one dense, one MoE), bf16, made on the
device. Measures:

1. Prefill of b 32 x 4K and b 64 x 4K prompts (V3 MHA form, cuDNN flash attention, prompts in
   groups of --prefill-chunk-tokens): wall time, XLA's temp allocation for the call, the device's
   peak bytes in use.
2. Decode: ms per step and tokens/s of the on-device loop (``lax.while_loop``) at batch 1 / 16 / 64
   / 128 and contexts 1K-16K, kernel and reference attention; at b 16 and 64 (ctx 4K) also the GPU
   busy time per step from a ``jax.profiler`` trace (union of the kernel intervals on the GPU
   streams) and the top kernels, and the host-driven loop (one dispatch per step) for comparison.
   Roofline: (weight bytes read per step + KV bytes) / the measured copy bandwidth.

``--sparse``: the DeepSeek-V3.2 form of the same model (lightning indexer with 64 heads of 128,
index_topk 2048, sparse MLA over 656-byte FP8 pages, the FP8 sparse decode kernel); roofline KV
bytes then count the selected FP8 tokens and the indexer keys read per step.

Writes DIR/bench_model.json, DIR/bench_model.png (when matplotlib is importable; else run
``--plot-from DIR/bench_model.json`` where it is) and prints a compact table. About 3-4 minutes on
one H200 with the defaults; ``--max-seconds`` skips the remaining decode cases past a budget.

    python benchmarks/bench_model.py --out /tmp/bench_model
    python benchmarks/bench_model.py --sparse --prefill '' --out /tmp/bench_model_v32   # V3.2 decode
    python benchmarks/bench_model.py --smoke --out /tmp/bm       # tiny model, CPU-sized: checks the script
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from sbs_common import covered_us, exclusive_us_by_name, load_perfetto  # noqa: E402  (trace helpers the benchmarks share)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=False, default="bench_model_out", help="output directory")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed run (multiple of --sync-every)")
    p.add_argument("--sync-every", type=int, default=8)
    p.add_argument("--prefill", default="32x4096,64x4096", help="prefill cases BxS, comma separated ('' = none)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=16384)
    p.add_argument("--prefill-attention", default="auto", help="auto | cudnn | blockwise | plain")
    p.add_argument("--decode", default="kernel:16x4096,kernel:64x4096,reference:16x4096,reference:64x4096,"
                   "kernel:1x4096,kernel:128x4096,kernel:16x1024,kernel:64x1024,kernel:16x16384,"
                   "kernel:64x16384",
                   help="decode cases IMPL:BxCTX, comma separated, run in this order")
    p.add_argument("--profile", default="16x4096,64x4096", help="decode cases (BxCTX) also profiled, both impls")
    p.add_argument("--host-loop", default="16x4096,64x4096", help="kernel cases also run with a host loop")
    p.add_argument("--max-seconds", type=float, default=230.0, help="skip decode cases once past this")
    p.add_argument("--no-command-buffer", action="store_true", help="XLA_FLAGS --xla_gpu_enable_command_buffer=")
    p.add_argument("--sparse", action="store_true",
                   help="DeepSeek-V3.2: lightning indexer + sparse MLA over FP8 pages (the FP8 sparse kernel)")
    p.add_argument("--index-topk", type=int, default=2048, help="with --sparse: tokens each query attends")
    p.add_argument("--index-heads", type=int, default=64, help="with --sparse: lightning indexer heads")
    p.add_argument("--smoke", action="store_true", help="tiny model and cases (checks the script on a CPU)")
    p.add_argument("--plot-from", metavar="JSON", help="only draw the plot from an earlier run's JSON")
    return p.parse_args(argv)


def smoke(args):
    args.hidden, args.heads, args.experts, args.layers = 256, 16, 4, 2
    args.steps, args.sync_every = 4, 2
    args.prefill, args.prefill_chunk_tokens = "4x128", 256
    args.decode = "kernel:2x128,reference:2x256"
    args.profile, args.host_loop = "2x128", "2x128"
    args.index_topk, args.index_heads = 64, 4   # below the contexts: the selection matters


# --------------------------------------------------------------------------------------------------
# Model with random weights made on the device
# --------------------------------------------------------------------------------------------------
def build_model(args):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import deepseek_decode  # the example's random V3-shaped config (same shapes as the runs)

    from jax_flashmla.models import deepseek as ds

    cfg = deepseek_decode.random_config(types.SimpleNamespace(
        heads=args.heads, sparse=args.sparse, experts=args.experts, hidden=args.hidden, layers=args.layers), ds)
    if args.sparse:   # V3.2's own indexer width and selection (the example's are demo-sized)
        cfg = dataclasses.replace(cfg, index_topk=args.index_topk, index_n_heads=args.index_heads)
    abstract = nnx.eval_shape(lambda: ds.DeepseekForCausalLM(cfg, dtype=jnp.bfloat16, seed=0))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    fills = {}

    def fill(kind, shape, dtype):
        k = (kind, shape, jnp.dtype(dtype).name)
        if k not in fills:
            if kind == "zeros":
                fills[k] = jax.jit(lambda key: jnp.zeros(shape, dtype))
            elif kind == "ones":
                fills[k] = jax.jit(lambda key: jnp.ones(shape, dtype))
            else:
                fills[k] = jax.jit(lambda key: (0.05 * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
        return fills[k]

    key = jax.random.PRNGKey(0)
    values = []
    for i, (path, leaf) in enumerate(leaves):
        name = jax.tree_util.keystr(path)
        kind = "zeros" if ("bias" in name) else "ones" if len(leaf.shape) == 1 else "normal"
        values.append(fill(kind, tuple(leaf.shape), leaf.dtype)(jax.random.fold_in(key, i)))
    model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))
    return model, cfg


def weight_bytes(model, cfg, b):
    """Bytes of weights a decode step of batch b reads: everything but the embedding table (b rows)
    and the routed experts nobody picked (at most b * top_k of them)."""
    import jax
    from flax import nnx

    total, embed, experts = 0, 0, 0
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        name = jax.tree_util.keystr(path)
        n = x.size * x.dtype.itemsize
        total += n
        if "embed_tokens" in name:
            embed += n
        elif "experts" in name and "shared" not in name:
            experts += n
    touched = min(cfg.n_routed_experts, b * cfg.num_experts_per_tok) / cfg.n_routed_experts
    return total - embed - experts + experts * touched + b * cfg.hidden_size * 2, total


def kv_bytes_per_step(cfg, b, ctx):
    """Cache bytes a decode step reads: V3 every bf16 latent token; V3.2 the index_topk selected
    FP8 tokens (656 bytes) plus every indexer key (bf16)."""
    if not cfg.is_v32:
        return cfg.num_hidden_layers * b * ctx * cfg.kv_cache_dim * 2
    from jax_flashmla import kv_cache
    token = kv_cache.fp8_layout(d_qk=cfg.kv_cache_dim).token_bytes
    return cfg.num_hidden_layers * b * (min(ctx, cfg.index_topk) * token + ctx * cfg.index_head_dim * 2)


# --------------------------------------------------------------------------------------------------
# Profiles: GPU busy time from the perfetto trace
# --------------------------------------------------------------------------------------------------
def gpu_busy(trace_dir):
    """(busy seconds, top [(name, seconds)], lines used) from the newest perfetto trace under trace_dir.
    A name's seconds are the busy time it adds (exclusive_us_by_name), so the top list does not count
    a PDL-launched kernel's wait inside its predecessor twice.

    Busy = union of the intervals of the events on the GPU's stream lines (kernels, copies); when
    the trace has no "Stream" lines, the "XLA Ops" line of the GPU.
    """
    loaded = load_perfetto(trace_dir)
    if loaded is None:
        return None, [], "no perfetto_trace.json.gz"
    events, lines = loaded
    chosen = {k for k, n in lines.items() if n.startswith("Stream")}
    if not chosen:
        chosen = {k for k, n in lines.items() if n == "XLA Ops"}
    ops = {k for k, n in lines.items() if n == "XLA Ops"}
    spans, by_scope = [], {}
    for e in events:
        key = (e.get("pid"), e.get("tid"))
        if e.get("ph") != "X" or (key not in chosen and key not in ops):
            continue
        d = float(e.get("dur", 0.0))
        if key in ops:  # per-HLO-op events: attribute them to the jax.named_scope path when present
            scope = next((v for v in (e.get("args") or {}).values()
                          if isinstance(v, str) and ("decode/" in v or "prefill/" in v)), None)
            if scope:
                parts = [q for q in scope.split("/") if q and not q.startswith(("jit(", "while", "body", "cond"))]
                scope = "/".join(parts[:4])
                by_scope[scope] = by_scope.get(scope, 0.0) + d
        if key not in chosen:
            continue
        spans.append((float(e["ts"]), d, e.get("name", "?")))
    busy = covered_us(spans)
    top = sorted(exclusive_us_by_name(spans).items(), key=lambda kv: -kv[1])[:12]
    scopes = sorted(by_scope.items(), key=lambda kv: -kv[1])[:16]
    for pb in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        os.remove(pb)  # keep the (smaller) perfetto trace only
    return (busy * 1e-6, [(n, t * 1e-6) for n, t in top], sorted(set(lines[k] for k in chosen)),
            [(n, t * 1e-6) for n, t in scopes])


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------
def copy_bandwidth():
    import jax
    import jax.numpy as jnp

    n = (1 << 30) if jax.default_backend() == "gpu" else (1 << 24)
    x = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda x: x + jnp.bfloat16(1))
    f(x).block_until_ready()
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        y = f(x)
    y.block_until_ready()
    return 2 * n * 2 * reps / (time.perf_counter() - t0)


def run_prefill(model, cfg, b, s, args):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_flashmla.models import deepseek as ds
    from jax_flashmla.models.deepseek import layers

    bs = 64
    mb = -(-(s + 64) // bs)
    chunk = max(1, args.prefill_chunk_tokens // s) if args.prefill_chunk_tokens else None
    chunk = None if chunk is not None and chunk >= b else chunk
    graphdef, state = nnx.split(model)

    def prefill(state, pages, ids, lens, table):
        m = nnx.merge(graphdef, state)
        logits, pages = m.prefill(ids, lens, pages, table, attention=args.prefill_attention, batch_chunk=chunk)
        return jnp.argmax(logits, -1), pages

    pages = ds.init_pages(cfg, b * mb, bs)
    ids = jax.random.randint(jax.random.PRNGKey(1), (b, s), 0, cfg.vocab_size, jnp.int32)
    lens = jnp.full((b,), s, jnp.int32)
    table = jnp.arange(b * mb, dtype=jnp.int32).reshape(b, mb)
    n_refusals = len(layers._CUDNN_REFUSALS)
    t0 = time.perf_counter()
    compiled = jax.jit(prefill, donate_argnums=1).lower(state, pages, ids, lens, table).compile()
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    cudnn = "cudnn" in hlo.lower() and "fmha" in hlo.lower()
    # V3.2 (--sparse) attends the indexer's top-k through sparse_mla_prefill: our kernel where the
    # compiled program calls its FFI target, else the reference lowering (plain XLA).
    sparse_kernel = "jax_flashmla_sparse_mla_prefill" in hlo
    refusal = layers._CUDNN_REFUSALS[-1] if len(layers._CUDNN_REFUSALS) > n_refusals else ""
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    tok, pages = compiled(state, pages, ids, lens, table)  # warm-up
    tok.block_until_ready()
    t0 = time.perf_counter()
    tok, pages = compiled(state, pages, ids, lens, table)
    tok.block_until_ready()
    secs = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    del pages
    return dict(batch=b, prompt_len=s, chunk_prompts=chunk or b, seconds=secs, tokens_per_s=b * s / secs,
                compile_s=compile_s, temp_bytes=temp, peak_bytes_in_use=stats.get("peak_bytes_in_use"),
                attention="sparse prefill kernel" if sparse_kernel else "sparse prefill reference" if cfg.is_v32
                else "cudnn flash" if cudnn else f"blockwise/plain ({refusal or 'no cuDNN fmha in HLO'})")


def decode_state(cfg, b, ctx, n_steps, key):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_flashmla.models import deepseek as ds
    from jax_flashmla.models.deepseek.generate import DecodeState

    from jax_flashmla import kv_cache

    bs = 64
    mb = -(-(ctx + n_steps + 1) // bs)
    nb = b * mb

    def rand(k, d):
        return (0.5 * jax.random.normal(k, (nb, bs, 1, d), jnp.float32)).astype(jnp.bfloat16)

    # V3.2: the latent cache as 656-byte FP8 tokens (quantized from random bf16, so scales are sane)
    # and bf16 indexer keys; V3: the bf16 latent cache.
    make = jax.jit((lambda k: kv_cache.quantize_fp8(rand(k, cfg.kv_cache_dim))) if cfg.is_v32
                   else (lambda k: rand(k, cfg.kv_cache_dim)))
    layers = range(cfg.num_hidden_layers)
    index_k = ()
    if cfg.is_v32:
        make_index = jax.jit(lambda k: rand(k, cfg.index_head_dim))
        index_k = tuple(make_index(jax.random.fold_in(key, 1000 + i)) for i in layers)
    pages = ds.KVPages(kv=tuple(make(jax.random.fold_in(key, i)) for i in layers), index_k=index_k)
    table = np.arange(nb, dtype=np.int32).reshape(b, mb)
    held = -(-ctx // bs)
    free = table[:, held:].reshape(-1)[::-1].copy()

    def fresh(pages):
        return DecodeState(
            pages=pages, tokens=jnp.asarray(np.arange(b) % cfg.vocab_size, jnp.int32),
            seqlens=jnp.full((b,), ctx, jnp.int32), active=jnp.ones((b,), bool),
            block_table=jnp.asarray(np.where(np.arange(mb)[None] < held, table, 0)),
            free_pages=jnp.asarray(np.pad(free, (0, nb - len(free)))), num_free=jnp.int32(len(free)),
            out=jnp.zeros((b, n_steps + 1), jnp.int32), n_out=jnp.ones((b,), jnp.int32), steps=jnp.int32(0),
            key=jax.random.PRNGKey(0), out_of_pages=jnp.zeros((), bool))
    return fresh, pages


def run_decode(model, cfg, impl, b, ctx, args, *, profile_dir=None, host_loop=False):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_flashmla.models.deepseek.generate import _decode_steps, _flashmla_calls

    n = args.steps
    graphdef, mstate = nnx.split(model)
    params, treedef = jax.tree.flatten(mstate)
    fresh, pages = decode_state(cfg, b, ctx, n, jax.random.PRNGKey(b * 7 + ctx))
    stop = jnp.asarray([-1], jnp.int32)
    temp, tp = jnp.float32(0), jnp.float32(1)
    unroll = 1 if host_loop else args.sync_every
    t0 = time.perf_counter()
    compiled = _decode_steps.lower(graphdef, treedef, params, fresh(pages), stop, temp, tp, implementation=impl,
                                   greedy=True, unroll=unroll, loop=not host_loop).compile()
    compile_s = time.perf_counter() - t0
    calls = _flashmla_calls(compiled.as_text())

    def run(pages):
        st = fresh(pages)
        t0 = time.perf_counter()
        if host_loop:
            for _ in range(n):
                st = compiled(params, st, stop, temp, tp)  # asynchronous dispatch, state donated
        else:
            st = compiled(params, st, stop, temp, tp)
        steps = int(st.steps)
        return time.perf_counter() - t0, steps, st.pages

    _, _, pages = run(pages)  # warm-up
    secs, steps, pages = run(pages)
    res = dict(impl=impl, batch=b, ctx=ctx, loop="host" if host_loop else "device", steps=steps,
               ms_per_step=secs / steps * 1e3, tokens_per_s=b * steps / secs, compile_s=compile_s,
               custom_calls=list(calls))
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            _, psteps, pages = run(pages)
        busy, top, lines, scopes = gpu_busy(profile_dir)
        if busy is not None and busy > 0:
            per = busy / psteps * 1e3
            res.update(gpu_busy_ms_per_step=per, step_over_busy=res["ms_per_step"] / per,
                       top_kernels=[(nm, t / psteps * 1e3) for nm, t in top], trace_lines=lines,
                       top_scopes=[(nm, t / psteps * 1e3) for nm, t in scopes])
        else:
            res.update(gpu_busy_ms_per_step=None, trace_lines=lines)
    return res


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    dec = [r for r in result["decode"] if r["loop"] == "device"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl, marker in (("kernel", "o"), ("reference", "s")):
        for ctx in sorted({r["ctx"] for r in dec}):
            pts = sorted((r["batch"], r) for r in dec if r["impl"] == impl and r["ctx"] == ctx)
            if not pts:
                continue
            bs = [p[0] for p in pts]
            axes[0].plot(bs, [p[1]["ms_per_step"] for p in pts], marker=marker, label=f"{impl} ctx {ctx}")
            axes[1].plot(bs, [p[1]["tokens_per_s"] for p in pts], marker=marker, label=f"{impl} ctx {ctx}")
            if impl == "kernel":
                axes[0].plot(bs, [p[1]["roofline_ms"] for p in pts], ls=":", color="gray")
    axes[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="ms / decode step",
                title="decode step (dotted: roofline)")
    axes[1].set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens / s", title="decode throughput")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"DeepSeek-V3-shaped, {result['model']['layers']} layers, hidden {result['model']['hidden']}, "
                 f"{result['model']['heads']} heads ({result['device']}, {result['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def table(result):
    lines = [f"device {result['device']} | jax {result['jax']} | {result['date']} | model "
             f"{result['model']['params'] / 1e9:.2f}B params, {result['model'].get('form', 'V3')}, "
             f"{result['model']['layers']} layers, hidden "
             f"{result['model']['hidden']}, {result['model']['heads']} heads | copy bandwidth "
             f"{result['copy_bw'] / 1e12:.2f} TB/s", "",
             "| prefill | prompts/group | time | tokens/s | XLA temp | peak in use | attention |",
             "|---|---|---|---|---|---|---|"]
    gib = lambda x: f"{x / 2**30:.1f} GiB" if x else "-"  # noqa: E731
    for r in result["prefill"]:
        if "error" in r:
            lines.append(f"| b{r['batch']} x {r['prompt_len']} | - | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| b{r['batch']} x {r['prompt_len']} | {r['chunk_prompts']} | {r['seconds'] * 1e3:.0f} ms | "
                     f"{r['tokens_per_s']:.0f} | {gib(r['temp_bytes'])} | {gib(r['peak_bytes_in_use'])} | "
                     f"{r['attention']} |")
    lines += ["", "| attention | loop | batch | ctx | ms/step | tokens/s | GPU busy ms/step | step/busy | "
              "roofline ms | busy/roofline |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda r: (r["impl"], r.get("loop", ""), r["ctx"], r["batch"])  # noqa: E731
    for r in sorted(result["decode"], key=order):
        if "error" in r:
            lines.append(f"| {r['impl']} | {r.get('loop', '')} | {r['batch']} | {r['ctx']} | failed: {r['error'][:60]} "
                         f"| | | | | |")
            continue
        busy = r.get("gpu_busy_ms_per_step")
        ratio = f"{r['step_over_busy']:.2f}" if busy else "-"
        of_roof = f"{busy / r['roofline_ms']:.2f}" if busy else "-"
        lines.append(f"| {r['impl']} | {r['loop']} | {r['batch']} | {r['ctx']} | {r['ms_per_step']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {f'{busy:.3f}' if busy else '-'} | {ratio} | "
                     f"{r['roofline_ms']:.3f} | {of_roof} |")
    tops = [r for r in result["decode"] if r.get("top_kernels")]
    for r in tops:
        lines.append(f"\ntop GPU costs, {r['impl']} b{r['batch']} ctx {r['ctx']} (ms/step; time two kernels "
                     "share goes to the one that started first, so the lines add up to GPU busy):")
        for name, ms in r["top_kernels"][:8]:
            lines.append(f"  {ms:8.4f}  {name[:110]}")
        if r.get("top_scopes"):
            lines.append("  by named scope (XLA Ops line):")
            for name, ms in r["top_scopes"][:12]:
                lines.append(f"  {ms:8.4f}  {name[:110]}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.plot_from:
        with open(args.plot_from) as f:
            result = json.load(f)
        out = os.path.splitext(args.plot_from)[0] + ".png"
        print("plot:", out if plot(result, out) else "matplotlib is not importable")
        return
    if args.smoke:
        smoke(args)
    if args.no_command_buffer:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    try:   # the installed package (with its compiled kernels) first; the source tree otherwise
        import jax_flashmla  # noqa: F401
    except ImportError:
        sys.path.insert(0, ROOT)
    import jax

    import jax_flashmla as jfm
    ok, why = jfm.kernels_available()
    if not ok and jax.devices()[0].platform == "gpu":
        # A GPU run without the kernels would time the reference twice and label half of it
        # "kernel" (it happened once: the source tree shadowed the installed package).
        raise SystemExit(f"bench_model: on a GPU but the kernels are unavailable: {why}")

    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    elapsed = lambda: time.perf_counter() - start  # noqa: E731
    model, cfg = build_model(args)
    _, n_params = weight_bytes(model, cfg, 1)
    kernels, why = jfm.kernels_available()
    dev = jax.devices()[0]
    result = dict(device=f"{dev.device_kind} ({jax.default_backend()})", jax=jax.__version__,
                  date=time.strftime("%Y-%m-%d"), kernels=kernels, kernels_why=why,
                  model=dict(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                             experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok, params=n_params / 2,
                             form="V3.2 (indexer + FP8 sparse MLA)" if cfg.is_v32 else "V3 (dense MLA)",
                             index_topk=cfg.index_topk, index_heads=cfg.index_n_heads),
                  args=vars(args), prefill=[], decode=[])
    result["copy_bw"] = copy_bandwidth()
    print(f"[{elapsed():5.1f}s] model {n_params / 2e9:.2f}B params on {result['device']}; copy "
          f"{result['copy_bw'] / 1e12:.2f} TB/s; kernels: {kernels} {why}", flush=True)

    def save():
        with open(os.path.join(args.out, "bench_model.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)

    for case in filter(None, args.prefill.split(",")):
        b, s = map(int, case.split("x"))
        try:
            r = run_prefill(model, cfg, b, s, args)
        except Exception as e:  # an OOM is a result too
            r = dict(batch=b, prompt_len=s, error=f"{type(e).__name__}: {str(e)[:400]}")
        result["prefill"].append(r)
        print(f"[{elapsed():5.1f}s] prefill {case}: {r}", flush=True)
        if "error" in r and args.prefill_attention in ("auto", "cudnn"):
            # cuDNN can also fail at compile time (past the trace-time checks): the blockwise form.
            again = argparse.Namespace(**{**vars(args), "prefill_attention": "blockwise"})
            try:
                r = run_prefill(model, cfg, b, s, again)
            except Exception as e:
                r = dict(batch=b, prompt_len=s, error=f"{type(e).__name__}: {str(e)[:400]}")
            result["prefill"].append(r)
            print(f"[{elapsed():5.1f}s] prefill {case} (blockwise): {r}", flush=True)
        save()

    profiled = {tuple(map(int, c.split("x"))) for c in filter(None, args.profile.split(","))}
    host = {tuple(map(int, c.split("x"))) for c in filter(None, args.host_loop.split(","))}
    cases = []
    for c in filter(None, args.decode.split(",")):
        impl, shape = c.split(":")
        b, ctx = map(int, shape.split("x"))
        cases.append((impl, b, ctx, False))
        if impl == "kernel" and (b, ctx) in host:
            cases.append((impl, b, ctx, True))
    for impl, b, ctx, host_loop in cases:
        if elapsed() > args.max_seconds:
            print(f"[{elapsed():5.1f}s] skip {impl} b{b} ctx {ctx} (past --max-seconds)", flush=True)
            continue
        use = impl if kernels else None  # without the kernels: the automatic choice (the reference)
        prof = os.path.join(args.out, f"trace_{impl}_b{b}_ctx{ctx}") if (b, ctx) in profiled and not host_loop \
            else None
        try:
            r = run_decode(model, cfg, use, b, ctx, args, profile_dir=prof, host_loop=host_loop)
            r["impl"] = impl
        except Exception as e:
            r = dict(impl=impl, batch=b, ctx=ctx, loop="host" if host_loop else "device",
                     error=f"{type(e).__name__}: {str(e)[:400]}")
        else:
            wb, _ = weight_bytes(model, cfg, b)
            kvb = kv_bytes_per_step(cfg, b, ctx + args.steps / 2)
            r.update(weight_bytes=wb, kv_bytes=kvb, roofline_ms=(wb + kvb) / result["copy_bw"] * 1e3)
        result["decode"].append(r)
        print(f"[{elapsed():5.1f}s] decode {impl} {r.get('loop')} b{b} ctx {ctx}: "
              + (f"{r['ms_per_step']:.3f} ms/step, {r['tokens_per_s']:.0f} tok/s"
                 + (f", busy {r['gpu_busy_ms_per_step']:.3f} ms/step" if r.get("gpu_busy_ms_per_step") else "")
                 if "error" not in r else r["error"]), flush=True)
        save()

    result["total_seconds"] = elapsed()
    save()
    text = table(result)
    with open(os.path.join(args.out, "bench_model.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    png = os.path.join(args.out, "bench_model.png")
    print("plot:", png if plot(result, png) else "matplotlib not importable: run --plot-from on the JSON")
    print(f"[{elapsed():5.1f}s] done; {os.path.join(args.out, 'bench_model.json')}")


if __name__ == "__main__":
    main()
