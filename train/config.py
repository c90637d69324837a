"""Typed training configuration: frozen dataclasses, config files in `configs/`, `key=value` overrides.

A config file is a Python module with `get_config() -> TrainConfig` (see `configs/default.py`). Command-line
overrides name a dotted path (`optim.lr=1e-3`, `model.n_layers=2`, `data.path=/data/shards`) and are parsed by the
type of the field they replace. A key that does not exist is an error that names the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import typing
from typing import Any, Optional


class ConfigError(ValueError):
  """A config or override the user must fix; the message is one line that says what to change."""


class RunError(RuntimeError):
  """A run directory or checkpoint problem (reused directory, unwritable disk, missing step); one line, with the fix."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it becomes fixed-length token sequences.

  Attributes:
    path: a file, directory or glob of `.jsonl`/`.json` (one object per line with a `text_field`), `.parquet`
      (needs pyarrow) or plain text (`.txt`, `.md`, `.py`, `.rst`: one document per file). None: the embedded
      default corpus (this Python's standard library sources and pydoc topics, found on every machine).
    text_field: the field holding the document text in jsonl/parquet rows.
    tokenizer: path of a `tokenizer.json` (Hugging Face `tokenizers` format). None: train a byte-level BPE of
      `vocab_size` on the training split (cached in `cache_dir`).
    vocab_size: size of the trained BPE (ignored when `tokenizer` is given: the file's size is used).
    seq_len: tokens per training sequence T (the model sees `[B, T]`).
    max_corpus_mb: cap on the raw text read (MiB), so the default job stays inside its time budget.
    heldout_fraction: fraction of documents kept out for held-out perplexity (chosen by a hash of the document).
    cache_dir: pre-tokenised shards (`.npy`) and the trained tokenizer go here, keyed by a hash of their inputs.
    shuffle: shuffle packed sequences (reshuffled every epoch, deterministic in `seed`).
    seed: data order seed.
    read_threads: grain threads that build batches ahead of the step (in-process; the iterator state stays exact).
    prefetch: batches kept ready ahead (grain's default of 500 wastes CPU on small machines).
    streaming: tokenise `path` shard by shard into a memory-mapped token store under `cache_dir` (once) and train
      from it (`train/token_store.py`): memory stays flat in the corpus size (the paper's 100B tokens). A `path`
      that is a token store directory (written by `python -m train.token_store`) is read as one in any case.
    shard_mb: JSONL bytes per input shard of a token store (one tokenising process each).
    tokenize_workers: processes tokenising shards of a token store at once (0: one per CPU).
    tokenizer_sample_mb: with `streaming` and no `tokenizer`, the BPE is trained on the first this many MiB.
  """

  path: Optional[str] = None
  text_field: str = "text"
  tokenizer: Optional[str] = None
  vocab_size: int = 2048
  seq_len: int = 256
  max_corpus_mb: float = 6.0
  heldout_fraction: float = 0.02
  cache_dir: str = "runs/cache"
  shuffle: bool = True
  seed: int = 0
  read_threads: int = 2
  prefetch: int = 8
  streaming: bool = False
  shard_mb: float = 256.0
  tokenize_workers: int = 0
  tokenizer_sample_mb: float = 64.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW, warm-up and cosine decay (docs/algorithm.md section 7: betas (0.9, 0.95), wd 0.1, clip 1.0, lr/10 floor).

  Attributes:
    lr: peak learning rate.
    b1, b2, eps: Adam moments.
    weight_decay: decoupled weight decay; never applied to `A_log`, `dt_bias`, norm scales or biases.
    warmup_steps: linear warm-up length; None = `warmup_fraction` of the run.
    warmup_fraction: used when `warmup_steps` is None (the paper warms up over 1% of tokens).
    min_lr_ratio: the cosine ends at `lr * min_lr_ratio`.
    clip_norm: global gradient-norm clip (0 disables).
    grad_accum: micro-batches per optimiser step (the global batch is split into this many, summed in float32).
  """

  lr: float = 4e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  warmup_steps: Optional[int] = None
  warmup_fraction: float = 0.01
  min_lr_ratio: float = 0.1
  clip_norm: float = 1.0
  grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """orbax checkpoints: params, optimiser state, step and the grain iterator, saved together.

  Attributes:
    dir: checkpoint directory; None = `<run_dir>/checkpoints`.
    every: save every this many steps (0 = only at the end).
    keep: keep the last this many checkpoints.
    async_save: write in a background thread while training goes on.
    keep: keep the last this many checkpoints (at least 2, so the one before a diverged step is still there).
    resume: restore the newest checkpoint in `dir` that restores cleanly (damaged ones are set aside and kept).
      With resume=false, a run directory that already holds a run is refused unless `overwrite=true`.
    resume_step: restore this step instead of the newest (e.g. the last good checkpoint a NaN stop names); the
      newer checkpoints are set aside as `<step>.superseded-<time>` (kept, never loaded again).
    overwrite: with resume=false, delete the run directory's earlier checkpoints and records and start again.
  """

  dir: Optional[str] = None
  every: int = 100
  keep: int = 3
  async_save: bool = True
  resume: bool = True
  resume_step: Optional[int] = None
  overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh with axes ("data", "fsdp", "context", "tensor"); -1 on one axis takes every remaining device.

  Attributes:
    data: data-parallel replicas (batch split, params replicated).
    fsdp: fully sharded data parallel (batch split, params sharded on their "embed" axis).
    context: context parallel: every sequence split into this many runs of `data.seq_len / context` consecutive
      tokens, one per device (`gdn2_jax.ops.context`); each run must hold whole `model.chunk_size` chunks and the
      SWA window. Params replicated.
    tensor: tensor parallel (GDN-2 heads, MLP width and vocab split; the batch is not).
    distributed: call `jax.distributed.initialize()` first (multi-host). Also on when `GDN2_DISTRIBUTED=1`.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  distributed: bool = False
  context: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run.

  Attributes:
    model: the `gdn2_jax.models.ModelConfig` (a frozen dataclass; override fields as `model.d_model=128`).
    data, optim, checkpoint, mesh: see their classes.
    run_dir: where the JSONL log, the loss plot, the final eval and (by default) checkpoints go.
    steps: optimiser steps (the schedule's length).
    stop_at: end this process after this step, saving a checkpoint (a planned pre-emption; resume continues).
    batch_size: global batch (sequences per optimiser step, over all devices and hosts).
    eval_every: held-out perplexity every this many steps (0 = only at the end).
    eval_batches: batches of the held-out split per evaluation.
    log_every: steps between JSONL records (the progress bar updates every step).
    seed: parameter initialisation seed.
    peak_flops: per-device peak FLOP/s for MFU; None = known GPUs (H100/H200 bf16 dense 989e12), else no MFU.
    tensorboard: also write TensorBoard scalars (skipped with a note if tensorboardX/tensorboard is not installed).
    progress: show a tqdm progress bar.
  """

  model: Any = None
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()
  run_dir: str = "runs/default"
  steps: int = 300
  stop_at: Optional[int] = None
  batch_size: int = 16
  eval_every: int = 100
  eval_batches: int = 8
  log_every: int = 10
  seed: int = 0
  peak_flops: Optional[float] = None
  tensorboard: bool = False
  progress: bool = True


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
  if not ok:
    raise ConfigError(f"{key}={value!r}; expected {expected}.")


def validate(cfg: TrainConfig) -> None:
  """Checks every setting before any work starts; raises ConfigError (one line: the key, its value, the fix)."""
  if cfg.model is None:
    raise ConfigError("the config has no model; set `model` in the config file (e.g. ModelConfig.tiny()).")
  try:
    cfg.model.validate()
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  from gdn2_jax.ops.api import known_backends
  _check(cfg.model.backend in known_backends(), "model.backend", cfg.model.backend,
         f"one of {known_backends()}")
  for key, minimum in (("steps", 1), ("batch_size", 1), ("log_every", 1), ("eval_every", 0), ("eval_batches", 0),
                       ("data.vocab_size", 1), ("data.seq_len", 1), ("data.read_threads", 0), ("data.prefetch", 0),
                       ("optim.grad_accum", 1), ("checkpoint.every", 0), ("checkpoint.keep", 1),
                       ("checkpoint.resume_step", 0), ("stop_at", 1)):
    value = cfg
    for part in key.split("."):
      value = getattr(value, part)
    if value is None and key in ("checkpoint.resume_step", "stop_at"):
      continue
    _check(isinstance(value, int) and value >= minimum, key, value, f"an integer >= {minimum}")
  d, o = cfg.data, cfg.optim
  _check(d.max_corpus_mb > 0, "data.max_corpus_mb", d.max_corpus_mb, "a positive size in MiB")
  _check(0 <= d.heldout_fraction < 1, "data.heldout_fraction", d.heldout_fraction, "a fraction in [0, 1)")
  _check(d.shard_mb > 0 and d.tokenizer_sample_mb > 0, "data.shard_mb/tokenizer_sample_mb",
         (d.shard_mb, d.tokenizer_sample_mb), "positive sizes in MiB")
  _check(isinstance(d.tokenize_workers, int) and d.tokenize_workers >= 0, "data.tokenize_workers",
         d.tokenize_workers, "an integer >= 0 (0: one per CPU)")
  _check(math.isfinite(o.lr) and o.lr >= 0, "optim.lr", o.lr, "a finite learning rate >= 0")
  _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", (o.b1, o.b2), "values in [0, 1)")
  _check(o.eps > 0 and o.weight_decay >= 0 and o.clip_norm >= 0, "optim.eps/weight_decay/clip_norm",
         (o.eps, o.weight_decay, o.clip_norm), "eps > 0, weight_decay >= 0 and clip_norm >= 0")
  _check(o.warmup_steps is None or o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "None or >= 0")
  _check(0 <= o.warmup_fraction <= 1, "optim.warmup_fraction", o.warmup_fraction, "a fraction in [0, 1]")
  _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "a ratio in [0, 1]")
  _check(cfg.peak_flops is None or cfg.peak_flops > 0, "peak_flops", cfg.peak_flops, "None or a positive FLOP/s")
  _check(bool(cfg.run_dir), "run_dir", cfg.run_dir, "a directory path")
  if cfg.checkpoint.overwrite and cfg.checkpoint.resume:
    raise ConfigError("checkpoint.overwrite=true deletes the earlier run and checkpoint.resume=true continues it; "
                      "set checkpoint.resume=false to start again, or drop checkpoint.overwrite.")


def load_config_file(path: str) -> TrainConfig:
  """Imports `path` (a Python file with `get_config()`) and returns its config."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found; pass an existing file such as configs/default.py.")
  spec = importlib.util.spec_from_file_location(f"_gdn2_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(); define `def get_config() -> TrainConfig`.")
  cfg = module.get_config()
  if not isinstance(cfg, TrainConfig):
    raise ConfigError(f"get_config() in {path!r} returned {type(cfg).__name__}; expected a TrainConfig.")
  return cfg


def _field_types(obj) -> dict[str, Any]:
  hints = typing.get_type_hints(type(obj))
  return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(obj)}


def all_keys(obj, prefix: str = "") -> list[str]:
  """Every dotted key of a (nested) dataclass config."""
  keys = []
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value):
      keys += all_keys(value, prefix + f.name + ".")
    else:
      keys.append(prefix + f.name)
  return keys


def _parse_bool(text: str, key: str) -> bool:
  low = text.strip().lower()
  if low in ("1", "true", "yes", "on"):
    return True
  if low in ("0", "false", "no", "off"):
    return False
  raise ConfigError(f"override {key}={text!r}: expected a boolean (true/false).")


def parse_value(text: str, annotation: Any, current: Any, key: str) -> Any:
  """Parses `text` as the type of the field `key` (its annotation, or the type of its current value)."""
  optional = False
  origin = typing.get_origin(annotation)
  if origin is typing.Union or str(origin) == "types.UnionType":
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = len(args) < len(typing.get_args(annotation))
    annotation = args[0] if len(args) == 1 else Any
  if optional and text.strip().lower() in ("none", "null"):
    return None
  target = annotation if annotation is not Any else (type(current) if current is not None else str)
  if isinstance(target, str):  # postponed annotation of a foreign dataclass
    target = type(current) if current is not None else str
  try:
    if target is bool:
      return _parse_bool(text, key)
    if target is int:
      return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text)
    if target is float:
      return float(text)
    if typing.get_origin(target) is tuple or target is tuple:
      items = [s for s in text.strip("()[] ").split(",") if s.strip()]
      inner = typing.get_args(target)
      elem = inner[0] if inner else (type(current[0]) if current else str)
      return tuple(parse_value(s.strip(), elem, None, key) for s in items)
    if target is str:
      return text
    return target(text)
  except (TypeError, ValueError) as e:
    if isinstance(e, ConfigError):
      raise
    name = getattr(target, "__name__", str(target))
    raise ConfigError(f"override {key}={text!r}: expected a value of type {name}.") from None


def _apply_one(obj, path: list[str], text: str, full_key: str, root):
  name = path[0]
  names = [f.name for f in dataclasses.fields(obj)]
  if name not in names:
    valid = all_keys(root)
    close = difflib.get_close_matches(full_key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(valid)}"
    raise ConfigError(f"unknown config key {full_key!r}; {hint}")
  current = getattr(obj, name)
  if len(path) > 1:
    if not dataclasses.is_dataclass(current):
      raise ConfigError(f"config key {full_key!r}: {'.'.join(full_key.split('.')[:-len(path) + 1])} has no fields.")
    return dataclasses.replace(obj, **{name: _apply_one(current, path[1:], text, full_key, root)})
  if dataclasses.is_dataclass(current):
    raise ConfigError(f"config key {full_key!r} is a group; set one of its fields, e.g. {full_key}."
                      f"{dataclasses.fields(current)[0].name}=...")
  value = parse_value(text, _field_types(obj)[name], current, full_key)
  try:
    return dataclasses.replace(obj, **{name: value})
  except (TypeError, ValueError) as e:  # the dataclass's own validation (e.g. ModelConfig.validate)
    raise ConfigError(f"override {full_key}={text!r} was rejected: {str(e).splitlines()[0]}") from None


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
  """Applies `key=value` strings (dotted keys) to `cfg`; raises ConfigError naming any bad key or value."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} has no '='; write key=value, e.g. optim.lr=1e-3.")
    key, text = item.split("=", 1)
    key = key.strip()
    cfg = _apply_one(cfg, key.split("."), text.strip(), key, cfg)
  return cfg


def _plain(v):
  """A JSON-friendly value: dataclasses as dicts, sequences as lists (nested too), anything else as its str."""
  if dataclasses.is_dataclass(v):
    return to_dict(v)
  if isinstance(v, (str, int, float, bool, type(None))):
    return v
  if isinstance(v, (tuple, list)):
    return [_plain(x) for x in v]
  return str(v)


def to_dict(cfg) -> dict:
  """A JSON-friendly dict of a (nested) dataclass config."""
  return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
