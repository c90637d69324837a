"""Training loop: resume exactness, optimiser recipe, gradient accumulation, bad-input errors, NaN stop."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import loop, optim, sharding
from train.config import ConfigError, MeshConfig, OptimConfig, TrainConfig, apply_overrides
from train.main import main
from train.testing import tiny_config, tiny_model, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus") / "c.jsonl"), n_docs=240, seed=2)


def _losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


ONE = jax.devices()[:1]


def test_resume_is_exact_step_for_step(tmp_path, corpus):
  """N steps in one go == N/2 steps, stop, resume from the checkpoint (params, Adam, step, data), N/2 more."""
  full = tiny_config(str(tmp_path / "full"), corpus, steps=6)
  full_state = loop.run(full, devices=ONE)["state"]
  split = tiny_config(str(tmp_path / "split"), corpus, steps=6)
  first = loop.run(dataclasses.replace(split, stop_at=3), devices=ONE)
  assert first["steps"] == 3 and first["resumed_from"] == 0
  second = loop.run(split, devices=ONE)
  assert second["resumed_from"] == 3
  a, b = _losses(full.run_dir), _losses(split.run_dir)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in a:  # float32 on the CPU: bit-identical
    assert a[step] == b[step], (step, a[step], b[step])
  assert a[6] < a[1]
  for x, y in zip(jax.tree.leaves(full_state), jax.tree.leaves(second["state"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # two extra compiles; the fast tier keeps resume, meshes, data and errors
def test_grad_accumulation_matches_one_batch(corpus):
  mc = tiny_model(vocab_size=300)
  tx, schedule = optim.make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10)
  mesh = sharding.make_mesh(MeshConfig(), ONE)
  b_sh = sharding.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 300, (4, 32)).astype(np.int32),
           "targets": rng.integers(0, 300, (4, 32)).astype(np.int32),
           "segment_ids": np.repeat(np.arange(1, 5), 8)[None].repeat(4, 0).astype(np.int32),
           "loss_mask": (rng.random((4, 32)) > 0.2).astype(np.float32)}
  out = []
  for accum in (1, 2):
    setup = loop.init_state(mc, tx, mesh, seed=0)
    step = loop.make_train_step(setup.graphdef, tx, schedule, grad_accum=accum, shardings=setup.shardings,
                                batch_sharding=b_sh, mesh=mesh)
    state, m = step(setup.state, loop.to_global(batch, b_sh))
    out.append((m, state["params"]))
  (m1, p1), (m2, p2) = out
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
  # Adam's first step is nearly sign(g) * lr, so compare updates on the scale of lr.
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-2 * 1e-2)


def test_weight_decay_mask_and_schedule():
  _, params, _ = loop.abstract_model(tiny_model(pattern=("gdn2", "swa")))
  mask = optim.decay_mask(params)
  names = {optim.path_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  no_decay = [n for n, m in names.items() if not m]
  assert any("A_log" in n for n in no_decay) and any("dt_bias" in n for n in no_decay)
  for n, m in names.items():
    if any(s in n for s in ("A_log", "dt_bias", "norm", "bias")):
      assert not m, n
    if n.endswith(("q_proj.kernel", "w1.kernel", "lm_head", "embed.embedding")):
      assert m, n
  cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
  s = optim.lr_schedule(cfg, 100)
  assert float(s(0)) == 0.0 and math.isclose(float(s(10)), 1e-3, rel_tol=1e-6)
  assert math.isclose(float(s(100)), 1e-4, rel_tol=1e-5) and float(s(5)) < float(s(10))
  assert optim.warmup_steps(OptimConfig(warmup_steps=None, warmup_fraction=0.01), 1000) == 10


def test_overrides_parse_by_type():
  cfg = apply_overrides(TrainConfig(model=tiny_model()), [
      "optim.lr=1e-3", "steps=7", "data.path=/x", "checkpoint.async_save=false", "model.n_layers=4",
      "optim.warmup_steps=none", "model.pattern=gdn2,swa", "data.tokenizer=None"])
  assert cfg.optim.lr == 1e-3 and cfg.steps == 7 and cfg.data.path == "/x" and cfg.checkpoint.async_save is False
  assert cfg.model.n_layers == 4 and cfg.optim.warmup_steps is None and cfg.model.pattern == ("gdn2", "swa")


@pytest.mark.parametrize("args, expected", [
    (["optim.lrr=1e-3"], "unknown config key 'optim.lrr'; did you mean optim.lr"),
    (["--set", "stepz=3"], "unknown config key 'stepz'; did you mean steps"),
    (["steps=many"], "steps='many': expected a value of type int"),
    (["optim"], "has no '='"),
    (["model.n_layers=0"], "model.n_layers='0' was rejected: ModelConfig: `n_layers` is 0"),
    (["batch_size=3"], "does not divide the mesh's data*fsdp = 8 devices"),
    (["mesh.tensor=3"], "does not divide the 8 devices"),
    (["data.path=/no/such/dir/shards"], "data.path '/no/such/dir/shards' does not exist"),
    (["--config", "/no/such/config.py"], "config file '/no/such/config.py' not found"),
])
def test_bad_input_gives_one_line_error(args, expected, capsys):
  assert main(args) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and expected in err and "\n" not in err, err


def test_empty_corpus_error(tmp_path, capsys):
  (tmp_path / "empty.jsonl").write_text("\n")
  assert main([f"data.path={tmp_path / 'empty.jsonl'}", f"data.cache_dir={tmp_path}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "is empty" in err and "\n" not in err


def test_nan_loss_stops_with_step_and_names_a_checkpoint_that_trains(tmp_path, corpus):
  """lr=1e30: step 1's update gives finite but huge parameters (|p| ~ 1e30), whose step 2 is NaN. The checkpoint at
  step 1 holds them, so the last good one is step 0 (saved at the start); resuming from it with a sane lr trains."""
  cfg = tiny_config(str(tmp_path), corpus, steps=5, optim=OptimConfig(lr=1e30, warmup_steps=0, clip_norm=0.0))
  cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every=1))
  with pytest.raises(loop.TrainingDiverged) as e:
    loop.run(cfg, devices=ONE)
  msg = str(e.value)
  assert "at step 2" in msg and "Last good checkpoint: step 0" in msg and "resume_step=0" in msg, msg
  assert "\n" not in msg
  from train.checkpoint import Checkpointer
  ck = Checkpointer(cfg.checkpoint.dir, every=1, keep=2)
  assert ck.all_steps() == [0, 1]
  flat = ck.manager.restore(1, args=__import__("orbax.checkpoint").checkpoint.args.Composite(
      state=__import__("orbax.checkpoint").checkpoint.args.StandardRestore()))["state"]
  biggest = max(float(np.max(np.abs(np.asarray(v)))) for k, v in flat.items() if k.startswith("params."))
  assert math.isfinite(biggest) and biggest > 1e20  # finite: a finiteness check alone would call step 1 good
  ck.close()
  again = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-3),
                              checkpoint=dataclasses.replace(cfg.checkpoint, resume_step=0))
  out = loop.run(again, devices=ONE)
  assert out["resumed_from"] == 0
  losses = _losses(cfg.run_dir)
  assert sorted(losses) == [1, 2, 3, 4, 5] and all(math.isfinite(x) for x in losses.values()), losses
  # The diverged step-1 checkpoint is kept, set aside (the user chose to go back past it).
  assert any(n.startswith("1.superseded-") for n in os.listdir(cfg.checkpoint.dir))
