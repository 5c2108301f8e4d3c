"""The sharding rules on 8 fake CPU devices (docs/SHARDING.md).

XLA reads ``--xla_force_host_platform_device_count`` once, when jax's CPU backend starts, and
other test modules start it first in a shared pytest process. So this module runs the cases
(tests/sharding_cases.py, not collected on its own) in a fresh interpreter with the flag set,
and reports their outcome as one test. Run the cases directly, test by test, with:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/sharding_cases.py
"""
from __future__ import annotations

import os
import subprocess
import sys

FLAG = "--xla_force_host_platform_device_count=8"
HERE = os.path.dirname(os.path.abspath(__file__))


def test_sharding_cases_on_8_cpu_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FLAG}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           os.path.join(HERE, "sharding_cases.py")]
    r = subprocess.run(cmd, env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True,
                       timeout=900)
    report = (r.stdout + r.stderr)[-12000:]
    print(report)
    assert r.returncode == 0, f"sharding cases failed (rc {r.returncode}):\n{report}"
    assert " passed" in r.stdout, report
