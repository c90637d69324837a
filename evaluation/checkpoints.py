"""Restoring a `train/` run for evaluation: its model config, parameters, tokenizer and held-out tokens.

A run directory holds `config.json` (`{"train": ..., "model": ModelConfig fields}`) and orbax step directories under
`checkpoint.dir` (default `RUN_DIR/checkpoints`), whose `state` item stores every array of the train state under a
flat dotted key (`params.layers.0.mixer.q_proj.kernel...`; see `train/checkpoint.py`). Only the `params.*` and
`rest.*` arrays are read, onto the default device, so a run trained on a mesh of many devices restores on one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np


def read_config(run_dir: str) -> dict:
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"`{run_dir}` has no config.json; expected the run_dir of a `python -m train.main` run.")
  with open(path) as f:
    return json.load(f)


def model_config(cfg: dict):
  """The `ModelConfig` recorded in a run's config.json."""
  from gdn2_jax.models import ModelConfig

  fields = dict(cfg["model"])
  fields["pattern"] = tuple(fields["pattern"])
  known = set(ModelConfig.__dataclass_fields__)
  return ModelConfig(**{k: v for k, v in fields.items() if k in known})


def checkpoint_dir(run_dir: str, cfg: dict) -> str:
  d = (cfg.get("train", {}).get("checkpoint", {}) or {}).get("dir")
  return os.path.abspath(d or os.path.join(run_dir, "checkpoints"))


def restore_params(model, ckpt_dir: str, step: Optional[int] = None) -> int:
  """Loads the `params`/`rest` arrays of checkpoint `step` (default: the latest) into `model`; returns the step."""
  import orbax.checkpoint as ocp
  from flax import nnx
  from train.checkpoint import flatten_state, unflatten_like

  from gdn2_jax.generate import checked_step
  mgr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"))
  step = checked_step(mgr.all_steps(), step, ckpt_dir)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  template = {"params": params, "rest": rest}
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  wanted = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=dev) for k, v in flatten_state(template).items()}
  # orbax restores a subset of a saved pytree when the target names only those keys (partial restore).
  meta = mgr.item_metadata(step)["state"]
  saved = set(meta.keys()) if hasattr(meta, "keys") else set()
  missing = sorted(set(wanted) - saved) if saved else []
  if missing:
    raise ValueError(f"checkpoint step {step} in `{ckpt_dir}` lacks {len(missing)} arrays of this model (first: "
                     f"{missing[0]!r}); was it written by another model config?")
  try:
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=wanted, restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=dev), wanted),
        partial_restore=True)))
  except TypeError:  # older orbax: no partial_restore flag; restore everything with its metadata
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  flat = dict(out["state"])
  restored = unflatten_like(template, {k: flat[k] for k in wanted})
  nnx.update(model, restored["params"], restored["rest"])
  mgr.close()
  return step


def load_run(run_dir: str, step: Optional[int] = None, with_data: bool = True) -> tuple[Any, Any, Any, Any]:
  """`(model, model_config, tokenizer or None, held-out token stream [N] or None)` of a `train/` run.

  The tokenizer and the held-out split are rebuilt by `train.data.build_corpus` from the run's data config (it reads
  them from its cache when they are there).
  """
  from flax import nnx
  from gdn2_jax.models import LanguageModel

  cfg = read_config(run_dir)
  mcfg = model_config(cfg)
  model = LanguageModel(mcfg, rngs=nnx.Rngs(0))
  restore_params(model, checkpoint_dir(run_dir, cfg), step)
  tokenizer, stream = None, None
  if with_data and "data" in cfg.get("train", {}):
    from evaluation.evaluate import HFTokenizer
    from train.config import DataConfig
    from train.data import build_corpus

    data = {k: v for k, v in cfg["train"]["data"].items() if k in DataConfig.__dataclass_fields__}
    corpus = build_corpus(DataConfig(**data))
    tokenizer = HFTokenizer(corpus.tokenizer)
    if corpus.heldout is not None:
      stream = np.asarray(corpus.heldout.shard.tokens)
  return model, mcfg, tokenizer, stream
