"""The split-KV schedule on CPU: the pure-JAX twin (the CPU lowering of get_mla_metadata) equals the
plain-Python algorithm, and the schedule it describes covers every KV tile of every sequence exactly
once, with num_splits counting the chunks. The CUDA scheduler kernel is checked against the same
algorithm in tests/gpu/test_dense_decode_gpu.py. Also: which calls the dense kernel refuses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla.ops import _dense_decode_kernel as K
from jax_flashmla.ops import metadata as M
from jax_flashmla.ops.decode import DecodeConfig


def _coverage(lens, meta, ns):
    nb = np.where(lens > 0, (lens + 63) // 64, 0)
    cover = [np.zeros(n, int) for n in nb]
    chunks = np.zeros(len(lens), int)
    slots = set()
    for bs, bb, es, eb, bsp, *_ in meta:
        for s in range(bs, es + 1):
            lo = bb if s == bs else 0
            hi = eb if s == es else nb[s]
            cover[s][lo:hi] += 1
            split = bsp if s == bs else 0
            slot = ns[s] + split
            assert slot not in slots, "two chunks share a partial-result slot"
            slots.add(slot)
            chunks[s] += 1
    return cover, chunks


@pytest.mark.parametrize("b,parts", [(1, 132), (2, 66), (6, 33), (64, 66), (128, 132), (128, 33),
                                     (7, 1), (3, 2), (300, 16)])
def test_schedule_twin_and_coverage(rng, b, parts):
    for trial in range(3):
        lens = rng.integers(0, 9000, size=b).astype(np.int32)
        if trial == 1:
            lens[::3] = 0
        if trial == 2:
            lens[:] = rng.integers(0, 3, size=b)
        want_meta, want_ns = M.numpy_schedule(lens, parts)
        got = jax.jit(M.schedule_reference, static_argnums=1)(jnp.asarray(lens), parts)
        np.testing.assert_array_equal(np.asarray(got.tile_scheduler_metadata), want_meta)
        np.testing.assert_array_equal(np.asarray(got.num_splits), want_ns)
        cover, chunks = _coverage(lens, want_meta, want_ns)
        assert all((c == 1).all() for c in cover), "a tile is missed or assigned twice"
        np.testing.assert_array_equal(chunks, np.diff(want_ns))
        assert want_ns[-1] <= b + parts  # the workspace holds b + num_sm_parts slots


def test_get_mla_metadata_shapes_and_parts():
    lens = jnp.asarray([5, 0, 700], jnp.int32)
    meta = jax_flashmla.get_mla_metadata(lens, s_q=1, h_q=128, h_kv=1, num_sms=132)
    assert meta.tile_scheduler_metadata.shape == (66, 8)   # 132 SMs / 2 row blocks of 64
    assert meta.num_splits.shape == (4,)
    assert M.num_sm_parts(s_q=2, h_q=128, h_kv=1, num_sms=132) == 33
    assert M.num_sm_parts(s_q=1, h_q=16, h_kv=1, num_sms=78) == 78
    assert M.num_sm_parts(s_q=1, h_q=64, h_kv=8, num_sms=132) == 16
    np.testing.assert_array_equal(np.asarray(meta.num_splits), M.numpy_schedule(np.asarray(lens), 66)[1])


def _avals(**shapes):
    return [jax.core.ShapedArray(s, d) for s, d in shapes.values()]


def _config(**kw):
    base = dict(mode="dense", head_dim_v=512, softmax_scale=576 ** -0.5, causal=False,
                kv_format="bf16", implementation=None,
                present=("q", "kv_cache", "block_table", "cache_seqlens"))
    base.update(kw)
    return DecodeConfig(**base)


def test_kernel_coverage_reasons():
    ok = _avals(q=((2, 1, 16, 576), jnp.bfloat16), kv=((10, 64, 1, 576), jnp.bfloat16),
                bt=((2, 5), jnp.int32), sl=((2,), jnp.int32))
    assert K.unsupported_reason(_config(), ok) is None
    assert K.unsupported_reason(_config(causal=True), ok) is None
    assert "sparse" in K.unsupported_reason(_config(mode="sparse"), ok)
    assert "FP8" in K.unsupported_reason(_config(kv_format="fp8"), ok)
    assert "head_dim_v" in K.unsupported_reason(_config(head_dim_v=448), ok)
    d512 = _avals(q=((2, 1, 16, 512), jnp.bfloat16), kv=((10, 64, 1, 512), jnp.bfloat16),
                  bt=((2, 5), jnp.int32), sl=((2,), jnp.int32))
    assert "d_qk 512" in K.unsupported_reason(_config(), d512)
    page32 = _avals(q=((2, 1, 16, 576), jnp.float16), kv=((10, 32, 1, 576), jnp.float16),
                    bt=((2, 5), jnp.int32), sl=((2,), jnp.int32))
    assert "page block 32" in K.unsupported_reason(_config(), page32)
    sink = _config(present=("q", "kv_cache", "block_table", "cache_seqlens", "attn_sink"))
    assert "attn_sink" in K.unsupported_reason(sink, ok + _avals(s=((16,), jnp.float32)))


def test_workspace_size():
    o, l = K.workspace_avals(b=3, s_q=2, h_q=16, num_parts=10)
    assert o.shape == ((3 + 10) * 16 * 2 * 512,) and l.shape == ((3 + 10) * 16 * 2,)


def test_schedule_inside_shard_map_passes_check_vma():
    """The pure-JAX scheduler inside shard_map (check_vma on) gives the same integers as outside."""
    from jax.sharding import Mesh, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    lens = jnp.asarray([5, 300, 0, 70, 4096], jnp.int32)
    inside = jax.jit(jax.shard_map(lambda s: tuple(jax_flashmla.get_mla_metadata(s, h_q=16)), mesh=mesh,
                                   in_specs=P("data"), out_specs=(P("data"), P("data")),
                                   check_vma=True))(lens)
    outside = jax_flashmla.get_mla_metadata(lens, h_q=16)
    for a, b in zip(inside, outside):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
