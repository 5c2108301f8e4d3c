"""An independent float64 NumPy oracle of SEMANTICS.md, written as plain loops over sequences and
queries (no shared code with jax_flashmla.reference), plus random-input builders for the tests."""
from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn


def _softmax_attend(q, keys, scale, d_v):
    """q [g, d] f64, keys [n, d] f64 -> out [g, d_v], max [g], lse [g]."""
    g = q.shape[0]
    if keys.shape[0] == 0:
        return np.zeros((g, d_v)), np.full(g, -np.inf), np.full(g, np.inf)
    logits = scale * (q @ keys.T)
    m = logits.max(axis=1)
    p = np.exp(logits - m[:, None])
    s = p.sum(axis=1)
    return (p / s[:, None]) @ keys[:, :d_v], m, np.log(s) + m


def _sink(out, lse, sink):
    if sink is None:
        return out
    gate = np.where(np.isfinite(lse), 1.0 / (1.0 + np.exp(np.asarray(sink, np.float64) - np.where(
        np.isfinite(lse), lse, 0.0))), 0.0)
    return out * gate[:, None]


def dense_decode(q, cache, block_table, seqlens, *, scale, d_v, causal=False, attn_sink=None):
    """q [b, s_q, h_q, d], cache [nb, bs, h_kv, d] (float arrays); returns out [b,s_q,h_q,d_v],
    lse [b, h_q, s_q] in float64. Malformed lengths and page ids as SEMANTICS.md defines them."""
    q = np.asarray(q, np.float64)
    cache = np.asarray(cache, np.float64)
    b, s_q, h_q, d = q.shape
    bs, h_kv = cache.shape[1], cache.shape[2]
    group = h_q // h_kv
    out = np.zeros((b, s_q, h_q, d_v))
    lse = np.zeros((b, h_q, s_q))
    nb, max_blocks = cache.shape[0], block_table.shape[1]
    for i in range(b):
        # Malformed values (SEMANTICS.md, "Paged KV cache"): the length is clamped to the table's
        # capacity and to 0; a token whose page id is not a block of the pool is absent.
        length = min(max(int(seqlens[i]), 0), max_blocks * bs)
        where, rows = [], []
        for t in range(length):
            page = int(block_table[i, t // bs])
            if 0 <= page < nb:
                where.append(t)
                rows.append(cache[page, t % bs])
        where = np.asarray(where, np.int64)
        tokens = np.stack(rows) if rows else np.zeros((0, h_kv, d))
        for j in range(s_q):
            last = length - s_q + j if causal else length - 1     # the last position attended
            keep = where <= last
            for hk in range(h_kv):
                heads = slice(hk * group, (hk + 1) * group)
                o, _, l = _softmax_attend(q[i, j, heads], tokens[keep, hk], scale, d_v)
                out[i, j, heads] = _sink(o, l, None if attn_sink is None else attn_sink[heads])
                lse[i, heads, j] = l
    return out, lse


def _counted(topk_length, i, topk):
    """How many leading entries of row i count: topk_length[i] clamped to [0, topk]."""
    return topk if topk_length is None else min(max(int(topk_length[i]), 0), topk)


def sparse_decode(q, pools, *, scale, d_v, attn_sink=None):
    """pools: list of (cache [nb, bs, h_kv, d] float, indices [b, s_q, k], topk_length [b] | None).
    Every pool's valid rows are attended under one softmax."""
    q = np.asarray(q, np.float64)
    b, s_q, h_q, d = q.shape
    h_kv = pools[0][0].shape[2]
    group = h_q // h_kv
    out = np.zeros((b, s_q, h_q, d_v))
    lse = np.zeros((b, h_q, s_q))
    for i in range(b):
        for j in range(s_q):
            rows = []
            for cache, indices, topk_length in pools:
                flat = np.asarray(cache, np.float64).reshape(-1, h_kv, d)
                k = _counted(topk_length, i, indices.shape[2])
                rows += [flat[r] for r in indices[i, j, :k] if 0 <= r < flat.shape[0]]
            keys = np.stack(rows) if rows else np.zeros((0, h_kv, d))
            for hk in range(h_kv):
                heads = slice(hk * group, (hk + 1) * group)
                o, _, l = _softmax_attend(q[i, j, heads], keys[:, hk], scale, d_v)
                out[i, j, heads] = _sink(o, l, None if attn_sink is None else attn_sink[heads])
                lse[i, heads, j] = l
    return out, lse


def sparse_prefill(q, kv, indices, *, scale, d_v, attn_sink=None, topk_length=None):
    q = np.asarray(q, np.float64)
    kv = np.asarray(kv, np.float64)
    s_q, h_q, d = q.shape
    s_kv, h_kv, _ = kv.shape
    group = h_q // h_kv
    out = np.zeros((s_q, h_q, d_v))
    mx = np.zeros((s_q, h_q))
    lse = np.zeros((s_q, h_q))
    for i in range(s_q):
        for hk in range(h_kv):
            k = _counted(topk_length, i, indices.shape[2])
            rows = [r for r in indices[i, hk, :k] if 0 <= r < s_kv]
            keys = kv[rows, hk] if rows else np.zeros((0, d))
            heads = slice(hk * group, (hk + 1) * group)
            o, m, l = _softmax_attend(q[i, heads], keys, scale, d_v)
            out[i, heads] = _sink(o, l, None if attn_sink is None else attn_sink[heads])
            mx[i, heads] = m
            lse[i, heads] = l
    return out, mx, lse


# ----------------------------------------------------------------------------------------------
# FP8 layouts, byte by byte.

def pow2_scale(amax):
    return float(2.0 ** np.ceil(np.log2(max(amax / 448.0, 1e-4))))


def quantize_v32_token(x):
    """x [576] float -> 656 bytes."""
    x = np.asarray(x, np.float64)
    out = bytearray()
    scales = []
    for t in range(4):
        tile = x[128 * t:128 * (t + 1)]
        s = pow2_scale(np.abs(tile).max())
        scales.append(s)
        out += (tile / s).astype(np.float32).astype(FP8).tobytes()
    out += np.asarray(scales, "<f4").tobytes()
    out += x[512:].astype(np.float32).astype(BF16).tobytes()
    return np.frombuffer(bytes(out), np.uint8)


def dequantize_v32_token(b):
    b = np.asarray(b, np.uint8)
    nope = b[:512].view(FP8).astype(np.float64)
    scales = b[512:528].view("<f4").astype(np.float64)
    rope = b[528:656].view(BF16).astype(np.float64)
    return np.concatenate([nope * np.repeat(scales, 128), rope])


def quantize_v4_block(x):
    """x [bs, 512] -> bytes of one block [bs * 584] in the per-block layout."""
    x = np.asarray(x, np.float64)
    bs = x.shape[0]
    records, scale_bytes = bytearray(), bytearray()
    for t in range(bs):
        exps = []
        for k in range(7):
            tile = x[t, 64 * k:64 * (k + 1)]
            s = pow2_scale(np.abs(tile).max())
            exps.append(int(np.log2(s)) + 127)
            records += (tile / s).astype(np.float32).astype(FP8).tobytes()
        records += x[t, 448:].astype(np.float32).astype(BF16).tobytes()
        scale_bytes += bytes(exps) + b"\x00"
    return np.frombuffer(bytes(records + scale_bytes), np.uint8)


def dequantize_v4_block(b, bs):
    b = np.asarray(b, np.uint8)
    out = np.zeros((bs, 512))
    for t in range(bs):
        rec = b[576 * t:576 * (t + 1)]
        exps = b[576 * bs + 8 * t:576 * bs + 8 * t + 7].astype(np.int64) - 127
        out[t, :448] = rec[:448].view(FP8).astype(np.float64) * np.repeat(2.0 ** exps, 64)
        out[t, 448:] = rec[448:].view(BF16).astype(np.float64)
    return out


# ----------------------------------------------------------------------------------------------
# Random inputs.

def random_paged_cache(rng, *, b, seqlens, block_size, h_kv, d, num_extra_blocks=3,
                       dtype=BF16):
    """A shuffled paged pool holding ``seqlens`` tokens per sequence. Unused rows (past a length in
    its last block, and spare blocks) are NaN; block-table entries past each length are out of
    range (huge or negative). Returns (cache, block_table int32 [b, max_blocks])."""
    max_blocks = max(1, max(-(-int(s) // block_size) for s in seqlens))
    needed = sum(-(-int(s) // block_size) for s in seqlens)
    num_blocks = needed + num_extra_blocks
    cache = np.full((num_blocks, block_size, h_kv, d), np.nan, np.float32)
    perm = rng.permutation(num_blocks)
    table = rng.choice([-7, 10 ** 6, num_blocks, 2 ** 31 - 1], size=(b, max_blocks)).astype(np.int32)
    nxt = 0
    for i, s in enumerate(seqlens):
        for blk in range(-(-int(s) // block_size)):
            table[i, blk] = perm[nxt]
            rows = min(block_size, int(s) - blk * block_size)
            cache[perm[nxt], :rows] = rng.standard_normal((rows, h_kv, d))
            nxt += 1
    return cache.astype(dtype), table


# ----------------------------------------------------------------------------------------------
# The split-KV schedule, as plain Python (the algorithm of csrc/kernels/decode/scheduler.cu and of
# its pure-JAX twin jax_flashmla.ops.metadata.schedule_reference), for checking both.

def live_cost(live, blk: int) -> int:
    """Live tiles at index >= blk of a sequence whose live tiles are [0, live0) and
    [start1, start1 + live1) (live = (live0, start1, live1); the rest are skipped by the kernel)."""
    live0, start1, live1 = (int(x) for x in live)
    return max(0, live0 - blk) + (live1 if blk <= start1 else max(0, start1 + live1 - blk))


def live_advance(live, blk: int, c: int) -> int:
    """The tile index just past the c-th live tile at index >= blk (0 < c < live_cost(live, blk))."""
    live0, start1, _ = (int(x) for x in live)
    first = max(0, live0 - blk)
    return blk + c if c <= first else max(blk, start1) + c - first


def schedule(seqlens, num_parts: int, *, tile: int = 64, overhead: int = 5, width: int = 8,
             live=None, upstream_rule: bool = False):
    """live: None (every tile costs one unit) or [b, 3] (live0, start1, live1) per sequence: only
    live tiles cost, cuts fall after a live tile, and every tile index is still assigned.
    The payload: the smallest cdiv(total, num_parts) + i (0 <= i <= overhead) whose fill leaves
    the last part no more than it; + overhead (upstream FlashMLA's rule, and with
    upstream_rule=True always) when none does."""
    lens = np.asarray(seqlens, np.int64)
    b = lens.shape[0]
    nb = np.where(lens > 0, (lens + tile - 1) // tile, 0)
    if live is None:
        live = np.stack([nb, nb, np.zeros_like(nb)], axis=1)
    cost = [live_cost(live[i], 0) for i in range(b)]
    total = int(np.sum(np.asarray(cost, np.int64) + overhead))
    base = -(-total // num_parts)
    for payload in range(base + (overhead if upstream_rule else 0), base + overhead + 1):
        meta, ns, last_cost = _fill(live, nb, num_parts, payload, overhead, width)
        if last_cost <= payload:
            break
    return meta, ns


def part_costs(meta, seqlens, *, tile: int = 64, overhead: int = 5):
    """Each part's cost in the scheduler's units: its tiles plus `overhead` per chunk."""
    nb = -(-np.asarray(seqlens, np.int64) // tile)
    out = []
    for bs, bb, es, eb, *_ in meta:
        tiles = sum((eb if q == es else nb[q]) - (bb if q == bs else 0) for q in range(bs, es + 1))
        out.append(int(tiles) + overhead * max(0, es - bs + 1))
    return np.asarray(out)


def _fill(live, nb, num_parts, payload, overhead, width):
    b = len(nb)
    meta = np.zeros((num_parts, width), np.int32)
    ns = np.zeros((b + 1,), np.int32)
    seq = blk = split = cum = 0
    last_cost = 0
    for part in range(num_parts):
        begin = (seq, blk, split)
        start = remain = 2**30 - 1 if part == num_parts - 1 else payload
        while seq < b:
            left = live_cost(live[seq], blk)
            if remain >= left + overhead:
                cum += split + 1
                ns[seq + 1] = cum
                remain -= left + overhead
                seq, blk, split = seq + 1, 0, 0
            else:
                if remain - overhead > 0:
                    blk = live_advance(live[seq], blk, remain - overhead)
                    split += 1
                break
        last_cost = start - remain
        end_seq = seq if blk > 0 else seq - 1
        end_blk = blk if blk > 0 else (nb[seq - 1] if seq > 0 else 0)
        meta[part] = [begin[0], begin[1], end_seq, end_blk, begin[2], 0, 0, 0]
    return meta, ns, last_cost
