"""orbax checkpoints of the whole training state (params, optimiser state, step) and the grain iterator.

Each checkpoint is one orbax step directory with two items: `state` (every array of the train-state pytree, stored
under a flat dotted key, so any pytree of parameters and optimiser state round-trips with its shardings) and `data`
(the grain iterator state, one file per process). orbax writes into a temporary directory and renames it only once
every item and every host has finished (its finalisation), so a run killed mid-save leaves a temporary directory
that `latest_step` never returns: resume always restores a complete checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("train")


def _key(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts) or "root"


def flatten_state(tree) -> dict[str, Any]:
  """`{dotted path: leaf}` for every leaf of `tree` (paths are unique within one pytree)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = _key(path)
    if key in flat:
      raise ValueError(f"two leaves of the train state share the checkpoint key {key!r}.")
    flat[key] = leaf
  return flat


def unflatten_like(template, flat: dict[str, Any]):
  """Rebuilds `template`'s pytree with leaves taken from `flat` by their dotted path."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
  missing = [_key(p) for p, _ in leaves_with_path if _key(p) not in flat]
  if missing:
    raise ValueError(f"the checkpoint lacks {len(missing)} arrays of this model (first: {missing[0]!r}); it was "
                     f"written by a different model config; use a new checkpoint.dir.")
  return jax.tree_util.tree_unflatten(treedef, [flat[_key(p)] for p, _ in leaves_with_path])


class Checkpointer:
  """Saves and restores `(train_state, data_iterator)` pairs with an orbax `CheckpointManager`.

  Args:
    directory: where step directories go (created).
    every: save when `step % every == 0` (0: only forced saves).
    keep: keep the newest `keep` finalised checkpoints.
    async_save: write in the background (the arrays are copied off the device first, so training continues).
  """

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every, 1), max_to_keep=max(keep, 1), create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    """The newest finalised step (temporary directories of interrupted saves are never counted)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
    """Starts saving `state` and the iterator position at `step` (async); returns whether a save started."""
    import grain
    if not force and not self.should_save(step):
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(flatten_state(state)),
                              data=grain.checkpoint.CheckpointSave(data_iterator))
    return bool(self.manager.save(step, args=args, force=True))

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores step `step` into arrays shaped and sharded like `abstract_state`; sets the iterator's position.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` (or of arrays).
    """
    import grain
    target = {k: (v if isinstance(v, jax.ShapeDtypeStruct) else
                  jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=getattr(v, "sharding", None)))
              for k, v in flatten_state(abstract_state).items()}
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return unflatten_like(abstract_state, out["state"])

  def wait(self) -> None:
    """Blocks until every pending async save is finalised."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
