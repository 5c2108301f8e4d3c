"""Quickstart: build a paged KV cache, run mla_decode under jit, print the backend and the time.

    python examples/quickstart.py [--batch 8] [--seqlen 1024] [--heads 16]
"""
import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as jfm
from jax_flashmla import kv_cache as kvc


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    b, h_q, block = args.batch, args.heads, 64
    d_qk, d_v = 576, 512
    rng = np.random.default_rng(0)
    seqlens = rng.integers(args.seqlen // 2, args.seqlen + 1, size=b).astype(np.int32)
    blocks_per_seq = -(-args.seqlen // block)
    num_blocks = b * blocks_per_seq
    # Pages handed out in a shuffled order, as a serving system's allocator would.
    block_table = rng.permutation(num_blocks).reshape(b, blocks_per_seq).astype(np.int32)
    cache = jnp.zeros((num_blocks, block, 1, d_qk), jnp.bfloat16)
    positions = np.where(np.arange(args.seqlen)[None] < seqlens[:, None], np.arange(args.seqlen), -1)
    tokens = jax.random.normal(jax.random.key(1), (b, args.seqlen, 1, d_qk), jnp.bfloat16)
    cache = jax.jit(kvc.write_tokens)(cache, block_table, positions.astype(np.int32), tokens)
    q = jax.random.normal(jax.random.key(2), (b, 1, h_q, d_qk), jnp.bfloat16)
    block_table, seqlens_dev = jnp.asarray(block_table), jnp.asarray(seqlens)  # on the device once

    ok, why = jfm.kernels_available()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; "
          f"attention: {'CUDA kernel' if ok else 'pure-JAX reference (' + why + ')'}")
    metadata = jfm.get_mla_metadata(seqlens_dev, s_q=1, h_q=h_q, h_kv=1)
    step = jax.jit(lambda q, c, t, s, m: jfm.mla_decode(q, c, t, s, head_dim_v=d_v, metadata=m))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jfm.KernelFallbackWarning)
        out, lse = jax.block_until_ready(step(q, cache, block_table, seqlens_dev, metadata))
    # Back-to-back calls, as a decode loop issues them; median over 5 rounds.
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(args.iters):
            res = step(q, cache, block_table, seqlens_dev, metadata)
        jax.block_until_ready(res)
        times.append((time.perf_counter() - t0) / args.iters)
    ms = 1e3 * float(np.median(times))
    gb = (int(seqlens.sum()) * d_qk * 2 + q.size * 2 + out.size * 2) / 1e9
    tflop = int(seqlens.sum()) * h_q * (2 * d_qk + 2 * d_v) / 1e12
    print(f"mla_decode b={b} h_q={h_q} mean s_k={seqlens.mean():.0f}: out {out.shape} "
          f"{out.dtype}, lse {lse.shape}; {ms:.3f} ms per call "
          f"({gb / ms * 1e3:.1f} GB/s, {tflop / ms * 1e3:.1f} TFLOPS)")
    assert np.isfinite(np.asarray(lse)).all()


if __name__ == "__main__":
    main()
