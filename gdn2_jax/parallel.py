"""Where the layers call the GDN-2 op, so that a device mesh can run it per shard (the project's override).

Without this context the op follows the ambient mesh of `jax.set_mesh` by itself (`gdn2_jax/mesh.py`, where the
axis names live); `mixer_mesh` takes precedence over it.

`call_mixer_op(fn, *args, **kwargs)` is how every mixer invokes `gdn2_jax.gdn2` (or a family op). Outside a mesh it
is a plain call. Inside `with mixer_mesh(mesh):` (the training code installs it while it traces the step) the op
runs under `jax.shard_map`: each device gets its own batch rows and its own heads, and the op (a Pallas kernel or
the chunk path) runs on that shard alone, never gathered onto one device. The recurrence never mixes batch rows or
heads, so the per-shard results are exactly the unsharded ones.

Axis placement, by argument rank (the op API's layout):
  `[B, T, H, K]` / `[B, T, HV, V]` (q, k, v, g, b, w): batch on `batch_axes`, heads on `head_axis`;
  `[B, T, H]` (the scalar gates of `kda`, `gated_delta_rule`, `delta_rule`): the same;
  keyword `initial_state [B, HV, K, V]`: batch and heads; `A_log [H]`, `dt_bias [H * K]`: heads;
  `cu_seqlens`: replicated (packed sequences have B = 1, so the batch is not split then).
A dimension that the mesh axes do not divide stays unsplit on those axes (replicated): e.g. 18 heads on a tensor
axis of 4 run whole on every device of the tensor group, which is correct, only not parallel over heads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec as P

from gdn2_jax.mesh import BATCH_AXES, CONTEXT_AXIS, HEAD_AXIS


@dataclasses.dataclass(frozen=True)
class MixerMesh:
  """The mesh the mixer op is split over: batch rows over `batch_axes`, heads over `head_axis`, the sequence over
  `context_axis` (`gdn2_jax.ops.context`)."""

  mesh: Mesh
  batch_axes: tuple[str, ...] = BATCH_AXES
  head_axis: Optional[str] = HEAD_AXIS
  context_axis: Optional[str] = None


_CURRENT: list[MixerMesh] = []


@contextlib.contextmanager
def mixer_mesh(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES, head_axis: Optional[str] = HEAD_AXIS,
               context_axis: Optional[str] = CONTEXT_AXIS):
  """Within this context, `call_mixer_op` runs the op per shard of `mesh` (use while tracing the jitted step).

  Axis names missing from the mesh are ignored, so a mesh with only a "data" axis works too. The context is read
  while tracing, and jax caches traces by function identity: trace a function inside the context that was not
  already traced outside it (the training code builds its step function fresh for each mesh).
  """
  names = set(mesh.axis_names)
  ctx = MixerMesh(mesh, tuple(a for a in batch_axes if a in names), head_axis if head_axis in names else None,
                  context_axis if context_axis in names else None)
  _CURRENT.append(ctx)
  try:
    yield ctx
  finally:
    _CURRENT.pop()


def current_mixer_mesh() -> Optional[MixerMesh]:
  """The innermost installed `MixerMesh`, or None."""
  return _CURRENT[-1] if _CURRENT else None


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def _fit(mesh: Mesh, axes, size: int):
  """`axes` if they divide `size` (and split anything), else None (replicated)."""
  if not axes:
    return None
  n = _axis_size(mesh, axes)
  if n == 1 or size % n:
    return None
  return axes if isinstance(axes, str) or len(axes) > 1 else axes[0]


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _activate_outside(args, kwargs):
  from gdn2_jax.ops import common
  kwargs = dict(kwargs)
  A_log, dt_bias = kwargs.pop("A_log"), kwargs.pop("dt_bias", None)
  lower_bound = kwargs.pop("lower_bound", None)
  g = args[3]
  if g.ndim == 4:  # gdn2 / kda: [B, T, H, K]
    g = common.activate_log_decay(g, A_log, dt_bias, lower_bound)
  else:  # gated_delta_rule: [B, T, H], dt_bias [H]
    dt = None if dt_bias is None else dt_bias.reshape(-1, 1)
    g = common.activate_log_decay(g[..., None], A_log, dt, lower_bound)[..., 0]
  return args[:3] + (g,) + args[4:], kwargs


def call_mixer_op(fn, *args, **kwargs):
  """Calls `fn(*args, **kwargs)` (a GDN-2 family op), per shard when a mixer mesh is installed.

  Args:
    fn: the op, e.g. `gdn2_jax.gdn2`; returns `(o [B, T, HV, V], final_state [B, HV, K, V] or None)`.
    *args: its array inputs, `[B, T, H, K]`-like (rank 4) or `[B, T, H]` (rank 3).
    **kwargs: its keyword arguments; arrays among them are placed as listed in the module docstring, everything
      else is passed through unchanged.
  Returns:
    what `fn` returns, with the same global shapes as an unsharded call.
  """
  ctx = current_mixer_mesh()
  if ctx is None:
    return fn(*args, **kwargs)
  mesh = ctx.mesh
  if ctx.context_axis is not None and mesh.shape[ctx.context_axis] > 1:  # the sequence is split too
    from gdn2_jax.ops import context
    return context.call_split(fn, *args, mesh=mesh, batch_axes=ctx.batch_axes, head_axis=ctx.head_axis,
                              context_axis=ctx.context_axis, **kwargs)
  for i, a in enumerate(args):
    if not _is_array(a) or a.ndim not in (3, 4):
      raise ValueError(f"call_mixer_op: positional argument {i} has shape {getattr(a, 'shape', type(a))}; expected "
                       f"arrays [B, T, H, K] or [B, T, H] (pass options as keywords).")
  B = args[0].shape[0]
  packed = kwargs.get("cu_seqlens") is not None
  batch = None if packed else _fit(mesh, ctx.batch_axes, B)
  # Heads split only if every head count (H of q/k, HV of v/w) divides: grouped value heads stay aligned because
  # value head j belongs to query head j // (HV // H), a contiguous block per shard.
  head_counts = {a.shape[2] for a in args}
  for name in ("A_log",):
    if _is_array(kwargs.get(name)):
      head_counts.add(kwargs[name].shape[0])
  head = ctx.head_axis
  if head is not None and any(_fit(mesh, head, h) is None for h in head_counts):
    head = None
  if head is not None and _axis_size(mesh, head) == 1:
    head = None
  if batch is None and head is None:
    return fn(*args, **kwargs)
  if _is_array(kwargs.get("A_log")) and len(args) >= 5:
    # Activate the decay here, outside the per-shard call: `A_log`/`dt_bias` are shared by all batch shards, so
    # inside they would need a psum of their gradients over the batch axes (shard_map without replication
    # checking, which the op's internal scans need, does not add it). The op computes the very same expression.
    args, kwargs = _activate_outside(args, kwargs)

  arg_specs = tuple(P(batch, None, head, None) if a.ndim == 4 else P(batch, None, head) for a in args)
  array_kw, static_kw = {}, {}
  for name, value in kwargs.items():
    (array_kw if _is_array(value) else static_kw)[name] = value
  kw_specs = {}
  for name, value in array_kw.items():
    if name == "initial_state":
      kw_specs[name] = P(batch, head, None, None)
    elif name in ("A_log", "dt_bias") and value.ndim == 1:
      kw_specs[name] = P(head)
    else:
      kw_specs[name] = P()
  want_state = bool(static_kw.get("output_final_state", False))
  out_specs = (P(batch, None, head, None), P(batch, head, None, None)) if want_state else P(batch, None, head, None)

  def per_shard(args, array_kw):
    o, final = fn(*args, **array_kw, **static_kw)
    return (o, final) if want_state else o

  # check_vma=False: the op's scans start from unvarying zeros. Safe here because every differentiable input is
  # split along every axis its result varies over, or replicated where all devices compute the same values.
  ambient = jax.sharding.get_abstract_mesh()
  if not ambient.empty and ambient.shape == mesh.shape:
    mesh = ambient  # under `jax.set_mesh` (or `auto_axes` inside it) shard_map must use the context's axis types
  out = jax.shard_map(per_shard, mesh=mesh, in_specs=(arg_specs, kw_specs), out_specs=out_specs,
                      check_vma=False)(args, array_kw)
  return out if want_state else (out, None)
