"""What the GPU test files share: the skip rule, random inputs with NaN-poisoned unused cache rows
(dense paged decode, sparse decode over bf16 / FP8 pools, sparse prefill), output poisoning, and
the comparison against the pure-JAX reference run on the same GPU in float32 (HIGHEST precision).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jax_flashmla
from jax_flashmla import kv_cache as kvc

PAGE = 64
D_V = 512


def require_kernels():
    """Skip the calling module unless jax sees a Hopper GPU and the extension is built."""
    ok, why = False, "jax has no GPU"
    try:
        if jax.devices()[0].platform == "gpu":
            ok, why = jax_flashmla.kernels_available()
    except RuntimeError as e:  # pragma: no cover
        why = str(e)
    if not ok:
        pytest.skip(f"GPU kernel tests need a Hopper GPU with the built kernels: {why}",
                    allow_module_level=True)


def poison(shape, dtype):
    """Fill fresh device memory with NaN and free it, so the next allocation of this size most
    likely lands on NaN (XLA's allocator reuses freed blocks): unwritten outputs then show."""
    x = jnp.full(shape, jnp.nan, dtype)
    x.block_until_ready()
    del x


def check(out, lse, ref_out, ref_lse, dtype=jnp.bfloat16, max_logits=None, ref_max_logits=None):
    """out / lse against the reference: NaN never passes, infinities match exactly, rows with
    nothing attended are exactly 0, bf16-level relative and elementwise errors."""
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    ref_out, ref_lse = np.asarray(ref_out, np.float32), np.asarray(ref_lse)
    assert not np.isnan(out).any(), "NaN in out"
    assert not np.isnan(lse).any(), "NaN in lse"
    inf = np.isinf(ref_lse)
    np.testing.assert_array_equal(lse[inf], ref_lse[inf], err_msg="lse infinities differ")
    assert np.isfinite(lse[~inf]).all(), "lse infinite where the reference is finite"
    np.testing.assert_allclose(lse[~inf], ref_lse[~inf], rtol=2e-5, atol=2e-5, err_msg="lse")
    rel_l2 = np.linalg.norm(out - ref_out) / max(np.linalg.norm(ref_out), 1e-30)
    bound = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    assert rel_l2 <= bound, f"out relative L2 error {rel_l2:.3g} > {bound}"
    tol = (2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -10)
    np.testing.assert_allclose(out, ref_out, rtol=4 * tol,
                               atol=4 * tol * max(float(np.abs(ref_out).max()), 1e-30))
    if max_logits is not None:
        ml, rml = np.asarray(max_logits), np.asarray(ref_max_logits)
        np.testing.assert_array_equal(np.isneginf(ml), np.isneginf(rml), err_msg="max_logits -inf")
        fin = np.isfinite(rml)
        np.testing.assert_allclose(ml[fin], rml[fin], rtol=2e-5, atol=2e-5, err_msg="max_logits")
    return rel_l2


# ---- dense paged decode ---------------------------------------------------------------------------

def _lengths(rng, b, s_k, varlen, zero_frac=0.0):
    if varlen:
        lens = rng.normal(s_k, s_k / 2, size=b).round().astype(np.int64)
        lens = np.clip(lens, 1, 2 * s_k)
    else:
        lens = np.full(b, s_k, np.int64)
    if zero_frac:
        lens[rng.random(b) < zero_frac] = 0
        lens[0] = 0
    return lens.astype(np.int32)


def paged_table(rng, lens, page):
    """A shuffled pool for ``lens`` tokens per sequence, three spare blocks: (block table int32
    [b, max blocks + 2] whose entries past each length are out of range (a mix of large, negative
    and just-past-the-end ids), bool [num_blocks, page]: the rows some sequence owns)."""
    nblk = -(-np.asarray(lens, np.int64) // page)
    max_blocks = int(nblk.max()) + 2
    num_blocks = int(nblk.sum()) + 3
    perm = rng.permutation(num_blocks)
    table = rng.choice(np.array([num_blocks, num_blocks + 7, 2**31 - 1, -1, -2**31], np.int64),
                       size=(len(lens), max_blocks)).astype(np.int32)
    used = np.zeros((num_blocks, page), bool)
    k = 0
    for i in range(len(lens)):
        for j in range(nblk[i]):
            table[i, j] = perm[k]
            used[perm[k], :min(page, lens[i] - j * page)] = True
            k += 1
    return table, used


def dense_case(seed, b, s_q, h_q, h_kv, s_k, varlen, dtype, zero_frac=0.0, d_qk=576):
    """Random inputs on the device; NaN in every cache row no sequence owns; table tails out of
    range (paged_table)."""
    rng = np.random.default_rng(seed)
    lens = _lengths(rng, b, s_k, varlen, zero_frac)
    table, valid_rows = paged_table(rng, lens, PAGE)
    num_blocks = valid_rows.shape[0]
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = jax.random.normal(kq, (b, s_q, h_q, d_qk), jnp.float32).astype(dtype)
    kv = jax.random.normal(kk, (num_blocks, PAGE, h_kv, d_qk), jnp.float32).astype(dtype)
    kv = jnp.where(jnp.asarray(valid_rows)[:, :, None, None], kv, jnp.nan).astype(dtype)
    return dict(q=q, kv=kv, table=jnp.asarray(table), lens=jnp.asarray(lens), np_lens=lens,
                np_table=table)


@functools.lru_cache(maxsize=None)
def _dense_fn(causal, with_meta, implementation):
    if with_meta:
        def f(q, kv, table, lens, meta):
            return jax_flashmla.mla_decode(q, kv, table, lens, causal=causal, metadata=meta,
                                           implementation=implementation)
    else:
        def f(q, kv, table, lens):
            return jax_flashmla.mla_decode(q, kv, table, lens, causal=causal,
                                           implementation=implementation)
    return jax.jit(f)


def run_dense(case, causal, with_meta, implementation="kernel", num_sms=None):
    """num_sms (with_meta): schedule for that many SMs (few: long runs of tiles per CTA)."""
    b, s_q, h_q, _ = case["q"].shape
    h_kv = case["kv"].shape[2]
    poison((b, s_q, h_q, D_V), case["q"].dtype)
    poison((b, h_q, s_q), jnp.float32)
    args = (case["q"], case["kv"], case["table"], case["lens"])
    if with_meta:
        meta = jax_flashmla.get_mla_metadata(case["lens"], s_q=s_q, h_q=h_q, h_kv=h_kv,
                                             num_sms=num_sms)
        out, lse = _dense_fn(causal, True, implementation)(*args, meta)
    else:
        out, lse = _dense_fn(causal, False, implementation)(*args)
    return np.asarray(out.astype(jnp.float32)), np.asarray(lse)


def compare_dense(seed, b, s_q, h_q, h_kv, s_k, varlen, causal, dtype, with_meta, zero_frac=0.0):
    case = dense_case(seed, b, s_q, h_q, h_kv, s_k, varlen, dtype, zero_frac)
    out, lse = run_dense(case, causal, with_meta)
    ref_out, ref_lse = run_dense(case, causal, False, "reference")
    check(out, lse, ref_out, ref_lse, dtype)
    return case, out, lse


def dense_route_case(seed, *, b, s_q, h_q, d_qk, fp8, page, s_k, sink):
    """A dense call for the dense-as-sparse route (ops/kernels/dense_as_sparse.py): any page size,
    FP8 (quantized from NaN where unused) or bf16, h_kv 1; sequence 0 empty, 1 shorter than s_q,
    2 negative, 3 past the table's capacity (whole pages, then out-of-range ids), 4 with a page
    outside the pool inside its length. Returns (q, kv, table, seqlens, sinks or None)."""
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.normal(s_k, s_k / 2, size=b).round(), 1, 2 * s_k).astype(np.int64)
    lens[0] = 0
    if b > 2:
        lens[1] = min(int(lens[1]), s_q - 1)          # shorter than the causal window
    if b > 3:
        lens[3] = max(page, lens[3] // page * page)   # whole pages: its length is set past them
    table, used = paged_table(rng, lens, page)
    num_blocks, max_blocks = used.shape[0], table.shape[1]
    nblk = -(-lens // page)
    seqlens = lens.astype(np.int32)
    if b > 3:
        seqlens[2] = -5                                  # negative: empty
        seqlens[3] = max_blocks * page + 100             # past the capacity: clamped (tail absent)
    if b > 4 and nblk[4] > 1:
        table[4, 0] = num_blocks + 11                    # a page outside the pool inside L
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = jax.random.normal(kq, (b, s_q, h_q, d_qk), jnp.float32).astype(jnp.bfloat16)
    kv = jax.random.normal(kk, (num_blocks, page, 1, d_qk), jnp.float32)
    kv = jnp.where(jnp.asarray(used)[:, :, None, None], kv, jnp.nan).astype(jnp.bfloat16)
    if fp8:
        kv = kvc.quantize_fp8(kv)
    sinks = None
    if sink:
        sinks = jax.random.normal(jax.random.PRNGKey(seed + 1), (h_q,), jnp.float32)
        sinks = sinks.at[0].set(jnp.inf)
    return q, kv, jnp.asarray(table), jnp.asarray(seqlens), sinks


@functools.lru_cache(maxsize=None)
def _dense_route_fn(causal, sink, with_meta, implementation):
    def f(q, kv, table, lens, sinks, meta):
        return jax_flashmla.mla_decode(q, kv, table, lens, causal=causal, attn_sink=sinks,
                                       metadata=meta, implementation=implementation)
    return jax.jit(f)


def run_dense_route(case, causal, implementation="kernel", with_meta=False):
    """mla_decode on dense_route_case's inputs; with_meta: the step's dense schedule passed."""
    q, kv, table, lens, sinks = case
    b, s_q, h_q, _ = q.shape
    poison((b, s_q, h_q, D_V), q.dtype)
    poison((b, h_q, s_q), jnp.float32)
    meta = jax_flashmla.get_mla_metadata(lens, s_q=s_q, h_q=h_q) if with_meta else None
    out, lse = _dense_route_fn(causal, sinks is not None, with_meta, implementation)(
        q, kv, table, lens, sinks, meta)
    return np.asarray(out.astype(jnp.float32)), np.asarray(lse)


# ---- sparse decode / prefill ----------------------------------------------------------------------

def sparse_pool(rng, num_blocks, block_size, d_qk, fmt, used_frac=0.7):
    """A pool [num_blocks, block_size, 1, width] in ``fmt`` ('bf16' or 'fp8', the layout following
    d_qk) whose unused rows (about 1 - used_frac of them) are NaN. Returns (pool, used rows)."""
    rows = num_blocks * block_size
    used = np.flatnonzero(rng.random(rows) < used_frac)
    if used.size == 0:
        used = np.array([0])
    x = rng.standard_normal((rows, d_qk)).astype(np.float32)
    mask = np.zeros(rows, bool)
    mask[used] = True
    x[~mask] = np.nan
    x = jnp.asarray(x.reshape(num_blocks, block_size, 1, d_qk), jnp.bfloat16)
    return (kvc.quantize_fp8(x) if fmt == "fp8" else x), used


def sparse_indices(rng, tokens_shape, topk, used, rows, topk_length=None, invalid_frac=0.15):
    """Indices over ``used`` rows with runs of -1, out-of-range rows (past the pool, negative),
    duplicates, and one all-invalid list; positions past topk_length point at NaN rows when
    possible (they must not count)."""
    idx = rng.choice(used, size=(*tokens_shape, topk)).astype(np.int64)
    r = rng.random(idx.shape)
    idx[r < invalid_frac] = -1
    idx[(r >= invalid_frac) & (r < invalid_frac + 0.03)] = rows + 3
    idx[(r >= invalid_frac + 0.03) & (r < invalid_frac + 0.05)] = -7
    if topk >= 8:
        idx[..., 2:6] = -1                       # a run of -1
        idx[..., 6] = idx[..., 7]                # a duplicate
    idx.reshape(-1, topk)[0] = -1                # one token with nothing valid in this pool
    unused = np.setdiff1d(np.arange(rows), used)
    if topk_length is not None and unused.size:
        b = tokens_shape[0]
        for i in range(b):
            past = idx[i, ..., int(max(topk_length[i], 0)):]
            past[...] = rng.choice(unused, size=past.shape)
    return jnp.asarray(idx.astype(np.int32))


def sparse_decode_case(seed, *, b, s_q, h_q, d_qk, fmt, topk, page, extra_topk=None, extra_page=None,
                       with_lengths=False, sink=None):
    """sink: None, 'random' or 'inf' (some heads +inf)."""
    rng = np.random.default_rng(seed)
    nb = max(2, -(-4 * topk // page))
    kv, used = sparse_pool(rng, nb, page, d_qk, fmt)
    tl = rng.integers(0, topk + 1, size=b).astype(np.int32) if with_lengths else None
    if tl is not None:
        tl[0] = 0
        tl[-1] = topk + 5    # beyond topk: clamps
    args = dict(indices=sparse_indices(rng, (b, s_q), topk, used, nb * page, tl),
                topk_length=None if tl is None else jnp.asarray(tl))
    if extra_topk is not None:
        nb1 = max(2, -(-3 * extra_topk // extra_page))
        kv1, used1 = sparse_pool(rng, nb1, extra_page, d_qk, fmt)
        tl1 = rng.integers(0, extra_topk + 1, size=b).astype(np.int32) if with_lengths else None
        args.update(extra_kv_cache=kv1,
                    extra_indices=sparse_indices(rng, (b, s_q), extra_topk, used1, nb1 * extra_page, tl1),
                    extra_topk_length=None if tl1 is None else jnp.asarray(tl1))
    if sink is not None:
        s = rng.standard_normal(h_q).astype(np.float32)
        if sink == "inf":
            s[::3] = np.inf
        args["attn_sink"] = jnp.asarray(s)
    q = jnp.asarray(rng.standard_normal((b, s_q, h_q, d_qk)), jnp.bfloat16)
    return q, kv, args


def run_sparse_decode(q, kv, args, *, implementation="kernel", with_meta=True, meta_lengths=None,
                      num_sms=None):
    """meta_lengths (with_meta): None, or dict(topk_length=..., extra_topk_length=...) for
    get_mla_metadata (a schedule weighted by those lengths, the call's own or others); num_sms
    (with_meta): schedule for that many SMs (few: long runs of tiles per CTA)."""
    b, s_q, h_q, _ = q.shape
    poison((b, s_q, h_q, D_V), q.dtype)
    poison((b, h_q, s_q), jnp.float32)
    names = sorted(k for k, v in args.items() if v is not None)

    def f(q, kv, meta_lengths, *vals):
        kw = dict(zip(names, vals))
        if with_meta:
            kw["metadata"] = jax_flashmla.get_mla_metadata(
                jnp.zeros((b,), jnp.int32), s_q=s_q, h_q=h_q, topk=kw["indices"].shape[-1],
                extra_topk=kw["extra_indices"].shape[-1] if "extra_indices" in kw else None,
                num_sms=num_sms, **(meta_lengths or {}))
        return jax_flashmla.mla_decode(q, kv, implementation=implementation, **kw)

    out, lse = jax.jit(f)(q, kv, meta_lengths, *(args[n] for n in names))
    return np.asarray(out.astype(jnp.float32)), np.asarray(lse)


def sparse_prefill_case(seed, *, s_q, h_q, d_qk, topk, s_kv=None, with_lengths=False, sink=None):
    rng = np.random.default_rng(seed)
    s_kv = s_kv or max(64, 2 * topk)
    kv, used = sparse_pool(rng, s_kv, 1, d_qk, "bf16")
    kv = kv.reshape(s_kv, 1, d_qk)
    tl = rng.integers(0, topk + 1, size=s_q).astype(np.int32) if with_lengths else None
    if tl is not None:
        tl[0] = 0
    idx = sparse_indices(rng, (s_q, 1), topk, used, s_kv, tl)
    q = jnp.asarray(rng.standard_normal((s_q, h_q, d_qk)), jnp.bfloat16)
    kw = dict(topk_length=None if tl is None else jnp.asarray(tl))
    if sink is not None:
        s = rng.standard_normal(h_q).astype(np.float32)
        if sink == "inf":
            s[::3] = np.inf
        kw["attn_sink"] = jnp.asarray(s)
    return q, kv, idx, kw


def run_sparse_prefill(q, kv, idx, kw, implementation="kernel"):
    s_q, h_q, _ = q.shape
    poison((s_q, h_q, D_V), q.dtype)
    poison((s_q, h_q), jnp.float32)
    names = sorted(k for k, v in kw.items() if v is not None)
    f = jax.jit(lambda q, kv, idx, *vals: jax_flashmla.sparse_mla_prefill(
        q, kv, idx, implementation=implementation, **dict(zip(names, vals))))
    out, ml, lse = f(q, kv, idx, *(kw[n] for n in names))
    return np.asarray(out.astype(jnp.float32)), np.asarray(ml), np.asarray(lse)


# ---- logits that rise tile by tile (the lazy running max's both branches) ------------------------

def rising_offsets(rng, n):
    """Offsets for n key positions, constant within each 64-token tile and changed from tile to
    tile by a jump of 0, a small step, a large one or a fall. With rising_q (every row's q sums to
    ~0.2 d_qk), an offset c on every element of a key raises its logit by ~0.2 d_qk c: at the
    default scale d_qk^-0.5 a small step moves the logits ~0.7 (inside the lazy max's slack of
    8 / log2(e) ~ 5.5, where the running max stays put and P grows above 1), a large one ~12
    (where it must move and O be rescaled), and one huge step (~96, at the third tile) takes a
    run past where a max that never moved would overflow P. The last two steps are a large one
    and then a small one, so the last tile does not drown the ones before it. Random keys move a
    row's max by small rises only."""
    tiles = -(-n // PAGE)
    jumps = rng.choice(np.array([0.0, 0.15, 2.5, -1.0]), size=tiles)
    jumps[0] = 0.0
    if tiles > 1:
        jumps[1] = 2.5  # a large step early, whatever the draw
    if tiles > 4:
        jumps[2] = 20.0
        jumps[-2:] = (2.5, 0.15)
    return np.repeat(np.cumsum(jumps), PAGE)[:n].astype(np.float32)


def rising_q(rng, shape, dtype=jnp.bfloat16):
    return jnp.asarray(0.5 * rng.standard_normal(shape) + 0.2, dtype)


def rising_dense_case(seed, b, s_q, h_q, s_k, dtype):
    """dense_case (fixed lengths) with key / value rows offset by rising_offsets of their position
    in the sequence and rising_q queries."""
    case = dense_case(seed, b, s_q, h_q, 1, s_k, False, dtype)
    rng = np.random.default_rng(seed + 1)
    off = rising_offsets(rng, s_k)
    kv = np.array(case["kv"].astype(jnp.float32))
    for i in range(b):
        n = int(case["np_lens"][i])
        for j in range(-(-n // PAGE)):
            rows = min(PAGE, n - j * PAGE)
            kv[case["np_table"][i, j], :rows] += off[j * PAGE:j * PAGE + rows, None, None]
    case["kv"] = jnp.asarray(kv, dtype)
    case["q"] = rising_q(rng, case["q"].shape, dtype)
    return case


def rising_rows(rng, rows, d_qk, topk):
    """A [rows, d_qk] float32 pool whose rows `order` (topk of them, in that order) carry
    rising_offsets by their position in `order`; every other row is NaN. Returns (pool, order)."""
    order = rng.permutation(rows)[:topk]
    x = np.full((rows, d_qk), np.nan, np.float32)
    x[order] = rng.standard_normal((topk, d_qk)) + rising_offsets(rng, topk)[:, None]
    return x, order


def rising_prefill_case(seed, *, s_q, h_q, d_qk, topk):
    """Every query token selects the same rising rows, in order (one -1 among them)."""
    rng = np.random.default_rng(seed)
    s_kv = 2 * topk + PAGE
    x, order = rising_rows(rng, s_kv, d_qk, topk)
    idx = np.broadcast_to(order, (s_q, 1, topk)).astype(np.int32)
    idx[..., min(5, topk - 1)] = -1
    kv = jnp.asarray(x.reshape(s_kv, 1, d_qk), jnp.bfloat16)
    return rising_q(rng, (s_q, h_q, d_qk)), kv, jnp.asarray(idx), {}


def rising_sparse_decode_case(seed, *, b, s_q, h_q, d_qk, topk, page=PAGE):
    """An FP8 pool (the layout d_qk names) whose rising rows every query token selects in order."""
    rng = np.random.default_rng(seed)
    nb = max(2, -(-2 * topk // page))
    x, order = rising_rows(rng, nb * page, d_qk, topk)
    kv = kvc.quantize_fp8(jnp.asarray(x.reshape(nb, page, 1, d_qk), jnp.bfloat16))
    idx = np.broadcast_to(order, (b, s_q, topk)).astype(np.int32)
    return rising_q(rng, (b, s_q, h_q, d_qk)), kv, dict(indices=jnp.asarray(idx))


def split_heavy_outputs():
    """Outputs (out as float32, lse) of steps whose sequences split into many chunks: what the
    split-KV combine produces. Deterministic inputs, so two processes with different combine
    kernels (JFM_KERNEL_VARIANT=combine1) can compare their bytes (test_scheduler_gpu.py)."""
    outs = []
    for dtype, b, h_q, s_k in ((jnp.bfloat16, 2, 16, 9000), (jnp.float16, 3, 128, 5000)):
        case = dense_case(41, b, 2, h_q, 1, s_k, True, dtype, zero_frac=0.3)
        outs += run_dense(case, causal=True, with_meta=True)
    for d_qk, h_q, sink in ((512, 64, "inf"), (576, 16, "random")):  # FP8 V4, FP8 V3.2
        q, kv, args = sparse_decode_case(42, b=2, s_q=2, h_q=h_q, d_qk=d_qk, fmt="fp8", topk=2048,
                                         page=64, with_lengths=True, sink=sink)
        outs += run_sparse_decode(q, kv, args)
    return outs
