"""The side-by-side benchmark's host-side logic (benchmarks/sbs_cases.py, side_by_side.py): input
generation, top-k positions, the comparison and the no-dependency plot (numpy only, under a
second), and benchmarks/profile_decode.py's modes on the reference (~20 s); the whole two-process
flow is `python benchmarks/side_by_side.py --cpu-smoke --out DIR` (~1 min)."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import sbs_cases  # noqa: E402


def test_unique_positions_are_distinct_and_in_range():
    rng = np.random.default_rng(0)
    lens = np.array([1, 2, 7, 64, 100, 4096, 3 * 16384])
    pos = sbs_cases.unique_positions(rng, lens, 128)
    for row, n in zip(pos, lens):
        valid = row[row >= 0]
        assert len(valid) == min(n, 128) and len(set(valid.tolist())) == len(valid)
        assert valid.max() < n and (row[len(valid):] == -1).all()


def test_dense_inputs_are_deterministic_and_counted(tmp_path):
    case = sbs_cases.select(["dense"], False, "dense b128 sq1 h16 sk4096")[0]
    case = dict(case, b=4, s_k=300)   # same recipe, tiny
    m1 = sbs_cases.make_inputs(case, str(tmp_path / "a"))
    m2 = sbs_cases.make_inputs(case, str(tmp_path / "b"))
    for name in ("q", "pool_palette", "block_table", "lens"):
        a, b = (np.load(str(tmp_path / d / f"{name}.npy")) for d in "ab")
        np.testing.assert_array_equal(a, b)
    lens = np.load(str(tmp_path / "a" / "lens.npy"))
    table = np.load(str(tmp_path / "a" / "block_table.npy"))
    assert m1 == m2 and m1["flops"] == 1 * 16 * (2 * 576 + 2 * 512) * int(lens.sum())
    used = np.concatenate([table[i, :-(-n // 64)] for i, n in enumerate(lens)])
    assert sorted(used.tolist()) == list(range(m1["num_blocks"]))   # a permutation of the pool


def test_compare_and_raw_plot(tmp_path):
    rng = np.random.default_rng(1)
    out = rng.standard_normal((2, 1, 4, 8)).astype(np.float32)
    lse = np.array([[1.0, np.inf], [2.0, 3.0]], np.float32)
    res = sbs_cases.compare(dict(out=out, lse=lse), dict(out=out * 1.01, lse=lse + 1e-3))
    assert abs(res["out_rel_l2"] - 0.01 / 1.01) < 1e-6
    assert abs(res["lse_max_abs"] - 1e-3) < 1e-6 and res["lse_finite_mismatch"] == 0
    res = sbs_cases.compare(dict(lse=lse), dict(lse=np.zeros_like(lse)))
    assert res["lse_finite_mismatch"] == 1
    from side_by_side import _plot_raw
    rows = [dict(case=dict(suite="dense"), ratio=r, ours=dict(path="kernel")) for r in (0.5, 1.3, None)]
    _plot_raw(rows, ["dense"], str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_time_from_both_profilers_traces(tmp_path):
    """The GPU-time columns: device events read from a JAX perfetto trace (GPU stream lines only,
    host lines ignored) and from a torch chrome trace (kernels, copies, memsets only), the time
    they cover per call."""
    import gzip
    import json

    import sbs_common
    jax_trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 9, "args": {"name": "python"}},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 10.0, "dur": 8.0, "name": "attention"},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 0.0, "dur": 2.0, "name": "combine"},
        {"ph": "X", "pid": 1, "tid": 7, "ts": 20.0, "dur": 8.0, "name": "attention"},
        {"ph": "X", "pid": 1, "tid": 8, "ts": 10.0, "dur": 99.0, "name": "fusion"},
        {"ph": "X", "pid": 2, "tid": 9, "ts": 0.0, "dur": 500.0, "name": "dispatch"},
        {"ph": "X", "pid": 2, "tid": 9, "ts": 1.0, "dur": 3.0, "name": "cuLaunchKernelEx"},
        {"ph": "X", "pid": 2, "tid": 9, "ts": 5.0, "dur": 3.0, "name": "cuLaunchKernelEx"},
        {"ph": "X", "pid": 2, "tid": 9, "ts": 9.0, "dur": 3.0, "name": "cuGraphLaunch"},
        {"ph": "X", "pid": 2, "tid": 9, "ts": 9.0, "dur": 1.0, "name": "cuMemcpyAsync"},
    ]}
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump(jax_trace, f)
    ev = sbs_common.perfetto_gpu_events(str(tmp_path))
    assert [e[2] for e in ev] == ["combine", "attention", "attention"]
    rec = sbs_common.gpu_time_record(ev, calls=2)
    assert abs(rec["g_time_s"] - 9e-6) < 1e-12
    assert rec["g_kernels"][0] == dict(name="attention", per_call=1.0, mean_us=8.0)
    # profile_decode --timeline: host launch calls, off the GPU's lines
    assert sbs_common.host_launch_counts(str(tmp_path)) == {"cuLaunchKernelEx": 2, "cuGraphLaunch": 1}

    torch_trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "ts": 5.0, "dur": 3.0, "name": "flash_fwd"},
        {"ph": "X", "cat": "gpu_memset", "ts": 1.0, "dur": 1.0, "name": "Memset"},
        {"ph": "X", "cat": "cuda_runtime", "ts": 0.0, "dur": 40.0, "name": "cudaLaunchKernel"},
    ]}
    path = tmp_path / "torch.json"
    path.write_text(json.dumps(torch_trace))
    ev = sbs_common.kineto_gpu_events(str(path))
    assert [e[2] for e in ev] == ["Memset", "flash_fwd"]
    assert abs(sbs_common.gpu_time_record(ev, calls=1)["g_time_s"] - 4e-6) < 1e-12
    assert "g_error" in sbs_common.gpu_time_record([], calls=1)
    # A dependent launch (PDL) overlaps its predecessor: covered time, not the sum of durations.
    ev = [(0.0, 10.0, "attention"), (4.0, 8.0, "combine"), (20.0, 10.0, "attention"),
          (21.0, 2.0, "combine")]
    assert abs(sbs_common.gpu_time_record(ev, calls=2)["g_time_s"] - 11e-6) < 1e-12


def test_profile_decode_modes_run_on_the_reference(tmp_path):
    """benchmarks/profile_decode.py, every mode the device scripts pass it (dense, sparse with a
    second pool, prefill, --timeline with --async_runs, --variant), end to end on the reference: a
    Python error here would otherwise first show up in a device call (device_check's abtime /
    abflags / ncu stages)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "profile_decode.py")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    for args in (["--b", "2", "--h_q", "16", "--s_k", "128"],
                 ["--sparse", "v4", "--b", "2", "--h_q", "8", "--topk", "64", "--s_k", "256",
                  "--extra_topk", "32", "--extra_page", "16",
                  "--timeline", "2", "--async_runs", "2", "--variant", "pair"],
                 ["--prefill", "512", "--s_q", "4", "--h_q", "8", "--s_k", "128", "--topk", "32",
                  "--timeline", "1"],
                 ["--prefill", "576", "--s_q", "4", "--h_q", "8", "--s_k", "128", "--topk", "32",
                  "--progression", "--value_scale", "0.1", "--sink"]):
        r = subprocess.run([sys.executable, script, *args, "--implementation", "reference",
                            "--trace_dir", str(tmp_path / "trace")],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        assert "profiled case done" in r.stdout, (args, r.stdout[-2000:])


def test_energy_per_call_in_the_clocks_table(tmp_path, capsys):
    """The clocks table's energy column: mean nvidia-smi power over each side's in-one-unit window
    times its time per call, trusted (*) only where both windows outlast the 1-s power average."""
    import sbs_common
    import side_by_side

    assert sbs_common.energy_per_call(None, 1e-4, 2.0) is None
    e = sbs_common.energy_per_call({"watts": 500.0}, 2e-4, 2.0)
    assert abs(e["mj"] - 100.0) < 1e-9 and e["trusted"]
    assert not sbs_common.energy_per_call({"watts": 500.0}, 2e-4, 0.5)["trusted"]

    t0 = 1_700_000_000.0  # samples every 50 ms: 400 W for 3 s, then 600 W for 3 s
    lines = ["timestamp, clocks.current.sm [MHz], clocks.current.memory [MHz], power.draw [W], "
             "temperature.gpu, clocks_event_reasons.active"]
    from datetime import datetime
    for i in range(120):
        t = t0 + 0.05 * i
        stamp = datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
        watts = 400.0 if i < 60 else 600.0
        lines.append(f"{stamp}, 1980 MHz, 3201 MHz, {watts:.2f} W, 50, 0x0000000000000004")
    smi = tmp_path / "smi.csv"
    smi.write_text("\n".join(lines) + "\n")

    def row(name, ours_window, fm_window):
        return {"case": {"name": name},
                "ours": {"k_window": ours_window, "k_time_s": 1e-3},
                "flashmla": {"k_window": fm_window, "k_time_s": 1e-3}}

    rows = [row("long", (t0 + 0.2, t0 + 2.8), (t0 + 3.1, t0 + 5.9)),
            row("short", (t0 + 0.2, t0 + 0.5), (t0 + 3.1, t0 + 3.4))]
    side_by_side.print_clocks(rows, str(smi))
    out = capsys.readouterr().out
    long_line = next(l for l in out.splitlines() if l.startswith("long"))
    short_line = next(l for l in out.splitlines() if l.startswith("short"))
    # ours 400 W x 1 ms = 400 mJ, FlashMLA 600 W x 1 ms = 600 mJ: 1.50, trusted
    assert "400.0" in long_line and "600.0" in long_line and long_line.rstrip().endswith("1.50*  smi")
    assert "*" not in short_line
    assert " 1.000 " in long_line  # cycles: the same time per call at the same clock
    assert "geomean over the 1 rows marked *: 1.500" in out
    assert rows[0]["ours"]["k_clocks"]["capped"] == 1.0


def test_energy_counter_in_the_clocks_table(capsys, monkeypatch):
    """With NVML's energy counter read around both windows, the table takes energy per call from
    it (trusted from ENERGY_COUNTER_MIN_S on, no nvidia-smi samples needed); where only one side
    has it, both fall back to nvidia-smi's power (here none: no energy)."""
    import sbs_common
    import side_by_side

    # time_in_one_unit: 1 + 2 x 1 units of 4 calls ran (time_rounds' first unit, then its
    # rounds), each call at 50 mJ on a fake counter that one run of the unit advances by 200 mJ
    energy = [1000.0]

    def unit():
        energy[0] += 4 * 50.0

    monkeypatch.setattr(sbs_common, "gpu_energy_counter", lambda: (lambda: energy[0]))
    rec = sbs_common.time_in_one_unit(unit, lambda _: None, 4, calls=1, rounds=2)
    assert rec["k_energy_mj"] == 50.0 and rec["k_energy_window_s"] >= 0.0
    assert rec["k_calls"] == 4 and len(rec["k_window"]) == 2
    monkeypatch.setattr(sbs_common, "gpu_energy_counter", lambda: None)
    rec = sbs_common.time_in_one_unit(unit, lambda _: None, 4, calls=1, rounds=2)
    assert "k_energy_mj" not in rec and "k_energy_window_s" not in rec

    def side(mj, window_s):
        d = {"k_window": (0.0, window_s), "k_time_s": 1e-3}
        if mj is not None:
            d.update(k_energy_mj=mj, k_energy_window_s=window_s)
        return d

    long_s = sbs_common.ENERGY_COUNTER_MIN_S + 0.1
    rows = [{"case": {"name": "counted"}, "ours": side(40.0, long_s), "flashmla": side(50.0, long_s)},
            {"case": {"name": "brief"}, "ours": side(40.0, 0.01), "flashmla": side(60.0, long_s)},
            {"case": {"name": "onesided"}, "ours": side(40.0, long_s), "flashmla": side(None, long_s)},
            # a window under the counter's 100 ms step read no step (H200, 2026-12-03 sixth
            # session: ZeroDivisionError): nvidia-smi for both (none here), no ratio
            {"case": {"name": "nostep"}, "ours": side(0.0, 0.05), "flashmla": side(60.0, long_s)}]
    side_by_side.print_clocks(rows)
    out = capsys.readouterr().out
    line = {n: next(l for l in out.splitlines() if l.startswith(n))
            for n in ("counted", "brief", "onesided", "nostep")}
    assert line["counted"].rstrip().endswith("1.25* nvml"), line["counted"]
    assert "1.50" in line["brief"] and "*" not in line["brief"]
    assert "nvml" not in line["onesided"] and "*" not in line["onesided"]
    assert "nvml" not in line["nostep"] and "*" not in line["nostep"]
    assert "geomean over the 1 rows marked *: 1.250" in out


def test_time_rounds_reports_the_host_issue_time():
    """issue_s is the host's time per call before the wait: a call that takes 2 ms to hand over
    and a wait of 10 ms per round give issue_s >= 2 ms and time_s above it by >= 10 / calls ms."""
    import time

    import sbs_common

    rec = sbs_common.time_rounds(lambda: time.sleep(0.002), lambda _: time.sleep(0.010),
                                 calls=3, rounds=2)
    assert rec["issue_s"] >= 0.002
    assert rec["time_s"] - rec["issue_s"] >= 0.010 / 3 - 1e-4
    assert rec["calls"] == 3 and rec["rounds"] == 2


def test_heat_runs_the_calls_untimed_first(monkeypatch):
    """JFM_SBS_HEAT_S: time_rounds first runs the call for that long, untimed; without it, only
    the warm call and the timed ones run. time_in_one_unit heats before its energy window."""
    import time

    import sbs_common

    n = [0]

    def call():
        n[0] += 1
        time.sleep(0.001)

    monkeypatch.delenv("JFM_SBS_HEAT_S", raising=False)
    sbs_common.time_rounds(call, lambda _: None, calls=3, rounds=2)
    assert n[0] == 1 + 3 * 2
    n[0] = 0
    monkeypatch.setenv("JFM_SBS_HEAT_S", "0.1")
    t0 = time.perf_counter()
    sbs_common.time_rounds(call, lambda _: None, calls=3, rounds=2)
    assert time.perf_counter() - t0 >= 0.1 and n[0] >= 1 + 3 * 2 + 20
    n[0] = 0
    monkeypatch.setattr(sbs_common, "gpu_energy_counter", lambda: None)
    sbs_common.time_in_one_unit(call, lambda _: None, 1, calls=3, rounds=2)
    assert n[0] >= 2 + 3 * 2 + 20


def test_dispatch_gap_variant_runs():
    """jax_dispatch_gap.py's child processes: each variant's XLA_FLAGS on top of the caller's, and
    the children's argv without the variant options (else each child would spawn its own)."""
    from jax_dispatch_gap import variant_runs
    runs = variant_runs(["--ours", "--xla-variants", "a=--x=1;b=--y=2 --z=3", "--both-cmdbuf",
                         "--k", "4"], True, "a=--x=1;b=--y=2 --z=3", "--base=0")
    assert [r[0] for r in runs] == ["command buffers as XLA's default", "command buffers off",
                                    "a: --x=1", "b: --y=2 --z=3"]
    assert [r[1] for r in runs] == ["--base=0", "--base=0 --xla_gpu_enable_command_buffer=",
                                    "--base=0 --x=1", "--base=0 --y=2 --z=3"]
    assert all(r[2] == ["--ours", "--k", "4"] for r in runs)
    # The default's run comes first even without --both-cmdbuf: a variant needs its baseline.
    assert variant_runs(["--xla-variants=a=--x=1", "--mib", "4"], False, "a=--x=1", "") == [
        ("command buffers as XLA's default", "", ["--mib", "4"]),
        ("a: --x=1", "--x=1", ["--mib", "4"])]


def test_span_us_takes_the_latest_end():
    """A run's span ends at its latest event end, which need not be its last event's."""
    import sbs_common
    ev = [(0.0, 10.0, "main"), (2.0, 3.0, "combine")]  # the later-launched one ends first
    assert sbs_common.span_us(ev) == 10.0
    assert sbs_common.span_us([(5.0, 1.0, "k"), (7.0, 2.0, "k")]) == 4.0


def test_exclusive_time_credits_shared_time_to_the_earlier_kernel():
    """A PDL-launched combine waiting inside the attention kernel's span adds only its tail; the
    per-name times sum to the covered time, gaps and a fully hidden event included."""
    import sbs_common
    ev = [(0.0, 10.0, "main"), (1.0, 11.0, "combine"), (20.0, 5.0, "gemm"), (21.0, 2.0, "hidden")]
    got = sbs_common.exclusive_us_by_name(ev)
    assert got == {"main": 10.0, "combine": 2.0, "gemm": 5.0, "hidden": 0.0}
    assert sum(got.values()) == sbs_common.covered_us(ev) == 17.0


def test_equal_runs_splits_by_count():
    """Traced runs of one unit split by event count, whatever the idle gaps between events."""
    import sbs_common
    ev = [(t, 1.0, "k") for t in (0, 1, 50, 51, 52, 53)]  # the longest gap inside run 1
    assert sbs_common.equal_runs(ev, 3) == [ev[0:2], ev[2:4], ev[4:6]]
    assert sbs_common.equal_runs(ev[:5], 3) is None and sbs_common.equal_runs([], 3) is None


def test_layer_loop_cases_run_on_the_reference(monkeypatch):
    """bench_decode.py's layer loop at the cases --loop-cases names, here on the reference (no
    GPU): one record per BxSK with its step time, and no GPU busy time where the trace has no GPU
    events (the ratio is then None, not a division by zero)."""
    import jax_flashmla
    import bench_decode

    real = jax_flashmla.mla_decode
    monkeypatch.setattr(jax_flashmla, "mla_decode",
                        lambda *a, implementation=None, **k: real(*a, implementation="reference", **k))
    loops = bench_decode.loop_cases("2x128, 1x64", layers=2)
    assert [(r["b"], r["s_k"], r["layers"]) for r in loops] == [(2, 128, 2), (1, 64, 2)]
    for r in loops:
        assert r["step_us"] > 0 and abs(r["per_layer_us"] * 2 - r["step_us"]) < 1e-6 * r["step_us"]
        assert r["gpu_kernels_per_step"] == 0 and r["step_over_busy"] is None
