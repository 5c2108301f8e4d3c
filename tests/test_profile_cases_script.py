"""benchmarks/profile_cases.py, the device A/B's timing driver (scripts/device_check.sh
time_builds): one long-lived process per build runs every case, in the interleaved order of the
old one-process-per-case loop; a failing, hanging or variant case is reported and does not stop
the rest. Runs on the CPU through the reference implementation (no GPU events there)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "profile_cases.py")
CASE = "--implementation reference --b 2 --s_k 128 --h_q 8"


def drive(tmp_path, cases, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, SCRIPT, "drive", "--stage", "t", "--out", str(tmp_path),
                        "--cases", ";".join(cases), *extra, f"a={ROOT}", f"b={ROOT}"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    return r.returncode, r.stdout.splitlines()


def test_interleaved_cases_and_a_failing_one(tmp_path):
    rc, out = drive(tmp_path, [CASE, CASE + " --bogus", CASE + " --variant ws"])
    heads = [line for line in out if line.startswith("--- ")]
    assert heads == [f"--- {side}: {c}" for c in (CASE, CASE + " --bogus", CASE + " --variant ws")
                     for side in "ab"]
    assert rc == 1  # the bogus case failed on both sides
    errors = [line for line in out if line.startswith("!!! ")]
    assert errors == [f"!!! {side}: {CASE} --bogus: error (the log holds its output)" for side in "ab"]
    for side in "ab":
        log = (tmp_path / f"t_{side}.log").read_text()
        # Every case's output, the good ones to their end, the bad one's argparse error.
        assert log.count("profiled case done") == 2
        assert "unrecognized arguments: --bogus" in log
        assert log.count(f"--- {CASE}\n") == 1


def test_a_hanging_case_times_out(tmp_path):
    # 0.5 s: not even jax's import finishes; the server is killed and the next case restarts it.
    rc, out = drive(tmp_path, [CASE], "--timeout", "0.5")
    assert rc == 1
    assert [line for line in out if line.startswith("!!! ")] == [
        f"!!! {side}: {CASE}: timeout (the log holds its output)" for side in "ab"]
