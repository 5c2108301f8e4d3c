"""Export a decode step with jax.export, then load and run it in a fresh process.

    python examples/export_decode.py [--batch 4] [--seqlen 300] [--out step.jax]

The step (schedule + mla_decode, as a model's layers run it) is exported for CUDA and CPU in one
artifact: on a Hopper GPU with the extension the CUDA part holds the kernels, elsewhere the
reference (README, "Exporting a step"). A second Python process, which never traces the step,
deserializes the file, runs it on the same inputs and must give the same result.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as jfm


def inputs(batch: int, seqlen: int, heads: int = 16, block: int = 64):
    rng = np.random.default_rng(0)
    blocks = -(-seqlen // block)
    lens = rng.integers(0, seqlen + 1, size=batch).astype(np.int32)
    table = rng.permutation(batch * blocks).reshape(batch, blocks).astype(np.int32)
    cache = rng.standard_normal((batch * blocks, block, 1, 576)).astype(np.float32)
    q = rng.standard_normal((batch, 1, heads, 576)).astype(np.float32)
    return (jnp.asarray(q, jnp.bfloat16), jnp.asarray(cache, jnp.bfloat16), jnp.asarray(table),
            jnp.asarray(lens))


@jax.jit
def step(q, cache, table, lens):
    md = jfm.get_mla_metadata(lens, s_q=q.shape[1], h_q=q.shape[2])
    return jfm.mla_decode(q, cache, table, lens, metadata=md)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=300)
    p.add_argument("--out", help="where to write the artifact (default: a temporary file)")
    p.add_argument("--load", help=argparse.SUPPRESS)   # the second process's mode
    args = p.parse_args()
    xs = inputs(args.batch, args.seqlen)

    if args.load:   # second process: no tracing of `step` here, only the artifact
        with open(args.load, "rb") as f:
            out, lse = jfm.deserialize(f.read()).call(*xs)
        np.save(args.load + ".out.npy", np.asarray(out, np.float32))
        return

    ok, why = jfm.kernels_available()
    with warnings.catch_warnings():   # off a Hopper GPU the CUDA part is the reference
        warnings.simplefilter("ignore", jfm.KernelFallbackWarning)
        exported = jfm.export(step, platforms=("cuda", "cpu"))(*xs)
    blob = exported.serialize()
    path = args.out or os.path.join(tempfile.mkdtemp(), "decode_step.jax")
    with open(path, "wb") as f:
        f.write(blob)
    print(f"exported for {exported.platforms}: {len(blob):,} bytes -> {path}; CUDA part: "
          f"{'kernels' if ok else 'reference (' + why + ')'}")

    subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--seqlen",
                    str(args.seqlen), "--load", path], check=True)
    loaded = np.load(path + ".out.npy")
    direct = np.asarray(step(*xs)[0], np.float32)
    same = np.array_equal(loaded, direct)
    print(f"ran in a fresh process on {jax.devices()[0].platform}: out {loaded.shape}, "
          f"equal to the jitted step: {same}")
    if not same:
        sys.exit("the loaded artifact's result differs from the jitted step's")


if __name__ == "__main__":
    main()
