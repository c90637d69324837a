"""The device mesh ("data", "fsdp", "context", "tensor") and the logical-axis rules that place parameters and
batches on it.

Model parameters name their axes with logical names (`nnx.with_partitioning`): "vocab", "embed", "mlp", "heads",
"conv", "kv" or None. `LOGICAL_RULES` maps each to a mesh axis:

  vocab -> tensor   embedding rows / LM-head columns split over the tensor axis
  embed -> fsdp     the model width: FSDP shards every weight on it (ZeRO-3 style, gathered per layer by XLA)
  mlp   -> tensor   SwiGLU hidden width (Megatron-style column/row split)
  heads -> tensor   GDN-2 / attention heads (and the matching projection columns)
  conv, kv -> None  short-conv taps and per-head channel dims stay whole

A parameter dimension that its mesh axis does not divide is replicated on that axis (never padded): e.g. the hybrid
model's 18 SWA heads on a tensor axis of 4 keep the SWA projections whole on every tensor device, while the 16
GDN-2 heads split 4 ways. `place_report` lists every such fallback. The batch `[B, T]` is split over
("data", "fsdp") on B (which their product must divide) and over "context" on T: each device of a context group
gets its own T / context consecutive tokens of the same rows (`check_context` says when a model can run so).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from train.config import ConfigError, MeshConfig

from gdn2_jax.mesh import (BATCH_AXES, CONTEXT_AXIS, FSDP_AXIS, HEAD_AXIS, MESH_AXES,  # the one place for the names
                           TENSOR_AXIS)

LOGICAL_RULES: dict[Optional[str], Optional[str]] = {
    "vocab": TENSOR_AXIS,
    "embed": FSDP_AXIS,
    "mlp": TENSOR_AXIS,
    "heads": HEAD_AXIS,
    "conv": None,
    "kv": None,
    None: None,
}


def maybe_initialize_distributed(cfg: MeshConfig) -> bool:
  """Starts JAX's multi-host runtime when `cfg.distributed` or `GDN2_DISTRIBUTED=1` (before any device use).

  `jax.distributed.initialize()` reads the coordinator and process ids from the cluster (SLURM, GKE, TPU pods) or
  from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
  """
  if not (cfg.distributed or os.environ.get("GDN2_DISTRIBUTED", "") in ("1", "true", "yes")):
    return False
  jax.distributed.initialize()
  return True


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int, int]:
  """Resolves the -1 entry of (data, fsdp, context, tensor) so the product is `num_devices`."""
  sizes = [cfg.data, cfg.fsdp, cfg.context, cfg.tensor]
  names = "mesh (data, fsdp, context, tensor)"
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f"{names} = {tuple(sizes)} has more than one -1; leave at most one axis -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"{names} = {tuple(sizes)}; sizes must be positive (or -1 for the rest).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh data*fsdp*context*tensor without the -1 axis = {known} does not divide the "
                        f"{num_devices} devices; change mesh.data/mesh.fsdp/mesh.context/mesh.tensor.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"{names} = {tuple(sizes)} needs {math.prod(sizes)} devices but "
                      f"{num_devices} are present; set one of mesh.data/mesh.fsdp/mesh.tensor to -1.")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[Any]] = None,
              axis_type: AxisType = AxisType.Auto) -> Mesh:
  """A `Mesh` with axes ("data", "fsdp", "context", "tensor") over `devices` (default: all), tensor innermost.

  Tensor-parallel groups are neighbouring devices (the fastest links), then context groups, then FSDP, then data
  replicas. `axis_type`
  applies to every axis (Auto: XLA propagates the parameters' placement; the model also runs under Explicit).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=(axis_type,) * len(MESH_AXES))


def spec_for(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
             rules: dict = LOGICAL_RULES, head_counts: Sequence[int] = ()) -> tuple[P, list[str]]:
  """Mesh `PartitionSpec` for a parameter with logical axis names `logical` and `shape`.

  A "heads" dimension is split only if the mesh axis also divides every head count of its layer (`head_counts`),
  so shards hold whole heads and the op's per-shard call needs no resharding.
  Returns the spec and notes for each dimension left replicated because its mesh axis does not divide it (or the
  axis is already used by an earlier dimension).
  """
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {tuple(logical)} do not match the parameter shape {tuple(shape)}.")
  out, notes, used = [], [], set()
  for name, size in zip(logical, shape):
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule; expected one of "
                       f"{sorted(str(k) for k in rules)}.")
    axis = rules[name]
    if axis is None or axis not in mesh.shape or mesh.shape[axis] == 1:
      out.append(None)
      continue
    n = mesh.shape[axis]
    if axis in used or size % n or (name == "heads" and any(h % n for h in head_counts)):
      why = f"heads {tuple(head_counts)}" if name == "heads" and head_counts else f"{name}={size}"
      notes.append(f"{why} replicated on {axis!r} (size {n})")
      out.append(None)
      continue
    used.add(axis)
    out.append(axis)
  return P(*out), notes


def _logical_names(spec_leaf) -> tuple:
  return tuple(spec_leaf) if spec_leaf is not None else ()


_LAYER = re.compile(r"\['layers'\]\[(\d+)\]")
_CELL = re.compile(r"\['cells'\]\['blocks'\]\[(\d+)\]")


def layer_head_counts(path: str, model_cfg) -> tuple[int, ...]:
  """Head counts of the mixer a parameter at `path` (a `keystr`) belongs to: (q/k heads, value heads) for the
  GDN-2 family, (query heads, key/value heads) for attention; () outside a mixer."""
  if model_cfg is None or "['mixer']" not in path:
    return ()
  m = _LAYER.search(path)
  kind = None
  if m:
    kind = model_cfg.layer_kinds()[int(m.group(1))]
  else:
    m = _CELL.search(path)
    if m:
      kind = model_cfg.pattern[int(m.group(1))]
  if kind is None:
    return ()
  if kind in ("swa", "attention"):
    return (model_cfg.swa_heads, model_cfg.attn_kv_heads)
  return (model_cfg.num_heads, model_cfg.v_heads)


def param_shardings(abstract_params, mesh: Mesh, model_cfg=None) -> tuple[Any, dict[str, list[str]]]:
  """NamedShardings for an `nnx.State` of abstract parameters (with logical-axis metadata).

  With `model_cfg`, "heads" dimensions are split only where the layer's head counts divide the tensor axis.
  Returns the sharding tree (same structure as `abstract_params`) and a report `{param path: [fallback notes]}`.
  """
  from flax import nnx
  logical = nnx.get_partition_spec(abstract_params)
  report: dict[str, list[str]] = {}

  def one(path, spec_leaf, x):
    names = _logical_names(spec_leaf)
    if not names:
      names = (None,) * len(x.shape)
    key = jax.tree_util.keystr(path)
    spec, notes = spec_for(names, x.shape, mesh, head_counts=layer_head_counts(key, model_cfg))
    if notes:
      report[key] = notes
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(one, logical, abstract_params)
  return shardings, report


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """`[B, T]` batches: rows split over ("data", "fsdp"), the sequence over "context" (where it has size > 1)."""
  return NamedSharding(mesh, P(BATCH_AXES, CONTEXT_AXIS if mesh.shape.get(CONTEXT_AXIS, 1) > 1 else None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, grad_accum: int = 1, process_count: int = 1) -> None:
  """Raises ConfigError unless every micro-batch splits evenly over the batch axes and the processes."""
  n = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch_size % grad_accum:
    raise ConfigError(f"batch_size={batch_size} is not divisible by optim.grad_accum={grad_accum}; make it a "
                      f"multiple.")
  micro = batch_size // grad_accum
  if micro % n:
    raise ConfigError(f"micro-batch {micro} (batch_size={batch_size} / grad_accum={grad_accum}) does not divide "
                      f"the mesh's data*fsdp = {n} devices; use a batch_size that is a multiple of {n * grad_accum}.")
  if batch_size % process_count:
    raise ConfigError(f"batch_size={batch_size} is not divisible by the {process_count} processes; make it a "
                      f"multiple of {process_count}.")


def check_context(mesh: Mesh, model_cfg, seq_len: int) -> None:
  """Raises ConfigError (one line, naming the setting) unless `model_cfg` can run with its sequences of `seq_len`
  tokens split over the mesh's "context" axis: T / context whole chunks per device, and the short convs' and the
  SWA window's look-back within one shard (each takes only the previous shard's last tokens)."""
  n = mesh.shape.get(CONTEXT_AXIS, 1)
  if n == 1:
    return
  from gdn2_jax.ops.context import SPLIT_BACKENDS, split_chunk_size
  kinds = set(model_cfg.layer_kinds())
  if "attention" in kinds:
    raise ConfigError(f"model.pattern {model_cfg.pattern} has full 'attention', which cannot split the sequence over "
                      f"mesh.context={n}; use 'swa' layers or mesh.context=1.")
  if model_cfg.backend not in SPLIT_BACKENDS:
    raise ConfigError(f"model.backend={model_cfg.backend!r} cannot split the sequence over mesh.context={n}; use "
                      f"one of {SPLIT_BACKENDS}.")
  chunk = split_chunk_size(model_cfg.backend, model_cfg.chunk_size)
  if seq_len % (n * chunk):
    raise ConfigError(f"data.seq_len={seq_len} does not split over mesh.context={n} into shards of whole "
                      f"{chunk}-token chunks (model.chunk_size); use a data.seq_len that is a multiple of "
                      f"{n * chunk}, or a smaller mesh.context.")
  shard = seq_len // n
  looks = [("model.conv_size", model_cfg.conv_size, model_cfg.conv_size - 1)]
  if "swa" in kinds:
    looks.append(("model.window", model_cfg.window, model_cfg.window - 1))
  for key, value, back in looks:
    if back > shard:
      raise ConfigError(f"{key}={value} looks back {back} tokens but each shard of data.seq_len={seq_len} over "
                        f"mesh.context={n} holds {shard}; use a smaller mesh.context, a longer data.seq_len or a "
                        f"smaller {key}.")
  groups = np.moveaxis(np.vectorize(lambda d: d.process_index)(mesh.devices),
                       mesh.axis_names.index(CONTEXT_AXIS), -1).reshape(-1, n)
  if any(len(set(g)) > 1 for g in groups):  # each process reads whole rows (train/data.py)
    raise ConfigError(f"mesh.context={n} spans processes; every context group must lie within one process's devices "
                      "(lower mesh.context to at most the devices of one host).")


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a training run's arrays live."""

  mesh: Mesh
  params: Any
  batch: NamedSharding
  report: dict
