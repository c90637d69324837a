"""Replication study: do decoupled erase/write gates recall better on MQAR and MK-NIAH-1 than KDA, Gated DeltaNet
and the rest?

Every mixer gets the same 2-layer model ([mixer, SwiGLU] x 2, d_model 128), the same data (Zoology's MQAR train
mix, docs/algorithm.md section 9; or RULER's MK-NIAH-1 with `--task mk_niah_1`) and the same number of steps; each is trained
at every learning rate x seed, and all those runs of one mixer train together as ONE program: their parameters are
stacked on a leading axis and the train step is `jax.vmap`ped over it (per-run learning rate as a traced input,
per-seed data and init), so a mixer compiles once per task. The mixers are then stepped in turn on the same batches,
so every mixer gets exactly the same data and steps. Accuracy is measured on held-out settings (MQAR up to (T,
pairs) = (1024, 256)); the report picks each mixer's best learning rate per task (seed-mean accuracy over the task's
settings) and gives the spread over seeds.

    bash experiments/run_study_gpu.sh mqar gdn2                                   # the full study, one mixer per call
    python -m evaluation.replicate --preset full --task all --out experiments/study_full   # all of it in one process
    python -m evaluation.replicate --preset smoke --task all --out /tmp/smoke      # the whole pipeline, CPU, ~1 min
    python -m evaluation.replicate --preset cpu_tiny --out /tmp/tiny               # a tiny GDN-2 that learns (CPU)

`--cache-dir DIR` keeps compiled programs for later calls on the same machine. Output: OUT/results.json (every
run, with device, date and command), OUT/summary.json, OUT/results.md, OUT/*.png, the log, and OUT/gdn2_params.npz
(the best GDN-2 run, for `evaluation.memory_viz`); with `--task all`, OUT/<task>/ per task and the merge in OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evaluation import metrics, report, tasks
from evaluation.evaluate import MQAR_TEST_GRID, MQAR_TRAIN_MIX, Setting

Array = jax.Array

_START = time.time()
MIXERS = ("gdn2", "gdn2_b_only", "gdn2_w_only", "kda", "gdn", "deltanet", "attention")
TASKS = ("mqar", "mk_niah_1")
# MK-NIAH-1 (4 needles, 7-digit answer): train lengths (right-padded to the longest) and test lengths. The shortest
# that fits 4 needles, the question and the answer is about 110 word tokens.
NIAH_TRAIN_LENGTHS = (128, 256, 512)
NIAH_TEST_LENGTHS = (128, 256, 512, 1024)
NIAH_ANSWER_TOKENS = 7  # the answer is a 7-digit number, one token per digit


def _num_scored(task: str, grid) -> int:
  """The most scored positions in a row: the pairs for MQAR, the answer's digits for the needle task."""
  return max(n for _, n in grid) if task == "mqar" else NIAH_ANSWER_TOKENS


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """One study: the models, the data, the optimiser and the evaluation.

  Attributes:
    mixers: mixer names (see `gdn2_jax.models.MIXERS`); each gets `pattern=(mixer,)` over `n_layers` blocks.
    d_model, n_layers, num_heads, head_dim, mlp_hidden: the model (attention: `num_heads` heads of `head_dim`).
    task: the trained and scored task: 'mqar', or 'mk_niah_1' (RULER's multi-key needle over the word vocabulary
      `tasks.WORD_VOCAB`; `train_mix` and `test_grid` then hold (T, needles)); see `for_task`.
    vocab_size: MQAR vocabulary (keys in the lower half, values in the upper half); for the needle task at least
      the word vocabulary's size.
    learning_rates, seeds: the grid; runs are (lr, seed) pairs, lr-major. A seed fixes init and data order.
    steps, batch_size: optimiser steps and sequences per step per run (the train mix is cycled over the rows).
    warmup_fraction, weight_decay, clip_norm, b1, b2: AdamW with linear warm-up and cosine decay to lr/10.
    train_mix: (T, pairs) of the training data; shorter sequences are right-padded to the longest.
    test_grid: (T, pairs) scored after training; eval_examples sequences each, `eval_batch_size` at a time.
    backend: GDN-2 op backend of the models ('chunk': the pure-JAX chunkwise path, any platform).
    time_limit_s: training budget in seconds for all mixers together: after timing the first rounds the step count
      is lowered (never raised past `steps`) so training fits; every mixer gets the same count (in the results).
  """

  mixers: tuple[str, ...] = MIXERS
  d_model: int = 128
  n_layers: int = 2
  num_heads: int = 2
  head_dim: int = 64
  mlp_hidden: int = 256
  task: str = "mqar"
  # Vocabulary and learning rates measured on an H100 (benchmarks/results_eval.md, 2026-12-08): at 8192 no run left
  # chance in 1742 steps; at 1024 the study's gdn2 learns at lr 1e-3 in 5000 steps, not at 3e-3 or 1e-2.
  vocab_size: int = 1024
  learning_rates: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
  seeds: tuple[int, ...] = (0, 1)
  steps: int = 5000  # the count the 2026-12-08 probe needed at lr 1e-3
  batch_size: int = 64
  warmup_fraction: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.98
  train_mix: tuple[tuple[int, int], ...] = MQAR_TRAIN_MIX
  test_grid: tuple[tuple[int, int], ...] = MQAR_TEST_GRID
  eval_examples: int = 128
  eval_batch_size: int = 32
  eval_seed: int = 20261123
  backend: str = "chunk"
  time_limit_s: Optional[float] = None

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"StudyConfig `task` is {self.task!r}; expected one of {TASKS}.")
    if self.task == "mqar":  # every train and test setting fits the vocabulary (checked now, not after training)
      for T, n in self.train_mix + self.test_grid:
        tasks.MQARConfig(T, n, self.vocab_size)
    if self.task != "mqar" and self.vocab_size < tasks.WORD_VOCAB.vocab_size:
      raise ValueError(f"StudyConfig `vocab_size` is {self.vocab_size}; the needle task needs >= "
                       f"{tasks.WORD_VOCAB.vocab_size} (the word vocabulary); use `for_task`.")

  def for_task(self, task: str) -> "StudyConfig":
    """This study on `task`: the same mixers, model, optimiser and lr x seed grid; for 'mk_niah_1' the needle
    train mix, test lengths and the word vocabulary (scaled to this config's longest MQAR length)."""
    if task == self.task:
      return self
    if task == "mqar":
      raise ValueError("`for_task('mqar')` needs an MQAR config; start from a preset instead.")
    T = max(t for t, _ in self.test_grid)
    train = tuple((t, 4) for t in NIAH_TRAIN_LENGTHS if t <= max(T // 2, 128))
    test = tuple((t, 4) for t in NIAH_TEST_LENGTHS if t <= max(T, 128))
    return dataclasses.replace(self, task=task, vocab_size=max(self.vocab_size, tasks.WORD_VOCAB.vocab_size),
                               train_mix=train, test_grid=test)

  @property
  def num_scored_train(self) -> int:
    return _num_scored(self.task, self.train_mix)

  @property
  def num_scored_test(self) -> int:
    return _num_scored(self.task, self.test_grid)

  @property
  def runs(self) -> list[tuple[float, int]]:
    return [(lr, s) for lr in self.learning_rates for s in self.seeds]

  def model_config(self, mixer: str):
    """The `ModelConfig` of `mixer`: a mixer name, or names joined by '+' for a hybrid ('gdn2+swa': the pattern
    ('gdn2', 'swa') cycled over the layers; the window is the longest sequence, so 'swa' is full attention here)."""
    from gdn2_jax.models import ModelConfig

    T = max(t for t, _ in self.test_grid + self.train_mix)
    return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                       pattern=tuple(mixer.split("+")),
                       mlp_hidden=self.mlp_hidden, num_heads=self.num_heads, head_k_dim=self.head_dim,
                       head_v_dim=self.head_dim, swa_heads=self.num_heads, swa_head_dim=self.head_dim, window=T,
                       max_seq_len=T, backend=self.backend)


PRESETS = {
    "full": StudyConfig(),
    # Minutes on a GPU: fewer steps, every mixer, lr and seed kept.
    "reduced": StudyConfig(steps=400, eval_examples=64),
    # Half an hour on a 2-core CPU: the paper's comparison (GDN-2, KDA and the two ablations) on short MQAR with a
    # small vocabulary, small models, 2 learning rates x 2 seeds. The recurrent backend (same maths as the chunk path)
    # trains about 4x faster than the chunk path on the CPU and compiles faster.
    "cpu_reduced": StudyConfig(mixers=("gdn2", "gdn2_b_only", "gdn2_w_only", "kda"), d_model=64, num_heads=2,
                               head_dim=32, mlp_hidden=128, vocab_size=128, learning_rates=(3e-3, 1e-2),
                               steps=3000, batch_size=8, train_mix=((32, 2), (32, 4), (64, 8)),
                               test_grid=((32, 2), (32, 4), (64, 4), (64, 8), (64, 16), (128, 8), (128, 16),
                                          (128, 32)),
                               eval_examples=64, backend="recurrent"),
    # A minute on a 2-core CPU: one short MQAR setting that a tiny one-block GDN-2 model learns (the CI test that
    # training works; the hybrid 'gdn2+swa' needs n_layers=2).
    "cpu_tiny": StudyConfig(mixers=("gdn2",), d_model=32, n_layers=1, num_heads=2, head_dim=16, mlp_hidden=64,
                            vocab_size=64, learning_rates=(5e-3,), seeds=(0,), steps=600, batch_size=64,
                            train_mix=((32, 4),), test_grid=((32, 4),), eval_examples=256, eval_batch_size=256,
                            backend="recurrent"),
    # Seconds on a CPU: the whole pipeline on a toy scale (tests and smoke runs).
    "cpu_smoke": StudyConfig(mixers=("gdn2", "attention"), d_model=32, num_heads=2, head_dim=16, mlp_hidden=64,
                             vocab_size=256, learning_rates=(3e-3, 1e-2), seeds=(0,), steps=3, batch_size=4,
                             train_mix=((32, 2), (64, 4)), test_grid=((32, 2), (64, 4), (64, 8)), eval_examples=4,
                             eval_batch_size=4),
}
# `--preset smoke --task all`: the whole pipeline (both tasks, training, scoring, the report, the merge) in under a
# minute on a CPU; the recurrent backend compiles fastest there.
PRESETS["smoke"] = dataclasses.replace(PRESETS["cpu_smoke"], d_model=16, head_dim=8, mlp_hidden=32, steps=2,
                                       test_grid=((32, 2), (64, 4)), backend="recurrent")


# ----------------------------------------------------------------------------------------------------------------
# Model pieces: logits only where the loss is taken.


def _hidden(model, tokens: Array) -> Array:
  """The final hidden states `[B, T, D]` before the output head (the model's own modules, in order)."""
  x = model.embed(tokens)
  for blk in model.layers:
    x = blk(x)
  return x


def gathered_metrics(model, tokens: Array, targets: Array, mask: Array, num_scored: int) -> dict:
  """`masked_metrics` on the first `num_scored` masked positions of each row, computing only their logits.

  MQAR scores at most T/4 positions per row; projecting only those onto the 8192-token vocabulary saves most of the
  step's memory traffic. Rows with fewer scored positions are padded with unscored ones. Models whose layers are
  scanned (`scan_layers`) fall back to the full logits.
  """
  if not hasattr(model, "layers") or not hasattr(model, "_logits"):
    return metrics.masked_metrics(model(tokens), targets, mask)
  # Stable order: the masked positions first, in sequence order.
  idx = jnp.argsort(~mask, axis=1, stable=True)[:, :num_scored]
  h = jnp.take_along_axis(_hidden(model, tokens), idx[..., None], axis=1)
  logits = model._logits(h)
  return metrics.masked_metrics(logits, jnp.take_along_axis(targets, idx, axis=1),
                                jnp.take_along_axis(mask, idx, axis=1))


# ----------------------------------------------------------------------------------------------------------------
# Training: all runs of one mixer in one vmapped program; all mixers stepped in turn on the same batches.


def lr_factor(step: Array, total: Array, warmup_fraction: float) -> Array:
  """Linear warm-up over `warmup_fraction * total` steps, then cosine from 1 to 0.1 at `total` (traced `total`, so
  the run length can be fixed after timing the first steps without recompiling)."""
  step = step.astype(jnp.float32)
  total = jnp.maximum(total.astype(jnp.float32), 2.0)
  warm = jnp.maximum(jnp.floor(warmup_fraction * total), 1.0)
  frac = jnp.clip((step - warm) / jnp.maximum(total - warm, 1.0), 0.0, 1.0)
  cos = 0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  return jnp.where(step < warm, (step + 1.0) / warm, cos)


def _optimizer(cfg: StudyConfig):
  import optax

  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # matrices only: no norms, biases, gates
  # The learning rate and its schedule multiply the update outside the chain, so they can differ per vmapped run.
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2),
                     optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def init_runs(cfg: StudyConfig, mixer: str):
  """`(graphdef, params [R, ...], rest [R, ...], opt_state [R, ...])` for the runs of `mixer` (R = lrs x seeds)."""
  from flax import nnx
  from gdn2_jax.models import LanguageModel

  mcfg = cfg.model_config(mixer)
  per_seed = {}
  for s in cfg.seeds:
    graphdef, params, rest = nnx.split(LanguageModel(mcfg, rngs=nnx.Rngs(s)), nnx.Param, ...)
    per_seed[s] = (params, rest)
  params = _stack([per_seed[s][0] for _, s in cfg.runs])
  rest = _stack([per_seed[s][1] for _, s in cfg.runs])
  opt_state = jax.vmap(_optimizer(cfg).init)(params)
  return graphdef, params, rest, opt_state


def make_train_step(cfg: StudyConfig, graphdef):
  """`(params, rest, opt_state, lrs [R], seed_of_run [R], step, total, tokens/targets/mask [S, B, T])
  -> (params, opt_state, loss [R])`, to be jitted."""
  import optax
  from flax import nnx

  tx = _optimizer(cfg)
  num_scored = cfg.num_scored_train

  def loss_fn(params, rest, tokens, targets, mask):
    model = nnx.merge(graphdef, params, rest)
    s = gathered_metrics(model, tokens, targets, mask, num_scored)
    return s["loss_sum"] / jnp.maximum(s["count"], 1.0)

  def one_run(params, rest, opt_state, lr, tokens, targets, mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens, targets, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
    return params, opt_state, loss

  def step(params, rest, opt_state, lrs, seed_of_run, step, total, tokens, targets, mask):
    tok, tgt, msk = tokens[seed_of_run], targets[seed_of_run], mask[seed_of_run]  # [R, B, T]: data by seed
    lrs = lrs * lr_factor(step, total, cfg.warmup_fraction)
    return jax.vmap(one_run)(params, rest, opt_state, lrs, tok, tgt, msk)

  return step


def train_batch(cfg: StudyConfig, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`[S, B, T]` tokens, targets, mask: one train-mix batch per seed (deterministic in seed and step; every
  mixer sees the same batches)."""
  if cfg.task == "mqar":
    mix = [tasks.MQARConfig(T, n, cfg.vocab_size) for T, n in cfg.train_mix]
    parts = [tasks.mqar_mixture(mix, cfg.batch_size, seed=1_000_003 * (s + 1) + step) for s in cfg.seeds]
  else:
    mix = [tasks.NIAHConfig(cfg.task, T, num_keys=n) for T, n in cfg.train_mix]
    parts = [niah_mixture(mix, cfg.batch_size, seed=1_000_003 * (s + 1) + step) for s in cfg.seeds]
  return tuple(np.stack([getattr(p, k) for p in parts]) for k in ("tokens", "targets", "mask"))


def niah_mixture(configs, batch_size: int, seed: int) -> tasks.TaskBatch:
  """Needle sequences, row i of `configs[i % len(configs)]` (depths spread evenly within each part), right-padded
  with unscored `<pad>` tokens to the longest: `tokens, targets, mask [B, T_max]`."""
  T = max(c.seq_len for c in configs)
  out = [np.zeros((batch_size, T), np.int32), np.zeros((batch_size, T), np.int32), np.zeros((batch_size, T), bool)]
  rng = np.random.default_rng(seed)
  for i, c in enumerate(configs):
    rows = np.arange(i, batch_size, len(configs))
    if len(rows):
      part = tasks.niah(c, len(rows), int(rng.integers(2**31)))
      for o, x in zip(out, (part.tokens, part.targets, part.mask)):
        o[rows, :c.seq_len] = x
  return tasks.TaskBatch(*out)


def make_eval(cfg: StudyConfig, graphdef):
  """`(params, rest, tokens [B, T], targets, mask) -> sums [R]` for every run at once, to be jitted."""
  from flax import nnx

  num_scored = cfg.num_scored_test

  def sums(params, rest, tokens, targets, mask):
    def one(p, r):
      return gathered_metrics(nnx.merge(graphdef, p, r), tokens, targets, mask, num_scored)

    return jax.vmap(one)(params, rest)

  return sums


def eval_batches(cfg: StudyConfig):
  """Per test setting: its `Setting` and batches right-padded to the longest T (one compiled shape; the models are
  causal, so tokens after a sequence change nothing in it)."""
  T_max = max(t for t, _ in cfg.test_grid)
  for T, n in cfg.test_grid:
    seed = cfg.eval_seed + 7919 * T + n
    if cfg.task == "mqar":
      b = tasks.mqar(tasks.MQARConfig(T, n, cfg.vocab_size), cfg.eval_examples, seed=seed)
    else:
      b = tasks.niah(tasks.NIAHConfig(cfg.task, T, num_keys=n), cfg.eval_examples, seed=seed)
    pad = ((0, 0), (0, T_max - T))
    batches = []
    for i in range(0, cfg.eval_examples, cfg.eval_batch_size):
      sl = slice(i, i + cfg.eval_batch_size)
      batches.append(tuple(np.pad(x[sl], pad) for x in (b.tokens, b.targets, b.mask)))
    yield Setting(cfg.task, T, n), batches


@dataclasses.dataclass
class MixerRuns:
  """The state of all runs of one mixer during the study."""

  mixer: str
  graphdef: Any
  params: Any
  rest: Any
  opt_state: Any
  step_fn: Any = None
  eval_fn: Any = None
  n_params: int = 0
  compile_s: float = 0.0
  losses: list = dataclasses.field(default_factory=list)
  error: Optional[str] = None


def _compile_one(cfg: StudyConfig, m: MixerRuns, lrs, seed_of_run, batch, eval_batch) -> MixerRuns:
  t0 = time.time()
  try:
    args = (m.params, m.rest, m.opt_state, lrs, seed_of_run, jnp.int32(0), jnp.int32(cfg.steps), *batch)
    m.step_fn = jax.jit(make_train_step(cfg, m.graphdef), donate_argnums=(0, 2)).lower(*args).compile()
    m.eval_fn = jax.jit(make_eval(cfg, m.graphdef)).lower(m.params, m.rest, *eval_batch).compile()
  except Exception as e:  # one broken mixer must not lose the others
    m.error = f"{type(e).__name__}: {e}"
  m.compile_s = time.time() - t0
  return m


def run_study(cfg: StudyConfig, log=print, params_dir: Optional[str] = None, compile_threads: int = 8,
              deadline: Optional[float] = None, eval_reserve_s: float = 30.0,
              compile_budget_s: Optional[float] = None) -> dict:
  """Trains every mixer's runs for the same number of steps on the same batches; returns `{mixer: entry}`.

  With `cfg.time_limit_s`, the step count is fixed after timing the first rounds so that training fits the budget
  (at most `cfg.steps`); every mixer still gets exactly that many steps. `deadline` (a `time.time()` value) lowers
  that budget further so that evaluation (`eval_reserve_s`) still ends before it. Mixers are compiled in
  `compile_threads` threads (1: one after the other, in `cfg.mixers` order); with `compile_budget_s`, mixers whose
  compilation has not started when it runs out are skipped (and listed as such), so a time-boxed call still reports
  the ones that compiled.
  """
  from concurrent.futures import ThreadPoolExecutor
  from gdn2_jax.models import count_params

  t0 = time.time()
  lrs = jnp.asarray([lr for lr, _ in cfg.runs], jnp.float32)
  seed_of_run = jnp.asarray([cfg.seeds.index(s) for _, s in cfg.runs], jnp.int32)
  runs: list[MixerRuns] = []
  for mixer in cfg.mixers:
    graphdef, params, rest, opt_state = init_runs(cfg, mixer)
    runs.append(MixerRuns(mixer, graphdef, params, rest, opt_state, n_params=count_params(cfg.model_config(mixer))))
  log(f"init {len(runs)} mixers x {len(cfg.runs)} runs in {time.time() - t0:.1f}s; compiling in "
      f"{compile_threads} thread(s)")
  batch = train_batch(cfg, 0)
  evals = list(eval_batches(cfg))
  t1 = time.time()

  def compile_one(m: MixerRuns) -> MixerRuns:
    if compile_budget_s is not None and time.time() - t1 > compile_budget_s:
      m.error = f"skipped: compile budget of {compile_budget_s:.0f}s spent before it started"
    else:
      _compile_one(cfg, m, lrs, seed_of_run, batch, evals[0][1][0])
    log(f"[{m.mixer}] {m.n_params:,} params; compiled in {m.compile_s:.1f}s" +
        (f"; FAILED {m.error}" if m.error else ""))
    return m

  if compile_threads <= 1:
    for m in runs:
      compile_one(m)
  else:
    with ThreadPoolExecutor(min(compile_threads, len(runs))) as pool:
      list(pool.map(compile_one, runs))
  log(f"compile wall {time.time() - t1:.1f}s")
  live = [m for m in runs if m.error is None]

  total = cfg.steps
  budget = cfg.time_limit_s
  if deadline is not None:
    budget = min(budget or float("inf"), max(1.0, deadline - time.time() - eval_reserve_s))
  t_train = time.time()
  done = 0
  calib = 3
  for step in range(cfg.steps):
    if step >= total:
      break
    for m in live:
      m.params, m.opt_state, loss = m.step_fn(m.params, m.rest, m.opt_state, lrs, seed_of_run, jnp.int32(step),
                                              jnp.int32(total), *batch)
      if step % 50 == 0 or step + 1 == total:
        m.losses.append((step, loss))
    batch = train_batch(cfg, step + 1)  # on the host while the device runs this round
    done = step + 1
    if step == calib - 1 and budget:
      jax.block_until_ready([m.params for m in live])
      t_warm = time.time()
    if step == 2 * calib - 1 and budget:
      jax.block_until_ready([m.params for m in live])
      per_round = (time.time() - t_warm) / calib
      left = budget - (time.time() - t_train)
      total = max(done, min(cfg.steps, done + int(left / per_round)))
      log(f"timing: {per_round * 1e3:.1f} ms per round of {len(live)} mixers; training for {total} steps")
    if step % 100 == 0:
      log(f"step {step}: " + "  ".join(f"{m.mixer} {float(jnp.mean(m.losses[-1][1])):.3f}" for m in live
                                       if m.losses))
  jax.block_until_ready([m.params for m in live])
  train_s = time.time() - t_train
  log(f"trained {done} steps per mixer in {train_s:.1f}s")

  out = {}
  for m in runs:
    if m.error:
      out[m.mixer] = {"error": m.error, "runs": [], "settings": {}}
      continue
    t_eval = time.time()
    settings = {}
    for st, batches in evals:
      tot: dict = {}
      for b in batches:
        s = m.eval_fn(m.params, m.rest, *(jnp.asarray(x) for x in b))
        tot = {k: np.asarray(v, np.float64) + tot.get(k, 0.0) for k, v in s.items()}
      per_run = [metrics.summarize({k: v[r] for k, v in tot.items()}).as_dict() for r in range(len(cfg.runs))]
      settings[st.name] = {"task": cfg.task, "seq_len": st.seq_len, "num_pairs": st.num_pairs, "depth": None,
                           "per_run": per_run}
      log(f"[{m.mixer}] {st.name:28s} acc % " + " ".join(f"{100 * r['accuracy']:5.1f}" for r in per_run))
    entry = {"runs": [{"label": f"lr={lr:g},seed={s}", "lr": lr, "seed": s} for lr, s in cfg.runs],
             "settings": settings, "steps_done": done, "params": m.n_params,
             "loss_curve": [(st, [float(x) for x in l]) for st, l in m.losses],
             "timing_s": {"compile": m.compile_s, "train_all_mixers": train_s, "eval": time.time() - t_eval}}
    if params_dir and m.mixer == "gdn2":
      best = report.best_runs(entry)[0]
      path = os.path.join(params_dir, "gdn2_params.npz")
      save_params(path, jax.tree.map(lambda x: x[best], m.params))
      entry["saved_params"] = {"path": os.path.basename(path), "run": entry["runs"][best]["label"]}
    out[m.mixer] = entry
  return out


def save_params(path: str, params) -> None:
  """Writes an `nnx.Param` state as a flat `.npz` (keys: '/'-joined paths); `load_params` reads it back."""
  flat = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez_compressed(path, **flat)


def load_params(path: str, model) -> None:
  """Loads `save_params` output into `model` (an `nnx.Module` of the same config), in place."""
  from flax import nnx

  state = nnx.state(model, nnx.Param)
  data = np.load(path)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  new = []
  for p, x in leaves:
    key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
    if key not in data:
      raise ValueError(f"`{path}` has no parameter {key!r}; was it saved from a model of another config?")
    if data[key].shape != x.shape:
      raise ValueError(f"parameter {key!r} has shape {data[key].shape} in `{path}`; expected {x.shape}.")
    new.append(jnp.asarray(data[key], x.dtype))
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))


# ----------------------------------------------------------------------------------------------------------------
# Command line.


def enable_compilation_cache(path: str) -> None:
  """Stores every compiled program under `path` (JAX's persistent cache), so that a later process on the same
  machine and software loads the study's train and eval programs instead of compiling them again."""
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _device() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')}"


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m evaluation.replicate", description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="full", choices=sorted(PRESETS))
  p.add_argument("--task", default=None, choices=TASKS + ("all",),
                 help="the trained task (default: the preset's, MQAR); mk_niah_1 keeps the preset's models and grid;"
                      " all: each task in turn into OUT/<task>/, merged into OUT/results.md")
  p.add_argument("--cache-dir", default=os.environ.get("GDN2_JAX_CACHE_DIR"),
                 help="persistent JAX compilation cache: a later call on the same machine reuses compiled programs "
                      "(default: $GDN2_JAX_CACHE_DIR, unset: no cache)")
  p.add_argument("--mixers", default=None, help="comma-separated subset of mixers")
  p.add_argument("--steps", type=int, default=None, help="training steps (the most, with --time-limit)")
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--vocab-size", type=int, default=None,
                 help="MQAR vocabulary (keys in the lower half, values in the upper half; default: the preset's)")
  p.add_argument("--lrs", default=None, help="comma-separated learning rates")
  p.add_argument("--seeds", default=None, help="comma-separated seeds")
  p.add_argument("--eval-examples", type=int, default=None)
  p.add_argument("--backend", default=None, help="GDN-2 op backend of the models (chunk, recurrent, auto, pallas)")
  p.add_argument("--time-limit", type=float, default=None,
                 help="seconds of training (all mixers together): fixes the step count after timing 6 rounds")
  p.add_argument("--deadline", type=float, default=None,
                 help="seconds from start by which everything (evaluation included) should be done")
  p.add_argument("--compile-threads", type=int, default=8, help="mixers compiled at once (1: in order)")
  p.add_argument("--compile-budget", type=float, default=None,
                 help="seconds of compiling after which mixers not yet started are skipped")
  p.add_argument("--out", default="experiments/mqar")
  p.add_argument("--no-plots", action="store_true", help="write tables only (plot later with evaluation.report)")
  return p.parse_args(argv)


def config_from_args(args) -> StudyConfig:
  cfg = PRESETS[args.preset]
  if args.task:
    cfg = cfg.for_task(args.task)
  kw: dict[str, Any] = {}
  if args.mixers:
    kw["mixers"] = tuple(args.mixers.split(","))
  if args.steps is not None:
    kw["steps"] = args.steps
  if args.batch_size is not None:
    kw["batch_size"] = args.batch_size
  if args.lrs:
    kw["learning_rates"] = tuple(float(x) for x in args.lrs.split(","))
  if args.seeds:
    kw["seeds"] = tuple(int(x) for x in args.seeds.split(","))
  if args.eval_examples is not None:
    kw["eval_examples"] = args.eval_examples
  if args.time_limit is not None:
    kw["time_limit_s"] = args.time_limit
  if args.backend:
    kw["backend"] = args.backend
  if args.vocab_size is not None:
    if cfg.task != "mqar":
      raise SystemExit(f"--vocab-size is for MQAR; the {cfg.task} task uses the word vocabulary.")
    kw["vocab_size"] = args.vocab_size
  return dataclasses.replace(cfg, **kw)


def _run_task(cfg: StudyConfig, args, argv, out_dir: str, log) -> dict:
  """Trains and scores one task; writes `out_dir/results.json` (with device, date and command) and the report."""
  started = time.time()
  log(f"study ({cfg.task}): {len(cfg.mixers)} mixers x {len(cfg.runs)} runs, up to {cfg.steps} steps of "
      f"{cfg.batch_size}, device {_device()}")
  entries = run_study(cfg, log, params_dir=out_dir, compile_threads=args.compile_threads,
                      deadline=None if args.deadline is None else _START + args.deadline,
                      compile_budget_s=args.compile_budget)
  steps = max([e.get("steps_done", 0) for e in entries.values()] or [0])
  results = {
      "meta": {"command": "python -m evaluation.replicate " + " ".join(argv), "device": _device(), "task": cfg.task,
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "jax": jax.__version__, "wall_s": round(time.time() - started, 1),
               "note": f"{cfg.task}: {steps} steps x {cfg.batch_size} sequences per run (every mixer the same steps "
                       f"and batches); best lr per model by seed-mean accuracy over the task's settings; mean ± std "
                       f"over seeds {list(cfg.seeds)}"},
      "study": dataclasses.asdict(cfg),
      "models": {m: e for m, e in entries.items() if "error" not in e},
      "failed": {m: e["error"] for m, e in entries.items() if "error" in e},
  }
  title = {"mqar": "MQAR replication", "mk_niah_1": "MK-NIAH-1 replication"}[cfg.task]
  paths = report.write(results, out_dir, title=title, plots=not args.no_plots)
  for name, best in report.not_learned(results).items():
    log(f"WARNING: [{name}] no run reached {100 * report.NOT_LEARNED:.0f}% accuracy on any setting (best "
        f"{100 * best:.1f}%): it did not learn {cfg.task}")
  log(f"wrote {paths['markdown']} in {time.time() - started:.0f}s")
  return results


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parse(argv)
  task_names = list(TASKS) if args.task == "all" else [args.task]
  if args.cache_dir:
    enable_compilation_cache(args.cache_dir)
  os.makedirs(args.out, exist_ok=True)
  logf = open(os.path.join(args.out, "log.txt"), "a")

  def log(msg):
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    logf.write(line + "\n")
    logf.flush()

  failed = False
  parts = []
  for task in task_names:
    args.task = task
    cfg = config_from_args(args)
    out_dir = args.out if len(task_names) == 1 else os.path.join(args.out, cfg.task)
    os.makedirs(out_dir, exist_ok=True)
    results = _run_task(cfg, args, argv, out_dir, log)
    failed |= bool(results["failed"])
    parts.append(os.path.join(out_dir, "results.json"))
  if len(parts) > 1:  # one report over both tasks, as `python -m evaluation.report OUT parts...` writes it
    report.main([args.out] + parts)
  print(open(os.path.join(args.out, "results.md")).read())
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
