"""orbax checkpoints of the whole training state (params, optimiser state, step) and the grain iterator.

Each checkpoint is one orbax step directory with up to four items: `state` (every array of the train-state pytree,
stored under a flat dotted key, so any pytree of parameters and optimiser state round-trips with its shardings),
`data` (the grain iterator state, one file per process), and `model_config` and `tokenizer` (JSON files, when the
Checkpointer is given them), which make every step restorable on its own by `gdn2_jax.restore.restore`. orbax
writes into a temporary directory and renames it only once every item and every host has finished (its
finalisation), so a run killed mid-save leaves a temporary directory that `latest_step` never returns: resume always
restores a complete checkpoint.

A finalised checkpoint can still be damaged later (a truncated or overwritten array file, an emptied metadata or
iterator file). `restore_newest` then sets it aside as `<step>.damaged-<time>` (kept for inspection, never listed
again) and falls back to the next older one. Write failures (read-only or full disks) become one-line `RunError`s
naming the directory and the last complete step; orbax's own error logs for them are dropped (see `quiet_orbax`).
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from gdn2_jax.restore import dotted_key, metadata_args, metadata_handlers
from train.config import RunError

log = logging.getLogger("train")


def first_line(e: BaseException, limit: int = 160) -> str:
  """`Type: first line of the message`, cut to `limit` characters (orbax/tensorstore messages run to pages)."""
  text = (str(e).strip().splitlines() or [""])[0]
  m = re.search(r"(No space left on device|Read-only file system|Permission denied|Operation not permitted|"
                r"Disk quota exceeded)", text)
  if m:  # the OS reason is what the user can act on
    return m.group(1)
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


class _DropOrbaxErrors(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    # orbax logs every background failure (with its traceback) before raising it; the raise becomes our one line.
    # When "absl" was a plain logger before absl was imported, the caller is absl's module: match orbax's prefix.
    if record.levelno >= logging.CRITICAL:
      return True
    return not ("orbax" in record.pathname or str(record.msg).startswith("[process="))


def quiet_orbax() -> None:
  """Drops orbax's log records (absl logger); the failures they describe are raised and reported by `train`."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxErrors) for f in logger.filters):
    logger.addFilter(_DropOrbaxErrors())


# One naming of checkpoint arrays, shared with the loader (`gdn2_jax.restore`) that reads them back.
_key = dotted_key


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


def check_writable(directory: str) -> None:
  """Creates `directory` and writes a probe file in it; raises RunError if that fails.

  orbax waits forever when it cannot create a step's temporary directory, so this runs before every save.
  """
  probe = os.path.join(directory, ".write-probe")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise RunError(f"cannot write to {directory}: {e.strerror or first_line(e)}; make it writable or set "
                   "checkpoint.dir (or run_dir) to a writable directory.") from None


class Checkpointer:
  """Saves and restores `(train_state, data_iterator)` pairs with an orbax `CheckpointManager`.

  Args:
    directory: where step directories go (created).
    every: save when `step % every == 0` (0: only forced saves).
    keep: keep the newest `max(keep, 2)` finalised checkpoints (two, so the one before a diverged step survives).
    async_save: write in the background (the arrays are copied off the device first, so training continues).
    model_config: the `ModelConfig`, saved with every step (`STEP/model_config/model_config.json`).
    tokenizer: the `tokenizers.Tokenizer` of the run, saved with every step (`STEP/tokenizer/tokenizer.json`).
  """

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True, model_config=None,
               tokenizer=None):
    import grain
    self.directory = os.path.abspath(directory)
    self.every = every
    self._metadata = (model_config, tokenizer)
    quiet_orbax()
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every, 1), max_to_keep=max(keep, 2), create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    try:
      handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                  **metadata_handlers()}
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    except OSError as e:
      raise RunError(f"cannot open checkpoint directory {self.directory}: {first_line(e)}; set checkpoint.dir "
                     "(or run_dir) to a writable directory.") from None
    self._last_complete = self.manager.latest_step()

  def latest_step(self) -> Optional[int]:
    """The newest finalised step (temporary directories of interrupted saves are never counted)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def last_complete(self) -> str:
    """"step N" of the newest finalised checkpoint (for error messages), or "none"."""
    try:
      self.manager.reload()
      step = self.manager.latest_step()
    except Exception:  # noqa: BLE001 - an error message must not fail in turn
      step = self._last_complete
    return "none" if step is None else f"step {step}"

  def _write_error(self, step: int, e: BaseException) -> RunError:
    return RunError(f"writing checkpoint step {step} to {self.directory} failed: {first_line(e)}; the last complete "
                    f"checkpoint is {self.last_complete()}. Free space or make the directory writable, then run "
                    "again to resume.")

  def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
    """Starts saving `state` and the iterator position at `step` (async); returns whether a save started.

    Raises RunError if the directory is not writable or an earlier background save failed (full disk).
    """
    import grain
    if not force and not self.should_save(step):
      return False
    check_writable(self.directory)
    args = ocp.args.Composite(state=ocp.args.StandardSave(flatten_state(state)),
                              data=grain.checkpoint.CheckpointSave(data_iterator), **metadata_args(*self._metadata))
    try:
      started = bool(self.manager.save(step, args=args, force=True))
    except Exception as e:  # noqa: BLE001 - orbax re-raises a failed background save here, of any type
      pending = getattr(self, "_pending", None)
      failed = pending if pending is not None and pending not in self.all_steps() else step
      raise self._write_error(failed, e) from None
    self._pending = step
    return started

  def set_aside(self, step: int, why: str) -> str:
    """Renames step `step` to `<step>.<why>-<time>` (kept, never listed again: orbax counts integer names only)."""
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
      os.rename(src, dst)
    except FileNotFoundError:  # another process of a multi-host run set it aside first
      pass
    self.manager.reload()
    return dst

  def compatible(self, step: int, abstract_state) -> None:
    """Raises RunError when checkpoint `step` holds other arrays than `abstract_state` (another model config).

    Unreadable metadata is left to `restore` (it is damage, not a different model).
    """
    from etils import epath
    try:
      meta = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state")
      saved = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in dict(getattr(meta, "tree", meta)).items()}
    except Exception:  # noqa: BLE001
      return
    want = {k: (tuple(np.shape(v)), np.dtype(v.dtype)) for k, v in flatten_state(abstract_state).items()}
    if set(want) == set(saved) and all(want[k] == saved[k] for k in want):
      return
    missing = sorted(set(want) - set(saved))
    differ = sorted(k for k in set(want) & set(saved) if want[k] != saved[k])
    if missing:
      what = f"lacks {len(missing)} arrays of this model (first: {missing[0]})"
    elif differ:
      k = differ[0]
      what = f"has {k} of shape {saved[k][0]} {saved[k][1]}, this model {want[k][0]} {want[k][1]}"
    else:
      extra = sorted(set(saved) - set(want))
      what = f"has {len(extra)} arrays this model lacks (first: {extra[0]})"
    raise RunError(f"checkpoint step {step} in {self.directory} was written by another model or optimiser config: "
                   f"it {what}. Use a new run_dir for this config, or the run's own config (its config.json).")

  def restore_newest(self, abstract_state, make_iterator: Callable[[], Any], below: Optional[int] = None):
    """Restores the newest checkpoint that restores cleanly -> `(step, state, iterator)`, or `(None, None, None)`.

    `make_iterator()` gives a fresh data iterator for each attempt. A checkpoint that fails to restore is set aside
    (`set_aside(step, "damaged")`) with one warning line. `below`: only steps `<= below` are tried.
    """
    for step in sorted(self.all_steps(), reverse=True):
      if below is not None and step > below:
        continue
      self.compatible(step, abstract_state)
      iterator = make_iterator()
      try:
        return step, self.restore(step, abstract_state, iterator), iterator
      except RunError:
        raise
      except Exception as e:  # noqa: BLE001 - tensorstore, JSON and orbax errors all mean: damaged
        kept = self.set_aside(step, "damaged")
        log.warning("checkpoint step %d could not be restored (%s); kept as %s, trying the next older one.",
                    step, first_line(e), kept)
    return None, None, None

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
    """Blocks until every pending async save is finalised; raises RunError if one failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_error(getattr(self, "_pending", -1), e) from None

  def close(self) -> None:
    self.wait()
    self.manager.close()
