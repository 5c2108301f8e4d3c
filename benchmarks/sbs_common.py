"""Shared by the side-by-side driver and its two workers (no jax, no torch imported here).

A case is a plain dict (JSON-able). Its inputs live in one folder as .npy files, written once by the
driver from a seeded numpy generator; both workers load the same bytes. Large pools are stored as a
*palette* of blocks (or rows) that each worker expands on its device: block k of the pool is
palette[k % P]. Content does not change the speed of these kernels, and both sides get identical
bytes, so this costs nothing in meaning and saves gigabytes of host generation and disk.

Files in a case folder (all optional except q):
  q.npy                      bf16 as int16 (full) -- or q_palette.npy + meta "q_rows"
  pool_palette.npy           dense: bf16 as int16 [P, page, 1, 576]; FP8: uint8 [P, page, 1, 656|584]
  block_table.npy, lens.npy  dense decode
  indices.npy, topk_length.npy, attn_sink.npy
  extra_pool_palette.npy, extra_indices.npy, extra_topk_length.npy
  kv_palette.npy             prefill: bf16 as int16 [P, 1, d_qk]
  meta.json                  the sizes needed to expand palettes (num_blocks, s_kv, ...)
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time

D_V = 512
PAGE = 64

# Timing protocol (ANCHORS.md): N back-to-back calls, median over rounds.
CALLS, ROUNDS = 20, 7
QUICK_CALLS, QUICK_ROUNDS = 10, 5


def k_units(calls: int) -> int:
    """Units of K calls per timed round of the in-one-call / one-graph timing (both sides): at
    least 20, or JFM_SBS_K_UNITS. A round pays a fixed cost on our side (the first unit's dispatch
    and the final wait: ~0.5-0.6 ms on the H200, PERFORMANCE.md 2026-12-02 second session) that a
    serving loop pays once; at 5 units of 10 calls it made our per-call time ~8% slower than our
    GPU time at b 64, at 20 units ~2%."""
    return int(os.environ.get("JFM_SBS_K_UNITS", "0")) or max(20, calls)


def heat_seconds() -> float:
    """Seconds each timing first runs its calls untimed (JFM_SBS_HEAT_S, default 0: none)."""
    return float(os.environ.get("JFM_SBS_HEAT_S", "0") or 0)


def case_dir(work: str, case: dict) -> str:
    return os.path.join(work, "inputs", case["name"].replace(" ", "_").replace("/", "-"))


def load_meta(folder: str) -> dict:
    with open(os.path.join(folder, "meta.json")) as f:
        return json.load(f)


def time_rounds(call, sync, *, calls: int, rounds: int, budget_s: float | None = None,
                heat: bool = True):
    """Median / min / max seconds per call over ``rounds`` rounds of ``calls`` back-to-back calls
    (``sync`` waits for the device). One call is assumed already warm. With ``budget_s``, the call
    and round counts shrink so the whole measurement stays within it (estimated from one call).
    With JFM_SBS_HEAT_S set (and ``heat``), the calls first run untimed for that long (heat_up)."""
    t0 = time.perf_counter()
    sync(call())
    one = time.perf_counter() - t0
    if heat:
        heat_up(call, sync)
    if budget_s is not None and one * calls * rounds > budget_s:
        calls = max(1, min(calls, int(budget_s / max(one, 1e-9) / rounds)))
        if one * calls * rounds > budget_s:
            rounds = max(1, int(budget_s / max(one * calls, 1e-9)))
    times, issued = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = call()
        t1 = time.perf_counter()
        sync(out)
        times.append((time.perf_counter() - t0) / calls)
        issued.append((t1 - t0) / calls)
    # issue_s: the host's time per call to hand the calls over (before the wait). Near time_s the
    # host, not the GPU, sets the back-to-back time (dispatch, or a call that blocks).
    return dict(time_s=statistics.median(times), time_min_s=min(times), time_max_s=max(times),
                issue_s=statistics.median(issued), calls=calls, rounds=rounds)


def heat_up(call, sync):
    """Run ``call`` untimed for heat_seconds() (JFM_SBS_HEAT_S; default none: returns at once),
    syncing every ~50 ms: the power limiter's one-second average then sits at this case's own
    draw, so a short case is timed at its steady clock rather than at the boost clock that the
    idle gap before it left (docs/BUILDING.md, sixty-first session)."""
    if heat_seconds() <= 0:
        return
    t0 = time.perf_counter()
    sync(call())
    one_s = time.perf_counter() - t0
    end = time.perf_counter() + heat_seconds()
    while time.perf_counter() < end:
        out = None
        for _ in range(max(1, int(0.05 / max(one_s, 1e-9)))):
            out = call()
        sync(out)


def load_perfetto(trace_dir: str):
    """The newest perfetto trace that jax.profiler.trace(..., create_perfetto_trace=True) wrote
    under trace_dir: (events, the GPU's lines {(pid, tid): line name}), or None."""
    import glob
    import gzip
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        return None
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in procs.items() if "/device:GPU" in n or "GPU:0" in n}
    lines = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in gpu}
    return events, lines


def perfetto_gpu_events(trace_dir: str) -> list[tuple[float, float, str]]:
    """(start us, duration us, name) of every event on the GPU's stream lines of that trace, in
    time order."""
    loaded = load_perfetto(trace_dir)
    if loaded is None:
        return []
    events, lines = loaded
    streams = {k for k, n in lines.items() if n.startswith("Stream")}
    return sorted((float(e["ts"]), float(e.get("dur", 0.0)), e.get("name", "?")) for e in events
                  if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams)


def host_launch_counts(trace_dir: str) -> dict[str, int]:
    """How many times each host-side CUDA launch call (kernel launches, graph launches) appears in
    that trace, off the GPU's lines: whether XLA ran the calls' kernels one launch at a time or
    replayed them as a CUDA graph (a command buffer)."""
    loaded = load_perfetto(trace_dir)
    if loaded is None:
        return {}
    events, lines = loaded
    counts: dict[str, int] = {}
    for e in events:
        name = e.get("name", "")
        if (e.get("ph") == "X" and (e.get("pid"), e.get("tid")) not in lines
                and name.startswith("cu") and ("Launch" in name or "Graph" in name)):
            counts[name] = counts.get(name, 0) + 1
    return counts


def host_event_totals(trace_dir: str, runs: int, top: int = 14) -> list[tuple[str, float, float]]:
    """The host's events of that trace (off the GPU's lines) by name: (name, microseconds per
    run, occurrences per run), the `top` largest totals first. Where the host blocks between
    runs of a jitted unit (a stream or event synchronize, a graph update) shows up here."""
    loaded = load_perfetto(trace_dir)
    if loaded is None:
        return []
    events, lines = loaded
    tot: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) not in lines:
            t = tot.setdefault(e.get("name", "?")[:80], [0.0, 0.0])
            t[0] += float(e.get("dur", 0.0))
            t[1] += 1
    rows = sorted(((n, d / runs, c / runs) for n, (d, c) in tot.items()), key=lambda r: -r[1])
    return rows[:top]


def read_smi_csv(path: str) -> list[tuple[float, int, float, int]]:
    """The samples of `nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,
    temperature.gpu,clocks_event_reasons.active --format=csv -lms N` (scripts/device_bench.sh,
    SMI_MS): (epoch seconds, SM MHz, watts, clock-event reason bits). Rows that do not parse
    (the header, a sampler cut off mid-line) are skipped."""
    import csv
    from datetime import datetime
    out = []
    with open(path) as f:
        for row in csv.reader(f):
            try:
                t = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                out.append((t, int(row[1].split()[0]), float(row[3].split()[0]), int(row[5].strip(), 16)))
            except (ValueError, IndexError):
                continue
    return out


# nvidia-smi's power.draw on the H200 (and every Ampere-or-newer GPU but the A100) is NVML's
# average over the last second: a window shorter than this mixes in what ran before it.
SMI_POWER_AVERAGE_S = 1.0


def energy_per_call(stats: dict | None, time_per_call_s: float, window_s: float) -> dict | None:
    """Energy per call in mJ (mean power over the window x time per call) of one side's
    in-one-unit window, and whether the window is long enough for nvidia-smi's averaged power to
    mean that window's (>= 1.5 x SMI_POWER_AVERAGE_S); None without power samples."""
    if stats is None or not time_per_call_s:
        return None
    return dict(mj=stats["watts"] * time_per_call_s * 1e3,
                trusted=window_s >= 1.5 * SMI_POWER_AVERAGE_S)


# NVML's energy counter (mJ since the driver loaded) moves in steps: on the H200 every 100 ms
# (scripts/nvml_energy_probe.py, 2026-12-03), so a window's reading is off by up to one step's
# energy (100 ms of power); from 2 s on that is within 5%. Shorter windows are not trusted.
ENERGY_COUNTER_MIN_S = 2.0


@functools.lru_cache(maxsize=None)
def gpu_energy_counter():
    """(Once per process.) A function returning the GPU's total energy counter in mJ (NVML,
    nvmlDeviceGetTotalEnergyConsumption) for the device this process uses (the first entry of
    CUDA_VISIBLE_DEVICES, else 0); None where pynvml or the counter is missing. Read around a timed
    window it gives that window's energy to within one counter step (ENERGY_COUNTER_MIN_S), not
    mixed with the second before it as nvidia-smi's averaged power is."""
    try:
        import pynvml
        pynvml.nvmlInit()
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:  # no pynvml, no driver, or a GPU without the counter
        return None
    return lambda: float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))


def time_in_one_unit(unit, sync, k: int, **rounds) -> dict:
    """Both workers' in-one-unit timing: time_rounds of `unit` (k calls as one jit / one CUDA
    graph), as seconds per call (k_time_s), the wall-clock window (k_window, for nvidia-smi's
    samples) and, where NVML's counter is there, the window's energy per call (k_energy_mj over
    k_energy_window_s seconds)."""
    heat_up(unit, sync)  # (JFM_SBS_HEAT_S) before the energy counter's window opens
    read = gpu_energy_counter()
    e0 = read() if read else None
    t0 = time.time()
    t = time_rounds(unit, sync, heat=False, **rounds)
    t1 = time.time()
    rec = dict(k_calls=k, k_time_s=t["time_s"] / k, k_window=[t0, t1])
    if read:
        units = 1 + t["calls"] * t["rounds"]  # time_rounds runs one unit before its rounds
        rec.update(k_energy_mj=(read() - e0) / (units * k), k_energy_window_s=t1 - t0)
    return rec


def smi_window(samples, t0: float, t1: float) -> dict | None:
    """Mean SM clock and power of the samples inside [t0, t1], and the share of them with the
    software power cap (reason bit 0x4) active; None with fewer than 3 samples."""
    inside = [s for s in samples if t0 <= s[0] <= t1]
    if len(inside) < 3:
        return None
    n = len(inside)
    return dict(mhz=sum(s[1] for s in inside) / n, watts=sum(s[2] for s in inside) / n,
                capped=sum(1 for s in inside if s[3] & 0x4) / n, samples=n)


def kineto_gpu_events(path: str) -> list[tuple[float, float, str]]:
    """The same from torch.profiler's chrome trace (export_chrome_trace): kernels, copies, memsets."""
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return sorted((float(e["ts"]), float(e.get("dur", 0.0)), e.get("name", "?")) for e in events
                  if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))


def equal_runs(events: list[tuple[float, float, str]], runs: int):
    """The GPU events of `runs` traced runs of one unit, split into runs by count (each run
    launches the same kernels), or None when the count does not divide. Not by the longest idle
    gaps: when runs follow closely the longest gap can fall inside a run."""
    if not events or len(events) % runs:
        return None
    n = len(events) // runs
    return [events[i * n:(i + 1) * n] for i in range(runs)]


def span_us(events: list[tuple[float, float, str]]) -> float:
    """Microseconds from the first event's start to the latest end (not the last event's: a PDL
    combine or an overlapping kernel can end before the one launched ahead of it)."""
    return max(t + d for t, d, _ in events) - min(t for t, _, _ in events)


def covered_us(events: list[tuple[float, float, str]]) -> float:
    """Microseconds covered by the union of the events' [start, start + duration) intervals."""
    return sum(exclusive_us_by_name(events).values())


def exclusive_us_by_name(events: list[tuple[float, float, str]]) -> dict[str, float]:
    """Microseconds each event name adds to the union of the intervals (covered_us), events taken
    in start order: time two events share goes to the one that started first. Why: a kernel launched with programmatic dependent launch (our combine) spans
    most of its predecessor's time while it waits, so summed durations count that time twice."""
    added: dict[str, float] = {}
    end = float("-inf")
    for ts, dur, name in sorted(events):
        if ts + dur > end:
            added[name] = added.get(name, 0.0) + ts + dur - max(ts, end)
            end = ts + dur
        else:
            added.setdefault(name, 0.0)
    return added


def gpu_time_record(events: list[tuple[float, float, str]], calls: int) -> dict:
    """GPU busy time per call from the profiler's device events of `calls` calls: the time covered
    by at least one event (what the calls cost the GPU, host dispatch excluded), and the mean
    duration of each kernel. Covered time, not the sum of durations: a kernel launched with
    programmatic dependent launch (ours and upstream's combine) starts while the kernel before it
    still runs and waits on the GPU, so its duration overlaps its predecessor's."""
    if not events:
        return dict(g_error="no GPU events in the profile")
    per: dict[str, list[float]] = {}
    for _, dur, name in events:
        per.setdefault(name, []).append(dur)
    kernels = sorted(((n[:90], len(d) / calls, sum(d) / len(d)) for n, d in per.items()),
                     key=lambda x: -x[1] * x[2])
    return dict(g_calls=calls, g_time_s=covered_us(events) / calls * 1e-6,
                g_kernels=[dict(name=n, per_call=round(c, 2), mean_us=round(m, 2))
                           for n, c, m in kernels[:4]])


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass   # a line cut by a crash
    return out


MAX_SAVED_ELEMS = 1 << 24   # outputs saved for the comparison: leading rows up to this many elements


def saved_rows(shape) -> int:
    per_row = 1
    for n in shape[1:]:
        per_row *= n
    return max(1, min(shape[0], MAX_SAVED_ELEMS // max(per_row, 1)))
