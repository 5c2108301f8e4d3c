"""Multi-process sharded decode on CPU: examples/multihost_decode.py under 2 and 4 processes on
localhost, joined by jax.distributed (a coordinator on a free local port, gloo CPU collectives),
each process with its own fake CPU devices (docs/SHARDING.md, "Several processes (hosts)").

Every process makes only its share of q, the pools, block tables and lengths, the sharded step
runs over the mesh of all processes' devices, and each process checks the shards it holds against
the same step on one device over the whole inputs, and the compiled step for collectives. Here we
check that every process exited 0 and reported that, for each layout. The processes run in their
own session and are killed (the whole group) on a timeout or failure, so the test never hangs.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import jax_flashmla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "multihost_decode.py")
TIMEOUT_S = 150   # the whole launch; a run takes ~10-25 s on 2 shared cores


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n_proc: int, devices_per_proc: int, args: list[str]) -> list[str]:
    """Run the example as ``n_proc`` processes of ``devices_per_proc`` CPU devices each; return
    each process's output. Fails the test (after killing them all) on a timeout or a non-zero
    exit."""
    port = free_port()
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(jax_flashmla.__file__)))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=package_parent, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc}",
               JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
    procs = []
    try:
        for pid in range(n_proc):
            cmd = [sys.executable, EXAMPLE, "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", str(n_proc), "--process-id", str(pid), *args]
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_S
        outputs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(procs)
                pytest.fail(f"{n_proc} processes: not done after {TIMEOUT_S} s\n"
                            + _report(procs, outputs))
            outputs.append(out)
            if p.returncode != 0:
                _kill(procs)
                pytest.fail(f"process {len(outputs) - 1} of {n_proc} exited {p.returncode}\n"
                            + _report(procs, outputs))
        return outputs
    finally:
        _kill(procs)


def _kill(procs):
    """Kill the process group of each child still running (ours: each started its own session)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _report(procs, outputs) -> str:
    lines = []
    for i, out in enumerate(outputs):
        lines.append(f"--- process {i} (rc {procs[i].returncode}):\n{out[-4000:]}")
    for p in procs[len(outputs):]:
        rest = p.stdout.read() if p.stdout and p.poll() is not None else ""
        lines.append(f"--- process {procs.index(p)} (rc {p.returncode}):\n{rest[-4000:]}")
    return "\n".join(lines)


SMALL = ["--batch", "8", "--heads", "16", "--seqlen", "100", "--iters", "1"]


@pytest.mark.parametrize("n_proc,devices,layouts", [
    (2, 4, ["data", "data-replicated", "heads", "hybrid"]),   # (8, 1), (8, 1), (1, 8), (2, 4)
    (4, 2, ["data", "heads"]),                                # (8, 1), (1, 8)
], ids=["2proc_x4", "4proc_x2"])
def test_multiprocess_sharded_decode(n_proc, devices, layouts):
    args = SMALL + [a for layout in layouts for a in ("--layout", layout)]
    if n_proc == 4:
        args += ["--s-q", "2"]                      # causal multi-token decode (MTP) too
    outputs = launch(n_proc, devices, args)
    total = n_proc * devices
    for pid, out in enumerate(outputs):
        tag = f"[process {pid}/{n_proc}]"
        assert f"{tag} jax " in out and f"{devices} local / {total} global cpu devices" in out, out
        for layout in layouts:
            line = next((ln for ln in out.splitlines()
                         if ln.startswith(f"{tag} layout {layout} ")), None)
            assert line is not None, out
            assert f"over {n_proc} processes" in line, line
            # Every shard this process holds equals the single-process run, and the compiled
            # step has no collective at all (none on q or the KV cache in particular).
            assert f"{devices} local shards match the single-process run" in line, line
            assert "collectives: none" in line, line
        assert out.rstrip().endswith(f"{tag} passed"), out
