"""Ours vs upstream FlashMLA, side by side, on identical inputs, each in its own process.

  python benchmarks/side_by_side.py --suite dense|sparse_decode|sparse_prefill|all [...] --out DIR
      [--quick] [--cases SUBSTR[,SUBSTR]] [--upstream on|off|fake] [--ours-max-seconds S]
  python benchmarks/side_by_side.py --cpu-smoke --out DIR      # tiny cases on CPU, fake upstream

For every case the inputs are made ONCE (numpy, seeded by the case name) and written under
--work/inputs; then one "ours" worker process (sbs_ours.py: JAX, our ops, implementation=None)
runs all cases, then one "flashmla" worker (sbs_flashmla.py: torch + flash_mla) runs them on the
same bytes (ANCHORS.md "How to measure side by side": never both in one process). A worker that
crashes or hangs on a case (--case-timeout) is restarted after it. Each worker times N back-to-back
calls per round (20 x 7 rounds, --quick 10 x 5), median of rounds, with the split-KV metadata made
once outside the timed calls, and saves out / lse of one call; this driver compares them
(relative L2 of out, max |lse diff| over entries finite on both sides) and prints per case both
times, TFLOPS and GB/s (FlashMLA's counting), ours / FlashMLA speed (>1: we are faster), the
agreement, and the geomean speed ratio per suite. Writes side_by_side.json and side_by_side.png
into --out.

Counting (ANCHORS.md, upstream tests/lib.py):
  dense:          FLOPs = s_q*h_q*(2*576+2*512)*sum(seqlens); bytes = q + attended KV (576*2 B) + out
  sparse decode:  FLOPs = 2*h_q*attended*(d_qk+512) (attended = b*s_q*topk per pool, or s_q*sum of
                  topk_length); bytes = q + out + unique retrieved tokens * (656 V3.2 | 576 V4)
  sparse prefill: FLOPs = 2*s_q*topk*h_q*(d_qk+512); bytes = valid indices*d_qk*2 + q + out.
                  "gather floor" = the selected rows read once (valid*d_qk*2 B) at the copy rate.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# The workers get the caller's environment; this process only quantizes palettes, on the CPU
# (main() sets JAX_PLATFORMS=cpu for itself before anything imports jax).
_WORKER_ENV = dict(os.environ)

import numpy as np  # noqa: E402

from sbs_common import (ENERGY_COUNTER_MIN_S, append_jsonl, case_dir, energy_per_call,  # noqa: E402
                        heat_seconds, read_jsonl, read_smi_csv, smi_window)
import sbs_cases  # noqa: E402

SUITE_NAMES = list(sbs_cases.SUITES)


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", nargs="+", default=["dense"], choices=SUITE_NAMES + ["all"])
    ap.add_argument("--out", required=True, help="folder for side_by_side.json / .png")
    ap.add_argument("--work", default=None, help="inputs / outputs scratch (default: a temp dir)")
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a representative subset, fewer rounds")
    ap.add_argument("--cases", default=None, help="only cases whose name contains one of these "
                                                  "comma-separated substrings")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the inputs into --work and exit (to overlap with a build)")
    ap.add_argument("--upstream", default="on", choices=["on", "off", "fake"],
                    help="fake: the JAX reference stands in for flash_mla (CPU smoke test)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny cases, ours on CPU JAX, fake upstream (tests this harness)")
    ap.add_argument("--ours-max-seconds", type=float, default=30.0,
                    help="ours: a case whose first (compiling) call takes longer is not timed; "
                         "else calls/rounds shrink to fit (guards the slow reference paths)")
    ap.add_argument("--case-timeout", type=float, default=300.0,
                    help="kill a worker stuck this long on one case and go on after it")
    ap.add_argument("--xla", action="store_true", help="also time plain XLA on 4 dense cases")
    ap.add_argument("--smi", default=None, metavar="CSV",
                    help="nvidia-smi samples taken during the run (scripts/device_bench.sh SMI_MS): "
                         "each side's mean SM clock, power and power-capped share over its "
                         "in-one-unit timing window")
    ap.add_argument("--in-one-call", type=int, default=0, metavar="K",
                    help="every case: also time K calls issued as one unit on each side (ours: "
                         "one jit of K calls; FlashMLA: one CUDA graph of K calls; each on its own "
                         "copy of q): GPU time per call without a host dispatch per call, which "
                         "the back-to-back timing includes where a call is shorter than its "
                         "dispatch (small batches) and, with JAX's ~0.5 ms per round of calls, "
                         "~25-60 us per prefill call too. Printed as a second table")
    return ap.parse_args()


# ---------------------------------------------------------------------------------------------
# Workers

def run_worker(label, cmd, cases, work, timeout):
    """Run a worker over all cases, restarting it after a case it crashed or hung on."""
    path = os.path.join(work, f"results_{label}.jsonl")
    start = 0
    while start < len(cases):
        proc = subprocess.Popen(cmd + ["--start", str(start)], env=_WORKER_ENV)
        killed = False
        while proc.poll() is None:
            time.sleep(0.5)
            recs = read_jsonl(path)
            if recs and recs[-1]["event"] == "start" and time.time() - recs[-1]["t"] > timeout:
                proc.kill()
                proc.wait()
                killed = True
        recs = read_jsonl(path)
        done = {r["name"] for r in recs if r["event"] == "done"}
        nxt = next((i for i, c in enumerate(cases) if c["name"] not in done), None)
        if nxt is None:
            break
        started = [r["name"] for r in recs if r["event"] == "start"]
        if not started or started[-1] != cases[nxt]["name"]:
            why = f"{label} worker exited (rc {proc.returncode}) before reaching this case"
            for c in cases[nxt:]:
                append_jsonl(path, dict(name=c["name"], event="done", label=label,
                                        status="error", error=why))
            print(f"!! {why}: {len(cases) - nxt} case(s) not run", flush=True)
            break
        why = (f"killed after {timeout:.0f} s on this case" if killed
               else f"worker died on this case (rc {proc.returncode})")
        append_jsonl(path, dict(name=cases[nxt]["name"], event="done", label=label,
                                status="error", error=why))
        print(f"!! {label}: {cases[nxt]['name']}: {why}; restarting after it", flush=True)
        start = nxt + 1
    return {r["name"]: r for r in read_jsonl(path) if r["event"] == "done"}


def load_outputs(work, label, case):
    import ml_dtypes
    folder = os.path.join(work, "outputs", label, os.path.basename(case_dir(work, case)))
    res = {}
    for name in ("out", "lse", "max_logits"):
        p = os.path.join(folder, name + ".npy")
        if os.path.exists(p):
            a = np.load(p)
            res[name] = a.view(ml_dtypes.bfloat16) if a.dtype == np.int16 else a
    return res


# ---------------------------------------------------------------------------------------------
# Report

def _perf(rec, meta):
    if not rec or rec.get("status") != "ok" or not rec.get("time_s"):
        return None
    t = rec["time_s"]
    return dict(time_us=t * 1e6, tflops=meta["flops"] / t / 1e12, gbs=meta["bytes"] / t / 1e9)


def summarize(cases, metas, ours, up, work, limits):
    rows = []
    for c in cases:
        meta, o, u = metas[c["name"]], ours.get(c["name"], {}), up.get(c["name"], {})
        row = dict(case=c, flops=meta["flops"], bytes=meta["bytes"],
                   ours=dict(o, perf=_perf(o, meta)), flashmla=dict(u, perf=_perf(u, meta)))
        po, pu = row["ours"]["perf"], row["flashmla"]["perf"]
        row["ratio"] = pu["time_us"] / po["time_us"] if po and pu else None
        if "gather_bytes" in meta and limits.get("copy_gbs"):
            row["gather_floor_us"] = meta["gather_bytes"] / (limits["copy_gbs"] * 1e9) * 1e6
            if po:
                row["ours_vs_floor"] = row["gather_floor_us"] / po["time_us"]
        if o.get("status") in ("ok", "slow") and u.get("status") in ("ok",):
            try:
                row["agreement"] = sbs_cases.compare(load_outputs(work, "ours", c),
                                                     load_outputs(work, "flashmla", c))
            except Exception as e:  # noqa: BLE001
                row["agreement"] = dict(error=f"{type(e).__name__}: {e}")
        rows.append(row)
    return rows


def _fmt_side(p, rec):
    if p is None:
        st = rec.get("status", "-")
        return f"{st:>10} {'':>15}"
    return f"{p['time_us']:>10.1f} {p['tflops']:>6.0f}/{p['gbs']:>7.0f}"


def print_table(rows, suites):
    geo = {}
    for suite in suites:
        sel = [r for r in rows if r["case"]["suite"] == suite]
        if not sel:
            continue
        print(f"\n== {suite}: time us, TFLOPS/GB/s (FlashMLA's counting); ratio = FlashMLA time / "
              f"ours time (>1: ours faster)")
        print(f"{'case':<44} {'ours us':>10} {'TFLOPS/GB/s':>15} {'path':>9} | "
              f"{'FlashMLA us':>10} {'TFLOPS/GB/s':>15} | {'ratio':>6} {'out relL2':>9} "
              f"{'lse max':>8}  note")
        for r in sel:
            o, u, a = r["ours"], r["flashmla"], r.get("agreement") or {}
            ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
            rel = f"{a['out_rel_l2']:.1e}" if "out_rel_l2" in a else "-"
            lse = f"{a['lse_max_abs']:.1e}" if "lse_max_abs" in a else "-"
            notes = []
            if a.get("out_finite_mismatch") or a.get("lse_finite_mismatch"):
                notes.append(f"inf/nan mismatch out {a.get('out_finite_mismatch')} "
                             f"lse {a.get('lse_finite_mismatch')}")
            for side, rec in (("ours", o), ("FlashMLA", u)):
                if rec.get("error"):
                    notes.append(f"{side}: {rec['error'][:120]}")
                if rec.get("note"):
                    notes.append(f"{side}: {rec['note']}")
            if "gather_floor_us" in r:
                notes.append(f"gather floor {r['gather_floor_us']:.0f} us"
                             + (f" ({r['ours_vs_floor']:.2f} of it)" if "ours_vs_floor" in r else ""))
            if o.get("issue_s") and u.get("issue_s"):  # (sbs_common.time_rounds)
                notes.append(f"host issue per call: ours {o['issue_s'] * 1e6:.0f} us, "
                             f"FlashMLA {u['issue_s'] * 1e6:.0f} us")
            if o.get("xla_time_s") and o.get("perf"):
                notes.append(f"plain XLA {o['xla_time_s'] * 1e6:.0f} us "
                             f"({o['xla_time_s'] * 1e6 / o['perf']['time_us']:.1f}x ours)")
            print(f"{r['case']['name']:<44} {_fmt_side(o['perf'], o)} {o.get('path', '-'):>9} | "
                  f"{_fmt_side(u['perf'], u)} | {ratio:>6} {rel:>9} {lse:>8}  {'; '.join(notes)}")
        g = sbs_cases.geomean([r["ratio"] for r in sel])
        gk = sbs_cases.geomean([r["ratio"] for r in sel if r["ours"].get("path") == "kernel"])
        geo[suite] = dict(all=g, kernel_only=gk, n=sum(1 for r in sel if r["ratio"]),
                          n_kernel=sum(1 for r in sel if r["ratio"]
                                       and r["ours"].get("path") == "kernel"))
        print(f"-- {suite}: geomean ours/FlashMLA speed = "
              + (f"{g:.3f} over {geo[suite]['n']} cases" if g else "n/a")
              + (f"; our kernel paths only: {gk:.3f} over {geo[suite]['n_kernel']}" if gk else ""))
    return geo


def print_in_one_call(rows, k):
    """The --in-one-call table: per-call time with K calls in one unit on each side, and the
    ratio beside the back-to-back one."""
    sel = [r for r in rows if r["ours"].get("k_time_s") or r["flashmla"].get("k_time_s")
           or r["ours"].get("k_error") or r["flashmla"].get("k_error")]
    if not sel:
        return None
    print(f"\n== {k} calls in one unit (ours: one jit; FlashMLA: one CUDA graph), us per call; "
          f"ratio = FlashMLA / ours. GPU: the profiler's device time per call (the time covered by "
          f"its kernels, overlapping launches once; no host dispatch; FlashMLA's from plain calls)")
    print(f"{'case':<44} {'ours us':>10} {'FlashMLA us':>12} {'ratio':>6} | {'GPU ours':>9} "
          f"{'GPU FlashMLA':>12} {'ratio':>6} | {'back-to-back':>12}  note")
    ratios, g_ratios = [], []
    nan = float("nan")
    for r in sel:
        o, u = r["ours"].get("k_time_s"), r["flashmla"].get("k_time_s")
        go, gu = r["ours"].get("g_time_s"), r["flashmla"].get("g_time_s")
        ratio = u / o if o and u else None
        g_ratio = gu / go if go and gu else None
        if ratio:
            ratios.append(ratio)
        if g_ratio:
            g_ratios.append(g_ratio)
        bb = f"{r['ratio']:.2f}" if r.get("ratio") else "-"
        note = "; ".join(f"{side}: {rec[key][:100]}" for side, rec in
                         (("ours", r["ours"]), ("FlashMLA", r["flashmla"]))
                         for key in ("k_error", "g_error") if rec.get(key))
        print(f"{r['case']['name']:<44} {o * 1e6 if o else nan:>10.1f} "
              f"{u * 1e6 if u else nan:>12.1f} {f'{ratio:.2f}' if ratio else '-':>6} | "
              f"{go * 1e6 if go else nan:>9.1f} {gu * 1e6 if gu else nan:>12.1f} "
              f"{f'{g_ratio:.2f}' if g_ratio else '-':>6} | {bb:>12}  {note}")
    for r in sel:  # what each side's GPU time is made of
        for side, rec in (("ours", r["ours"]), ("FlashMLA", r["flashmla"])):
            if rec.get("g_kernels"):
                parts = ", ".join(f"{x['per_call']:g} x {x['mean_us']:.1f} us {x['name'][:48]}"
                                  for x in rec["g_kernels"])
                print(f"   {r['case']['name'][:40]:<40} {side:>8}: {parts}")
    g = sbs_cases.geomean(ratios)
    gg = sbs_cases.geomean(g_ratios)
    print("-- in one unit: geomean ours/FlashMLA speed = " + (f"{g:.3f} over {len(ratios)} cases"
                                                                if g else "n/a")
          + (f"; GPU time: {gg:.3f} over {len(g_ratios)} cases" if gg else ""))
    return dict(all=g, n=len(ratios), k=k, gpu_time=gg, n_gpu_time=len(g_ratios))


def side_energy(rec: dict, st: dict | None, counter: bool) -> dict | None:
    """One side's energy per call over its in-one-unit window: with `counter`, from NVML's energy
    counter that the worker read (k_energy_mj; trusted over windows >= ENERGY_COUNTER_MIN_S), else
    mean nvidia-smi power x time per call (sbs_common.energy_per_call)."""
    if counter:
        return dict(mj=rec["k_energy_mj"], src="nvml",
                    trusted=rec.get("k_energy_window_s", 0.0) >= ENERGY_COUNTER_MIN_S)
    w = rec.get("k_window")
    e = energy_per_call(st, rec.get("k_time_s"), w[1] - w[0]) if w else None
    return dict(e, src="smi") if e else None


def print_clocks(rows, smi_path=None):
    """Each side's SM clock and power over its in-one-unit timing window (k_window), from the
    nvidia-smi samples: where a side ran under the power cap, its time per call is set by the
    energy it spends per call, not by its cycles at the boost clock (the GPU-time column). Then
    the energy per call and FlashMLA's / ours (side_energy: NVML's counter, else nvidia-smi's
    averaged power; both sides from the same source): '*' where both are trusted, the only rows
    the geomean counts. "cyc o/FM": our cycles per call over FlashMLA's (time per call x the
    window's mean SM clock): under the cap a side can be slower at a higher clock; this says
    which side's kernel needs more cycles for the same work (PERFORMANCE.md, 2026-12-06 twelfth
    session). Only for compute-bound rows: a memory-bound kernel's time does not follow the SM
    clock (h_q 16 at 1980 against 1700 MHz reads ~1.15 for equal times)."""
    samples = read_smi_csv(smi_path) if smi_path else []
    print("\n== clocks over each side's in-one-unit window (nvidia-smi samples): mean SM MHz, "
          "mean W, share of samples power-capped; energy per call (mJ; src: NVML's energy counter "
          "or nvidia-smi's power) and FlashMLA / ours; our cycles per call / FlashMLA's")
    print(f"{'case':<44} {'ours MHz':>9} {'W':>5} {'cap':>4} | {'FlashMLA MHz':>12} {'W':>5} {'cap':>4}"
          f" | {'cyc o/FM':>8} | {'mJ ours':>8} {'mJ FM':>8} {'FM/ours':>8} {'src':>4}")
    trusted = []
    for r in rows:
        cells, energy, clocks = [], [], []
        # NVML's counter where both sides read it, else nvidia-smi's power for both; a window
        # shorter than the counter's 100 ms step can read 0 (no step seen): not a reading
        counter = all((r[s].get("k_energy_mj") or 0.0) > 0.0 for s in ("ours", "flashmla"))
        for side in ("ours", "flashmla"):
            w = r[side].get("k_window")
            st = smi_window(samples, *w) if w else None
            r[side]["k_clocks"] = st
            clocks.append(st)
            energy.append(side_energy(r[side], st, counter))
            cells.append(f"{st['mhz']:>{9 if side == 'ours' else 12}.0f} {st['watts']:>5.0f} "
                         f"{st['capped']:>4.0%}" if st else f"{'-':>{9 if side == 'ours' else 12}} "
                         f"{'-':>5} {'-':>4}")
        eo, ef = energy
        co, cf = clocks
        to, tf = (r[s].get("k_time_s") for s in ("ours", "flashmla"))
        cyc = (f"{to * co['mhz'] / (tf * cf['mhz']):>8.3f}" if co and cf and to and tf
               else f"{'-':>8}")
        if eo and ef and eo["mj"] > 0.0 and ef["mj"] > 0.0:
            star = "*" if eo["trusted"] and ef["trusted"] else " "
            if star == "*":
                trusted.append(ef["mj"] / eo["mj"])
            e_cell = (f"{eo['mj']:>8.1f} {ef['mj']:>8.1f} {ef['mj'] / eo['mj']:>7.2f}{star} "
                      f"{eo['src']:>4}")
        else:
            e_cell = f"{'-':>8} {'-':>8} {'-':>8} {'-':>4}"
        print(f"{r['case']['name']:<44} {cells[0]} | {cells[1]} | {cyc} | {e_cell}")
    if trusted:
        g = float(np.exp(np.mean(np.log(trusted))))
        print(f"-- energy per call, FlashMLA / ours, geomean over the {len(trusted)} rows marked *: {g:.3f}")


def plot(rows, suites, path):
    sel_suites = [s for s in suites if any(r["case"]["suite"] == s for r in rows)]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_raw(rows, sel_suites, path)
        return "raw (matplotlib missing: bars only, no labels; see the JSON for names)"
    heights = [max(2.0, 0.28 * sum(1 for r in rows if r["case"]["suite"] == s) + 1) for s in sel_suites]
    fig, axes = plt.subplots(len(sel_suites), 1, figsize=(10, sum(heights)),
                             gridspec_kw=dict(height_ratios=heights), squeeze=False)
    for ax, suite in zip(axes[:, 0], sel_suites):
        sel = [r for r in rows if r["case"]["suite"] == suite]
        y = np.arange(len(sel))[::-1]
        vals, colors, labels = [], [], []
        for r in sel:
            path_ = r["ours"].get("path", "?")
            if r["ratio"]:
                vals.append(r["ratio"])
                colors.append("tab:blue" if path_ == "kernel" else "tab:orange")
            else:
                vals.append(np.nan)
                colors.append("gray")
            po = r["ours"]["perf"]
            extra = "" if r["ratio"] else (
                f"  [ours only: {po['time_us']:.0f} us]" if po else
                f"  [{r['ours'].get('status', '-')}/{r['flashmla'].get('status', '-')}]")
            labels.append(r["case"]["name"] + extra)
        finite = [v for v in vals if np.isfinite(v)]
        ax.barh(y, [v if np.isfinite(v) else 0 for v in vals], color=colors, left=0)
        ax.axvline(1.0, color="k", lw=1)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xscale("log")
        lo = min(finite + [0.5]) * 0.8
        hi = max(finite + [2.0]) * 1.25
        ax.set_xlim(lo, hi)
        for yy, v in zip(y, vals):
            if np.isfinite(v):
                ax.text(v, yy, f" {v:.2f}", va="center", fontsize=6)
        g = sbs_cases.geomean(finite)
        ax.set_title(f"{suite}: ours / FlashMLA speed (>1: ours faster; blue kernel, orange "
                     f"reference path)" + (f", geomean {g:.2f}" if g else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


def _plot_raw(rows, suites, path):
    """No-dependency PNG: one bar per case (log2 ratio around a centre line at 1.0), suites
    separated by gray rows; blue = kernel path, orange = reference, gray stub = no ratio."""
    import struct
    import zlib
    rows = [r for s in suites for r in rows if r["case"]["suite"] == s] or rows
    bar_h, gap, w = 10, 4, 600
    h = max(1, len(rows) * (bar_h + gap) + gap)
    img = np.full((h, w, 3), 255, np.uint8)
    mid = w // 2
    img[:, mid] = 0
    prev = None
    for i, r in enumerate(rows):
        y0 = gap + i * (bar_h + gap)
        if prev is not None and r["case"]["suite"] != prev:
            img[y0 - gap // 2, :] = 160
        prev = r["case"]["suite"]
        if r["ratio"]:
            px = int(np.clip(np.log2(r["ratio"]) * (w // 4), -mid + 1, mid - 1))
            color = (31, 119, 180) if r["ours"].get("path") == "kernel" else (255, 127, 14)
            lo, hi = sorted((mid, mid + px))
            img[y0:y0 + bar_h, lo:hi + 1] = color
        else:
            img[y0:y0 + bar_h, mid - 3:mid + 4] = 128
    raw = b"".join(b"\0" + img[y].tobytes() for y in range(h))

    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


# ---------------------------------------------------------------------------------------------

def main():
    args = parse()
    _WORKER_ENV.clear()
    _WORKER_ENV.update(os.environ)
    os.environ["JAX_PLATFORMS"] = "cpu"
    suites = SUITE_NAMES if "all" in args.suite else args.suite
    if args.cpu_smoke:
        args.upstream = "fake" if args.upstream == "on" else args.upstream
    cases = sbs_cases.select(suites, args.quick, args.cases, cpu_smoke=args.cpu_smoke)
    if args.cpu_smoke:
        suites = SUITE_NAMES
    if args.list:
        for c in cases:
            print(c["name"])
        return
    if not cases:
        sys.exit("no case selected")
    os.makedirs(args.out, exist_ok=True)
    work = args.work or os.path.join("/tmp", f"sbs_work_{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    for label in ("ours", "flashmla"):   # fresh results for this run (inputs are reused)
        for stale in (os.path.join(work, f"results_{label}.jsonl"),):
            if os.path.exists(stale):
                os.remove(stale)
        shutil.rmtree(os.path.join(work, "outputs", label), ignore_errors=True)
    with open(os.path.join(work, "cases.json"), "w") as f:
        json.dump(cases, f)

    t0 = time.perf_counter()
    metas = {}
    for c in cases:
        t1 = time.perf_counter()
        metas[c["name"]] = sbs_cases.make_inputs(c, case_dir(work, c))
        if time.perf_counter() - t1 > 3:
            print(f"  inputs of {c['name']}: {time.perf_counter() - t1:.1f} s", flush=True)
    print(f"inputs for {len(cases)} cases ready in {work} ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    if args.prepare_only:
        return

    py = sys.executable
    env_cpu = ["--cpu"] if args.cpu_smoke else []
    quick = ["--quick"] if args.quick else []
    ours_cmd = [py, os.path.join(HERE, "sbs_ours.py"), "--work", work, "--label", "ours",
                "--max-seconds", str(args.ours_max_seconds)] + env_cpu + quick
    if args.xla:
        ours_cmd.append("--xla")
    k_arg = ["--in-one-call", str(args.in_one_call)] if args.in_one_call > 1 else []
    ours_cmd += k_arg
    if args.upstream == "on":
        up_cmd = [py, os.path.join(HERE, "sbs_flashmla.py"), "--work", work] + quick + k_arg
    elif args.upstream == "fake":
        up_cmd = [py, os.path.join(HERE, "sbs_ours.py"), "--work", work, "--label", "flashmla",
                  "--implementation", "reference", "--max-seconds", "1e9"] + env_cpu + quick + k_arg
    else:
        up_cmd = None

    # Machine limits: torch's device-to-device copy and matmul where torch is there.
    lim_cmd = (up_cmd[:2] + ["--work", work, "--limits"]) if args.upstream == "on" else (
        [py, os.path.join(HERE, "sbs_ours.py"), "--work", work, "--limits"] + env_cpu)
    limits = {}
    if subprocess.run(lim_cmd, env=_WORKER_ENV).returncode == 0:
        with open(os.path.join(work, "limits.json")) as f:
            limits = json.load(f)

    ours = run_worker("ours", ours_cmd, cases, work, args.case_timeout)
    up = run_worker("flashmla", up_cmd, cases, work, args.case_timeout) if up_cmd else {}
    if args.upstream == "fake":
        for r in up.values():
            r["note"] = "FAKE upstream (JAX reference)"

    rows = summarize(cases, metas, ours, up, work, limits)
    geo = print_table(rows, suites)
    if args.in_one_call > 1:
        geo["in_one_call"] = print_in_one_call(rows, args.in_one_call)
        smi = args.smi if args.smi and os.path.exists(args.smi) else None
        if smi or any(r[s].get("k_energy_mj") is not None for r in rows for s in ("ours", "flashmla")):
            print_clocks(rows, smi)
    png = os.path.join(args.out, "side_by_side.png")
    how = plot(rows, suites, png)
    result = dict(created=time.strftime("%Y-%m-%d %H:%M:%S"), limits=limits, suites=suites,
                  quick=args.quick, heat_s=heat_seconds(), upstream=args.upstream, geomean=geo,
                  plot=how,
                  rows=[{k: v for k, v in r.items()} for r in rows])
    with open(os.path.join(args.out, "side_by_side.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\nwrote {os.path.join(args.out, 'side_by_side.json')} and {png} ({how})"
          + (f"; limits: copy {limits['copy_gbs']:.0f} GB/s, matmul {limits['matmul_tflops']:.0f} "
             f"TFLOP/s ({limits['source']})" if limits else ""), flush=True)
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
