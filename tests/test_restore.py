"""Self-contained runs: every checkpoint step restores model, config and tokenizer alone, through one loader."""

import dataclasses
import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from evaluation import checkpoints as eval_ckpt
from evaluation import evaluate
from gdn2_jax import generate as gen
from gdn2_jax import restore as restore_lib
from train import loop
from train.config import CheckpointConfig
from train.testing import tiny_config, write_corpus


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
  """A finished 4-step run, copied elsewhere; the corpus, its cache and the original run are deleted.

  Returns `(moved run_dir, tokenizer JSON string of the run, the run's final params)`.
  """
  root = tmp_path_factory.mktemp("selfcontained")
  corpus = write_corpus(str(root / "corpus" / "c.jsonl"), n_docs=160, seed=5)
  cfg = tiny_config(str(root), corpus, steps=4)
  cfg = dataclasses.replace(cfg, checkpoint=CheckpointConfig(every=2, keep=2))  # under run_dir/checkpoints
  out = loop.run(cfg, devices=jax.devices()[:1])
  (bpe,) = glob.glob(os.path.join(cfg.data.cache_dir, "bpe-*.json"))
  with open(bpe) as f:
    tok_json = f.read()
  params = {restore_lib.dotted_key(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(out["state"]["params"])[0]}
  dst = str(tmp_path_factory.mktemp("elsewhere") / "run")
  shutil.copytree(cfg.run_dir, dst)
  for gone in (cfg.run_dir, cfg.data.cache_dir, os.path.dirname(corpus)):
    shutil.rmtree(gone)
  return dst, tok_json, params


def test_each_step_holds_config_and_tokenizer(moved):
  run, tok_json, _ = moved
  for step in ("2", "4"):
    d = os.path.join(run, "checkpoints", step)
    with open(os.path.join(d, "model_config", "model_config.json")) as f:
      assert json.load(f)["vocab_size"] == 300
    assert os.path.isfile(os.path.join(d, "tokenizer", "tokenizer.json"))


def test_restore_from_a_moved_run_without_its_corpus(moved):
  run, tok_json, params = moved
  from tokenizers import Tokenizer
  r = restore_lib.restore(run)
  assert r.step == 4 and r.config.vocab_size == 300 and r.run_dir == run
  # The tokenizer round-trips exactly (its whole JSON, and therefore every encoding).
  assert r.tokenizer.to_str() == Tokenizer.from_str(tok_json).to_str()
  text = "the erase gate reads keys: document 7."
  assert r.tokenizer.encode(text).ids == Tokenizer.from_str(tok_json).encode(text).ids
  got = {restore_lib.dotted_key(p): np.asarray(v)
         for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(r.model, nnx.Param))[0]}
  assert got.keys() == params.keys()
  for k in params:
    np.testing.assert_array_equal(got[k], params[k], err_msg=k)
  # Onto whatever devices exist: here replicated over the 8 CPU devices.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
  on8 = restore_lib.restore(run, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  leaf = jax.tree.leaves(nnx.state(on8.model, nnx.Param))[0]
  assert len(leaf.sharding.device_set) == 8
  # A step directory alone, and the checkpoint directory, restore the same step.
  assert restore_lib.restore(os.path.join(run, "checkpoints", "2")).step == 2
  assert restore_lib.restore(os.path.join(run, "checkpoints")).step == 4


def test_generate_and_evaluate_a_moved_run_through_the_one_loader(moved, tmp_path, capsys, monkeypatch):
  run, _, _ = moved
  calls = []
  real = restore_lib.restore

  def counting(*a, **k):
    calls.append(a[0])
    return real(*a, **k)

  monkeypatch.setattr(restore_lib, "restore", counting)
  assert gen.main([run, "--prompt", "the state decays", "--max-new-tokens", "3"]) == 0
  printed = capsys.readouterr().out
  assert printed.startswith("the state decays"), printed
  assert calls == [run]
  assert evaluate.main(["--checkpoint", f"tiny={run}", "--suite", "quick", "--examples", "2", "--batch-size", "2",
                        "--ppl-seq-len", "16", "--no-plots", "--out", str(tmp_path / "eval")]) == 0
  assert calls == [run, run]
  res = json.load(open(tmp_path / "eval" / "results.json"))["models"]["tiny"]
  assert res["perplexity"]["per_run"][0]["count"] > 0  # from the run's heldout_tokens.npy
  _, mcfg, tok, stream = eval_ckpt.load_run(run)  # what evaluate.main scored: the run's tokenizer, held-out sample
  assert calls == [run] * 3 and mcfg.vocab_size == 300 and tok.vocab_size == 300 and stream.size > 16


def _old_style(run, tmp_path, keep_config=True):
  """A copy of `run` whose steps lack the saved model config and tokenizer (as written before they were saved)."""
  old = str(tmp_path / "old")
  shutil.copytree(run, old)
  for step in glob.glob(os.path.join(old, "checkpoints", "*")):
    shutil.rmtree(os.path.join(step, "model_config"))
    shutil.rmtree(os.path.join(step, "tokenizer"))
  if not keep_config:
    os.remove(os.path.join(old, "config.json"))
  return old


def test_old_checkpoints_fall_back_or_say_what_is_missing(moved, tmp_path, capsys, caplog):
  run, tok_json, _ = moved
  old = _old_style(run, tmp_path)
  with caplog.at_level(logging.WARNING, logger="gdn2_jax"):
    r = restore_lib.restore(old)
  assert r.tokenizer is None and r.config.vocab_size == 300
  assert any("using the model entry of" in m and "config.json" in m for m in caplog.messages), caplog.messages
  # A text prompt needs a tokenizer: one line naming the flag; with it, generation runs.
  assert gen.main([old, "--prompt", "the state", "--max-new-tokens", "2"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: checkpoint ") and "--tokenizer PATH" in err and "\n" not in err, err
  tok_file = tmp_path / "tok.json"
  tok_file.write_text(tok_json)
  assert gen.main([old, "--prompt", "the state", "--max-new-tokens", "2", "--tokenizer", str(tok_file)]) == 0
  # Without the run's config.json too: one line naming what is missing and what to copy.
  bare = _old_style(run, tmp_path / "b", keep_config=False)
  with pytest.raises(restore_lib.RestoreError) as e:
    restore_lib.restore(os.path.join(bare, "checkpoints"))
  msg = str(e.value)
  assert "has no model_config/model_config.json" in msg and "copy the run's config.json" in msg and "\n" not in msg


@pytest.mark.parametrize("where, expected", [
    (lambda run, t: str(t / "nowhere"), "does not exist"),
    (lambda run, t: str(t), "holds no checkpoint"),
])
def test_bad_paths_are_one_line(moved, tmp_path, where, expected, capsys):
  run, _, _ = moved
  assert gen.main([where(run, tmp_path), "--ids", "1 2"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and expected in err and "\n" not in err, err
