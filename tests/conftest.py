import os
import sys
import zlib

# On a GPU the suite's processes share one device: the tests that run the examples start more
# of them, so no process may take 75% of the memory up front (XLA's default).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The suite checks float32 math against float64 oracles; on GPUs XLA's default float32 matmul is
# TF32 (10-bit mantissa). The ops' own references pass HIGHEST themselves; this covers the models.
jax.config.update("jax_default_matmul_precision", "highest")

sys.path.insert(0, os.path.dirname(__file__))   # tests import the oracle as a plain module


@pytest.fixture
def kernels_on(monkeypatch):
    """The CUDA kernels reported available (a Hopper GPU with 132 SMs and the extension) without
    loading anything: for cross-lowering the ops' CUDA paths on this CPU machine."""
    from jax_flashmla import _ffi
    monkeypatch.setattr(_ffi, "kernels_available", lambda device=None: (True, ""))
    monkeypatch.setattr(_ffi, "extension", lambda: None)
    monkeypatch.setattr(_ffi, "num_sms", lambda device=None: 132)


@pytest.fixture
def rng(request):
    """A fresh, reproducible generator per test, seeded by the test's name (crc32: Python's str
    hash differs from process to process, so it gave every run different inputs)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def assert_close(actual, expected, *, rel=1e-2, what="out"):
    """Relative L2 error under ``rel``; NaN never passes; +-inf must match exactly."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert not np.isnan(actual).any(), f"{what}: NaN in result"
    inf = np.isinf(expected)
    np.testing.assert_array_equal(actual[inf], expected[inf], err_msg=f"{what}: infinities differ")
    a, e = actual[~inf], expected[~inf]
    err = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel}"
