"""One test per bad-input class: a clear ValueError at trace time naming the argument, the expected
and the actual value."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm

BF = jnp.bfloat16


def S(shape, dtype=BF):
    return jax.ShapeDtypeStruct(shape, dtype)


Q = S((2, 1, 16, 576))
CACHE = S((8, 64, 1, 576))
TABLE = S((2, 4), jnp.int32)
LENS = S((2,), jnp.int32)


def trace(fn, *args):
    """Errors must come at trace time: evaluate abstractly only."""
    return jax.eval_shape(fn, *args)


def decode(**kw):
    args = dict(q=Q, kv_cache=CACHE, block_table=TABLE, cache_seqlens=LENS)
    static = {k: kw.pop(k) for k in list(kw) if not isinstance(kw[k], jax.ShapeDtypeStruct)}
    args.update(kw)
    for k in static:
        args.pop(k, None)
    names = list(args)
    return trace(lambda *a: jfm.mla_decode(**dict(zip(names, a)), **static), *args.values())


CASES = [
    (dict(q=S((2, 16, 576))), "q: expected rank 4"),
    (dict(q=S((2, 1, 16, 576), jnp.float32)), "q: expected dtype bfloat16 or float16"),
    (dict(kv_cache=S((8, 64, 576))), "kv_cache: expected rank 4"),
    (dict(kv_cache=S((8, 64, 1, 576), jnp.float16)), "kv_cache: expected dtype bfloat16"),
    (dict(kv_cache=S((8, 64, 1, 512))), "kv_cache: expected last axis d_qk = 576"),
    (dict(kv_cache=S((8, 64, 3, 576))), "q: expected h_q divisible by the cache's h_kv = 3, got 16"),
    (dict(head_dim_v=600), "head_dim_v: expected 1 <= head_dim_v <= d_qk = 576, got 600"),
    (dict(softmax_scale=-1.0), "softmax_scale: expected a finite positive number"),
    (dict(kv_format="int4"), "kv_format: expected 'bf16' or 'fp8'"),
    (dict(kv_cache=S((8, 64, 1, 600), jnp.uint8)), "kv_cache: expected last axis 656 bytes"),
    (dict(kv_cache=S((8, 64, 2, 656), jnp.uint8)), "kv_cache: expected h_kv = 1 for an FP8"),
    (dict(kv_format="fp8"), "kv_cache: expected dtype uint8"),
    (dict(block_table=S((3, 4), jnp.int32)), "block_table: expected shape [b=2, max_blocks]"),
    (dict(block_table=S((2, 4), jnp.int64 if jax.config.jax_enable_x64 else jnp.uint32)),
     "block_table: expected dtype int32"),
    (dict(cache_seqlens=S((3,), jnp.int32)), "cache_seqlens: expected shape (2,)"),
    (dict(indices=S((2, 1, 8), jnp.int32), causal=True), "causal: expected False with indices"),
    (dict(indices=S((2, 2, 8), jnp.int32)), "indices: expected shape [b=2, s_q=1, topk]"),
    (dict(indices=S((2, 1, 8), jnp.float32)), "indices: expected dtype int32"),
    (dict(topk_length=S((2,), jnp.int32)), "topk_length: expected None unless indices"),
    (dict(indices=S((2, 1, 8), jnp.int32), topk_length=S((2, 1), jnp.int32)),
     "topk_length: expected shape (2,)"),
    (dict(attn_sink=S((8,), jnp.float32)), "attn_sink: expected float32 [h_q=16]"),
    (dict(indices=S((2, 1, 8), jnp.int32), extra_kv_cache=S((4, 16, 1, 576))),
     "extra_kv_cache / extra_indices: expected both or neither"),
    (dict(indices=S((2, 1, 8), jnp.int32), extra_kv_cache=S((4, 16, 2, 576)),
          extra_indices=S((2, 1, 8), jnp.int32)), "extra_kv_cache: expected h_kv = 1"),
    (dict(implementation="cuda"), "implementation: expected None"),
    (dict(block_table=None), "block_table / cache_seqlens: expected arrays for dense decode"),
]


@pytest.mark.parametrize("kwargs,message", CASES, ids=[m.split(":")[0] + str(i)
                                                       for i, (_, m) in enumerate(CASES)])
def test_decode_bad_input(kwargs, message):
    with pytest.raises(ValueError) as e:
        decode(**kwargs)
    assert message in str(e.value), str(e.value)
    assert str(e.value).startswith("mla_decode: ")


def test_metadata_wrong_batch():
    md = jfm.get_mla_metadata(jnp.zeros((3,), jnp.int32), s_q=1, h_q=16)
    with pytest.raises(ValueError, match=r"metadata.num_splits: expected shape \(3,\)"):
        jfm.mla_decode(jnp.zeros((2, 1, 16, 576), BF), jnp.zeros((8, 64, 1, 576), BF),
                       jnp.zeros((2, 4), jnp.int32), jnp.zeros((2,), jnp.int32), metadata=md)


def test_traced_softmax_scale_is_refused():
    with pytest.raises(ValueError, match="softmax_scale: expected a Python float"):
        jax.jit(lambda s: decode(softmax_scale=s))(0.1)


PREFILL_CASES = [
    (dict(q=S((4, 8, 576), jnp.float32)), "q: expected dtype bfloat16"),
    (dict(kv=S((10, 1, 512))), "kv: expected shape [s_kv, h_kv, d_qk=576]"),
    (dict(kv=S((10, 3, 576))), "kv: expected s_kv >= 1 and h_kv >= 1 dividing h_q = 8"),
    (dict(indices=S((4, 2, 16), jnp.int32)), "indices: expected shape [s_q=4, h_kv=1, topk]"),
    (dict(indices=S((4, 1, 16), jnp.int16)), "indices: expected dtype int32"),
    (dict(attn_sink=S((8,), BF)), "attn_sink: expected float32 [h_q=8]"),
    (dict(topk_length=S((3,), jnp.int32)), "topk_length: expected int32 [s_q=4]"),
]


@pytest.mark.parametrize("kwargs,message", PREFILL_CASES)
def test_prefill_bad_input(kwargs, message):
    args = dict(q=S((4, 8, 576)), kv=S((10, 1, 576)), indices=S((4, 1, 16), jnp.int32))
    args.update(kwargs)
    names = list(args)
    with pytest.raises(ValueError) as e:
        trace(lambda *a: jfm.sparse_mla_prefill(**dict(zip(names, a))), *args.values())
    assert message in str(e.value), str(e.value)


def test_kernel_forced_on_cpu_raises():
    cpu = jax.devices("cpu")[0]   # committed to the CPU even where a GPU is the default device
    q, cache, table, lens = jax.device_put((jnp.ones((1, 1, 16, 576), BF), jnp.ones((1, 64, 1, 576), BF),
                                            jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32)), cpu)
    with pytest.raises(ValueError, match="implementation='kernel' needs a Hopper GPU"):
        jfm.mla_decode(q, cache, table, lens, implementation="kernel")


def test_differentiation_is_refused():
    q = jnp.ones((1, 1, 2, 8), BF)
    cache = jnp.ones((1, 4, 1, 8), BF)
    f = lambda q: jfm.mla_decode(q, cache, jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32),
                                 head_dim_v=8)[1].sum()
    with pytest.raises(NotImplementedError, match="inference-only"):
        jax.grad(f)(q)
    np.testing.assert_array_equal(jax.grad(lambda q: f(jax.lax.stop_gradient(q)))(q), 0)
