"""The side-by-side cases (ANCHORS.md, upstream FlashMLA's perf cases, issue #13's "nobody tunes"
shapes) and their deterministic inputs, FLOP / byte counts (FlashMLA's counting).

Only numpy here, plus jax_flashmla.kv_cache for the FP8 bytes (the driver imports jax on CPU).
"""
from __future__ import annotations

import json
import math
import os
import zlib

import numpy as np

from sbs_common import D_V, PAGE

try:
    import ml_dtypes
    BF16 = ml_dtypes.bfloat16
except ImportError:   # jax always brings ml_dtypes; keep the module importable for reading cases
    BF16 = None

UPSTREAM_SPARSE_HEADS = (64, 128)   # csrc/api/sparse_decode.h and sparse_fwd.h: h_q 64 or 128 only


# ---------------------------------------------------------------------------------------------
# Cases

def _dense(b, s_q, h_q, s_k, *, causal=False, varlen=True, zero_frac=0.0, tag=""):
    name = (f"dense b{b} sq{s_q} h{h_q} sk{s_k}" + (" causal" if causal else "")
            + ("" if varlen else " fixed") + (f" empty{int(zero_frac * 100)}%" if zero_frac else "")
            + (f" {tag}" if tag else ""))
    return dict(name=name, suite="dense", kind="dense", b=b, s_q=s_q, h_q=h_q, s_k=s_k,
                causal=causal, varlen=varlen, zero_frac=zero_frac, d_qk=576,
                upstream_heads=h_q)   # upstream's dense decode takes any h_q (its tests: 1..128)


def _sparse(b, h_q, d_qk, s_k, topk, *, block_size=64, extra=None, tag="", s_q=2):
    """extra: None or dict(s_k, topk, block_size, topk_length: bool)."""
    up = h_q if h_q in UPSTREAM_SPARSE_HEADS else (64 if h_q < 64 else 128)
    name = f"sparse {'V3.2' if d_qk == 576 else 'V4'} b{b} h{h_q} topk{topk} p{block_size}"
    if extra:
        name += f" +{extra['topk']} p{extra['block_size']}" + (" etl" if extra["topk_length"] else "")
    name += f" {tag}" if tag else ""
    return dict(name=name, suite="sparse_decode", kind="sparse_decode", b=b, s_q=s_q, h_q=h_q,
                d_qk=d_qk, s_k=s_k, topk=topk, block_size=block_size, extra=extra, sink=True,
                upstream_heads=up)


def _prefill(s_kv, h_q, d_qk, topk, *, s_q=4096, tag=""):
    # Other head counts: upstream at 64 / 128 zero-padded heads, what its user would pay (#12).
    up = h_q if h_q in UPSTREAM_SPARSE_HEADS else (64 if h_q < 64 else 128)
    name = f"prefill d{d_qk} h{h_q} topk{topk} skv{s_kv}" + (f" {tag}" if tag else "")
    return dict(name=name, suite="sparse_prefill", kind="sparse_prefill", s_q=s_q, s_kv=s_kv,
                h_q=h_q, d_qk=d_qk, topk=topk, sink=True, upstream_heads=up)


def dense_cases(quick: bool):
    sks = (4096, 8192, 16384, 32768)
    if quick:
        return [_dense(128, 1, 16, 4096), _dense(128, 1, 64, 16384), _dense(128, 1, 128, 4096),
                _dense(128, 2, 128, 8192, causal=True), _dense(64, 1, 128, 4096, varlen=False),
                _dense(2, 4, 128, 65536, causal=True, varlen=False, tag="#13"),
                _dense(256, 1, 128, 1024, tag="#13")]
    out = [_dense(128, 1, h, sk) for h in (16, 32, 64, 128) for sk in sks]
    out += [_dense(128, 2, 128, sk, causal=True) for sk in sks]
    out += [_dense(64, 1, 128, 4096, varlen=False)]
    # The same 262144 KV tokens at h_q 128 in 16 to 256 sequences: what each sequence boundary
    # costs (a part's split, its Q load and output rows) beside the tiles (b64 s_k 4096 fixed
    # measured 0.89 while b128 s_k 8192 varlen ran 1.04: H100, 2026-12-05).
    out += [_dense(b, 1, 128, 262144 // b, varlen=False, tag="seqs") for b in (16, 32, 128, 256)]
    # Issue #13, "shapes nobody tunes": tiny batches with long contexts, MTP s_q 3-4, odd head
    # counts, mostly-empty batches, big batches of short contexts.
    out += [_dense(1, 1, 128, 131072, varlen=False, tag="#13"),
            _dense(2, 1, 128, 65536, varlen=False, tag="#13"),
            _dense(4, 1, 128, 32768, varlen=False, tag="#13"),
            _dense(4, 1, 16, 131072, varlen=False, tag="#13"),
            _dense(2, 4, 128, 65536, causal=True, varlen=False, tag="#13"),
            _dense(64, 3, 128, 8192, causal=True, tag="#13"),
            _dense(64, 4, 128, 8192, causal=True, tag="#13"),
            _dense(128, 1, 1, 8192, tag="#13"),
            _dense(128, 1, 3, 8192, tag="#13"),
            _dense(128, 1, 24, 8192, tag="#13"),
            _dense(128, 1, 100, 8192, tag="#13"),
            _dense(128, 1, 128, 8192, zero_frac=0.75, tag="#13"),
            _dense(256, 1, 128, 1024, tag="#13"),
            _dense(256, 1, 16, 512, tag="#13")]
    return out


def _v4(h_q, extra_topk, extra_page, etl):
    return dict(h_q=h_q, extra=dict(s_k=16384, topk=extra_topk, block_size=extra_page,
                                    topk_length=etl))


_V4_CONFIGS = [_v4(64, 512, 64, False), _v4(128, 1024, 64, False), _v4(64, 1024, 2, True),
               _v4(128, 1024, 2, True)]


def sparse_decode_cases(quick: bool):
    if quick:
        c2, c3 = _V4_CONFIGS[1], _V4_CONFIGS[2]
        return [_sparse(64, 128, 576, 32768, 2048),
                _sparse(64, c2["h_q"], 512, 16384, 128, block_size=256, extra=c2["extra"]),
                _sparse(128, c3["h_q"], 512, 16384, 128, block_size=256, extra=c3["extra"]),
                _sparse(64, 16, 576, 32768, 2048, tag="pad64")]
    out = [_sparse(b, 128, 576, 32768, 2048) for b in (2, 64, 74, 128)]
    for cfg in _V4_CONFIGS:
        out += [_sparse(b, cfg["h_q"], 512, 16384, 128, block_size=256, extra=cfg["extra"])
                for b in (2, 64, 74, 128, 148, 256)]
    out += [_sparse(148, h, d, 32768, 16384, tag="peak") for d in (512, 576) for h in (64, 128)]
    # s_q 1 (decode without MTP): equal query tokens of few tiles, where the schedule's payload
    # rule decides how evenly the parts are loaded (csrc/kernels/decode/scheduler.cu).
    for b in (32, 64):
        out += [_sparse(b, 128, 576, 32768, 2048, tag="sq1", s_q=1)]
        out += [_sparse(b, cfg["h_q"], 512, 16384, 128, block_size=256, extra=cfg["extra"],
                        tag="sq1", s_q=1) for cfg in _V4_CONFIGS[:2]]
    for h in (16, 32):
        out += [_sparse(64, h, 576, 32768, 2048, tag="pad64"),
                _sparse(64, h, 512, 16384, 128, block_size=256, extra=_V4_CONFIGS[1]["extra"],
                        tag="pad64")]
    return out


def sparse_prefill_cases(quick: bool):
    if quick:
        return [_prefill(8192, 128, 576, 2048), _prefill(8192, 64, 512, 512),
                _prefill(32768, 16, 576, 2048, tag="pad64")]
    out = [_prefill(s, 128, 576, 2048) for s in (8192, 32768, 65536, 131072)]
    out += [_prefill(s, 64, 512, 512) for s in (8192, 32768, 65536)]
    out += [_prefill(s, 128, 512, 1024) for s in (8192, 32768, 65536)]
    out += [_prefill(32768, h, 576, 2048, tag="pad64") for h in (16, 32)]
    return out


def cpu_smoke_cases():
    """Tiny shapes for the CPU smoke test (reference path, seconds)."""
    return [
        dict(_dense(3, 1, 16, 200), name="smoke dense b3 h16"),
        dict(_dense(2, 2, 8, 150, causal=True), name="smoke dense causal b2 h8"),
        dict(_sparse(2, 16, 576, 300, 64), name="smoke sparse V3.2 b2 h16", upstream_heads=64),
        dict(_sparse(2, 64, 512, 300, 32, block_size=64,
                     extra=dict(s_k=200, topk=48, block_size=2, topk_length=True)),
             name="smoke sparse V4 two pools b2 h64"),
        dict(_prefill(300, 64, 512, 64, s_q=24), name="smoke prefill d512 h64"),
        dict(_prefill(300, 16, 576, 64, s_q=24), name="smoke prefill d576 h16", upstream_heads=None),
    ]


SUITES = {"dense": dense_cases, "sparse_decode": sparse_decode_cases,
          "sparse_prefill": sparse_prefill_cases}


def select(suites, quick: bool, substr: str | None, cpu_smoke: bool = False):
    cases = cpu_smoke_cases() if cpu_smoke else [c for s in suites for c in SUITES[s](quick)]
    if substr:
        keys = [k.strip() for k in substr.split(",") if k.strip()]
        cases = [c for c in cases if any(k in c["name"] for k in keys)]
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    for i, c in enumerate(cases):
        c["seed"] = 1000 + i if cpu_smoke else _stable_seed(c["name"])
    return cases


def _stable_seed(name: str) -> int:
    return zlib.crc32(name.encode())


# ---------------------------------------------------------------------------------------------
# Inputs

def _bf16(x):
    """float32 -> bfloat16 stored as int16 (np.save-able, torch.from_numpy-able, same bits)."""
    return np.asarray(x, np.float32).astype(BF16).view(np.int16)


def _odd(n):
    n = max(1, int(n))
    return n if n % 2 else max(1, n - 1)


def _lens(rng, b, s_k, s_q, varlen):
    if not varlen:
        return np.full(b, s_k, np.int32)
    return np.maximum(rng.normal(s_k, s_k / 2, size=b), s_q).astype(np.int32)


def _block_table(rng, lens, block_size):
    nblk = -(-lens.astype(np.int64) // block_size)
    total = max(1, int(nblk.sum()))
    perm = rng.permutation(total).astype(np.int32)
    table = np.zeros((len(lens), max(1, int(nblk.max()))), np.int32)
    k = 0
    for i, n in enumerate(nblk):
        table[i, :n] = perm[k:k + n]
        k += n
    return table, total


def unique_positions(rng, lengths, topk):
    """[rows, topk] int64: per row min(topk, L) distinct positions in [0, L) (a random start and a
    random stride coprime with L, so scattered like a real top-k), then -1."""
    L = np.maximum(np.asarray(lengths, np.int64), 1)
    start = rng.integers(0, L)
    stride = rng.integers(1, np.maximum(L, 2))
    for _ in range(10000):
        bad = np.gcd(stride, L) != 1
        if not bad.any():
            break
        stride = np.where(bad, stride % np.maximum(L - 1, 1) + 1, stride)
        stride = np.where(bad & (np.gcd(stride, L) != 1), 1, stride)
    k = np.arange(topk, dtype=np.int64)
    pos = (start[:, None] + k[None, :] * stride[:, None]) % L[:, None]
    valid = k[None, :] < np.minimum(np.asarray(lengths, np.int64), topk)[:, None]
    return np.where(valid, pos, -1)


def _pool_palette(rng, num_blocks, block_size, d_qk, fp8):
    """P random blocks (block k of the pool = palette[k % P]); FP8 quantized with OUR quantizer."""
    P = _odd(min(num_blocks, max(1, 16384 // block_size)))
    x = np.clip(rng.standard_normal((P, block_size, 1, d_qk), np.float32) / 10, -1, 1)
    if not fp8:
        return _bf16(x)
    return np.asarray(_quantizer()(x.astype(BF16)), np.uint8)


_QUANTIZE = []


def _quantizer():
    """Our FP8 quantizer, jitted once (eager it compiles every op, for every case)."""
    if not _QUANTIZE:
        import jax
        from jax_flashmla import kv_cache
        _QUANTIZE.append(jax.jit(kv_cache.quantize_fp8))
    return _QUANTIZE[0]


def _sparse_pool(rng, b, s_q, s_k, topk, block_size, d_qk, topk_length):
    lens = _lens(rng, b, s_k, s_q, True)
    table, num_blocks = _block_table(rng, lens, block_size)
    pos = unique_positions(rng, np.repeat(lens, s_q), topk).reshape(b, s_q, topk)
    blk = np.take_along_axis(np.repeat(table[:, None, :], s_q, 1), np.maximum(pos, 0) // block_size,
                             axis=2)
    idx = np.where(pos >= 0, blk.astype(np.int64) * block_size + np.maximum(pos, 0) % block_size, -1)
    tl = rng.integers(0, topk + 1, size=b).astype(np.int32) if topk_length else None
    used = idx if tl is None else np.where(np.arange(topk)[None, None] < tl[:, None, None], idx, -1)
    attended = b * s_q * topk if tl is None else int(tl.sum()) * s_q
    retrieved = int(np.unique(used[used >= 0]).size)
    return dict(indices=idx.astype(np.int32), topk_length=tl, num_blocks=num_blocks,
                palette=_pool_palette(rng, num_blocks, block_size, d_qk, fp8=True),
                attended=attended, retrieved=retrieved)


def make_inputs(case: dict, folder: str) -> dict:
    """Write the case's inputs into ``folder`` (skipped when already there for the same case);
    returns meta (sizes, FLOP and byte counts)."""
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("case") == case:
            return meta
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(case["seed"])
    save = lambda name, arr: np.save(os.path.join(folder, name + ".npy"), arr)  # noqa: E731
    kind, h_q, d_qk = case["kind"], case["h_q"], case["d_qk"]
    meta = dict(case=case)
    if kind == "dense":
        b, s_q = case["b"], case["s_q"]
        lens = _lens(rng, b, case["s_k"], s_q, case["varlen"])
        if case["zero_frac"]:
            lens[rng.random(b) < case["zero_frac"]] = 0
        table, num_blocks = _block_table(rng, lens, PAGE)
        save("lens", lens)
        save("block_table", table)
        save("q", _bf16(np.clip(rng.standard_normal((b, s_q, h_q, d_qk), np.float32) / 10, -1, 1)))
        save("pool_palette", _pool_palette(rng, num_blocks, PAGE, d_qk, fp8=False))
        tokens = int(lens.sum())
        meta.update(num_blocks=num_blocks,
                    flops=s_q * h_q * (2 * d_qk + 2 * D_V) * tokens,
                    bytes=b * s_q * h_q * (d_qk + D_V) * 2 + tokens * d_qk * 2)
    elif kind == "sparse_decode":
        b, s_q = case["b"], case["s_q"]
        main = _sparse_pool(rng, b, s_q, case["s_k"], case["topk"], case["block_size"], d_qk, False)
        save("indices", main["indices"])
        save("pool_palette", main["palette"])
        meta.update(num_blocks=main["num_blocks"])
        attended, retrieved = main["attended"], main["retrieved"]
        if case["extra"]:
            e = case["extra"]
            ex = _sparse_pool(rng, b, s_q, e["s_k"], e["topk"], e["block_size"], d_qk,
                              e["topk_length"])
            save("extra_indices", ex["indices"])
            save("extra_pool_palette", ex["palette"])
            if ex["topk_length"] is not None:
                save("extra_topk_length", ex["topk_length"])
            meta.update(extra_num_blocks=ex["num_blocks"])
            attended += ex["attended"]
            retrieved += ex["retrieved"]
        save("q", _bf16(np.clip(rng.standard_normal((b, s_q, h_q, d_qk), np.float32), -1, 1)))
        save("attn_sink", rng.standard_normal(h_q).astype(np.float32))
        token_bytes = 656 if d_qk == 576 else 576   # upstream's counting (V4: scales not counted)
        meta.update(flops=2 * h_q * attended * (d_qk + D_V),
                    bytes=2 * b * s_q * h_q * (d_qk + D_V) + retrieved * token_bytes)
    elif kind == "sparse_prefill":
        s_q, s_kv, topk = case["s_q"], case["s_kv"], case["topk"]
        Pq = _odd(min(s_q, 127))
        Pkv = _odd(min(s_kv, 8191))
        save("q_palette", _bf16(rng.standard_normal((Pq, h_q, d_qk), np.float32) / 10))
        save("kv_palette", _bf16(rng.standard_normal((Pkv, 1, d_qk), np.float32) / 10))
        idx = unique_positions(rng, np.full(s_q, s_kv), topk).astype(np.int32)[:, None, :]
        save("indices", idx)
        save("attn_sink", rng.standard_normal(h_q).astype(np.float32))
        valid = int((idx >= 0).sum())
        meta.update(flops=2 * s_q * topk * h_q * (d_qk + D_V),
                    bytes=valid * d_qk * 2 + s_q * h_q * (d_qk + D_V) * 2,
                    gather_bytes=valid * d_qk * 2)
    else:
        raise ValueError(kind)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return meta


# ---------------------------------------------------------------------------------------------
# Output comparison

def compare(ours: dict, ref: dict) -> dict:
    """Relative L2 of out (finite entries), max |lse diff| where both are finite, and how many
    entries disagree on being finite."""
    res = {}
    for key in ("out", "lse", "max_logits"):
        a, b = ours.get(key), ref.get(key)
        if a is None or b is None:
            continue
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            res[key + "_error"] = f"shape {a.shape} vs {b.shape}"
            continue
        fin = np.isfinite(a) & np.isfinite(b)
        res[key + "_finite_mismatch"] = int((np.isfinite(a) != np.isfinite(b)).sum()
                                            + (np.isinf(a) & np.isinf(b) & (a != b)).sum())
        if key == "out":
            den = np.linalg.norm(b[fin])
            res["out_rel_l2"] = float(np.linalg.norm(a[fin] - b[fin]) / max(den, 1e-30))
        else:
            res[key + "_max_abs"] = float(np.abs(a[fin] - b[fin]).max()) if fin.any() else 0.0
    return res


def geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return float(math.exp(sum(math.log(x) for x in xs) / len(xs))) if xs else None
