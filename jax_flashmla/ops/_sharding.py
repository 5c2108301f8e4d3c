"""How jax_flashmla's ops partition under a sharded ``jax.jit`` (docs/SHARDING.md is the user guide).

Each op states, in an ``OpLayout``, what every dimension of every operand and result *is*, one
letter-word per dimension:

  ``b``   the split axis: decode's batch, sparse prefill's query tokens. Shardable.
  ``H``   query heads (and everything indexed by them: out's and lse's head axes, attn_sink).
          Shardable. Query head h reads KV head h // g (g = h_q / h_kv); where safe, Shardy sees
          the heads as the compound factor ``(k g)`` (see ``sdy_rule``).
  ``k``   KV heads (the caches' head axis, prefill indices' head axis): shards with ``H`` when
          h_kv > 1, stays whole (replicated) when h_kv = 1.
  ``n0``, ``n1``  page-pool rows (axis 0 of kv_cache / extra_kv_cache): a pool is either
          replicated, or sharded over the *same mesh axes as the batch*, each shard's block table /
          indices then naming rows of its own local pool (see ``OpLayout.local_pools``).
  ``r``   prefill's kv rows: always replicated (any sharding is gathered first).
  anything else: must be replicated (head dims, pages' token axis, s_q, topk, the schedule).

From that table this module builds, per call (the ops bind a variable subset of operands):
  * the Shardy sharding rule (``sharding_rule``),
  * the GSPMD callbacks (``infer_sharding_from_operands`` / ``partition``),
and both reduce to one decision, ``_decide``: read the mesh axes of the batch and head axes from
q's sharding, drop the ones the kernel cannot use (indivisible sizes, a head split the KV heads
cannot follow), and give every operand and result the matching sharding. The SPMD partitioner
reshards whatever arrives differently -- visibly, in the compiled HLO (docs/SHARDING.md lists
which reshards can appear). The per-shard body binds the single-device primitive on the local
blocks; when the batch or heads are split, the caller's split-KV schedule (which describes the
whole batch and head count) is dropped there and each shard computes its own.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
from jax.experimental.custom_partitioning import (ArrayMapping, CompoundFactor, SdyShardingRule,
                                                  custom_partitioning)
from jax.sharding import NamedSharding, PartitionSpec

SPLIT, HEADS, KV_HEADS = "b", "H", "k"
_GROUP = "g"   # the head-group factor inside the compound (k g)


@dataclasses.dataclass(frozen=True)
class OpLayout:
    """The dimension roles of one op (see the module doc for the letters)."""
    op_name: str
    operands: Mapping[str, tuple[str, ...]]   # operand name -> one role per dimension
    results: tuple[tuple[str, ...], ...]
    local_pools: tuple[str, ...] = ()         # roles of pool rows that may share the batch's axes
    schedule: tuple[str, ...] = ()            # operands dropped from a shard's call once split


DECODE = OpLayout(
    op_name="mla_decode",
    operands={
        "q": ("b", "s", "H", "d"),
        "kv_cache": ("n0", "p0", "k", "c0"),
        "block_table": ("b", "m"),
        "cache_seqlens": ("b",),
        "indices": ("b", "s", "t0"),
        "topk_length": ("b",),
        "attn_sink": ("H",),
        "extra_kv_cache": ("n1", "p1", "k", "c1"),
        "extra_indices": ("b", "s", "t1"),
        "extra_topk_length": ("b",),
        "tile_scheduler_metadata": ("w0", "w1"),
        "num_splits": ("w2",),
    },
    results=(("b", "s", "H", "v"), ("b", "H", "s")),
    local_pools=("n0", "n1"),
    schedule=("tile_scheduler_metadata", "num_splits"),
)

SPARSE_PREFILL = OpLayout(
    op_name="sparse_mla_prefill",
    operands={
        "q": ("b", "H", "d"),
        "kv": ("r", "k", "d"),
        "indices": ("b", "k", "t"),
        "attn_sink": ("H",),
        "topk_length": ("b",),
    },
    results=(("b", "H", "v"), ("b", "H"), ("b", "H")),
)


# ---------------------------------------------------------------------------------------------
# Shardy: the sharding rule.

def sdy_rule(layout: OpLayout, present, operand_shapes, result_shapes,
             mesh_size: int = 1) -> SdyShardingRule:
    """The Shardy rule for one call. ``present``: the operand names bound, in order; shapes are
    the global shapes; ``mesh_size``: the number of devices. Every factor but the split axis, the
    heads and the local pools' rows needs replication."""
    dims = [layout.operands[name] for name in present]
    q_dims = dims[0]
    h_q = operand_shapes[0][q_dims.index(HEADS)]
    h_kv = _kv_heads(dims, operand_shapes)
    group = h_q // h_kv

    # The query heads are (KV head, group), the compound factor (k g), so that Shardy moves the
    # KV heads with their query heads, only where that is safe: Shardy refuses a size-1 factor in
    # a compound (h_kv = 1: the heads are their own factor g, the caches' unit head axis another),
    # and when a mesh axis does not divide h_kv it splits it into sub-axes between k and g, a
    # sharding jax 0.10 cannot hand to the partition callback (KeyError in
    # parse_flatten_op_sharding). There the heads are their own factor g too, the KV heads k
    # independent: the partition callback still shards both together (_decide), slicing a
    # replicated cache locally.
    if group == 1:
        heads = KV_HEADS
    elif h_kv > 1 and h_kv % mesh_size == 0:
        heads = CompoundFactor(KV_HEADS, _GROUP)
    else:
        heads = _GROUP

    operands = tuple(ArrayMapping(*(heads if r == HEADS else r for r in roles)) for roles in dims)
    results = tuple(ArrayMapping(*(heads if r == HEADS else r for r in roles))
                    for roles in layout.results)
    free = {SPLIT, _GROUP, *layout.local_pools} | ({KV_HEADS} if h_kv > 1 or group == 1 else set())
    # Factors in order of first appearance: Shardy wants the special-factor list sorted by index.
    factors = dict.fromkeys(f for m in (*operands, *results) for dim in m
                            for f in (dim if isinstance(dim, CompoundFactor) else (dim,)))
    return SdyShardingRule(operands, results,
                           need_replication_factors=tuple(f for f in factors if f not in free),
                           **({_GROUP: group} if isinstance(heads, CompoundFactor) else {}))


def _kv_heads(dims, shapes) -> int:
    for roles, shape in zip(dims, shapes):
        if KV_HEADS in roles:
            return shape[roles.index(KV_HEADS)]
    return 1


# ---------------------------------------------------------------------------------------------
# The decision shared by both partitioners.

def _axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec_of(arg, ndim, mesh) -> list[tuple[str, ...]]:
    """Per dimension, the mesh axes an operand arrives sharded on. Shardings jax cannot name
    with whole mesh axes (Shardy can split an axis into sub-axes across a reshape, e.g. 2 heads
    over a 4-device axis), and those inside a partly manual shard_map, read as replicated: the
    call then gathers that operand instead of failing to compile (or worse)."""
    sharding = getattr(arg, "sharding", None)
    spec = None
    if isinstance(sharding, NamedSharding):
        spec = sharding.spec
    elif sharding is not None and mesh is not None and not mesh.empty:
        try:
            from jax._src.sharding_impls import parse_flatten_op_sharding
            hlo = sharding._to_xla_hlo_sharding(ndim)
            # Inside a shard_map manual over some axes, the shardings here tile the devices of
            # one manual group only: naming them with the whole mesh's axes would be wrong.
            if hlo.is_tiled() and len(hlo.tile_assignment_devices()) != mesh.size:
                return [()] * ndim
            spec = parse_flatten_op_sharding(hlo, mesh)[0]
        except Exception:   # unnameable (sub-axes), or jax moved the private helper
            spec = None
    if spec is None:
        return [()] * ndim
    spec = list(spec) + [None] * (ndim - len(spec))
    return [_axes(e) for e in spec[:ndim]]


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _longest_prefix(axes, ok) -> tuple[str, ...]:
    for n in range(len(axes), -1, -1):
        if ok(axes[:n]):
            return tuple(axes[:n])
    return ()


@dataclasses.dataclass(frozen=True)
class Decision:
    """Mesh axes per role, and what that means for each operand and result."""
    axes: Mapping[str, tuple[str, ...]]       # role -> mesh axes (absent: replicated)
    operand_specs: tuple[PartitionSpec, ...]
    result_specs: tuple[PartitionSpec, ...]
    split: bool                               # batch or heads divided across devices


def _decide(layout: OpLayout, present, mesh, arg_shapes) -> Decision:
    dims = [layout.operands[name] for name in present]
    shapes = [tuple(a.shape) for a in arg_shapes]
    specs = [_spec_of(a, len(s), mesh) for a, s in zip(arg_shapes, shapes)]
    q_roles, q_shape, q_spec = dims[0], shapes[0], specs[0]
    n_split, h_q = q_shape[q_roles.index(SPLIT)], q_shape[q_roles.index(HEADS)]
    h_kv = _kv_heads(dims, shapes)

    split_axes = q_spec[q_roles.index(SPLIT)]
    head_axes = q_spec[q_roles.index(HEADS)]

    # Page pools sharded on their rows: the local-pool convention. Their axes lead the batch's.
    pool_axes = {}
    for roles, shape, spec, name in zip(dims, shapes, specs, present):
        row_role = roles[0]
        if row_role in layout.local_pools and spec[0]:
            pool_axes[name] = (spec[0], shape[0])
    lead = ()
    if pool_axes:
        lead = next(iter(pool_axes.values()))[0]
        for name, (axes, rows) in pool_axes.items():
            if axes != lead:
                raise ValueError(
                    f"jax_flashmla.{layout.op_name}: the page pools are sharded on different mesh "
                    f"axes ({ {n: a for n, (a, _) in pool_axes.items()} }); a pool is either "
                    "replicated or sharded on its rows over the same mesh axes as the batch "
                    "(docs/SHARDING.md)")
            if rows % _size(mesh, axes):
                raise ValueError(
                    f"jax_flashmla.{layout.op_name}: {name} has {rows} blocks, not divisible by "
                    f"the {_size(mesh, axes)} shards of mesh axes {axes} it is sharded on")
        if n_split % _size(mesh, lead):
            raise ValueError(
                f"jax_flashmla.{layout.op_name}: the page pool is sharded over mesh axes {lead} "
                f"(local block ids per shard), so the batch must split over them too, but "
                f"batch {n_split} is not divisible by {_size(mesh, lead)}")
        if split_axes[:len(lead)] != lead:
            split_axes = lead
    split_axes = lead + _longest_prefix(split_axes[len(lead):],
                                        lambda a: n_split % _size(mesh, lead + a) == 0)

    head_axes = tuple(a for a in head_axes if a not in split_axes)
    head_axes = _longest_prefix(
        head_axes, lambda a: h_q % _size(mesh, a) == 0
        and (h_kv == 1 or h_kv % _size(mesh, a) == 0))

    axes = {SPLIT: split_axes, HEADS: head_axes,
            KV_HEADS: head_axes if h_kv > 1 else ()}
    for name, (a, _) in pool_axes.items():
        axes[layout.operands[name][0]] = a

    split = bool(split_axes or head_axes)

    def spec(roles):
        return PartitionSpec(*((axes.get(r) or None) for r in roles))

    def operand_spec(name, roles, incoming):
        if split and name in layout.schedule:
            # Not read by a split call (see shard_body): left as it comes, never gathered.
            return PartitionSpec(*(a or None for a in incoming))
        return spec(roles)

    return Decision(axes=axes,
                    operand_specs=tuple(operand_spec(n, r, sp)
                                        for n, r, sp in zip(present, dims, specs)),
                    result_specs=tuple(spec(r) for r in layout.results),
                    split=split)


def typed_abstract_eval(abstract_eval: Callable) -> Callable:
    """``abstract_eval`` whose results also carry what jax's typed sharding tracks inside
    ``shard_map``: the union of the operands' varying manual axes (vma). (Operands typed on a mesh
    with Explicit axes never reach it: ``_primitive.bind`` runs those calls under a shard_map.)"""

    def rule(*avals, config):
        outs = abstract_eval(*avals, config=config)
        vma = frozenset().union(*(getattr(a, "vma", None) or frozenset() for a in avals))
        if vma:
            outs = tuple(o.update(vma=vma) for o in outs)
        return outs

    return rule


def explicit_mesh(avals):
    """The abstract mesh of the operands' typed shardings when it has Explicit axes, else None."""
    for a in avals:
        sharding = getattr(a, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and not mesh.empty and getattr(mesh, "_any_axis_explicit", False):
            return mesh
    return None


def _ir_shape(t) -> tuple[int, ...]:
    from jax._src.lib.mlir import ir
    return tuple(ir.RankedTensorType(t).shape)


# ---------------------------------------------------------------------------------------------
# The custom_partitioning function behind an op's outer primitive.

def partitioned(layout: OpLayout, bind_inner: Callable, present_of: Callable,
                drop_operands: Callable) -> custom_partitioning:
    """A ``custom_partitioning`` function ``f(config, *operands)`` (config static) whose per-shard
    body is ``bind_inner(*operands, config=config)``.

    ``present_of(config)`` gives the operand names bound; ``drop_operands(config, names)`` returns
    the config of a call without ``names`` (the split-KV schedule once the batch or heads split).
    """

    def body(config, *operands):
        return tuple(bind_inner(*operands, config=config))

    fn = custom_partitioning(body, static_argnums=(0,))

    def shard_body(config, decision):
        present = present_of(config)
        dropped = [n for n in layout.schedule if n in present] if decision.split else []
        if not dropped:
            return lambda *ops: tuple(bind_inner(*ops, config=config))
        keep = [i for i, n in enumerate(present) if n not in dropped]
        shard_config = drop_operands(config, dropped)
        return lambda *ops: tuple(bind_inner(*(ops[i] for i in keep), config=shard_config))

    def partition(config, mesh, arg_shapes, result_shape):
        decision = _decide(layout, present_of(config), mesh, arg_shapes)
        return (mesh, shard_body(config, decision),
                tuple(NamedSharding(mesh, s) for s in decision.result_specs),
                tuple(NamedSharding(mesh, s) for s in decision.operand_specs))

    def infer_sharding_from_operands(config, mesh, arg_shapes, result_shape):
        decision = _decide(layout, present_of(config), mesh, arg_shapes)
        return tuple(NamedSharding(mesh, s) for s in decision.result_specs)

    def sharding_rule(config, mesh, operand_types, result_types):
        return sdy_rule(layout, present_of(config), [_ir_shape(t) for t in operand_types],
                        [_ir_shape(t) for t in result_types], mesh_size=mesh.size)

    # decode_shardings=False: the callbacks get the operands' shardings undecoded and name their
    # mesh axes themselves (_spec_of), so a sharding jax cannot decode is gathered, not fatal.
    fn.def_partition(partition=partition,
                     infer_sharding_from_operands=infer_sharding_from_operands,
                     sharding_rule=sharding_rule, decode_shardings=False)

    def on_explicit_mesh(config, mesh, *operands):
        """The same partitioning done at trace time, for operands typed on a mesh with Explicit
        axes: the one decision, the operands resharded to it (as the partitioner would), and
        the per-shard body under ``jax.shard_map``. custom_partitioning is built for Auto axes:
        its callbacks see an Explicit mesh as Auto (jax issue 34811), and on jax 0.11.2 a body
        traced there keeps an unpartitioned ``Sharding`` custom call, which fails at run time."""
        decision = _decide(layout, present_of(config), mesh, [jax.typeof(x) for x in operands])
        free = frozenset(a for a, kind in zip(mesh.axis_names, mesh.axis_types)
                         if kind != jax.sharding.AxisType.Manual)
        operands = [jax.sharding.reshard(x, NamedSharding(mesh, spec))
                    for x, spec in zip(operands, decision.operand_specs)]
        return jax.shard_map(shard_body(config, decision), mesh=mesh, axis_names=free,
                             in_specs=decision.operand_specs,
                             out_specs=decision.result_specs)(*operands)

    fn.on_explicit_mesh = on_explicit_mesh
    return fn
