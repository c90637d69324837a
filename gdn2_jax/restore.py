"""The one loader of saved models: parameters, model config and tokenizer from a checkpoint directory alone.

Every orbax step directory that `train/` (and `python -m gdn2_jax.convert`) writes is self-contained:

    STEP/state/...                           every array of the train state under a flat dotted key
                                             (`params.layers.0.mixer.q_proj.kernel.value`, `opt_state....`)
    STEP/model_config/model_config.json      the `ModelConfig` fields (JSON; `ModelConfig(**fields)` rebuilds it)
    STEP/tokenizer/tokenizer.json            the Hugging Face `tokenizers` file the run trained with (if any)
    STEP/data/...                            the grain iterator position (training only)

The two JSON items are written by orbax in the same atomic save as the arrays, so a finalised step always has them.
`restore(path)` reads the model config and tokenizer of one step and restores its `params.*` (and `rest.*`) arrays
only (never the optimiser state) onto whatever devices exist: one device by default, or any `sharding`.
`python -m gdn2_jax.generate` and `evaluation` both call it.

Checkpoints written before these items existed: the model config falls back to the run's `config.json` (one logged
line says so); the tokenizer is then `None` unless one is passed (`tokenizer=`, the command lines' `--tokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np

log = logging.getLogger("gdn2_jax")

CONFIG_ITEM, CONFIG_FILE = "model_config", "model_config.json"
TOKENIZER_ITEM, TOKENIZER_FILE = "tokenizer", "tokenizer.json"


class RestoreError(ValueError):
  """A checkpoint that cannot be restored; the message is one line naming what is missing and the fix."""


# -- writing (used by train/checkpoint.py and gdn2_jax.convert) -------------------------------------------------------


def dotted_key(path) -> str:
  """Dotted name of a pytree path, as checkpoints name their arrays: `params.embed.embedding.value`."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts) or "root"


def metadata_handlers() -> dict[str, Any]:
  """orbax handlers of the two JSON items (`CheckpointManager(item_handlers=...)`), with their file names."""
  import orbax.checkpoint as ocp
  return {CONFIG_ITEM: ocp.JsonCheckpointHandler(filename=CONFIG_FILE),
          TOKENIZER_ITEM: ocp.JsonCheckpointHandler(filename=TOKENIZER_FILE)}


def metadata_args(model_config, tokenizer=None) -> dict[str, Any]:
  """`{item: orbax save args}` for `model_config` (a ModelConfig) and `tokenizer` (a `tokenizers.Tokenizer` or None)."""
  import orbax.checkpoint as ocp
  out = {}
  if model_config is not None:
    out[CONFIG_ITEM] = ocp.args.JsonSave(config_to_dict(model_config))
  if tokenizer is not None:
    out[TOKENIZER_ITEM] = ocp.args.JsonSave(json.loads(tokenizer.to_str()))
  return out


def config_to_dict(model_config) -> dict:
  """JSON-ready fields of a ModelConfig (tuples become lists, a nested ChunkConfig a dict)."""
  return json.loads(json.dumps(dataclasses.asdict(model_config), default=str))


def config_from_dict(fields: dict, where: str):
  """`ModelConfig(**fields)`; unknown fields (a newer writer) are an error naming them."""
  from gdn2_jax.models import ModelConfig
  known = set(ModelConfig.__dataclass_fields__)
  unknown = sorted(set(fields) - known)
  if unknown:
    raise RestoreError(f"the model config in {where} has fields this gdn2_jax does not know ({unknown}); update "
                       "gdn2_jax to the version that wrote it.")
  return ModelConfig(**fields)


# -- locating ---------------------------------------------------------------------------------------------------------


def _is_step_dir(path: str) -> bool:
  return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(os.path.join(path, "state"))


def _has_steps(path: str) -> bool:
  return os.path.isdir(path) and any(_is_step_dir(os.path.join(path, n)) for n in os.listdir(path))


def locate(path: str) -> tuple[str, Optional[int], Optional[str]]:
  """`(checkpoint directory, step or None, run directory or None)` of `path`.

  `path` is a step directory (`.../checkpoints/300`), a checkpoint directory (numbered step directories) or a run
  directory (`config.json` and `checkpoints/`, or the `checkpoint.dir` its config.json names).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} does not exist; pass a training run directory, its checkpoint directory or "
                            "one step directory.")
  if _is_step_dir(path):
    ckpt = os.path.dirname(path)
    return ckpt, int(os.path.basename(path)), _run_of(ckpt)
  if _has_steps(path):
    return path, None, _run_of(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    own = os.path.join(path, "checkpoints")
    if not os.path.isdir(own):  # the run set checkpoint.dir elsewhere
      with open(os.path.join(path, "config.json")) as f:
        named = (json.load(f).get("train", {}).get("checkpoint", {}) or {}).get("dir")
      own = os.path.abspath(named) if named else own
    return own, None, path
  raise FileNotFoundError(f"{path!r} holds no checkpoint (no numbered step directories, no config.json); pass a "
                          "training run directory, its checkpoint directory or one step directory.")


def _run_of(ckpt_dir: str) -> Optional[str]:
  parent = os.path.dirname(ckpt_dir)
  return parent if os.path.isfile(os.path.join(parent, "config.json")) else None


def checked_step(steps, step: Optional[int], ckpt_dir: str) -> int:
  """`step`, or the newest of `steps` when None; FileNotFoundError (one line, the steps there) when it is not saved."""
  steps = sorted(int(s) for s in steps)
  if not steps:
    raise FileNotFoundError(f"no finalised checkpoint in {ckpt_dir!r}; train the run first (or pass another run).")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"--step {step}: no checkpoint of that step in {ckpt_dir!r} (removed, or never saved); "
                            f"it has steps {steps}.")
  return step


# -- reading the two JSON items ----------------------------------------------------------------------------------------


def read_model_config(step_dir: str, run_dir: Optional[str] = None):
  """The ModelConfig saved in `step_dir`; for older checkpoints the run's config.json, with a logged line."""
  path = os.path.join(step_dir, CONFIG_ITEM, CONFIG_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      return config_from_dict(json.load(f), path)
  old = os.path.join(run_dir, "config.json") if run_dir else None
  if old and os.path.isfile(old):
    with open(old) as f:
      d = json.load(f)
    log.warning("checkpoint %s has no %s/%s (written before model configs were saved with each step); using the "
                "model entry of %s", step_dir, CONFIG_ITEM, CONFIG_FILE, old)
    return config_from_dict(d.get("model", d), old)
  raise RestoreError(f"checkpoint {step_dir} has no {CONFIG_ITEM}/{CONFIG_FILE} and no run config.json beside its "
                     "checkpoint directory (an older checkpoint, moved without its run); copy the run's config.json "
                     "next to the checkpoint directory, or restore from the whole run directory.")


def read_tokenizer(step_dir: str):
  """The `tokenizers.Tokenizer` saved in `step_dir`, or None if the checkpoint has none."""
  path = os.path.join(step_dir, TOKENIZER_ITEM, TOKENIZER_FILE)
  if not os.path.isfile(path):
    return None
  from tokenizers import Tokenizer
  return Tokenizer.from_file(path)


def missing_tokenizer_message(step_dir: str) -> str:
  """One line for a caller that needs a tokenizer and the checkpoint has none."""
  return (f"checkpoint {step_dir} holds no {TOKENIZER_ITEM}/{TOKENIZER_FILE} (written before tokenizers were saved "
          "with each step, or converted without one); pass --tokenizer PATH (the run's data.tokenizer, or the "
          "bpe-*.json in its data.cache_dir).")


# -- restoring ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
  """What `restore` returns: the model with its parameters, its config and tokenizer, and where they came from."""

  model: Any  # LanguageModel
  config: Any  # ModelConfig
  tokenizer: Any  # tokenizers.Tokenizer or None
  step: int
  step_dir: str
  run_dir: Optional[str]


def restore(path: str, *, step: Optional[int] = None, sharding: Optional[jax.sharding.Sharding] = None,
            tokenizer: Optional[str] = None, **overrides) -> Restored:
  """Restores the model saved at `path` (run, checkpoint or step directory): the one restore path.

  Args:
    path: see `locate`.
    step: the step to restore (default: the one `path` names, else the newest finalised step).
    sharding: where every parameter goes (default: the first device). Only `params.*`/`rest.*` arrays are read.
    tokenizer: a `tokenizer.json` path that replaces the saved one (needed for checkpoints that lack it).
    overrides: ModelConfig fields to replace (e.g. `backend="recurrent"`); shapes must stay those saved.
  Raises FileNotFoundError / RestoreError (ValueError) with one-line messages.
  """
  import orbax.checkpoint as ocp
  from flax import nnx
  from gdn2_jax.models import LanguageModel

  ckpt_dir, named_step, run_dir = locate(path)
  if named_step is not None and step is not None and step != named_step:
    raise RestoreError(f"--step {step} disagrees with the step directory {path!r}; pass one of them.")
  steps = saved_steps(ckpt_dir)
  step = checked_step(steps, named_step if step is None else step, ckpt_dir)
  step_dir = os.path.join(ckpt_dir, str(step))
  cfg = read_model_config(step_dir, run_dir)
  if overrides:
    cfg = cfg.replace(**overrides)
  tok = read_tokenizer(step_dir)
  if tokenizer is not None:
    if not os.path.isfile(tokenizer):
      raise FileNotFoundError(f"--tokenizer {tokenizer!r} not found; pass a tokenizer.json file.")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer)

  graphdef, abs_params, abs_rest = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))),
                                             nnx.Param, ...)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  leaves, treedef = jax.tree_util.tree_flatten_with_path({"params": abs_params, "rest": abs_rest})
  wanted = {dotted_key(p): jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=sharding) for p, v in leaves}
  # The "state" item's own handler: a manager would warn about the items it is not asked to restore.
  from etils import epath
  state_dir = epath.Path(step_dir) / "state"
  handler = ocp.PyTreeCheckpointHandler()
  try:
    _check_arrays(wanted, _saved_shapes(handler, state_dir), step_dir)
    # orbax reads a subset of the saved pytree when the target names only those keys (never the optimiser state).
    flat = handler.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args={k: ocp.ArrayRestoreArgs(sharding=sharding, dtype=v.dtype)
                                   for k, v in wanted.items()}, partial_restore=True))
  except RestoreError:
    raise
  except Exception as e:  # noqa: BLE001 - tensorstore/JSON errors of a damaged checkpoint: one line
    text = (str(e).splitlines() or [""])[0][:120]
    raise RestoreError(f"checkpoint step {step} in {ckpt_dir!r} could not be read ({type(e).__name__}: {text}); "
                       f"pass --step with another of {steps}.") from None
  finally:
    handler.close()
  restored = jax.tree_util.tree_unflatten(treedef, [flat[dotted_key(p)] for p, _ in leaves])
  model = nnx.merge(graphdef, restored["params"], restored["rest"])
  return Restored(model, cfg, tok, int(step), step_dir, run_dir)


def saved_steps(ckpt_dir: str) -> list[int]:
  """The finalised steps in `ckpt_dir`: integer-named directories with a `state` item (orbax writes a step under a
  temporary name and renames it when every item is complete; damaged steps set aside carry a suffix)."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir) if _is_step_dir(os.path.join(ckpt_dir, n)))


def _saved_shapes(handler, state_dir) -> Optional[dict]:
  """`{key: shape}` of the arrays saved in a state item (None when the metadata cannot be read)."""
  try:
    meta = handler.metadata(state_dir)
    meta = dict(getattr(meta, "tree", meta))
    return {k: tuple(getattr(v, "shape", ())) for k, v in meta.items()}
  except Exception:  # noqa: BLE001 - damage is reported by the restore itself
    return None


def _check_arrays(wanted: dict, saved: Optional[dict], step_dir: str) -> None:
  if saved is None:
    return
  missing = sorted(set(wanted) - set(saved))
  if missing:
    raise RestoreError(f"checkpoint {step_dir} lacks {len(missing)} arrays of this model (first: {missing[0]!r}); "
                       "was it written by another model config (check the overrides)?")
  for k, v in wanted.items():
    if tuple(saved[k]) != tuple(v.shape):
      raise RestoreError(f"checkpoint array {k!r} in {step_dir} has shape {tuple(saved[k])}; the model expects "
                         f"{tuple(v.shape)} (another model config, or an override that changes shapes).")
