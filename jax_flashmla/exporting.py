"""``jax.export`` for functions that call jax_flashmla ops: serialize a jitted decode step (or a
whole model step) once, load and run it elsewhere without the Python that built it.

Two things differ from plain ``jax.export.export`` / ``jax.export.deserialize``:
  * the CUDA lowering of an op is an XLA FFI custom call (``FFI_TARGETS``), and jax refuses to
    serialize custom calls it does not know unless told to (``export_safety_checks()``). Those
    targets come with no compatibility guarantee across jax_flashmla versions: run an artifact
    with the jax_flashmla it was exported with (re-export after upgrading);
  * the extension registers its targets with XLA on first use (``_ffi``), so ``deserialize``
    loads it before the artifact is compiled.

What the CUDA lowering holds is decided when exporting, as for ``jax.jit``: the kernels where the
exporting process could run them (a Hopper GPU with the extension built), else the pure-JAX
reference with the usual ``KernelFallbackWarning`` (``implementation="kernel"`` makes that an
error). The split-KV schedule's part count is part of the program: pass ``metadata`` made with
``get_mla_metadata(..., num_sms=...)`` of the GPU that will run it, or export on that GPU.
Under a sharded ``jit`` the ops partition through ``custom_partitioning``, whose Python callbacks
cannot be serialized: export a function that calls them inside ``jax.shard_map`` instead.
"""
from __future__ import annotations

import jax
from jax import export as jax_export

from jax_flashmla import _ffi
from jax_flashmla.ops.kernels import dense_decode, scheduler, sparse_decode, sparse_prefill

# Every FFI target a CUDA lowering may emit (csrc/ffi/handlers.h is the C++ side's list).
FFI_TARGETS = (scheduler.TARGET, dense_decode.TARGET, sparse_decode.TARGET, sparse_prefill.TARGET)


def export_safety_checks() -> list:
    """The ``disabled_checks`` that let ``jax.export.export`` serialize jax_flashmla's custom calls."""
    return [jax_export.DisabledSafetyCheck.custom_call(name) for name in FFI_TARGETS]


def export(fun, *, platforms=None, disabled_checks=(), **kwargs):
    """``jax.export.export(fun, ...)`` with ``export_safety_checks()`` added; use it as that:
    ``exported = export(jax.jit(step), platforms=("cuda", "cpu"))(*args)``, then
    ``exported.serialize()``."""
    inner = jax_export.export(fun, platforms=platforms,
                              disabled_checks=[*export_safety_checks(), *disabled_checks], **kwargs)

    def trace_and_export(*args, **kw):
        try:
            return inner(*args, **kw)
        except NotImplementedError as e:
            if "host_callbacks" not in str(e):
                raise
            raise ValueError(
                "jax_flashmla.export: the function has Python host callbacks, which jax cannot "
                "serialize. jax_flashmla ops under a sharded jit partition through "
                "custom_partitioning, whose callbacks are such: to export a sharded step, call "
                "them inside jax.shard_map (each device runs its shard), or give the arguments "
                "shardings on a mesh with Explicit axes (jax.make_mesh's default), where they "
                "partition at trace time.") from e

    return trace_and_export


def deserialize(blob: bytes | bytearray):
    """``jax.export.deserialize(blob)``, after loading the CUDA extension where it is built, so the
    artifact's custom calls resolve when it is compiled for a GPU. On a GPU backend without the
    extension, an artifact that calls the kernels is refused here, saying why (XLA would fail
    later, at compile time, naming only an unregistered custom call)."""
    module, why = _ffi._load()
    exported = jax_export.deserialize(blob)
    if module is None and jax.default_backend() == "gpu":
        text = exported.mlir_module()
        called = [name for name in FFI_TARGETS if f"@{name}(" in text]
        if called:
            raise RuntimeError(f"jax_flashmla.deserialize: the artifact calls the CUDA kernels "
                               f"({', '.join(called)}) but {why}")
    return exported
