"""The README's examples run (small sizes, reference path on CPU) and print what they promise."""
import os
import subprocess
import sys

import pytest

import jax_flashmla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    # The subprocess imports the same jax_flashmla as this test (installed, or the source tree).
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(jax_flashmla.__file__)))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=package_parent)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_quickstart():
    out = _run("quickstart.py", "--batch", "3", "--seqlen", "200", "--iters", "2")
    assert "attention: " in out and "ms per call" in out and "(3, 1, 16, 512)" in out


def test_export_decode_example(tmp_path):
    pytest.importorskip("flatbuffers")
    out = _run("export_decode.py", "--batch", "3", "--seqlen", "150", "--out",
               str(tmp_path / "step.jax"))
    assert "exported for ('cuda', 'cpu')" in out and "equal to the jitted step: True" in out, out


@pytest.mark.parametrize("flags", [[], ["--sparse"]], ids=["v3_bf16", "v32_sparse_fp8"])
def test_deepseek_decode_example(flags, tmp_path):
    out = _run("deepseek_decode.py", "--layers", "2", "--hidden", "128", "--experts", "4",
               "--batch", "2", "--max-new-tokens", "4", "--profile", str(tmp_path), *flags)
    assert "attention:" in out and "tokens/s" in out, out
    traces = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert traces, "--profile wrote no trace"


def test_deepseek_decode_example_v4(tmp_path):
    out = _run("deepseek_decode.py", "--model", "v4", "--layers", "3", "--hidden", "64", "--heads", "8",
               "--experts", "4", "--batch", "2", "--prompt-len", "20", "--max-new-tokens", "3", "--block-size",
               "16", "--profile", str(tmp_path))
    assert "DeepSeek-V4-shaped" in out and "attention:" in out and "tokens/s" in out, out
    assert any(files for _, _, files in os.walk(tmp_path)), "--profile wrote no trace"
