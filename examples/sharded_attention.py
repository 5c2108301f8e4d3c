"""A DeepSeek-style MLA decode layer (absorbed form, paged latent cache) under a (data, model) mesh.

    python examples/sharded_attention.py [--data 2] [--model 4] [--batch 8] [--heads 16]

Data parallel over 'data': the batch, its block tables and lengths, and the page pool itself (each
data shard owns a local pool; its block table holds local block ids: docs/SHARDING.md).
Head (tensor) parallel over 'model': the query heads and the per-head weights (W_UQ, W_UK, W_UV,
W_O's head rows); the latent cache has one KV head, so every model shard of a data group reads
the same local pool. The only collective the step needs is the all-reduce of W_O's head-sum over
'model'; the script prints the compiled step's collectives to show it, and checks the sharded
step against the same step on one device (global block ids).

On a CPU-only machine it fakes 8 devices; on GPUs it uses the first data * model of them.
"""
import argparse
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_flashmla as jfm  # noqa: E402
from jax_flashmla import kv_cache as kvc  # noqa: E402

HIDDEN, Q_RANK, LATENT, NOPE, ROPE, V_DIM, PAGE = 1024, 384, 512, 128, 64, 128, 64


def init_params(key, h):
    ks = jax.random.split(key, 6)
    w = lambda k, *s: jax.random.normal(k, s, jnp.float32) * s[0] ** -0.5  # noqa: E731
    return dict(
        w_dq=w(ks[0], HIDDEN, Q_RANK),                 # x -> compressed query (replicated)
        w_uq=w(ks[1], Q_RANK, h, NOPE + ROPE),         # -> per-head query     (heads on model)
        w_dkv=w(ks[2], HIDDEN, LATENT + ROPE),         # x -> latent kv + k_pe (replicated)
        w_uk=w(ks[3], h, NOPE, LATENT),                # absorbed into q       (heads on model)
        w_uv=w(ks[4], h, LATENT, V_DIM),               # latent out -> values  (heads on model)
        w_o=w(ks[5], h, V_DIM, HIDDEN))                # heads -> hidden       (heads on model)


PARAM_SPECS = dict(w_dq=P(), w_uq=P(None, "model"), w_dkv=P(), w_uk=P("model"),
                   w_uv=P("model"), w_o=P("model"))


def rope(x, pos):
    """Rotary embedding on the last axis (ROPE channels), positions [b]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half) / half))
    ang = pos[:, None].astype(jnp.float32) * freq                        # [b, half]
    ang = ang.reshape(ang.shape[0], *([1] * (x.ndim - 2)), half)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang),
                            x1 * jnp.sin(ang) + x2 * jnp.cos(ang)], axis=-1)


def decode_step(params, x, pool, block_table, seqlens, write_tokens):
    """One token per sequence: x [b, HIDDEN] -> (y [b, HIDDEN], updated pool)."""
    pos = seqlens                                                        # the new token's position
    kv = x @ params["w_dkv"]                                             # [b, 576]
    latent = jnp.concatenate([kv[:, :LATENT], rope(kv[:, LATENT:], pos)], -1)
    pool = write_tokens(pool, block_table, pos[:, None],
                        latent[:, None, None, :].astype(pool.dtype))
    q = jnp.einsum("br,rhd->bhd", x @ params["w_dq"], params["w_uq"])   # [b, h, 192]
    q_lat = jnp.einsum("bhn,hnl->bhl", q[..., :NOPE], params["w_uk"])    # absorbed W_UK
    q = jnp.concatenate([q_lat, rope(q[..., NOPE:], pos)], -1)[:, None]  # [b, 1, h, 576]
    o_lat, _ = jfm.mla_decode(q.astype(jnp.bfloat16), pool, block_table, seqlens + 1,
                              head_dim_v=LATENT, softmax_scale=(NOPE + ROPE) ** -0.5)
    o = jnp.einsum("bhl,hlv->bhv", o_lat[:, 0].astype(jnp.float32), params["w_uv"])
    return jnp.einsum("bhv,hvd->bd", o, params["w_o"]), pool


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=int, default=2)
    ap.add_argument("--model", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=300)
    args = ap.parse_args()
    n_data, b, h = args.data, args.batch, args.heads
    mesh = Mesh(np.array(jax.devices()[:n_data * args.model]).reshape(n_data, args.model),
                ("data", "model"))

    rng = np.random.default_rng(0)
    params = init_params(jax.random.key(0), h)
    x = jnp.asarray(rng.standard_normal((b, HIDDEN)), jnp.float32)
    seqlens = rng.integers(1, args.seqlen, size=b).astype(np.int32)
    max_blocks = -(-(args.seqlen + 1) // PAGE)
    per_shard = b // n_data
    local_blocks = per_shard * max_blocks
    # Each data shard's allocator hands out its own pages: local ids 0 .. local_blocks - 1.
    local_table = np.concatenate([rng.permutation(local_blocks).reshape(per_shard, max_blocks)
                                  for _ in range(n_data)]).astype(np.int32)
    pool = jnp.asarray(rng.standard_normal((n_data * local_blocks, PAGE, 1, LATENT + ROPE)),
                       jnp.bfloat16)

    # Writing into local pools with local ids happens per shard: inside shard_map (a plain
    # scatter under jit would read the ids as global rows).
    write_local = jax.shard_map(kvc.write_tokens, mesh=mesh,
                                in_specs=(P("data"), P("data"), P("data"), P("data")),
                                out_specs=P("data"))
    shardings = (jax.tree.map(lambda s: NamedSharding(mesh, s), PARAM_SPECS),
                 NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data")),
                 NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data")))
    step = jax.jit(lambda *a: decode_step(*a, write_tokens=write_local), in_shardings=shardings,
                   out_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data"))))
    compiled = step.lower(params, x, pool, local_table, seqlens).compile()
    y, new_pool = compiled(params, x, pool, local_table, seqlens)

    # The same layer on one device, the pool seen whole: block ids shifted to global ones.
    shift = (np.arange(b) // per_shard * local_blocks)[:, None]
    y1, pool1 = jax.jit(lambda *a: decode_step(*a, write_tokens=kvc.write_tokens))(
        params, x, pool, local_table + shift, seqlens)

    print(f"mesh {dict(mesh.shape)} on {jax.devices()[0].platform}; attention: "
          f"{'CUDA kernel' if jfm.kernels_available()[0] else 'pure-JAX reference'}")
    print("y:", y.sharding.spec, "pool:", new_pool.sharding.spec)
    err = float(jnp.linalg.norm(y - y1) / jnp.linalg.norm(y1))
    print(f"sharded vs one device: relative error {err:.2e}; pools equal: "
          f"{bool(jnp.array_equal(new_pool, pool1))}")
    ops = re.findall(r"\s(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                     r"(?:-start)?\(", compiled.as_text())
    print("collectives in the compiled step:", sorted(set(ops)) or "none")
    assert err < 2e-2 and "all-gather" not in ops and "all-to-all" not in ops


if __name__ == "__main__":
    main()
