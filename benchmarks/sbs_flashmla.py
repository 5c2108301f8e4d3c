"""Side-by-side worker: upstream FlashMLA (torch + flash_mla, e.g. from /tmp/site), one process for a
list of cases (see side_by_side.py). Same protocol as sbs_ours.py.

Inputs are the driver's bytes, moved with numpy -> torch and expanded on the device the same way
(block k of a pool = palette[k % P]). FP8 pools keep OUR quantizer's bytes, laid out as upstream's
tests lay them (tests/quant.py):
- V3.2 (656-byte tokens): a [num_blocks, block_size + 1, 1, 656] buffer sliced to block_size rows,
  so the block stride is (block_size + 1) * 656 bytes and the token stride 656
  (sparse_decode.h checks kv.stride(1) == 656, last dim contiguous).
- V4 (584-byte tokens, per-block layout): each block's block_size * 584 bytes at the start of a row
  padded to a multiple of 576 bytes, viewed as [num_blocks, block_size, 1, 584].
Both viewed as float8_e4m3fn, as upstream's quantizer returns them (uint8 is accepted too).
Sparse decode and prefill run only h_q 64 / 128 upstream: fewer heads are padded with zero queries
to 64 and the extra heads dropped from the outputs (the time is what a user of upstream would pay).
Scheduler metadata: the first (untimed) call fills the FlashMLASchedMeta; timed calls reuse it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch  # first, then flash_mla (its extension links against torch)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

from sbs_common import (CALLS, D_V, QUICK_CALLS, QUICK_ROUNDS, ROUNDS, append_jsonl,  # noqa: E402
                        case_dir, gpu_time_record, k_units, kineto_gpu_events, load_meta,
                        saved_rows, time_in_one_unit, time_rounds)

DEV = "cuda"
_V4_ALIGN = 576


def _load(folder, name, bf16=False):
    path = os.path.join(folder, name + ".npy")
    if not os.path.exists(path):
        return None
    t = torch.from_numpy(np.ascontiguousarray(np.load(path)))
    if bf16:
        t = t.view(torch.bfloat16)   # the driver stores bf16 bits as int16
    return t.to(DEV)


def _rows(n, palette_rows):
    return torch.arange(n, device=DEV, dtype=torch.int64) % palette_rows


def expand(palette, n):
    return palette.index_select(0, _rows(n, palette.shape[0]))


def _fill_blocks(dst, palette, chunk=1 << 16):
    """dst[k] = palette[k % P] for a [num_blocks, ...] view, in chunks (no full-size temporary)."""
    n = dst.shape[0]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        dst[s:e].copy_(palette.index_select(0, _rows(e, palette.shape[0])[s:e]))


def fp8_pool(palette, num_blocks, d_qk):
    """palette: uint8 [P, block_size, 1, token_bytes] (our bytes) -> upstream's k_cache."""
    _, bs, _, tb = palette.shape
    if d_qk == 576:
        assert tb == 656, tb
        buf = torch.empty((num_blocks, bs + 1, 1, tb), dtype=torch.uint8, device=DEV)
        kv = buf[:, :bs]
        _fill_blocks(kv, palette)
    else:
        assert d_qk == 512 and tb == 584, (d_qk, tb)
        per = bs * tb
        padded = -(-per // _V4_ALIGN) * _V4_ALIGN
        buf = torch.zeros((num_blocks, padded), dtype=torch.uint8, device=DEV)
        _fill_blocks(buf[:, :per], palette.reshape(palette.shape[0], per))
        kv = buf[:, :per].view(num_blocks, bs, 1, tb)
    kv = kv.view(torch.float8_e4m3fn)
    # What csrc/api/sparse_decode.h checks:
    assert kv.stride(-1) == 1 and kv.stride(1) == tb, kv.stride()
    return kv


def build(case, folder, meta):
    import flash_mla
    kind, h_q, d_qk = case["kind"], case["h_q"], case["d_qk"]
    scale = d_qk ** -0.5
    h_up = case["upstream_heads"]
    if kind == "dense":
        q = _load(folder, "q", bf16=True)
        pool = expand(_load(folder, "pool_palette", bf16=True), meta["num_blocks"])
        table, lens = _load(folder, "block_table"), _load(folder, "lens")
        sched, _ = flash_mla.get_mla_metadata()
        causal = case["causal"]

        def call(q=q):
            return flash_mla.flash_mla_with_kvcache(q, pool, table, lens, D_V, sched, None,
                                                    softmax_scale=scale, causal=causal)
        return call, ("out", "lse"), h_q, q
    if kind == "sparse_decode":
        q = _load(folder, "q", bf16=True)
        sink = _load(folder, "attn_sink")
        if h_up != h_q:
            b, s_q, _, d = q.shape
            q = torch.cat([q, q.new_zeros((b, s_q, h_up - h_q, d))], dim=2).contiguous()
            sink = torch.cat([sink, sink.new_zeros((h_up - h_q,))]).contiguous()
        kv = fp8_pool(_load(folder, "pool_palette"), meta["num_blocks"], d_qk)
        idx = _load(folder, "indices")
        ekv = eidx = etl = None
        if case["extra"]:
            ekv = fp8_pool(_load(folder, "extra_pool_palette"), meta["extra_num_blocks"], d_qk)
            eidx = _load(folder, "extra_indices")
            etl = _load(folder, "extra_topk_length")
        sched, _ = flash_mla.get_mla_metadata()

        def call(q=q):
            return flash_mla.flash_mla_with_kvcache(
                q, kv, None, None, D_V, sched, None, softmax_scale=scale, causal=False,
                is_fp8_kvcache=True, indices=idx, attn_sink=sink, extra_k_cache=ekv,
                extra_indices_in_kvcache=eidx, topk_length=None, extra_topk_length=etl)
        return call, ("out", "lse"), h_q, q
    if kind == "sparse_prefill":
        q = expand(_load(folder, "q_palette", bf16=True), case["s_q"])
        kv = expand(_load(folder, "kv_palette", bf16=True), case["s_kv"])
        idx, sink = _load(folder, "indices"), _load(folder, "attn_sink")
        if h_up != h_q:   # zero queries for the padded heads, dropped from the outputs
            s_q, _, d = q.shape
            q = torch.cat([q, q.new_zeros((s_q, h_up - h_q, d))], dim=1).contiguous()
            sink = torch.cat([sink, sink.new_zeros((h_up - h_q,))]).contiguous()

        def call(q=q):
            return flash_mla.flash_mla_sparse_fwd(q, kv, idx, scale, d_v=D_V, attn_sink=sink,
                                                  topk_length=None)
        return call, ("out", "max_logits", "lse"), h_q, q
    raise ValueError(kind)


def _head_slice(name, x, h_q, kind):
    """Drop padded heads: out [..., h, d_v] (decode [b, s_q, h, d]; prefill [s_q, h, d]),
    lse decode [b, h, s_q], prefill lse / max_logits [s_q, h]."""
    if kind == "sparse_decode":
        return x[:, :, :h_q] if name == "out" else x[:, :h_q]
    if kind == "sparse_prefill":
        return x[:, :h_q]
    return x


def save_outputs(outdir, names, outs, h_q, kind):
    os.makedirs(outdir, exist_ok=True)
    for name, x in zip(names, outs):
        x = _head_slice(name, x, h_q, kind)
        if name == "out":
            x = x[:saved_rows(tuple(x.shape))]
        x = x.contiguous()
        if x.dtype == torch.bfloat16:
            x = x.view(torch.int16)
        np.save(os.path.join(outdir, name + ".npy"), x.cpu().numpy())


_GRAPH_FAILED: list[str] = []   # the first capture error of this worker, if any


def time_in_one_graph(call, q, k, calls, rounds):
    """Seconds per call when K calls (each on its own copy of q) replay as one CUDA graph: the GPU
    time per call without a host launch per call (sbs_ours.py's --in-one-call counterpart). The
    scheduler metadata is already filled by the earlier calls, so capture records kernels only."""
    qs = [q.clone() for _ in range(k)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up off the capture stream, as torch asks
        for qi in qs:
            call(qi)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep = [call(qi) for qi in qs]  # noqa: F841 (the graph's outputs stay allocated)
    graph.replay()
    torch.cuda.synchronize()
    return time_in_one_unit(graph.replay, lambda _: torch.cuda.synchronize(), k,
                            calls=k_units(calls), rounds=rounds)


def gpu_time(call, q, k, units=3):
    """GPU busy time per call from torch.profiler's device events of `units` x K plain calls, each
    on its own copy of q (sbs_ours.py's g_time_s counterpart; plain calls rather than the graph,
    so the profiler sees every kernel whatever its support for graph replays)."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    qs = [q.clone() for _ in range(k)]
    for qi in qs:
        call(qi)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(units):
            for qi in qs:
                call(qi)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        return gpu_time_record(kineto_gpu_events(path), units * k)


def run_case(case, work, calls, rounds, label, in_one_call=0):
    folder = case_dir(work, case)
    meta = load_meta(folder)
    rec = dict(name=case["name"], event="done", label=label)
    if case["upstream_heads"] is None:
        rec.update(status="n/a", note=f"upstream has no kernel for h_q {case['h_q']}")
        return rec
    if case["upstream_heads"] != case["h_q"]:
        rec["note"] = f"upstream ran {case['upstream_heads']} heads (zero-padded), sliced to {case['h_q']}"
    with torch.inference_mode():
        call, names, h_q, q = build(case, folder, meta)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = call()
        torch.cuda.synchronize()
        rec["first_call_s"] = time.perf_counter() - t0
        save_outputs(os.path.join(work, "outputs", label, os.path.basename(folder)), names, outs,
                     h_q, case["kind"])
        del outs
        rec.update(time_rounds(call, lambda _: torch.cuda.synchronize(), calls=calls, rounds=rounds))
        if in_one_call > 1 and q is not None:
            if _GRAPH_FAILED:
                rec["k_error"] = f"not tried: an earlier capture failed ({_GRAPH_FAILED[0][:120]})"
            else:
                try:
                    rec.update(time_in_one_graph(call, q, in_one_call, calls, rounds))
                except Exception as e:  # noqa: BLE001 (capture refused, out of memory)
                    # A failed capture can leave the stream unusable for later captures: one try.
                    rec["k_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    _GRAPH_FAILED.append(rec["k_error"])
        if in_one_call > 1 and q is not None:
            try:
                rec.update(gpu_time(call, q, in_one_call))
            except Exception as e:  # noqa: BLE001 (the profiler unavailable)
                rec["g_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    rec["status"] = "ok"
    rec["path"] = "flash_mla"
    return rec


def limits(work, label):
    """Copy bandwidth the way a memory-bound kernel moves bytes (device-to-device copy: bytes read +
    written) and the bf16 8192^3 matmul rate, through torch (ANCHORS.md)."""
    n = 1 << 30
    x = torch.empty(n, dtype=torch.bfloat16, device=DEV).normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time_rounds(lambda: y.copy_(x), lambda _: torch.cuda.synchronize(), calls=10, rounds=5)
    copy_gbs = 2 * n * 2 / t["time_s"] / 1e9
    del x, y
    torch.cuda.empty_cache()
    m = 8192
    a = torch.randn((m, m), dtype=torch.bfloat16, device=DEV)
    b = torch.randn((m, m), dtype=torch.bfloat16, device=DEV)
    a @ b
    torch.cuda.synchronize()
    t = time_rounds(lambda: a @ b, lambda _: torch.cuda.synchronize(), calls=10, rounds=5)
    props = torch.cuda.get_device_properties(0)
    res = dict(copy_gbs=copy_gbs, matmul_tflops=2 * m ** 3 / t["time_s"] / 1e12, source="torch",
               device=props.name, sms=props.multi_processor_count, torch=torch.__version__)
    with open(os.path.join(work, "limits.json"), "w") as f:
        json.dump(res, f)
    print(f"[{label}] limits (torch): copy {copy_gbs:.0f} GB/s (read + written), "
          f"bf16 matmul {res['matmul_tflops']:.0f} TFLOP/s on {props.name}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--label", default="flashmla")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--limits", action="store_true")
    ap.add_argument("--in-one-call", type=int, default=0, metavar="K")
    args = ap.parse_args()
    torch.cuda.set_device(0)
    if args.limits:
        limits(args.work, args.label)
        return
    import flash_mla
    print(f"[{args.label}] torch {torch.__version__}, flash_mla from "
          f"{os.path.dirname(flash_mla.__file__)}", flush=True)
    with open(os.path.join(args.work, "cases.json")) as f:
        cases = json.load(f)
    calls, rounds = (QUICK_CALLS, QUICK_ROUNDS) if args.quick else (CALLS, ROUNDS)
    results = os.path.join(args.work, f"results_{args.label}.jsonl")
    for case in cases[args.start:]:
        append_jsonl(results, dict(name=case["name"], event="start", t=time.time()))
        try:
            rec = run_case(case, args.work, calls, rounds, args.label, args.in_one_call)
        except Exception as e:  # noqa: BLE001
            rec = dict(name=case["name"], event="done", label=args.label, status="error",
                       error=f"{type(e).__name__}: {str(e)[:500]}")
            traceback.print_exc(limit=4)
        append_jsonl(results, rec)
        t = rec.get("time_s")
        print(f"[{args.label}] {case['name']}: {rec['status']}"
              + (f" {t * 1e6:.1f} us" if t else ""), flush=True)
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
