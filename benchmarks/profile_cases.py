"""Kernel-time A/B of several builds over many profile_decode.py cases, one process per build.

scripts/device_check.sh's abflags / abtime / vartime stages time every TIMELINE_CASES case on each
build with `profile_decode.py --timeline 10`. One process per case and build took ~21 s each on
the device (jax's GPU start and the profiler's first trace, not measured apart): a 7-case A/B of
three builds took ~450 s of a 30-minute session. With one process per build the same 7 cases on
two builds took 60 s (H100, 2026-12-07). Here
each build gets one long-lived process (`serve`) that runs the cases it is sent, and `drive` sends
them case by case, build by build (the same interleaved order as before, so slow drift of the
card's clocks falls on every build alike), with the same per-case timeout.

  python3 profile_cases.py drive --stage abflags --out $OUT --cases "A;B" this= cand=/tmp/x/site

Each side is name=PYTHONPATH (empty: the installed package). Its full output goes to
<out>/<stage>_<name>.log; the summary lines (spans, per-kernel times) to stdout, as the shell
loop printed them. A side named var:<v> runs JFM_KERNEL_VARIANT=<v>; a case with --variant runs
in a fresh process (the extension reads the variant once per process).
"""
import argparse
import gc
import os
import queue
import runpy
import shlex
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
DONE = "### profile_cases: case done"


def serve(trace_dir: str) -> None:
    """Reads one case (profile_decode.py arguments) per stdin line; runs it in this process;
    prints DONE and ok / error after each, whatever happened."""
    import jax
    script = os.path.join(HERE, "profile_decode.py")
    for i, line in enumerate(sys.stdin):
        argv = shlex.split(line)
        if not argv:
            continue
        sys.argv = [script, *argv, "--trace_dir", f"{trace_dir}_{i}"]
        status = "ok"
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:  # argparse's errors
            print(f"profile_decode.py exited with {e.code}")
            status = "ok" if e.code in (0, None) else "error"
        except Exception:  # noqa: BLE001 - report and go on with the next case
            traceback.print_exc(file=sys.stdout)
            status = "error"
        jax.clear_caches()
        gc.collect()  # the case's arrays, before the next case allocates its own
        print(f"{DONE} {status}", flush=True)


class Side:
    """One build's server process and the lines it printed."""

    def __init__(self, name: str, pythonpath: str, n_sides: int):
        self.name, self.pythonpath, self.n_sides = name, pythonpath, n_sides
        self.proc = None
        self.lines: queue.Queue = queue.Queue()

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = self.pythonpath
        # Each server preallocates its share of jax's usual 75% of the card, so the idle ones
        # leave the running one room (the BFC allocator, as in one process per case).
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.75 / self.n_sides:.3f}")
        if self.name.startswith("var:"):
            env["JFM_KERNEL_VARIANT"] = self.name[4:]
        trace_dir = f"/tmp/jfm_timeline_{self.name.replace(':', '_')}_{os.getpid()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(__file__), "serve", "--trace_dir", trace_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env, bufsize=1)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()

    @staticmethod
    def _read(proc, lines) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # the process ended

    def run(self, case: str, timeout_s: float) -> tuple[list[str], str]:
        """Runs one case: (its output lines, "ok" | "error" | "timeout" | "died")."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(case + "\n")
        self.proc.stdin.flush()
        out, deadline = [], time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.stop()  # a hung case: the next one gets a fresh process
                return out, "timeout"
            if line is None:
                self.proc = None
                return out, "died"
            if line.startswith(DONE):
                return out, line[len(DONE):].strip()
            out.append(line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def summary(line: str) -> bool:
    """The lines the shell loop printed (its grep -E " x |span")."""
    return " x " in line or "span" in line


def drive(stage: str, out_dir: str, cases: list[str], sides: list[tuple[str, str]],
          timeout_s: float, timeline: int) -> int:
    servers = [Side(name, pp, len(sides)) for name, pp in sides]
    failed = 0
    try:
        for case in cases:
            # --variant sets JFM_KERNEL_VARIANT, which the extension reads once per process:
            # such a case runs in a fresh process, and the next case gets another.
            fresh = "--variant" in shlex.split(case)
            for s in servers:
                print(f"--- {s.name}: {case}", flush=True)
                if fresh:
                    s.stop()
                lines, status = s.run(f"{case} --timeline {timeline}", timeout_s)
                if fresh:
                    s.stop()
                with open(os.path.join(out_dir, f"{stage}_{s.name.replace(':', '_')}.log"), "a") as f:
                    f.write(f"--- {case}\n")
                    f.writelines(lines)
                for line in lines:
                    if summary(line):
                        print(line.rstrip("\n")[:150])
                if status != "ok":
                    failed += 1
                    print(f"!!! {s.name}: {case}: {status} (the log holds its output)")
                    for line in lines[-5:]:
                        print("    " + line.rstrip("\n")[:150])
                sys.stdout.flush()
    finally:
        for s in servers:
            s.stop()
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve", help="run the cases read from stdin (one per line)")
    sv.add_argument("--trace_dir", required=True)
    dr = sub.add_parser("drive", help="time every case on every side")
    dr.add_argument("--stage", required=True, help="the log files' prefix")
    dr.add_argument("--out", required=True, help="where the logs go")
    dr.add_argument("--cases", required=True, help="profile_decode.py arguments, ';' separated")
    dr.add_argument("--timeout", type=float, default=120, help="seconds per case and side")
    dr.add_argument("--timeline", type=int, default=10, help="calls per traced run")
    dr.add_argument("sides", nargs="+", help="name=PYTHONPATH (empty: the installed package)")
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.trace_dir)
        return 0
    sides = []
    for s in a.sides:
        name, sep, pp = s.partition("=")
        if not sep or not name:
            ap.error(f"side {s!r}: expected name=PYTHONPATH")
        sides.append((name, pp))
    cases = [c.strip() for c in a.cases.split(";") if c.strip()]
    return 1 if drive(a.stage, a.out, cases, sides, a.timeout, a.timeline) else 0


if __name__ == "__main__":
    sys.exit(main())
