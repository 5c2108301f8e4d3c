"""Checked mode: opt-in runtime validation of the values no shape rule can check.

Lengths, page ids and indices are runtime values. Every path gives malformed ones one defined
meaning (SEMANTICS.md, "Paged KV cache"; docs/CHECKS.md): a length is clamped to
[0, max_blocks * block_size], a page id outside [0, num_blocks) inside the length drops that page's
tokens, an index outside the pool is skipped, a topk_length is clamped to [0, topk]. That keeps a
serving loop safe, but it also hides a cache-management bug behind plausible numbers. Checked mode
names such values instead::

    import jax_flashmla as jfm
    from jax.experimental import checkify

    jfm.enable_checks()                       # or: with jfm.checks_enabled(): ...
    err, (out, lse) = checkify.checkify(jax.jit(step))(q, cache, table, lens)
    err.throw()   # mla_decode: block_table: batch row 1, block 0 (tokens 0..63 of its length 80)
                  # has page id 99, outside [0, num_blocks=8); its tokens are dropped

The switch is a JAX configuration option (``jax_flashmla_checks``, also settable with
``jax.config.update`` or the environment variable ``JAX_FLASHMLA_CHECKS=1``) read when an op is
*traced*; it is part of jit's cache key, so flipping it re-traces. When on, each op adds
``jax.experimental.checkify.check`` calls before its primitive; ``checkify.checkify`` turns them
into an error value (outside jit, a failed check raises at once). When off (the default), the
functions here return before touching a tracer: the traced program is exactly what it is without
this module.

Each message names the op, the argument, the first offending batch row (for sparse prefill: query
row) and the value, and says what the op does with it.
"""
from __future__ import annotations

import contextlib
import os
import threading

import jax
import jax.numpy as jnp
from jax.experimental import checkify

_OPTION = "jax_flashmla_checks"
_HELP = ("jax_flashmla checked mode: the ops add checkify checks naming malformed lengths, page "
         "ids, indices, topk_length and non-finite q (see jax_flashmla.checks).")


def _env_default() -> bool:
    return os.environ.get(_OPTION.upper(), "").strip().lower() in ("1", "true", "yes", "on")


try:
    # A real JAX option, so that it joins the trace context (jit's cache key): a function jitted
    # with checks off is re-traced when they are turned on, not silently reused.
    from jax._src import config as _jax_config

    _STATE = _jax_config.bool_state(_OPTION, _env_default(), _HELP,
                                    include_in_trace_context=True)

    def _get() -> bool:
        return bool(_STATE.value)

    def _set(enabled: bool) -> None:
        jax.config.update(_OPTION, enabled)

    def _scoped(enabled: bool):
        return _STATE(enabled)
except Exception:  # pragma: no cover  (a JAX without this private hook: a plain flag)
    _STATE = None
    _GLOBAL = [_env_default()]
    _LOCAL = threading.local()

    def _get() -> bool:
        stack = getattr(_LOCAL, "stack", None)
        return stack[-1] if stack else _GLOBAL[0]

    def _set(enabled: bool) -> None:
        _GLOBAL[0] = enabled

    @contextlib.contextmanager
    def _scoped(enabled: bool):
        stack = _LOCAL.__dict__.setdefault("stack", [])
        stack.append(enabled)
        try:
            yield
        finally:
            stack.pop()


def enable_checks(enabled: bool = True) -> None:
    """Turn checked mode on (or off) globally, from now on (for functions traced from now on)."""
    _set(bool(enabled))


def checks_enabled(enabled: bool = True):
    """A context manager turning checked mode on (or off) for what is traced inside it::

        with jax_flashmla.checks_enabled():
            err, out = checkify.checkify(step)(...)
    """
    return _scoped(bool(enabled))


def is_enabled() -> bool:
    """Whether ops traced now add their checks."""
    return _get()


# ---------------------------------------------------------------------------------------------
# The checks. Each takes the op's operands (already validated for shape and dtype) and adds
# nothing at all when checked mode is off.

def _first(bad):
    """Where the first bad entry (row-major order) of a bool array is: (any bad, its multi-index
    as int32 scalars, a mask true there only). Reductions and comparisons only, no reshape and no
    gather, so that it also traces on arrays typed on a mesh with Explicit axes."""
    at = bad
    where = []
    for axis in range(bad.ndim):
        others = tuple(a for a in range(bad.ndim) if a != axis)
        along = jnp.any(at, axis=others) if others else at
        i = jnp.argmax(along).astype(jnp.int32)
        where.append(i)
        at = at & (jax.lax.broadcasted_iota(jnp.int32, bad.shape, axis) == i)
    return jnp.any(bad), tuple(where), at


def _check(bad, message: str, values):
    """checkify.check that no entry of ``bad`` is true. ``values(where, value_at)`` gives the
    message's values: ``where`` is the first bad entry's multi-index and ``value_at(x)`` the value
    there of an array x broadcastable to bad's shape."""
    any_bad, where, at = _first(bad)

    def value_at(x):
        return jnp.sum(jnp.where(at, x, jnp.zeros((), x.dtype)))   # exactly one term when any bad

    checkify.check(~any_bad, message, *values(where, value_at))


def _finite_q(op: str, q, row: str) -> None:
    q32 = q.astype(jnp.float32)
    fmt = ", ".join(["{}"] * q.ndim)
    _check(~jnp.isfinite(q32), f"{op}: q: {row} {{}} has a non-finite value {{}} at q[{fmt}]; a "
           "query holding one gives NaN", lambda w, value_at: (w[0], value_at(q32), *w))


def _lengths(op: str, name: str, lengths, limit: int, limit_text: str, row: str) -> None:
    _check(lengths < 0, f"{op}: {name}: {row} {{}} is {{}}, negative; it counts as 0",
           lambda w, value_at: (w[0], value_at(lengths)))
    _check(lengths > limit, f"{op}: {name}: {row} {{}} is {{}}, beyond {limit_text} = {limit}; it "
           f"counts as {limit}", lambda w, value_at: (w[0], value_at(lengths)))


def _indices(op: str, name: str, indices, rows: int, rows_text: str, counted, axes: str) -> None:
    """Entries that count (``counted``) must be -1 (none) or name a row in [0, rows)."""
    bad = counted & ((indices < -1) | (indices >= rows))
    _check(bad, f"{op}: {name}: {axes} is {{}}, outside [0, {rows_text} = {rows}) and not -1 "
           "(none); it is skipped", lambda w, value_at: (*w, value_at(indices)))


def _counted(indices, topk_length):
    """Which entries of indices [rows, x, topk] count: the first clamp(topk_length, 0, topk)."""
    if topk_length is None:
        return jnp.ones(indices.shape, bool)
    pos = jax.lax.broadcasted_iota(jnp.int32, indices.shape, indices.ndim - 1)
    return pos < topk_length[:, None, None]


def check_mla_decode(operands: dict) -> None:
    """The checks of ``mla_decode`` (dense or sparse); ``operands`` maps names to arrays."""
    if not is_enabled():
        return
    op = "mla_decode"
    q, cache = operands["q"], operands["kv_cache"]
    _finite_q(op, q, "batch row")
    if "indices" not in operands:
        table, lengths = operands["block_table"], operands["cache_seqlens"]
        num_blocks, block_size = cache.shape[0], cache.shape[1]
        max_blocks = table.shape[1]
        capacity = max_blocks * block_size
        _lengths(op, "cache_seqlens", lengths, capacity,
                 f"the block table's capacity max_blocks * block_size = {max_blocks} * {block_size}",
                 "batch row")
        clamped = jnp.clip(lengths, 0, capacity)
        first_token = jax.lax.broadcasted_iota(jnp.int32, table.shape, 1) * block_size
        inside = first_token < clamped[:, None]                                   # [b, max_blocks]
        bad = inside & ((table < 0) | (table >= num_blocks))
        _check(bad, f"{op}: block_table: batch row {{}}, block {{}} (tokens {{}}..{{}} of its length "
               f"{{}}) has page id {{}}, outside [0, num_blocks = {num_blocks}); its tokens are "
               "dropped", lambda w, value_at: (
                   w[0], w[1], w[1] * block_size,
                   jnp.minimum((w[1] + 1) * block_size, value_at(clamped[:, None])) - 1,
                   value_at(clamped[:, None]), value_at(table)))
        return
    for pool, idx_name, len_name in (("kv_cache", "indices", "topk_length"),
                                     ("extra_kv_cache", "extra_indices", "extra_topk_length")):
        if idx_name not in operands:
            continue
        indices, topk_length = operands[idx_name], operands.get(len_name)
        topk = indices.shape[-1]
        if topk_length is not None:
            _lengths(op, len_name, topk_length, topk, f"{idx_name}' topk", "batch row")
        rows = operands[pool].shape[0] * operands[pool].shape[1]
        _indices(op, idx_name, indices, rows, f"{pool}'s num_blocks * block_size",
                 _counted(indices, topk_length), "batch row {}, query {}, entry {}")


def check_sparse_mla_prefill(operands: dict) -> None:
    """The checks of ``sparse_mla_prefill``; ``operands`` maps names to arrays."""
    if not is_enabled():
        return
    op = "sparse_mla_prefill"
    q, kv, indices = operands["q"], operands["kv"], operands["indices"]
    topk_length = operands.get("topk_length")
    _finite_q(op, q, "query row")
    if topk_length is not None:
        _lengths(op, "topk_length", topk_length, indices.shape[-1], "indices' topk", "query row")
    _indices(op, "indices", indices, kv.shape[0], "s_kv", _counted(indices, topk_length),
             "query row {}, kv head {}, entry {}")
