"""Fault injection (slow tier): a trainer SIGKILLed at seeded moments and restarted, with its newest checkpoint
corrupted once, ends with the uninterrupted run's losses and parameters bit for bit, and loses no checkpoint."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from train.testing import tiny_config, write_corpus

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 14, 2


def _train(cfg, tmp, kill=None) -> int:
  path = os.path.join(tmp, "cfg.pkl")
  with open(path, "wb") as f:
    pickle.dump(cfg, f)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = [sys.executable, "-m", "tests.fault_trainer", path] + ([kill[0], str(kill[1])] if kill else [])
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if proc.returncode not in (0, -signal.SIGKILL):
    raise AssertionError(f"trainer failed ({proc.returncode}): {proc.stderr[-3000:]}")
  return proc.returncode


def _losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def _final_arrays(ckpt_dir, step):
  import orbax.checkpoint as ocp
  mgr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"))
  flat = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mgr.close()
  return {k: np.asarray(v) for k, v in flat.items()}


def _moments(seed: int) -> list[tuple[str, int]]:
  """11 kills at increasing steps: 4 inside saves (checkpoint steps), the rest before a step or after its log."""
  rng = random.Random(seed)
  saves = sorted(rng.sample(range(EVERY, STEPS + 1, EVERY), 4))
  others = sorted(rng.sample([s for s in range(1, STEPS + 1) if s not in saves], 7))
  kinds = [("save", s) for s in saves] + [(rng.choice(["step", "logged"]), s) for s in others]
  return sorted(kinds, key=lambda m: (m[1], m[0] != "step"))


def test_killed_and_corrupted_runs_end_bit_for_bit(tmp_path):
  corpus = write_corpus(str(tmp_path / "c.jsonl"), n_docs=240, seed=2)
  ref = tiny_config(str(tmp_path / "ref"), corpus, steps=STEPS)
  ref = ref.__class__(**{**ref.__dict__, "checkpoint": ref.checkpoint.__class__(
      **{**ref.checkpoint.__dict__, "every": EVERY, "keep": 3})})
  assert _train(ref, str(tmp_path)) == 0
  cfg = ref.__class__(**{**ref.__dict__, "run_dir": str(tmp_path / "k" / "run"), "checkpoint":
                         ref.checkpoint.__class__(**{**ref.checkpoint.__dict__, "dir": str(tmp_path / "k" / "ckpt")})})
  moments = _moments(seed=15)
  assert len(moments) >= 10 and sum(k == "save" for k, _ in moments) >= 3
  corrupt_after = len(moments) // 2
  kills = 0
  for i, moment in enumerate(moments):
    kills += _train(cfg, str(tmp_path), kill=moment) == -signal.SIGKILL
    if i == corrupt_after:  # truncate the newest checkpoint's biggest array file
      steps = sorted(int(n) for n in os.listdir(cfg.checkpoint.dir) if n.isdigit())
      d = os.path.join(cfg.checkpoint.dir, str(steps[-1]), "state", "ocdbt.process_0", "d")
      big = max((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getsize)
      with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)
      damaged = steps[-1]
  assert kills >= 10, (kills, moments)  # each moment was reached: the run was really killed there
  assert _train(cfg, str(tmp_path)) == 0
  assert _losses(cfg.run_dir) == _losses(ref.run_dir)  # every step once, in order, bit for bit
  names = os.listdir(cfg.checkpoint.dir)
  steps = sorted(int(n) for n in names if n.isdigit())
  ref_steps = sorted(int(n) for n in os.listdir(ref.checkpoint.dir) if n.isdigit())
  assert steps == ref_steps, (steps, ref_steps)  # only what keep=3 removes is gone
  assert any(n.startswith(f"{damaged}.damaged-") for n in names), names  # the damaged one is kept
  a, b = _final_arrays(cfg.checkpoint.dir, STEPS), _final_arrays(ref.checkpoint.dir, STEPS)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
