"""CPU tests of the device scripts' shared prologue (scripts/device_common.sh), with a stand-in
nvidia-smi on PATH: REQUIRE_GPU stops a call that got another card before anything is built."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_prologue(tmp_path, card, require):
    """Source device_common.sh (no stages) with nvidia-smi answering `card`; its stdout and rc."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{card}'\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "OUT": str(tmp_path / "out"), "STAGES": " "}
    if require is not None:
        env["REQUIRE_GPU"] = require
    else:
        env.pop("REQUIRE_GPU", None)
    r = subprocess.run(["bash", "-c", "source scripts/device_common.sh; echo REACHED"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    return r.stdout, r.returncode


def test_require_gpu_stops_on_another_card(tmp_path):
    out, rc = run_prologue(tmp_path, "NVIDIA H100 80GB HBM3", "H200")
    assert rc == 0
    assert "does not match REQUIRE_GPU=H200" in out
    assert "REACHED" not in out


def test_require_gpu_passes_the_named_card_and_is_off_by_default(tmp_path):
    out, rc = run_prologue(tmp_path, "NVIDIA H200", "H200")
    assert rc == 0 and "REACHED" in out and "does not match" not in out
    out, rc = run_prologue(tmp_path, "NVIDIA H100 80GB HBM3", None)
    assert rc == 0 and "REACHED" in out
