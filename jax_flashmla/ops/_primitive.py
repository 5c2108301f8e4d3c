"""What every jax_flashmla primitive shares: registration, lowering selection (kernel or reference,
with one clear warning on fallback), partitioning under a sharded jit (through ops/_sharding.py),
the vmap fallback, and the refusal to differentiate.

An op module states only what is specific to it: its abstract eval, its reference (from
jax_flashmla.reference), its kernels (an ordered tuple of modules from ops/kernels/, each with
``NAME``, ``unsupported_reason(config, avals_in)`` and ``lower(ctx, *operands, config)``: the first
that covers a call runs it), its batching rule and its dimension layout for sharding.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jax_flashmla import _ffi
from jax_flashmla.ops import _sharding

IMPLEMENTATIONS = (None, "kernel", "reference")
NOT_MAPPED = None   # a batching rule's dim for an operand vmap does not map


class KernelFallbackWarning(UserWarning):
    """A call ran on the pure-JAX reference because no CUDA kernel covers it."""


def check_implementation(op_name: str, implementation) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{op_name}: implementation: expected None (automatic), 'kernel' or 'reference'; "
                         f"got {implementation!r}")


def fail(op_name: str, arg: str, expected: str, got):
    """The one shape of a bad-input error: which op, which argument, expected, actual."""
    raise ValueError(f"{op_name}: {arg}: expected {expected}, got {got}")


def check_head_dim_v(op_name: str, head_dim_v, d_qk: int) -> int:
    head_dim_v = int(head_dim_v)
    if not 0 < head_dim_v <= d_qk:
        fail(op_name, "head_dim_v", f"1 <= head_dim_v <= d_qk = {d_qk}", head_dim_v)
    return head_dim_v


def resolve_softmax_scale(op_name: str, softmax_scale, d_qk: int) -> float:
    """None -> d_qk ** -0.5; otherwise a static, finite, positive Python float."""
    if softmax_scale is None:
        return d_qk ** -0.5
    try:
        softmax_scale = float(softmax_scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        fail(op_name, "softmax_scale", "a Python float (a static value)",
             type(softmax_scale).__name__)
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        fail(op_name, "softmax_scale", "a finite positive number", softmax_scale)
    return softmax_scale


@functools.cache
def _warn_once(op: str, reason: str) -> None:
    warnings.warn(f"jax_flashmla.{op}: running the pure-JAX reference because {reason}. Pass "
                  "implementation='reference' to silence this, or implementation='kernel' to make "
                  "it an error.", KernelFallbackWarning, stacklevel=2)


def choose_kernel(kernels, config, avals_in):
    """(the first kernel that covers this call, None) or (None, why none does)."""
    if not kernels:
        return None, "no CUDA kernel implements this op yet"
    ok, why = _ffi.kernels_available()
    if not ok:
        return None, why
    reasons = []
    for kernel in kernels:
        reason = kernel.unsupported_reason(config, avals_in)
        if reason is None:
            return kernel, None
        reasons.append(f"the {kernel.NAME} kernel does not cover this call: {reason}")
    return None, "; ".join(reasons)


def define_primitive(name: str, *, abstract_eval: Callable, reference: Callable,
                     batching_rule: Callable, sharding: _sharding.OpLayout | None = None,
                     kernels: tuple = (), op_name: str | None = None) -> Primitive:
    """A multiple-result primitive whose params are one ``config`` (a frozen dataclass with an
    ``implementation`` field and a ``present`` tuple of the operand names bound).
    ``reference(*operands, config=...)`` is its CPU lowering and the fallback of its CUDA
    lowering; ``kernels`` are tried in order (ops/kernels/).

    Without ``sharding`` (the scheduler: tiny, replicated under a sharded jit) one primitive is
    made and returned. With it (ops/_sharding.py's dimension layout) two primitives are made, and
    the *outer* one is returned, the one the public function binds (through ``bind``):
      * inner (``<name>_shard``, ``outer.inner``): single-device; lowered to the reference or the
        FFI kernel; what each shard runs;
      * outer: same abstract eval; lowered through ``custom_partitioning`` (Shardy rule + GSPMD
        callbacks, ops/_sharding.py) whose per-shard body binds the inner one. Outside a mesh,
        and inside ``shard_map``, that lowering is just the inner one. vmap and the refusal to
        differentiate live on the outer primitive (custom_partitioning has neither).
    """
    op_name = op_name or name
    typed_abstract_eval = _sharding.typed_abstract_eval(abstract_eval)
    inner = Primitive(f"{name}_shard")
    inner.multiple_results = True
    inner.def_abstract_eval(typed_abstract_eval)
    inner.def_impl(functools.partial(jax._src.dispatch.apply_primitive, inner))
    reference_lowering = mlir.lower_fun(reference, multiple_results=True)

    def cpu_lowering(ctx, *operands, config):
        if config.implementation == "kernel":
            raise ValueError(f"jax_flashmla.{op_name}: implementation='kernel' needs a Hopper GPU "
                             f"with the CUDA extension; this lowering is for platform CPU")
        return reference_lowering(ctx, *operands, config=config)

    def cuda_lowering(ctx, *operands, config):
        if config.implementation == "reference":
            return reference_lowering(ctx, *operands, config=config)
        kernel, reason = choose_kernel(kernels, config, ctx.avals_in)
        if kernel is not None:
            return kernel.lower(ctx, *operands, config=config)
        if config.implementation == "kernel":
            raise ValueError(f"jax_flashmla.{op_name}: implementation='kernel' but {reason}")
        _warn_once(op_name, reason)
        return reference_lowering(ctx, *operands, config=config)

    mlir.register_lowering(inner, cpu_lowering)              # every platform without its own rule
    mlir.register_lowering(inner, cuda_lowering, platform="cuda")

    def no_differentiation(primals, tangents, **params):
        raise NotImplementedError(
            f"jax_flashmla.{op_name} is inference-only and has no derivative: it is not "
            "differentiable with jax.grad / jax.jvp. Apply jax.lax.stop_gradient to its inputs, or "
            "use jax_flashmla.reference for a differentiable version.")

    ad.primitive_jvps[inner] = no_differentiation
    if sharding is None:
        batching.primitive_batchers[inner] = batching_rule
        return inner

    def drop_operands(config, names):
        return dataclasses.replace(config, present=tuple(n for n in config.present
                                                         if n not in names))

    partitioned = _sharding.partitioned(sharding, inner.bind, lambda config: config.present,
                                        drop_operands)
    outer = Primitive(name)
    outer.multiple_results = True
    outer.def_abstract_eval(typed_abstract_eval)
    outer.def_impl(functools.partial(jax._src.dispatch.apply_primitive, outer))

    def outer_lowering(ctx, *operands, config):
        return mlir.lower_fun(functools.partial(partitioned, config),
                              multiple_results=True)(ctx, *operands)

    def outer_cuda_lowering(ctx, *operands, config):
        # The shards' kernels are lowered inside XLA's partitioning callback: load the extension
        # (registering its FFI targets) now, before compilation starts, not from in there.
        if config.implementation != "reference":
            _ffi.extension()
        return outer_lowering(ctx, *operands, config=config)

    mlir.register_lowering(outer, outer_lowering)
    mlir.register_lowering(outer, outer_cuda_lowering, platform="cuda")
    # custom_partitioning needs the device assignment while lowering (DESIGN.md, toolchain facts).
    jax._src.dispatch.prim_requires_devices_during_lowering.add(outer)
    batching.primitive_batchers[outer] = batching_rule
    # A vmap outside the shard_map of an Explicit-mesh call (``bind``) reaches the inner one; the
    # rule binds the outer primitive, which inside that shard_map lowers to the inner one.
    batching.primitive_batchers[inner] = batching_rule
    ad.primitive_jvps[outer] = no_differentiation
    outer.inner = inner
    outer.partitioned = partitioned
    return outer


def bind(prim: Primitive, *operands, config):
    """``prim.bind``, except for operands typed on a mesh with Explicit axes: there the outer
    primitive's partitioning runs at trace time as a ``shard_map`` (``on_explicit_mesh`` in
    ops/_sharding.py), since custom_partitioning does not support Explicit axes."""
    partitioned = getattr(prim, "partitioned", None)
    mesh = _sharding.explicit_mesh([jax.typeof(x) for x in operands])
    if partitioned is None or mesh is None:
        return prim.bind(*operands, config=config)
    return partitioned.on_explicit_mesh(config, mesh, *operands)


def map_batching(prim: Primitive, args, dims, **params):
    """The vmap fallback: loop over the mapped axis with lax.map (used only where an op cannot
    fold the mapped axis into its own batch axis)."""
    mapped = [i for i, d in enumerate(dims) if d is not NOT_MAPPED]
    xs = [jax.numpy.moveaxis(args[i], dims[i], 0) for i in mapped]

    def one(x_slices):
        full = list(args)
        for i, x in zip(mapped, x_slices):
            full[i] = x
        return tuple(prim.bind(*full, **params))

    outs = jax.lax.map(one, xs)
    return list(outs), [0] * len(outs)


def fold_batch(x, dim, size: int):
    """Move a vmapped axis to the front (broadcasting an unmapped operand) and merge it into the
    next axis: [..V.., n, ...] -> [V * n, ...]."""
    if dim is NOT_MAPPED:
        x = jax.numpy.broadcast_to(x, (size, *x.shape))
    else:
        x = jax.numpy.moveaxis(x, dim, 0)
    return x.reshape(size * x.shape[1], *x.shape[2:])


def unfold_batch(x, size: int):
    """[V * n, ...] -> [V, n, ...]."""
    return x.reshape(size, x.shape[0] // size, *x.shape[1:])


def mapped_size(args, dims) -> int:
    return next(a.shape[d] for a, d in zip(args, dims) if d is not NOT_MAPPED)


def offset_rows(indices, valid_rows: int, offsets):
    """Shift flat row indices into a stacked pool: valid ones (0 <= i < valid_rows) by ``offsets``
    (broadcast over the leading vmapped axis), invalid ones to -1."""
    shape = (-1,) + (1,) * (indices.ndim - 1)
    valid = (indices >= 0) & (indices < valid_rows)
    return jax.numpy.where(valid, indices + offsets.reshape(shape), -1)
