"""Mesh axis names, and the op's per-shard call under the ambient mesh (`jax.set_mesh`).

One place for the axis names: `train/sharding.py` builds its mesh from `MESH_AXES`, `gdn2_jax/parallel.py`
(`mixer_mesh`) and the ambient-mesh code below default to `BATCH_AXES` and `HEAD_AXIS`.

Under `jax.set_mesh(mesh)` the op (`gdn2` and the family that calls it) runs its backend under `jax.shard_map`, one
call per shard of batch rows and heads. The recurrence never mixes rows or heads, so the per-shard results equal the
unsharded ones, and no input is gathered onto one device. Which axes split what:

  Explicit axes (`jax.make_mesh`'s default): the inputs' own shardings decide. The batch dimension of `q` keeps its
    axes, its head dimension its axes; every other input is resharded to match (a no-op when it already does), and
    a split time or channel dimension is gathered first (the recurrence needs whole sequences and whole heads).
    Inputs replicated over the mesh still go through shard_map (unsplit), so backends never see explicit shardings.
  Auto axes: the shardings are not visible while tracing, so the configured names decide: batch rows over
    `batch_axes` and heads over `head_axis` (see `axis_names`), each only where it divides the dimension (and every
    head count of the call). Where nothing splits, the op is a plain call.
  Manual axes (already inside a `shard_map`) are left alone.

`gdn2_jax.parallel.mixer_mesh` overrides all of this (the op then runs per shard of the given mesh, and the ambient
call inside sees only manual axes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
from jax.sharding import AxisType, PartitionSpec as P

Array = jax.Array

# The mesh of the training code: data replicas, FSDP (ZeRO-3), context (the sequence), tensor (heads, MLP width).
# Tensor innermost, context next: both communicate inside every layer.
DATA_AXIS, FSDP_AXIS, TENSOR_AXIS = "data", "fsdp", "tensor"
CONTEXT_AXIS = "context"  # one long sequence split over this (`gdn2_jax.ops.context`)
MESH_AXES = (DATA_AXIS, FSDP_AXIS, CONTEXT_AXIS, TENSOR_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # batch rows split over these
HEAD_AXIS = TENSOR_AXIS  # heads split over this


@dataclasses.dataclass(frozen=True)
class AxisNames:
  """Mesh axes the op splits over when the mesh's axes are Auto: batch rows over `batch`, heads over `head`."""

  batch: tuple[str, ...] = BATCH_AXES
  head: Optional[str] = HEAD_AXIS


_AXES: list[AxisNames] = [AxisNames()]


@contextlib.contextmanager
def axis_names(batch: Sequence[str] = BATCH_AXES, head: Optional[str] = HEAD_AXIS):
  """Within this context the op splits batch rows over `batch` and heads over `head` (Auto-axis meshes).

  E.g. `with gdn2_jax.mesh.axis_names(batch=("dp",), head="tp"):` for a mesh with axes ("dp", "tp"). Read while
  tracing, like `jax.set_mesh`.
  """
  if isinstance(batch, str):
    batch = (batch,)
  _AXES.append(AxisNames(tuple(batch), head))
  try:
    yield _AXES[-1]
  finally:
    _AXES.pop()


def current_axis_names() -> AxisNames:
  return _AXES[-1]


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """How one call is split: batch rows over `batch` (a mesh-axis entry of a PartitionSpec), heads over `head`."""

  batch: object
  head: object
  explicit: bool  # inputs carry explicit shardings (reshard them to the plan's specs)
  axes: frozenset  # the mesh axes shard_map takes over


def _entry_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _as_entry(axes: Sequence[str]):
  axes = tuple(axes)
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _size(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def plan(q: Array, *, batch_size: int, head_counts: Sequence[int], split_batch: bool = True) -> Optional[ShardPlan]:
  """The split of a call with `q [B, T, H, K]` under the ambient mesh, or None for a plain call.

  Args:
    q: the queries (their sharding decides under explicit axes).
    batch_size: B (the states' leading N when that is not B: pass `split_batch=False`).
    head_counts: every head count of the call (H, HV, ...); heads split only where the axes divide all of them.
    split_batch: False for packed sequences (B = 1 with several states).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  free = [a for a in mesh.axis_names if types[a] != AxisType.Manual]
  if not free:
    return None
  explicit = any(types[a] == AxisType.Explicit for a in free)
  if explicit:
    spec = tuple(jax.typeof(q).sharding.spec) + (None,) * 4
    batch = [a for a in _entry_axes(spec[0]) if a in free]
    head = [a for a in _entry_axes(spec[2]) if a in free]
  else:
    names = current_axis_names()
    batch = [a for a in names.batch if a in free and mesh.shape[a] > 1]
    head = [names.head] if names.head in free and mesh.shape[names.head] > 1 else []
  if not split_batch or (batch and batch_size % _size(mesh, batch)):
    batch = []
  if head and any(h % _size(mesh, head) for h in head_counts):
    head = []
  if not explicit and not batch and not head:
    return None
  return ShardPlan(_as_entry(batch), _as_entry(head), explicit, frozenset(free))


def _place(x: Optional[Array], spec: P, explicit: bool) -> Optional[Array]:
  if x is None or not explicit:
    return x
  have = tuple(jax.typeof(x).sharding.spec)
  have = have + (None,) * (len(spec) - len(have))
  return x if have == tuple(spec) else jax.sharding.reshard(x, spec)


def run_per_shard(fn: Callable, p: ShardPlan, q, k, v, g, b, w, *, initial_state: Optional[Array],
                  cu_seqlens: Optional[Array], want_state: bool, **static) -> tuple[Array, Optional[Array]]:
  """Runs the backend `fn(q, k, v, g, b, w, initial_state=, cu_seqlens=, **static)` once per shard of `p`.

  Canonical inputs: `q, k, g, b [B, T, H, K]`, `v, w [B, T, HV, V]`, `initial_state [N, HV, K, V]` or None,
  `cu_seqlens [N + 1]` or None. Returns `(o [B, T, HV, V], final [N, HV, K, V] or None)` with global shapes.
  """
  tok = P(p.batch, None, p.head, None)
  state = P(p.batch, p.head, None, None)
  arrays = [_place(x, tok, p.explicit) for x in (q, k, v, g, b, w)]
  specs = [tok] * 6
  opt = {}
  if initial_state is not None:
    opt["initial_state"] = (_place(initial_state, state, p.explicit), state)
  if cu_seqlens is not None:
    opt["cu_seqlens"] = (_place(cu_seqlens, P(None), p.explicit), P(None))
  opt_arrays = {n: a for n, (a, _) in opt.items()}
  opt_specs = {n: s for n, (_, s) in opt.items()}

  def per_shard(arrays, opt_arrays):
    kw = {"initial_state": None, "cu_seqlens": None, **opt_arrays}
    o, final = fn(*arrays, **kw, **static)
    return (o, final) if want_state else o

  out_specs = (tok, state) if want_state else tok
  # check_vma=False: the backends' scans start from unvarying zeros. Safe: every input is split along every axis
  # its results vary over, and replicated where all devices compute the same values.
  out = jax.shard_map(per_shard, in_specs=(specs, opt_specs), out_specs=out_specs, axis_names=set(p.axes),
                      check_vma=False)(arrays, opt_arrays)
  return out if want_state else (out, None)


def splits_sequence() -> bool:
  """Whether the ambient mesh has a `CONTEXT_AXIS` of size > 1 not already manual: `gdn2` then splits T over it."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or CONTEXT_AXIS not in mesh.axis_names or mesh.shape[CONTEXT_AXIS] == 1:
    return False
  return dict(zip(mesh.axis_names, mesh.axis_types))[CONTEXT_AXIS] != AxisType.Manual


def explicit_axes() -> tuple[str, ...]:
  """The ambient mesh's Explicit axes (empty outside `jax.set_mesh`, or with Auto axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  return tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)


def as_auto_axes(fn: Callable, *args, rows_like: Array, out_rank: int):
  """`fn(*args)` with the ambient mesh's Explicit axes turned Auto, for code that relies on XLA's sharding
  propagation (a model whose parameters carry the placement) called under an explicit-axes mesh.

  The result (an array of rank `out_rank`, `[B, ...]`) is split on its first dimension as `rows_like` (`[B, ...]`) is,
  and replicated on the others.
  """
  spec = tuple(jax.typeof(rows_like).sharding.spec)
  out = P(spec[0] if spec else None, *([None] * (out_rank - 1)))
  return jax.sharding.auto_axes(fn, axes=explicit_axes(), out_sharding=out)(*args)
