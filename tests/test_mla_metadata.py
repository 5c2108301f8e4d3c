"""The split-KV schedule on CPU: the pure-JAX twin (the CPU lowering of get_mla_metadata) equals the
plain-Python algorithm (tests/oracle.py), and the schedule it describes covers every KV tile of
every sequence exactly once, with num_splits counting the chunks. The CUDA scheduler kernel is
checked against the same algorithm in tests/gpu/. Also: which calls each kernel refuses, schedules
made for other calls are refused at trace time, and the built extension's constants agree with
ops/kernels/limits.py."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
import oracle
from jax_flashmla.ops import metadata as M
from jax_flashmla.ops.decode import DecodeConfig
from jax_flashmla.ops.kernels import dense_decode, limits, sparse_decode, sparse_prefill
from jax_flashmla.ops.prefill import PrefillConfig


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
        want_meta, want_ns = oracle.schedule(lens, parts)
        got = jax.jit(M.schedule_reference, static_argnums=1)(jnp.asarray(lens), parts)
        np.testing.assert_array_equal(np.asarray(got.tile_scheduler_metadata), want_meta)
        np.testing.assert_array_equal(np.asarray(got.num_splits), want_ns)
        cover, chunks = _coverage(lens, want_meta, want_ns)
        assert all((c == 1).all() for c in cover), "a tile is missed or assigned twice"
        np.testing.assert_array_equal(chunks, np.diff(want_ns))
        assert want_ns[-1] <= b + parts  # the workspace holds b + num_sm_parts slots


def _upstream_rule_costs(lens, parts):
    """Part costs under upstream FlashMLA's payload (cdiv(total, parts) + 5, every time)."""
    return oracle.part_costs(oracle.schedule(lens, parts, upstream_rule=True)[0], lens)


@pytest.mark.parametrize("b,tiles,parts,want,upstream", [
    (64, 10, 132, 10, 13),    # V4 h_q 64, s_q 1, b 64: 5 tiles + overhead on 128 parts (upstream 8)
    (64, 32, 132, 21, 23),    # V3.2 h_q 16, s_q 1, b 64
    (32, 64, 66, 37, 39),     # dense h_q 128, 4K, b 32
    (128, 32, 132, 37, 37)])  # V3.2 s_q 2, b 64: already even, unchanged
def test_payload_spreads_equal_sequences(b, tiles, parts, want, upstream):
    """The payload is the smallest of cdiv(total, parts) + 0..5 whose fill leaves the last part no
    more than it: with equal sequences upstream's rule (+ 5 every time) loads some parts far
    above the even share and leaves others idle; ours does not, and never costs more."""
    lens = np.full(b, 64 * tiles, np.int32)
    got = jax.jit(M.schedule_reference, static_argnums=1)(jnp.asarray(lens), parts)
    meta = np.asarray(got.tile_scheduler_metadata)
    np.testing.assert_array_equal(meta, oracle.schedule(lens, parts)[0])
    assert oracle.part_costs(meta, lens).max() == want
    assert _upstream_rule_costs(lens, parts).max() == upstream
    cover, _ = _coverage(lens, meta, np.asarray(got.num_splits))
    assert all((c == 1).all() for c in cover)


def test_payload_never_above_upstream_rule(rng):
    for _ in range(200):
        b, parts = int(rng.integers(1, 200)), int(rng.integers(1, 140))
        lens = (rng.integers(0, 20000, b) if rng.random() < 0.5
                else np.full(b, int(rng.integers(1, 5000)))).astype(np.int32)
        meta, _ = oracle.schedule(lens, parts)
        assert oracle.part_costs(meta, lens).max() <= _upstream_rule_costs(lens, parts).max()


@pytest.mark.parametrize("b,s_q,parts,topk,extra", [(2, 2, 66, 128, 1024), (64, 2, 66, 2048, None),
                                                     (128, 1, 132, 128, 512), (5, 3, 7, 100, 70),
                                                     (300, 1, 16, 64, 64)])
def test_live_weighted_schedule(rng, b, s_q, parts, topk, extra):
    """topk_length / extra_topk_length weigh the sparse schedule by the tiles each token attends:
    the twin equals the oracle, every tile index (dead ones included) is still covered exactly
    once, and in the scheduler's cost (live tiles + 5 per chunk) the parts are no less even than
    the unweighted schedule's or upstream's payload rule's under the same weights. (Live tiles
    alone, without the per-chunk cost, the smallest-fitting payload may lose by a tile: 27 of
    2,940 random trials.)"""
    for trial in range(3):
        tl = rng.integers(0, topk + 1, size=b).astype(np.int32)
        etl = None if extra is None else rng.integers(0, extra + 1, size=b).astype(np.int32)
        if trial == 1:
            tl[::2] = 0
        if trial == 2:
            tl = None if extra is not None else np.full(b, topk + 7, np.int32)  # clamps
        if tl is None and etl is None:
            continue
        sched = M.sparse_schedule(s_q=s_q, h_q=64, topk=topk, extra_topk=extra, num_sms=parts)
        live = np.asarray(M.sparse_live(sched, None if tl is None else jnp.asarray(tl),
                                        None if etl is None else jnp.asarray(etl)))
        lens = np.full(b * s_q, M.sparse_positions(topk, extra), np.int32)
        want_meta, want_ns = oracle.schedule(lens, sched.num_parts, live=live)
        got = jax_flashmla.get_mla_metadata(jnp.zeros((b,), jnp.int32), s_q=s_q, h_q=64, topk=topk,
                                            extra_topk=extra, num_sms=parts,
                                            topk_length=None if tl is None else jnp.asarray(tl),
                                            extra_topk_length=None if etl is None else jnp.asarray(etl))
        np.testing.assert_array_equal(np.asarray(got.tile_scheduler_metadata), want_meta)
        np.testing.assert_array_equal(np.asarray(got.num_splits), want_ns)
        cover, chunks = _coverage(lens, want_meta, want_ns)
        assert all((c == 1).all() for c in cover), "a tile is missed or assigned twice"
        np.testing.assert_array_equal(chunks, np.diff(want_ns))
        # Each part's live tiles and its cost (+ 5 per chunk), against other schedules'.
        def part_work(meta):
            work, cost = [], []
            for bs, bb, es, eb, *_ in meta:
                w = 0
                for q in range(bs, es + 1):
                    lo = bb if q == bs else 0
                    hi = eb if q == es else -(-lens[q] // 64)
                    w += oracle.live_cost(live[q], lo) - oracle.live_cost(live[q], hi)
                work.append(w)
                cost.append(w + 5 * max(0, es - bs + 1))
            return np.asarray(work), np.asarray(cost)
        weighted, weighted_cost = part_work(want_meta)
        plain, plain_cost = part_work(oracle.schedule(lens, sched.num_parts)[0])
        _, upstream_cost = part_work(oracle.schedule(lens, sched.num_parts, live=live,
                                                     upstream_rule=True)[0])
        assert weighted.sum() == plain.sum() == sum(oracle.live_cost(x, 0) for x in live)
        assert weighted_cost.max() <= plain_cost.max()
        assert weighted_cost.max() <= upstream_cost.max()
        payload = -(-int(sum(oracle.live_cost(x, 0) + 5 for x in live)) // sched.num_parts) + 5
        assert weighted_cost[:-1].max(initial=0) <= payload


def test_live_lengths_are_checked():
    lens = jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match=r"topk_length: expected int32 \[b\]"):
        jax_flashmla.get_mla_metadata(lens, h_q=64, topk=128, topk_length=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="extra_topk_length: expected None unless extra_topk"):
        jax_flashmla.get_mla_metadata(lens, h_q=64, topk=128,
                                      extra_topk_length=jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="topk_length: expected None unless topk"):
        jax_flashmla.get_mla_metadata(lens, h_q=64, topk_length=jnp.zeros((4,), jnp.int32))


def test_get_mla_metadata_shapes_and_parts():
    lens = jnp.asarray([5, 0, 700], jnp.int32)
    meta = jax_flashmla.get_mla_metadata(lens, s_q=1, h_q=128, h_kv=1, num_sms=132)
    assert meta.tile_scheduler_metadata.shape == (66, 8)   # 132 SMs / 2 row blocks of 64
    assert meta.num_splits.shape == (4,)
    assert meta.schedule == M.Schedule("dense", 1, 128, 1, None, None, 66)
    assert M.num_sm_parts(rows_per_kv_head=2 * 128, num_sms=132) == 33
    assert M.num_sm_parts(rows_per_kv_head=16, num_sms=78) == 78
    assert M.num_sm_parts(rows_per_kv_head=8, h_kv=8, num_sms=132) == 16
    np.testing.assert_array_equal(np.asarray(meta.num_splits), oracle.schedule(np.asarray(lens), 66)[1])
    tiles, splits = meta   # unpacks like FlashMLA's pair
    assert tiles is meta.tile_scheduler_metadata and splits is meta.num_splits


def test_sparse_schedule_covers_every_query_token():
    """Sparse decode schedules the b * s_q query tokens, each of topk (padded to whole tiles) +
    extra_topk positions."""
    lens = jnp.asarray([5, 0, 700], jnp.int32)
    meta = jax_flashmla.get_mla_metadata(lens, s_q=2, h_q=128, topk=100, extra_topk=70,
                                         num_sms=132)
    assert meta.schedule == M.Schedule("sparse", 2, 128, 1, 100, 70, 66)
    positions = 128 + 70
    want_meta, want_ns = oracle.schedule(np.full(6, positions), 66)
    np.testing.assert_array_equal(np.asarray(meta.tile_scheduler_metadata), want_meta)
    np.testing.assert_array_equal(np.asarray(meta.num_splits), want_ns)
    cover, _ = _coverage(np.full(6, positions), want_meta, want_ns)
    assert all((c == 1).all() for c in cover)


def test_metadata_made_for_another_call_is_refused():
    b, h_q = 3, 16
    q = jnp.ones((b, 1, h_q, 576), jnp.bfloat16)
    kv = jnp.ones((4, 64, 1, 576), jnp.bfloat16)
    table = jnp.zeros((b, 2), jnp.int32)
    lens = jnp.full((b,), 70, jnp.int32)
    other_heads = jax_flashmla.get_mla_metadata(lens, h_q=128)
    with pytest.raises(ValueError, match=r"mla_decode: metadata: .*'h_q': 128"):
        jax_flashmla.mla_decode(q, kv, table, lens, metadata=other_heads)
    sparse_md = jax_flashmla.get_mla_metadata(lens, h_q=h_q, topk=64)
    with pytest.raises(ValueError, match=r"mla_decode: metadata: .*'mode': 'sparse'"):
        jax_flashmla.mla_decode(q, kv, table, lens, metadata=sparse_md)
    idx = jnp.zeros((b, 1, 128), jnp.int32)
    with pytest.raises(ValueError, match=r"mla_decode: metadata: .*'topk': 64"):
        jax_flashmla.mla_decode(q, kv, indices=idx, metadata=sparse_md)
    # The right one passes, and so does a hand-built pair of the right shapes.
    jax_flashmla.mla_decode(q, kv, indices=idx,
                            metadata=jax_flashmla.get_mla_metadata(lens, h_q=h_q, topk=128))
    jax_flashmla.mla_decode(q, kv, table, lens, metadata=jax_flashmla.MLAMetadata(
        *jax_flashmla.get_mla_metadata(lens, h_q=h_q)))


def test_get_mla_metadata_bad_input():
    lens = jnp.asarray([5, 0], jnp.int32)
    with pytest.raises(ValueError, match="get_mla_metadata: implementation"):
        jax_flashmla.get_mla_metadata(lens, h_q=16, implementation="fast")
    with pytest.raises(ValueError, match="get_mla_metadata: h_kv: expected 1 for sparse"):
        jax_flashmla.get_mla_metadata(lens, h_q=16, h_kv=2, topk=64)
    with pytest.raises(ValueError, match="get_mla_metadata: extra_topk"):
        jax_flashmla.get_mla_metadata(lens, h_q=16, extra_topk=64)
    with pytest.raises(ValueError, match="get_mla_metadata: cache_seqlens"):
        jax_flashmla.get_mla_metadata(lens.astype(jnp.int64 if jax.config.x64_enabled else jnp.float32), h_q=16)


def test_kernel_forced_on_cpu_raises_for_the_scheduler():
    lens = jax.device_put(jnp.asarray([5, 0], jnp.int32), jax.devices("cpu")[0])
    with pytest.raises(ValueError, match="get_mla_metadata: implementation='kernel' needs a Hopper"):
        jax.jit(lambda l: jax_flashmla.get_mla_metadata(l, h_q=16, implementation="kernel"))(lens)


def _avals(**shapes):
    return [jax.core.ShapedArray(s, d) for s, d in shapes.values()]


def _config(**kw):
    base = dict(mode="dense", head_dim_v=512, softmax_scale=576 ** -0.5, causal=False,
                kv_format="bf16", implementation=None,
                present=("q", "kv_cache", "block_table", "cache_seqlens"))
    base.update(kw)
    return DecodeConfig(**base)


def test_kernel_coverage_reasons():
    K = dense_decode
    ok = _avals(q=((2, 1, 16, 576), jnp.bfloat16), kv=((10, 64, 1, 576), jnp.bfloat16),
                bt=((2, 5), jnp.int32), sl=((2,), jnp.int32))
    assert K.unsupported_reason(_config(), ok) is None
    assert K.unsupported_reason(_config(causal=True), ok) is None
    assert "sparse" in K.unsupported_reason(_config(mode="sparse"), ok)
    assert "FP8" in K.unsupported_reason(_config(kv_format="fp8"), ok)
    assert "head_dim_v" in K.unsupported_reason(_config(head_dim_v=448), ok)
    d512 = _avals(q=((2, 1, 16, 512), jnp.bfloat16), kv=((10, 64, 1, 512), jnp.bfloat16),
                  bt=((2, 5), jnp.int32), sl=((2,), jnp.int32))
    assert "d_qk 576" in K.unsupported_reason(_config(), d512)
    page32 = _avals(q=((2, 1, 16, 576), jnp.float16), kv=((10, 32, 1, 576), jnp.float16),
                    bt=((2, 5), jnp.int32), sl=((2,), jnp.int32))
    assert "page size 64" in K.unsupported_reason(_config(), page32)
    sink = _config(present=("q", "kv_cache", "block_table", "cache_seqlens", "attn_sink"))
    assert "attn_sink" in K.unsupported_reason(sink, ok + _avals(s=((16,), jnp.float32)))


def test_sparse_kernel_coverage_reasons():
    K = sparse_decode
    present = ("q", "kv_cache", "indices")
    sparse = _config(mode="sparse", kv_format="fp8", present=present)
    v32 = _avals(q=((2, 2, 16, 576), jnp.bfloat16), kv=((10, 61, 1, 656), jnp.uint8),
                 i=((2, 2, 100), jnp.int32))
    assert K.unsupported_reason(sparse, v32) is None
    assert "dense" in K.unsupported_reason(_config(), v32)
    v4 = _avals(q=((2, 1, 3, 512), jnp.bfloat16), kv=((10, 2, 1, 584), jnp.uint8),
                i=((2, 1, 1), jnp.int32))
    assert K.unsupported_reason(sparse, v4) is None
    fp16 = _avals(q=((2, 1, 16, 576), jnp.float16), kv=((10, 64, 1, 576), jnp.float16),
                  i=((2, 1, 8), jnp.int32))
    assert "bf16 queries" in K.unsupported_reason(_config(mode="sparse", present=present), fp16)
    hkv2 = _avals(q=((2, 1, 16, 576), jnp.bfloat16), kv=((10, 64, 2, 576), jnp.bfloat16),
                  i=((2, 1, 8), jnp.int32))
    assert "h_kv 1" in K.unsupported_reason(_config(mode="sparse", present=present), hkv2)
    prefill = PrefillConfig(head_dim_v=512, softmax_scale=0.1, implementation=None,
                            present=("q", "kv", "indices"))
    ok = _avals(q=((7, 5, 512), jnp.bfloat16), kv=((30, 1, 512), jnp.bfloat16),
                i=((7, 1, 3), jnp.int32))
    assert sparse_prefill.unsupported_reason(prefill, ok) is None
    d192 = _avals(q=((7, 5, 192), jnp.bfloat16), kv=((30, 1, 192), jnp.bfloat16),
                  i=((7, 1, 3), jnp.int32))
    assert "d_qk" in sparse_prefill.unsupported_reason(prefill, d192)


def test_extension_constants_match_limits():
    """csrc/kernels/params.h is the truth; where the extension is built (CI compiles it), its
    constants must equal ops/kernels/limits.py (jax_flashmla._ffi refuses a build that differs)."""
    try:
        module = importlib.import_module("jax_flashmla._jax_flashmla_cuda")
    except ImportError:
        pytest.skip("the CUDA extension is not built here")
    assert module.constants() == limits.ALL


def _extension_in_child(code, *argv, variant=None):
    """stdout of ``python -c code argv...`` in a fresh process with JFM_KERNEL_VARIANT=variant
    (None: unset), importing the very extension this process finds (not a source tree's copy);
    skips where the extension is not built (CI compiles it). Returns (stdout, the module)."""
    import os
    import subprocess
    import sys
    try:
        module = importlib.import_module("jax_flashmla._jax_flashmla_cuda")
    except ImportError:
        pytest.skip("the CUDA extension is not built here")
    env = {k: v for k, v in os.environ.items() if k != "JFM_KERNEL_VARIANT"}
    if variant is not None:
        env["JFM_KERNEL_VARIANT"] = variant
    site = os.path.dirname(os.path.dirname(os.path.abspath(module.__file__)))
    env["PYTHONPATH"] = site
    out = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                         text=True, check=True, cwd=site).stdout
    return out, module


def test_scheduler_kernel_fill_on_the_host(rng):
    """The scheduler kernel's fill (csrc/kernels/decode/schedule_fill.h, the code its thread 0
    runs) built for the host into the extension: the same integers as the oracle on random dense
    lengths and on sparse steps weighted by topk lengths. Runs where the extension is built (CI
    compiles it); the GPU tests check the kernel itself."""
    try:
        module = importlib.import_module("jax_flashmla._jax_flashmla_cuda")
    except ImportError:
        pytest.skip("the CUDA extension is not built here")
    for trial in range(120):
        b, parts = int(rng.integers(1, 80)), int(rng.integers(1, 140))
        if trial % 2:
            lens, live = rng.integers(0, 20000, b).astype(np.int32), None
            if trial % 3 == 1:
                lens[::3] = 0
        else:
            s_q, topk = int(rng.integers(1, 4)), int(rng.integers(1, 3000))
            extra = int(rng.integers(1, 1500)) if trial % 4 else None
            sched = M.sparse_schedule(s_q=s_q, h_q=64, topk=topk, extra_topk=extra, num_sms=parts)
            tl = jnp.asarray(rng.integers(-3, topk + 5, b), jnp.int32)
            etl = jnp.asarray(rng.integers(0, extra + 1, b), jnp.int32) if extra else None
            live = np.asarray(M.sparse_live(sched, tl, etl))
            lens = np.full(b * s_q, M.sparse_positions(topk, extra), np.int32)
            parts = sched.num_parts
        meta, ns = module.schedule_host(lens.tolist(), parts,
                                        [] if live is None else live.reshape(-1).tolist())
        want_meta, want_ns = oracle.schedule(lens, parts, live=live)
        np.testing.assert_array_equal(np.asarray(meta, np.int32).reshape(parts, -1), want_meta)
        np.testing.assert_array_equal(np.asarray(ns, np.int32), want_ns)


@pytest.mark.parametrize("asked,want", [(None, "ws"), ("v1", "v1"), ("pair", "pair"),
                                        ("combine1", "combine1"), ("combine_rows", "combine_rows"),
                                        ("combine_quarters", "combine_quarters"), ("v4load16", "v4load16"), ("v4load8", "v4load8"),
                                        ("overlap", "ws"),
                                        ("next", "ws"), ("ws", "ws"), ("bogus", "ws")])
def test_kernel_variant_switch(asked, want):
    """JFM_KERNEL_VARIANT picks the dense / sparse kernel generation once per process
    (csrc/kernels/variant.h); the extension reports what it picked. Runs where the extension is
    built (CI compiles it), each case in a fresh process."""
    out, _ = _extension_in_child(
        "import jax_flashmla._jax_flashmla_cuda as m; print(m.kernel_variant())", variant=asked)
    assert out.strip() == want


# (layout, batch, s_q, h_q, topk, extra_topk) -> the math the sparse dispatch picks on 132 SMs.
SPARSE_CHOICES = [
    (("fp8_v4", 16, 2, 128, 128, 512), "pair"),          # 320 tiles >= 4 per schedule part (66)
    (("fp8_v4", 64, 2, 100, 128, 1024), "pair"),         # 65-128 heads: two row blocks
    (("fp8_v4", 2, 2, 128, 128, 1024), "roles_wide"),    # 72 tiles: too few for pairs
    (("fp8_v32", 64, 2, 128, 2048, 0), "pair"),          # V3.2 too (8-byte producer reads)
    (("fp8_v32", 2, 1, 128, 256, 0), "roles_wide"),      # V3.2, 8 tiles: too few for pairs
    (("fp8_v4", 128, 2, 64, 128, 512), "roles_wide"),    # one row block: no pair
    (("fp8_v4", 64, 2, 32, 128, 1024), "transposed32"),
    (("fp8_v32", 64, 2, 16, 2048, 0), "transposed16"),
    (("bf16", 64, 2, 128, 2048, 0), "roles"),
]


def test_sparse_kernel_choice():
    """The sparse dispatch's one rule (csrc/kernels/sm90/decode/sparse/dispatch.cu,
    sparse_ws_math): CTA pairs for FP8 (V4 and V3.2) at 65-128 heads where the step has at least
    4 tiles per schedule part, as measured on the H200 (docs/PERFORMANCE.md); checked through the extension
    (CI compiles it) in a fresh process without JFM_KERNEL_VARIANT, with the schedule's own
    num_sm_parts."""
    import json
    calls = [(*args, M.num_sm_parts(rows_per_kv_head=args[3], num_sms=132))
             for args, _ in SPARSE_CHOICES]
    out, module = _extension_in_child(
        "import sys, json, jax_flashmla._jax_flashmla_cuda as m; "
        "print(json.dumps([m.sparse_kernel_choice(*c) for c in json.loads(sys.argv[1])]))",
        json.dumps(calls))
    assert json.loads(out) == [want for _, want in SPARSE_CHOICES]
    with pytest.raises(ValueError, match="layout"):
        module.sparse_kernel_choice("fp8", 1, 1, 128, 64, 0, 66)


# (sequences in the step, query rows per KV head) -> the combine kernel the default takes.
COMBINE_CHOICES = [
    ((1, 128), "quarters"), ((2, 128), "quarters"), ((4, 128), "quarters"),  # 66 parts
    ((5, 128), "rows"), ((8, 128), "rows"), ((128, 128), "rows"),
    ((8, 64), "quarters"), ((9, 64), "rows"), ((2, 16), "quarters"),  # 132 parts
    ((1, 512), "quarters"), ((2, 512), "rows"),  # 16 parts (s_q 4 at 128 heads)
]


def test_combine_kernel_choice():
    """The split-KV combine's one rule (csrc/kernels/decode/combine.cu, combine_kind): the
    quarter-row warps where the schedule's parts give sequences 16 splits or more on average
    (small batches with long contexts: measured -3% to -22% there, +1.6% at 8 splits and +13% at
    ~1 on the H200), else the row warps; checked through the extension in a fresh process without
    JFM_KERNEL_VARIANT, with the schedule's own num_sm_parts."""
    import json
    calls = [(b, M.num_sm_parts(rows_per_kv_head=rows, num_sms=132)) for (b, rows), _ in COMBINE_CHOICES]
    out, module = _extension_in_child(
        "import sys, json, jax_flashmla._jax_flashmla_cuda as m; "
        "print(json.dumps([m.combine_kernel_choice(*c) for c in json.loads(sys.argv[1])]))",
        json.dumps(calls))
    assert json.loads(out) == [want for _, want in COMBINE_CHOICES]
    for variant, want in (("combine_rows", "rows"), ("combine_quarters", "quarters"), ("combine1", "cta")):
        out, _ = _extension_in_child(
            "import sys, json, jax_flashmla._jax_flashmla_cuda as m; "
            "print(json.dumps([m.combine_kernel_choice(*c) for c in json.loads(sys.argv[1])]))",
            json.dumps(calls), variant=variant)
        assert json.loads(out) == [want] * len(calls), variant
    with pytest.raises(ValueError, match="num_seqs"):
        module.combine_kernel_choice(0, 66)


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
