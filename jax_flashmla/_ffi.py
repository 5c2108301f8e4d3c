"""Loads the compiled CUDA extension, registers its XLA FFI targets and reports capabilities.

Nothing here runs at import time of ``jax_flashmla``: the extension is loaded on first use, so a
CPU-only install imports cleanly and says why the kernels are missing only where it matters.
"""
from __future__ import annotations

import functools
import importlib

import jax

from jax_flashmla.ops.kernels import limits

_MODULE_NAME = "jax_flashmla._jax_flashmla_cuda"
BUILT_FOR = "9.0"   # CMakeLists.txt builds sm_90a machine code only (wgmma, setmaxnreg)


@functools.cache
def _load() -> tuple[object | None, str]:
    """(module, "") when the extension loads and its targets are registered, else (None, why)."""
    try:
        module = importlib.import_module(_MODULE_NAME)
    except ImportError as e:
        return None, (f"the CUDA extension is not built ({e}); reinstall on a machine with nvcc "
                      "(pip install --no-build-isolation .) to get the kernels")
    drift = {k: (v, module.constants().get(k)) for k, v in limits.ALL.items()
             if module.constants().get(k) != v}
    if drift:
        return None, (f"the built CUDA extension disagrees with jax_flashmla/ops/kernels/limits.py "
                      f"on {drift} (python value, extension value): rebuild it from this source")
    for name, capsule in module.ffi_targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    return module, ""


def extension():
    """The loaded extension module, or None (see ``kernels_available`` for why)."""
    return _load()[0]


def registered_targets() -> tuple[str, ...]:
    module = extension()
    return tuple(module.ffi_targets()) if module is not None else ()


def _gpu_reason(device) -> str:
    if device.platform != "gpu":
        return f"device {device} is not a GPU"
    cc = getattr(device, "compute_capability", None)
    if cc is None or not str(cc).startswith(BUILT_FOR):
        return (f"{device.device_kind} has compute capability {cc}; the kernels are built for "
                f"{BUILT_FOR} only (sm_90a: Hopper)")
    return ""


def kernels_available(device=None) -> tuple[bool, str]:
    """Whether the CUDA kernels can run on ``device`` (default: jax's default device).

    Returns (True, "") or (False, a sentence saying why not).
    """
    _, why = _load()
    if why:
        return False, why
    device = device if device is not None else jax.devices()[0]
    why = _gpu_reason(device)
    return (not why), why


def num_sms(device=None) -> int | None:
    """The streaming multiprocessor count of ``device`` (None off GPUs)."""
    device = device if device is not None else jax.devices()[0]
    return getattr(device, "core_count", None) if device.platform == "gpu" else None
