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
from train.config import ConfigError, MeshConfig, OptimConfig, RunError, TrainConfig, apply_overrides
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
    (["log_every=0"], "log_every=0; expected an integer >= 1"),
    (["data.vocab_size=-3"], "data.vocab_size=-3; expected an integer >= 1"),
    (["batch_size=0"], "batch_size=0; expected an integer >= 1"),
    (["model.backend=foo"], "model.backend='foo'; expected one of ['auto', 'chunk'"),
])
def test_bad_input_gives_one_line_error(args, expected, capsys, tmp_path):
  # A run directory of its own: the default one may hold a user's finished `make train` run, which is reported as
  # complete before the data and mesh settings matter.
  assert main(args + [f"run_dir={tmp_path / 'run'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and expected in err and "\n" not in err, err


def test_empty_corpus_error(tmp_path, capsys):
  (tmp_path / "empty.jsonl").write_text("\n")
  assert main([f"data.path={tmp_path / 'empty.jsonl'}", f"data.cache_dir={tmp_path}", f"run_dir={tmp_path / 'run'}"]) == 2
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


# -- run directories: never lose work, one-line errors (issue 15) ---------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
  """A complete 6-step run (checkpoints at 3 and 6): `(config, directory)`; tests copy the directory."""
  root = str(tmp_path_factory.mktemp("finished"))
  cfg = tiny_config(root, corpus, steps=6)
  out = loop.run(cfg, devices=ONE)
  return cfg, root, {k: v for k, v in out.items() if k != "state"}


def _copy(finished, tmp_path):
  import shutil
  cfg, root, _ = finished
  shutil.copytree(root, tmp_path / "r")
  new = str(tmp_path / "r")
  return dataclasses.replace(cfg, run_dir=cfg.run_dir.replace(root, new),
                             checkpoint=dataclasses.replace(cfg.checkpoint, dir=cfg.checkpoint.dir.replace(root, new)))


def _snapshot(cfg):
  """Every file of the run (records and checkpoints) with its bytes."""
  out = {}
  for top in (cfg.run_dir, cfg.checkpoint.dir):
    for dirpath, _, files in os.walk(top):
      for n in files:
        with open(os.path.join(dirpath, n), "rb") as f:
          out[os.path.join(dirpath, n)] = f.read()
  return out


def _config_file(tmp_path, cfg) -> str:
  """A config file whose get_config() returns `cfg` (for the command line)."""
  import pickle
  blob = tmp_path / "cfg.pkl"
  blob.write_bytes(pickle.dumps(cfg))
  path = tmp_path / "cfg.py"
  path.write_text(f"import pickle\ndef get_config():\n  return pickle.loads(open({str(blob)!r}, 'rb').read())\n")
  return str(path)


@pytest.mark.parametrize("every", [3, 2])  # 3: same steps as the old run (orbax refused); 2: old steps deleted
def test_resume_false_on_a_used_run_dir_is_refused(finished, tmp_path, every, capsys):
  cfg = _copy(finished, tmp_path)
  again = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=False, every=every))
  before = _snapshot(cfg)
  assert main(["--config", _config_file(tmp_path, again)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err, err
  assert cfg.run_dir in err and "use a new run_dir" in err and "checkpoint.overwrite=true" in err, err
  assert _snapshot(cfg) == before  # nothing touched
  # The explicit setting starts again: the old steps are gone, the new run's are there.
  over = dataclasses.replace(again, checkpoint=dataclasses.replace(again.checkpoint, overwrite=True))
  out = loop.run(over, devices=ONE)
  assert out["resumed_from"] == 0 and sorted(_losses(cfg.run_dir)) == list(range(1, 7))
  from train.checkpoint import Checkpointer
  assert Checkpointer(cfg.checkpoint.dir, every=every, keep=2).all_steps() == [4, 6] if every == 2 else [3, 6]


def test_a_complete_run_is_not_trained_again(finished, tmp_path, capsys):
  cfg = _copy(finished, tmp_path)
  before = _snapshot(cfg)
  assert main(["--config", _config_file(tmp_path, cfg)]) == 0
  err = capsys.readouterr().err
  assert f"run_dir {cfg.run_dir} is complete (step 6 of 6)" in err and "final_eval.json" in err, err
  assert _snapshot(cfg) == before  # final_eval.json, metrics and checkpoints kept as they were


def test_reusing_a_run_dir_with_another_model_is_one_line(finished, tmp_path, capsys):
  cfg = _copy(finished, tmp_path)
  other = dataclasses.replace(cfg, steps=9, model=tiny_model(n_layers=2))
  before = _snapshot(cfg)
  with pytest.raises(RunError) as e:
    loop.run(other, devices=ONE)
  err = str(e.value)
  assert err.startswith("checkpoint step 6 in") and "another model or optimiser config" in err, err
  assert "\n" not in err and "use a new run_dir" in err.lower()
  assert _snapshot(cfg) == before


@pytest.mark.parametrize("damage", ["truncated array", "random bytes", "empty _METADATA", "empty iterator json"])
def test_damaged_latest_checkpoint_falls_back_and_is_kept(finished, tmp_path, damage, caplog):
  cfg = _copy(finished, tmp_path)
  step6 = os.path.join(cfg.checkpoint.dir, "6")
  if damage in ("truncated array", "random bytes"):
    d = os.path.join(step6, "state", "ocdbt.process_0", "d")
    big = max((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getsize)
    n = os.path.getsize(big)
    with open(big, "r+b") as f:
      if damage == "truncated array":
        f.truncate(n // 2)
      else:
        f.seek(n // 3)
        f.write(np.random.default_rng(0).bytes(n // 3))
  else:
    open(os.path.join(step6, *(("state", "_METADATA") if "METADATA" in damage else
                               ("data", "process_0-of-1.json"))), "w").close()
  os.remove(os.path.join(cfg.run_dir, "final_eval.json"))  # as if killed after the save, before the summary
  caplog.set_level("WARNING", logger="train")
  out = loop.run(cfg, devices=ONE)
  assert out["resumed_from"] == 3
  warned = [r.getMessage() for r in caplog.records if "could not be restored" in r.getMessage()]
  assert len(warned) == 1 and "checkpoint step 6" in warned[0] and "\n" not in warned[0], warned
  kept = [n for n in os.listdir(cfg.checkpoint.dir) if n.startswith("6.damaged-")]
  assert len(kept) == 1, os.listdir(cfg.checkpoint.dir)
  assert _losses(cfg.run_dir) == _losses(finished[1] + "/run")  # steps 4-6 replayed exactly


def test_resume_drops_replayed_records_and_first_loss_is_step_one(finished, tmp_path):
  """Killed after step 6 was logged but before its checkpoint finished: the resume replays 4-6."""
  import shutil
  cfg = _copy(finished, tmp_path)
  shutil.rmtree(os.path.join(cfg.checkpoint.dir, "6"))
  os.remove(os.path.join(cfg.run_dir, "final_eval.json"))
  out = loop.run(cfg, devices=ONE)
  assert out["resumed_from"] == 3
  with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
    steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
  assert steps == list(range(1, 7)), steps
  with open(os.path.join(cfg.run_dir, "final_eval.json")) as f:
    final = json.load(f)
  ref = finished[2]
  assert final["first_loss"] == ref["first_loss"] and final["last_loss"] == ref["last_loss"], (final, ref)


def test_full_disk_during_a_save_is_one_line(finished, tmp_path, monkeypatch):
  """Writing step 3 fails with ENOSPC (injected where grain writes the iterator state during orbax's save)."""
  import errno
  from grain._src.python.checkpoint import handler
  real = handler.CheckpointHandler.save

  def full(self, directory, *a, **kw):
    if os.path.basename(os.path.dirname(str(directory))).startswith("3."):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return real(self, directory, *a, **kw)

  monkeypatch.setattr(handler.CheckpointHandler, "save", full)
  cfg = tiny_config(str(tmp_path), finished[0].data.path, steps=6)
  with pytest.raises(RunError) as e:
    loop.run(cfg, devices=ONE)
  err = str(e.value)
  assert err.startswith("writing checkpoint step 3 to " + cfg.checkpoint.dir) and "\n" not in err, err
  assert "No space left on device" in err and "the last complete checkpoint is step 0" in err, err


def test_read_only_checkpoint_dir_is_one_line(tmp_path, corpus, capsys):
  """Refused before any work (orbax itself waits forever when it cannot create a step's temporary directory)."""
  cfg = tiny_config(str(tmp_path), corpus, steps=6, mesh=MeshConfig(), batch_size=8)  # every device: the CLI's mesh
  os.makedirs(cfg.checkpoint.dir)
  os.chmod(cfg.checkpoint.dir, 0o555)
  try:
    probe = os.path.join(cfg.checkpoint.dir, "probe")
    try:  # root ignores the mode bits; then make the directory immutable
      open(probe, "w").close()
      os.remove(probe)
      import subprocess
      if subprocess.run(["chattr", "+i", cfg.checkpoint.dir], capture_output=True).returncode:
        pytest.skip("cannot make a directory read-only here (root without chattr)")
    except PermissionError:
      pass
    assert main(["--config", _config_file(tmp_path, cfg)]) == 2
  finally:
    import subprocess
    subprocess.run(["chattr", "-i", cfg.checkpoint.dir], capture_output=True)
    os.chmod(cfg.checkpoint.dir, 0o755)
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: cannot write to {cfg.checkpoint.dir}: ") and "\n" not in err, err


def test_generate_from_a_removed_step_is_one_line(finished, tmp_path, capsys):
  from gdn2_jax import generate as gen
  cfg = _copy(finished, tmp_path)
  assert gen.main([cfg.run_dir, "--ids", "5 6", "--step", "2", "--max-new-tokens", "2"]) == 2  # not kept
  err = capsys.readouterr().err.strip()
  # [3, 6]: the run's own checkpoint.dir was found (it is not RUN_DIR/checkpoints here)
  assert err.startswith("error: --step 2: no checkpoint of that step in") and "[3, 6]" in err, err
  assert "\n" not in err
