"""The training loop: state on a mesh, a jitted step, held-out evaluation, checkpoints, metrics.

Train state (a plain dict pytree, what checkpoints hold):
  params:    `nnx.State` of float32 master weights, sharded by the logical-axis rules
  rest:      the model's non-parameter state (empty for the GDN-2 models), replicated
  opt_state: optax AdamW state (moments sharded as their parameters)
  step:      int32 optimiser steps taken
The step computes in the model's `dtype` (bf16 on GPUs) from the float32 weights and applies float32 updates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gdn2_jax import parallel
from train import data as data_lib
from train import metrics as metrics_lib
from train import optim as optim_lib
from train import sharding as sharding_lib
from train.config import RunError, TrainConfig, to_dict, validate

log = logging.getLogger("train")


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm became NaN/inf; the message names the step and the last good checkpoint."""


# ---------------------------------------------------------------------------------------------------------------
# Model and state


def abstract_model(model_cfg, seed: int = 0):
  """`(graphdef, abstract params, abstract rest)` without allocating."""
  from gdn2_jax.models import LanguageModel
  model = nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(seed)))
  return nnx.split(model, nnx.Param, ...)


@dataclasses.dataclass
class StateSetup:
  graphdef: Any
  state: dict
  shardings: dict
  report: dict
  matmul_params: int
  num_params: int


_INIT_CACHE: dict = {}


def init_state(model_cfg, tx: optax.GradientTransformation, mesh, seed: int) -> StateSetup:
  """Initialises params (directly sharded: each device creates only its shard) and the optimiser state."""
  from gdn2_jax.models import LanguageModel
  graphdef, abs_params, abs_rest = abstract_model(model_cfg, seed)
  shardings = state_shardings(model_cfg, tx, mesh, abs_params, abs_rest)
  _, report = sharding_lib.param_shardings(abs_params, mesh, model_cfg)

  key = (model_cfg, tx, mesh, seed)
  if key not in _INIT_CACHE:  # a resumed or repeated run in this process does not trace and compile again
    def init():
      _, p, r = nnx.split(LanguageModel(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
      return p, r
    _INIT_CACHE.clear()
    _INIT_CACHE[key] = (jax.jit(init, out_shardings=(shardings["params"], shardings["rest"])),
                        jax.jit(tx.init, out_shardings=shardings["opt_state"]))
  init_params, init_opt = _INIT_CACHE[key]
  params, rest = init_params()
  opt_state = init_opt(params)
  state = {"params": params, "rest": rest, "opt_state": opt_state,
           "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])}
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(abs_params))
  return StateSetup(graphdef, state, shardings, report, metrics_lib.matmul_param_count(model_cfg, abs_params), n)


def state_shardings(model_cfg, tx, mesh, abs_params, abs_rest) -> dict:
  """Shardings of the train state: params by the logical rules, Adam moments as their params, the rest replicated."""
  p_sh, _ = sharding_lib.param_shardings(abs_params, mesh, model_cfg)
  rep = sharding_lib.replicated(mesh)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  o_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, p_sh, transform_non_params=lambda _: rep,
                               is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return {"params": p_sh, "rest": jax.tree.map(lambda _: rep, abs_rest), "opt_state": o_sh, "step": rep}


def abstract_state(state) -> Any:
  """ShapeDtypeStructs (with shardings) of `state`: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# ---------------------------------------------------------------------------------------------------------------
# Loss and steps


def loss_sums(graphdef, params, rest, batch) -> tuple[jax.Array, jax.Array]:
  """(sum of masked next-token NLL, number of counted tokens) for `batch` of `[B, T]` arrays."""
  model = nnx.merge(graphdef, params, rest)
  logits = model(batch["tokens"], segment_ids=batch.get("segment_ids"))  # no segment ids: one document per row
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def _micro_batches(batch: dict, n: int) -> dict:
  """`[B, T]` -> `[n, B / n, T]`, micro-batch j = rows j, j + n, ...: each device's rows stay on it (no traffic)."""
  def split(x):
    B = x.shape[0]
    return jnp.swapaxes(x.reshape((B // n, n) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable, *, grad_accum: int,
                    shardings: dict, batch_sharding, mesh) -> Callable:
  """The jitted `step(state, batch) -> (state, metrics)`; the mixer op runs per shard of `mesh`."""

  def grads_of(params, rest, batch):
    (lsum, count), grads = jax.value_and_grad(
        lambda p: loss_sums(graphdef, p, rest, batch), has_aux=True)(params)
    return lsum, count, grads

  def step(state, batch):
    params, rest = state["params"], state["rest"]
    if grad_accum == 1:
      lsum, count, grads = grads_of(params, rest, batch)
    else:
      def body(carry, micro):
        l, c, g = carry
        dl, dc, dg = grads_of(params, rest, micro)
        return (l + dl, c + dc, jax.tree.map(jnp.add, g, dg)), None
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (lsum, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), _micro_batches(batch, grad_accum))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new = dict(state, params=optax.apply_updates(params, updates), opt_state=opt_state, step=state["step"] + 1)
    metrics = {"loss": lsum / denom, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "tokens": count}
    return new, metrics

  rep = sharding_lib.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, rep),
                   donate_argnums=0)

  def run(state, batch):
    with parallel.mixer_mesh(mesh):  # read while tracing: the op goes under shard_map
      return jitted(state, batch)

  run.jitted = jitted
  return run


def make_eval_step(graphdef, *, shardings: dict, batch_sharding, mesh) -> Callable:
  """Jitted `(state, batch) -> (nll sum, token count)`."""
  rep = sharding_lib.replicated(mesh)
  jitted = jax.jit(lambda st, b: loss_sums(graphdef, st["params"], st["rest"], b),
                   in_shardings=(shardings, batch_sharding), out_shardings=(rep, rep))

  def run(state, batch):
    with parallel.mixer_mesh(mesh):
      return jitted(state, batch)
  return run


def to_global(batch: dict, batch_sharding) -> dict:
  """This process's rows `{name: [B_local, T]}` -> global arrays split over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in batch.items()}


def evaluate(eval_step, state, batches: list, batch_sharding) -> float:
  """Mean held-out NLL per token over `batches`."""
  total, count = 0.0, 0.0
  for b in batches:
    s, c = eval_step(state, to_global(b, batch_sharding))
    total += float(s)
    count += float(c)
  return total / max(count, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# The run


_STEP_CACHE: dict = {}


def _compiled_steps(model_cfg, optim_cfg, total_steps: int, mesh):
  """(tx, schedule, train_step, eval_step) for these configs, reused within a process (so a resumed or repeated
  run in the same process does not compile again). Everything here is a function of the hashable key."""
  key = (model_cfg, optim_cfg, total_steps, mesh)
  if key not in _STEP_CACHE:
    tx, schedule = optim_lib.make_optimizer(optim_cfg, total_steps)
    graphdef, abs_params, abs_rest = abstract_model(model_cfg)
    shardings = state_shardings(model_cfg, tx, mesh, abs_params, abs_rest)
    b_sh = sharding_lib.batch_sharding(mesh)
    train_step = make_train_step(graphdef, tx, schedule, grad_accum=optim_cfg.grad_accum, shardings=shardings,
                                 batch_sharding=b_sh, mesh=mesh)
    eval_step = make_eval_step(graphdef, shardings=shardings, batch_sharding=b_sh, mesh=mesh)
    _STEP_CACHE.clear()  # keep one entry: compiled executables are large
    _STEP_CACHE[key] = (tx, schedule, train_step, eval_step)
  return _STEP_CACHE[key]


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm import tqdm
  except ImportError:
    return None
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")


def _checkpoint_dir(cfg: TrainConfig) -> str:
  return os.path.abspath(cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints"))


RECORDS = ("metrics.jsonl", "final_eval.json", "loss.png", "config.json", "heldout_tokens.npy")


def _saved_steps(ckpt_dir: str) -> list[int]:
  """Finalised step directories in `ckpt_dir` (integer names), read without orbax."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def _prior_run(cfg: TrainConfig, ckpt_dir: str) -> Optional[dict]:
  """Applies the run-directory rules before any work; returns the stored summary of a complete run, else None.

  - resume=false on a directory that holds a run: refused unless checkpoint.overwrite=true (which deletes it).
  - resume=true and the newest checkpoint is the last step with final_eval.json written: the run is complete.
  - resume=true, no checkpoint but a final_eval.json: refused (its results would be overwritten by a new run).
  """
  steps = _saved_steps(ckpt_dir)
  records = [n for n in RECORDS[:2] if os.path.exists(os.path.join(cfg.run_dir, n))]
  final = os.path.join(cfg.run_dir, "final_eval.json")
  held = ", ".join(([f"checkpoints at steps {steps} in {ckpt_dir}"] if steps else []) + records)
  if not cfg.checkpoint.resume:
    if not (steps or records):
      return None
    if not cfg.checkpoint.overwrite:
      raise RunError(f"run_dir {cfg.run_dir} already holds a run ({held}) and checkpoint.resume=false would replace "
                     "it; use a new run_dir, or set checkpoint.overwrite=true to delete it and start again.")
    import shutil
    for step in steps:  # tolerant of missing files: every process of a multi-host run gets here
      shutil.rmtree(os.path.join(ckpt_dir, str(step)), ignore_errors=True)
    for name in RECORDS:
      try:
        os.remove(os.path.join(cfg.run_dir, name))
      except FileNotFoundError:
        pass
    log.info("checkpoint.overwrite=true: deleted the earlier run in %s (%s)", cfg.run_dir, held)
    return None
  if cfg.checkpoint.resume_step is not None:
    if cfg.checkpoint.resume_step not in steps:
      raise RunError(f"checkpoint.resume_step={cfg.checkpoint.resume_step}: {ckpt_dir} has no such checkpoint "
                     f"(it has steps {steps}); pick one of those.")
    return None
  if os.path.exists(final) and not steps:
    raise RunError(f"run_dir {cfg.run_dir} holds a finished run's results ({held}) but no checkpoint in {ckpt_dir}; "
                   "use a new run_dir, or checkpoint.resume=false checkpoint.overwrite=true to replace it.")
  if steps and steps[-1] >= cfg.steps and os.path.exists(final):
    try:
      with open(final) as f:
        stored = json.load(f)
    except (OSError, ValueError):
      return None  # an unreadable summary is written again from the last checkpoint
    msg = (f"run_dir {cfg.run_dir} is complete (step {steps[-1]} of {cfg.steps}); nothing to train. Its results: "
           f"{final}, metrics.jsonl and loss.png there. Use a new run_dir (or a larger steps=) to train more.")
    return dict(stored, complete=True, message=msg)
  return None


HELDOUT_SAMPLE = "heldout_tokens.npy"
HELDOUT_SAMPLE_TOKENS = 2**18  # 128 windows of 2048: enough for `evaluation`'s held-out perplexity


def write_heldout_sample(run_dir: str, heldout) -> str:
  """Writes the first `HELDOUT_SAMPLE_TOKENS` tokens of the held-out stream to `run_dir/heldout_tokens.npy` (once).

  `evaluation` scores held-out perplexity from it, so a run directory needs neither the corpus nor its cache.
  """
  path = os.path.join(run_dir, HELDOUT_SAMPLE)
  if not os.path.isfile(path):
    head = np.asarray(heldout.head(HELDOUT_SAMPLE_TOKENS))
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, head.astype(np.uint16 if int(head.max(initial=0)) < 2**16 else np.uint32))
    os.replace(tmp, path)
  return path


def _diverged_message(ckpt, step: int, loss: float, gnorm: float) -> str:
  """The NaN stop: the parameters saved at step - 1 produced this step's NaN (finite, possibly huge), so the last
  good checkpoint is the newest one before step - 1."""
  ckpt.wait()
  older = [s for s in ckpt.all_steps() if s < step - 1]
  where = (f"step {older[-1]} in {ckpt.directory} (resume from it with checkpoint.resume_step={older[-1]})"
           if older else "none (no checkpoint before the diverging parameters)")
  return (f"loss is {loss} (grad norm {gnorm}) at step {step}; training stopped. Last good checkpoint: {where}. "
          "Lower optim.lr or check the data.")


def run(cfg: TrainConfig, *, devices=None, corpus: Optional[data_lib.Corpus] = None) -> dict:
  """Trains `cfg` end to end; returns a summary (first/last losses, final held-out loss, throughput, paths).

  Every setting is validated and the run directory checked before any work. A complete run is not trained again:
  its stored summary comes back with `complete=True` and a `message`. Raises ConfigError/DataError for bad input,
  RunError for run-directory and disk problems (one-line messages) and TrainingDiverged on a NaN/inf loss.
  """
  t_start = time.time()
  validate(cfg)
  ckpt_dir = _checkpoint_dir(cfg)
  done = _prior_run(cfg, ckpt_dir)
  if done is not None:
    return done
  from train.checkpoint import Checkpointer, check_writable  # orbax: only the full run needs it
  check_writable(cfg.run_dir)
  check_writable(ckpt_dir)
  sharding_lib.maybe_initialize_distributed(cfg.mesh)
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  pcount, pindex = jax.process_count(), jax.process_index()
  sharding_lib.check_batch(cfg.batch_size, mesh, cfg.optim.grad_accum, pcount)
  sharding_lib.check_context(mesh, cfg.model, cfg.data.seq_len)
  is_main = pindex == 0

  # Data (the tokenizer fixes the vocabulary: the model's vocab_size follows it).
  if corpus is None:
    corpus = data_lib.build_corpus(cfg.data)
  model_cfg = cfg.model
  if model_cfg.vocab_size != corpus.vocab_size:
    model_cfg = model_cfg.replace(vocab_size=corpus.vocab_size)
  if cfg.data.seq_len > model_cfg.max_seq_len:
    model_cfg = model_cfg.replace(max_seq_len=cfg.data.seq_len)
  local_batch = cfg.batch_size // pcount
  train_ds = data_lib.make_train_dataset(corpus.train, batch_per_process=local_batch, seed=cfg.data.seed,
                                         shuffle=cfg.data.shuffle, process_index=pindex, process_count=pcount,
                                         read_threads=cfg.data.read_threads, prefetch=cfg.data.prefetch)
  data_iter = iter(train_ds)
  eval_batches = []
  if corpus.heldout is not None and cfg.eval_batches > 0:
    eval_batches = data_lib.make_eval_batches(corpus.heldout, batch_per_process=local_batch,
                                              num_batches=cfg.eval_batches, process_index=pindex,
                                              process_count=pcount)

  # State, steps, checkpoints.
  ckpt = Checkpointer(ckpt_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                      async_save=cfg.checkpoint.async_save, model_config=model_cfg, tokenizer=corpus.tokenizer)
  if cfg.checkpoint.resume and ckpt.all_steps():  # another model's checkpoint: say so before building anything
    _, abs_params, abs_rest = abstract_model(model_cfg, cfg.seed)
    tx_shape, _ = optim_lib.make_optimizer(cfg.optim, cfg.steps)
    ckpt.compatible(ckpt.all_steps()[-1], {"params": abs_params, "rest": abs_rest,
                                           "opt_state": jax.eval_shape(tx_shape.init, abs_params),
                                           "step": jax.ShapeDtypeStruct((), jnp.int32)})
  tx, schedule, train_step, eval_step = _compiled_steps(model_cfg, cfg.optim, cfg.steps, mesh)
  setup = init_state(model_cfg, tx, mesh, cfg.seed)
  state = setup.state
  start = 0
  if cfg.checkpoint.resume:
    step, restored, it = ckpt.restore_newest(abstract_state(state), lambda: iter(train_ds),
                                             below=cfg.checkpoint.resume_step)
    if step is not None:
      start, state, data_iter = step, restored, it
      for newer in [s for s in ckpt.all_steps() if s > step]:  # only with resume_step: the user chose this step
        log.info("checkpoint step %d set aside as %s (resuming from step %d)", newer,
                 ckpt.set_aside(newer, "superseded"), step)
      log.info("resumed from step %d of %s", start, ckpt.directory)

  try:
    mlog = metrics_lib.MetricsLog(cfg.run_dir, tensorboard=cfg.tensorboard, resume_from=start, enabled=is_main)
    if is_main:
      with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        json.dump({"train": to_dict(dataclasses.replace(cfg, model=None)), "model": dataclasses.asdict(model_cfg),
                   "mesh": sharding_lib.describe(mesh), "num_params": setup.num_params,
                   "replicated_fallbacks": setup.report}, f, indent=1, default=str)
      if corpus.heldout is not None:
        write_heldout_sample(cfg.run_dir, corpus.heldout)
    summary = _train(cfg, mesh, setup, state, start, data_iter, train_step, eval_step, eval_batches, corpus, ckpt,
                     mlog, model_cfg, schedule, t_start, is_main)
  except OSError as e:  # a record could not be written (full or read-only disk)
    raise RunError(f"writing {e.filename or cfg.run_dir} failed: {e.strerror or e}; the last complete checkpoint is "
                   f"{ckpt.last_complete()}. Free space or make it writable, then run again to resume.") from None
  return summary


def _train(cfg, mesh, setup, state, start, data_iter, train_step, eval_step, eval_batches, corpus, ckpt, mlog,
           model_cfg, schedule, t_start, is_main) -> dict:
  """The step loop, the final evaluation and the run's records (`run` has prepared everything)."""
  b_sh = sharding_lib.batch_sharding(mesh)
  eval_loss = None
  peak = cfg.peak_flops or metrics_lib.device_peak_flops(jax.devices()[0].device_kind)
  fpt = metrics_lib.flops_per_token(model_cfg, cfg.data.seq_len, setup.matmul_params)
  tokens_per_step = cfg.batch_size * cfg.data.seq_len
  log.info("model: %.2fM params; mesh %s; %d tokens/step", setup.num_params / 1e6, sharding_lib.describe(mesh),
           tokens_per_step)

  last = cfg.steps if cfg.stop_at is None else max(min(cfg.stop_at, cfg.steps), start)
  if start == 0 and 0 not in ckpt.all_steps():  # the initial parameters: the last good one if step 2 diverges
    ckpt.save(0, state, data_iter, force=True)
  if eval_batches and start == 0 and cfg.eval_every > 0:  # the untrained model's held-out loss, for the plot
    eval_loss = evaluate(eval_step, state, eval_batches, b_sh)
    mlog.write({"step": 0, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0))})
  bar = _progress(cfg.steps, start, cfg.progress and is_main)
  first_loss = last_loss = None
  step_times = []
  t_prev = time.time()
  failed = True
  try:
    for step in range(start + 1, last + 1):
      batch = to_global(next(data_iter), b_sh)
      state, m = train_step(state, batch)
      loss, gnorm, lr = float(m["loss"]), float(m["grad_norm"]), float(m["lr"])
      now = time.time()
      dt, t_prev = now - t_prev, now
      if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise TrainingDiverged(_diverged_message(ckpt, step, loss, gnorm))
      if step > start + 1:  # the first step of a process includes compilation
        step_times.append(dt)
      first_loss = loss if first_loss is None else first_loss
      last_loss = loss
      tps = tokens_per_step / dt
      record = {"step": step, "loss": loss, "ppl": math.exp(min(loss, 50.0)), "lr": lr, "grad_norm": gnorm,
                "tokens_per_s": tps, "step_time_s": dt, "elapsed_s": now - t_start}
      if peak:
        record["mfu"] = fpt * tps / (peak * mesh.size)
      if step % cfg.log_every == 0 or step == last or step == start + 1:
        mlog.write(record)
      if eval_batches and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != last:
        eval_loss = evaluate(eval_step, state, eval_batches, b_sh)
        mlog.write({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0))})
        t_prev = time.time()  # evaluation time is not step time
      ckpt.save(step, state, data_iter, force=step == last)
      if bar is not None:
        post = {"loss": f"{loss:.3f}", "tok/s": f"{tps:,.0f}"}
        if eval_loss is not None:
          post["eval"] = f"{eval_loss:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
    failed = False
  finally:
    if bar is not None:
      bar.close()
    if failed:  # the first error is the one to report; a pending save's failure must not replace it
      try:
        ckpt.wait()
      except RunError:
        pass
    else:
      ckpt.wait()

  # The whole run's first and last losses, across resumes (the log keeps the steps before the resume).
  losses = {r["step"]: r["loss"] for r in mlog.records() if "loss" in r}
  first_loss = losses.get(1, first_loss)
  last_loss = losses.get(last, last_loss)
  summary = {"steps": last, "resumed_from": start, "first_loss": first_loss, "last_loss": last_loss,
             "num_params": setup.num_params, "mesh": sharding_lib.describe(mesh),
             "tokens_per_step": tokens_per_step, "vocab_size": model_cfg.vocab_size,
             "train_tokens_available": corpus.train.num_tokens}
  if step_times:
    med = float(np.median(step_times))
    summary["median_step_s"] = med
    summary["tokens_per_s"] = tokens_per_step / med
    if peak:
      summary["mfu"] = fpt * tokens_per_step / med / (peak * mesh.size)
  if eval_batches:
    final = evaluate(eval_step, state, eval_batches, b_sh)
    summary["eval_loss"] = final
    summary["eval_ppl"] = math.exp(min(final, 50.0))
    mlog.write({"step": last, "eval_loss": final, "eval_ppl": summary["eval_ppl"]})
  summary["wall_s"] = time.time() - t_start
  if is_main:
    summary["plot"] = metrics_lib.plot_losses(mlog.records(), os.path.join(cfg.run_dir, "loss.png"))
    summary["metrics"] = mlog.path
    tmp = os.path.join(cfg.run_dir, "final_eval.json.tmp")
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(cfg.run_dir, "final_eval.json"))
  mlog.close()
  ckpt.close()
  summary["state"] = state
  return summary
